// The portable GEMM (internal header of ../gemm.cu): a tiled SIMT kernel for every GPU without the Hopper path (and
// for SVDQUANT_OPS_CUDA_PORTABLE=1). Exact dp4a group dot products, then the CPU reference's fp32 operations in the
// same order (__fmul_rn / __fadd_rn, no contraction): bit-identical to the CPU op.
#pragma once

#include <cstdint>

#include "../../formats.h"
#include "io.cuh"

namespace svdquant {
namespace cuda_impl {
namespace gemm {

struct PortableArgs {
  const uint8_t* a_codes;
  const void* a_scales;
  int a_kind;
  const uint8_t* w_codes;
  const void* w_scales;
  int w_kind;
  const float* gscale;
  int64_t gscale_numel;
  const float* down_act;
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
  int w_expanded;  // W4A8: w_codes is the expanded int8 weight [N, K] (gemm_expanded), not packed codes
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

// W4A8 operands of one 64-channel chunk as packed int8 words in W4A8's channel order: activation codes (and
// gemm_expanded's int8 weight) as stored; weight codes times the chunk's group multiplier (the chunk is exactly one
// 64-channel group), reordered.
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
      // W4A8's channel order (formats.h w4a8_pos): positions 16 h .. 16 h + 15 of a 32-channel slice are the low
      // (h = 0) or high (h = 1) nibbles of the slice's 16 bytes, times the group's multiplier
      const int m = mult[row * (K / kInt4Group) + k / kInt4Group];
      const int h = part & 1;
      const uint8_t* src = codes + row * (K / 2) + (k - 16 * h) / 2;
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const int v = sign_extend_nibble((src[b] >> (4 * h)) & 0xF) * m;
        w[b / 4] |= (v & 0xFF) << (8 * (b % 4));
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
      load_chunk_w4a8(p.w_codes, static_cast<const uint8_t*>(p.w_scales), p.N, p.K, n0, kc, !p.w_expanded, Bs);
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
        branch = __fadd_rn(branch, __fmul_rn(p.down_act[m * p.R + r], load_f(p.proj_up, p.up_kind, n * p.R + r)));
      const float b = p.bias != nullptr ? load_f(p.bias, p.bias_kind, n) : 0.f;
      store_out(p.out, p.out_kind, m * p.N + n, __fadd_rn(__fadd_rn(v, branch), b));
    }
  }
}

}  // namespace gemm
}  // namespace cuda_impl
}  // namespace svdquant
