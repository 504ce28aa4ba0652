// CUDA kernels of svdquant::gemm_w4a4 (semantics: ../cpu/gemm_w4a4.cpp).
//
// Hopper path (compute capability 9.0, library built for sm_90a), three steps on the current stream:
//  1. prep (one launch, memory-bound): expands the 4-bit codes of both operands into 8-bit tensor-core inputs in a
//     workspace. INT4: fp8 e4m3 codes (int4 [-8, 7] and uint4 [0, 15] are exact e4m3 values). NVFP4: bf16 values
//     code * scale, which are exact (an e2m1 value has 2 significant bits, an e4m3 scale 4, so their product fits
//     bf16's 8). Also writes the fp32 scales in the layouts the GEMM loads (activation scales transposed [G, M],
//     weight scales permuted per output tile so each thread's columns are contiguous), the low-rank operands as
//     bf16 pairs (lora_act = hi + lo, the branch is hi*up + lo*up (+ hi*up_lo when proj_up is not bf16): fp32-level
//     accuracy on bf16 tensor cores), and bias / global scale as padded fp32.
//  2. gemm (persistent, warp-specialized): one producer thread issues TMA loads (128-byte swizzle) into a 6-stage
//     mbarrier ring; two consumer warpgroups each own 64 rows of a 128 x 128 tile. Per tile: the rank-R branch
//     first, as bf16 wgmma K-steps; then INT4, per 128-channel stage: the four fp8 wgmma (m64n128k32) of its two
//     64-channel groups into two temporary accumulators (exact integer dot products), group 0 promoted on the CUDA
//     cores (acc += tmp * (act_scale[row] * wgt_scale[col])) while group 1's MMAs run, the stage released, group 1
//     promoted; NVFP4: bf16 wgmma over all of K into one temporary, times the global scale once; W4A8: the int8
//     activation codes go to TMA as they are (prep only expands the weights to code * multiplier, exact int8), s8
//     wgmma over all of K into one int32 accumulator, scaled once by act_scale[row] * channel_scale[col] (no
//     promotion: the point of that format). Epilogue: + bias, cast, store. benchmarks/NOTES_kernels.md has the
//     measured limits of these schedules.
// Portable path (other GPUs, or SVDQUANT_OPS_CUDA_PORTABLE=1): a tiled SIMT kernel with exact dp4a group dot
//     products that performs the CPU reference's fp32 operations in the same order.
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../checks.h"
#include "../formats.h"
#include "common.cuh"
#include "ops_cuda.h"
#include "wgmma_ops.cuh"

namespace svdquant {
namespace cuda_impl {
namespace {

enum ScalarKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kE4M3 = 3, kU8 = 4 };

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat8_e4m3fn: return kE4M3;
    case at::kByte: return kU8;  // W4A8 weight multipliers
    default: TORCH_CHECK(false, "svdquant::gemm_w4a4: unexpected dtype ", t);
  }
}

__device__ __forceinline__ float load_f(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kU8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::Float8_e4m3fn*>(p)[i]);
  }
}

__device__ __forceinline__ void store_out(void* out, int kind, int64_t i, float v) {
  switch (kind) {
    case kF32: static_cast<float*>(out)[i] = v; break;
    case kF16: static_cast<c10::Half*>(out)[i] = static_cast<c10::Half>(v); break;
    default: static_cast<c10::BFloat16*>(out)[i] = static_cast<c10::BFloat16>(v); break;
  }
}

// Two adjacent outputs (col, col + 1) of one row; `vec` when both exist and the pair is aligned.
__device__ __forceinline__ void store_out2(void* out, int kind, int64_t i, float v0, float v1, bool vec,
                                           bool second) {
  if (vec) {
    switch (kind) {
      case kF32: *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0, v1); break;
      case kF16: {
        const c10::Half h0 = static_cast<c10::Half>(v0), h1 = static_cast<c10::Half>(v1);
        *reinterpret_cast<uint32_t*>(static_cast<c10::Half*>(out) + i) = uint32_t(h0.x) | (uint32_t(h1.x) << 16);
        break;
      }
      default: {
        const c10::BFloat16 h0 = static_cast<c10::BFloat16>(v0), h1 = static_cast<c10::BFloat16>(v1);
        *reinterpret_cast<uint32_t*>(static_cast<c10::BFloat16*>(out) + i) =
            uint32_t(h0.x) | (uint32_t(h1.x) << 16);
        break;
      }
    }
  } else {
    store_out(out, kind, i, v0);
    if (second) store_out(out, kind, i + 1, v1);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// 1. prep
// ------------------------------------------------------------------------------------------------------------------
struct PrepArgs {
  const uint8_t* a_codes;
  const void* a_scales;
  int a_scale_kind;
  const float* lora_act;
  int64_t M, K, G;
  int R, KL, nseg;
  int64_t Mp;
  uint8_t* A;  // [M, K] fp8 (INT4) or bf16 (NVFP4)
  float* SA;   // [G, Mp]
  __nv_bfloat16* LA;  // [M, KL]
  const uint8_t* w_codes;
  const void* w_scales;
  int w_scale_kind;
  const void* proj_up;
  int up_kind;
  const void* bias;
  int bias_kind;
  const float* gscale;
  int64_t gscale_numel;
  int64_t N;
  int n_tiles, BN, SWP;
  int64_t Np;
  uint8_t* B;   // [N, K]
  float* SW;    // [G, n_tiles * SWP]
  __nv_bfloat16* UP;  // [N, KL]
  float* biasf;  // [Np]
  float* gsf;    // [Np]
  int nvfp4, act_unsigned;
  int w4a8;  // W4A8: act codes are used as they are; B = int8 code * multiplier; SA = per-token scales [Mp]
};

__device__ __forceinline__ uint32_t e4m3_of_nibble(uint32_t nib, bool is_unsigned) {
  constexpr uint64_t kPos = 0x4E4C4A4844403800ull;  // 0..7
  constexpr uint64_t kNeg = 0xB8C0C4C8CACCCED0ull;  // nibbles 8..15 as int4: -8..-1
  constexpr uint64_t kHi = 0x5756555453525150ull;   // nibbles 8..15 as uint4: 8..15
  const uint64_t tab = nib < 8 ? kPos : (is_unsigned ? kHi : kNeg);
  return static_cast<uint32_t>(tab >> (8 * (nib & 7))) & 0xFFu;
}

__device__ __forceinline__ void expand_unit(const uint8_t* codes, const void* scales, int scale_kind, uint8_t* dst,
                                            uint32_t K, uint32_t G, uint32_t u, bool nvfp4, bool is_unsigned,
                                            const uint16_t* lut) {
  const uint32_t per_row = K / 16;
  const int64_t row = u / per_row, ku = u % per_row;
  const uint2 in = *reinterpret_cast<const uint2*>(codes + row * (K / 2) + ku * 8);
  if (!nvfp4) {
    // lut[byte] = the two e4m3 bytes of the byte's low and high nibble
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = i < 2 ? in.x : in.y;
      const int sh = 16 * (i & 1);
      o[i] = uint32_t(lut[(w >> sh) & 0xFF]) | (uint32_t(lut[(w >> (sh + 8)) & 0xFF]) << 16);
    }
    *reinterpret_cast<uint4*>(dst + row * K + ku * 16) = make_uint4(o[0], o[1], o[2], o[3]);
  } else {
    const float sc = load_f(scales, scale_kind, row * G + ku);  // group 16 == one unit
    uint32_t o[8];
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
      float v[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nib = static_cast<int>(((i + h < 8 ? in.x : in.y) >> (4 * ((i + h) & 7))) & 0xFu);
        v[h] = static_cast<float>(e2m1_doubled(nib)) * 0.5f * sc;  // exact
      }
      const __nv_bfloat162 b = __floats2bfloat162_rn(v[0], v[1]);
      o[i >> 1] = *reinterpret_cast<const uint32_t*>(&b);
    }
    uint4* d = reinterpret_cast<uint4*>(dst + (row * K + ku * 16) * 2);
    d[0] = make_uint4(o[0], o[1], o[2], o[3]);
    d[1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

// W4A8 weights: 16 codes of one row times their group's integer multiplier (in [1, 18]), as int8 (|code * m| <= 126).
__device__ __forceinline__ void expand_unit_w4a8(const uint8_t* codes, const uint8_t* mult, uint8_t* dst, uint32_t K,
                                                 uint32_t G, uint32_t u) {
  const uint32_t per_row = K / 16;
  const int64_t row = u / per_row, ku = u % per_row;
  const uint2 in = *reinterpret_cast<const uint2*>(codes + row * (K / 2) + ku * 8);
  const int m = mult[row * G + ku / 4];  // 4 units of 16 per 64-channel group
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = i < 2 ? in.x : in.y;
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int nib = static_cast<int>((w >> (16 * (i & 1) + 4 * b)) & 0xFu);
      word |= (static_cast<uint32_t>(sign_extend_nibble(nib) * m) & 0xFFu) << (8 * b);
    }
    o[i] = word;
  }
  *reinterpret_cast<uint4*>(dst + row * K + ku * 16) = make_uint4(o[0], o[1], o[2], o[3]);
}

// One segment of a value split into bf16 parts for the fp32-accurate branch: the low part (v - bf16(v)) in segment
// `lo_seg`, the high part bf16(v) in the others.
__device__ __forceinline__ __nv_bfloat16 bf16_split_part(float v, int seg, int lo_seg) {
  const float hi = __bfloat162float(__float2bfloat16_rn(v));
  return __float2bfloat16_rn(seg == lo_seg ? v - hi : v);
}

// Index math in 32 bits (the host sends larger problems to the portable path).
__global__ void prep_kernel(const PrepArgs p) {
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t K = static_cast<uint32_t>(p.K), G = static_cast<uint32_t>(p.G);
  if (blockIdx.y < 2 && p.w4a8) {
    if (blockIdx.y == 1) {
      const uint32_t n = static_cast<uint32_t>(p.N) * (K / 16);
      for (uint32_t u = tid; u < n; u += stride)
        expand_unit_w4a8(p.w_codes, static_cast<const uint8_t*>(p.w_scales), p.B, K, G, u);
    }
    return;
  }
  if (blockIdx.y < 2) {
    __shared__ uint16_t lut[256];
    const bool uns = blockIdx.y == 0 && p.act_unsigned;
    for (uint32_t b = threadIdx.x; b < 256; b += blockDim.x)
      lut[b] = static_cast<uint16_t>(e4m3_of_nibble(b & 0xF, uns) | (e4m3_of_nibble(b >> 4, uns) << 8));
    __syncthreads();
    if (blockIdx.y == 0) {
      const uint32_t n = static_cast<uint32_t>(p.M) * (K / 16);
      for (uint32_t u = tid; u < n; u += stride)
        expand_unit(p.a_codes, p.a_scales, p.a_scale_kind, p.A, K, G, u, p.nvfp4, p.act_unsigned, lut);
    } else {
      const uint32_t n = static_cast<uint32_t>(p.N) * (K / 16);
      for (uint32_t u = tid; u < n; u += stride)
        expand_unit(p.w_codes, p.w_scales, p.w_scale_kind, p.B, K, G, u, p.nvfp4, false, lut);
    }
    return;
  }
  const uint32_t M = static_cast<uint32_t>(p.M), N = static_cast<uint32_t>(p.N), Mp = static_cast<uint32_t>(p.Mp);
  const uint32_t KL = static_cast<uint32_t>(p.KL), Np = static_cast<uint32_t>(p.Np);
  const uint32_t nSA = p.nvfp4 ? 0u : (p.w4a8 ? Mp : G * Mp);
  const uint32_t swrow = static_cast<uint32_t>(p.n_tiles * p.SWP);
  const uint32_t nSW = (p.nvfp4 || p.w4a8) ? 0u : G * swrow;
  const uint32_t nLA = M * KL;
  const uint32_t nUP = N * KL;
  const uint32_t total = nSA + nSW + nLA + nUP + 2 * Np;
  for (uint32_t i = tid; i < total; i += stride) {
    uint32_t j = i;
    if (j < nSA) {
      const uint32_t g = j / Mp, m = j % Mp;  // W4A8: g == 0, one scale per token
      p.SA[j] = m < M ? load_f(p.a_scales, p.a_scale_kind, p.w4a8 ? m : m * G + g) : 0.f;
      continue;
    }
    j -= nSA;
    if (j < nSW) {
      const uint32_t g = j / swrow, rem = j % swrow;
      const uint32_t nt = rem / p.SWP, pos = rem % p.SWP;
      const uint32_t seg = p.BN / 4 + 4;
      const uint32_t tq = pos / seg, w = pos % seg;
      float v = 0.f;
      if (w < static_cast<uint32_t>(p.BN / 4)) {
        const uint32_t n = nt * p.BN + 8 * (w / 2) + 2 * tq + (w % 2);
        if (n < N) v = load_f(p.w_scales, p.w_scale_kind, n * G + g);
      }
      p.SW[j] = v;
      continue;
    }
    j -= nSW;
    if (j < nLA) {  // lora_act: segments 0 and 2 the high part, 1 the low part
      const uint32_t m = j / KL;
      const int kk = static_cast<int>(j % KL);
      p.LA[j] = kk < p.nseg * p.R ? bf16_split_part(p.lora_act[m * p.R + kk % p.R], kk / p.R, 1)
                                  : __float2bfloat16_rn(0.f);
      continue;
    }
    j -= nLA;
    if (j < nUP) {  // proj_up: segments 0 and 1 the high part, 2 the low part
      const uint32_t n = j / KL;
      const int kk = static_cast<int>(j % KL);
      p.UP[j] = kk < p.nseg * p.R ? bf16_split_part(load_f(p.proj_up, p.up_kind, n * p.R + kk % p.R), kk / p.R, 2)
                                  : __float2bfloat16_rn(0.f);
      continue;
    }
    j -= nUP;
    if (j < Np) {
      p.biasf[j] = (p.bias != nullptr && j < N) ? load_f(p.bias, p.bias_kind, j) : 0.f;
      continue;
    }
    j -= Np;
    p.gsf[j] = j < N ? (p.gscale != nullptr ? p.gscale[p.gscale_numel == 1 ? 0 : j] : 1.f) : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// 2. sm_90a warp-specialized GEMM
// ------------------------------------------------------------------------------------------------------------------
namespace sm90 {

constexpr int BM = 128;

// What the main loop multiplies: INT4 as fp8 codes with per-group promotion, NVFP4 as exact bf16 values, W4A8 as
// int8 (activation codes x weight code * multiplier) into one int32 accumulator over all of K (no promotion).
enum Kind : int { kKindInt4 = 0, kKindNvfp4 = 1, kKindW4a8 = 2 };

template <int BN, int kKind>
struct Cfg {
  static constexpr bool kScales = kKind == kKindInt4;  // only INT4 streams group scales with its stages
  static constexpr int A_BYTES = BM * 128;
  static constexpr int B_BYTES = BN * 128;
  static constexpr int SA_BYTES = 2 * BM * 4;
  static constexpr int SWP = BN + 16;  // permuted weight-scale row of one tile: 4 x (BN/4 + 4) floats
  static constexpr int SW_BYTES = 2 * SWP * 4;
  static constexpr int SA_OFF = A_BYTES + B_BYTES;
  static constexpr int SW_OFF = SA_OFF + 1024;
  static constexpr int STAGE = kScales ? SW_OFF + ((SW_BYTES + 1023) / 1024) * 1024 : A_BYTES + B_BYTES;
  // TMA-store epilogue (BN = 128 only): a warpgroup's 64 x 128 2-byte results, as two 64 x 64 boxes (128-byte rows,
  // 128-byte swizzle), go through a buffer of their own so the stores drain while the next tile's main loop runs
  // (staging them in a pipeline stage instead made every tile wait for its stores to read it: +2.4 us per tile).
  static constexpr int C_BOX = 64 * 128;
  static constexpr int EPI_BYTES = BN == 128 ? 2 * 2 * C_BOX : 0;
  // as many stages as fit next to the epilogue buffer in 227 KB: INT4 5 x 35 KB, W4A8 / NVFP4 6 x 32 KB
  static constexpr int STAGES = BN == 192 ? 5 : (kScales ? 5 : 6);
  static constexpr int EPI_OFF = STAGES * STAGE;
  static constexpr int BAR_OFF = EPI_OFF + EPI_BYTES;
  static constexpr int SMEM = BAR_OFF + 1024 + 2 * STAGES * 8;
  static_assert(SMEM <= 232448, "shared memory over the sm_90 limit of 227 KB per block");
};

struct Params {
  const float* bias;    // [Np] fp32 or nullptr
  const float* gscale;  // [Np] fp32 (NVFP4 and W4A8: per output channel)
  const float* ascale;  // [m_tiles * BM] fp32 per-token scales (W4A8)
  void* out;
  int M, N;
  int m_tiles, n_tiles;
  int n_main, n_lora;
  int out_kind;
  int tma_store;  // BN = 128, 2-byte output, N % 8 == 0: epilogue through shared memory and TMA stores
  int no_store;   // diagnostics only (SVDQUANT_OPS_GEMM_EPILOGUE=none): skip the stores, results are garbage
};

// Tiles in groups of 16 row-blocks so that the CTAs running at one time share A rows and B columns in L2.
__device__ __forceinline__ void tile_coords(int tile, int m_tiles, int n_tiles, int& mt, int& nt) {
  constexpr int GM = 16;
  const int group = tile / (GM * n_tiles);
  const int first = group * GM;
  const int gm = min(GM, m_tiles - first);
  const int r = tile - group * GM * n_tiles;
  mt = first + r % gm;
  nt = r / gm;
}

// Epilogue vectors (bias, per-channel scales) of a BN-column tile, fetched at the start of the tile so the load
// latency hides behind the main loop (loaded in the epilogue they cost ~3900 cycles per tile: L2 under the TMA
// stream): lane L holds the column pairs L + 32 q. A thread's pair for accumulator column group j (columns
// 8 j + 2 tq, + 1) is pair 4 j + tq, gathered with two shuffles.
template <int BN>
struct TileVec {
  float2 v[BN / 64];
  __device__ __forceinline__ void load(const float* base, int lane) {
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) v[q] = *reinterpret_cast<const float2*>(base + 2 * (lane + 32 * q));
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) v[q] = make_float2(0.f, 0.f);
  }
  template <int J>
  __device__ __forceinline__ float2 at(int tq) const {
    const int src = (4 * J + tq) & 31;
    return make_float2(__shfl_sync(0xffffffffu, v[J / 8].x, src), __shfl_sync(0xffffffffu, v[J / 8].y, src));
  }
};

// Compile-time loop (the shuffles above need J as a constant).
template <int N, typename F, int J = 0>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (J < N) {
    f(std::integral_constant<int, J>{});
    static_for<N, F, J + 1>(static_cast<F&&>(f));
  }
}

__device__ __forceinline__ void promote4(float* acc, const float* tmp, float sa0, float sa1, float w0, float w1) {
  acc[0] = fmaf(tmp[0], sa0 * w0, acc[0]);
  acc[1] = fmaf(tmp[1], sa0 * w1, acc[1]);
  acc[2] = fmaf(tmp[2], sa1 * w0, acc[2]);
  acc[3] = fmaf(tmp[3], sa1 * w1, acc[3]);
}

// Main loops (SVDQUANT_OPS_GEMM_SCHEDULE): kPromote is the real one; kSkeleton (diagnostics only, wrong results) is
// the same TMA / mbarrier / wgmma loop without the promotion, i.e. the speed of a plain fp8 GEMM with this feed.
// (A FlashAttention-3-style ping-pong, warpgroups taking turns on the tensor cores, measured 6 % slower: NOTES.)
enum Schedule : int { kPromote = 0, kSkeleton = 2 };

// One pipeline stage fed to a single accumulator: wait for the stage, its four K-steps of `mma` (the first one
// overwrites the accumulator unless `accumulate`), wait for them, hand the stage back to the producer, advance the
// ring. Used by the W4A8 and NVFP4 main loops and the skeleton diagnostic.
template <class C, typename Acc, typename Mma>
__device__ __forceinline__ void consume_stage(uint8_t* smem, uint64_t* full, uint64_t* empty, int& s, uint32_t& ph,
                                              int wg, int lane, Acc& acc, bool accumulate, Mma mma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  mbar_wait(&full[s], ph);
  uint8_t* st = smem + s * C::STAGE;
  const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::A_BYTES);
  fence_regs(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) mma(acc, da + 2 * kk, db + 2 * kk, (accumulate || kk > 0) ? 1 : 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc);
  if (lane == 0) mbar_arrive(&empty[s]);
  if (++s == C::STAGES) {
    s = 0;
    ph ^= 1;
  }
#endif
}

template <int BN, int kKind, int kSched = kPromote>
__global__ void __launch_bounds__(384, 1)
    gemm_kernel(const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmB,
                const __grid_constant__ CUtensorMap tmSA, const __grid_constant__ CUtensorMap tmSW,
                const __grid_constant__ CUtensorMap tmLA, const __grid_constant__ CUtensorMap tmUP,
                const __grid_constant__ CUtensorMap tmC, const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BN, kKind>;
  constexpr bool kFp8 = kKind == kKindInt4;
  constexpr bool kI8 = kKind == kKindW4a8;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::BAR_OFF);
  uint64_t* empty = full + C::STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  const int total = p.m_tiles * p.n_tiles;
  const int per_tile = p.n_lora + p.n_main;

  if (threadIdx.x >= 256) {
    // ---------------- producer warpgroup: one thread issues all TMA loads ----------------
    setmaxnreg_dec<40>();
    if (threadIdx.x == 256) {
      tma_prefetch_desc(&tmA);
      tma_prefetch_desc(&tmB);
      if constexpr (kFp8) {
        tma_prefetch_desc(&tmSA);
        tma_prefetch_desc(&tmSW);
      }
      if (p.n_lora > 0) {
        tma_prefetch_desc(&tmLA);
        tma_prefetch_desc(&tmUP);
      }
      int s = 0;
      uint32_t ph = 0;
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        int mt, nt;
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int m0 = mt * BM, n0 = nt * BN;
        for (int i = 0; i < per_tile; ++i) {
          mbar_wait(&empty[s], ph ^ 1);
          uint8_t* st = smem + s * C::STAGE;
          if (i < p.n_lora) {
            mbar_expect_tx(&full[s], C::A_BYTES + C::B_BYTES);
            tma_load_2d(&tmLA, st, &full[s], i * 64, m0);
            tma_load_2d(&tmUP, st + C::A_BYTES, &full[s], i * 64, n0);
          } else {
            const int ki = i - p.n_lora;
            if constexpr (kFp8) {
              mbar_expect_tx(&full[s], C::A_BYTES + C::B_BYTES + C::SA_BYTES + C::SW_BYTES);
              tma_load_2d(&tmA, st, &full[s], ki * 128, m0);
              tma_load_2d(&tmB, st + C::A_BYTES, &full[s], ki * 128, n0);
              tma_load_2d(&tmSA, st + C::SA_OFF, &full[s], m0, 2 * ki);
              tma_load_2d(&tmSW, st + C::SW_OFF, &full[s], nt * C::SWP, 2 * ki);
            } else {
              // 128-byte rows: 64 bf16 channels (NVFP4) or 128 int8 channels (W4A8) per stage
              constexpr int kStep = kI8 ? 128 : 64;
              mbar_expect_tx(&full[s], C::A_BYTES + C::B_BYTES);
              tma_load_2d(&tmA, st, &full[s], ki * kStep, m0);
              tma_load_2d(&tmB, st + C::A_BYTES, &full[s], ki * kStep, n0);
            }
          }
          if (++s == C::STAGES) {
            s = 0;
            ph ^= 1;
          }
        }
      }
    }
  } else {
    // ---------------- two consumer warpgroups: 64 rows each ----------------
    setmaxnreg_inc<232>();
    const int wg = threadIdx.x >> 7;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int tq = lane & 3;
    const int r0 = wg * 64 + warp * 16 + (lane >> 2);
    const bool tma_epi = BN == 128 && p.tma_store;
    float acc[BN / 2];
    float tmp0[BN / 2];
    float tmp1[BN / 2];
    float (&tmp)[BN / 2] = tmp1;  // NVFP4 path: one temporary accumulator
    const auto mma_bf16 = [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_bf16<BN>(d, a, b, sd); };
    int s = 0;
    uint32_t ph = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      int mt, nt;
      tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
      const int m0 = mt * BM, n0 = nt * BN;
#pragma unroll
      for (int j = 0; j < BN / 2; ++j) acc[j] = 0.f;

      // low-rank branch: bf16 K-steps into tmp0, then copied into acc (acc itself is never a wgmma accumulator,
      // so ptxas can keep the main loop's MMAs asynchronous while the FMA pipes update acc)
      // (Written out rather than through consume_stage: with the helper here ptxas spills 8 bytes in the INT4 kernel.)
      for (int i = 0; i < p.n_lora; ++i) {
        mbar_wait(&full[s], ph);
        uint8_t* st = smem + s * C::STAGE;
        const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::A_BYTES);
        fence_regs(tmp0);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma::mma_bf16<BN>(tmp0, da + 2 * kk, db + 2 * kk, (i > 0 || kk > 0) ? 1 : 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(tmp0);
        if (lane == 0) mbar_arrive(&empty[s]);
        if (++s == C::STAGES) {
          s = 0;
          ph ^= 1;
        }
      }
      if (p.n_lora > 0) {
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) acc[j] = tmp0[j];
      }
      // The epilogue's vectors, fetched now (after the branch, whose temporary accumulator is dead) so that their
      // latency hides behind the main loop. INT4 fetches its bias in the epilogue instead: 4 more registers live
      // through its promotion loop made that loop 8 % slower (ptxas allocation; measured, NOTES session 5).
      TileVec<BN> vbias, vscale;
      if constexpr (!kFp8) {
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
        vscale.load(p.gscale + n0, lane);
      }
      float sa0 = 0.f, sa1 = 0.f;
      if constexpr (kI8) sa0 = p.ascale[m0 + r0], sa1 = p.ascale[m0 + r0 + 8];

      if constexpr (kFp8) {
        // Software pipeline over the 64-channel groups with two temporary accumulators: the MMAs of the next
        // group are in flight while this warpgroup promotes the previous one (tensor cores and FMA pipes busy at
        // once, independently of what the other warpgroup does). Group 0 of a stage goes to tmp0, group 1 to tmp1.
        auto promote = [&](const float (&t)[BN / 2], const uint8_t* st, int gg) {
          const float* sa = reinterpret_cast<const float*>(st + C::SA_OFF) + gg * BM;
          const float sa0 = sa[r0], sa1 = sa[r0 + 8];
          const float4* sw = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(st + C::SW_OFF) +
                                                             gg * C::SWP + tq * (BN / 4 + 4));
#pragma unroll
          for (int j2 = 0; j2 < BN / 16; ++j2) {
            const float4 w = sw[j2];
            promote4(acc + 8 * j2, t + 8 * j2, sa0, sa1, w.x, w.y);
            promote4(acc + 8 * j2 + 4, t + 8 * j2 + 4, sa0, sa1, w.z, w.w);
          }
        };
        auto issue = [&](float (&t)[BN / 2], const uint8_t* st, int gg) {
          const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::A_BYTES);
          fence_regs(t);
          wgmma_fence();
          wgmma::mma_e4m3<BN>(t, da + 4 * gg, db + 4 * gg, 0);
          wgmma::mma_e4m3<BN>(t, da + 4 * gg + 2, db + 4 * gg + 2, 1);
          wgmma_commit();
        };
        // Per stage: both groups' MMAs are issued at once; group 0 is promoted while group 1's MMAs run. (Carrying
        // the pipeline across loop iterations makes ptxas serialize every wgmma, C7514.)
        if constexpr (kSched == kSkeleton) {
          for (int ki = 0; ki < p.n_main; ++ki)
            consume_stage<C>(smem, full, empty, s, ph, wg, lane, acc, true,
                             [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_e4m3<BN>(d, a, b, sd); });
        } else
        for (int ki = 0; ki < p.n_main; ++ki) {
          mbar_wait(&full[s], ph);
          const uint8_t* st = smem + s * C::STAGE;
          issue(tmp0, st, 0);
          issue(tmp1, st, 1);
          wgmma_wait<1>();
          fence_regs(tmp0);
          promote(tmp0, st, 0);
          wgmma_wait<0>();
          fence_regs(tmp1);
          // The stage is free once group 1's scales are in registers: release it before the last promotion so the
          // producer refills it sooner.
          const float* sa = reinterpret_cast<const float*>(st + C::SA_OFF) + BM;
          const float sa0 = sa[r0], sa1 = sa[r0 + 8];
          float4 w1[BN / 16];
          const float4* sw = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(st + C::SW_OFF) +
                                                             C::SWP + tq * (BN / 4 + 4));
#pragma unroll
          for (int j2 = 0; j2 < BN / 16; ++j2) w1[j2] = sw[j2];
          __syncwarp();
          if (lane == 0) mbar_arrive(&empty[s]);
#pragma unroll
          for (int j2 = 0; j2 < BN / 16; ++j2) {
            promote4(acc + 8 * j2, tmp1 + 8 * j2, sa0, sa1, w1[j2].x, w1[j2].y);
            promote4(acc + 8 * j2 + 4, tmp1 + 8 * j2 + 4, sa0, sa1, w1[j2].z, w1[j2].w);
          }
          if (++s == C::STAGES) {
            s = 0;
            ph ^= 1;
          }
        }
      } else if constexpr (kI8) {
        // W4A8: exact int32 dot products over all of K, scaled once: acc += float(dot) * (sa[row] * s[col])
        int iacc[BN / 2];
        for (int ki = 0; ki < p.n_main; ++ki)
          consume_stage<C>(smem, full, empty, s, ph, wg, lane, iacc, ki > 0,
                           [](int (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_s8<BN>(d, a, b, sd); });
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          acc[4 * j + 0] = fmaf(static_cast<float>(iacc[4 * j + 0]), sa0 * gsc.x, acc[4 * j + 0]);
          acc[4 * j + 1] = fmaf(static_cast<float>(iacc[4 * j + 1]), sa0 * gsc.y, acc[4 * j + 1]);
          acc[4 * j + 2] = fmaf(static_cast<float>(iacc[4 * j + 2]), sa1 * gsc.x, acc[4 * j + 2]);
          acc[4 * j + 3] = fmaf(static_cast<float>(iacc[4 * j + 3]), sa1 * gsc.y, acc[4 * j + 3]);
        });
      } else {
        for (int ki = 0; ki < p.n_main; ++ki)
          consume_stage<C>(smem, full, empty, s, ph, wg, lane, tmp, ki > 0, mma_bf16);
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          acc[4 * j + 0] = fmaf(tmp[4 * j + 0], gsc.x, acc[4 * j + 0]);
          acc[4 * j + 1] = fmaf(tmp[4 * j + 1], gsc.y, acc[4 * j + 1]);
          acc[4 * j + 2] = fmaf(tmp[4 * j + 2], gsc.x, acc[4 * j + 2]);
          acc[4 * j + 3] = fmaf(tmp[4 * j + 3], gsc.y, acc[4 * j + 3]);
        });
      }

      // epilogue: + bias, cast, store
      if constexpr (kFp8) {
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
      }
      if (tma_epi) {
        // Through the warpgroup's epilogue buffer (128-byte-swizzled rows: a warp's 4-byte writes land in 8
        // different 16-byte chunks, conflict-free), then asynchronous TMA stores, which also clip the ragged M / N
        // edges and drain while the next tile runs. The previous tile's stores must have read the buffer first
        // (long done by now: a whole main loop ago).
        uint8_t* cst = smem + C::EPI_OFF + wg * 2 * C::C_BOX;
        if ((threadIdx.x & 127) == 0) bulk_wait_read<0>();
        named_bar_sync(2 + wg, 128);
        const int rl = warp * 16 + (lane >> 2);  // row within the warpgroup's 64 (and rl + 8)
        const bool half = p.out_kind == kF16;
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 b = vbias.template at<j>(tq);
          uint8_t* box = cst + (j / 8) * C::C_BOX + 4 * tq;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v0 = acc[4 * j + 2 * h] + b.x, v1 = acc[4 * j + 2 * h + 1] + b.y;
            uint32_t packed;
            if (half) {
              const __half2 t = __floats2half2_rn(v0, v1);
              packed = *reinterpret_cast<const uint32_t*>(&t);
            } else {
              const __nv_bfloat162 t = __floats2bfloat162_rn(v0, v1);
              packed = *reinterpret_cast<const uint32_t*>(&t);
            }
            const int r = rl + 8 * h;
            *reinterpret_cast<uint32_t*>(box + r * 128 + (((j & 7) ^ (r & 7)) << 4)) = packed;
          }
        });
        fence_proxy_async_smem();
        named_bar_sync(2 + wg, 128);
        if ((threadIdx.x & 127) == 0) {
#pragma unroll
          for (int bx = 0; bx < BN / 64; ++bx) tma_store_2d(&tmC, cst + bx * C::C_BOX, n0 + 64 * bx, m0 + 64 * wg);
          bulk_commit();
        }
        continue;
      }
      // (the impossible-value test keeps the accumulation alive for the compiler)
      if (p.no_store && acc[0] != -1234.5f) continue;
      const int gm0 = m0 + r0, gm1 = gm0 + 8;
      const bool even_n = (p.N & 1) == 0;
      static_for<BN / 8>([&](auto jc) {
        constexpr int j = decltype(jc)::value;
        const int col = n0 + 8 * j + 2 * tq;
        const float2 b = vbias.template at<j>(tq);  // all lanes: a shuffle
        if (col < p.N) {
          const bool second = col + 1 < p.N;
          const bool vec = second && even_n;
          if (gm0 < p.M)
            store_out2(p.out, p.out_kind, static_cast<int64_t>(gm0) * p.N + col, acc[4 * j] + b.x,
                       acc[4 * j + 1] + b.y, vec, second);
          if (gm1 < p.M)
            store_out2(p.out, p.out_kind, static_cast<int64_t>(gm1) * p.N + col, acc[4 * j + 2] + b.x,
                       acc[4 * j + 3] + b.y, vec, second);
        }
      });
    }
    // the last tile's TMA stores must have landed before the CTA exits
    if (tma_epi && (threadIdx.x & 127) == 0) bulk_wait<0>();
  }
#else
  __trap();  // built for another architecture: the host only launches this on sm_90a builds
#endif
}

}  // namespace sm90

// ------------------------------------------------------------------------------------------------------------------
// 3. portable SIMT kernel (exact dp4a group dots, the CPU reference's fp32 operation order)
// ------------------------------------------------------------------------------------------------------------------
struct PortableArgs {
  const uint8_t* a_codes;
  const void* a_scales;
  int a_kind;
  const uint8_t* w_codes;
  const void* w_scales;
  int w_kind;
  const float* gscale;
  int64_t gscale_numel;
  const float* lora_act;
  const void* proj_up;
  int up_kind;
  const void* bias;
  int bias_kind;
  void* out;
  int out_kind;
  int64_t M, N, K, G;
  int R;
  int nvfp4, act_unsigned;
  int w4a8;  // int8 activation codes [M, K], per-token scales [M]; weights code * multiplier, global scale [N]
};

__device__ __forceinline__ int decode_nibble(int nib, bool nvfp4, bool is_unsigned) {
  if (nvfp4) return e2m1_doubled(nib);
  return is_unsigned ? nib : sign_extend_nibble(nib);
}

__device__ __forceinline__ void load_chunk_codes(const uint8_t* codes, int64_t rows, int64_t K, int64_t row0,
                                                 int64_t k_chunk, bool nvfp4, bool is_unsigned,
                                                 int (*dst)[17]) {
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t row = row0 + r, k = k_chunk + 16 * part;
  int w[4] = {0, 0, 0, 0};
  if (row < rows && k < K) {  // K % 16 == 0, so a 16-code unit is either fully in or fully out
    const uint8_t* src = codes + row * (K / 2) + k / 2;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int byte = src[b];
      const int lo = decode_nibble(byte & 0xF, nvfp4, is_unsigned), hi = decode_nibble(byte >> 4, nvfp4, is_unsigned);
      const int word = b / 2, sh = 16 * (b % 2);
      w[word] |= ((lo & 0xFF) << sh) | ((hi & 0xFF) << (sh + 8));
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[r][4 * part + i] = w[i];
}

// W4A8 operands of one 64-channel chunk as packed int8 words: activation codes as stored; weight codes times the
// chunk's group multiplier (the chunk is exactly one 64-channel group).
__device__ __forceinline__ void load_chunk_w4a8(const uint8_t* codes, const uint8_t* mult, int64_t rows, int64_t K,
                                                int64_t row0, int64_t k_chunk, bool weights, int (*dst)[17]) {
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t row = row0 + r, k = k_chunk + 16 * part;
  int w[4] = {0, 0, 0, 0};
  if (row < rows && k < K) {
    if (!weights) {
      const uint4 v = *reinterpret_cast<const uint4*>(codes + row * K + k);
      w[0] = static_cast<int>(v.x), w[1] = static_cast<int>(v.y), w[2] = static_cast<int>(v.z), w[3] = static_cast<int>(v.w);
    } else {
      const int m = mult[row * (K / kInt4Group) + k / kInt4Group];
      const uint8_t* src = codes + row * (K / 2) + k / 2;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int byte = src[b];
        const int lo = sign_extend_nibble(byte & 0xF) * m, hi = sign_extend_nibble(byte >> 4) * m;
        const int word = b / 2, sh = 16 * (b % 2);
        w[word] |= ((lo & 0xFF) << sh) | ((hi & 0xFF) << (sh + 8));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[r][4 * part + i] = w[i];
}

// A thread's 4 x 4 exact int32 dot products accumulated over the packed-int8 words [w0, w1) of the staged chunk
// (rows ty + 16 i of As, tx + 16 j of Bs).
__device__ __forceinline__ void dp4a_words(const int (*As)[17], const int (*Bs)[17], int ty, int tx, int w0, int w1,
                                           int (&dot)[4][4]) {
  for (int w = w0; w < w1; ++w) {
    int a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][w];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[tx + 16 * j][w];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dot[i][j] = __dp4a(a[i], b[j], dot[i][j]);
  }
}

__global__ void __launch_bounds__(256) gemm_portable_kernel(const PortableArgs p) {
  __shared__ int As[64][17];
  __shared__ int Bs[64][17];
  __shared__ float Sa[64][4];
  __shared__ float Sw[64][4];
  const bool nvfp4 = p.nvfp4 != 0;
  const int gs = nvfp4 ? kNvfp4Group : kInt4Group;
  const float unit = nvfp4 ? 0.25f : 1.f;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 64, n0 = static_cast<int64_t>(blockIdx.x) * 64;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  int idot[4][4];  // W4A8: exact int32 dot products over all of K
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) idot[i][j] = 0;

  for (int64_t kc = 0; kc < p.K; kc += 64) {
    __syncthreads();
    if (p.w4a8) {
      load_chunk_w4a8(p.a_codes, nullptr, p.M, p.K, m0, kc, false, As);
      load_chunk_w4a8(p.w_codes, static_cast<const uint8_t*>(p.w_scales), p.N, p.K, n0, kc, true, Bs);
      __syncthreads();
      dp4a_words(As, Bs, ty, tx, 0, 16, idot);
      continue;
    }
    load_chunk_codes(p.a_codes, p.M, p.K, m0, kc, nvfp4, p.act_unsigned != 0, As);
    load_chunk_codes(p.w_codes, p.N, p.K, n0, kc, nvfp4, false, Bs);
    const int groups = static_cast<int>((p.K - kc < 64 ? p.K - kc : int64_t(64)) / gs);
    for (int idx = threadIdx.x; idx < 64 * 4; idx += 256) {
      const int r = idx / 4, q = idx % 4;
      const int64_t g = kc / gs + q;
      Sa[r][q] = (q < groups && m0 + r < p.M) ? load_f(p.a_scales, p.a_kind, (m0 + r) * p.G + g) : 0.f;
      Sw[r][q] = (q < groups && n0 + r < p.N) ? load_f(p.w_scales, p.w_kind, (n0 + r) * p.G + g) : 0.f;
    }
    __syncthreads();
    for (int q = 0; q < groups; ++q) {
      int dot[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dot[i][j] = 0;
      dp4a_words(As, Bs, ty, tx, q * gs / 4, (q + 1) * gs / 4, dot);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float sc = __fmul_rn(Sa[ty + 16 * i][q], Sw[tx + 16 * j][q]);
          acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(__fmul_rn(static_cast<float>(dot[i][j]), unit), sc));
        }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      float v = acc[i][j];
      if (p.w4a8) {  // the CPU reference's float(dot) * (act_scale * global_scale)
        v = __fmul_rn(static_cast<float>(idot[i][j]), __fmul_rn(load_f(p.a_scales, p.a_kind, m), p.gscale[n]));
      } else if (p.gscale != nullptr) {
        v = __fmul_rn(v, p.gscale[p.gscale_numel == 1 ? 0 : n]);
      }
      float branch = 0.f;
      for (int r = 0; r < p.R; ++r)
        branch = __fadd_rn(branch, __fmul_rn(p.lora_act[m * p.R + r], load_f(p.proj_up, p.up_kind, n * p.R + r)));
      const float b = p.bias != nullptr ? load_f(p.bias, p.bias_kind, n) : 0.f;
      store_out(p.out, p.out_kind, m * p.N + n, __fadd_rn(__fadd_rn(v, branch), b));
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// host helpers
// ------------------------------------------------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && ptr != nullptr,
                "svdquant::gemm_w4a4: cuTensorMapEncodeTiled is not available from the CUDA driver");
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

CUtensorMap make_map(const void* ptr, CUtensorMapDataType dtype, uint64_t inner, uint64_t outer,
                     uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_fn()(&map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "svdquant::gemm_w4a4: cuTensorMapEncodeTiled failed (CUresult ", int(r),
              ") for a ", outer, " x ", inner, " tensor");
  return map;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <int BN, int kKind, int kSched>
void launch_sm90(const CUtensorMap& A, const CUtensorMap& B, const CUtensorMap& SA, const CUtensorMap& SW,
                 const CUtensorMap& LA, const CUtensorMap& UP, const CUtensorMap& Cmap, const sm90::Params& p,
                 cudaStream_t stream) {
  using C = sm90::Cfg<BN, kKind>;
  auto kernel = sm90::gemm_kernel<BN, kKind, kSched>;
  static bool attr_set = false;  // once, before any CUDA-graph capture (the first call is eager)
  if (!attr_set) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
    attr_set = true;
  }
  const int total = p.m_tiles * p.n_tiles;
  const int grid = std::min(total, num_sms());
  kernel<<<grid, 384, C::SMEM, stream>>>(A, B, SA, SW, LA, UP, Cmap, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "gemm_w4a4 sm90");
}

at::Tensor contiguous_aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  if (!aligned16(c.data_ptr())) c = c.clone();
  return c;
}

}  // namespace

at::Tensor gemm_w4a4_cuda(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wgt_codes,
                          const at::Tensor& wgt_scales, const std::optional<at::Tensor>& wgt_global_scale,
                          const at::Tensor& lora_act, const at::Tensor& proj_up,
                          const std::optional<at::Tensor>& bias, c10::string_view precision,
                          at::ScalarType out_dtype, bool act_unsigned) {
  const auto s = check_gemm_w4a4(act_codes, act_scales, wgt_codes, wgt_scales, wgt_global_scale, lora_act, proj_up,
                                 bias, precision, out_dtype, act_unsigned);
  const c10::cuda::CUDAGuard guard(act_codes.device());
  const bool nvfp4 = s.precision == Precision::kNvfp4;
  const bool w4a8 = s.precision == Precision::kW4a8;
  auto out = at::empty({s.M, s.N}, act_codes.options().dtype(out_dtype));
  if (s.M == 0) return out.reshape(with_last_dim(act_codes, s.N));
  cudaStream_t stream = current_stream();

  const auto ac = contiguous_aligned(act_codes);
  const auto wc = contiguous_aligned(wgt_codes);
  const auto as = act_scales.contiguous();
  const auto ws = wgt_scales.contiguous();
  const auto la = lora_act.contiguous();
  const auto up = proj_up.contiguous();
  const auto bi = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const auto gsc = wgt_global_scale.has_value() ? std::optional<at::Tensor>(wgt_global_scale->contiguous())
                                                : std::nullopt;

  const int64_t kMax32 = int64_t(1) << 31;
  const bool use_sm90 = !force_portable() && device_is_sm90() && s.M * (s.K / 16) < kMax32 &&
                        s.N * (s.K / 16) < kMax32 && (s.M + 128) * 3 * (s.R + 64) < kMax32 &&
                        (s.N + 128) * 3 * (s.R + 64) < kMax32 && s.G * (s.M + 4) < kMax32 &&
                        s.G * (s.N + 256) < kMax32;
  if (!use_sm90) {
    PortableArgs p{};
    p.a_codes = static_cast<const uint8_t*>(ac.data_ptr());
    p.a_scales = as.data_ptr();
    p.a_kind = kind_of(as.scalar_type());
    p.w_codes = wc.data_ptr<uint8_t>();
    p.w_scales = ws.data_ptr();
    p.w_kind = kind_of(ws.scalar_type());
    p.gscale = gsc.has_value() ? gsc->data_ptr<float>() : nullptr;
    p.gscale_numel = gsc.has_value() ? gsc->numel() : 0;
    if (gsc.has_value() && !s.per_channel_global_scale) p.gscale_numel = 1;
    p.lora_act = s.R > 0 ? la.data_ptr<float>() : nullptr;
    p.proj_up = s.R > 0 ? up.data_ptr() : nullptr;
    p.up_kind = kind_of(up.scalar_type());
    p.bias = bi.has_value() ? bi->data_ptr() : nullptr;
    p.bias_kind = bi.has_value() ? kind_of(bi->scalar_type()) : kF32;
    p.out = out.data_ptr();
    p.out_kind = kind_of(out_dtype);
    p.M = s.M;
    p.N = s.N;
    p.K = s.K;
    p.G = s.G;
    p.R = static_cast<int>(s.R);
    p.nvfp4 = nvfp4;
    p.act_unsigned = act_unsigned;
    p.w4a8 = w4a8;
    const dim3 grid(static_cast<unsigned>((s.N + 63) / 64), static_cast<unsigned>((s.M + 63) / 64));
    gemm_portable_kernel<<<grid, 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    debug_sync(stream, "gemm_w4a4 portable");
    return out.reshape(with_last_dim(act_codes, s.N));
  }

  // ---------------- Hopper path ----------------
  const int M = static_cast<int>(s.M), N = static_cast<int>(s.N), K = static_cast<int>(s.K);
  const int G = static_cast<int>(s.G), R = static_cast<int>(s.R);
  const int sms = num_sms();
  const int m_tiles = (M + sm90::BM - 1) / sm90::BM;
  // 128 x 128 tiles: three 64-column fp32 accumulator sets per thread (the result and two in-flight groups) fit
  // the 232 registers of a consumer thread; 128 x 192 would not.
  // SVDQUANT_OPS_GEMM_SCHEDULE (read at every call, for benchmarks): "promote" (default, the real kernel) and the
  // diagnostics "skeleton" / "skeleton192" (no promotion: wrong results, feed speed only; 192: 128 x 192 tiles).
  int sched = sm90::kPromote;
  bool wide = false;
  if (const char* v = std::getenv("SVDQUANT_OPS_GEMM_SCHEDULE"); v != nullptr && v[0] != '\0') {
    if (std::strcmp(v, "skeleton") == 0) sched = sm90::kSkeleton;
    else if (std::strcmp(v, "skeleton192") == 0) sched = sm90::kSkeleton, wide = true;
    else TORCH_CHECK(std::strcmp(v, "promote") == 0, "SVDQUANT_OPS_GEMM_SCHEDULE: expected promote, skeleton or "
                     "skeleton192, got '", v, "'");
  }
  const int BN = (wide && !nvfp4 && !w4a8) ? 192 : 128;
  const int n_tiles = (N + BN - 1) / BN;
  const int SWP = BN + 16;
  const int64_t Np = int64_t(n_tiles) * BN;
  // W4A8 reads its per-token scales in the epilogue without bounds checks: pad them to whole row tiles.
  const int64_t Mp = w4a8 ? int64_t(m_tiles) * sm90::BM : round_up(M, 4);
  const int nseg = R == 0 ? 0 : (up.scalar_type() == at::kBFloat16 ? 2 : 3);
  const int KL = static_cast<int>(round_up(int64_t(nseg) * R, 64));
  const int elem = nvfp4 ? 2 : 1;

  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += round_up(std::max<int64_t>(bytes, 1), 256);
    return o;
  };
  const int64_t oA = take(w4a8 ? 0 : int64_t(M) * K * elem), oB = take(int64_t(N) * K * elem);
  const int64_t oSA = take(nvfp4 ? 0 : (w4a8 ? 1 : int64_t(G)) * Mp * 4);
  const int64_t oSW = take((nvfp4 || w4a8) ? 0 : int64_t(G) * n_tiles * SWP * 4);
  const int64_t oLA = take(int64_t(M) * KL * 2), oUP = take(int64_t(N) * KL * 2);
  const int64_t oBias = take(Np * 4), oGs = take(Np * 4);
  auto ws_buf = at::empty({off}, act_codes.options().dtype(at::kByte));
  uint8_t* base = ws_buf.data_ptr<uint8_t>();

  PrepArgs pa{};
  pa.a_codes = static_cast<const uint8_t*>(ac.data_ptr());
  pa.a_scales = as.data_ptr();
  pa.a_scale_kind = kind_of(as.scalar_type());
  pa.lora_act = R > 0 ? la.data_ptr<float>() : nullptr;
  pa.M = M;
  pa.K = K;
  pa.G = G;
  pa.R = R;
  pa.KL = KL;
  pa.nseg = nseg;
  pa.Mp = Mp;
  pa.A = base + oA;
  pa.SA = reinterpret_cast<float*>(base + oSA);
  pa.LA = reinterpret_cast<__nv_bfloat16*>(base + oLA);
  pa.w_codes = wc.data_ptr<uint8_t>();
  pa.w_scales = ws.data_ptr();
  pa.w_scale_kind = kind_of(ws.scalar_type());
  pa.proj_up = R > 0 ? up.data_ptr() : nullptr;
  pa.up_kind = kind_of(up.scalar_type());
  pa.bias = bi.has_value() ? bi->data_ptr() : nullptr;
  pa.bias_kind = bi.has_value() ? kind_of(bi->scalar_type()) : kF32;
  pa.gscale = gsc.has_value() ? gsc->data_ptr<float>() : nullptr;
  pa.gscale_numel = gsc.has_value() ? (s.per_channel_global_scale ? gsc->numel() : 1) : 0;
  pa.N = N;
  pa.n_tiles = n_tiles;
  pa.BN = BN;
  pa.SWP = SWP;
  pa.Np = Np;
  pa.B = base + oB;
  pa.SW = reinterpret_cast<float*>(base + oSW);
  pa.UP = reinterpret_cast<__nv_bfloat16*>(base + oUP);
  pa.biasf = reinterpret_cast<float*>(base + oBias);
  pa.gsf = reinterpret_cast<float*>(base + oGs);
  pa.nvfp4 = nvfp4;
  pa.act_unsigned = act_unsigned;
  pa.w4a8 = w4a8;
  {
    const int64_t units = std::max<int64_t>(int64_t(M), int64_t(N)) * (K / 16);
    const unsigned gx = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((units + 255) / 256, 8 * sms)));
    prep_kernel<<<dim3(gx, 3), 256, 0, stream>>>(pa);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    debug_sync(stream, "gemm_w4a4 prep");
  }

  const auto swz = CU_TENSOR_MAP_SWIZZLE_128B;
  CUtensorMap mA, mB, mSA, mSW, mLA, mUP;
  std::memset(&mSA, 0, sizeof(mSA));
  std::memset(&mSW, 0, sizeof(mSW));
  std::memset(&mLA, 0, sizeof(mLA));
  std::memset(&mUP, 0, sizeof(mUP));
  if (w4a8) {  // the activation codes are already int8 [M, K]: no copy
    mA = make_map(ac.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, K, M, K, 128, sm90::BM, swz);
    mB = make_map(base + oB, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, N, K, 128, BN, swz);
  } else if (!nvfp4) {
    mA = make_map(base + oA, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, M, K, 128, sm90::BM, swz);
    mB = make_map(base + oB, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, N, K, 128, BN, swz);
    mSA = make_map(base + oSA, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, Mp, G, Mp * 4, sm90::BM, 2,
                   CU_TENSOR_MAP_SWIZZLE_NONE);
    mSW = make_map(base + oSW, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, int64_t(n_tiles) * SWP, G,
                   int64_t(n_tiles) * SWP * 4, SWP, 2, CU_TENSOR_MAP_SWIZZLE_NONE);
  } else {
    mA = make_map(base + oA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, K, M, int64_t(K) * 2, 64, sm90::BM, swz);
    mB = make_map(base + oB, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, K, N, int64_t(K) * 2, 64, BN, swz);
  }
  if (KL > 0) {
    mLA = make_map(base + oLA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, KL, M, int64_t(KL) * 2, 64, sm90::BM, swz);
    mUP = make_map(base + oUP, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, KL, N, int64_t(KL) * 2, 64, BN, swz);
  }

  sm90::Params p{};
  p.bias = bi.has_value() ? pa.biasf : nullptr;
  p.gscale = pa.gsf;
  p.ascale = pa.SA;
  p.out = out.data_ptr();
  p.M = M;
  p.N = N;
  p.m_tiles = m_tiles;
  p.n_tiles = n_tiles;
  p.n_main = nvfp4 ? (K + 63) / 64 : (K + 127) / 128;  // INT4 / W4A8: 128 channels per stage
  p.n_lora = KL / 64;
  p.out_kind = kind_of(out_dtype);
  // 2-byte outputs whose rows are whole 16-byte units go through the TMA-store epilogue (TMA needs 16-byte strides).
  CUtensorMap mC;
  std::memset(&mC, 0, sizeof(mC));
  // SVDQUANT_OPS_GEMM_EPILOGUE=direct forces the register -> global epilogue (benchmarks; read at every call).
  const char* epi = std::getenv("SVDQUANT_OPS_GEMM_EPILOGUE");
  const bool force_direct = epi != nullptr && (std::strcmp(epi, "direct") == 0 || std::strcmp(epi, "none") == 0);
  p.no_store = epi != nullptr && std::strcmp(epi, "none") == 0;
  p.tma_store = !force_direct && BN == 128 && (out_dtype == at::kBFloat16 || out_dtype == at::kHalf) &&
                N % 8 == 0 && aligned16(out.data_ptr());
  if (p.tma_store)
    mC = make_map(out.data_ptr(), out_dtype == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                         : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                  N, M, int64_t(N) * 2, 64, 64, swz);
  using sm90::kKindInt4;
  if (nvfp4) launch_sm90<128, sm90::kKindNvfp4, sm90::kPromote>(mA, mB, mSA, mSW, mLA, mUP, mC, p, stream);
  else if (w4a8) launch_sm90<128, sm90::kKindW4a8, sm90::kPromote>(mA, mB, mSA, mSW, mLA, mUP, mC, p, stream);
  else if (sched == sm90::kSkeleton && BN == 192)
    launch_sm90<192, kKindInt4, sm90::kSkeleton>(mA, mB, mSA, mSW, mLA, mUP, mC, p, stream);
  else if (sched == sm90::kSkeleton) launch_sm90<128, kKindInt4, sm90::kSkeleton>(mA, mB, mSA, mSW, mLA, mUP, mC, p, stream);
  else launch_sm90<128, kKindInt4, sm90::kPromote>(mA, mB, mSA, mSW, mLA, mUP, mC, p, stream);
  return out.reshape(with_last_dim(act_codes, s.N));
}

}  // namespace cuda_impl
}  // namespace svdquant
