// CUDA kernels of svdquant::quantize_act (semantics: ../cpu/quantize_act.cpp).
//
// Fast path (bf16/fp16 x, K % 64 == 0, R <= 128 with R % 8 == 0, 16-byte aligned inputs), any GPU sm_80+:
//   one pass over x. A block owns 64 tokens; its 4 row-warps x 2 k-warps walk a slice of K in chunks of 64 channels.
//   Per chunk a warp quantizes its 16 rows (codes, scales) and feeds the same registers to bf16/fp16 mma.sync
//   (m16n8k16, fp32 accumulate) against proj_down staged in shared memory, so x · proj_down costs no extra global
//   traffic. The k-warps' partial products are summed in a fixed order; when K is split over several blocks (for load
//   balance) their partial sums go to a workspace and a second kernel adds them in slice order. No atomics:
//   deterministic for a given GPU and shape.
//   The two divisions per element (x / smooth, x_hat / scale) use a per-column / per-group reciprocal and the
//   remainder correction of the compiler's IEEE division: bit-identical to a / b (see common.cuh), with a
//   warp-uniform IEEE fallback for operands outside [2^-60, 2^60].
// Portable path (everything else, or SVDQUANT_OPS_CUDA_PORTABLE=1): a thread per (token, group) running the CPU
//   loop, and a thread per down_act element summing over K in order.
// W4A8 (per-token INT8): two passes by default. Opt-in on Hopper (SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1, or =small for
//   calls of at most 1024 tokens), when K splits into at most 8 slices of at most 1920 channels, the cluster kernel
//   reads x once (a thread-block cluster along K exchanging partial amaxes and down products through distributed
//   shared memory); it is exact but slower at M >= 4096. The
//   two passes: the fast kernel in a mode that writes only each (token, 64-chunk) amax of x_hat and down_act, then
//   the token kernel (2 tokens per warp) reduces the amaxes to each token's scale and writes the int8 codes (reading
//   x a second time) and adds down_act's K-slice partial sums. Both recompute rows whose amax is outside the bounds
//   at kW4a8AmaxLo with IEEE divisions. Portable: a warp per token computes the amax itself.
// quantize_act_given_amax (W4A8 with each token's amax given, as Inductor computes it inside the kernel that
//   produces x): one pass of the fast kernel writing int8 codes and down_act; portable: the token kernel with the
//   given amax, and the portable down_act kernel.
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <stdexcept>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../checks.h"
#include "../formats.h"
#include "common.cuh"
#include "ops_cuda.h"

namespace svdquant {
namespace cuda_impl {
namespace {

// ------------------------------------------------------------------------------------------------------------------
// Portable kernels
// ------------------------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void quantize_portable_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ smooth,
                                         uint8_t* __restrict__ codes, void* __restrict__ scales_out, int64_t M,
                                         int64_t K, bool nvfp4, bool act_unsigned) {
  const int gs = nvfp4 ? kNvfp4Group : kInt4Group;
  const int64_t G = K / gs;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * G) return;
  const int64_t m = idx / G, g = idx % G;
  const int64_t k0 = g * gs;
  float xh[kInt4Group];
  float amax = 0.f;
  for (int i = 0; i < gs; ++i) {
    const float xv = static_cast<float>(x[m * K + k0 + i]);
    const float lv = static_cast<float>(smooth[k0 + i]);
    xh[i] = act_unsigned ? __fdiv_rn(__fadd_rn(xv, kActShift), lv) : __fdiv_rn(xv, lv);
    amax = nan_max(amax, act_unsigned ? xh[i] : fabsf(xh[i]));
  }
  uint8_t* out = codes + m * (K / 2) + k0 / 2;
  if (!nvfp4) {
    const float qmax = act_unsigned ? kUint4Qmax : kInt4Qmax;
    const float s = int4_scale<scalar_t>(amax, qmax);
    static_cast<scalar_t*>(scales_out)[m * G + g] = static_cast<scalar_t>(s);
    for (int i = 0; i < gs; i += 2) {
      int q[2];
      for (int h = 0; h < 2; ++h) {
        const float v = __fdiv_rn(xh[i + h], s);
        q[h] = s == 0.f ? 0 : (act_unsigned ? uint4_code(v) : int4_code(v));
      }
      out[i / 2] = static_cast<uint8_t>((q[0] & 0xF) | ((q[1] & 0xF) << 4));
    }
  } else {
    const c10::Float8_e4m3fn s8 = nvfp4_scale(amax);
    static_cast<c10::Float8_e4m3fn*>(scales_out)[m * G + g] = s8;
    const float s = static_cast<float>(s8);
    for (int i = 0; i < gs; i += 2) {
      int q[2];
      for (int h = 0; h < 2; ++h) q[h] = s == 0.f ? 0 : e2m1_code(__fdiv_rn(xh[i + h], s));
      out[i / 2] = static_cast<uint8_t>((q[0] & 0xF) | ((q[1] & 0xF) << 4));
    }
  }
}

template <typename scalar_t>
__global__ void down_act_portable_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pd,
                                         float* __restrict__ out, int64_t M, int64_t K, int64_t R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * R) return;
  const int64_t m = idx / R, r = idx % R;
  float acc = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    acc = fmaf(static_cast<float>(x[m * K + k]), static_cast<float>(pd[k * R + r]), acc);
  }
  out[idx] = acc;
}

// ------------------------------------------------------------------------------------------------------------------
// Fast kernel
// ------------------------------------------------------------------------------------------------------------------
template <typename T>
struct Raw;
template <>
struct Raw<c10::BFloat16> {
  static __device__ __forceinline__ float to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
};
template <>
struct Raw<c10::Half> {
  static __device__ __forceinline__ float to_float(uint32_t bits16) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
  }
};

__device__ __forceinline__ uint32_t word4(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// Element i (0..7) of 8 packed 16-bit values, as fp32.
template <typename T>
__device__ __forceinline__ float value_of(const uint4& v, int i) {
  const uint32_t w = word4(v, i >> 1);
  return Raw<T>::to_float((i & 1) ? (w >> 16) : (w & 0xFFFFu));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                     uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// XOR swizzle of the 16-byte chunks of a staged proj_down row (RP bf16 values) so that the ldmatrix.trans reads
// below (rows k, k+1, k+16, k+17, ...) hit distinct banks.
// RP = 128 (256-byte rows, 16 chunks) uses RP = 64's 3-bit pattern: rows 256 bytes apart start in the same bank, so
// distinct low 3 chunk bits are distinct banks.
template <int RP>
__device__ __forceinline__ int pd_swizzle(int k) {
  if constexpr (RP == 16) return (k >> 4) & 1;
  if constexpr (RP == 32) return (k >> 4) & 3;
  return ((k >> 4) & 3) | ((k & 1) << 2);
}

__device__ __forceinline__ uint32_t word_of(const uint4 (&v)[2], int w) {
  const uint4& u = v[w >> 2];
  switch (w & 3) {
    case 0: return u.x;
    case 1: return u.y;
    case 2: return u.z;
    default: return u.w;
  }
}

// q = a / b for b > 0 by the remainder correction of the compiler's IEEE division with a precomputed reciprocal y
// (common.cuh). Exact when a, b lie in [2^-60, 2^60] (callers check and fall back otherwise). For a = -0 it returns
// +0 (the correction's fma adds +0 to -0): callers that read the sign of a zero quotient restore it (NVFP4's
// copysignf); for INT4 and W4A8 codes the sign of zero does not matter.
__device__ __forceinline__ float div3(float a, float b, float y) {
  const float q = __fmul_rn(a, y);
  const float r = fmaf(-b, q, a);
  return fmaf(y, r, q);
}

// Smooth values and their reciprocals of channels 4 * i4 .. 4 * i4 + 3 from a round's shared-memory staging (values
// at sm[0..], reciprocals at sm[rc..]).
__device__ __forceinline__ void staged_smooth4(const float* sm, int rc, int i4, float (&lv)[4], float (&yv)[4]) {
  const float4 l4 = *reinterpret_cast<const float4*>(sm + 4 * i4);
  const float4 y4 = *reinterpret_cast<const float4*>(sm + rc + 4 * i4);
  lv[0] = l4.x, lv[1] = l4.y, lv[2] = l4.z, lv[3] = l4.w;
  yv[0] = y4.x, yv[1] = y4.y, yv[2] = y4.z, yv[3] = y4.w;
}

// W4A8's fast path computes x_hat = x / smooth by div3 without checking each element's range. It is exact for
// every row whose amax (as computed) lies in [kW4a8AmaxLo, kW4a8AmaxHi] when every smooth value lies in
// [2^-20, 2^20]; the first pass gives smooth values outside that range a NaN reciprocal, so their chunks' amaxes
// are NaN and the row is recomputed exactly. Why: div3 is exact for |x| in [2^-60, 2^60] (and 0). A smaller
// nonzero |x| gives |x_hat| < 2^-40 (computed: < 2^-38), which is neither the row's amax (>= 2^-28) nor a nonzero
// code (|x_hat / scale| < 2^-38 * 127 / 2^-28 / (1 - 2^-8) < 1/8). A larger finite |x| gives |x_hat| > 2^40
// (computed: > 2^39, or Inf / NaN when x * rcp overflows), so the row's amax fails the upper bound; NaN / Inf in x
// make it NaN / Inf. Rows outside the bounds (including zero rows) are recomputed with IEEE divisions.
constexpr float kW4a8AmaxLo = 0x1p-28f, kW4a8AmaxHi = 0x1p33f;

__device__ __forceinline__ float rcp_w4a8_first_pass(float b) {
  const float ab = fabsf(b);
  return (ab >= 0x1p-20f && ab <= 0x1p20f) ? rcp_for_div(b) : __int_as_float(0x7fffffff);
}

__device__ __forceinline__ bool w4a8_row_fast(float amax) { return amax >= kW4a8AmaxLo && amax <= kW4a8AmaxHi; }

// W4A8's first pass on one 64-channel chunk: the amax of x_hat = x / smooth (div3, no range checks: out-of-range
// smooth values have NaN reciprocals here, and the token kernel validates each row's amax (kW4a8AmaxLo / Hi) and
// recomputes it exactly when it is outside, see there why that is exact) over the chunk, for the lane's two rows,
// reduced over the chunk's 4 lanes. xc: the lane's 16 channels (from 16 * t) of both rows; sm: the staged smooth
// values of those channels, their reciprocals rc floats later.
template <typename T>
__device__ __forceinline__ void w4a8_chunk_amax(const uint4 (&xc)[2][2], const float* sm, int rc, float (&amax)[2]) {
  constexpr uint32_t FULL = 0xffffffffu;
  float amx2[2] = {0.f, 0.f};
#pragma unroll
  for (int i4 = 0; i4 < 4; ++i4) {
    float lv[4], yv[4];
    staged_smooth4(sm, rc, i4, lv, yv);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 4 * i4 + e;
        amx2[h] = max_nan(amx2[h], fabsf(div3(value_of<T>(xc[h][i >> 3], i & 7), lv[e], yv[e])));
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float a = max_nan(amx2[h], __shfl_xor_sync(FULL, amx2[h], 1));
    amax[h] = max_nan(a, __shfl_xor_sync(FULL, a, 2));
  }
}

// The lane's part of the staged proj_down ldmatrix addresses (bytes) for k-warp kw: row kl0 of the staged tile, and
// the swizzled chunk: (2 * np + (j >> 1)) ^ swz == (2 * np) ^ ((j >> 1) ^ swz), so chunk np sits at
// (np * 32) ^ pd_chunk_xor bytes.
template <int RP>
__device__ __forceinline__ void pd_lane_offsets(int kw, int lane, uint32_t& pd_lane, uint32_t& pd_chunk_xor) {
  const int j = lane >> 3, i = lane & 7;
  const int kl0 = kw * 64 + 16 * (i >> 1) + 2 * (j & 1) + (i & 1);
  const int swz = pd_swizzle<RP>(kl0);
  pd_lane = static_cast<uint32_t>(kl0 * RP * 2);
  pd_chunk_xor = static_cast<uint32_t>(((j >> 1) ^ swz) * 16);
}

// cp.async of proj_down rows k0 .. k0 + RC - 1 into a staged tile dst [RC][RP] with XOR-swizzled 16-byte chunks
// (pd_swizzle), by NT threads; rows at or past k_end and columns past R are zero-filled.
template <typename T, int RP, int RC, int NT>
__device__ __forceinline__ void stage_pd_rows(T* dst, const T* __restrict__ pd, int k0, int k_end, int R) {
  constexpr int CH = RP / 8;
  for (int idx = threadIdx.x; idx < RC * CH; idx += NT) {
    const int kl = idx / CH, ch = idx % CH;
    const int kg = k0 + kl;
    const bool ok = kg < k_end && ch * 8 < R;
    const T* src = ok ? pd + static_cast<int64_t>(kg) * R + ch * 8 : pd;
    cp_async16(dst + kl * RP + ((ch ^ pd_swizzle<RP>(kl)) * 8), src, ok ? 16 : 0);
  }
}

// stage_pd_rows with its loop unrolled at compile time (the group-max pass's lean variant, kLean): the same cp.async
// per thread (same source, destination and size), without the generic strided loop, whose index and 64-bit address
// arithmetic took ~100 instructions per round for the 2 copies a thread makes at RP = 32 (SASS, 2026-12-07). A
// thread's 16-byte column chunk is the same for all its rows (NT % CH == 0).
template <typename T, int RP, int RC, int NT>
__device__ __forceinline__ void stage_pd_rows_unrolled(T* dst, const T* __restrict__ pd, int k0, int k_end, int R) {
  constexpr int CH = RP / 8;
  constexpr int ITEMS = (RC * CH + NT - 1) / NT;
  static_assert(NT % CH == 0, "a thread's column chunk must not change between its rows");
  const int ch = static_cast<int>(threadIdx.x) % CH;
  const bool col_ok = ch * 8 < R;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NT;
    if ((RC * CH) % NT != 0 && idx >= RC * CH) break;
    const int kl = idx / CH;
    const int kg = k0 + kl;
    const bool ok = col_ok && kg < k_end;
    const T* src = ok ? pd + static_cast<int64_t>(kg) * R + ch * 8 : pd;
    cp_async16(dst + kl * RP + ((ch ^ pd_swizzle<RP>(kl)) * 8), src, ok ? 16 : 0);
  }
}

// cacc += the lane's rows of x . proj_down over one 64-channel chunk (mma m16n8k16): the lane's 16 consecutive
// channels are its A fragments' k indices in a permuted order, and the staged proj_down rows are read in the same
// order. pd_base: the staged chunk's address plus the lane's pd_lane.
template <typename T, int RP>
__device__ __forceinline__ void down_mma_chunk(float (&cacc)[RP / 8][4], const uint4 (&xc)[2][2], uint32_t pd_base,
                                               uint32_t pd_chunk_xor) {
  // this lane's ldmatrix row in k-step s4 is kl = kl0 + 4 * s4; its swizzle does not depend on s4
  // ((kl >> 4) and (kl & 1) are the same for every s4), so the address is pd_base + s4 step
#pragma unroll
  for (int s4 = 0; s4 < 4; ++s4) {
    const uint32_t a0 = word_of(xc[0], 2 * s4), a2 = word_of(xc[0], 2 * s4 + 1);
    const uint32_t a1 = word_of(xc[1], 2 * s4), a3 = word_of(xc[1], 2 * s4 + 1);
#pragma unroll
    for (int np = 0; np < RP / 16; ++np) {
      const uint32_t addr = pd_base + s4 * (4 * RP * 2) + ((np * 2 * 8 * 2) ^ pd_chunk_xor);
      uint32_t b0, b1, b2, b3;
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                   : "r"(addr));
      mma_16816<T>(cacc[2 * np], a0, a1, a2, a3, b0, b1);
      mma_16816<T>(cacc[2 * np + 1], a0, a1, a2, a3, b2, b3);
    }
  }
}

// The block's down_act rows: each warp's partial products (rows of row-warp rw, k-warp kw) through shared memory
// `red` ([KW][RW][16][RP] floats; the caller has synchronized), summed over the k-warps in order, written to
// out[m0 + row, 0 .. R).
template <int RW, int KW, int RP>
__device__ __forceinline__ void down_act_block_store(float* red, const float (&cacc)[RP / 8][4], int rw, int kw,
                                                     int g, int t, float* __restrict__ out, int m0, int M, int R) {
  float* mine = red + ((kw * RW + rw) * 16) * RP;
#pragma unroll
  for (int nt = 0; nt < RP / 8; ++nt) {
    mine[g * RP + 8 * nt + 2 * t] = cacc[nt][0];
    mine[g * RP + 8 * nt + 2 * t + 1] = cacc[nt][1];
    mine[(g + 8) * RP + 8 * nt + 2 * t] = cacc[nt][2];
    mine[(g + 8) * RP + 8 * nt + 2 * t + 1] = cacc[nt][3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < RW * 16 * R; idx += 32 * RW * KW) {
    const int rl = idx / R, r = idx % R;
    const int rw_ = rl / 16, rr = rl % 16;
    float sum = red[((0 * RW + rw_) * 16 + rr) * RP + r];
#pragma unroll
    for (int k2 = 1; k2 < KW; ++k2) sum += red[((k2 * RW + rw_) * 16 + rr) * RP + r];
    const int m = m0 + rl;
    if (m < M) out[static_cast<int64_t>(m) * R + r] = sum;
  }
}

// W4A8 int8 codes are stored in W4A8's channel order (formats.h w4a8_pos): per 32-channel slice the even channels,
// then the odd ones. Codes of channels k..k+7 (k % 8 == 0, byte i = channel k + i): the 4 even channels are one
// word at slice position 4 ((k >> 3) & 3), the 4 odd ones the word 16 bytes further.
__device__ __forceinline__ void store_w4a8_codes8(int8_t* row, int64_t k, uint2 c) {
  int8_t* p = row + (k & ~int64_t(31)) + 4 * ((k >> 3) & 3);
  *reinterpret_cast<uint32_t*>(p) = __byte_perm(c.x, c.y, 0x6420);
  *reinterpret_cast<uint32_t*>(p + 16) = __byte_perm(c.x, c.y, 0x7531);
}

// The same for channels k..k+15 (k % 16 == 0, word i = channels k + 4i .. k + 4i + 3): 8 even channels at slice
// position 8 ((k >> 4) & 1), the 8 odd ones 16 bytes further.
__device__ __forceinline__ void store_w4a8_codes16(int8_t* row, int64_t k, const uint32_t (&w)[4]) {
  int8_t* p = row + (k & ~int64_t(31)) + 8 * ((k >> 4) & 1);
  *reinterpret_cast<uint2*>(p) = make_uint2(__byte_perm(w[0], w[1], 0x6420), __byte_perm(w[2], w[3], 0x6420));
  *reinterpret_cast<uint2*>(p + 16) = make_uint2(__byte_perm(w[0], w[1], 0x7531), __byte_perm(w[2], w[3], 0x7531));
}

// RW row-warps x KW k-warps per block; RP = R padded to 16/32/64 (0: no branch). blockIdx.y selects a slice of
// `chunks_per_split` 64-channel chunks; with several slices, down_act holds per-slice partial sums [splits, M, R].
// kFmt: kFmtInt4 / kFmtNvfp4 write codes and group scales; kFmtGroupMax (W4A8's first pass) writes only the fp32
// amax of x_hat per (token, 64-channel chunk) into `scales` [M, K/64] (and down_act), for quantize_tokens_kernel;
// kFmtInt8Token (quantize_act_given_amax) writes W4A8's int8 codes and per-token scales [M] from the given per-token
// amaxes `amax_in` [M].
enum Fmt : int { kFmtInt4 = 0, kFmtNvfp4 = 1, kFmtGroupMax = 2, kFmtInt8Token = 3 };

// kLean (W4A8's group-max pass only, R <= 32; the default since 2026-12-07, =regs turns it off): the same loads,
// arithmetic and order with fewer instructions around them: stage_pd_rows_unrolled, and x's cache policy (keep_x) as a
// template argument (kLeanKeep: __ldg, kLeanStream: __ldcs) where the run-time choice compiled into two predicated
// loads per 16 bytes. The pass measured the same ~6.3 ms per FLUX.1 step on an H100 and an H200: bound by instruction
// issue, not memory.
enum LeanMode : int { kNotLean = 0, kLeanStream = 1, kLeanKeep = 2 };
template <typename T, int RW, int KW, int RP, int kFmt, int kMinBlocks = 2, int kLean = kNotLean>
__global__ void __launch_bounds__(32 * RW * KW, kMinBlocks) quantize_fast_kernel(const T* __restrict__ x,
                                                                     const T* __restrict__ smooth,
                                                                     const T* __restrict__ pd,
                                                                     uint8_t* __restrict__ codes,
                                                                     void* __restrict__ scales,
                                                                     float* __restrict__ down_act,
                                                                     const float* __restrict__ amax_in, int M, int K,
                                                                     int R, bool act_unsigned, int chunks_per_split,
                                                                     bool keep_x) {
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh): nothing read or written before this
  constexpr bool kNvfp4 = kFmt == kFmtNvfp4;
  constexpr bool kGroupMax = kFmt == kFmtGroupMax;
  constexpr bool kInt8 = kFmt == kFmtInt8Token;
  static_assert(kLean == kNotLean || kGroupMax, "the lean variant is W4A8's group-max pass only");
  constexpr int NT = 32 * RW * KW;
  constexpr int RC = 64 * KW;                // channels per round
  constexpr int BUF = RC * 8 + RC * RP * 2;  // smooth + reciprocal (fp32) + staged proj_down
  constexpr int SV = (RC + NT - 1) / NT;     // smooth values each thread stages per round
  constexpr uint32_t FULL = 0xffffffffu;
  extern __shared__ __align__(16) uint8_t smem[];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rw = warp / KW, kw = warp % KW;
  const int g = lane >> 2, t = lane & 3;
  const int row_a = blockIdx.x * (16 * RW) + rw * 16 + g, row_b = row_a + 8;
  const int nchunks = K / 64;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(nchunks, c_begin + chunks_per_split);
  const int rounds = (c_end - c_begin + KW - 1) / KW;
  const int G = kNvfp4 ? K / kNvfp4Group : K / kInt4Group;  // kGroupMax: 64-channel chunks

  // kInt8: rows row_a / row_b's scale from the given amax, its reciprocal, and whether div3 by it is exact for every
  // |x_hat| <= 2^60 (scale in [2^-52, 2^52]: see the codes below); the k-slice-0 blocks' first k-warp writes it
  float tsc[2] = {0.f, 0.f}, tys[2] = {0.f, 0.f};
  bool tfast[2] = {false, false};
  if constexpr (kInt8) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = h == 0 ? row_a : row_b;
      tsc[h] = int4_scale<T>(row < M ? amax_in[row] : 0.f, kInt8Qmax);
      tys[h] = rcp_for_div(tsc[h]);
      tfast[h] = tsc[h] >= 0x1p-52f && tsc[h] <= 0x1p52f;
      if (blockIdx.y == 0 && kw == 0 && t == 0 && row < M) static_cast<T*>(scales)[row] = static_cast<T>(tsc[h]);
    }
  }

  float cacc[RP > 0 ? RP / 8 : 1][4];
#pragma unroll
  for (int i = 0; i < (RP > 0 ? RP / 8 : 1); ++i) cacc[i][0] = cacc[i][1] = cacc[i][2] = cacc[i][3] = 0.f;
  // per-lane part of the proj_down ldmatrix addresses (pd_lane_offsets)
  uint32_t pd_lane = 0, pd_chunk_xor = 0;
  if constexpr (RP > 0) pd_lane_offsets<RP>(kw, lane, pd_lane, pd_chunk_xor);

  auto stage_pd = [&](int q, int buf) {
    if constexpr (RP > 0) {
      T* dst = reinterpret_cast<T*>(smem + buf * BUF + RC * 8);
      if constexpr (kLean != kNotLean)
        stage_pd_rows_unrolled<T, RP, RC, NT>(dst, pd, (c_begin + q * KW) * 64, c_end * 64, R);
      else
        stage_pd_rows<T, RP, RC, NT>(dst, pd, (c_begin + q * KW) * 64, c_end * 64, R);
    }
    cp_async_commit();
  };
  float sv[SV];
  auto load_smooth = [&](int q) {
#pragma unroll
    for (int i = 0; i < SV; ++i) {
      const int idx = threadIdx.x + i * NT;
      const int kg = (c_begin + q * KW) * 64 + idx;
      sv[i] = (idx < RC && kg < c_end * 64) ? static_cast<float>(smooth[kg]) : 1.f;
    }
  };
  auto store_smooth = [&](int buf) {
    float* sm = reinterpret_cast<float*>(smem + buf * BUF);
#pragma unroll
    for (int i = 0; i < SV; ++i) {
      const int idx = threadIdx.x + i * NT;
      if (idx < RC) {
        sm[idx] = sv[i];
        sm[RC + idx] = kGroupMax ? rcp_w4a8_first_pass(sv[i]) : rcp_for_div(sv[i]);
      }
    }
  };
  uint4 xn[2][2];
  // keep_x: W4A8's token kernel reads x again next; when x fits in L2, default caching lets that read hit it
  // (streaming loads, the single-pass formats' choice, are evicted first)
  const bool keep = kGroupMax && keep_x;
  auto load_row = [&](int row, int64_t col, uint4 (&dst)[2]) {  // the lane's 16 channels of one row (0 past M)
    if (row >= M) {
      dst[0] = dst[1] = make_uint4(0, 0, 0, 0);
      return;
    }
    const uint4* p = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row) * K + col);
    if constexpr (kLean == kLeanKeep) {
      dst[0] = __ldg(p), dst[1] = __ldg(p + 1);
    } else if constexpr (kLean == kLeanStream) {
      dst[0] = __ldcs(p), dst[1] = __ldcs(p + 1);
    } else {
      dst[0] = keep ? __ldg(p) : __ldcs(p);
      dst[1] = keep ? __ldg(p + 1) : __ldcs(p + 1);
    }
  };
  auto load_x = [&](int c, uint4 (&dst)[2][2]) {
    const int64_t col = static_cast<int64_t>(c) * 64 + 16 * t;
    load_row(row_a, col, dst[0]);
    load_row(row_b, col, dst[1]);
  };

  // prologue: round 0
  load_smooth(0);
  store_smooth(0);
  stage_pd(0, 0);
  if (c_begin + kw < c_end) load_x(c_begin + kw, xn);

  for (int q = 0; q < rounds; ++q) {
    cp_async_wait_all();
    __syncthreads();
    const int buf = q & 1;
    const bool has_next = q + 1 < rounds;
    if (has_next) {
      stage_pd(q + 1, buf ^ 1);
      load_smooth(q + 1);
    }
    uint4 xc[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) xc[h][0] = xn[h][0], xc[h][1] = xn[h][1];
    const int c = c_begin + q * KW + kw;
    if (has_next && c + KW < c_end) load_x(c + KW, xn);

    auto x_at = [&](int h, int i) { return value_of<T>(xc[h][i >> 3], i & 7); };  // channel i of the lane's 16
    if (kGroupMax && c < c_end) {
      float amax[2];
      w4a8_chunk_amax<T>(xc, reinterpret_cast<const float*>(smem + buf * BUF) + kw * 64 + 16 * t, RC, amax);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = h == 0 ? row_a : row_b;
        if (t == 0 && row < M) static_cast<float*>(scales)[static_cast<int64_t>(row) * G + c] = amax[h];
      }
    } else if (c < c_end) {
      const float* sm = reinterpret_cast<const float*>(smem + buf * BUF) + kw * 64 + 16 * t;
      auto a_of = [&](int h, int i) {
        const float xv = x_at(h, i);
        return act_unsigned ? __fadd_rn(xv, kActShift) : xv;
      };
      // x_hat = a / smooth for both rows: fast exact path; a warp-uniform IEEE fallback below when an operand is
      // outside [2^-60, 2^60] (a smooth value out of range has a NaN reciprocal)
      float xh2[2][16];
      float amin[2] = {INFINITY, INFINITY}, amx[2] = {0.f, 0.f};
      bool ybad = false;
#pragma unroll
      for (int i4 = 0; i4 < 4; ++i4) {
        float lv[4], yv[4];
        staged_smooth4(sm, RC, i4, lv, yv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ybad |= yv[e] != yv[e];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float a = a_of(h, 4 * i4 + e);
            xh2[h][4 * i4 + e] = div3(a, lv[e], yv[e]);
            amin[h] = fminf(amin[h], fabsf(a));
            amx[h] = fmaxf(amx[h], fabsf(a));
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = h == 0 ? row_a : row_b;
        float (&xh)[16] = xh2[h];
        const bool bad = ybad || !(amin[h] >= 0x1p-60f) || !(amx[h] <= 0x1p60f);
        if (__any_sync(FULL, bad)) {
          if (bad) {
#pragma unroll
            for (int i = 0; i < 16; ++i) xh[i] = __fdiv_rn(a_of(h, i), sm[i]);
          }
        }
        if constexpr (kInt8) {
          // code = int8_code(x_hat / scale). Fast rows: x_hat clipped to +-2^60 (beyond it |x_hat / scale| >= 2^8
          // clamps to +-127 either way), so div3 is exact wherever |x_hat| >= 2^-60 and below that the code is 0
          // either way; clamp, then round half to even by adding 1.5 * 2^23 (the sum's low byte is the code, as in
          // quantize_tokens_fast_kernel); NaN x_hat -> 0. Other rows (scale 0, NaN, Inf, or outside the range):
          // the checked division (F2I makes NaN 0).
          uint32_t w4[4] = {0u, 0u, 0u, 0u};
          if (tfast[h]) {
            uint32_t b[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              const float a = fminf(fmaxf(xh[i], -0x1p60f), 0x1p60f);
              const float q = fminf(fmaxf(div3(a, tsc[h], tys[h]), -kInt8Qmax), kInt8Qmax);
              b[i] = xh[i] == xh[i] ? __float_as_uint(__fadd_rn(q, 0x1.8p23f)) : 0u;
            }
#pragma unroll
            for (int w = 0; w < 4; ++w)
              w4[w] = __byte_perm(__byte_perm(b[4 * w], b[4 * w + 1], 0x0040),
                                  __byte_perm(b[4 * w + 2], b[4 * w + 3], 0x0040), 0x5410);
          } else if (tsc[h] != 0.f) {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              const int code = min(max(__float2int_rn(div_rn_fast(xh[i], tsc[h], tys[h])), -127), 127);
              w4[i >> 2] |= (static_cast<uint32_t>(code) & 0xFFu) << (8 * (i & 3));
            }
          }
          if (row < M) {
            store_w4a8_codes16(reinterpret_cast<int8_t*>(codes) + static_cast<int64_t>(row) * K, c * 64 + 16 * t,
                               w4);
          }
          continue;
        }
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = max_nan(amax, act_unsigned ? xh[i] : fabsf(xh[i]));

        uint32_t packed[2] = {0u, 0u};
        if constexpr (!kNvfp4) {
          amax = max_nan(amax, __shfl_xor_sync(FULL, amax, 1));
          amax = max_nan(amax, __shfl_xor_sync(FULL, amax, 2));
          const float s = int4_scale<T>(amax, act_unsigned ? kUint4Qmax : kInt4Qmax);
          if (t == 0 && row < M) static_cast<T*>(scales)[static_cast<int64_t>(row) * G + c] = static_cast<T>(s);
          const float ys = rcp_for_div(s);  // NaN for s == 0, NaN or outside [2^-60, 2^60]
          const int lo = act_unsigned ? 0 : -7, hi = act_unsigned ? 15 : 7;
          // Out-of-range s (not 0): IEEE division. For s == 0 every code is 0: the NaN quotient converts to 0.
          if (__any_sync(FULL, s != 0.f && ys != ys)) {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              const int code = s == 0.f ? 0 : (act_unsigned ? uint4_code(__fdiv_rn(xh[i], s)) : int4_code(__fdiv_rn(xh[i], s)));
              packed[i >> 3] |= static_cast<uint32_t>(code & 0xF) << (4 * (i & 7));
            }
          } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              // |x_hat| < 2^-60 may round differently here, but then |x_hat / s| < 2^-120 * 7: code 0 either way
              const int code = min(max(__float2int_rn(div3(xh[i], s, ys)), lo), hi);  // NaN -> 0
              packed[i >> 3] |= static_cast<uint32_t>(code & 0xF) << (4 * (i & 7));
            }
          }
        } else {
          const c10::Float8_e4m3fn s8 = nvfp4_scale(amax);
          if (row < M) static_cast<uint8_t*>(scales)[static_cast<int64_t>(row) * G + 4 * c + t] = s8.x;
          const float s = static_cast<float>(s8);
          const float ys = rcp_for_div(s);  // e4m3 scales are within [2^-9, 448]: NaN only for s == 0 or NaN
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            // e2m1_code reads the sign of the quotient, so keep x_hat's sign for zeros; NaN -> code 0
            const float qv = s == 0.f ? 0.f : copysignf(div3(xh[i], s, ys), xh[i]);
            const int code = e2m1_code(qv);
            packed[i >> 3] |= static_cast<uint32_t>(code & 0xF) << (4 * (i & 7));
          }
        }
        if (row < M) {
          *reinterpret_cast<uint2*>(codes + static_cast<int64_t>(row) * (K / 2) + c * 32 + 8 * t) =
              make_uint2(packed[0], packed[1]);
        }
      }
    }

    if (c < c_end) {
      if constexpr (RP > 0)
        down_mma_chunk<T, RP>(cacc, xc, smem_u32(smem + buf * BUF + RC * 8) + pd_lane, pd_chunk_xor);
    }
    if (has_next) store_smooth(buf ^ 1);
  }

  if constexpr (RP > 0) {
    cp_async_wait_all();
    __syncthreads();
    down_act_block_store<RW, KW, RP>(reinterpret_cast<float*>(smem), cacc, rw, kw, g, t,
                                     down_act + static_cast<int64_t>(blockIdx.y) * M * R, blockIdx.x * (16 * RW), M,
                                     R);
  }
}

// W4A8's first pass, pipelined (Hopper, R <= 64, opt-in with SVDQUANT_OPS_CUDA_W4A8_GMAX=pipe: see
// kW4a8GroupMaxDefault; its ~108 KB per block do not fit sm_86 / sm_89): the group-max pass of quantize_fast_kernel
// (per-chunk amaxes of x_hat, down_act partial sums per K slice) with x staged through shared memory by cp.async,
// kPipeStages stages of 64 tokens x 128 channels in flight per block, instead of one 16-byte register prefetch per lane
// and round. Why: that kernel read x at ~1.6 TB/s on the H200 (17.6 us at M = 4608, K = 3072, R = 32, against ~6 us at
// the memory's bandwidth) with ~48 KB of loads in flight per SM; 2 blocks of 3 stages ahead keep ~96 KB in flight. Per
// stage and k-warp the lane reads its 16 channels of rows g and g + 8 from shared memory (rows padded to 144 bytes: the
// 8 lanes of an LDS.128 phase hit distinct banks) in the register layout of the register-prefetch kernel, so the amax
// and the mma are the same code (w4a8_chunk_amax, down_mma_chunk) and the outputs the same values: amaxes bit for bit,
// down_act summed per slice in the same order (slices may differ in number).
constexpr int kPipeStages = 4;       // RP <= 32; RP = 64 takes 3 (2 blocks per SM either way)
constexpr int kPipeRowBytes = 144;   // 64 channels x 2 bytes + 16 bytes of padding

template <int RP, int S>
struct PipeSmem {
  static constexpr int kX = 2 * 64 * kPipeRowBytes;  // [k-warp][row][64 channels + pad]
  static constexpr int kSmooth = 128 * 8;            // smooth values, then their reciprocals (fp32)
  static constexpr int kPd = 128 * RP * 2;           // staged proj_down rows (swizzled as pd_swizzle)
  static constexpr int kStage = kX + kSmooth + kPd;
  static constexpr int kBytes = S * kStage;
  static_assert(kBytes >= 2 * 4 * 16 * RP * 4, "the down_act reduction reuses the stages");
};

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <typename T, int RP, int S>
__global__ void __launch_bounds__(256, 2) quantize_w4a8_groupmax_pipe_kernel(const T* __restrict__ x,
                                                                    const T* __restrict__ smooth,
                                                                    const T* __restrict__ pd,
                                                                    float* __restrict__ gmax,
                                                                    float* __restrict__ down_act, int M, int K, int R,
                                                                    int chunks_per_split) {
  using L = PipeSmem<RP, S>;
  constexpr int RW = 4, KW = 2, RC = 128, NT = 256;
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rw = warp / KW, kw = warp % KW;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * 64;
  const int row_a = m0 + rw * 16 + g, row_b = row_a + 8;
  const int G = K / 64;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(G, c_begin + chunks_per_split);
  const int rounds = (c_end - c_begin + KW - 1) / KW;

  // x by cp.async.cg with the default L2 policy. A first version streamed it (an evict-first createpolicy hint when x
  // does not fit in half of L2) and met an illegal instruction at its first launch on an H100 (2026-12-05); the
  // cause was not established (both instructions are valid PTX for sm_90), the hint was dropped.
  auto stage_ptr = [&](int q) { return smem + (q % S) * L::kStage; };
  // cp.async of round q's x tile and proj_down rows into its stage, one commit group (empty past the last round, so
  // that every thread commits one group per round and wait_group counts rounds)
  auto issue = [&](int q) {
    if (q < rounds) {
      uint8_t* st = stage_ptr(q);
      const int c0 = c_begin + q * KW;
#pragma unroll
      for (int i = 0; i < (2 * 64 * 8) / NT; ++i) {
        const int idx = threadIdx.x + i * NT;
        const int piece = idx & 7, row = (idx >> 3) & 63, kc = idx >> 9;
        const bool ok = m0 + row < M && c0 + kc < c_end;
        const T* src = ok ? x + static_cast<int64_t>(m0 + row) * K + (c0 + kc) * 64 + piece * 8 : x;
        cp_async16(st + (kc * 64 + row) * kPipeRowBytes + piece * 16, src, ok ? 16 : 0);
      }
      if constexpr (RP > 0)
        stage_pd_rows<T, RP, RC, NT>(reinterpret_cast<T*>(st + L::kX + L::kSmooth), pd, c0 * 64, c_end * 64, R);
    }
    cp_async_commit();
  };
  // round q's smooth values (thread i < 128: channel i of the round) and their first-pass reciprocals
  auto load_smooth = [&](int q) {
    const int kg = (c_begin + q * KW) * 64 + static_cast<int>(threadIdx.x);
    return (threadIdx.x < RC && q < rounds && kg < c_end * 64) ? static_cast<float>(smooth[kg]) : 1.f;
  };
  auto store_smooth = [&](int q, float v) {
    if (threadIdx.x < RC && q < rounds) {
      float* sm = reinterpret_cast<float*>(stage_ptr(q) + L::kX);
      sm[threadIdx.x] = v;
      sm[RC + threadIdx.x] = rcp_w4a8_first_pass(v);
    }
  };

  float cacc[RP > 0 ? RP / 8 : 1][4];
#pragma unroll
  for (int i = 0; i < (RP > 0 ? RP / 8 : 1); ++i) cacc[i][0] = cacc[i][1] = cacc[i][2] = cacc[i][3] = 0.f;
  uint32_t pd_lane = 0, pd_chunk_xor = 0;
  if constexpr (RP > 0) pd_lane_offsets<RP>(kw, lane, pd_lane, pd_chunk_xor);

  // prologue: rounds 0 .. S - 2 in flight, their smooth values staged
  float sv[S - 1];
#pragma unroll
  for (int q = 0; q < S - 1; ++q) {
    issue(q);
    sv[q] = load_smooth(q);
  }
#pragma unroll
  for (int q = 0; q < S - 1; ++q) store_smooth(q, sv[q]);

  for (int q = 0; q < rounds; ++q) {
    cp_async_wait<S - 2>();  // round q's group has landed (this thread's copies) ...
    __syncthreads();         // ... everyone's, and round q - 1's stage is free
    issue(q + S - 1);
    const float sv_next = load_smooth(q + S - 1);  // stored after this round's math (its latency hidden)
    uint8_t* st = stage_ptr(q);
    const int c = c_begin + q * KW + kw;
    if (c < c_end) {
      const uint8_t* xr = st + (kw * 64 + rw * 16 + g) * kPipeRowBytes + 32 * t;
      uint4 xc[2][2];
      xc[0][0] = *reinterpret_cast<const uint4*>(xr);
      xc[0][1] = *reinterpret_cast<const uint4*>(xr + 16);
      xc[1][0] = *reinterpret_cast<const uint4*>(xr + 8 * kPipeRowBytes);
      xc[1][1] = *reinterpret_cast<const uint4*>(xr + 8 * kPipeRowBytes + 16);
      float amax[2];
      w4a8_chunk_amax<T>(xc, reinterpret_cast<const float*>(st + L::kX) + kw * 64 + 16 * t, RC, amax);
      if (t == 0) {
        if (row_a < M) gmax[static_cast<int64_t>(row_a) * G + c] = amax[0];
        if (row_b < M) gmax[static_cast<int64_t>(row_b) * G + c] = amax[1];
      }
      if constexpr (RP > 0) down_mma_chunk<T, RP>(cacc, xc, smem_u32(st + L::kX + L::kSmooth) + pd_lane, pd_chunk_xor);
    }
    // round q + S - 1's stage is round q - 1's, which every thread finished before this round's barrier
    store_smooth(q + S - 1, sv_next);
  }

  if constexpr (RP > 0) {
    cp_async_wait<0>();
    __syncthreads();
    down_act_block_store<RW, KW, RP>(reinterpret_cast<float*>(smem), cacc, rw, kw, g, t,
                                     down_act + static_cast<int64_t>(blockIdx.y) * M * R, m0, M, R);
  }
}

// amax of x_hat over the row (from the first pass's per-chunk maxima `gmax` [M, G], or computed here when gmax is
// null; `given`: gmax [M] holds each row's amax, taken as it is), scale = int4_scale<T>(amax, 127), codes =
// int8_code(x_hat / scale), both divisions correctly rounded as in the CPU reference; one warp per token, one
// element per lane and step (the portable path, and the fast path when smooth is not 16-byte aligned).
template <typename T>
__global__ void __launch_bounds__(256) quantize_tokens_kernel(const T* __restrict__ x, const T* __restrict__ smooth,
                                                              const float* __restrict__ gmax, int8_t* __restrict__ codes,
                                                              T* __restrict__ scales, int64_t M, int64_t K, int64_t G,
                                                              bool given) {
  constexpr uint32_t FULL = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= M) return;
  const T* xr = x + row * K;
  float amax = 0.f;
  if (given) {
    amax = gmax[row];  // as it is (a reduction from 0 would turn a negative amax into 0: the fast path does not)
  } else if (gmax != nullptr) {
    for (int64_t g = lane; g < G; g += 32) amax = max_nan(amax, gmax[row * G + g]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(FULL, amax, o));
  }
  if (!given && (gmax == nullptr || !w4a8_row_fast(amax))) {  // the first pass's amax is exact only inside the bounds
    amax = 0.f;
    for (int64_t k = lane; k < K; k += 32)
      amax = max_nan(amax, fabsf(__fdiv_rn(static_cast<float>(xr[k]), static_cast<float>(smooth[k]))));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(FULL, amax, o));
  }
  const float sc = int4_scale<T>(amax, kInt8Qmax);
  if (lane == 0) scales[row] = static_cast<T>(sc);
  int8_t* cr = codes + row * K;
  // x_hat / scale with the row's reciprocal (bit-identical to the IEEE division, see div_rn_fast); NaN -> code 0
  const float ys = rcp_for_div(sc);
  for (int64_t k = lane; k < K; k += 32) {
    const float xh = __fdiv_rn(static_cast<float>(xr[k]), static_cast<float>(smooth[k]));
    cr[w4a8_pos(k)] = static_cast<int8_t>(sc == 0.f ? 0 : min(max(__float2int_rn(div_rn_fast(xh, sc, ys)), -127), 127));
  }
}

// W4A8 codes of 8 consecutive x_hat of a row with a nonzero scale `sc` (reciprocal `ys`), packed little-endian.
// qfast: scale in [2^-52, 2^52] (a NaN or Inf in the row makes the scale NaN or Inf: the checked path). Then
// |x_hat| < 2^60 (bf16: scale = amax / 127 rounded, so |x_hat| <= amax
// < 2^60; fp16: x_hat is at most 65504 / 2^-24 < 2^40, and its scale may be clamped to 65504 or be subnormal, so
// |x_hat / scale| can pass 127.5: the clamp covers it), so div3 is exact wherever |x_hat| >= 2^-60, and below that
// |q| < 2^-8: code 0 either way. Clamp, then round half to even by adding 1.5 * 2^23 (the sum's ulp is 1): the low
// byte of the sum's bits is the code in two's complement. Other scales (or NaN: every code 0): the checked division.
__device__ __forceinline__ uint2 w4a8_codes8(const float (&xh)[8], float sc, float ys, bool qfast) {
  uint32_t out[2] = {0u, 0u};
  if (qfast) {
    uint32_t b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float q = fminf(fmaxf(div3(xh[i], sc, ys), -kInt8Qmax), kInt8Qmax);
      b[i] = __float_as_uint(__fadd_rn(q, 0x1.8p23f));
    }
#pragma unroll
    for (int w = 0; w < 2; ++w)
      out[w] = __byte_perm(__byte_perm(b[4 * w], b[4 * w + 1], 0x0040), __byte_perm(b[4 * w + 2], b[4 * w + 3], 0x0040),
                           0x5410);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int code = min(max(__float2int_rn(div_rn_fast(xh[i], sc, ys)), -127), 127);  // NaN -> 0
      out[i >> 2] |= (static_cast<uint32_t>(code) & 0xFFu) << (8 * (i & 3));
    }
  }
  return make_uint2(out[0], out[1]);
}

// W4A8's second pass on the fast path (16-bit x and smooth, 16-byte aligned, K % 8 == 0): kTokRows tokens per warp,
// 4 warps per block. Per 256-channel step a lane holds 8 consecutive channels of each of its rows; the 8 reciprocals
// of smooth are computed once per step for all its rows, and the next step's loads are issued before this step's
// math (2 x (kTokRows + 1) 16-byte loads in flight per lane). x_hat = div3(x, smooth) with no per-element range
// check for rows whose amax passes w4a8_row_fast (see kW4a8AmaxLo), IEEE divisions for the other rows; x_hat / scale
// by div3 plus a rounding without F2I for rows whose scale is in [2^-52, 2^52], by div_rn_fast (checked per element)
// for the others. Where the first pass split K into slices, the kernel also adds each of its rows' down_act partial
// sums `part` [splits, M, R] in slice order (R = 0: nothing to add), as down_act_split_reduce_kernel would: one
// launch less per call. With SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=1, where M is small, blockIdx.y takes a slice of K
// (k_per_block channels; see token_kernel_k_per_block); every slice computes its rows' scales, slice 0 stores them
// and down_act.
constexpr int kTokRows = 2, kTokWarps = 4;

// The lean token loop (quantize_tokens_fast_kernel<T, true>) for a warp whose kTokRows rows are in range and on the
// fast paths: channels k, k + 256, ... below k_end of each row (k = the slice's first channel + 8 * lane).
template <typename T>
__device__ __forceinline__ void tokens_lean_rows(const T* __restrict__ x, const T* __restrict__ smooth,
                                                 int8_t* __restrict__ codes, const int (&rows)[kTokRows],
                                                 const float (&sc)[kTokRows], const float (&ys)[kTokRows], int K, int k,
                                                 int k_end) {
  const int steps = k < k_end ? (k_end - k + 255) / 256 : 0;
  // step j reads 16 bytes at channel k + 256 j (32 uint4 further per step) and stores the two code words
  // store_w4a8_codes8 would (its address formula, hoisted: written out there so that the shipped kernels keep their
  // code), 256 j bytes (64 words) after channel k's (k % 32 is the same for every step)
  const uint4* xp[kTokRows];
  uint32_t* cp[kTokRows];
#pragma unroll
  for (int h = 0; h < kTokRows; ++h) {
    xp[h] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(rows[h]) * K + k);
    cp[h] = reinterpret_cast<uint32_t*>(codes + static_cast<int64_t>(rows[h]) * K + (k & ~31) + 4 * ((k >> 3) & 3));
  }
  const uint4* sp = reinterpret_cast<const uint4*>(smooth + k);
  auto load = [&](uint4 (&xv)[kTokRows], uint4& lv, int j) {
    lv = sp[32 * j];
#pragma unroll
    for (int h = 0; h < kTokRows; ++h) xv[h] = __ldcs(xp[h] + 32 * j);
  };
  auto step = [&](const uint4 (&xv)[kTokRows], const uint4& lv, int j) {
    float l[8], yl[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      l[i] = value_of<T>(lv, i);
      yl[i] = rcp_refined(l[i]);  // rcp_for_div without its range check
    }
#pragma unroll
    for (int h = 0; h < kTokRows; ++h) {
      float xh[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) xh[i] = div3(value_of<T>(xv[h], i), l[i], yl[i]);
      const uint2 c = w4a8_codes8(xh, sc[h], ys[h], true);
      cp[h][64 * j] = __byte_perm(c.x, c.y, 0x6420);
      cp[h][64 * j + 4] = __byte_perm(c.x, c.y, 0x7531);
    }
  };
  uint4 xa[kTokRows], la, xb[kTokRows], lb;
  if (steps > 0) load(xa, la, 0);
  int j = 0;
  for (; j + 2 <= steps; j += 2) {
    load(xb, lb, j + 1);
    step(xa, la, j);
    if (j + 2 < steps) load(xa, la, j + 2);
    step(xb, lb, j + 1);
  }
  if (j < steps) step(xa, la, j);
}

// kLean (the default since 2026-12-07; SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=0 turns it off): warps whose rows are all in
// range and on the exact fast paths (xfast and qfast: the common case) take a loop without the per-step row tests:
// smooth's reciprocals without rcp_for_div's range check (rcp_refined: xfast implies every smooth value lies in [2^-20,
// 2^20], see kW4a8AmaxLo, where rcp_for_div returns the same), store addresses kept across steps (the ones
// store_w4a8_codes8 computes), and two register sets for x in turn instead of a copy per step: the same arithmetic in
// the same order, so the same bytes. The token pass takes 5.9 ms per FLUX.1 step on an H200 against 6.5-6.8 on an H100
// with 43 % more bandwidth, so issue-bound in part; the loop's common path is 324 -> ~226 SASS instructions per 256
// channels (a helper's prototype, sm_90a).
template <typename T, bool kLean = false>
__global__ void __launch_bounds__(32 * kTokWarps) quantize_tokens_fast_kernel(const T* __restrict__ x,
                                                                              const T* __restrict__ smooth,
                                                                              const float* __restrict__ gmax,
                                                                              int8_t* __restrict__ codes,
                                                                              T* __restrict__ scales,
                                                                              const float* __restrict__ part,
                                                                              float* __restrict__ down_act, int M,
                                                                              int K, int G, int R, int splits,
                                                                              int k_per_block) {
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh)
  constexpr uint32_t FULL = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kTokWarps + (threadIdx.x >> 5)) * kTokRows;
  if (row0 >= M) return;
  int rows[kTokRows];
  float sc[kTokRows], ys[kTokRows];
  bool qfast[kTokRows], xfast[kTokRows];
#pragma unroll
  for (int h = 0; h < kTokRows; ++h) {
    rows[h] = min(row0 + h, M - 1);  // a row past M repeats the last one and is not stored
    float amax = 0.f;
    for (int g = lane; g < G; g += 32) amax = max_nan(amax, gmax[static_cast<int64_t>(rows[h]) * G + g]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(FULL, amax, o));
    // Inside the bounds the first pass's amax is exact and so is div3 for this row's x_hat (kW4a8AmaxLo); outside
    // (rare: zero, tiny, huge or NaN rows, or smooth outside [2^-20, 2^20]) the amax is recomputed with IEEE
    // divisions and so are the row's x_hat below. Warp-uniform.
    xfast[h] = w4a8_row_fast(amax);
    if (!xfast[h]) {
      amax = 0.f;
      const T* xr = x + static_cast<int64_t>(rows[h]) * K;
      for (int k = 8 * lane; k < K; k += 256) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xr + k);
        const uint4 lv = *reinterpret_cast<const uint4*>(smooth + k);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          // (written out: through value_of, ptxas structures the fp16 kernel differently)
          const uint32_t wx = word4(xv, i >> 1), wl = word4(lv, i >> 1);
          const float a = Raw<T>::to_float((i & 1) ? (wx >> 16) : (wx & 0xFFFFu));
          const float l = Raw<T>::to_float((i & 1) ? (wl >> 16) : (wl & 0xFFFFu));
          amax = max_nan(amax, fabsf(__fdiv_rn(a, l)));
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(FULL, amax, o));
    }
    sc[h] = int4_scale<T>(amax, kInt8Qmax);
    ys[h] = rcp_for_div(sc[h]);
    qfast[h] = sc[h] >= 0x1p-52f && sc[h] <= 0x1p52f;
    if (lane == 0 && row0 + h < M && blockIdx.y == 0) scales[row0 + h] = static_cast<T>(sc[h]);
    // down_act of this row from the first pass's K slices (R = 0: none left), added in slice order as
    // down_act_split_reduce_kernel does: the same bits
    if (row0 + h < M && blockIdx.y == 0) {
      const int64_t n = static_cast<int64_t>(M) * R, at = static_cast<int64_t>(row0 + h) * R;
      for (int r = lane; r < R; r += 32) {
        float acc = part[at + r];
        for (int k = 1; k < splits; ++k) acc += part[k * n + at + r];
        down_act[at + r] = acc;
      }
    }
  }
  uint4 xn[kTokRows], ln;
  auto load = [&](int k) {
    ln = *reinterpret_cast<const uint4*>(smooth + k);
#pragma unroll
    for (int h = 0; h < kTokRows; ++h)
      xn[h] = __ldcs(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(rows[h]) * K + k));
  };
  // this block's channels (blockIdx.y: a slice of K where few rows would leave SMs idle; k_per_block % 256 == 0)
  const int k_end = min(K, static_cast<int>(blockIdx.y + 1) * k_per_block);
  int k = static_cast<int>(blockIdx.y) * k_per_block + 8 * lane;
  if constexpr (kLean) {
    bool common = row0 + kTokRows <= M;  // warp-uniform
#pragma unroll
    for (int h = 0; h < kTokRows; ++h) common = common && xfast[h] && qfast[h];
    if (common) {
      tokens_lean_rows<T>(x, smooth, codes, rows, sc, ys, K, k, k_end);
      return;
    }
  }
  if (k < k_end) load(k);
  for (; k < k_end; k += 256) {
    uint4 xc[kTokRows];
#pragma unroll
    for (int h = 0; h < kTokRows; ++h) xc[h] = xn[h];
    const uint4 lc = ln;
    if (k + 256 < k_end) load(k + 256);
    float l[8], yl[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      l[i] = value_of<T>(lc, i);
      yl[i] = rcp_for_div(l[i]);  // used by xfast rows only, whose smooth values are all in [2^-20, 2^20]
    }
#pragma unroll
    for (int h = 0; h < kTokRows; ++h) {
      auto a_of = [&](int i) { return value_of<T>(xc[h], i); };
      uint2 out = make_uint2(0u, 0u);
      if (sc[h] != 0.f) {  // warp-uniform; a zero row (scale 0) has all codes 0
        float xh[8];
        if (xfast[h]) {
#pragma unroll
          for (int i = 0; i < 8; ++i) xh[i] = div3(a_of(i), l[i], yl[i]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xh[i] = __fdiv_rn(a_of(i), l[i]);
        }
        out = w4a8_codes8(xh, sc[h], ys[h], qfast[h]);
      }
      if (row0 + h < M) store_w4a8_codes8(codes + static_cast<int64_t>(row0 + h) * K, k, out);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// W4A8 cluster kernel (sm_90): x read once
// ------------------------------------------------------------------------------------------------------------------
// A token's scale needs the amax over all of K, and its codes need the scale, so a kernel that streams x must read
// it twice (the two passes above) unless one block holds the whole row; but the down projection wants each block to
// keep to a slice of K (to reuse that slice of proj_down). A thread-block cluster along K has both: a cluster of C
// CTAs (1, 2, 4 or 8) owns 16 tokens, CTA r owns the channels [r * Ks, (r + 1) * Ks), and each CTA
//   1. copies its 16 x Ks tile of x into shared memory (cp.async, rows past M zero-filled), and smooth's slice
//      with its reciprocals as fp32;
//   2. computes each token's partial amax of |x / smooth| over the slice (8 threads per token) and the partial
//      product x . proj_down (mma m16n8k16 on the tile; 4 warps take every 4th k16 step, summed in warp order);
//   3. after a cluster barrier, reads its tokens' C partial amaxes from its peers' shared memory (every CTA
//      computes the same scale), and sums the C partial products of the tokens t with t % C == r in rank order;
//   4. writes the int8 codes of its slice from the tile, then waits at a second cluster barrier (peers may still be
//      reading its shared memory).
// Divisions as in the two passes (div3 where kW4a8AmaxLo's bounds make it exact, IEEE otherwise; rows outside the
// bounds get their amax recomputed exactly and exchanged once more): codes and scales equal the CPU op's bit for
// bit. down_act sums in a fixed order other than the CPU's (fp32): deterministic.
constexpr int kClRows = 16;     // tokens per cluster
constexpr int kClThreads = 128;  // 4 warps; 8 threads per token in the elementwise phases

// Shared memory of a CTA: the tile (Ks + 8 elements per row: conflict-free ldmatrix), smooth and its reciprocals,
// the partial amaxes, the per-warp and per-CTA partial products, the exact partial amaxes (rare rows).
inline size_t w4a8_cluster_smem(int Ks, int RP) {
  return 2 * size_t(kClRows) * (Ks + 8) + sizeof(float) * (2 * size_t(Ks) + 2 * kClRows + 5 * size_t(kClRows) * RP);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T, int RP>
__global__ void __launch_bounds__(kClThreads) quantize_w4a8_cluster_kernel(const T* __restrict__ x,
                                                                           const T* __restrict__ smooth,
                                                                           const T* __restrict__ pd,
                                                                           int8_t* __restrict__ codes,
                                                                           T* __restrict__ scales,
                                                                           float* __restrict__ down_act, int M, int K,
                                                                           int R, int Ks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) uint8_t smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int C = static_cast<int>(cluster.num_blocks());
  const int ld = Ks + 8;
  T* tile = reinterpret_cast<T*>(smem);
  float* sm_s = reinterpret_cast<float*>(tile + kClRows * ld);
  float* sm_y = sm_s + Ks;  // reciprocals at sm_s[Ks + k]: the staging layout of staged_smooth4
  float* amax_part = sm_y + Ks;
  float* warp_down = amax_part + kClRows;       // [4][16][RP]
  float* cta_down = warp_down + 4 * kClRows * RP;  // [16][RP]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = (blockIdx.x / C) * kClRows;  // clusters are consecutive blocks along x
  const int k0 = rank * Ks;
  const int chunks = Ks / 8;  // 16-byte chunks per tile row

  // 1. the tile and smooth's slice
  for (int i = tid; i < kClRows * chunks; i += kClThreads) {
    const int r = i / chunks, c = i - r * chunks;
    const bool in = m0 + r < M;
    cp_async16(tile + r * ld + c * 8, x + static_cast<int64_t>(in ? m0 + r : 0) * K + k0 + c * 8, in ? 16 : 0);
  }
  cp_async_commit();
  for (int i = tid; i < Ks; i += kClThreads) {
    const float s = static_cast<float>(smooth[k0 + i]);
    sm_s[i] = s;
    sm_y[i] = rcp_w4a8_first_pass(s);  // NaN outside [2^-20, 2^20]: that token's amax is NaN, so it is recomputed
  }
  cp_async_wait_all();
  __syncthreads();

  // 2a. partial amax of |x_hat| per token by div3 (exact for the rows that pass w4a8_row_fast, see kW4a8AmaxLo):
  //     8 consecutive threads per token, 16-byte chunk c to thread c % 8
  const int tok = tid >> 3, sub = tid & 7;
  const T* xrow = tile + tok * ld;
  float amax = 0.f;
  for (int c = sub; c < chunks; c += 8) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xrow + c * 8);
    float sv[2][4], yv[2][4];
    staged_smooth4(sm_s, Ks, 2 * c, sv[0], yv[0]);
    staged_smooth4(sm_s, Ks, 2 * c + 1, sv[1], yv[1]);
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = max_nan(amax, fabsf(div3(value_of<T>(xv, j), sv[j >> 2][j & 3], yv[j >> 2][j & 3])));
  }
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (sub == 0) amax_part[tok] = amax;

  // 2b. partial x . proj_down: warp w takes the k16 steps w, w + 4, ... of the slice (m16 x RP accumulators)
  if constexpr (RP > 0) {
    constexpr int NTL = RP / 8;
    float acc[NTL][4];
#pragma unroll
    for (int j = 0; j < NTL; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    const int g = lane >> 2, t4 = lane & 3;
    const uint16_t* pdb = reinterpret_cast<const uint16_t*>(pd);
    for (int s = warp; s < Ks / 16; s += 4) {
      const int kk = s * 16;
      uint32_t a[4];  // lanes 0-15: rows 0-15 at kk, lanes 16-31: rows 0-15 at kk + 8 (the m16k16 A fragment)
      ldmatrix_x4(a, tile + (lane & 15) * ld + kk + (lane >> 4) * 8);
      const int64_t krow = static_cast<int64_t>(k0 + kk + 2 * t4) * R;
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
        const int n = j * 8 + g;
        uint32_t b0 = 0u, b1 = 0u;  // B[k][n] = proj_down[k][n] (col-major B fragment: k pairs in one register)
        if (n < R) {
          const uint16_t* p = pdb + krow + n;
          b0 = static_cast<uint32_t>(__ldg(p)) | (static_cast<uint32_t>(__ldg(p + R)) << 16);
          b1 = static_cast<uint32_t>(__ldg(p + 8 * R)) | (static_cast<uint32_t>(__ldg(p + 9 * R)) << 16);
        }
        mma_16816<T>(acc[j], a[0], a[1], a[2], a[3], b0, b1);
      }
    }
    float* w = warp_down + warp * kClRows * RP;
#pragma unroll
    for (int j = 0; j < NTL; ++j) {
      const int c = j * 8 + 2 * t4;
      w[g * RP + c] = acc[j][0];
      w[g * RP + c + 1] = acc[j][1];
      w[(g + 8) * RP + c] = acc[j][2];
      w[(g + 8) * RP + c + 1] = acc[j][3];
    }
    __syncthreads();
    for (int i = tid; i < kClRows * RP; i += kClThreads) {
      cta_down[i] = ((warp_down[i] + warp_down[kClRows * RP + i]) + warp_down[2 * kClRows * RP + i]) +
                    warp_down[3 * kClRows * RP + i];
    }
  }

  // 3. exchange through distributed shared memory. Every CTA of the cluster reads the same partials, so all agree
  //    on each token's amax and on whether any token needs the exact recomputation (cluster-uniform branch).
  cluster.sync();
  const bool row_in = m0 + tok < M;
  float full = 0.f;
  for (int r = 0; r < C; ++r) full = max_nan(full, cluster.map_shared_rank(amax_part, r)[tok]);
  const bool xfast = w4a8_row_fast(full);
  if (__syncthreads_or(row_in && !xfast)) {
    // rare (zero, tiny, huge or non-finite rows, smooth outside [2^-20, 2^20]): the slow tokens' amax again with
    // IEEE divisions, exchanged through a second array (peers may still read the first)
    float* amax_exact = cta_down + kClRows * RP;
    float a = 0.f;
    if (!xfast) {
      for (int c = sub; c < chunks; c += 8) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xrow + c * 8);
#pragma unroll
        for (int j = 0; j < 8; ++j) a = max_nan(a, fabsf(__fdiv_rn(value_of<T>(xv, j), sm_s[c * 8 + j])));
      }
    }
#pragma unroll
    for (int off = 4; off > 0; off >>= 1) a = max_nan(a, __shfl_xor_sync(0xffffffffu, a, off));
    if (sub == 0) amax_exact[tok] = a;
    cluster.sync();
    if (!xfast) {
      full = 0.f;
      for (int r = 0; r < C; ++r) full = max_nan(full, cluster.map_shared_rank(amax_exact, r)[tok]);
    }
  }
  const float scale = int4_scale<T>(full, kInt8Qmax);
  if (rank == 0 && sub == 0 && row_in) scales[m0 + tok] = static_cast<T>(scale);
  if constexpr (RP > 0) {
    for (int i = tid; i < kClRows * R; i += kClThreads) {
      const int t = i / R, n = i - t * R;
      if (t % C != rank || m0 + t >= M) continue;
      float sum = 0.f;
      for (int r = 0; r < C; ++r) sum += cluster.map_shared_rank(cta_down, r)[t * RP + n];
      down_act[static_cast<int64_t>(m0 + t) * R + n] = sum;
    }
  }

  // 4. codes of this slice, as the token kernel computes them (quantize_tokens_fast_kernel): x_hat by div3 for rows
  //    that pass w4a8_row_fast, else IEEE; the codes by w4a8_codes8; a zero scale gives zero codes.
  if (row_in) {
    const float ys = rcp_for_div(scale);
    const bool qfast = scale >= 0x1p-52f && scale <= 0x1p52f;
    int8_t* row_codes = codes + static_cast<int64_t>(m0 + tok) * K;
    for (int c = sub; c < chunks; c += 8) {
      const uint4 xv = *reinterpret_cast<const uint4*>(xrow + c * 8);
      uint2 packed = make_uint2(0u, 0u);
      if (scale != 0.f) {
        float xh[8];
        if (xfast) {
          float sv[2][4], yv[2][4];
          staged_smooth4(sm_s, Ks, 2 * c, sv[0], yv[0]);
          staged_smooth4(sm_s, Ks, 2 * c + 1, sv[1], yv[1]);
#pragma unroll
          for (int j = 0; j < 8; ++j) xh[j] = div3(value_of<T>(xv, j), sv[j >> 2][j & 3], yv[j >> 2][j & 3]);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) xh[j] = __fdiv_rn(value_of<T>(xv, j), sm_s[c * 8 + j]);
        }
        packed = w4a8_codes8(xh, scale, ys, qfast);
      }
      store_w4a8_codes8(row_codes, k0 + c * 8, packed);
    }
  }
  cluster.sync();  // 5. peers may still be reading this CTA's partials
#endif
}

// down_act = sum over the K slices of the partial products, in slice order (deterministic).
__global__ void down_act_split_reduce_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t n,
                                             int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = part[i];
  for (int k = 1; k < splits; ++k) s += part[k * n + i];
  out[i] = s;
}

// K slices (blockIdx.y) of a quantize_act kernel: chunks per slice, and the count made exact for it.
inline int chunks_per_slice(int nchunks, int& splits) {
  const int cps = (nchunks + splits - 1) / splits;
  splits = (nchunks + cps - 1) / cps;
  return cps;
}

// What a sliced kernel leaves of down_act: with several slices (and R > 0) the per-slice partial sums [splits, M, R]
// in `part`, for the caller to add in slice order (down_act_slices_end, or W4A8's token kernel on its way), else
// nothing (the kernel wrote down_act itself; `part` undefined).
struct DownActParts {
  at::Tensor part;
  int splits = 1;
  bool pending() const { return part.defined(); }
};

// Where a sliced kernel writes down_act: the workspace of `parts` with several slices (and R > 0), else down_act
// itself (nullptr for R = 0).
float* down_act_slices_begin(at::Tensor& down_act, DownActParts& parts, int splits, int M, int R) {
  if (R == 0) return nullptr;
  if (splits == 1) return down_act.data_ptr<float>();
  parts.part = at::empty({splits, static_cast<int64_t>(M), R}, down_act.options());
  parts.splits = splits;
  return parts.part.data_ptr<float>();
}
void down_act_slices_end(const DownActParts& parts, at::Tensor& down_act, int M, int R, cudaStream_t stream) {
  if (!parts.pending()) return;
  const int64_t n = static_cast<int64_t>(M) * R;
  down_act_split_reduce_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      parts.part.data_ptr<float>(), down_act.data_ptr<float>(), n, parts.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Diagnostics builds: an integer switch read from the environment on every call (so one process can sweep it);
// `fallback` when unset.
#if SVDQ_DIAGNOSTICS
inline int diag_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? std::atoi(v) : fallback;
}
#endif

template <typename T, int RW, int KW, int RP, int kFmt, int kMinBlocks, bool kLean = false>
DownActParts launch_fast(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd, at::Tensor& codes,
                         at::Tensor& scales, at::Tensor& down_act, const float* amax_in, int M, int K, int R,
                         bool act_unsigned, cudaStream_t stream) {
  constexpr int BUF = 64 * KW * 8 + 64 * KW * RP * 2;
  constexpr int SMEM = 2 * BUF;
  const int rows = 16 * RW;
  const int slabs = (M + rows - 1) / rows;
  const int nchunks = K / 64;
  // Split K over blocks until there are >= 4 blocks per SM (load balance; a slice keeps >= 2 rounds of chunks).
  // W4A8's group-max pass: at most one wave of resident blocks instead (kMinBlocks per SM): longer slices and fewer
  // partial sums measured faster there (H200, M = 4608: 17.6 vs 27.6 us at K = 3072, R = 32; csrc/cuda/README.md;
  // at 2 blocks per SM 19.4 us with 3 slices against 27.6 with 8). W4A8's given-amax mode (same loads, 2 blocks per
  // SM) takes the same rule.
  constexpr bool kOneWave = kFmt == kFmtGroupMax || kFmt == kFmtInt8Token;
  int splits = kOneWave ? std::max(1, std::min(kMinBlocks * num_sms() / slabs, nchunks / (2 * KW)))
                        : std::max(1, std::min((4 * num_sms() + slabs - 1) / slabs, nchunks / (2 * KW)));
  // Rank 0 (every format, the group-max pass too: not part of that measurement): >= 4 blocks per SM, slices of one round.
  if (R == 0) splits = std::max(1, std::min((4 * num_sms() + slabs - 1) / slabs, nchunks / KW));
  // W4A8's group-max pass: keep x in L2 for the token kernel when it fits in half of it
  bool keep_x = kFmt == kFmtGroupMax && int64_t(M) * K * int64_t(sizeof(T)) <= l2_bytes() / 2;
#if SVDQ_DIAGNOSTICS
  const int splits_override = diag_int("SVDQUANT_OPS_QA_SPLITS", 0);  // forces the slice count
  if (splits_override > 0) splits = std::max(1, std::min(splits_override, nchunks / KW));
  const int keep_override = diag_int("SVDQUANT_OPS_QA_KEEP", -1);  // 0 / 1 forces keep_x (group-max pass)
  if (keep_override >= 0) keep_x = kFmt == kFmtGroupMax && keep_override == 1;
#endif
  // the lean variant takes keep_x as a template argument: one kernel per cache policy
  auto kernel = quantize_fast_kernel<T, RW, KW, RP, kFmt, kMinBlocks, kLean ? kLeanStream : kNotLean>;
  static PerDeviceOnce smem_attr, smem_attr_keep;  // per kernel and device, on its first (eager) call
  if constexpr (kLean) {
    if (keep_x) kernel = quantize_fast_kernel<T, RW, KW, RP, kFmt, kMinBlocks, kLeanKeep>;
  }
  set_max_dynamic_smem(kLean && keep_x ? smem_attr_keep : smem_attr, kernel, SMEM);
  const int cps = chunks_per_slice(nchunks, splits);
  DownActParts parts;
  float* down_act_dst = down_act_slices_begin(down_act, parts, splits, M, R);
  launch_kernel(kernel, dim3(slabs, splits), dim3(32 * RW * KW), SMEM, stream,
                reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(smooth.data_ptr()),
                R > 0 ? reinterpret_cast<const T*>(pd.data_ptr()) : nullptr,
                kFmt == kFmtGroupMax ? nullptr : static_cast<uint8_t*>(codes.data_ptr()), scales.data_ptr(),
                down_act_dst, amax_in, M, K, R, act_unsigned, cps, keep_x);
  debug_sync(stream, "quantize_act fast");
  return parts;
}

// kLean: the group-max pass's lean variant where RP <= 32 (the ranks it is compiled and checked for).
template <typename T, int RW, int KW, int kFmt, int kMinBlocks = 2, bool kLean = false>
DownActParts dispatch_rp(int RP, const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd,
                         at::Tensor& codes, at::Tensor& scales, at::Tensor& down_act, const float* am, int M, int K,
                         int R, bool act_unsigned, cudaStream_t st) {
  // W4A8's group-max pass (no codes to hold) fits 3 blocks per SM without spills up to RP = 32 (80 registers)
  constexpr int kMinSmall = (kFmt == kFmtGroupMax && RW == 4 && KW == 2) ? 3 : kMinBlocks;
  switch (RP) {
    case 0:
      return launch_fast<T, RW, KW, 0, kFmt, kMinSmall, kLean>(x, smooth, pd, codes, scales, down_act, am, M, K, R,
                                                 act_unsigned, st);
    case 16:
      return launch_fast<T, RW, KW, 16, kFmt, kMinSmall, kLean>(x, smooth, pd, codes, scales, down_act, am, M, K, R,
                                                  act_unsigned, st);
    case 32:
      return launch_fast<T, RW, KW, 32, kFmt, kMinSmall, kLean>(x, smooth, pd, codes, scales, down_act, am, M, K, R,
                                                  act_unsigned, st);
    case 64:
      return launch_fast<T, RW, KW, 64, kFmt, kMinBlocks>(x, smooth, pd, codes, scales, down_act, am, M, K, R,
                                                   act_unsigned, st);
    default:  // 64 accumulators per lane: compiled for one block per SM (at two it spills 256-420 bytes)
      return launch_fast<T, RW, KW, 128, kFmt, 1>(x, smooth, pd, codes, scales, down_act, am, M, K, R,
                                           act_unsigned, st);
  }
}

// The fast kernel's block shape: 64 tokens x 2 k-warps (4 row-warps x 2 k-warps), i.e. proj_down staged once per 64
// tokens. Diagnostics builds also compile, for SVDQUANT_OPS_QA_CFG (read on every call): =2 the earlier 32 tokens x 4
// k-warps shape, =3 the shipped shape compiled for 3 blocks per SM (W4A8's group-max pass ships that for RP <= 32).
template <typename T, int kFmt, bool kLean = false>
DownActParts dispatch_fast(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd, at::Tensor& codes,
                           at::Tensor& scales, at::Tensor& down_act, int M, int K, int R, bool act_unsigned,
                           cudaStream_t st, const float* am = nullptr) {
  const int RP = R == 0 ? 0 : (R <= 16 ? 16 : (R <= 32 ? 32 : (R <= 64 ? 64 : 128)));
#if SVDQ_DIAGNOSTICS
  const int cfg = diag_int("SVDQUANT_OPS_QA_CFG", 0);
  if (cfg == 2) {
    return dispatch_rp<T, 2, 4, kFmt>(RP, x, smooth, pd, codes, scales, down_act, am, M, K, R, act_unsigned, st);
  }
  if (cfg == 3) {
    return dispatch_rp<T, 4, 2, kFmt, 3>(RP, x, smooth, pd, codes, scales, down_act, am, M, K, R, act_unsigned,
                                         st);
  }
#endif
  return dispatch_rp<T, 4, 2, kFmt, 2, kLean>(RP, x, smooth, pd, codes, scales, down_act, am, M, K, R, act_unsigned,
                                              st);
}

// W4A8's group-max pass by the pipelined kernel: one wave of blocks (2 per SM) over M / 64 row slabs x K slices of
// >= 4 chunks where K allows (the last slice may be shorter); down_act's per-slice partial sums go back to the
// caller (DownActParts).
template <typename T, int RP, int S>
DownActParts launch_w4a8_groupmax_pipe(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd,
                                       at::Tensor& gmax, at::Tensor& down_act, int M, int K, int R,
                                       cudaStream_t stream) {
  constexpr int kBytes = PipeSmem<RP, S>::kBytes;
  auto kernel = quantize_w4a8_groupmax_pipe_kernel<T, RP, S>;
  static PerDeviceOnce smem_attr;  // per instantiation and device, on its first (eager) call
  set_max_dynamic_smem(smem_attr, kernel, kBytes);
  const int slabs = (M + 63) / 64;
  const int nchunks = K / 64;
  int splits = std::max(1, std::min(2 * num_sms() / slabs, nchunks / 4));
#if SVDQ_DIAGNOSTICS
  const int splits_override = diag_int("SVDQUANT_OPS_QA_SPLITS", 0);  // forces the slice count
  if (splits_override > 0) splits = std::max(1, std::min(splits_override, nchunks / 2));
#endif
  const int cps = chunks_per_slice(nchunks, splits);
  DownActParts parts;
  float* down_act_dst = down_act_slices_begin(down_act, parts, splits, M, R);
  kernel<<<dim3(slabs, splits), 256, kBytes, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(smooth.data_ptr()),
      R > 0 ? reinterpret_cast<const T*>(pd.data_ptr()) : nullptr, gmax.data_ptr<float>(), down_act_dst, M, K, R, cps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "quantize_act w4a8 group-max (pipelined)");
  return parts;
}

// W4A8's first pass by default: the register-prefetch kernel's lean variant (R <= 32; the register-prefetch kernel
// above), since 2026-12-07: the same bytes, and on an H100 4.94-4.95 against 5.36-5.41 ms per FLUX.1 1024² step in two
// runs of opposite order (benchmarks/results/2026-12-07-h100-twentyfifth-summary.md); =regs keeps the register-prefetch
// kernel. The pipelined one (=pipe) is exact on an H100 (2026-12-06) but 0.89x-0.96x of the register-prefetch
// kernel's speed on FLUX's large shapes (both run under one wave at low occupancy;
// benchmarks/results/2026-12-06-h100-gmax-ab-fold.md).
constexpr int kW4a8GroupMaxDefault = kGmaxLean;

// Which kernel takes W4A8's group-max pass: the pipelined one on Hopper (2 blocks of its ~108 KB of shared memory per
// SM) for R <= 64 with =pipe; the lean register-prefetch variant for R <= 32 with =lean; else the register-prefetch
// kernel. The variable is read first: a bad value is an error on every GPU.
template <typename T>
DownActParts dispatch_w4a8_groupmax(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd,
                                    at::Tensor& codes, at::Tensor& gmax, at::Tensor& down_act, int M, int K, int R,
                                    cudaStream_t st) {
  const int kind = w4a8_groupmax_kind(kW4a8GroupMaxDefault);
  if (kind == kGmaxLean)  // (ranks above 32: the register-prefetch kernel, dispatch_rp)
    return dispatch_fast<T, kFmtGroupMax, true>(x, smooth, pd, codes, gmax, down_act, M, K, R, false, st);
  if (kind != kGmaxPipe || R > 64 || !device_is_sm90())
    return dispatch_fast<T, kFmtGroupMax>(x, smooth, pd, codes, gmax, down_act, M, K, R, false, st);
  if (R == 0) return launch_w4a8_groupmax_pipe<T, 0, kPipeStages>(x, smooth, pd, gmax, down_act, M, K, R, st);
  if (R <= 16) return launch_w4a8_groupmax_pipe<T, 16, kPipeStages>(x, smooth, pd, gmax, down_act, M, K, R, st);
  if (R <= 32) return launch_w4a8_groupmax_pipe<T, 32, kPipeStages>(x, smooth, pd, gmax, down_act, M, K, R, st);
  return launch_w4a8_groupmax_pipe<T, 64, kPipeStages - 1>(x, smooth, pd, gmax, down_act, M, K, R, st);
}

// down_act = x @ proj_down by the portable kernel (a thread per element, K in order).
void launch_down_act_portable(const QuantizeActShape& s, const at::Tensor& x, const at::Tensor& proj_down,
                              at::Tensor& down_act, cudaStream_t stream) {
  SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_cuda_down_act", [&] {
    const int64_t n = s.M * s.R;
    down_act_portable_kernel<scalar_t><<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(
        x.data_ptr<scalar_t>(), proj_down.data_ptr<scalar_t>(), down_act.data_ptr<float>(), s.M, s.K, s.R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Slice limits of the cluster kernel: clusters of 1, 2 or 4 CTAs take slices of at most kClSlice channels (31 KB at
// R = 0 to 72 KB at R = 128: 7 to 3 CTAs per SM); 8 CTAs (the portable cluster limit) at most kClSlice8 (up to ~120
// KB: one per SM).
constexpr int kClSlice = 768, kClSlice8 = 1920;

// The cluster kernel's CTAs per cluster for K: the fewest (1, 2, 4 or 8) that give slices of at most kClSlice
// channels, else 8 slices of at most kClSlice8; slices are multiples of 64 channels. 0: no such split (the two passes
// serve that K).
int w4a8_cluster_size(int64_t K) {
  for (int c = 1; c <= 8; c *= 2) {
    if (K % (64 * c) == 0 && K / c <= kClSlice) return c;
  }
  return K % (64 * 8) == 0 && K / 8 <= kClSlice8 ? 8 : 0;
}

// The cluster launch config of the kernel for C CTAs per cluster and Ks channels per CTA (grid: `clusters` clusters).
inline cudaLaunchConfig_t w4a8_cluster_config(cudaLaunchAttribute& attr, int clusters, int C, int Ks, int RP,
                                              cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters) * C);
  cfg.blockDim = dim3(kClThreads);
  cfg.dynamicSmemBytes = w4a8_cluster_smem(Ks, RP);
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = C;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Launches the cluster kernel, or returns false where a cluster of C CTAs with the largest slice of that C cannot be
// resident on this device (a GPU partitioned by MPS or green contexts, too few SMs per GPC): the caller then runs
// the two passes. Asked once per (instantiation, cluster size, device) through cudaOccupancyMaxActiveClusters, so
// no CUDA call is added to later launches or to a graph capture; a query that fails is not remembered.
template <typename T, int RP>
bool launch_w4a8_cluster(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd, at::Tensor& codes,
                         at::Tensor& scales, at::Tensor& down_act, int M, int K, int R, int C, cudaStream_t stream) {
  auto kernel = quantize_w4a8_cluster_kernel<T, RP>;
  static PerDeviceOnce smem_attr;  // the largest slice's need, once per instantiation and device
  set_max_dynamic_smem(smem_attr, kernel, static_cast<int>(w4a8_cluster_smem(kClSlice8, RP)));
  static PerDeviceOnce fit_once[4];  // C = 1, 2, 4, 8
  static bool fits[4][kMaxDevices];
  const int ci = C == 1 ? 0 : (C == 2 ? 1 : (C == 4 ? 2 : 3));
  const int dev = current_device_index();
  bool asked = true;
  try {
    fit_once[ci]([&] {
      cudaLaunchAttribute attr;
      // the largest slice w4a8_cluster_size gives this C: smaller slices need less shared memory
      const cudaLaunchConfig_t cfg = w4a8_cluster_config(attr, 1, C, C == 8 ? kClSlice8 : kClSlice, RP, stream);
      int n = 0;
      const cudaError_t err = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        throw std::runtime_error(cudaGetErrorString(err));  // not remembered: the next call asks again
      }
      fits[ci][dev] = n > 0;
    });
  } catch (const std::runtime_error&) {
    asked = false;  // the driver could not answer now (e.g. inside a capture): this call takes the two passes
  }
  if (!asked || !fits[ci][dev]) return false;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = w4a8_cluster_config(attr, (M + kClRows - 1) / kClRows, C, K / C, RP, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<const T*>(x.data_ptr()),
                                    reinterpret_cast<const T*>(smooth.data_ptr()),
                                    R > 0 ? reinterpret_cast<const T*>(pd.data_ptr()) : nullptr,
                                    static_cast<int8_t*>(codes.data_ptr()), reinterpret_cast<T*>(scales.data_ptr()),
                                    R > 0 ? down_act.data_ptr<float>() : nullptr, M, K, R, K / C));
  debug_sync(stream, "quantize_act w4a8 cluster");
  return true;
}

template <typename T>
bool dispatch_w4a8_cluster(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd, at::Tensor& codes,
                           at::Tensor& scales, at::Tensor& down_act, int M, int K, int R, int C, cudaStream_t st) {
  if (R == 0) return launch_w4a8_cluster<T, 0>(x, smooth, pd, codes, scales, down_act, M, K, R, C, st);
  if (R <= 16) return launch_w4a8_cluster<T, 16>(x, smooth, pd, codes, scales, down_act, M, K, R, C, st);
  if (R <= 32) return launch_w4a8_cluster<T, 32>(x, smooth, pd, codes, scales, down_act, M, K, R, C, st);
  if (R <= 64) return launch_w4a8_cluster<T, 64>(x, smooth, pd, codes, scales, down_act, M, K, R, C, st);
  return launch_w4a8_cluster<T, 128>(x, smooth, pd, codes, scales, down_act, M, K, R, C, st);
}

// CTAs per cluster when W4A8's one-pass cluster kernel serves this call, else 0: the fast kernel's conditions
// (checked by the caller), Hopper (clusters and distributed shared memory), a K that splits (w4a8_cluster_size), and
// SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1, or =small with M <= kW4a8ClusterSmallTokens (the two passes are the default: see
// the cluster kernel's comment).
int w4a8_cluster_for(const QuantizeActShape& s, W4a8Cluster mode) {
  const bool on = mode == W4a8Cluster::kAll || (mode == W4a8Cluster::kSmall && s.M <= kW4a8ClusterSmallTokens);
  return on && device_is_sm90() ? w4a8_cluster_size(s.K) : 0;
}

// Whether W4A8's token kernel splits K where M is small by default. On: on an H200 (2026-12-06) it passed the GPU
// tests and took the M = 512 calls from 15.3 to 11.6 us (K = 3072) and 34.7 to 20.3 us (K = 12288), a FLUX.1 step's
// quantize_act from 11.64 to 11.24 ms, with the M >= 4096 calls unchanged (0.97x-1.01x, noise);
// SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=0 turns it off.
constexpr bool kW4a8TokenSplitDefault = true;

// Channels per block of W4A8's vector token kernel (a multiple of its 256-channel step). One block per 8 rows leaves
// most SMs idle where M is small (M = 512, FLUX's text stream: 64 blocks of 4 warps on 132 SMs; H100, 2026-12-06:
// 25.0 us at K = 12288 against 9.8 for the group-max pass, which splits K). With the split on, K is split over
// blockIdx.y there until there are ~4 blocks per SM, keeping >= 2 steps per block; only below 2 blocks per SM: at
// M >= 2048 each SM already holds several blocks.
int token_kernel_k_per_block(int M, int K, bool on) {
  const int steps = (K + 255) / 256;
  const int blocks = (M + kTokRows * kTokWarps - 1) / (kTokRows * kTokWarps);
  const int splits = on && blocks < 2 * num_sms()
      ? std::max(1, std::min((4 * num_sms() + blocks - 1) / blocks, steps / 2)) : 1;
  return 256 * ((steps + splits - 1) / splits);
}

// W4A8 (per-token INT8): on Hopper with SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1 (or =small and few tokens), where K splits
// and such a cluster fits, the cluster kernel (one pass). Other fast-path calls: the fast kernel's group-max pass
// (amaxes and down_act), then the token kernel reading those amaxes; portable = down_act by the portable kernel, then
// the token kernel computing the amax itself.
void quantize_w4a8(const QuantizeActShape& s, bool fast, const at::Tensor& x, const at::Tensor& smooth,
                   const at::Tensor& proj_down, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& down_act,
                   cudaStream_t stream) {
  const int64_t G64 = s.K / kInt4Group;
  // read before any launch: a bad value is an error on every W4A8 path, whatever the shape
  const bool token_split = w4a8_token_split(kW4a8TokenSplitDefault);
  const bool token_lean = w4a8_token_lean();
  const W4a8Cluster cluster = w4a8_cluster_mode();
  auto* cd = static_cast<int8_t*>(act_codes.data_ptr());
  const int C = fast ? w4a8_cluster_for(s, cluster) : 0;
  if (C > 0) {  // one pass, where such a cluster fits on this device
    const int M = static_cast<int>(s.M), K = static_cast<int>(s.K), R = static_cast<int>(s.R);
    const bool done = x.scalar_type() == at::kBFloat16
        ? dispatch_w4a8_cluster<c10::BFloat16>(x, smooth, proj_down, act_codes, act_scales, down_act, M, K, R, C,
                                               stream)
        : dispatch_w4a8_cluster<c10::Half>(x, smooth, proj_down, act_codes, act_scales, down_act, M, K, R, C, stream);
    if (done) return;
  }
  at::Tensor gmax;
  DownActParts parts;  // the group-max pass's down_act partial sums, when it split K
  if (fast) {
    const int M = static_cast<int>(s.M), K = static_cast<int>(s.K), R = static_cast<int>(s.R);
    gmax = at::empty({s.M, G64}, x.options().dtype(at::kFloat));
    parts = x.scalar_type() == at::kBFloat16
        ? dispatch_w4a8_groupmax<c10::BFloat16>(x, smooth, proj_down, act_codes, gmax, down_act, M, K, R, stream)
        : dispatch_w4a8_groupmax<c10::Half>(x, smooth, proj_down, act_codes, gmax, down_act, M, K, R, stream);
  } else if (s.R > 0) {
    launch_down_act_portable(s, x, proj_down, down_act, stream);
  }
  const float* gm = fast ? gmax.data_ptr<float>() : nullptr;
  if (fast && aligned16(smooth.data_ptr())) {
    // the token kernel also adds the partial sums (one launch less per call; same order as the reduce kernel)
    const int M = static_cast<int>(s.M), K = static_cast<int>(s.K), G = static_cast<int>(G64);
    const int R = parts.pending() ? static_cast<int>(s.R) : 0;
    const float* part = parts.pending() ? parts.part.data_ptr<float>() : nullptr;
    float* da = parts.pending() ? down_act.data_ptr<float>() : nullptr;
    const int kps = token_kernel_k_per_block(M, K, token_split);
    const dim3 grid((M + kTokRows * kTokWarps - 1) / (kTokRows * kTokWarps), (K + kps - 1) / kps);
    if (x.scalar_type() == at::kBFloat16)
      launch_kernel(token_lean ? quantize_tokens_fast_kernel<c10::BFloat16, true>
                               : quantize_tokens_fast_kernel<c10::BFloat16, false>,
                    grid, dim3(32 * kTokWarps), 0, stream,
                    x.data_ptr<c10::BFloat16>(), smooth.data_ptr<c10::BFloat16>(), gm, cd,
                    act_scales.data_ptr<c10::BFloat16>(), part, da, M, K, G, R, parts.splits, kps);
    else
      launch_kernel(token_lean ? quantize_tokens_fast_kernel<c10::Half, true>
                               : quantize_tokens_fast_kernel<c10::Half, false>,
                    grid, dim3(32 * kTokWarps), 0, stream,
                    x.data_ptr<c10::Half>(), smooth.data_ptr<c10::Half>(), gm, cd, act_scales.data_ptr<c10::Half>(),
                    part, da, M, K, G, R, parts.splits, kps);
  } else {
    down_act_slices_end(parts, down_act, static_cast<int>(s.M), static_cast<int>(s.R), stream);
    const unsigned blocks = static_cast<unsigned>((s.M + 7) / 8);
    SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_cuda_w4a8", [&] {
      quantize_tokens_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          x.data_ptr<scalar_t>(), smooth.data_ptr<scalar_t>(), gm, cd, act_scales.data_ptr<scalar_t>(), s.M, s.K, G64,
          false);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "quantize_act w4a8 tokens");
}

// INT4 / NVFP4, fast path: one pass of the fast kernel (codes, group scales, down_act).
void quantize_groups_fast(const QuantizeActShape& s, const at::Tensor& x, const at::Tensor& smooth,
                          const at::Tensor& proj_down, at::Tensor& act_codes, at::Tensor& act_scales,
                          at::Tensor& down_act, bool act_unsigned, cudaStream_t stream) {
  const int M = static_cast<int>(s.M), K = static_cast<int>(s.K), R = static_cast<int>(s.R);
  const bool nvfp4 = s.precision == Precision::kNvfp4;
  const at::Tensor& pd = proj_down;
  auto& ac = act_codes;
  auto& as = act_scales;
  const bool u = act_unsigned;
  DownActParts parts;
  if (x.scalar_type() == at::kBFloat16)
    parts = nvfp4 ? dispatch_fast<c10::BFloat16, kFmtNvfp4>(x, smooth, pd, ac, as, down_act, M, K, R, false, stream)
                  : dispatch_fast<c10::BFloat16, kFmtInt4>(x, smooth, pd, ac, as, down_act, M, K, R, u, stream);
  else
    parts = nvfp4 ? dispatch_fast<c10::Half, kFmtNvfp4>(x, smooth, pd, ac, as, down_act, M, K, R, false, stream)
                  : dispatch_fast<c10::Half, kFmtInt4>(x, smooth, pd, ac, as, down_act, M, K, R, u, stream);
  down_act_slices_end(parts, down_act, M, R, stream);
}

// INT4 / NVFP4, portable path: a thread per (token, group), then down_act.
void quantize_groups_portable(const QuantizeActShape& s, const at::Tensor& x, const at::Tensor& smooth,
                              const at::Tensor& proj_down, at::Tensor& act_codes, at::Tensor& act_scales,
                              at::Tensor& down_act, bool act_unsigned, cudaStream_t stream) {
  SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_cuda_portable", [&] {
    const int64_t n = s.M * s.G;
    quantize_portable_kernel<scalar_t><<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(
        x.data_ptr<scalar_t>(), smooth.data_ptr<scalar_t>(), act_codes.data_ptr<uint8_t>(), act_scales.data_ptr(),
        s.M, s.K, s.precision == Precision::kNvfp4, act_unsigned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (s.R > 0) launch_down_act_portable(s, x, proj_down, down_act, stream);
}

// The fast kernel's conditions: 16-bit x, K % 64 == 0, R <= 128 with R % 8 == 0, 32-bit-safe indices, x and
// proj_down 16-byte aligned.
bool fast_kernel_ok(const QuantizeActShape& s, const at::Tensor& xc, const at::Tensor& pdc) {
  return !force_portable() && xc.scalar_type() != at::kFloat && s.K % 64 == 0 && s.R <= 128 && s.R % 8 == 0 &&
         s.M < (int64_t(1) << 31) / 64 && s.K < (int64_t(1) << 30) && aligned16(xc.data_ptr()) &&
         (s.R == 0 || aligned16(pdc.data_ptr()));
}

// The outputs for x: W4A8 int8 codes and one scale per token; INT4 / NVFP4 two 4-bit codes per byte and one scale
// per group (NVFP4's in e4m3); down_act in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_act_outputs(const QuantizeActShape& s, const at::Tensor& x) {
  const bool w4a8 = s.precision == Precision::kW4a8;
  auto act_codes = w4a8 ? at::empty(with_last_dim(x, s.K), x.options().dtype(at::kChar))
                        : at::empty(with_last_dim(x, s.K / 2), x.options().dtype(at::kByte));
  const auto scale_dtype = s.precision == Precision::kNvfp4 ? at::kFloat8_e4m3fn : x.scalar_type();
  auto act_scales = at::empty(with_last_dim(x, w4a8 ? 1 : s.G), x.options().dtype(scale_dtype));
  auto down_act = at::empty(with_last_dim(x, s.R), x.options().dtype(at::kFloat));
  return {act_codes, act_scales, down_act};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda(const at::Tensor& x, const at::Tensor& smooth,
                                                                 const at::Tensor& proj_down,
                                                                 c10::string_view precision, bool act_unsigned) {
  const auto s = check_quantize_act(x, smooth, proj_down, precision, act_unsigned);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto sc = smooth.contiguous();
  auto pdc = proj_down.contiguous();
  at::Tensor act_codes, act_scales, down_act;  // plain variables: C++17 lambdas cannot capture structured bindings
  std::tie(act_codes, act_scales, down_act) = empty_act_outputs(s, x);
  if (s.M == 0) return {act_codes, act_scales, down_act};
  cudaStream_t stream = current_stream();

  const bool fast = fast_kernel_ok(s, xc, pdc);
  if (s.precision == Precision::kW4a8) {
    quantize_w4a8(s, fast, xc, sc, pdc, act_codes, act_scales, down_act, stream);
  } else if (fast) {
    quantize_groups_fast(s, xc, sc, pdc, act_codes, act_scales, down_act, act_unsigned, stream);
  } else {
    quantize_groups_portable(s, xc, sc, pdc, act_codes, act_scales, down_act, act_unsigned, stream);
  }
  return {act_codes, act_scales, down_act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_given_amax_cuda(const at::Tensor& x,
                                                                            const at::Tensor& smooth,
                                                                            const at::Tensor& proj_down,
                                                                            const at::Tensor& amax) {
  const auto s = check_quantize_act_given_amax(x, smooth, proj_down, amax);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto sc = smooth.contiguous();
  auto pdc = proj_down.contiguous();
  auto ac = amax.contiguous();
  at::Tensor act_codes, act_scales, down_act;  // plain variables: C++17 lambdas cannot capture structured bindings
  std::tie(act_codes, act_scales, down_act) = empty_act_outputs(s, x);
  if (s.M == 0) return {act_codes, act_scales, down_act};
  cudaStream_t stream = current_stream();
  const float* am = ac.data_ptr<float>();
  if (fast_kernel_ok(s, xc, pdc)) {
    const int M = static_cast<int>(s.M), K = static_cast<int>(s.K), R = static_cast<int>(s.R);
    const DownActParts parts =
        x.scalar_type() == at::kBFloat16
            ? dispatch_fast<c10::BFloat16, kFmtInt8Token>(xc, sc, pdc, act_codes, act_scales, down_act, M, K, R,
                                                          false, stream, am)
            : dispatch_fast<c10::Half, kFmtInt8Token>(xc, sc, pdc, act_codes, act_scales, down_act, M, K, R, false,
                                                      stream, am);
    down_act_slices_end(parts, down_act, M, R, stream);
    return {act_codes, act_scales, down_act};
  }
  if (s.R > 0) launch_down_act_portable(s, xc, pdc, down_act, stream);
  SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_given_amax_cuda", [&] {
    quantize_tokens_kernel<scalar_t><<<static_cast<unsigned>((s.M + 7) / 8), 256, 0, stream>>>(
        xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), am, static_cast<int8_t*>(act_codes.data_ptr()),
        act_scales.data_ptr<scalar_t>(), s.M, s.K, 1, true);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "quantize_act_given_amax tokens");
  return {act_codes, act_scales, down_act};
}

}  // namespace cuda_impl
}  // namespace svdquant
