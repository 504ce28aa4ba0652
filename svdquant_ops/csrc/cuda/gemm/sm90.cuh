// Step 2 of the Hopper GEMM path (internal header of ../gemm.cu): the sm_90a warp-specialized wgmma kernel.
// Persistent (one CTA per SM, 128 x 128 output tiles; W4A8 also 128 x 256), 384 threads: one producer thread issues
// TMA loads (128-byte swizzle) into a ring of pipeline stages guarded by mbarriers; two consumer warpgroups own 64
// rows each. Per tile:
//   branch  the rank-R low-rank branch first, as bf16 wgmma K-steps (down_act and proj_up split into bf16 parts;
//           W4A8's 128 x 256 tiles: last, onto the scaled main-loop sums);
//   main    INT4: per 128-channel stage the four fp8 wgmma (m64n128k32) of its two 64-channel groups into two
//           temporary accumulators (exact integer dot products), promoted on the CUDA cores
//           (acc += tmp * (act_scale[row] * scale[col])), group 0 while group 1's MMAs run;
//           NVFP4: bf16 wgmma of the exact values over all of K into one temporary, times the global scale once;
//           W4A8: s8 wgmma over all of K into one int32 accumulator, scaled once by act_scale[row] * scale[col];
//   epilogue + bias, cast; 2-byte outputs through a shared-memory buffer and TMA stores that drain during the next
//           tile, other outputs with direct stores.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common.cuh"
#include "../wgmma_ops.cuh"
#include "io.cuh"
#include "prep.cuh"  // w4a8_expand8

namespace svdquant {
namespace cuda_impl {
namespace gemm {
namespace sm90 {

constexpr int BM = 128;

// What the main loop multiplies: INT4 as fp8 codes with per-group promotion, NVFP4 as exact bf16 values, W4A8 as
// int8 (activation codes x weight code * multiplier) into one int32 accumulator over all of K (no promotion).
// kKindW4a8Expand (diagnostics builds): W4A8 with the 4-bit weight codes loaded by TMA and expanded to int8 inside
// the kernel by the producer warpgroup's idle warps (no per-call weight prep). Bit-equal to the prep path on the
// H200 but 3.5x slower: three warps cannot expand a stage in the time of its MMAs (results/2026-12-04-h200-w4a8-
// inkernel-expand.md). Kept as the baseline for an expansion in the consumers' registers.
enum Kind : int { kKindInt4 = 0, kKindNvfp4 = 1, kKindW4a8 = 2, kKindW4a8Expand = 3 };

// kRing (diagnostics schedules kRing4 / kRing5 / kRing7): the ring's depth instead of the shipped one; 7 W4A8 stages
// leave no room for the epilogue buffer, so that variant stores directly from registers.
// kVec (the kVecSmem schedule): room for the consumer warpgroups' copies of a tile's channel scales and bias.
template <int BN, int kKind, int kRing = 0, bool kVec = false>
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
  // TMA-store epilogue (BN = 128, and W4A8's 256): a warpgroup's 64 x BN 2-byte results, as BN / 64 boxes of 64 x 64
  // (128-byte rows, 128-byte swizzle), go through a buffer of their own so the stores drain while the next tile's
  // main loop runs (staging them in a pipeline stage instead made every tile wait for its stores to read it: +2.4 us
  // per tile).
  static constexpr int C_BOX = 64 * 128;
  static constexpr int EPI_BYTES = (BN == 128 || BN == 256) && kRing <= 6 ? 2 * (BN / 64) * C_BOX : 0;
  // as many stages as fit next to the epilogue buffer in 227 KB: INT4 5 x 35 KB, W4A8 / NVFP4 6 x 32 KB, W4A8 at
  // BN = 256 3 x 48 KB (+ 64 KB of epilogue buffer)
  static constexpr int STAGES = kRing > 0 ? kRing : (BN == 256 ? 3 : (BN == 192 ? 5 : (kScales ? 5 : 6)));
  static constexpr int EPI_OFF = STAGES * STAGE;
  static constexpr int BAR_OFF = EPI_OFF + EPI_BYTES;
  // kKindW4a8Expand: the tile's 4-bit codes (BN rows x 64 bytes) land in the upper half of the stage's weight buffer
  static constexpr int B4_OFF = A_BYTES + B_BYTES / 2;
  static constexpr int B4_BYTES = BN * 64;
  static constexpr int BARS = (kKind == kKindW4a8Expand ? 3 : 2) * STAGES * 8;
  // kVec: per consumer warpgroup the tile's two vectors (channel scales, bias) as BN / 4 float4 slots each
  static constexpr int VEC_OFF = BAR_OFF + ((BARS + 15) / 16) * 16;
  static constexpr int VEC_BYTES = kVec ? 2 * 2 * BN * 4 : 0;
  static constexpr int SMEM = (kVec ? VEC_OFF + VEC_BYTES : BAR_OFF + BARS) + 1024;  // + the base's alignment
  static_assert(SMEM <= 232448, "shared memory over the sm_90 limit of 227 KB per block");
};

struct Params {
  const float* bias;    // [Np] fp32 or nullptr
  const float* gscale;  // [Np] fp32 (NVFP4 and W4A8: per output channel)
  const float* ascale;  // [m_tiles * BM] fp32 per-token scales (W4A8)
  void* out;
  int M, N;
  int m_tiles, n_tiles;
  int n_main, n_branch;
  int out_kind;
  int tma_store;  // BN = 128 (or W4A8's 256), 2-byte output, N % 8 == 0: epilogue through shared memory and TMA
                 // stores
  const uint8_t* wmult;  // kKindW4a8Expand: the weight's group multipliers [N, G]
  int G;
  int exp_mode;  // kKindW4a8Expand diagnostics: 0 full; 1 multipliers taken as 1; 2 no expansion; 3 no stores;
                 // 4 codes stored, no arithmetic
  ExpandJob next;  // W4A8 (gemm_expanded): the next GEMM's weight, expanded by the producer warpgroup's idle warps
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

// kMulticast (diagnostics): tile t of a CTA in a 2-CTA cluster is its half (column tile 2 nc + t % 2) of the pair
// t / 2 = tile_coords over n_tiles / 2 pair columns, whose two tiles share rows mt.
__device__ __forceinline__ void mc_coords(int tile, int m_tiles, int n_tiles, int& mt, int& nt) {
  tile_coords(tile >> 1, m_tiles, n_tiles >> 1, mt, nt);
  nt = 2 * nt + (tile & 1);
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

// kVecSmem (W4A8 on 128 x 256 tiles; the default since 2026-12-07, SVDQUANT_OPS_CUDA_W4A8_EPI=shfl turns it off): the
// tile's channel scales and bias reach the consumers through shared memory instead of TileVec's shuffles (two per
// column group and vector: 128 per thread and tile, on the shared-memory pipe beside the epilogue's stores, while the
// tensor cores idle). Each thread of a warpgroup fetches one float4 slot at the start of the tile (its latency hides
// behind the main loop): thread t holds slot t % (BN / 4) of the channel scales (t < BN / 4) or the bias; slot 4 i + q
// is the column pairs 8 i + q and 8 i + 4 + q, i.e. column groups j = 2 i and 2 i + 1 of the lanes with tq = q. The
// warpgroup stores its slots after the main loop, and SmemVec reads two column groups per 16-byte load (a quad's 4
// lanes read 64 contiguous bytes: one wavefront, broadcast to the warp's 8 quads). The same values as TileVec in the
// same arithmetic: the same bytes out.
template <int BN>
__device__ __forceinline__ float4 vec_slot(const float* gscale, const float* bias, int n0, int t) {
  static_assert(BN == 256, "one slot per thread of a warpgroup: 2 vectors x BN / 4 slots = 128");
  const bool is_bias = t >= BN / 4;
  const int sl = t & (BN / 4 - 1);
  const int c0 = 16 * (sl >> 2) + 2 * (sl & 3);  // the first column of pair 8 i + q; the second pair 8 columns on
  if (is_bias && bias == nullptr) return make_float4(0.f, 0.f, 0.f, 0.f);
  const float* v = (is_bias ? bias : gscale) + n0 + c0;
  const float2 a = *reinterpret_cast<const float2*>(v), b = *reinterpret_cast<const float2*>(v + 8);
  return make_float4(a.x, a.y, b.x, b.y);
}

template <int BN>
struct SmemVec {
  const float4* slots = nullptr;  // the vector's BN / 4 slots in shared memory
  mutable float4 cur;             // column groups J and J + 1 (J even), loaded at J
  template <int J>
  __device__ __forceinline__ float2 at(int tq) const {  // (called for J = 0, 1, 2, ... in order)
    if constexpr (J % 2 == 0) {
      cur = slots[(J / 2) * 4 + tq];
      return make_float2(cur.x, cur.y);
    } else {
      return make_float2(cur.z, cur.w);
    }
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

// Main-loop schedules. kPromote is the one that ships, and for W4A8 on 128 x 256 tiles kVecSmem (kPromote with the
// epilogue's vectors through shared memory; kPromote there with SVDQUANT_OPS_CUDA_W4A8_EPI=shfl). Diagnostics builds
// add kSkeleton: the same TMA / mbarrier / wgmma loop without the promotion (wrong results), i.e. the speed of a plain
// fp8 GEMM with this feed; and kOverlap / kOverlapDeep (W4A8 only): each tile's epilogue runs while the next tile's
// first main-loop MMAs are on the tensor cores, with 2 / 3 stages of MMAs in flight (bit-equal, but 2-6 % slower on the
// H100 and the H200: the int32 -> fp32 conversion stays outside the overlap). kPingPong (W4A8 only): each consumer
// warpgroup owns whole 128 x 128 tiles, alternate tiles, and one's conversion, branch and epilogue run under the
// other's main loop (see the consumer loop); on the H200 0.96-0.98x of the shipped schedule's time at K = 3072 but
// 1.03-1.08x at long K or with few tiles, and a FLUX.1 step's GEMMs -1.8 % (all calls) on the H200, +1.7 % on an H100
// (only where it is expected to win; benchmarks/results/2026-12-05-h200-w4a8-pingpong.md): not shipped. (For INT4, a
// FlashAttention-3-style ping-pong measured 6 % slower: its promotion competes with the other warpgroup.)
enum Schedule : int {
  kPromote = 0,
  kVecSmem = 1,  // kPromote for W4A8 on 128 x 256 tiles, the epilogue's vectors through shared memory (SmemVec; the
                 // default for those tiles)
#if SVDQ_DIAGNOSTICS
  kSkeleton = 2,
  kOverlap = 3,      // 2 stages of MMAs in flight (the lag below)
  kOverlapDeep = 4,  // 3
  kPingPong = 5,
  kCvtMagic = 6,     // kPromote with W4A8's int32 -> fp32 conversion by a magic-number add (cvt_i32_exact)
  kInflight = 7,     // kPromote with W4A8's main loop keeping one stage of MMAs in flight
  kHalfFeed = 8,     // kPromote with W4A8's main-loop stages loading only the weight tile (wrong results: the
                     // activation tile is whatever the stage held): the speed with half the operand feed
  kMulticast = 9,    // kPromote for W4A8 on clusters of 2 CTAs: the two tiles of a cluster share their rows, and
                     // each CTA loads half of the shared activation tile, multicast to both (bit-equal)
  kRing4 = 10,       // kPromote for W4A8 with a ring of 4 / 5 / 7 stages instead of 6 (bit-equal; 7: direct
  kRing5 = 11,       // epilogue): whether the main loop waits on load latency (a deeper ring runs faster) or on
  kRing7 = 12,       // the feed's throughput (the depth does not matter)
  kHalfFeedAct = 13, // kHalfFeed's mirror: main-loop stages load only the activation tile (wrong results): whether
                     // the cost is in the bytes (as kHalfFeed) or in the activation operand's loads themselves
#endif
};

// The ring depth a schedule asks for (0: Cfg's own).
constexpr int ring_stages(int sched) {
#if SVDQ_DIAGNOSTICS
  return sched == kRing4 ? 4 : (sched == kRing5 ? 5 : (sched == kRing7 ? 7 : 0));
#else
  return sched * 0;
#endif
}

#if SVDQ_DIAGNOSTICS
// The overlapped schedules' lag: MMA batches (one pipeline stage each) that may be in flight when the next is
// issued. The deferred epilogue runs once lag + 1 stages are queued (lag 2: ~1.5k tensor-core cycles for the two
// warpgroups, against an epilogue of ~2.2k), and the ring keeps STAGES - lag - 1 stages for the producer to fill.
constexpr int overlap_lag(int sched) { return sched == kOverlapDeep ? 3 : 2; }
#endif

// One pipeline stage fed to a single accumulator: wait for the stage, its four K-steps of `mma` (the first one
// overwrites the accumulator unless `accumulate`), wait for them, hand the stage back to the producer, advance the
// ring. Used by the W4A8 and NVFP4 main loops and the skeleton diagnostic.
template <class C, bool kMc = false, typename Acc, typename Mma>
__device__ __forceinline__ void consume_stage(uint8_t* smem, uint64_t* full, uint64_t* empty, int& s, uint32_t& ph,
                                              int wg, int lane, Acc& acc, bool accumulate, Mma mma, uint32_t peer = 0) {
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
  if constexpr (kMc) {
    if (lane == 0) mbar_arrive_cluster(&empty[s], peer);  // the peer's producer also writes this stage
  }
  if (++s == C::STAGES) {
    s = 0;
    ph ^= 1;
  }
#endif
}

// The W4A8 main loops that keep stages of MMAs in flight (the diagnostics schedules kOverlap and kInflight): wait for
// stage s, issue its four s8 K-steps into acc (the first one overwriting it where `first`), commit, advance the ring.
// The caller waits for the MMAs and hands the stage back later. (consume_stage starts the same way; built on this
// helper, the shipped W4A8 and NVFP4 kernels' SASS changes, so it stays written out.)
template <int BN, class C>
__device__ __forceinline__ void issue_stage_s8(uint8_t* smem, uint64_t* full, int& s, uint32_t& ph, int wg,
                                               int (&acc)[BN / 2], bool first) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  mbar_wait(&full[s], ph);
  uint8_t* st = smem + s * C::STAGE;
  const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::A_BYTES);
  fence_regs(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma::mma_s8<BN>(acc, da + 2 * kk, db + 2 * kk, (!first || kk > 0) ? 1 : 0);
  wgmma_commit();
  if (++s == C::STAGES) {
    s = 0;
    ph ^= 1;
  }
#endif
}

// kKindW4a8Expand: unit u (32 4-bit codes of int8 row u / 4, quarter q = u % 4: one 32-channel slice) times the
// multiplier m in W4A8's channel order (the slice's even channels, then its odd ones), written as the row's 16-byte
// chunks 2q and 2q + 1 in the 128-byte swizzle TMA would give (chunk j of row r at j ^ (r % 8)).
__host__ __device__ __forceinline__ void expand_unit_sw128(uint8_t* b, int u, const uint4 c, uint32_t m) {
  const int r = u >> 2, q = u & 3;
  uint8_t* row = b + r * 128;
  const uint2 x0 = w4a8_expand8_split(c.x, m), x1 = w4a8_expand8_split(c.y, m);
  const uint2 x2 = w4a8_expand8_split(c.z, m), x3 = w4a8_expand8_split(c.w, m);
  *reinterpret_cast<uint4*>(row + (((2 * q) ^ (r & 7)) * 16)) = make_uint4(x0.x, x1.x, x2.x, x3.x);
  *reinterpret_cast<uint4*>(row + (((2 * q + 1) ^ (r & 7)) * 16)) = make_uint4(x0.y, x1.y, x2.y, x3.y);
}

#if SVDQ_DIAGNOSTICS
// kCvtMagic: float(v[i]) for a thread's int32 accumulators without the quarter-rate I2F (16 results per clock and SM
// against 64-128 for integer and float adds): for |v| <= 2^22 the bits 0x4B400000 + v are the float 1.5 * 2^23 + v,
// in the binade [2^23, 2^24) where every integer is exact, so subtracting 1.5 * 2^23 gives v exactly (as I2F does
// for |v| < 2^24). Outside that range the bits land in another binade (or wrap) and the result has |f| > 2^22, or
// is NaN, so one compare per value tells; a thread with any such value converts all of them with I2F (dot products
// of int8 codes rarely get there: |v| ~ sqrt(K) * 32 * 32 for FLUX.1's activations). Bit-equal to I2F everywhere.
template <int N>
__device__ __forceinline__ void cvt_i32_exact(const int (&v)[N], float (&f)[N]) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    f[i] = __uint_as_float(static_cast<uint32_t>(v[i]) + 0x4B400000u) - 12582912.0f;  // (unsigned: wraps, defined)
    ok = ok & (fabsf(f[i]) <= 4194304.0f);
  }
  if (!ok) {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = static_cast<float>(v[i]);
  }
}
#endif

// ---------------- the kernel's parts (all force-inlined into gemm_kernel) ----------------

// A consumer thread's place in the tile: warpgroup, warp, lane, column quad and first accumulator row.
struct ConsumerLane {
  int wg, warp, lane, tq, r0;
};

// acc += t * (act_scale[row] * scale[col]) for one 64-channel group `gg` of the stage `st` (its scales are in
// the stage: activation scales [2][BM], permuted weight scales [2][SWP]).
template <int BN, class C>
__device__ __forceinline__ void promote_group(float (&acc)[BN / 2], const float (&t)[BN / 2], const uint8_t* st, int gg,
                                              const ConsumerLane& cl) {
  const float* sa = reinterpret_cast<const float*>(st + C::SA_OFF) + gg * BM;
  const float sa0 = sa[cl.r0], sa1 = sa[cl.r0 + 8];
  const float4* sw = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(st + C::SW_OFF) + gg * C::SWP +
                                                     cl.tq * (BN / 4 + 4));
#pragma unroll
  for (int j2 = 0; j2 < BN / 16; ++j2) {
    const float4 w = sw[j2];
    promote4(acc + 8 * j2, t + 8 * j2, sa0, sa1, w.x, w.y);
    promote4(acc + 8 * j2 + 4, t + 8 * j2 + 4, sa0, sa1, w.z, w.w);
  }
}

// Issues the two fp8 K-steps (k32 each) of 64-channel group `gg` of the stage into `t` (overwriting it), committed
// as one wgmma group.
template <int BN, class C>
__device__ __forceinline__ void issue_group(float (&t)[BN / 2], const uint8_t* st, int gg, int wg) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const uint64_t da = desc_sw128(st + wg * 64 * 128), db = desc_sw128(st + C::A_BYTES);
  fence_regs(t);
  wgmma_fence();
  wgmma::mma_e4m3<BN>(t, da + 4 * gg, db + 4 * gg, 0);
  wgmma::mma_e4m3<BN>(t, da + 4 * gg + 2, db + 4 * gg + 2, 1);
  wgmma_commit();
#endif
}

#if SVDQ_DIAGNOSTICS
// Diagnostic INT4 main loop (kSkeleton): the same feed and MMAs straight into acc, no promotion (wrong results).
template <int BN, class C>
__device__ __forceinline__ void skeleton_main_loop(const Params& p, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                                   int& s, uint32_t& ph, const ConsumerLane& cl, float (&acc)[BN / 2]) {
  for (int ki = 0; ki < p.n_main; ++ki)
    consume_stage<C>(smem, full, empty, s, ph, cl.wg, cl.lane, acc, true,
                     [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_e4m3<BN>(d, a, b, sd); });
}
#endif

// NVFP4 main loop: bf16 wgmma of the exact values over all of K into one temporary, times the global scale once.
template <int BN, class C>
__device__ __forceinline__ void nvfp4_main_loop(const Params& p, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                                int& s, uint32_t& ph, const ConsumerLane& cl, float (&acc)[BN / 2],
                                                float (&tmp)[BN / 2], const TileVec<BN>& vscale) {
  for (int ki = 0; ki < p.n_main; ++ki)
    consume_stage<C>(smem, full, empty, s, ph, cl.wg, cl.lane, tmp, ki > 0,
                     [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_bf16<BN>(d, a, b, sd); });
  static_for<BN / 8>([&](auto jc) {
    constexpr int j = decltype(jc)::value;
    const float2 gsc = vscale.template at<j>(cl.tq);
    acc[4 * j + 0] = fmaf(tmp[4 * j + 0], gsc.x, acc[4 * j + 0]);
    acc[4 * j + 1] = fmaf(tmp[4 * j + 1], gsc.y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(tmp[4 * j + 2], gsc.x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(tmp[4 * j + 3], gsc.y, acc[4 * j + 3]);
  });
}

// TMA-store epilogue (BN = 128, or W4A8's 256; 2-byte output): acc + bias, cast, written into the warpgroup's
// epilogue buffer (128-byte-swizzled rows: a warp's 4-byte writes land in 8 different 16-byte chunks,
// conflict-free), then asynchronous TMA stores, which also clip the ragged M / N edges and drain while the next
// tile runs. The previous tile's stores must have read the buffer first (long done by now: a whole main loop ago).
template <int BN, class C, class V = TileVec<BN>>
__device__ __forceinline__ void store_tile_tma(const CUtensorMap& tmC, const Params& p, uint8_t* smem,
                                               const ConsumerLane& cl, const float (&acc)[BN / 2],
                                               const V& vbias, int m0, int n0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  uint8_t* cst = smem + C::EPI_OFF + cl.wg * (BN / 64) * C::C_BOX;
  if ((threadIdx.x & 127) == 0) bulk_wait_read<0>();
  named_bar_sync(2 + cl.wg, 128);
  const int rl = cl.warp * 16 + (cl.lane >> 2);  // row within the warpgroup's 64 (and rl + 8)
  const bool half = p.out_kind == kF16;
  static_for<BN / 8>([&](auto jc) {
    constexpr int j = decltype(jc)::value;
    const float2 b = vbias.template at<j>(cl.tq);
    uint8_t* box = cst + (j / 8) * C::C_BOX + 4 * cl.tq;
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
  named_bar_sync(2 + cl.wg, 128);
  if ((threadIdx.x & 127) == 0) {
#pragma unroll
    for (int bx = 0; bx < BN / 64; ++bx) tma_store_2d(&tmC, cst + bx * C::C_BOX, n0 + 64 * bx, m0 + 64 * cl.wg);
    bulk_commit();
  }
#endif
}

// Direct epilogue (fp32 outputs, N % 8 != 0, unaligned outputs): acc + bias, cast, 4- or 8-byte stores of column
// pairs from registers, bounds-checked.
template <int BN, class V = TileVec<BN>>
__device__ __forceinline__ void store_tile_direct(const Params& p, const ConsumerLane& cl, const float (&acc)[BN / 2],
                                                  const V& vbias, int m0, int n0) {
  const int gm0 = m0 + cl.r0, gm1 = gm0 + 8;
  const bool even_n = (p.N & 1) == 0;
  static_for<BN / 8>([&](auto jc) {
    constexpr int j = decltype(jc)::value;
    const int col = n0 + 8 * j + 2 * cl.tq;
    const float2 b = vbias.template at<j>(cl.tq);  // all lanes: a shuffle
    if (col < p.N) {
      const bool second = col + 1 < p.N;
      const bool vec = second && even_n;
      if (gm0 < p.M)
        store_out2(p.out, p.out_kind, static_cast<int64_t>(gm0) * p.N + col, acc[4 * j] + b.x, acc[4 * j + 1] + b.y,
                   vec, second);
      if (gm1 < p.M)
        store_out2(p.out, p.out_kind, static_cast<int64_t>(gm1) * p.N + col, acc[4 * j + 2] + b.x,
                   acc[4 * j + 3] + b.y, vec, second);
    }
  });
}

// The kernel: 384 threads = one producer warpgroup (one thread issues the TMA loads; the others give their registers
// to the consumers with setmaxnreg) and two consumer warpgroups of 64 rows each, persistent over the output tiles
// (tile blockIdx.x, + gridDim.x, ...). kSched != kPromote and kStore = false are diagnostic variants that only
// diagnostics builds instantiate, except kVecSmem; the shipped kernels are gemm_kernel<128, kind> and
// gemm_kernel<256, W4A8, kVecSmem> (kPromote: SVDQUANT_OPS_CUDA_W4A8_EPI=shfl).
// What stays written out in the body, and why: moving the producer loop or the consumer loop into a helper function
// (even verbatim) changes ptxas's register assignment in the INT4 kernel (same register count, different SASS); so
// does the INT4 main loop as a helper, and the W4A8 main loop or its scaling as a helper in the W4A8 kernel. The
// helpers used here (issue_group, promote_group, consume_stage, nvfp4_main_loop, store_tile_*) leave every shipped
// kernel's SASS unchanged (checked with cuobjdump -sass; see README.md).
template <int BN, int kKind, int kSched = kPromote, bool kStore = true>
__global__ void __launch_bounds__(384, 1)
    gemm_kernel(const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmB,
                const __grid_constant__ CUtensorMap tmSA, const __grid_constant__ CUtensorMap tmSW,
                const __grid_constant__ CUtensorMap tmLA, const __grid_constant__ CUtensorMap tmUP,
                const __grid_constant__ CUtensorMap tmC, const Params p) {
  static_assert(kStore || SVDQ_DIAGNOSTICS, "the no-store epilogue exists in diagnostics builds only");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  pdl_wait_then_release();  // launched by launch_kernel (common.cuh); the multicast launch is a plain one
  using C = Cfg<BN, kKind, ring_stages(kSched), kSched == kVecSmem>;
  constexpr bool kFp8 = kKind == kKindInt4;
  constexpr bool kExp = kKind == kKindW4a8Expand;
  constexpr bool kI8 = kKind == kKindW4a8 || kExp;
  // W4A8 on 128 x 256 tiles (the consumers' wide path below): 48 KB of operands per stage for twice a 128 x 128
  // tile's MMAs, where the main loop is bound by the bytes landing in shared memory (benchmarks/HISTORY.md)
  static constexpr bool kWide = kKind == kKindW4a8 && BN == 256;  // (static: as a plain constexpr local it changed
  // the NVFP4 kernel's SASS)
  static_assert(!kWide || kSched == kPromote || kSched == kVecSmem,
                "the W4A8 diagnostics schedules run on 128 x 128 tiles only");
  static_assert(kSched != kVecSmem || kWide, "the shared-memory epilogue vectors are W4A8's 128 x 256 tiles' only");
  static constexpr bool kVs = kSched == kVecSmem;
  static_assert(BN != 256 || kWide, "128 x 256 tiles are W4A8's only");
#if SVDQ_DIAGNOSTICS
  constexpr bool kOv = kSched == kOverlap || kSched == kOverlapDeep;
  constexpr bool kPP = kSched == kPingPong;
  static_assert(!(kOv || kPP) || (kKind == kKindW4a8 && kStore && BN == 128),
                "the overlapped and ping-pong schedules are W4A8's (prep path, stores, BN 128) only");
  static_assert(kSched != kCvtMagic || kKind == kKindW4a8, "the magic-number conversion is W4A8's");
  static_assert(kSched != kInflight || kKind == kKindW4a8, "the in-flight main loop is W4A8's");
  static_assert((kSched != kHalfFeed && kSched != kHalfFeedAct) || kKind == kKindW4a8,
                "the half-feed diagnostics are W4A8's");
  static_assert(kSched != kMulticast || (kKind == kKindW4a8 && BN == 128), "the multicast schedule is W4A8's");
  static_assert(ring_stages(kSched) == 0 || (kKind == kKindW4a8 && BN == 128), "the ring-depth schedules are W4A8's");
  constexpr bool kHalf = kSched == kHalfFeed;
  constexpr bool kHalfAct = kSched == kHalfFeedAct;
  constexpr bool kMc = kSched == kMulticast;
#else
  constexpr bool kHalf = false;
  constexpr bool kOv = false;
  constexpr bool kPP = false;
#endif
  constexpr bool kBranchLast = kOv || kPP || kWide;  // the producer loads a tile's branch stages after its main loop's
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  // full[s]: the stage's TMA bytes have landed (producer's expect_tx); empty[s]: every consumer warp is done with it.
  // kExp: the TMA bytes land on raw[s]; the 3 expander warps wait on it, write the int8 weights, then arrive on full[s].
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::BAR_OFF);
  uint64_t* empty = full + C::STAGES;
  uint64_t* raw = empty + C::STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(&full[s], kExp ? 3 : 1);
      // one arrival per consumer warp (kPP: of the warpgroup owning the tile; kMc: of both CTAs of the cluster, whose
      // producers both write every stage)
#if SVDQ_DIAGNOSTICS
      mbar_init(&empty[s], kPP ? 4 : (kMc ? 16 : 8));
#else
      mbar_init(&empty[s], 8);
#endif
      if constexpr (kExp) mbar_init(&raw[s], 1);
    }
    fence_barrier_init();
  }
  __syncthreads();
  const int total = p.m_tiles * p.n_tiles;
  const int per_tile = p.n_branch + p.n_main;
#if SVDQ_DIAGNOSTICS
  // kMc: grid and column tiles are even, and the cluster's rank is blockIdx.x's parity, so the CTAs 2c and 2c + 1 see
  // tiles 2 q + 0 and 2 q + 1 for the same q on every iteration of the loops below: pair q = tile_coords over
  // n_tiles / 2 pair columns, the CTA's tile (mt, 2 nc + rank) (mc_coords). (kMc code is compiled in diagnostics
  // builds only, so that the shipped kernels' SASS stays as it was.)
  const uint32_t rank = kMc ? (blockIdx.x & 1) : 0;
  if constexpr (kMc) cluster_sync();  // the peer's barriers are initialized before anything arrives on them
#endif

  if (threadIdx.x >= 256) {
    // ---------------- producer warpgroup: one thread issues all TMA loads ----------------
    // Per tile, in the order the consumers take them: the branch's n_branch stages (down_act / proj_up bf16 parts,
    // 64 channels each), then the n_main stages of the main loop (kOv, kPP: the main loop's first, then the
    // branch's).
    // kExp: the expander warps hold a stage's staged codes for rows 64-127 in registers
    if constexpr (kExp) {
      setmaxnreg_dec<56>();
    } else {
      setmaxnreg_dec<40>();
    }
    if (threadIdx.x == 256) {
      tma_prefetch_desc(&tmA);
      tma_prefetch_desc(&tmB);
      if constexpr (kFp8) {
        tma_prefetch_desc(&tmSA);
        tma_prefetch_desc(&tmSW);
      }
#if SVDQ_DIAGNOSTICS
      if constexpr (kMc) {  // (kMc's 64-row activation and down_act maps: tmLA is not used)
        tma_prefetch_desc(&tmSA);
        if (p.n_branch > 0) tma_prefetch_desc(&tmSW);
      }
#endif
      if (p.n_branch > 0) {
        tma_prefetch_desc(&tmLA);
        tma_prefetch_desc(&tmUP);
      }
      int s = 0;
      uint32_t ph = 0;
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        int mt, nt;
#if SVDQ_DIAGNOSTICS
        if constexpr (kMc) {
          mc_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        } else
#endif
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int m0 = mt * BM, n0 = nt * BN;
        for (int i = 0; i < per_tile; ++i) {
          mbar_wait(&empty[s], ph ^ 1);
          uint8_t* st = smem + s * C::STAGE;
          uint64_t* land = kExp ? &raw[s] : &full[s];
          const bool branch_stage = kBranchLast ? i >= p.n_main : i < p.n_branch;
          if (branch_stage) {
            const int bi = kBranchLast ? i - p.n_main : i;
            mbar_expect_tx(land, C::A_BYTES + C::B_BYTES);
#if SVDQ_DIAGNOSTICS
            if constexpr (kMc) {  // this CTA's half of the rows, to both CTAs (tmSW: down_act parts in 64-row boxes)
              tma_load_2d_multicast(&tmSW, st + rank * 64 * 128, land, bi * 64, m0 + 64 * rank, 3);
            } else
#endif
            tma_load_2d(&tmLA, st, land, bi * 64, m0);
            tma_load_2d(&tmUP, st + C::A_BYTES, land, bi * 64, n0);
          } else if constexpr (kExp) {  // 128 int8 activation channels, the weights' 128 4-bit codes (64 bytes)
            const int ki = i - p.n_branch;
            mbar_expect_tx(land, C::A_BYTES + C::B4_BYTES);
            tma_load_2d(&tmA, st, land, ki * 128, m0);
            tma_load_2d(&tmB, st + C::B4_OFF, land, ki * 64, n0);
          } else {
            const int ki = kBranchLast ? i : i - p.n_branch;
            if constexpr (kFp8) {  // 128 fp8 channels and both groups' scales
              mbar_expect_tx(&full[s], C::A_BYTES + C::B_BYTES + C::SA_BYTES + C::SW_BYTES);
              tma_load_2d(&tmA, st, &full[s], ki * 128, m0);
              tma_load_2d(&tmB, st + C::A_BYTES, &full[s], ki * 128, n0);
              tma_load_2d(&tmSA, st + C::SA_OFF, &full[s], m0, 2 * ki);
              tma_load_2d(&tmSW, st + C::SW_OFF, &full[s], nt * C::SWP, 2 * ki);
#if SVDQ_DIAGNOSTICS
            } else if constexpr (kHalfAct) {  // W4A8's activation tile only (the weight tile is whatever it was)
              mbar_expect_tx(&full[s], C::A_BYTES);
              tma_load_2d(&tmA, st, &full[s], ki * 128, m0);
#endif
            } else {
              // 128-byte rows: 64 bf16 channels (NVFP4) or 128 int8 channels (W4A8) per stage
              constexpr int kStep = kI8 ? 128 : 64;
              mbar_expect_tx(&full[s], (kHalf ? 0 : C::A_BYTES) + C::B_BYTES);
#if SVDQ_DIAGNOSTICS
              if constexpr (kMc) {  // this CTA's half of the rows, to both CTAs (tmSA: the codes in 64-row boxes)
                tma_load_2d_multicast(&tmSA, st + rank * 64 * 128, &full[s], ki * kStep, m0 + 64 * rank, 3);
              } else
#endif
              if constexpr (!kHalf) tma_load_2d(&tmA, st, &full[s], ki * kStep, m0);
              tma_load_2d(&tmB, st + C::A_BYTES, &full[s], ki * kStep, n0);
            }
          }
          if (++s == C::STAGES) {
            s = 0;
            ph ^= 1;
          }
        }
      }
    } else if (kExp && threadIdx.x >= 288) {
      // ---------------- kExp: warps 9-11 expand the staged 4-bit weights in place ----------------
      // A unit is 32 codes (16 staged bytes, at unit index u: row u / 4, quarter u % 4) -> 32 int8 bytes, chunks 2q
      // and 2q + 1 of the row's 128-byte-swizzled int8 row. The codes are staged in the upper half of the weight
      // buffer ([8, 16) KB), which int8 rows 64-127 overwrite, so three phases: rows 0-63 (written below the staged
      // codes) while rows 64-95 are read into registers; barrier; rows 64-95 written (over rows 0-63's codes) while
      // rows 96-127 are read; barrier; rows 96-127 written (over rows 64-127's codes).
      const int t = threadIdx.x - 288, lane = threadIdx.x & 31;
      int s = 0;
      uint32_t ph = 0;
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        int mt, nt;
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int n0 = nt * BN;
        for (int i = 0; i < per_tile; ++i) {
          if (i >= p.n_branch && p.exp_mode != 2) {
            const int g0 = 2 * (i - p.n_branch);
            // the multiplier of unit u (row n0 + u / 4, group g0 + (u % 4) / 2); 0 past N or K (codes are 0 there)
            auto mult = [&](int u) -> uint32_t {
              const int n = n0 + (u >> 2), g = g0 + ((u & 3) >> 1);
              return (n < p.N && g < p.G) ? (p.exp_mode == 1 ? 1u : __ldg(p.wmult + n * p.G + g)) : 0u;
            };
            mbar_wait(&raw[s], ph);
            uint8_t* st = smem + s * C::STAGE;
            const uint8_t* codes = st + C::B4_OFF;
            uint8_t* b = st + C::A_BYTES;
            uint4 h[2];
            uint32_t hm[2];
            // diagnostics: exp_mode 3 computes without storing, 4 stores the staged codes without computing
            uint32_t sink = 0;
            auto emit = [&](int u, const uint4 c, uint32_t m) {
              if (p.exp_mode == 3) {
                const uint2 x0 = w4a8_expand8(c.x, m), x1 = w4a8_expand8(c.y, m);
                const uint2 x2 = w4a8_expand8(c.z, m), x3 = w4a8_expand8(c.w, m);
                sink ^= x0.x ^ x0.y ^ x1.x ^ x1.y ^ x2.x ^ x2.y ^ x3.x ^ x3.y;
              } else if (p.exp_mode == 4) {
                const int r = u >> 2, q = u & 3;
                uint8_t* row = b + r * 128;
                *reinterpret_cast<uint4*>(row + (((2 * q) ^ (r & 7)) * 16)) = c;
                *reinterpret_cast<uint4*>(row + (((2 * q + 1) ^ (r & 7)) * 16)) = make_uint4(c.y, c.x, c.w, c.z);
              } else {
                expand_unit_sw128(b, u, c, m);
              }
            };
#pragma unroll
            for (int k = 0; k < 2; ++k) {  // rows 64-95 (units 256-383) into registers
              const int u = 256 + t + 96 * k;
              if (u < 384) h[k] = *reinterpret_cast<const uint4*>(codes + u * 16), hm[k] = mult(u);
            }
#pragma unroll 1
            for (int k = 0; k < 3; ++k) {  // rows 0-63 (units 0-255); one unit at a time (56 registers)
              const int u = t + 96 * k;
              if (u < 256) emit(u, *reinterpret_cast<const uint4*>(codes + u * 16), mult(u));
            }
            named_bar_sync(4, 96);  // rows 0-95's codes are read
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const int u = 256 + t + 96 * k;
              if (u < 384) emit(u, h[k], hm[k]);
            }
#pragma unroll
            for (int k = 0; k < 2; ++k) {  // rows 96-127 (units 384-511) into registers
              const int u = 384 + t + 96 * k;
              if (u < 512) h[k] = *reinterpret_cast<const uint4*>(codes + u * 16), hm[k] = mult(u);
            }
            named_bar_sync(4, 96);  // rows 96-127's codes are read
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              const int u = 384 + t + 96 * k;
              if (u < 512) emit(u, h[k], hm[k]);
            }
            if (sink == 0x9E3779B9u) b[t] = 1;  // keeps exp_mode 3's arithmetic (wrong results there anyway)
            fence_proxy_async_smem();  // generic-proxy writes, read by wgmma (async proxy)
          } else {
            mbar_wait(&raw[s], ph);  // branch stage: nothing to expand
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(&full[s]);
          if (++s == C::STAGES) {
            s = 0;
            ph ^= 1;
          }
        }
      }
    } else if (kKind == kKindW4a8 && threadIdx.x >= 288 && p.next.units != 0) {
      // ---------------- W4A8: warps 9-11 expand the next GEMM's weight (gemm_expanded) ----------------
      // Off the critical path: nothing here waits on the pipeline, so the loads and stores run beside the main loop
      // (the GEMM leaves DRAM bandwidth and issue slots to spare) instead of in a prep kernel of their own.
      expand_w4a8_units<6>(p.next, blockIdx.x * 96 + (threadIdx.x - 288), gridDim.x * 96);
    }
  } else {
    // ---------------- two consumer warpgroups: 64 rows each ----------------
    // Per tile: the rank-R branch, the main loop of the precision, the epilogue.
    if constexpr (kExp) {  // 128 x 56 + 256 x 224 <= 64 K registers
      setmaxnreg_inc<224>();
    } else {
      setmaxnreg_inc<232>();
    }
    const int wg = threadIdx.x >> 7;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int tq = lane & 3;
    const int r0 = wg * 64 + warp * 16 + (lane >> 2);
    const ConsumerLane cl{wg, warp, lane, tq, r0};
    const bool tma_epi = C::EPI_BYTES > 0 && p.tma_store;  // (only 128- and 256-column tiles have the buffer)
    float acc[BN / 2];
    float tmp0[BN / 2];
    float tmp1[BN / 2];
    int s = 0;
    uint32_t ph = 0;
    if constexpr (kWide) {
      // W4A8, 128 x 256 tiles: the main loop into 128 int32 accumulators per thread, scaled once into fp32 in place,
      // then the rank-R branch's bf16 K-steps accumulated onto them by the tensor cores (a 128 x 128 tile's order,
      // the branch first into a temporary, would need 256 registers). The same terms as the 128-column kernel, one
      // rounding in another place: within fp32 accumulation tolerance of it, not bit-equal.
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        int mt, nt;
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int m0 = mt * BM, n0 = nt * BN;
        std::conditional_t<kVs, SmemVec<BN>, TileVec<BN>> vbias, vscale;
        float4 slot;  // kVs: this thread's slot of the two vectors
        if constexpr (kVs) {
          slot = vec_slot<BN>(p.gscale, p.bias, n0, threadIdx.x & 127);
        } else {  // fetched now: their latency hides behind the main loop
          if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
          else vbias.zero();
          vscale.load(p.gscale + n0, lane);
        }
        const float sa0 = p.ascale[m0 + r0], sa1 = p.ascale[m0 + r0 + 8];
        // zeroed so that their live range starts here: the first wgmma ignores them (scale-d 0) but names them as
        // inputs, and undefined inputs would keep them live through the previous tile's epilogue (ptxas spills)
        int iacc[BN / 2];
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) iacc[j] = 0;
        for (int ki = 0; ki < p.n_main; ++ki)
          consume_stage<C>(smem, full, empty, s, ph, wg, lane, iacc, ki > 0,
                           [](int (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_s8<BN>(d, a, b, sd); });
        if constexpr (kVs) {
          // the previous tile's reads of this buffer ended before its epilogue's last barrier of this warpgroup
          float4* vs = reinterpret_cast<float4*>(smem + C::VEC_OFF) + wg * (BN / 2);
          vs[threadIdx.x & 127] = slot;
          named_bar_sync(2 + wg, 128);
          vscale.slots = vs;
          vbias.slots = vs + BN / 4;
        }
        float wacc[BN / 2];
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          wacc[4 * j + 0] = static_cast<float>(iacc[4 * j + 0]) * (sa0 * gsc.x);
          wacc[4 * j + 1] = static_cast<float>(iacc[4 * j + 1]) * (sa0 * gsc.y);
          wacc[4 * j + 2] = static_cast<float>(iacc[4 * j + 2]) * (sa1 * gsc.x);
          wacc[4 * j + 3] = static_cast<float>(iacc[4 * j + 3]) * (sa1 * gsc.y);
        });
        auto mma_bf16 = [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_bf16<BN>(d, a, b, sd); };
        for (int b = 0; b < p.n_branch; ++b) consume_stage<C>(smem, full, empty, s, ph, wg, lane, wacc, true, mma_bf16);
        if (tma_epi) {
          store_tile_tma<BN, C>(tmC, p, smem, cl, wacc, vbias, m0, n0);
        } else {
          store_tile_direct<BN>(p, cl, wacc, vbias, m0, n0);
          // kVs: every read of the slots before the next tile overwrites them (the TMA epilogue ends on this barrier)
          if constexpr (kVs) named_bar_sync(2 + wg, 128);
        }
      }
    } else
#if SVDQ_DIAGNOSTICS
    if constexpr (kPP) {
      // W4A8 ping-pong (kPingPong): warpgroup w owns the CTA's tiles 2j + w, whole (128 x 128: two m64 halves,
      // 2 x 64 int32 accumulators), and the tensor cores alternate between the warpgroups' main loops: while one
      // runs its main loop the other converts (int32 -> fp32 runs at a quarter rate: ~1k cycles per tile), runs its
      // branch and stores. The stages stay one ring in tile order (each stage read by the warpgroup that owns its
      // tile; the other skips it), so a warpgroup may wait on its first stage only once every earlier stage has
      // landed: an mbarrier parity wait cannot tell phase k from phase k - 2. Hence the order barriers: the other
      // warpgroup arrives once it has waited on all of its tile's stages (the branch's included), just after issuing
      // its last main-loop MMAs. The branch runs after the main loop, accumulating onto the scaled main-loop sums
      // (acc = float(dot) * act_scale * channel_scale, then + branch by the tensor cores): the same terms as the
      // shipped schedule, one rounding in another place (not bit-equal; within fp32 accumulation tolerance).
      constexpr int kOrderBar = 5;  // named barrier kOrderBar + w: warpgroup w may start (the other arrives on it)
      auto skip = [&](int n) {      // advance the ring position by n stages
        s += n;
        while (s >= C::STAGES) {
          s -= C::STAGES;
          ph ^= 1;
        }
      };
      auto release = [&](int& rs) {
        if (lane == 0) mbar_arrive(&empty[rs]);
        if (++rs == C::STAGES) rs = 0;
      };
      if (wg == 1) skip(per_tile);
      const int rw = warp * 16 + (lane >> 2);  // this thread's first row within a 64-row half
      int q = wg;                               // the tile's index in the CTA's sequence
      for (int tile = blockIdx.x + wg * gridDim.x; tile < total; tile += 2 * gridDim.x, q += 2) {
        int mt, nt;
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int m0 = mt * BM, n0 = nt * BN;
        TileVec<BN> vbias, vscale;  // the epilogue's vectors, fetched now: their latency hides behind the main loop
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
        vscale.load(p.gscale + n0, lane);
        const float sa00 = p.ascale[m0 + rw], sa01 = p.ascale[m0 + rw + 8];
        const float sa10 = p.ascale[m0 + 64 + rw], sa11 = p.ascale[m0 + 64 + rw + 8];
        if (q > 0) named_bar_sync(kOrderBar + wg, 256);  // once the other has waited on the previous tile's stages
        // zeroed here so that their live range starts here: the first wgmma of a tile ignores them (scale-d 0) but
        // names them as inputs, and undefined inputs would keep them live through the conversion (ptxas spills)
        int i0[BN / 2], i1[BN / 2];
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) i0[j] = i1[j] = 0;
        int rs = s;  // the oldest stage not yet released
        for (int ki = 0; ki < p.n_main; ++ki) {
          mbar_wait(&full[s], ph);
          uint8_t* st = smem + s * C::STAGE;
          const uint64_t da0 = desc_sw128(st), da1 = desc_sw128(st + 64 * 128), db = desc_sw128(st + C::A_BYTES);
          fence_regs(i0);
          fence_regs(i1);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const int sd = (ki > 0 || kk > 0) ? 1 : 0;
            wgmma::mma_s8<BN>(i0, da0 + 2 * kk, db + 2 * kk, sd);
            wgmma::mma_s8<BN>(i1, da1 + 2 * kk, db + 2 * kk, sd);
          }
          wgmma_commit();
          skip(1);
          if (ki > 0) {  // the previous stage's MMAs are done: hand it back
            wgmma_wait<1>();
            release(rs);
          }
        }
        // As many branch stages as ring slots (R = 128 with fp32 / fp16 proj_up: 6) would wait forever on the slot
        // the last main stage holds: release it first then.
        const bool early = p.n_branch >= C::STAGES;
        if (early) {
          wgmma_wait<0>();
          release(rs);
        }
        const int bs = s;  // the branch's first stage
        for (int b = 0; b < p.n_branch; ++b) {
          mbar_wait(&full[s], ph);
          skip(1);
        }
        if (tile + gridDim.x < total) named_bar_arrive(kOrderBar + 1 - wg, 256);  // the other may start the next
        wgmma_wait<0>();  // (again where early: one unconditional wait before the accumulators are read)
        fence_regs(i0);
        fence_regs(i1);
        if (!early) release(rs);
        float f0[BN / 2], f1[BN / 2];
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          f0[4 * j + 0] = static_cast<float>(i0[4 * j + 0]) * (sa00 * gsc.x);
          f0[4 * j + 1] = static_cast<float>(i0[4 * j + 1]) * (sa00 * gsc.y);
          f0[4 * j + 2] = static_cast<float>(i0[4 * j + 2]) * (sa01 * gsc.x);
          f0[4 * j + 3] = static_cast<float>(i0[4 * j + 3]) * (sa01 * gsc.y);
          f1[4 * j + 0] = static_cast<float>(i1[4 * j + 0]) * (sa10 * gsc.x);
          f1[4 * j + 1] = static_cast<float>(i1[4 * j + 1]) * (sa10 * gsc.y);
          f1[4 * j + 2] = static_cast<float>(i1[4 * j + 2]) * (sa11 * gsc.x);
          f1[4 * j + 3] = static_cast<float>(i1[4 * j + 3]) * (sa11 * gsc.y);
        });
        for (int b = 0, bst = bs; b < p.n_branch; ++b) {  // (the stages were waited on above)
          uint8_t* st = smem + bst * C::STAGE;
          const uint64_t da0 = desc_sw128(st), da1 = desc_sw128(st + 64 * 128), db = desc_sw128(st + C::A_BYTES);
          fence_regs(f0);
          fence_regs(f1);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            wgmma::mma_bf16<BN>(f0, da0 + 2 * kk, db + 2 * kk, 1);
            wgmma::mma_bf16<BN>(f1, da1 + 2 * kk, db + 2 * kk, 1);
          }
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(f0);
          fence_regs(f1);
          release(rs);
          if (++bst == C::STAGES) bst = 0;
        }
        // the two halves through the warpgroup's own epilogue buffer (the second waits for the first's stores to
        // have read it); store_tile_* place rows by cl.wg / cl.r0, so each half gets its origin shifted to match
        ConsumerLane h0 = cl, h1 = cl;
        h0.r0 = rw;
        h1.r0 = 64 + rw;
        if (tma_epi) {
          store_tile_tma<BN, C>(tmC, p, smem, cl, f0, vbias, m0 - 64 * wg, n0);
          store_tile_tma<BN, C>(tmC, p, smem, cl, f1, vbias, m0 + 64 - 64 * wg, n0);
        } else {
          store_tile_direct<BN>(p, h0, f0, vbias, m0, n0);
          store_tile_direct<BN>(p, h1, f1, vbias, m0, n0);
        }
        skip(per_tile);  // the other warpgroup's tile
      }
    } else if constexpr (kOv) {
      // W4A8 with the epilogue deferred (kOverlap): tile t's bias, cast and stores run after tile t + 1's first
      // lag + 1 stages of MMAs are issued, so the tensor cores work through them meanwhile (the shipped
      // schedule leaves them idle for the whole epilogue: ~1.1 us of the ~2.07 us fixed cost per tile). The main loop
      // keeps `lag` stages of MMAs in flight and releases each stage once its MMAs are done. The rank-R branch
      // comes last (the producer loads its stages after the main loop's), into tmp0, so that no third accumulator
      // lives across the epilogue (acc, iacc and the deferred tile's bias), and acc, which the epilogue reads while
      // MMAs are in flight, is never a wgmma accumulator (else ptxas waits for every wgmma before touching it, C7517).
      // Bit-equal to the shipped schedule: the same sums, and acc = fma(main, act_scale * channel_scale, branch).
      constexpr int kLag = overlap_lag(kSched);
      int iacc[BN / 2];
      TileVec<BN> pbias;  // the deferred tile's bias
      pbias.zero();
      int pm0 = -1, pn0 = 0;  // the deferred tile's origin; pm0 < 0: none
      auto epilogue = [&]() {
        if (tma_epi) store_tile_tma<BN, C>(tmC, p, smem, cl, acc, pbias, pm0, pn0);
        else store_tile_direct<BN>(p, cl, acc, pbias, pm0, pn0);
        pm0 = -1;
      };
      for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        int mt, nt;
        tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
        const int m0 = mt * BM, n0 = nt * BN;
        TileVec<BN> vbias, vscale;
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
        vscale.load(p.gscale + n0, lane);
        const float sa0 = p.ascale[m0 + r0], sa1 = p.ascale[m0 + r0 + 8];
        int rs = s;  // the oldest stage whose MMAs have not been waited for
        for (int ki = 0; ki < p.n_main; ++ki) {
          issue_stage_s8<BN, C>(smem, full, s, ph, wg, iacc, ki == 0);
          if (ki == kLag && pm0 >= 0) epilogue();
          if (ki >= kLag) {
            wgmma_wait<kLag>();
            fence_regs(iacc);
            if (lane == 0) mbar_arrive(&empty[rs]);
            if (++rs == C::STAGES) rs = 0;
          }
        }
        wgmma_wait<0>();
        fence_regs(iacc);
        for (int r = 0; r < min(p.n_main, kLag); ++r) {
          if (lane == 0) mbar_arrive(&empty[rs]);
          if (++rs == C::STAGES) rs = 0;
        }
        if (pm0 >= 0) epilogue();  // a main loop of at most kLag stages
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) tmp0[j] = 0.f;
        for (int i = 0; i < p.n_branch; ++i)
          consume_stage<C>(smem, full, empty, s, ph, wg, lane, tmp0, i > 0,
                           [](float (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_bf16<BN>(d, a, b, sd); });
        // as the shipped schedule: acc = fma(main, act_scale * channel_scale, branch)
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          acc[4 * j + 0] = fmaf(static_cast<float>(iacc[4 * j + 0]), sa0 * gsc.x, tmp0[4 * j + 0]);
          acc[4 * j + 1] = fmaf(static_cast<float>(iacc[4 * j + 1]), sa0 * gsc.y, tmp0[4 * j + 1]);
          acc[4 * j + 2] = fmaf(static_cast<float>(iacc[4 * j + 2]), sa1 * gsc.x, tmp0[4 * j + 2]);
          acc[4 * j + 3] = fmaf(static_cast<float>(iacc[4 * j + 3]), sa1 * gsc.y, tmp0[4 * j + 3]);
        });
        pbias = vbias;
        pm0 = m0;
        pn0 = n0;
      }
      if (pm0 >= 0) epilogue();
    } else
#endif
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      int mt, nt;
#if SVDQ_DIAGNOSTICS
      if constexpr (kMc) {
        mc_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
      } else
#endif
      tile_coords(tile, p.m_tiles, p.n_tiles, mt, nt);
      const int m0 = mt * BM, n0 = nt * BN;
#pragma unroll
      for (int j = 0; j < BN / 2; ++j) acc[j] = 0.f;

      // low-rank branch: bf16 K-steps into tmp0, then copied into acc (acc itself is never a wgmma accumulator,
      // so ptxas can keep the main loop's MMAs asynchronous while the FMA pipes update acc)
      // (Written out rather than through consume_stage: with the helper here ptxas spills 8 bytes in the INT4 kernel.)
      for (int i = 0; i < p.n_branch; ++i) {
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
#if SVDQ_DIAGNOSTICS
        if constexpr (kMc) {
          if (lane == 0) mbar_arrive_cluster(&empty[s], rank ^ 1);
        }
#endif
        if (++s == C::STAGES) {
          s = 0;
          ph ^= 1;
        }
      }
      if (p.n_branch > 0) {
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) acc[j] = tmp0[j];
      }
      // The epilogue's vectors, fetched now (after the branch, whose temporary accumulator is dead) so that their
      // latency hides behind the main loop. INT4 fetches its bias in the epilogue instead: 4 more registers live
      // through its promotion loop made that loop 8 % slower (ptxas allocation; measured).
      TileVec<BN> vbias, vscale;
      if constexpr (!kFp8) {
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
        vscale.load(p.gscale + n0, lane);
      }
      float sa0 = 0.f, sa1 = 0.f;
      if constexpr (kI8) sa0 = p.ascale[m0 + r0], sa1 = p.ascale[m0 + r0 + 8];

      if constexpr (kFp8) {
#if SVDQ_DIAGNOSTICS
        if constexpr (kSched == kSkeleton) {
          skeleton_main_loop<BN, C>(p, smem, full, empty, s, ph, cl, acc);
        } else
#endif
        // INT4: a software pipeline over the 64-channel groups with two temporary accumulators. Per stage both
        // groups' MMAs are issued at once (group 0 into tmp0, group 1 into tmp1); group 0 is promoted on the FMA
        // pipes while group 1's MMAs run, so tensor cores and FMA pipes are busy at once, independently of the other
        // warpgroup. (Carrying the pipeline across loop iterations makes ptxas serialize every wgmma, C7514.)
        for (int ki = 0; ki < p.n_main; ++ki) {
          mbar_wait(&full[s], ph);
          const uint8_t* st = smem + s * C::STAGE;
          issue_group<BN, C>(tmp0, st, 0, wg);
          issue_group<BN, C>(tmp1, st, 1, wg);
          wgmma_wait<1>();
          fence_regs(tmp0);
          promote_group<BN, C>(acc, tmp0, st, 0, cl);
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
        // W4A8: exact int32 dot products over all of K (s8 wgmma into one integer accumulator), scaled once:
        // acc += float(dot) * (act_scale[row] * channel_scale[col]). No promotion: the point of that format.
        // (Written out: as a helper like nvfp4_main_loop, or with the scaling in a helper, ptxas assigns the W4A8
        // kernel's registers differently.)
        int iacc[BN / 2];
#if SVDQ_DIAGNOSTICS
        constexpr bool kDrain = kSched != kInflight;
#else
        constexpr bool kDrain = true;
#endif
        if constexpr (kDrain) {  // each stage's MMAs finish before the next stage's are issued
          auto mma = [](int (&d)[BN / 2], uint64_t a, uint64_t b, int sd) { wgmma::mma_s8<BN>(d, a, b, sd); };
#if SVDQ_DIAGNOSTICS
          if constexpr (kMc) {
            for (int ki = 0; ki < p.n_main; ++ki)
              consume_stage<C, true>(smem, full, empty, s, ph, wg, lane, iacc, ki > 0, mma, rank ^ 1);
          } else
#endif
          for (int ki = 0; ki < p.n_main; ++ki) consume_stage<C>(smem, full, empty, s, ph, wg, lane, iacc, ki > 0, mma);
        } else {
          // One stage of MMAs in flight (as CUTLASS's sm90 main loops): stage k + 1's MMAs are issued before stage
          // k's are waited for, so the tensor cores never drain between stages (draining leaves them idle while
          // the warp waits, arrives, waits on the next stage and issues: the main loop ran ~600 cycles per stage
          // against 512 of MMAs). A stage goes back to the producer once the MMAs after it are issued: one ring
          // slot less of look-ahead. Integer sums: bit-equal to the draining loop.
          int rs = s;  // the oldest stage not yet released
          for (int ki = 0; ki < p.n_main; ++ki) {
            issue_stage_s8<BN, C>(smem, full, s, ph, wg, iacc, ki == 0);
            if (ki > 0) {
              wgmma_wait<1>();
              if (lane == 0) mbar_arrive(&empty[rs]);
              if (++rs == C::STAGES) rs = 0;
            }
          }
          wgmma_wait<0>();
          fence_regs(iacc);
          if (p.n_main > 0 && lane == 0) mbar_arrive(&empty[rs]);
        }
#if SVDQ_DIAGNOSTICS
        if constexpr (kSched == kCvtMagic) {
          float f[BN / 2];
          cvt_i32_exact<BN / 2>(iacc, f);
          static_for<BN / 8>([&](auto jc) {
            constexpr int j = decltype(jc)::value;
            const float2 gsc = vscale.template at<j>(tq);
            acc[4 * j + 0] = fmaf(f[4 * j + 0], sa0 * gsc.x, acc[4 * j + 0]);
            acc[4 * j + 1] = fmaf(f[4 * j + 1], sa0 * gsc.y, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(f[4 * j + 2], sa1 * gsc.x, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(f[4 * j + 3], sa1 * gsc.y, acc[4 * j + 3]);
          });
        } else
#endif
        static_for<BN / 8>([&](auto jc) {
          constexpr int j = decltype(jc)::value;
          const float2 gsc = vscale.template at<j>(tq);
          acc[4 * j + 0] = fmaf(static_cast<float>(iacc[4 * j + 0]), sa0 * gsc.x, acc[4 * j + 0]);
          acc[4 * j + 1] = fmaf(static_cast<float>(iacc[4 * j + 1]), sa0 * gsc.y, acc[4 * j + 1]);
          acc[4 * j + 2] = fmaf(static_cast<float>(iacc[4 * j + 2]), sa1 * gsc.x, acc[4 * j + 2]);
          acc[4 * j + 3] = fmaf(static_cast<float>(iacc[4 * j + 3]), sa1 * gsc.y, acc[4 * j + 3]);
        });
      } else {
        nvfp4_main_loop<BN, C>(p, smem, full, empty, s, ph, cl, acc, tmp1, vscale);
      }

      // epilogue: + bias, cast, store
      if constexpr (kFp8) {
        if (p.bias != nullptr) vbias.load(p.bias + n0, lane);
        else vbias.zero();
      }
      if (tma_epi) {
        store_tile_tma<BN, C>(tmC, p, smem, cl, acc, vbias, m0, n0);
        continue;
      }
#if SVDQ_DIAGNOSTICS
      // kStore = false: no stores (the impossible-value test keeps the accumulation alive for the compiler)
      if constexpr (!kStore) {
        if (acc[0] != -1234.5f) continue;
      }
#endif
      store_tile_direct<BN>(p, cl, acc, vbias, m0, n0);
    }
    // the last tile's TMA stores must have landed before the CTA exits
    if (tma_epi && (threadIdx.x & 127) == 0) bulk_wait<0>();
  }
#if SVDQ_DIAGNOSTICS
  // kMc: neither CTA exits while the other may still arrive on its barriers
  if constexpr (kMc) cluster_sync();
#endif
#else
  __trap();  // built for another architecture: the host only launches this on sm_90a builds
#endif
}

}  // namespace sm90

}  // namespace gemm
}  // namespace cuda_impl
}  // namespace svdquant
