// Probe: can the consumer warpgroups expand W4A8 weights in registers as fast as the tensor cores consume them?
// (benchmarks/HISTORY.md, 2026-12-04 night: expanding them in shared memory with the producer warpgroup's idle warps
// was 3.5x too slow.) Two persistent kernels compute the same int32 product Y[M, N] = X[M, K] . Wexp[N, K]^T with
// X int8 activation codes and Wexp = sign-extended 4-bit code x group multiplier (64 channels per group), one
// 128 x 128 output tile at a time, 128 channels per pipeline stage, one producer warpgroup (TMA) and two consumer
// warpgroups, 6 stages, as the shipped sm90 GEMM's W4A8 main loop:
//   ss    both operands from shared memory: X tile and the int8 weights expanded beforehand (what the prep kernel
//         writes today), s8 wgmma m64n128k32 with A = 64 tokens per warpgroup      (today's main loop)
//   ss-overlap  as ss, but stage i - 1's MMAs still run while stage i's are issued (rega's overlap, no expansion)
//   rega  Y^T per tile: each consumer warpgroup owns 64 weight rows, loads its threads' 4-bit codes (one 1-D bulk
//         copy of a pre-shuffled 8.25 KB tile per stage: codes in fragment order + the tile's multipliers),
//         expands them in registers (w4a8_expand8: one word of 8 codes -> two A registers) and feeds them as the
//         register A operand; X is the shared-memory B operand. Stage i's expansion overlaps stage i-1's MMAs
//         (two register sets of A fragments).
//   With --wide (fourteenth session), 128 x 256 tiles instead: ss256 (the shipped W4A8 kernel's wide main loop)
//   against rega256 (the register-A loop on 128 weight rows x 256 tokens, codes stored as code + 7 so that a word of
//   8 codes expands in 7 instructions); see ModeCfg and probe_kernel.
// Each mode is checked against a naive kernel (exact int32 equality), on shapes with more tiles than SMs among them
// (each CTA then runs several tiles, the ring and phase carried across them), then timed
// (20 launches between two CUDA events, median of 5) on FLUX shapes at M = 4608. The epilogue stores int32 directly (both kernels; the
// rega stores are transposed); with store = 0 it only stores an impossible value (main loop alone).
// Build and run (GPU machine, from the repository root; or `bash benchmarks/gpu_run.sh regaprobe`):
//   TL=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   nvcc -std=c++17 -O3 -arch=sm_90a $(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))") \
//     -I svdquant_ops/csrc --expt-relaxed-constexpr -diag-suppress 3306 benchmarks/probes/w4a8_rega_probe.cu \
//     -L $TL -lc10 -ltorch_cpu -Xlinker -rpath=$TL -lcuda -o /tmp/rega && timeout 180 /tmp/rega
#include <cuda.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/gemm/prep.cuh"  // w4a8_expand8
#include "cuda/wgmma_ops.cuh"

using namespace svdquant;
using namespace svdquant::cuda_impl;
using svdquant::cuda_impl::gemm::w4a8_expand8;

constexpr int kStageK = 128;  // channels per stage
constexpr int kWshBytes = 8192 + 256;  // rega's pre-shuffled weight tile: 4-bit codes + 2 x 128 multipliers
constexpr int kRegaW = 8192 + 1024;    // rega256's: 128 rows of 128 codes + 4 multipliers per consumer thread

// Modes: 0 ss, 1 ss-overlap, 2 rega (128 x 128 tiles); 3 ss256, 4 rega256 (128 x 256). A tile is TM tokens x TN
// channels; the register-A modes compute Y^T, so their wgmma N side is the tokens.
template <int kMode>
struct ModeCfg {
  static constexpr bool kRegA = kMode == 2 || kMode == 4;
  static constexpr bool kWide = kMode >= 3;
  static constexpr int TM = kMode == 4 ? 256 : 128;
  static constexpr int TN = kMode == 3 ? 256 : 128;
  static constexpr int NACC = (kRegA ? TM : TN) / 2;  // int32 accumulators per consumer thread
  static constexpr int XB = TM * kStageK;             // one X tile (int8), 128-byte swizzled rows
  static constexpr int WB = kRegA ? (kWide ? kRegaW : kWshBytes) : TN * kStageK;  // one weight tile's bytes
  static constexpr int STAGES = kWide ? (kRegA ? 5 : 4) : 6;
  static constexpr int STAGE = ((XB + WB + 1023) / 1024) * 1024;
  static constexpr int SMEM = STAGES * STAGE + 1024 + 2 * STAGES * 8;
};

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

__device__ __forceinline__ void mma_s8_rs(int (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

// m64n256: the library's generated wrapper (wgmma_ops.cuh)
__device__ __forceinline__ void mma_s8_rs(int (&d)[128], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  wgmma::mma_s8_rs<256>(d, a, desc_b, scale_d);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// 1-D bulk copy global -> shared, completion counted on `bar` (bytes; size and addresses multiples of 16).
__device__ __forceinline__ void bulk_load_1d(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
#endif

// The 16 A registers of one stage (4 k32 steps) of a consumer thread from its 32 bytes of shuffled codes: word q of
// half h is k-step 2h + q / 2, row g + 8 (q % 2); its low 4 codes go to register (q % 2), its high 4 to (q % 2) + 2.
__host__ __device__ __forceinline__ void expand_stage(uint32_t (&a)[4][4], const uint4 c0, const uint4 c1, uint32_t m0g,
                                             uint32_t m0g8, uint32_t m1g, uint32_t m1g8) {
  const uint32_t w[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const uint32_t m = q < 4 ? ((q & 1) ? m0g8 : m0g) : ((q & 1) ? m1g8 : m1g);
    const uint2 e = w4a8_expand8(w[q], m);
    a[q >> 1][q & 1] = e.x;
    a[q >> 1][(q & 1) + 2] = e.y;
  }
}

template <int N>
__device__ __forceinline__ void fence_regs_u(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// ---------------- 128 x 256 tiles (fourteenth session): is the register-A loop as fast as today's wide loop? --------
// ss256   the main loop of the shipped W4A8 kernel's 128 x 256 tiles: X tile (128 tokens) and int8 weights (256
//         channels) from shared memory, s8 wgmma m64n256k32, each stage's MMAs waited for; 4 stages of 48 KB (the
//         library's kernel has 3 beside its 64 KB epilogue buffer, and a low-rank branch this probe leaves out)
// rega256 Y^T per tile: 128 weight rows (64 per consumer warpgroup) as wgmma's register A operand, expanded from
//         4-bit codes, against 256 tokens of X as the shared-memory B operand (m64n256k32): 32 KB of X plus 9 KB of
//         codes and multipliers per stage (5 stages of 41 KB) instead of 48 KB, and no prep kernel. The codes are
//         stored as u = code + 7 in [0, 14] (the format's codes are in [-7, 7]), two k-halves interleaved per word,
//         so one word of 8 codes becomes two A registers in 7 instructions (expand_word_u7); stage i's expansion
//         runs while stage i - 1's MMAs do.
// One word of 8 codes u (nibble 2j: channel k0 + j, nibble 2j + 1: channel k0 + 16 + j) times the multiplier m as
// int8 (u - 7) * m: u * m + 128 - 7 m lies in [2, 254] for u <= 14, m <= 18, so neither the multiply nor the add
// carries between bytes, and flipping bit 7 turns that excess-128 byte into the two's complement value.
__host__ __device__ __forceinline__ uint2 expand_word_u7(uint32_t w, uint32_t m, uint32_t bias) {
  const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
  return make_uint2((lo * m + bias) ^ 0x80808080u, (hi * m + bias) ^ 0x80808080u);
}

// The 16 A registers of one rega256 stage of a consumer thread: c0 / c1 its 32 bytes of codes (word q of half h is
// k-step 2h + q / 2, row g + 8 (q % 2)); mw its 4 multipliers (byte 2 grp + r: row g + 8 r, the stage's group grp).
__host__ __device__ __forceinline__ void expand_stage_u7(uint32_t (&a)[4][4], const uint4 c0, const uint4 c1,
                                                         uint32_t mw) {
  const uint32_t w[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int ks = q >> 1, r = q & 1;
    const uint32_t m = (mw >> (8 * (2 * (ks >> 1) + r))) & 0xFFu;
    const uint2 e = expand_word_u7(w[q], m, (128u - 7u * m) * 0x01010101u);
    a[ks][r] = e.x;
    a[ks][r + 2] = e.y;
  }
}

template <int kMode>
__global__ void __launch_bounds__(384, 1)
    probe_kernel(const __grid_constant__ CUtensorMap tmX, const __grid_constant__ CUtensorMap tmW,
                 const uint8_t* __restrict__ wsh, int* __restrict__ Y, int M, int N, int K, int store) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = ModeCfg<kMode>;
  constexpr int STAGES = C::STAGES, STAGE = C::STAGE;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * STAGE);
  uint64_t* empty = full + STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);
    }
    fence_barrier_init();
  }
  __syncthreads();
  const int m_tiles = M / C::TM, n_tiles = N / C::TN, total = m_tiles * n_tiles, nk = K / kStageK;
  if (threadIdx.x >= 256) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 256) {
      int s = 0;
      uint32_t ph = 0;
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int mt = tile % m_tiles, nt = tile / m_tiles;
        for (int ki = 0; ki < nk; ++ki) {
          mbar_wait(&empty[s], ph ^ 1);
          uint8_t* st = smem + s * STAGE;
          mbar_expect_tx(&full[s], C::XB + C::WB);
          tma_load_2d(&tmX, st, &full[s], ki * kStageK, mt * C::TM);
          if constexpr (C::kRegA) {
            bulk_load_1d(st + C::XB, wsh + (static_cast<size_t>(nt) * nk + ki) * C::WB, C::WB, &full[s]);
          } else {
            tma_load_2d(&tmW, st + C::XB, &full[s], ki * kStageK, nt * C::TN);
          }
          if (++s == STAGES) {
            s = 0;
            ph ^= 1;
          }
        }
      }
    }
  } else {
    setmaxnreg_inc<232>();
    const int wg = threadIdx.x >> 7, t = threadIdx.x & 127, warp = t >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    int s = 0;
    uint32_t ph = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const int mt = tile % m_tiles, nt = tile / m_tiles;
      int acc[C::NACC];
#pragma unroll
      for (int i = 0; i < C::NACC; ++i) acc[i] = 0;
      // ss-overlap and the register-A modes: after issuing stage s, wait for the stage before it and hand that one
      // back (stage s's MMAs keep running); after the last stage, wait for all and hand back the last
      int prev = -1;
      auto retire_previous = [&]() {
        wgmma_wait<1>();
        if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
        prev = s;
        if (++s == STAGES) {
          s = 0;
          ph ^= 1;
        }
      };
      auto retire_last = [&]() {
        wgmma_wait<0>();
        fence_regs(acc);
        if (lane == 0) mbar_arrive(&empty[prev]);
      };
      if constexpr (!C::kRegA) {
        for (int ki = 0; ki < nk; ++ki) {
          mbar_wait(&full[s], ph);
          uint8_t* st = smem + s * STAGE;
          const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::XB);
          fence_regs(acc);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) wgmma::mma_s8<C::TN>(acc, da + 2 * kk, db + 2 * kk, 1);
          wgmma_commit();
          if constexpr (kMode != 1) {  // each stage's MMAs waited for, as the shipped main loops
            wgmma_wait<0>();
            fence_regs(acc);
            if (lane == 0) mbar_arrive(&empty[s]);
            if (++s == STAGES) {
              s = 0;
              ph ^= 1;
            }
          } else {
            retire_previous();
          }
        }
        if constexpr (kMode == 1) retire_last();
      } else {
        // stage i: wait, expand into A[i % 2] (stage i - 2's MMAs, its last readers, are complete), issue, then wait
        // for stage i - 1's MMAs and hand its stage back
        uint32_t A0[4][4], A1[4][4];
        auto step = [&](uint32_t (&a)[4][4]) {
          mbar_wait(&full[s], ph);
          const uint8_t* st = smem + s * STAGE;
          const uint4* wt = reinterpret_cast<const uint4*>(st + C::XB) + wg * 256 + t;
          const uint4 c0 = wt[0], c1 = wt[128];
          if constexpr (C::kWide) {
            expand_stage_u7(a, c0, c1, *reinterpret_cast<const uint32_t*>(st + C::XB + 8192 + wg * 512 + t * 4));
          } else {
            const uint8_t* mu = st + C::XB + 8192 + wg * 64 + warp * 16 + g;
            expand_stage(a, c0, c1, mu[0], mu[8], mu[128], mu[136]);
          }
          const uint64_t db = desc_sw128(st);
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) fence_regs_u(a[kk]);
          fence_regs(acc);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) mma_s8_rs(acc, a[kk], db + 2 * kk, 1);
          wgmma_commit();
          retire_previous();
        };
        int ki = 0;
        for (; ki + 1 < nk; ki += 2) {
          step(A0);
          step(A1);
        }
        if (ki < nk) step(A0);
        retire_last();
      }
      // accumulator (r, c) of this thread: r = 64 wg + 16 warp + g + 8 h, c = 8 j + 2 tq + e (acc[4 j + 2 h + e]);
      // ss modes: rows are tokens, columns channels; register-A modes: rows are channels, columns tokens (Y^T)
#pragma unroll
      for (int j = 0; j < C::NACC / 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int v = acc[4 * j + 2 * h + e];
            const int r = 64 * wg + 16 * warp + g + 8 * h, c = 8 * j + 2 * tq + e;
            const int64_t m = C::kRegA ? mt * C::TM + c : mt * C::TM + r;
            const int64_t n = C::kRegA ? nt * C::TN + r : nt * C::TN + c;
            if (store || v == 0x7FFFFFFF) Y[m * N + n] = v;
          }
    }
  }
#endif
}

__global__ void reference_kernel(const int8_t* X, const uint8_t* codes, const uint8_t* mult, int* Y, int M, int N,
                                 int K) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(M) * N) return;
  const int m = i / N, n = i % N;
  int s = 0;
  for (int k = 0; k < K; ++k) {
    const int nib = (codes[int64_t(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
    s += int(X[int64_t(m) * K + k]) * ((nib ^ 8) - 8) * int(mult[int64_t(n) * (K / 64) + k / 64]);
  }
  Y[i] = s;
}

// Host: rega's pre-shuffled tiles [N / 128][K / 128][8448 bytes] (see expand_stage for the word order).
std::vector<uint8_t> shuffle(const std::vector<uint8_t>& codes, const std::vector<uint8_t>& mult, int N, int K) {
  const int nk = K / kStageK, G = K / 64;
  std::vector<uint8_t> out(size_t(N / 128) * nk * kWshBytes);
  auto nib = [&](int n, int k) -> uint32_t { return (codes[size_t(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF; };
  for (int nt = 0; nt < N / 128; ++nt)
    for (int kt = 0; kt < nk; ++kt) {
      uint8_t* base = out.data() + (size_t(nt) * nk + kt) * kWshBytes;
      for (int wg = 0; wg < 2; ++wg)
        for (int t = 0; t < 128; ++t) {
          const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
          for (int half = 0; half < 2; ++half)
            for (int q = 0; q < 4; ++q) {
              const int ks = 2 * half + q / 2, r = q % 2;
              const int n = nt * 128 + 64 * wg + 16 * warp + g + 8 * r;
              uint32_t word = 0;
              for (int i = 0; i < 8; ++i) {
                const int k = kt * kStageK + 32 * ks + (i < 4 ? 4 * tq + i : 16 + 4 * tq + (i - 4));
                word |= nib(n, k) << (4 * i);
              }
              std::memcpy(base + wg * 4096 + half * 2048 + t * 16 + q * 4, &word, 4);
            }
        }
      for (int gi = 0; gi < 2; ++gi)
        for (int rr = 0; rr < 128; ++rr) base[8192 + gi * 128 + rr] = mult[size_t(nt * 128 + rr) * G + kt * 2 + gi];
    }
  return out;
}

// Host check of the layout: every consumer thread's A registers, as expand_stage builds them from the shuffled
// tile, hold the expanded weights at the (row, channel) that wgmma's register-A layout for 8-bit types gives them
// (CUTLASS's ALayout_64x32: row 16 warp + lane / 4 + 8 (r % 2), channels 4 (lane % 4) + byte + 16 (r / 2) of the
// k32 step). Returns the number of mismatching bytes.
size_t host_layout_check(const std::vector<uint8_t>& codes, const std::vector<uint8_t>& mult,
                         const std::vector<uint8_t>& wexp, int N, int K) {
  const std::vector<uint8_t> wsh = shuffle(codes, mult, N, K);
  const int nk = K / kStageK;
  size_t bad = 0;
  for (int nt = 0; nt < N / 128; ++nt)
    for (int kt = 0; kt < nk; ++kt) {
      const uint8_t* st = wsh.data() + (size_t(nt) * nk + kt) * kWshBytes;
      for (int wg = 0; wg < 2; ++wg)
        for (int t = 0; t < 128; ++t) {
          const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
          uint4 c0, c1;
          std::memcpy(&c0, st + (wg * 256 + t) * 16, 16);
          std::memcpy(&c1, st + (wg * 256 + 128 + t) * 16, 16);
          const uint8_t* mu = st + 8192 + wg * 64 + warp * 16 + g;
          uint32_t a[4][4];
          expand_stage(a, c0, c1, mu[0], mu[8], mu[128], mu[136]);
          for (int ks = 0; ks < 4; ++ks)
            for (int r = 0; r < 4; ++r)
              for (int b = 0; b < 4; ++b) {
                const int n = nt * 128 + 64 * wg + 16 * warp + g + 8 * (r % 2);
                const int k = kt * kStageK + 32 * ks + 4 * tq + b + 16 * (r / 2);
                bad += uint8_t(a[ks][r] >> (8 * b)) != wexp[size_t(n) * K + k];
              }
        }
    }
  return bad;
}

// rega256's pre-shuffled tiles [N / 128][K / 128][kRegaW bytes]: codes as u = code + 7 in the word order of
// expand_stage_u7, then each consumer thread's 4 multipliers.
std::vector<uint8_t> shuffle_u7(const std::vector<uint8_t>& codes, const std::vector<uint8_t>& mult, int N, int K) {
  const int nk = K / kStageK, G = K / 64;
  std::vector<uint8_t> out(size_t(N / 128) * nk * kRegaW);
  auto u7 = [&](int n, int k) -> uint32_t {
    const int nib = (codes[size_t(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
    return uint32_t(((nib ^ 8) - 8) + 7);
  };
  for (int nt = 0; nt < N / 128; ++nt)
    for (int kt = 0; kt < nk; ++kt) {
      uint8_t* base = out.data() + (size_t(nt) * nk + kt) * kRegaW;
      for (int wg = 0; wg < 2; ++wg)
        for (int t = 0; t < 128; ++t) {
          const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
          const int row0 = nt * 128 + 64 * wg + 16 * warp + g;
          for (int half = 0; half < 2; ++half)
            for (int q = 0; q < 4; ++q) {
              const int ks = 2 * half + q / 2, n = row0 + 8 * (q % 2);
              const int k0 = kt * kStageK + 32 * ks + 4 * tq;
              uint32_t word = 0;
              for (int j = 0; j < 4; ++j) word |= (u7(n, k0 + j) << (8 * j)) | (u7(n, k0 + 16 + j) << (8 * j + 4));
              std::memcpy(base + wg * 4096 + half * 2048 + t * 16 + q * 4, &word, 4);
            }
          for (int grp = 0; grp < 2; ++grp)
            for (int r = 0; r < 2; ++r)
              base[8192 + wg * 512 + t * 4 + 2 * grp + r] = mult[size_t(row0 + 8 * r) * G + kt * 2 + grp];
        }
    }
  return out;
}

// Host check of rega256's layout: the A registers expand_stage_u7 builds from the shuffled tile hold the expanded
// weights where wgmma's register-A layout for 8-bit types puts them (as host_layout_check). Mismatching bytes.
size_t host_layout_check_u7(const std::vector<uint8_t>& codes, const std::vector<uint8_t>& mult,
                            const std::vector<uint8_t>& wexp, int N, int K) {
  const std::vector<uint8_t> wsh = shuffle_u7(codes, mult, N, K);
  const int nk = K / kStageK;
  size_t bad = 0;
  for (int nt = 0; nt < N / 128; ++nt)
    for (int kt = 0; kt < nk; ++kt) {
      const uint8_t* st = wsh.data() + (size_t(nt) * nk + kt) * kRegaW;
      for (int wg = 0; wg < 2; ++wg)
        for (int t = 0; t < 128; ++t) {
          const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
          uint4 c0, c1;
          uint32_t mw;
          std::memcpy(&c0, st + (wg * 256 + t) * 16, 16);
          std::memcpy(&c1, st + (wg * 256 + 128 + t) * 16, 16);
          std::memcpy(&mw, st + 8192 + wg * 512 + t * 4, 4);
          uint32_t a[4][4];
          expand_stage_u7(a, c0, c1, mw);
          for (int ks = 0; ks < 4; ++ks)
            for (int r = 0; r < 4; ++r)
              for (int b = 0; b < 4; ++b) {
                const int n = nt * 128 + 64 * wg + 16 * warp + g + 8 * (r % 2);
                const int k = kt * kStageK + 32 * ks + 4 * tq + b + 16 * (r / 2);
                bad += uint8_t(a[ks][r] >> (8 * b)) != wexp[size_t(n) * K + k];
              }
        }
    }
  return bad;
}

#ifndef REGA_PROBE_HOST_ONLY
CUtensorMap map_2d(const void* ptr, uint64_t inner, uint64_t outer, uint32_t box_rows = 128) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {inner};
  const cuuint32_t box[2] = {128, box_rows};
  const cuuint32_t es[2] = {1, 1};
  const CUresult r = cuTensorMapEncodeTiled(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims,
                                            strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::printf("cuTensorMapEncodeTiled failed (%d)\n", int(r));
    std::exit(1);
  }
  return m;
}

struct Problem {
  int M, N, K;
  int8_t* X;
  uint8_t *codes, *mult, *wexp, *wsh;
  int* Y;
};

Problem make_problem(int M, int N, int K, uint32_t seed) {
  std::mt19937 rng(seed);
  const int G = K / 64;
  std::vector<int8_t> x(size_t(M) * K);
  for (auto& v : x) v = int8_t(int(rng() % 255) - 127);
  std::vector<uint8_t> codes(size_t(N) * K / 2), mult(size_t(N) * G), wexp(size_t(N) * K);
  for (auto& c : codes) c = uint8_t(((rng() % 15 + 9) & 0xF) | (((rng() % 15 + 9) & 0xF) << 4));  // [-7, 7]
  for (auto& m : mult) m = uint8_t(1 + rng() % 18);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      const int nib = (codes[size_t(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
      wexp[size_t(n) * K + k] = uint8_t(int8_t(((nib ^ 8) - 8) * mult[size_t(n) * G + k / 64]));
    }
  const std::vector<uint8_t> wsh = shuffle(codes, mult, N, K);
  if (M <= 2048) {  // the checked shapes
    const size_t bad = host_layout_check(codes, mult, wexp, N, K);
    std::printf("host layout check N=%d K=%d: %zu bytes differ\n", N, K, bad);
    if (bad) std::exit(1);
  }
  Problem p{M, N, K};
  CK(cudaMalloc(&p.X, x.size()));
  CK(cudaMalloc(&p.codes, codes.size()));
  CK(cudaMalloc(&p.mult, mult.size()));
  CK(cudaMalloc(&p.wexp, wexp.size()));
  CK(cudaMalloc(&p.wsh, wsh.size()));
  CK(cudaMalloc(&p.Y, size_t(M) * N * 4));
  CK(cudaMemcpy(p.X, x.data(), x.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p.codes, codes.data(), codes.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p.mult, mult.data(), mult.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p.wexp, wexp.data(), wexp.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p.wsh, wsh.data(), wsh.size(), cudaMemcpyHostToDevice));
  return p;
}

void free_problem(Problem& p) {
  cudaFree(p.X);
  cudaFree(p.codes);
  cudaFree(p.mult);
  cudaFree(p.wexp);
  cudaFree(p.wsh);
  cudaFree(p.Y);
}

// One launch of mode kMode: X and the int8 weights through TMA maps (boxes of TM and TN rows), the register-A
// modes' shuffled tiles at wsh.
template <int kMode>
void launch(const Problem& p, const CUtensorMap& mx, const CUtensorMap& mw, const uint8_t* wsh, int store, int sms) {
  using C = ModeCfg<kMode>;
  static bool attr = false;
  if (!attr) {
    CK(cudaFuncSetAttribute(probe_kernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
    attr = true;
  }
  const int tiles = (p.M / C::TM) * (p.N / C::TN);
  probe_kernel<kMode><<<std::min(tiles, sms), 384, C::SMEM>>>(mx, mw, wsh, p.Y, p.M, p.N, p.K, store);
  CK(cudaGetLastError());
}

// Mean device time of one launch: 20 launches queued between one pair of events (no host work inside), median of 5.
template <class Launch>
float median_us(Launch launch) {
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < 5; ++r) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < 20; ++i) launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1e3f / 20);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

template <int kMode>
float time_us(const Problem& p, const CUtensorMap& mx, const CUtensorMap& mw, const uint8_t* wsh, int store, int sms) {
  return median_us([&] { launch<kMode>(p, mx, mw, wsh, store, sms); });
}

// Counts the results that differ from the reference and prints one line (with the first difference).
size_t compare(const std::vector<int>& ref, const std::vector<int>& got, const char* name, const Problem& p) {
  size_t diff = 0, first = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (ref[i] != got[i] && diff++ == 0) first = i;
  std::printf("check %s M=%d N=%d K=%d: %zu of %zu differ", name, p.M, p.N, p.K, diff, ref.size());
  if (diff) std::printf(" (first at m=%zu n=%zu: %d, want %d)", first / p.N, first % p.N, got[first], ref[first]);
  std::printf("\n");
  return diff;
}

// ---------------- 128 x 256 tiles: ss256 against rega256 ----------------
// The wide modes' problem: X, the expanded weights (ss256) and rega256's shuffled tiles (checked on the host first
// where the shape is small).
uint8_t* upload_u7(Problem& p, bool check) {
  const int G = p.K / 64;
  std::vector<uint8_t> codes(size_t(p.N) * p.K / 2), mult(size_t(p.N) * G), wexp(size_t(p.N) * p.K);
  CK(cudaMemcpy(codes.data(), p.codes, codes.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(mult.data(), p.mult, mult.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(wexp.data(), p.wexp, wexp.size(), cudaMemcpyDeviceToHost));
  if (check) {
    const size_t bad = host_layout_check_u7(codes, mult, wexp, p.N, p.K);
    std::printf("host layout check (rega256) N=%d K=%d: %zu bytes differ\n", p.N, p.K, bad);
    if (bad) std::exit(1);
  }
  const std::vector<uint8_t> wsh = shuffle_u7(codes, mult, p.N, p.K);
  uint8_t* d;
  CK(cudaMalloc(&d, wsh.size()));
  CK(cudaMemcpy(d, wsh.data(), wsh.size(), cudaMemcpyHostToDevice));
  return d;
}

int run_wide(int sms) {
  int bad = 0;
  // 4608 x 3072 x 896: 432 tiles on 132 SMs (several per CTA) and 7 stages (rega256's A0 / A1 across tiles)
  const int checks[][3] = {{2048, 2048, 1024}, {1280, 3072, 896}, {512, 512, 3072}, {4608, 3072, 896}};
  for (const auto& c : checks) {
    Problem p = make_problem(c[0], c[1], c[2], 5u + c[2]);
    uint8_t* wsh = upload_u7(p, true);
    const CUtensorMap x128 = map_2d(p.X, p.K, p.M, 128), x256 = map_2d(p.X, p.K, p.M, 256),
                      w256 = map_2d(p.wexp, p.K, p.N, 256);
    std::vector<int> ref(size_t(p.M) * p.N), got(ref.size());
    reference_kernel<<<(p.M * p.N + 255) / 256, 256>>>(p.X, p.codes, p.mult, p.Y, p.M, p.N, p.K);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(ref.data(), p.Y, ref.size() * 4, cudaMemcpyDeviceToHost));
    for (int kind = 3; kind <= 4; ++kind) {
      CK(cudaMemset(p.Y, 0x7F, ref.size() * 4));
      if (kind == 3) launch<3>(p, x128, w256, wsh, 1, sms);
      if (kind == 4) launch<4>(p, x256, w256, wsh, 1, sms);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(got.data(), p.Y, got.size() * 4, cudaMemcpyDeviceToHost));
      bad += compare(ref, got, kind == 3 ? "ss256  " : "rega256", p) != 0;
    }
    cudaFree(wsh);
    free_problem(p);
  }
  const int shapes[][2] = {{3072, 3072}, {3072, 9216}, {3072, 12288}, {12288, 3072}, {15360, 3072}};
  for (const auto& sh : shapes) {
    Problem p = make_problem(4608, sh[1], sh[0], 11u);
    uint8_t* wsh = upload_u7(p, false);
    const CUtensorMap x128 = map_2d(p.X, p.K, p.M, 128), x256 = map_2d(p.X, p.K, p.M, 256),
                      w256 = map_2d(p.wexp, p.K, p.N, 256);
    const double ops = 2.0 * p.M * p.N * p.K;
    for (int store = 1; store >= 0; --store) {
      const float ss = time_us<3>(p, x128, w256, wsh, store, sms),
                  ra = time_us<4>(p, x256, w256, wsh, store, sms);
      std::printf("time M=%d K=%d N=%d %s: ss256 %.1f us (%.0f TOPS), rega256 %.1f us (%.0f TOPS): rega256/ss256 "
                  "%.3f\n", p.M, p.K, p.N, store ? "with stores" : "main loop ", ss, ops / ss * 1e-6, ra,
                  ops / ra * 1e-6, ra / ss);
    }
    cudaFree(wsh);
    free_problem(p);
  }
  return bad;
}

int main(int argc, char** argv) {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs\n", prop.name, sms);
  if (argc > 1 && std::strcmp(argv[1], "--wide") == 0) {  // the 128 x 256 modes only
    const int wbad = run_wide(sms);
    std::printf("%s\n", wbad ? "FAIL" : "PASS");
    return wbad != 0;
  }
  int bad = 0;
  // correctness: more tiles than SMs (each CTA runs several tiles), odd and even numbers of stages
  const int checks[][3] = {{2048, 2048, 1024}, {1152, 3072, 896}, {512, 384, 3072}};
  for (const auto& c : checks) {
    Problem p = make_problem(c[0], c[1], c[2], 7u + c[2]);
    const CUtensorMap mx = map_2d(p.X, p.K, p.M), mw = map_2d(p.wexp, p.K, p.N);
    std::vector<int> ref(size_t(p.M) * p.N), got(ref.size());
    reference_kernel<<<(p.M * p.N + 255) / 256, 256>>>(p.X, p.codes, p.mult, p.Y, p.M, p.N, p.K);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(ref.data(), p.Y, ref.size() * 4, cudaMemcpyDeviceToHost));
    const char* names[3] = {"ss        ", "ss-overlap", "rega      "};
    for (int kind = 0; kind < 3; ++kind) {
      CK(cudaMemset(p.Y, 0x7F, ref.size() * 4));  // 0x7F7F7F7F: beyond any result (|Y| <= 127 * 126 * K)
      if (kind == 0) launch<0>(p, mx, mw, p.wsh, 1, sms);
      if (kind == 1) launch<1>(p, mx, mw, p.wsh, 1, sms);
      if (kind == 2) launch<2>(p, mx, mw, p.wsh, 1, sms);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(got.data(), p.Y, got.size() * 4, cudaMemcpyDeviceToHost));
      bad += compare(ref, got, names[kind], p) != 0;
    }
    free_problem(p);
  }
  // speed at M = 4608 on FLUX shapes (K x N)
  const int shapes[][2] = {{3072, 3072}, {3072, 12288}, {12288, 3072}, {15360, 3072}};
  for (const auto& sh : shapes) {
    Problem p = make_problem(4608, sh[1], sh[0], 11u);
    const CUtensorMap mx = map_2d(p.X, p.K, p.M), mw = map_2d(p.wexp, p.K, p.N);
    const double ops = 2.0 * p.M * p.N * p.K;
    for (int store = 1; store >= 0; --store) {
      const float ss = time_us<0>(p, mx, mw, p.wsh, store, sms), so = time_us<1>(p, mx, mw, p.wsh, store, sms),
                  ra = time_us<2>(p, mx, mw, p.wsh, store, sms);
      std::printf("time M=%d K=%d N=%d %s: ss %.1f us (%.0f TOPS), ss-overlap %.1f us (%.0f TOPS), rega %.1f us "
                  "(%.0f TOPS): rega/ss %.3f, rega/ss-overlap %.3f\n",
                  p.M, p.K, p.N, store ? "with stores" : "main loop ", ss, ops / ss * 1e-6, so, ops / so * 1e-6, ra,
                  ops / ra * 1e-6, ra / ss, ra / so);
    }
    free_problem(p);
  }
  std::printf("%s\n", bad ? "FAIL" : "PASS");
  return bad != 0;
}
#endif  // REGA_PROBE_HOST_ONLY
