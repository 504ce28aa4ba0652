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

// blockIdx.y = 0: activation codes, 1: weight codes (blocks stride over 16-channel units), 2: the scales, branch
// operands, bias and global scale (one flat index over all of them). Index math in 32 bits (the host sends larger
// problems to the portable path).
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
    if (j < nLA) {  // down_act: segments 0 and 2 the high part, 1 the low part
      const uint32_t m = j / KL;
      const int kk = static_cast<int>(j % KL);
      p.LA[j] = kk < p.nseg * p.R ? bf16_split_part(p.down_act[m * p.R + kk % p.R], kk / p.R, 1)
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

}  // namespace gemm
}  // namespace cuda_impl
}  // namespace svdquant
