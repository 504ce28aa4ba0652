// CUDA implementation of svdquant::w4a16_linear (semantics: ../cpu/w4a16.cpp; design: README.md "w4a16_linear").
//   M <= 8 tokens (sm_80+): w4a16_gemv_kernel, one launch that streams the packed 4-bit weights once and never
//                           builds a 16-bit weight. Codes go to tensor cores as exact 16-bit integers and the groups'
//                           affine rule is applied per 64-group in fp32: sum_k x*(c*s + z) = s*sum_k x*c + z*sum_k x.
//   M > 8 (or GPUs older than sm_80 or with less shared memory per block than the GEMV needs, e.g. sm_86/89/120):
//                           w4a16_dequant_kernel writes the weight in x's dtype (each weight rounded once to that
//                           dtype), then cuBLAS (at::mm / at::addmm).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <type_traits>

#include "../checks.h"
#include "common.cuh"
#include "ops_cuda.h"

namespace svdquant {
namespace cuda_impl {
namespace w4a16 {
namespace {

constexpr int kGemvMaxM = 8;     // tokens per GEMV launch: the N dimension of one m16n8k16 MMA
constexpr int kMaxWarps = 16;    // K slices per block (more slices: a warp takes several in turn)
constexpr int kPipe = 2;  // row tiles in a warp's registers: the next tile's loads overlap this one's math (deeper
                          // pipelines measured slower on an H200: more code in the loop, more scattered requests)
constexpr int kRedCap = 96 << 10;  // bytes of per-tile partial sums a block may keep in shared memory
constexpr int kTileBytes = 8 * 16 * 4;  // one warp's partial 16 x 8 tile (fp32)

// Groups of one K slice (4: 128 bytes of codes per row, one 8-byte load of a row's 16-bit scales) and bf16 pieces of
// one x value (fp32 x is split exactly into three, and takes one-group slices to keep registers).
template <typename XT>
constexpr int slice_groups() {
  return std::is_same_v<XT, float> ? 1 : 4;
}
template <typename XT>
constexpr int x_pieces() {
  return std::is_same_v<XT, float> ? 3 : 1;
}
// Shared memory of one warp's slice: B fragments ([group][piece][half][lane][4 words]) and sum_k x per group for
// the lane's tokens 2q, 2q + 1 ([group][lane][2]).
template <typename XT>
constexpr int slice_smem_bytes() {
  return slice_groups<XT>() * (x_pieces<XT>() * 2 * 32 * 16 + 32 * 8);
}

enum BiasKind : int { kNoBias = 0, kBiasF32 = 1, kBiasF16 = 2, kBiasBF16 = 3 };

int bias_kind(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return kNoBias;
  switch (bias->scalar_type()) {
    case at::kFloat: return kBiasF32;
    case at::kHalf: return kBiasF16;
    default: return kBiasBF16;
  }
}

__device__ __forceinline__ float load_bias(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kBiasF32: return static_cast<const float*>(p)[i];
    case kBiasF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBiasBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return 0.f;
  }
}

// Streaming loads of codes: read once, so kept out of L1.
__device__ __forceinline__ uint2 ld_stream_u2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}


// Nibbles s and s + 4 of a 32-bit word of codes (bits 4s and 16 + 4s after the shift) as two exact 16-bit floats:
// OR-ing a nibble into the mantissa of 1024 (fp16) or 128 (bf16) gives 1024 + c / 128 + c, minus that is c.
template <bool kHalf>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w) {
  constexpr uint32_t kMagic = kHalf ? 0x64006400u : 0x43004300u;
  constexpr uint32_t kMinusMagic = kHalf ? 0xE400E400u : 0xC300C300u;
  constexpr uint32_t kOne = kHalf ? 0x3C003C00u : 0x3F803F80u;
  uint32_t r, d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(kMagic));  // (w & mask) | magic
  if constexpr (kHalf) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(r), "r"(kOne), "r"(kMinusMagic));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(r), "r"(kOne), "r"(kMinusMagic));
  }
  return d;
}

template <bool kHalf>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (kHalf) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t bits16(c10::BFloat16 v) { return v.x; }
__device__ __forceinline__ uint32_t bits16(c10::Half v) { return v.x; }
__device__ __forceinline__ uint32_t pack16(uint32_t lo, uint32_t hi) { return lo | (hi << 16); }

// Element h (0: low half, 1: high half) of a word of two bf16 / fp16 values, as fp32 (exact).
template <typename XT>
__device__ __forceinline__ float half_word_to_float(uint32_t w, int h) {
  const uint32_t b = (w >> (16 * h)) & 0xFFFFu;
  if constexpr (std::is_same_v<XT, c10::Half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  } else {
    return __uint_as_float(b << 16);
  }
}

// One row tile's loads for a warp's K slice: codes of rows g and g + 8, and one scale or zero per lane and group
// (lanes 0..15: scales of the tile's 16 rows, lanes 16..31: zeros; 16-bit ones packed two per register), shuffled
// to the lanes that use them at compute time.
//   kWide (a full 4-group slice of 16-bit x): per row, lane q loads bytes 16q .. 16q + 15 and 64 + 16q .. of the
//     slice's 128, so that one instruction reads 64 contiguous bytes of each row (8-byte loads, 32 bytes per row
//     and instruction, measured 10-50 % slower on an H200); w[i][r] holds half q % 2 of group 2i + q / 2 of row
//     g (r = 0) or g + 8 (r = 1), and lanes q, q ^ 2 swap the second 8 bytes before the MMAs (wide_group).
//   otherwise: c[u][r], 16 codes of group u (bytes 8q .. 8q + 7 of the group).
template <typename ST, int S, bool kWide>
struct TileLoads {
  static constexpr int kSzRegs = sizeof(ST) == 2 ? (S + 1) / 2 : S;
  static constexpr int kC = kWide ? 1 : S;
  uint4 w[kWide ? 2 : 1][2];
  uint2 c[kC][2];
  uint32_t sz[kSzRegs];
};

// Byte offset / 8 inside group u of the 8 bytes lane q holds (kWide after the swap; plain: q): x is staged to match.
__device__ __forceinline__ int wide_slot(int u, int q) { return 2 * (q % 2) + ((u % 2) ^ (q / 2)); }

// kWide: 16 codes of group 2i + (odd) from the lane's 16 loaded bytes v and the partner's (lane q ^ 2) last 8.
__device__ __forceinline__ uint2 wide_group(const uint4& v, uint32_t rz, uint32_t rw, bool odd, bool hi_lane) {
  return odd != hi_lane ? make_uint2(rz, rw) : make_uint2(v.x, v.y);
}

template <typename ST>
__device__ __forceinline__ float sz_value(const uint32_t* regs, int u) {
  if constexpr (sizeof(ST) == 4) {
    return __uint_as_float(regs[u]);
  } else {
    const uint32_t b = (regs[u / 2] >> (16 * (u % 2))) & 0xFFFFu;
    if constexpr (std::is_same_v<ST, c10::Half>) {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
    } else {
      return __uint_as_float(b << 16);
    }
  }
}

template <typename ST>
__device__ __forceinline__ uint32_t st_bits(ST v) {
  if constexpr (sizeof(ST) == 4) {
    return __float_as_uint(v);
  } else {
    return v.x;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV kernel (M <= 8 tokens). Persistent: block b owns a contiguous range of 16-row tiles (balanced over the grid)
// and all of K; its warps own K slices of S groups (warp w: slices w, w + W, ...). Per slice, a warp
//   1. writes x[:, slice] once into its shared-memory area as m16n8k16 B fragments (x pairs permuted to match the
//      A registers below; fp32 x split exactly into three bf16 pieces), with sum_k x per (group, token);
//   2. streams its block's row tiles (the first tile's loads are issued before step 1), the next tile's loads in
//      flight (codes straight from HBM and the groups' scales / zeros), and per tile and group runs four MMAs of
//      16 rows x 64 codes x 8 tokens (codes as exact bf16 / fp16 integers, fp32 accumulation), then
//      acc += scale * dot + zero * sum_k x in fp32 (the identity sum x (c s + z) = s sum x c + z sum x);
//   3. adds the tile's 16 x 8 partial into its own slot of shared memory.
// Finally the block adds each tile's slice partials in warp order (deterministic), + bias, and stores.
// MMA roles: A = codes (rows = output channels), B = x (columns = tokens; tokens >= M read token M - 1 and are
// discarded). Thread (g = lane / 4, q = lane % 4) holds rows g and g + 8 and 16 codes of each group: its A
// registers are the nibble pairs (c[s], c[s + 4]) of each 32-bit word of codes.
// kFull: every slice has S groups and the scales / zeros allow one vector load per tile (the host checks both).
// ---------------------------------------------------------------------------------------------------------------
// Where a row's weights and output live. One weight (w4a16_linear): rows 0..N-1 of one tensor each. A group
// (w4a16_linear_group): the weights' rows one after another, N_i rows each (N_i % 16 == 0, so that a 16-row tile lies
// in one weight), located by a binary search over the groups' row ends (uniform across a warp for the rows of one
// tile). The kernel parameters hold the table (CUDA-graph safe: captured by value).
constexpr int kGroupMax = 48;  // weights per grouped launch: the table stays well under 4 KB of kernel parameters

struct GemvGroup {
  int count;
  int row_end[kGroupMax];  // exclusive end of weight i's rows in the concatenation
  const uint8_t* codes[kGroupMax];
  const void* scales[kGroupMax];
  const void* zeros[kGroupMax];
  const void* bias[kGroupMax];  // nullptr: none
  void* y[kGroupMax];
};

// The weight holding a tile's rows: its tensors, and the tile's first row counted from its first row.
template <typename ST>
struct WeightPart {
  const uint8_t* codes;
  const ST* scales;
  const ST* zeros;
  int64_t row0;
};

template <typename XT, typename ST>
struct OneWeight {
  const uint8_t* __restrict__ codes;
  const ST* __restrict__ scales;
  const ST* __restrict__ zeros;
  const void* __restrict__ bias;
  XT* __restrict__ y;
  int N;
  __device__ __forceinline__ WeightPart<ST> part(int64_t) const { return {codes, scales, zeros, 0}; }
  __device__ __forceinline__ float bias_at(int kind, int64_t n) const { return load_bias(bias, kind, n); }
  __device__ __forceinline__ void store(int t, int64_t n, XT v) const { y[static_cast<int64_t>(t) * N + n] = v; }
};

template <typename XT, typename ST>
struct GroupWeights {
  const GemvGroup& g;
  __device__ __forceinline__ int find(int64_t n) const {  // the weight holding row n
    int lo = 0, hi = g.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (n < g.row_end[mid]) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }
  __device__ __forceinline__ int64_t row0(int i) const { return i == 0 ? 0 : g.row_end[i - 1]; }
  __device__ __forceinline__ WeightPart<ST> part(int64_t n0) const {
    const int i = find(n0);
    return {g.codes[i], static_cast<const ST*>(g.scales[i]), static_cast<const ST*>(g.zeros[i]), row0(i)};
  }
  __device__ __forceinline__ float bias_at(int kind, int64_t n) const {
    const int i = find(n);
    return g.bias[i] != nullptr ? load_bias(g.bias[i], kind, n - row0(i)) : 0.f;
  }
  __device__ __forceinline__ void store(int t, int64_t n, XT v) const {
    const int i = find(n);
    const int64_t r0 = row0(i);
    static_cast<XT*>(g.y[i])[static_cast<int64_t>(t) * (g.row_end[i] - r0) + (n - r0)] = v;
  }
};

template <typename XT, typename ST, bool kFull, typename Src>
__device__ __forceinline__ void gemv_body(const XT* __restrict__ x, const Src& wsrc, int bias_kind, int M, int N,
                                          int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool kF32 = std::is_same_v<XT, float>;
  constexpr bool kHalf = std::is_same_v<XT, c10::Half>;  // fp16 MMA; bf16 MMA for bf16 and fp32 x
  constexpr int kPieces = x_pieces<XT>();
  constexpr int S = slice_groups<XT>();
  constexpr bool kWide = kFull && S == 4;
  using Loads = TileLoads<ST, S, kWide>;
  extern __shared__ __align__(16) uint8_t smem[];

  const int G = K / kW4a16Group;
  const int n_slices = (G + S - 1) / S;
  const int W = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const bool hi_lane = q >= 2;
  const int tiles = (N + 15) / 16;
  const int tile_begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * tiles / gridDim.x);
  const int T = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * tiles / gridDim.x) - tile_begin;
  const int tok = min(g, M - 1);
  const int64_t last = N - 1;
  const int64_t row_stride = K / 2;

  uint8_t* slice_smem = smem + warp * slice_smem_bytes<XT>();
  uint4* xb = reinterpret_cast<uint4*>(slice_smem);                                  // [u][piece][half][lane]
  float2* xsum = reinterpret_cast<float2*>(slice_smem + S * kPieces * 2 * 32 * 16);  // [u][lane]
  float* red = reinterpret_cast<float*>(smem + W * slice_smem_bytes<XT>());          // [tile][warp][token][row]
  for (int i = threadIdx.x; i < T * W * 8 * 16; i += blockDim.x) red[i] = 0.f;
  // The bias of the thread's first output (epilogue element threadIdx.x: row threadIdx.x % rows) is read now, so
  // that its latency is not added at the end; the epilogue's other reads of a row then hit L1.
  const int rows = T * 16;
  const int64_t n_first = static_cast<int64_t>(tile_begin) * 16 + (rows > 0 ? threadIdx.x % rows : 0);
  const float bias_first =
      static_cast<int>(threadIdx.x) < rows * M && n_first < N ? wsrc.bias_at(bias_kind, n_first) : 0.f;
  __syncthreads();

  for (int slice = warp; slice < n_slices; slice += W) {
    const int grp0 = slice * S;

    // Row tiles stream through two register buffers: the next tile's loads are in flight during a tile's math.
    Loads ld[kPipe];
#pragma unroll
    for (int b = 0; b < kPipe; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        ld[b].w[0][r] = make_uint4(0, 0, 0, 0);
        if constexpr (kWide) ld[b].w[1][r] = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < Loads::kC; ++u) ld[b].c[u][r] = make_uint2(0, 0);  // groups past K add nothing
      }
#pragma unroll
      for (int r = 0; r < Loads::kSzRegs; ++r) ld[b].sz[r] = 0u;
    }
    auto load_tile = [&](Loads& l, int tile) {
      const int64_t n0 = static_cast<int64_t>(tile) * 16;
      const WeightPart<ST> pt = wsrc.part(n0);
      const uint8_t* __restrict__ codes = pt.codes;
      const ST* __restrict__ scales = pt.scales;
      const ST* __restrict__ zeros = pt.zeros;
      const int64_t w0 = pt.row0;
      const int64_t ra = min(n0 + g, last) - w0, rb = min(n0 + g + 8, last) - w0, rs = min(n0 + lane % 16, last) - w0;
      const uint8_t* pa = codes + ra * row_stride + grp0 * 32;
      const uint8_t* pb = codes + rb * row_stride + grp0 * 32;
      const ST* psz = (lane < 16 ? scales : zeros) + rs * G + grp0;
      if constexpr (kWide) {
        l.w[0][0] = ld_stream_u4(pa + 16 * q), l.w[1][0] = ld_stream_u4(pa + 64 + 16 * q);
        l.w[0][1] = ld_stream_u4(pb + 16 * q), l.w[1][1] = ld_stream_u4(pb + 64 + 16 * q);
      } else {
#pragma unroll
        for (int u = 0; u < S; ++u) {
          if (kFull || grp0 + u < G) {
            l.c[u][0] = ld_stream_u2(pa + u * 32 + 8 * q);
            l.c[u][1] = ld_stream_u2(pb + u * 32 + 8 * q);
          }
        }
      }
      if constexpr (kFull && sizeof(ST) == 2 && S == 4) {  // 4 consecutive 16-bit values, 8-byte aligned
        const uint2 v = *reinterpret_cast<const uint2*>(psz);
        l.sz[0] = v.x, l.sz[1] = v.y;
      } else if constexpr (kFull && sizeof(ST) == 4 && S == 4) {  // 16-byte aligned
        const uint4 v = *reinterpret_cast<const uint4*>(psz);
        l.sz[0] = v.x, l.sz[1] = v.y, l.sz[2] = v.z, l.sz[3] = v.w;
      } else {
#pragma unroll
        for (int u = 0; u < S; ++u) {
          if (kFull || grp0 + u < G) {
            const uint32_t b = st_bits(psz[u]);
            if constexpr (sizeof(ST) == 4) {
              l.sz[u] = b;
            } else {
              l.sz[u / 2] = u % 2 == 0 ? b : (l.sz[u / 2] & 0xFFFFu) | (b << 16);
            }
          }
        }
      }
    };
    auto compute_tile = [&](const Loads& l, float (&acc)[4]) {
      uint2 c[S][2];
      if constexpr (kWide) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint4& v = l.w[i][r];
            const uint32_t rz = __shfl_xor_sync(0xffffffffu, v.z, 2), rw = __shfl_xor_sync(0xffffffffu, v.w, 2);
            c[2 * i][r] = wide_group(v, rz, rw, false, hi_lane);
            c[2 * i + 1][r] = wide_group(v, rz, rw, true, hi_lane);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < S; ++u) c[u][0] = l.c[u][0], c[u][1] = l.c[u][1];
      }
#pragma unroll
      for (int u = 0; u < S; ++u) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int pc = 0; pc < kPieces; ++pc) {
          const uint4 b0 = xb[((u * kPieces + pc) * 2 + 0) * 32 + lane];
          const uint4 b1 = xb[((u * kPieces + pc) * 2 + 1) * 32 + lane];
          const uint32_t bf[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t wa = j < 2 ? c[u][0].x : c[u][0].y;
            const uint32_t wb = j < 2 ? c[u][1].x : c[u][1].y;
            const int sh = 8 * (j % 2);  // A pairs 2j, 2j + 1 of the word: shifts 0 and 4, or 8 and 12
            mma16816<kHalf>(d, nibble_pair<kHalf>(wa >> sh), nibble_pair<kHalf>(wb >> sh),
                            nibble_pair<kHalf>(wa >> (sh + 4)), nibble_pair<kHalf>(wb >> (sh + 4)), bf[2 * j],
                            bf[2 * j + 1]);
          }
        }
        const float2 xs = xsum[u * 32 + lane];
        const float szv = sz_value<ST>(l.sz, u);
        const float sa = __shfl_sync(0xffffffffu, szv, g), sb = __shfl_sync(0xffffffffu, szv, g + 8);
        const float za = __shfl_sync(0xffffffffu, szv, g + 16), zb = __shfl_sync(0xffffffffu, szv, g + 24);
        acc[0] = fmaf(sa, d[0], fmaf(za, xs.x, acc[0]));
        acc[1] = fmaf(sa, d[1], fmaf(za, xs.y, acc[1]));
        acc[2] = fmaf(sb, d[2], fmaf(zb, xs.x, acc[2]));
        acc[3] = fmaf(sb, d[3], fmaf(zb, xs.y, acc[3]));
      }
    };
    // 3. this warp's slot of tile t: tokens 2q, 2q + 1 x rows g, g + 8
    auto add_partial = [&](int t, const float (&acc)[4]) {
      float* r = red + (t * W + warp) * (8 * 16) + (2 * q) * 16 + g;
      r[0] += acc[0], r[16] += acc[1], r[8] += acc[2], r[24] += acc[3];
    };

    // 2. (first) the first tile's loads go out before step 1, so that their latencies overlap
    if (T > 0) load_tile(ld[0], tile_begin);
    // 1. B fragments and per-group sums of x for this slice -> this warp's shared memory
    __syncwarp();  // the previous slice's fragments have been read
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const bool valid = kFull || grp0 + u < G;  // groups past K: zero fragments, zero sums
      const int slot = kWide ? wide_slot(u, q) : q;
      const XT* src = x + static_cast<int64_t>(tok) * K + (grp0 + u) * kW4a16Group + 16 * slot;
      float sum = 0.f;
      uint32_t bf[kPieces][8];
      if constexpr (kF32) {
        float f[16];
#pragma unroll
        for (int i = 0; i < 16; i += 4) {
          const float4 v = valid ? *reinterpret_cast<const float4*>(src + i) : make_float4(0.f, 0.f, 0.f, 0.f);
          f[i] = v.x, f[i + 1] = v.y, f[i + 2] = v.z, f[i + 3] = v.w;
        }
        // x = hi + mid + lo exactly (8 + 8 + 8 significant bits); Inf / NaN stay in hi.
        uint32_t piece[3][16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          sum += f[i];
          const c10::BFloat16 h(f[i]);
          const float r1 = isfinite(static_cast<float>(h)) ? f[i] - static_cast<float>(h) : 0.f;
          const c10::BFloat16 m(r1);
          const c10::BFloat16 l(r1 - static_cast<float>(m));
          piece[0][i] = bits16(h), piece[1][i] = bits16(m), piece[2][i] = bits16(l);
        }
        // register j holds elements (e, e + 4), e = j % 4 of its 8-element half: the pairs nibble_pair produces
#pragma unroll
        for (int pc = 0; pc < 3; ++pc) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int e = (j / 4) * 8 + j % 4;
            bf[pc][j] = pack16(piece[pc][e], piece[pc][e + 4]);
          }
        }
      } else {
        uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
        if (valid) {
          v0 = *reinterpret_cast<const uint4*>(src);
          v1 = *reinterpret_cast<const uint4*>(src + 8);
        }
        const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int i = 0; i < 16; ++i) sum += half_word_to_float<XT>(w[i / 2], i % 2);
        // (x0 x1)(x2 x3)(x4 x5)(x6 x7) -> (x0 x4)(x1 x5)(x2 x6)(x3 x7), per 8-element half
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bf[0][4 * h + 0] = __byte_perm(w[4 * h], w[4 * h + 2], 0x5410);
          bf[0][4 * h + 1] = __byte_perm(w[4 * h], w[4 * h + 2], 0x7632);
          bf[0][4 * h + 2] = __byte_perm(w[4 * h + 1], w[4 * h + 3], 0x5410);
          bf[0][4 * h + 3] = __byte_perm(w[4 * h + 1], w[4 * h + 3], 0x7632);
        }
      }
#pragma unroll
      for (int pc = 0; pc < kPieces; ++pc) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xb[((u * kPieces + pc) * 2 + h) * 32 + lane] =
              make_uint4(bf[pc][4 * h], bf[pc][4 * h + 1], bf[pc][4 * h + 2], bf[pc][4 * h + 3]);
        }
      }
      // the four q lanes of a token hold its group's 64 values; lane 4t then has token t's sum
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float s0 = __shfl_sync(0xffffffffu, sum, 8 * q), s1 = __shfl_sync(0xffffffffu, sum, 8 * q + 4);
      xsum[u * 32 + lane] = make_float2(s0, s1);
    }
    __syncwarp();

    // 2. the tiles, in order
    if (T > 1) load_tile(ld[1], tile_begin + 1);
    for (int t = 0; t < T; t += 2) {
      float acc0[4] = {0.f, 0.f, 0.f, 0.f};
      compute_tile(ld[0], acc0);
      if (t + 2 < T) load_tile(ld[0], tile_begin + t + 2);
      add_partial(t, acc0);
      if (t + 1 < T) {
        float acc1[4] = {0.f, 0.f, 0.f, 0.f};
        compute_tile(ld[1], acc1);
        if (t + 3 < T) load_tile(ld[1], tile_begin + t + 3);
        add_partial(t + 1, acc1);
      }
    }
  }
  __syncthreads();

  // the tiles' outputs, one (token, row) per thread: warps' partials in warp order, + bias
  for (int e = threadIdx.x; e < rows * M; e += blockDim.x) {
    const int t = e / rows, i = e % rows;
    const int64_t n = static_cast<int64_t>(tile_begin) * 16 + i;
    if (n >= N) continue;
    const float* r = red + (i / 16) * W * (8 * 16) + t * 16 + i % 16;
    float v = 0.f;
    for (int w = 0; w < W; ++w) v += r[w * (8 * 16)];
    v += e == static_cast<int>(threadIdx.x) ? bias_first : wsrc.bias_at(bias_kind, n);
    wsrc.store(t, n, static_cast<XT>(v));
  }
#else
  __trap();  // the host only launches it on sm_80+
#endif
}

template <typename XT, typename ST, bool kFull>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    w4a16_gemv_kernel(const XT* __restrict__ x, const uint8_t* __restrict__ codes, const ST* __restrict__ scales,
                      const ST* __restrict__ zeros, const void* __restrict__ bias, int bias_kind,
                      XT* __restrict__ y, int M, int N, int K) {
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh)
  gemv_body<XT, ST, kFull>(x, OneWeight<XT, ST>{codes, scales, zeros, bias, y, N}, bias_kind, M, N, K);
}

// The weights of a group as one concatenated weight of sum N_i rows (GemvGroup).
template <typename XT, typename ST, bool kFull>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    w4a16_gemv_group_kernel(const XT* __restrict__ x, const __grid_constant__ GemvGroup group, int bias_kind, int M,
                            int N, int K) {
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh)
  gemv_body<XT, ST, kFull>(x, GroupWeights<XT, ST>{group}, bias_kind, M, N, K);
}

// ---------------------------------------------------------------------------------------------------------------
// M > 8: the weight in x's dtype, w = XT(c * s + z) with the fp32 product and sum rounded separately (the CPU
// reference's operations, no FMA contraction), then cuBLAS. A thread writes 8 weights (4 code bytes, one group).
// ---------------------------------------------------------------------------------------------------------------
template <typename XT, typename ST>
__global__ void w4a16_dequant_kernel(const uint8_t* __restrict__ codes, const ST* __restrict__ scales,
                                     const ST* __restrict__ zeros, XT* __restrict__ w, int64_t N, int64_t K) {
  const int64_t items = N * K / 8, G = K / kW4a16Group;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * 8, n = e / K, k = e % K;
    const uint32_t c = *reinterpret_cast<const uint32_t*>(codes + e / 2);
    const float s = static_cast<float>(scales[n * G + k / kW4a16Group]);
    const float z = static_cast<float>(zeros[n * G + k / kW4a16Group]);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fadd_rn(__fmul_rn(static_cast<float>((c >> (4 * j)) & 0xF), s), z);
    if constexpr (std::is_same_v<XT, float>) {
      reinterpret_cast<float4*>(w + e)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(w + e)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t p[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        p[j] = pack16(bits16(static_cast<XT>(v[2 * j])), bits16(static_cast<XT>(v[2 * j + 1])));
      }
      *reinterpret_cast<uint4*>(w + e) = make_uint4(p[0], p[1], p[2], p[3]);
    }
  }
}

at::Tensor contiguous_aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  if (!aligned16(c.data_ptr())) c = c.clone();
  return c;
}

// Grid: as many blocks as fit on the GPU at once (one wave), each a balanced share of the row tiles; more blocks
// only where the per-tile partials would not fit in shared memory.
struct GemvGrid {
  int warps, blocks, smem;
};

template <typename XT>
GemvGrid gemv_grid(const W4a16Shape& s) {
  const int64_t groups = s.G;
  const int slices = static_cast<int>((groups + slice_groups<XT>() - 1) / slice_groups<XT>());
  const int64_t tiles = (s.N + 15) / 16;
  GemvGrid gg{};
  gg.warps = std::min(slices, kMaxWarps);
  // about 128 registers per thread: 16 / warps blocks per SM
  int per_sm = std::max(1, kMaxWarps / gg.warps);
#if SVDQ_DIAGNOSTICS
  if (const char* v = std::getenv("SVDQUANT_OPS_W4A16_BLOCKS_PER_SM")) {  // diagnostics: force the grid size
    per_sm = std::max(1, std::atoi(v));
  }
#endif
  int64_t blocks = std::min<int64_t>(tiles, static_cast<int64_t>(num_sms()) * per_sm);
  const int64_t tile_cap = std::max(1, kRedCap / (gg.warps * kTileBytes));
  if ((tiles + blocks - 1) / blocks > tile_cap) blocks = (tiles + tile_cap - 1) / tile_cap;
  gg.blocks = static_cast<int>(blocks);
  gg.smem = gg.warps * slice_smem_bytes<XT>() +
            static_cast<int>((tiles + blocks - 1) / blocks) * gg.warps * kTileBytes;
  return gg;
}

template <typename XT, typename ST, bool kFull>
void launch_gemv_kernel(const W4a16Shape& s, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& out,
                        cudaStream_t stream) {
  const GemvGrid gg = gemv_grid<XT>(s);
  auto kernel = w4a16_gemv_kernel<XT, ST, kFull>;
  static PerDeviceOnce once;
  set_max_dynamic_smem(once, kernel, kMaxWarps * slice_smem_bytes<XT>() + kRedCap);
  const auto b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  launch_kernel(kernel, dim3(gg.blocks), dim3(gg.warps * 32), gg.smem, stream, x.data_ptr<XT>(),
                codes.data_ptr<uint8_t>(), scales.data_ptr<ST>(), zeros.data_ptr<ST>(),
                b.has_value() ? b->data_ptr() : nullptr, bias_kind(bias), out.data_ptr<XT>(), static_cast<int>(s.M),
                static_cast<int>(s.N), static_cast<int>(s.K));
  debug_sync(stream, "w4a16_gemv_kernel");
}

// A group's launch: `s` is the concatenation (N = its rows), the table holds each weight's pointers.
template <typename XT, typename ST, bool kFull>
void launch_gemv_group_kernel(const W4a16Shape& s, const at::Tensor& x, const GemvGroup& group, int bkind,
                              cudaStream_t stream) {
  const GemvGrid gg = gemv_grid<XT>(s);
  auto kernel = w4a16_gemv_group_kernel<XT, ST, kFull>;
  static PerDeviceOnce once;
  set_max_dynamic_smem(once, kernel, kMaxWarps * slice_smem_bytes<XT>() + kRedCap);
  launch_kernel(kernel, dim3(gg.blocks), dim3(gg.warps * 32), gg.smem, stream, x.data_ptr<XT>(), group, bkind,
                static_cast<int>(s.M), static_cast<int>(s.N), static_cast<int>(s.K));
  debug_sync(stream, "w4a16_gemv_group_kernel");
}

// Whether a weight takes the lean kernel (kFull): full slices (K % 256 == 0 for 16-bit x) whose 4 scales / zeros per
// row are one aligned vector. Diagnostics builds: SVDQUANT_OPS_W4A16_GENERIC=1 gives every weight the generic one.
bool lean_gemv(int64_t G, at::ScalarType x_dtype, const at::Tensor& scales, const at::Tensor& zeros) {
  const int64_t slice = x_dtype == at::kFloat ? slice_groups<float>() : slice_groups<c10::Half>();
  const uintptr_t align = 4 * scales.element_size() - 1;
  bool full = G % slice == 0 && (reinterpret_cast<uintptr_t>(scales.data_ptr()) & align) == 0 &&
              (reinterpret_cast<uintptr_t>(zeros.data_ptr()) & align) == 0;
#if SVDQ_DIAGNOSTICS
  if (const char* v = std::getenv("SVDQUANT_OPS_W4A16_GENERIC")) {
    if (v[0] == '1') full = false;
  }
#endif
  return full;
}

template <typename XT, typename ST>
void launch_gemv(const W4a16Shape& s, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                 const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& out,
                 cudaStream_t stream) {
  if (lean_gemv(s.G, x.scalar_type(), scales, zeros)) {
    launch_gemv_kernel<XT, ST, true>(s, x, codes, scales, zeros, bias, out, stream);
  } else {
    launch_gemv_kernel<XT, ST, false>(s, x, codes, scales, zeros, bias, out, stream);
  }
}

// The GEMV launcher reserves its largest shared-memory footprint per device (set_max_dynamic_smem). GPUs whose
// per-block opt-in limit is below it (99 KB on sm_86 / sm_89 / sm_120; 163 KB on sm_80 for 16-bit x) take the
// dequantize + cuBLAS path instead of failing to launch.
bool gemv_fits(at::ScalarType x_dtype) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device_index()));
  const int need = (x_dtype == at::kFloat ? slice_smem_bytes<float>() : slice_smem_bytes<c10::Half>()) * kMaxWarps +
                   kRedCap;
  return need <= limit;
}

template <typename XT, typename ST>
at::Tensor dequantize(const W4a16Shape& s, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& zeros, at::ScalarType x_dtype, cudaStream_t stream) {
  auto w = at::empty({s.N, s.K}, codes.options().dtype(x_dtype));
  const int64_t items = s.N * s.K / 8;
  const int64_t blocks = std::min<int64_t>((items + 255) / 256, static_cast<int64_t>(num_sms()) * 16);
  w4a16_dequant_kernel<XT, ST><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      codes.data_ptr<uint8_t>(), scales.data_ptr<ST>(), zeros.data_ptr<ST>(), w.data_ptr<XT>(), s.N, s.K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "w4a16_dequant_kernel");
  return w;
}

// XT / ST as the storage types of the tensors' dtypes.
template <typename F>
void dispatch_types(at::ScalarType x_dtype, at::ScalarType s_dtype, F&& f) {
  auto with_x = [&](auto st) {
    using ST = decltype(st);
    switch (x_dtype) {
      case at::kFloat: f(float{}, ST{}); break;
      case at::kHalf: f(c10::Half{}, ST{}); break;
      default: f(c10::BFloat16{}, ST{}); break;
    }
  };
  switch (s_dtype) {
    case at::kFloat: with_x(float{}); break;
    case at::kHalf: with_x(c10::Half{}); break;
    default: with_x(c10::BFloat16{}); break;
  }
}

// Whether one grouped GEMV launch can take these weights: the GEMV path for every one of them (M <= 8, sm_80+, its
// shared memory), whole 16-row tiles per weight, one scales dtype and one bias dtype (weights without a bias add 0),
// and row counts that index in 32 bits.
bool group_fits(const at::Tensor& x, const std::vector<W4a16Shape>& shapes, at::TensorList scales,
                const c10::List<std::optional<at::Tensor>>& bias, int& bkind) {
  const int64_t M = shapes[0].M;
  if (M < 1 || M > kGemvMaxM || device_info().major < 8 || !gemv_fits(x.scalar_type())) return false;
  int64_t rows = 0;
  bkind = kNoBias;
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (shapes[i].N % 16 != 0 || scales[i].scalar_type() != scales[0].scalar_type()) return false;
    rows += shapes[i].N;
    const int k = bias_kind(bias.get(i));
    if (k == kNoBias) continue;
    if (bkind != kNoBias && k != bkind) return false;
    bkind = k;
  }
  return rows < (int64_t(1) << 30);
}

}  // namespace
}  // namespace w4a16

std::vector<at::Tensor> w4a16_linear_group_cuda(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                                at::TensorList zeros,
                                                const c10::List<std::optional<at::Tensor>>& bias) {
  const auto shapes = check_w4a16_linear_group(x, codes, scales, zeros, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const size_t n = codes.size();
  std::vector<at::Tensor> out;
  out.reserve(n);
  int bkind = w4a16::kNoBias;
  if (!w4a16::group_fits(x, shapes, scales, bias, bkind)) {  // one call per weight
    for (size_t i = 0; i < n; ++i) out.push_back(w4a16_linear_cuda(x, codes[i], scales[i], zeros[i], bias.get(i)));
    return out;
  }
  cudaStream_t stream = current_stream();
  const int64_t M = shapes[0].M, K = shapes[0].K, G = shapes[0].G;
  const auto xc = w4a16::contiguous_aligned(x);
  std::vector<at::Tensor> cc, sc, zc;  // contiguous operands, alive until the launches are enqueued
  std::vector<std::optional<at::Tensor>> bc;
  // One launch runs one kernel (lean or generic, w4a16::lean_gemv): a group whose weights differ in that runs one
  // call per weight (the single op would pick the other kernel for some of them, whose staging order differs).
  int n_full = 0;
  for (size_t i = 0; i < n; ++i) {
    cc.push_back(w4a16::contiguous_aligned(codes[i]));
    sc.push_back(scales[i].contiguous());
    zc.push_back(zeros[i].contiguous());
    const auto b = bias.get(i);
    bc.push_back(b.has_value() ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt);
    n_full += w4a16::lean_gemv(G, x.scalar_type(), sc[i], zc[i]);
  }
  if (n_full != 0 && n_full != static_cast<int>(n)) {
    for (size_t i = 0; i < n; ++i) out.push_back(w4a16_linear_cuda(x, codes[i], scales[i], zeros[i], bias.get(i)));
    return out;
  }
  const bool full = n_full == static_cast<int>(n);
  // as few launches as the table allows, with about as many weights each
  const size_t launches = (n + w4a16::kGroupMax - 1) / w4a16::kGroupMax;
  const size_t per = (n + launches - 1) / launches;
  for (size_t i = 0; i < n; ++i) out.push_back(at::empty({M, shapes[i].N}, x.options()));
  for (size_t first = 0; first < n; first += per) {
    const size_t last = std::min(n, first + per);
    w4a16::GemvGroup group{};
    int64_t rows = 0;
    for (size_t i = first; i < last; ++i) {
      const int j = static_cast<int>(i - first);
      group.codes[j] = cc[i].data_ptr<uint8_t>();
      group.scales[j] = sc[i].data_ptr();
      group.zeros[j] = zc[i].data_ptr();
      group.bias[j] = bc[i].has_value() ? bc[i]->data_ptr() : nullptr;
      group.y[j] = out[i].data_ptr();
      rows += shapes[i].N;
      group.row_end[j] = static_cast<int>(rows);
    }
    group.count = static_cast<int>(last - first);
    const W4a16Shape s{M, rows, K, G};
    w4a16::dispatch_types(x.scalar_type(), scales[0].scalar_type(), [&](auto xt, auto st) {
      using XT = decltype(xt);
      using ST = decltype(st);
      if (full) {
        w4a16::launch_gemv_group_kernel<XT, ST, true>(s, xc, group, bkind, stream);
      } else {
        w4a16::launch_gemv_group_kernel<XT, ST, false>(s, xc, group, bkind, stream);
      }
    });
  }
  for (size_t i = 0; i < n; ++i) out[i] = out[i].reshape(with_last_dim(x, shapes[i].N));
  return out;
}

at::Tensor w4a16_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& zeros, const std::optional<at::Tensor>& bias) {
  const auto s = check_w4a16_linear(x, codes, scales, zeros, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  if (s.M == 0) return at::empty(with_last_dim(x, s.N), x.options());
  cudaStream_t stream = current_stream();
  const auto c = w4a16::contiguous_aligned(codes);
  const auto sc = scales.contiguous();
  const auto zc = zeros.contiguous();
  if (s.M <= w4a16::kGemvMaxM && device_info().major >= 8 && w4a16::gemv_fits(x.scalar_type())) {
    const auto xc = w4a16::contiguous_aligned(x);
    auto out = at::empty({s.M, s.N}, x.options());
    w4a16::dispatch_types(x.scalar_type(), scales.scalar_type(), [&](auto xt, auto st) {
      w4a16::launch_gemv<decltype(xt), decltype(st)>(s, xc, c, sc, zc, bias, out, stream);
    });
    return out.reshape(with_last_dim(x, s.N));
  }
  // Each weight rounded once to x's dtype (and the bias too, for addmm); cuBLAS accumulates in fp32.
  at::Tensor w;
  w4a16::dispatch_types(x.scalar_type(), scales.scalar_type(), [&](auto xt, auto st) {
    w = w4a16::dequantize<decltype(xt), decltype(st)>(s, c, sc, zc, x.scalar_type(), stream);
  });
  const auto x2 = x.reshape({s.M, s.K});
  const auto y = bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x2, w.t()) : at::mm(x2, w.t());
  return y.reshape(with_last_dim(x, s.N));
}

}  // namespace cuda_impl
}  // namespace svdquant
