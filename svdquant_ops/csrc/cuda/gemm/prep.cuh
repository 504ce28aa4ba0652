// Step 1 of the Hopper GEMM path (internal header of ../gemm.cu): one memory-bound launch that turns the op's
// packed operands into what the sm90 kernel's TMA loads and wgmma instructions take, in a workspace.
//   INT4:  4-bit codes -> fp8 e4m3 codes for both operands (int4 [-8, 7] and uint4 [0, 15] are exact e4m3 values;
//          a 256-entry shared-memory table maps a byte to its two e4m3 bytes).
//   NVFP4: 4-bit codes -> bf16 values code * scale, exact (an e2m1 value has 2 significant bits, an e4m3 scale 4,
//          their product fits bf16's 8).
//   W4A8:  weights -> int8 code * multiplier (|.| <= 126, exact); the int8 activation codes are used as they are.
// Also the fp32 scales in the layouts the GEMM loads (INT4 activation scales transposed [G, Mp], weight scales
// permuted per output tile so a thread's columns are contiguous; W4A8 per-token scales [Mp]), the low-rank operands
// as bf16 parts (down_act = hi + lo; the branch is hi*up + lo*up (+ hi*up_lo when proj_up is not bf16): fp32-level
// accuracy on bf16 tensor cores), and bias / global scale as padded fp32.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "../../formats.h"
#include "../common.cuh"
#include "io.cuh"

namespace svdquant {
namespace cuda_impl {
namespace gemm {

struct PrepArgs {
  const uint8_t* a_codes;
  const void* a_scales;
  int a_scale_kind;
  const float* down_act;
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
  int skip_b;  // W4A8 with the weights expanded inside the GEMM kernel (diagnostics): no B here
  // gemm_cat's second and later W4A8 weights: B, UP, bias and global scale only, written at the weight's row offset
  // (the pointers and N are the weight's; the first weight's launch prepares the activation operands). W4A8 only:
  // INT4's per-tile weight scales (SW) have no row offset.
  int weights_only;
  int one_unit;  // W4A8 weights: one unit's loads in flight per thread (SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS=1), not four
  int first_row;  // the role of grid row 0 (launch_prep): rows with nothing to do are not launched
  int warp_expand;  // launch_prep: prep_kernel<true> (SVDQUANT_OPS_CUDA_W4A8_EXPAND=warp)
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

// __byte_perm, also as host code: benchmarks/probes/w4a8_expand_check.cu runs the W4A8 expansion on the host.
__host__ __device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return r;
#endif
}

// W4A8: 8 int4 codes (one word, low nibble first) times the multiplier m, as 8 int8 bytes (|.| <= 126 for m <= 18).
// Two codes per word in 16-bit halves: sext(c) * m == (c ^ 8) * m - 8m, and (c ^ 8) * m + ((-8m) mod 256) < 65536
// for any m < 256, so no carry crosses a half and each half's low byte is the product mod 256.
__host__ __device__ __forceinline__ uint2 w4a8_expand8(uint32_t w, uint32_t m) {
  const uint32_t bias = ((0u - 8u * m) & 0xFFu) * 0x10001u;
  const uint32_t x = w ^ 0x88888888u;
  const uint32_t c04 = (x & 0x000F000Fu) * m + bias;  // codes 0 and 4 in the halves' low bytes
  const uint32_t c15 = ((x >> 4) & 0x000F000Fu) * m + bias;
  const uint32_t c26 = ((x >> 8) & 0x000F000Fu) * m + bias;
  const uint32_t c37 = ((x >> 12) & 0x000F000Fu) * m + bias;
  const uint32_t c0145 = byte_perm(c04, c15, 0x6240), c2367 = byte_perm(c26, c37, 0x6240);
  return make_uint2(byte_perm(c0145, c2367, 0x5410), byte_perm(c0145, c2367, 0x7632));
}

// w4a8_expand8 in W4A8's channel order (formats.h w4a8_pos): .x the 4 even channels (low nibbles), .y the 4 odd ones.
__host__ __device__ __forceinline__ uint2 w4a8_expand8_split(uint32_t w, uint32_t m) {
  const uint2 e = w4a8_expand8(w, m);
  return make_uint2(byte_perm(e.x, e.y, 0x6420), byte_perm(e.x, e.y, 0x7531));
}

// One 16-code unit (half h of a 32-channel slice: its words a, b = channels 16 h + 0..7, + 8..15) of a W4A8 weight,
// expanded, as the 16 bytes the thread stores at the unit's own place (bytes 16 h .. 16 h + 15 of the slice's 32)
// in W4A8's channel order: the slice's 16 even channels come first, so the unit of half 0 stores the evens of both
// halves and the unit of half 1 the odds; the two threads of a slice (lanes 2i, 2i + 1, units 2j, 2j + 1) swap the
// halves they hold with one shuffle. Both threads of the pair must call it (a pair shuffle: the others may differ).
// kWarp: every lane of the warp calls it (expand_w4a8_units<kU, true>), so the exchange is a full-warp shuffle; the pair
// mask otherwise compiles into a convergence check (MATCH.ANY, REDUX, VOTE) around each shuffle.
template <bool kWarp = false>
__device__ __forceinline__ uint4 expand_unit_w4a8_ordered(uint2 in, uint32_t m, uint32_t h) {
  const uint2 a = w4a8_expand8_split(in.x, m), b = w4a8_expand8_split(in.y, m);
  const uint32_t pair = kWarp ? 0xffffffffu : 3u << ((threadIdx.x & 31) & 30);
  // half 0 keeps its evens and sends its odds; half 1 keeps its odds and sends its evens
  const uint32_t s0 = h ? a.x : a.y, s1 = h ? b.x : b.y;
  const uint32_t r0 = __shfl_xor_sync(pair, s0, 1), r1 = __shfl_xor_sync(pair, s1, 1);
  return h ? make_uint4(r0, r1, a.y, b.y) : make_uint4(a.x, b.x, r0, r1);
}

// W4A8 weights expanded, by the prep kernel for its GEMM and ahead of their GEMM (svdquant::expand_w4a8_weight, and
// gemm_expanded's next weight): 16 codes of one row times their group's integer multiplier (in [1, 18]), as int8
// (|code * m| <= 126) in W4A8's channel order, unit by unit: unit u is 16 codes (8 bytes) -> 16 int8 bytes. Units u
// and u ^ 1 are the two halves of one 32-channel slice, held by lanes l and l ^ 1 (callers stride by multiples of 32
// from a warp-aligned first unit; K % 64 == 0 keeps rows even in units). A row holds K / 16 units, a
// multiple of 4 (K % 64 == 0), so over the whole weight unit u reads codes bytes [8 u, 8 u + 8), multiplier u / 4 and
// writes bytes [16 u, 16 u + 16): a flat map. Consecutive lanes take consecutive units, so a warp's store writes 512
// contiguous bytes (with 32-code units, two 16-byte stores per lane 32 bytes apart, each store instruction half-filled
// every sector it touched and the expansion ran at 0.37x of prep's: results/2026-12-06-h100-ahead-ab.md).
struct ExpandJob {
  const uint8_t* codes;  // [N, K / 2], 8-byte aligned
  const uint8_t* mult;   // [N, K / 64]
  uint8_t* out;          // [N, K], 16-byte aligned
  uint32_t units;        // N * K / 16 (0: nothing to expand)
  int warp;              // launch_expand: expand_w4a8_kernel<true> (SVDQUANT_OPS_CUDA_W4A8_EXPAND=warp)
};

__device__ __forceinline__ uint2 ld_nc_v2(const void* p) {  // read once: no L1 allocation
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Units first, first + stride, ...: kU units' loads in flight before any is expanded (the GEMM kernel's expanding
// warps are few, so their bandwidth comes from loads in flight per thread).
// kWarp (the default since 2026-12-07; SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair turns it off): the loop and the pair exchange
// warp-uniform. Every lane of a warp runs every step (out-of-range units load zeros and store nothing), so the
// exchange is a full-warp shuffle without the convergence check the pair mask costs per unit (~71 SASS instructions
// per unit in expand_w4a8_kernel, sm_90a; prep takes the same ~4.95 ms per FLUX.1 step on an H100 and an H200, so it
// is not bound by memory on the H200). The same bytes in the same places. Needs first - lane warp-aligned and stride
// a multiple of 32, as every caller gives them.
template <int kU, bool kWarp = false>
__device__ __forceinline__ void expand_w4a8_units(const ExpandJob& j, uint32_t first, uint32_t stride) {
  const uint32_t lane = kWarp ? threadIdx.x & 31 : 0u;  // kWarp: the loop runs on the warp's first unit, uniform
  for (uint32_t u0 = first - lane; u0 < j.units; u0 += kU * stride) {
    uint2 c[kU];
    uint32_t m[kU];
#pragma unroll
    for (int i = 0; i < kU; ++i) {
      const uint32_t u = u0 + lane + i * stride;
      if constexpr (kWarp) c[i] = make_uint2(0u, 0u), m[i] = 0u;
      if (u < j.units) c[i] = ld_nc_v2(j.codes + uint64_t(u) * 8), m[i] = j.mult[u >> 2];
    }
#pragma unroll
    for (int i = 0; i < kU; ++i) {
      const uint32_t u = u0 + lane + i * stride;
      if constexpr (kWarp) {
        const uint4 v = expand_unit_w4a8_ordered<true>(c[i], m[i], u & 1);
        if (u < j.units) *reinterpret_cast<uint4*>(j.out + uint64_t(u) * 16) = v;
      } else if (u < j.units) {
        *reinterpret_cast<uint4*>(j.out + uint64_t(u) * 16) = expand_unit_w4a8_ordered(c[i], m[i], u & 1);
      }
    }
  }
}

// The kernel of its own: kExpandUnitsPerThread units per thread and step (launch_expand sizes its grid by it);
// kWarp: expand_w4a8_units<kU, true> (a template argument, so that the default kernel's code stays as it was).
constexpr int kExpandUnitsPerThread = 4;
template <bool kWarp = false>
__global__ void expand_w4a8_kernel(const ExpandJob j) {
  const uint32_t first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  expand_w4a8_units<kExpandUnitsPerThread, kWarp>(j, first, stride);
}

// One segment of a value split into bf16 parts for the fp32-accurate branch: the low part (v - bf16(v)) in segment
// `lo_seg`, the high part bf16(v) in the others.
__device__ __forceinline__ __nv_bfloat16 bf16_split_part(float v, int seg, int lo_seg) {
  const float hi = __bfloat162float(__float2bfloat16_rn(v));
  return __float2bfloat16_rn(seg == lo_seg ? v - hi : v);
}

// Outputs kk0 .. kk0 + 7 of one row of a split branch operand, from v[i] = the row's source value of output kk0 + i
// (0 past nseg * R): bf16 parts, segment seg(kk) = kk / R (nseg <= 3, so two compares), lo_seg the low part.
__device__ __forceinline__ uint4 split_unit(const float v[8], int kk0, int R, int lo_seg) {
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int kk = kk0 + i, seg = (kk >= R) + (kk >= 2 * R);
    const __nv_bfloat16 b = bf16_split_part(v[i], seg, lo_seg);
    h[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
}

// One 16-byte unit (8 bf16) of LA [M, KL] or UP [N, KL] (KL % 64 == 0: a unit lies in one row). `vec`: R % 8 == 0 and
// a 16-byte aligned f32 / f16 / bf16 source, so the unit lies in one segment and reads 8 aligned source values.
__device__ __forceinline__ uint4 branch_unit(const void* src, int kind, uint32_t row, int kk0, int R, int nseg,
                                             int lo_seg, bool vec) {
  float v[8];
  const int lim = nseg * R;
  if (vec) {
    if (kk0 >= lim) return make_uint4(0u, 0u, 0u, 0u);  // bf16 +0, as bf16_split_part(0) gives
    const int seg = (kk0 >= R) + (kk0 >= 2 * R);
    const uint32_t i0 = row * R + (kk0 - seg * R);
    if (kind == kF32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(src) + i0);
      const float4 a = __ldg(q), b = __ldg(q + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(src) + i0));
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint16_t bits = static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2)));
        v[i] = kind == kF16 ? static_cast<float>(c10::Half(bits, c10::Half::from_bits()))
                            : static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));  // as load_f
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int kk = kk0 + i, seg = (kk >= R) + (kk >= 2 * R);
      v[i] = kk < lim ? load_f(src, kind, int64_t(row) * R + (kk - seg * R)) : 0.f;
    }
  }
  return split_unit(v, kk0, R, lo_seg);
}

// The small operands, for threads (tid, stride): LA then UP in 16-byte units, then SA, SW, bias and global scale one
// element at a time (one flat index over them). Index math in 32 bits (the host sends larger problems to the
// portable path).
__device__ __forceinline__ void prep_small(const PrepArgs& p, uint32_t tid, uint32_t stride) {
  const uint32_t M = static_cast<uint32_t>(p.M), N = static_cast<uint32_t>(p.N), Mp = static_cast<uint32_t>(p.Mp);
  const uint32_t G = static_cast<uint32_t>(p.G), Np = static_cast<uint32_t>(p.Np);
  const uint32_t ku = static_cast<uint32_t>(p.KL) / 8;  // units per row
  const uint32_t nLA = M * ku, nU = nLA + N * ku;
  const bool r8 = p.R % 8 == 0;
  const bool vla = r8 && (reinterpret_cast<uintptr_t>(p.down_act) & 15u) == 0;
  const bool vup = r8 && (reinterpret_cast<uintptr_t>(p.proj_up) & 15u) == 0 &&
                   (p.up_kind == kF32 || p.up_kind == kF16 || p.up_kind == kBF16);
  for (uint32_t j = (p.weights_only ? nLA : 0u) + tid; j < nU; j += stride) {
    if (j < nLA) {  // down_act: segments 0 and 2 the high part, 1 the low part
      const uint32_t m = j / ku, k8 = j - m * ku;
      reinterpret_cast<uint4*>(p.LA)[j] = branch_unit(p.down_act, kF32, m, 8 * k8, p.R, p.nseg, 1, vla);
    } else {  // proj_up: segments 0 and 1 the high part, 2 the low part
      const uint32_t ju = j - nLA, n = ju / ku, k8 = ju - n * ku;
      reinterpret_cast<uint4*>(p.UP)[ju] = branch_unit(p.proj_up, p.up_kind, n, 8 * k8, p.R, p.nseg, 2, vup);
    }
  }
  const uint32_t nSA = (p.nvfp4 || p.weights_only) ? 0u : (p.w4a8 ? Mp : G * Mp);
  const uint32_t swrow = static_cast<uint32_t>(p.n_tiles * p.SWP);
  const uint32_t nSW = (p.nvfp4 || p.w4a8) ? 0u : G * swrow;
  const uint32_t total = nSA + nSW + 2 * Np;
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
    if (j < Np) {
      p.biasf[j] = (p.bias != nullptr && j < N) ? load_f(p.bias, p.bias_kind, j) : 0.f;
      continue;
    }
    j -= Np;
    p.gsf[j] = j < N ? (p.gscale != nullptr ? p.gscale[p.gscale_numel == 1 ? 0 : j] : 1.f) : 0.f;
  }
}

// Grid rows by role (row = blockIdx.y + first_row): 0 activation codes, 1 weight codes (blocks stride over 16-channel
// units), 2 the small operands. kWarpExpand: W4A8 weights by expand_w4a8_units<kU, true>, except with one unit in flight
// (SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS=1 keeps the pair loop); a template argument, so that each kernel's code is its
// own (a run-time flag moved the pair kernel's register allocation). The default since 2026-12-07: prep_kernel<true>.
template <bool kWarpExpand = false>
__global__ void prep_kernel(const PrepArgs p) {
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh)
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t K = static_cast<uint32_t>(p.K), G = static_cast<uint32_t>(p.G);
  const uint32_t row = blockIdx.y + static_cast<uint32_t>(p.first_row);
  if (row == 0 && p.weights_only) return;
  if (row < 2 && p.w4a8) {
    if (row == 1 && !p.skip_b) {
      // kExpandUnitsPerThread units' loads in flight per thread (one at a time kept too few bytes in flight to
      // reach the memory's bandwidth: ~55 % of it on an H200, 4.9 ms per FLUX.1 step)
      const ExpandJob j{p.w_codes, static_cast<const uint8_t*>(p.w_scales), p.B, static_cast<uint32_t>(p.N) * (K / 16),
                        kWarpExpand};
      if (p.one_unit) {
        expand_w4a8_units<1>(j, tid, stride);
      } else {
        expand_w4a8_units<kExpandUnitsPerThread, kWarpExpand>(j, tid, stride);
      }
    }
    return;
  }
  if (row < 2) {
    __shared__ uint16_t lut[256];
    const bool uns = row == 0 && p.act_unsigned;
    for (uint32_t b = threadIdx.x; b < 256; b += blockDim.x)
      lut[b] = static_cast<uint16_t>(e4m3_of_nibble(b & 0xF, uns) | (e4m3_of_nibble(b >> 4, uns) << 8));
    __syncthreads();
    if (row == 0) {
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
  prep_small(p, tid, stride);
}

}  // namespace gemm
}  // namespace cuda_impl
}  // namespace svdquant
