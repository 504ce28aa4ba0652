// CUDA implementation of svdquant::gemm (semantics: ../cpu/gemm.cpp): argument plumbing and dispatch. The kernels
// live in gemm/ (README.md in this folder has the design):
//   Hopper path (compute capability 9.0, library built for sm_90a), on the current stream:
//     1. gemm/prep.cuh  prep_kernel: expands both operands into 8-bit tensor-core inputs and the scales, low-rank
//                       operands, bias and global scale into the layouts step 2 loads, in one workspace;
//     2. gemm/sm90.cuh  sm90::gemm_kernel: persistent, warp-specialized TMA + wgmma GEMM with the rank-R branch,
//                       the per-group promotion (INT4), and a TMA-store epilogue.
//   Portable path (other GPUs, SVDQUANT_OPS_CUDA_PORTABLE=1, or index ranges past 32 bits):
//     gemm/portable.cuh gemm_portable_kernel: bit-identical to the CPU op.
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "../checks.h"
#include "../formats.h"
#include "common.cuh"
#include "gemm/io.cuh"
#include "gemm/portable.cuh"
#include "gemm/prep.cuh"
#include "gemm/sm90.cuh"
#include "gemm/sm90_rega.cuh"
#include "ops_cuda.h"

namespace svdquant {
namespace cuda_impl {
namespace {
thread_local int t_cta_cap = 0;  // CtaCap's (ops_cuda.h)

// A persistent GEMM's grid for `tiles` tiles: one CTA per SM, at most one per tile and at most a live CtaCap's.
int persistent_grid(int tiles) {
  return std::min(tiles, t_cta_cap > 0 ? std::min(t_cta_cap, num_sms()) : num_sms());
}
}  // namespace

CtaCap::CtaCap(int cap) : saved_(t_cta_cap) { t_cta_cap = cap; }
CtaCap::~CtaCap() { t_cta_cap = saved_; }

int device_sm_count() { return num_sms(); }

int parallel_reserved_sms() {
  const char* v = std::getenv("SVDQUANT_OPS_CUDA_PARALLEL_SMS");
  if (v == nullptr || v[0] == '\0') return 0;
  char* end = nullptr;
  const long s = std::strtol(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && s >= 0 && s < num_sms(),
              "svdquant: SVDQUANT_OPS_CUDA_PARALLEL_SMS must be a whole number of SMs in [0, ", num_sms() - 1,
              "] or unset, got '", v, "'");
  return static_cast<int>(s);
}

namespace gemm {
namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

at::Tensor contiguous_aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  if (!aligned16(c.data_ptr())) c = c.clone();
  return c;
}

// The op's tensors as the kernels read them: contiguous, codes 16-byte aligned (vector loads, TMA).
struct Operands {
  at::Tensor act_codes, act_scales, codes, scales, down_act, proj_up;
  std::optional<at::Tensor> bias, global_scale;
};

Operands contiguous_operands(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                             const at::Tensor& scales, const std::optional<at::Tensor>& global_scale,
                             const at::Tensor& down_act, const at::Tensor& proj_up,
                             const std::optional<at::Tensor>& bias) {
  Operands o;
  o.act_codes = contiguous_aligned(act_codes);
  o.codes = contiguous_aligned(codes);
  o.act_scales = act_scales.contiguous();
  o.scales = scales.contiguous();
  o.down_act = down_act.contiguous();
  o.proj_up = proj_up.contiguous();
  if (bias.has_value()) o.bias = bias->contiguous();
  if (global_scale.has_value()) o.global_scale = global_scale->contiguous();
  return o;
}

// ------------------------------------------------------------------------------------------------------------------
// Portable path
// ------------------------------------------------------------------------------------------------------------------
// `weight`: W4A8's expanded int8 weight [N, K] (gemm_expanded), read instead of the codes and multipliers.
void launch_portable(const GemmShape& s, const Operands& o, bool act_unsigned, at::Tensor& out,
                     cudaStream_t stream, const at::Tensor* weight = nullptr) {
  PortableArgs p{};
  p.a_codes = static_cast<const uint8_t*>(o.act_codes.data_ptr());
  p.a_scales = o.act_scales.data_ptr();
  p.a_kind = kind_of(o.act_scales.scalar_type());
  p.w_codes = weight != nullptr ? static_cast<const uint8_t*>(weight->data_ptr()) : o.codes.data_ptr<uint8_t>();
  p.w_expanded = weight != nullptr;
  p.w_scales = o.scales.data_ptr();
  p.w_kind = kind_of(o.scales.scalar_type());
  const auto& gsc = o.global_scale;
  p.gscale = gsc.has_value() ? gsc->data_ptr<float>() : nullptr;
  p.gscale_numel = gsc.has_value() ? gsc->numel() : 0;
  if (gsc.has_value() && !s.per_channel_global_scale) p.gscale_numel = 1;
  p.down_act = s.R > 0 ? o.down_act.data_ptr<float>() : nullptr;
  p.proj_up = s.R > 0 ? o.proj_up.data_ptr() : nullptr;
  p.up_kind = kind_of(o.proj_up.scalar_type());
  p.bias = o.bias.has_value() ? o.bias->data_ptr() : nullptr;
  p.bias_kind = o.bias.has_value() ? kind_of(o.bias->scalar_type()) : kF32;
  p.out = out.data_ptr();
  p.out_kind = kind_of(out.scalar_type());
  p.M = s.M;
  p.N = s.N;
  p.K = s.K;
  p.G = s.G;
  p.R = static_cast<int>(s.R);
  p.nvfp4 = s.precision == Precision::kNvfp4;
  p.act_unsigned = act_unsigned;
  p.w4a8 = s.precision == Precision::kW4a8;
  const dim3 grid(static_cast<unsigned>((s.N + 63) / 64), static_cast<unsigned>((s.M + 63) / 64));
  gemm_portable_kernel<<<grid, 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "gemm portable");
}

// W4A8 weight expansion as a kernel of its own (expand_w4a8_weight, and the next weight of a gemm_expanded call that
// does not take the Hopper path). `codes` contiguous and 8-byte aligned (contiguous_aligned gives 16), `mult`
// contiguous, `out` [N, K] int8, 16-byte aligned.
ExpandJob expand_job(const at::Tensor& codes, const at::Tensor& mult, at::Tensor& out, const char* op) {
  // below 2^31 units, the expansion loops' 32-bit unit counters cannot wrap (they step by < 2^21 past the end)
  const int64_t units = codes.size(0) * codes.size(1) / 8;
  TORCH_CHECK(units < (int64_t(1) << 31), op, ": the weight to expand has ", codes.size(0) * codes.size(1) * 2,
              " codes, more than the CUDA kernel indexes (2^35)");
  ExpandJob j{};
  j.codes = codes.data_ptr<uint8_t>();
  j.mult = mult.data_ptr<uint8_t>();
  j.out = static_cast<uint8_t*>(out.data_ptr());
  j.units = static_cast<uint32_t>(units);
  j.warp = w4a8_expand_warp();
  return j;
}

void launch_expand(const ExpandJob& j, cudaStream_t stream) {
  if (j.units == 0) return;
  constexpr int64_t kPerBlock = 256 * kExpandUnitsPerThread;
  const unsigned gx = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((int64_t(j.units) + kPerBlock - 1) / kPerBlock, 8 * num_sms())));
  if (j.warp)
    expand_w4a8_kernel<true><<<gx, 256, 0, stream>>>(j);
  else
    expand_w4a8_kernel<false><<<gx, 256, 0, stream>>>(j);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  debug_sync(stream, "expand_w4a8_weight");
}

// ------------------------------------------------------------------------------------------------------------------
// Hopper path
// ------------------------------------------------------------------------------------------------------------------

// The Hopper kernels index with 32-bit integers: larger problems take the portable path.
bool fits_sm90_indexing(const GemmShape& s) {
  const int64_t kMax32 = int64_t(1) << 31;
  return s.M * (s.K / 16) < kMax32 && s.N * (s.K / 16) < kMax32 && (s.M + 128) * 3 * (s.R + 64) < kMax32 &&
         (s.N + 128) * 3 * (s.R + 64) < kMax32 && s.G * (s.M + 4) < kMax32 && s.G * (s.N + 256) < kMax32;
}

// Which sm90 kernel variant runs. A normal build always runs the shipped one (the defaults).
struct Variant {
  int sched = sm90::kPromote;
  bool wide = false;          // 128 x 192 tiles (INT4 skeleton only)
  bool force_direct = false;  // register -> global epilogue even where the TMA-store epilogue applies
  bool store = true;          // false: no stores at all (results are garbage)
  bool w4_expand = false;     // W4A8: 4-bit weights expanded inside the GEMM kernel, no weight prep (bit-equal, 3.5x slower)
  int w4_expand_mode = 0;     // 0 full; 1 multipliers as 1; 2 no expansion; 3 no stores; 4 no arithmetic (1-4: wrong)
  bool pingpong_auto = false;  // W4A8: ping-pong only where w4a8_pingpong_pays() expects it to win
};

#if SVDQ_DIAGNOSTICS
// Diagnostics builds only, read at every call (benchmarks switch between variants in one process):
//   SVDQUANT_OPS_GEMM_SCHEDULE = promote (default) | skeleton | skeleton192 | overlap | overlap3 | pingpong |
//     pingpong-auto: skeleton is the INT4 main loop without the promotion (wrong results; the speed of the TMA /
//     wgmma feed alone; 192: 128 x 192 tiles); overlap is W4A8 with each tile's epilogue under the next tile's first
//     MMAs, 2 stages of MMAs in flight (sm90::kOverlap; W4A8 calls only), overlap3 the same with 3
//     (sm90::kOverlapDeep); pingpong is W4A8 with whole tiles per consumer warpgroup, one's epilogue under the other's
//     main loop (sm90::kPingPong), pingpong-auto the same only where w4a8_pingpong_pays() (other W4A8 calls: promote);
//     promote-cvt is the shipped W4A8 schedule converting its int32 sums to fp32 by a magic-number add instead of the
//     quarter-rate I2F (sm90::kCvtMagic, cvt_i32_exact; bit-equal); inflight is the shipped W4A8 schedule keeping one
//     stage of MMAs in flight in its main loop instead of draining the tensor cores every stage (sm90::kInflight;
//     bit-equal); halffeed is the shipped W4A8 schedule whose main-loop stages load only the weight tile (wrong
//     results: the speed with half the operand feed, sm90::kHalfFeed); multicast is the shipped W4A8 schedule on
//     clusters of two CTAs whose tiles share their rows, each loading half of the activation tile for both
//     (sm90::kMulticast; bit-equal; calls with an odd number of column tiles run the shipped one); ring4 / ring5 /
//     ring7 are the shipped W4A8 schedule with a ring of 4 / 5 / 7 stages instead of 6 (sm90::kRing*; bit-equal;
//     ring7 has no room for the epilogue buffer and stores directly); halffeed-act is halffeed's mirror, the main-loop
//     stages loading only the activation tile (sm90::kHalfFeedAct; wrong results);
//   SVDQUANT_OPS_GEMM_EPILOGUE = tma (default) | direct | none: force the register -> global epilogue, or skip the
//     stores (wrong results; splits a tile's time between main loop and stores);
//   SVDQUANT_OPS_GEMM_WPREP = prep (default) | kernel | kernel-nomult | kernel-noexpand | kernel-nostore |
//     kernel-noarith: W4A8's weights expanded by
//     the prep kernel, or inside the GEMM kernel from the 4-bit codes (sm90::kKindW4a8Expand; bit-equal to prep on
//     the H200 but 3.5x slower); -nomult takes every multiplier as 1, -noexpand skips the expansion, -nostore computes
//     without storing, -noarith stores the staged codes without computing (all four wrong results: they split the
//     expander's time).
Variant diagnostic_variant() {
  Variant v;
  if (const char* e = std::getenv("SVDQUANT_OPS_GEMM_SCHEDULE"); e != nullptr && e[0] != '\0') {
    struct Named {
      const char* name;
      int sched;
      bool wide, pingpong_auto;
    };
    static constexpr Named kNames[] = {
        {"promote", sm90::kPromote, false, false},      {"skeleton", sm90::kSkeleton, false, false},
        {"skeleton192", sm90::kSkeleton, true, false},  {"overlap", sm90::kOverlap, false, false},
        {"overlap3", sm90::kOverlapDeep, false, false}, {"pingpong", sm90::kPingPong, false, false},
        {"pingpong-auto", sm90::kPingPong, false, true}, {"promote-cvt", sm90::kCvtMagic, false, false},
        {"inflight", sm90::kInflight, false, false},    {"halffeed", sm90::kHalfFeed, false, false},
        {"multicast", sm90::kMulticast, false, false},  {"ring4", sm90::kRing4, false, false},
        {"ring5", sm90::kRing5, false, false},          {"ring7", sm90::kRing7, false, false},
        {"halffeed-act", sm90::kHalfFeedAct, false, false}};
    const Named* hit = nullptr;
    std::string names;
    for (const Named& n : kNames) {
      if (std::strcmp(e, n.name) == 0) hit = &n;
      names += names.empty() ? n.name : std::string(", ") + n.name;
    }
    TORCH_CHECK(hit != nullptr, "SVDQUANT_OPS_GEMM_SCHEDULE: expected one of ", names, ", got '", e, "'");
    v.sched = hit->sched;
    v.wide = hit->wide;
    v.pingpong_auto = hit->pingpong_auto;
  }
  const char* epi = std::getenv("SVDQUANT_OPS_GEMM_EPILOGUE");
  v.force_direct = epi != nullptr && (std::strcmp(epi, "direct") == 0 || std::strcmp(epi, "none") == 0);
  v.store = !(epi != nullptr && std::strcmp(epi, "none") == 0);
  const char* wp = std::getenv("SVDQUANT_OPS_GEMM_WPREP");  // prep (default) | kernel
  v.w4_expand = wp != nullptr && std::strncmp(wp, "kernel", 6) == 0;
  v.w4_expand_mode = !v.w4_expand ? 0 : std::strcmp(wp, "kernel-nomult") == 0 ? 1 : std::strcmp(wp, "kernel-noexpand") == 0 ? 2
                       : std::strcmp(wp, "kernel-nostore") == 0  ? 3
                       : std::strcmp(wp, "kernel-noarith") == 0  ? 4
                                                                  : 0;
  TORCH_CHECK(wp == nullptr || wp[0] == '\0' || std::strcmp(wp, "prep") == 0 || std::strcmp(wp, "kernel") == 0 ||
                  v.w4_expand_mode != 0,
              "SVDQUANT_OPS_GEMM_WPREP: expected prep, kernel, kernel-nomult, kernel-noexpand, kernel-nostore or kernel-noarith, got '", wp, "'");
  return v;
}
#endif

// Tile shape and workspace layout of one call: byte offsets of the prep kernel's outputs in one buffer.
struct Sm90Plan {
  int M, N, K, G, R;
  int BN, m_tiles, n_tiles, SWP;
  int64_t Mp, Np;  // padded token count (activation scales), padded channel count (bias, global scale)
  int nseg, KL;    // bf16 parts of the branch (2: proj_up is bf16, else 3) and its padded K extent
  int64_t oA, oB, oSA, oSW, oLA, oUP, oBias, oGs, bytes;
};

// 128 x 128 tiles: three 64-column fp32 accumulator sets per thread (the result and two in-flight groups) fit the
// 232 registers of a consumer thread; 128 x 192 would not (only the INT4 skeleton diagnostic uses it). W4A8 may run
// 128 x 256 tiles (w4a8_bn = 256: one int32 accumulator set of 128 registers, w4a8_tile_bn).
// `rega`: W4A8 by sm90::rega_kernel: tiles of 256 tokens x 128 weight rows (m_tiles counts token tiles, BN = 128 the
// weight rows), no expanded weight (the caller passes w4_expand).
Sm90Plan plan_sm90(const GemmShape& s, at::ScalarType up_dtype, bool wide, bool w4_expand, int w4a8_bn = 128,
                   bool rega = false) {
  const bool nvfp4 = s.precision == Precision::kNvfp4;
  const bool w4a8 = s.precision == Precision::kW4a8;
  Sm90Plan pl{};
  pl.M = static_cast<int>(s.M), pl.N = static_cast<int>(s.N), pl.K = static_cast<int>(s.K);
  pl.G = static_cast<int>(s.G), pl.R = static_cast<int>(s.R);
  const int tm = rega ? sm90::RegaCfg::TT : sm90::BM;  // tokens per tile
  pl.m_tiles = (pl.M + tm - 1) / tm;
  pl.BN = rega ? sm90::RegaCfg::TW : (w4a8 ? w4a8_bn : ((wide && !nvfp4) ? 192 : 128));
  pl.n_tiles = (pl.N + pl.BN - 1) / pl.BN;
  pl.SWP = pl.BN + 16;
  pl.Np = int64_t(pl.n_tiles) * pl.BN;
  // W4A8 reads its per-token scales in the epilogue without bounds checks: pad them to whole row tiles.
  pl.Mp = w4a8 ? int64_t(pl.m_tiles) * tm : round_up(pl.M, 4);
  pl.nseg = pl.R == 0 ? 0 : (up_dtype == at::kBFloat16 ? 2 : 3);
  pl.KL = static_cast<int>(round_up(int64_t(pl.nseg) * pl.R, 64));
  const int elem = nvfp4 ? 2 : 1;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += round_up(std::max<int64_t>(bytes, 1), 256);
    return o;
  };
  pl.oA = take(w4a8 ? 0 : int64_t(pl.M) * pl.K * elem);
  pl.oB = take(w4_expand ? 0 : int64_t(pl.N) * pl.K * elem);
  pl.oSA = take(nvfp4 ? 0 : (w4a8 ? 1 : int64_t(pl.G)) * pl.Mp * 4);
  pl.oSW = take((nvfp4 || w4a8) ? 0 : int64_t(pl.G) * pl.n_tiles * pl.SWP * 4);
  pl.oLA = take(int64_t(pl.M) * pl.KL * 2);
  pl.oUP = take(int64_t(pl.N) * pl.KL * 2);
  pl.oBias = take(pl.Np * 4);
  pl.oGs = take(pl.Np * 4);
  pl.bytes = off;
  return pl;
}

// W4A8's tile width for one call (SVDQUANT_OPS_CUDA_W4A8_TILE, else this estimate). A persistent grid takes
// ceil(tiles / SMs) rounds of (fixed + stages x per-stage) per tile. In units of a 128 x 128 tile's stage, a
// 128 x 256 tile's stage costs 1.7 (measured on an H100: 1.70 at K = 15360, 1.8 at K = 12288, where the bytes per
// stage alone would give 1.5; benchmarks/results/2026-12-06-h100-w4a8-tiles.md) and the fixed costs per tile are
// ~2.5 / ~3 stages. Wider tiles halve the tile count, so where that leaves SMs idle in the last round (FLUX.1's
// 512-token text stream: 0.66-0.87x there) the narrow tile wins; on its 4096 / 4608-token GEMMs the wide one
// (1.03-1.10x), and the estimate picks the faster width on each of them.
int w4a8_tile_bn(const GemmShape& s, const Sm90Plan& narrow) {
  const int forced = w4a8_tile();
  if (forced != 0) return forced;
  const double stages = (s.K + 127) / 128 + narrow.KL / 64;
  auto est = [&](int bn, double fixed, double per_stage) {
    const int64_t tiles = int64_t(narrow.m_tiles) * ((s.N + bn - 1) / bn);
    return double((tiles + num_sms() - 1) / num_sms()) * (fixed + per_stage * stages);
  };
  return est(256, 3.0, 1.7) < est(128, 2.5, 1.0) ? 256 : 128;
}

PrepArgs prep_args(const GemmShape& s, const Sm90Plan& pl, const Operands& o, bool act_unsigned, uint8_t* base) {
  PrepArgs pa{};
  pa.a_codes = static_cast<const uint8_t*>(o.act_codes.data_ptr());
  pa.a_scales = o.act_scales.data_ptr();
  pa.a_scale_kind = kind_of(o.act_scales.scalar_type());
  pa.down_act = pl.R > 0 ? o.down_act.data_ptr<float>() : nullptr;
  pa.M = pl.M;
  pa.K = pl.K;
  pa.G = pl.G;
  pa.R = pl.R;
  pa.KL = pl.KL;
  pa.nseg = pl.nseg;
  pa.Mp = pl.Mp;
  pa.A = base + pl.oA;
  pa.SA = reinterpret_cast<float*>(base + pl.oSA);
  pa.LA = reinterpret_cast<__nv_bfloat16*>(base + pl.oLA);
  pa.w_codes = o.codes.data_ptr<uint8_t>();
  pa.w_scales = o.scales.data_ptr();
  pa.w_scale_kind = kind_of(o.scales.scalar_type());
  pa.proj_up = pl.R > 0 ? o.proj_up.data_ptr() : nullptr;
  pa.up_kind = kind_of(o.proj_up.scalar_type());
  pa.bias = o.bias.has_value() ? o.bias->data_ptr() : nullptr;
  pa.bias_kind = o.bias.has_value() ? kind_of(o.bias->scalar_type()) : kF32;
  const auto& gsc = o.global_scale;
  pa.gscale = gsc.has_value() ? gsc->data_ptr<float>() : nullptr;
  pa.gscale_numel = gsc.has_value() ? (s.per_channel_global_scale ? gsc->numel() : 1) : 0;
  pa.N = pl.N;
  pa.n_tiles = pl.n_tiles;
  pa.BN = pl.BN;
  pa.SWP = pl.SWP;
  pa.Np = pl.Np;
  pa.B = base + pl.oB;
  pa.SW = reinterpret_cast<float*>(base + pl.oSW);
  pa.UP = reinterpret_cast<__nv_bfloat16*>(base + pl.oUP);
  pa.biasf = reinterpret_cast<float*>(base + pl.oBias);
  pa.gsf = reinterpret_cast<float*>(base + pl.oGs);
  pa.nvfp4 = s.precision == Precision::kNvfp4;
  pa.act_unsigned = act_unsigned;
  pa.w4a8 = s.precision == Precision::kW4a8;
  pa.one_unit = pa.w4a8 && w4a8_prep_units() == 1;
  pa.warp_expand = pa.w4a8 && w4a8_expand_warp();
  return pa;
}

// Grid: x strides over the 16-channel units of the larger operand, y = 0 activations, 1 weights, 2 the rest.
// (W4A8 with the weights expanded elsewhere: as many threads as the small operands need.)
void launch_prep(const PrepArgs& pa, const Sm90Plan& pl, cudaStream_t stream) {
  const int64_t units = pa.w4a8 && pa.skip_b
                            ? (int64_t(pl.M) + pl.N) * (pl.KL / 8) + pl.Mp + 2 * pl.Np
                            : std::max<int64_t>(int64_t(pl.M), int64_t(pl.N)) * (pl.K / 16);
  const unsigned gx =
      static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((units + 255) / 256, 8 * num_sms())));
  // Rows 0 .. first_row - 1 have nothing to do (prep_kernel returns at once there): left out unless
  // SVDQUANT_OPS_CUDA_PREP_ROWS=all (common.cuh)
  PrepArgs args = pa;
  args.first_row = !prep_used_rows() ? 0 : pa.w4a8 ? (pa.skip_b ? 2 : 1) : (pa.weights_only ? 1 : 0);
  launch_kernel(pa.warp_expand ? prep_kernel<true> : prep_kernel<false>, dim3(gx, 3 - args.first_row), dim3(256), 0,
                stream, args);
  debug_sync(stream, "gemm prep");
}

// ---------------- TMA descriptors ----------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled, resolved on the first call (thread-safe static initialization).
EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && ptr != nullptr,
                "svdquant::gemm: cuTensorMapEncodeTiled is not available from the CUDA driver");
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// A 2-D row-major tensor [outer, inner] with `row_bytes` between rows, loaded / stored in boxes of
// box_outer x box_inner elements.
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
  TORCH_CHECK(r == CUDA_SUCCESS, "svdquant::gemm: cuTensorMapEncodeTiled failed (CUresult ", int(r), ") for a ",
              outer, " x ", inner, " tensor");
  return map;
}

CUtensorMap unused_map() {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  return map;
}

// The sm90 kernel's operands. Maps a precision does not use stay zero (the kernel never touches them).
struct TensorMaps {
  CUtensorMap A, B, SA, SW, LA, UP, C;
};

TensorMaps make_tensor_maps(const GemmShape& s, const Sm90Plan& pl, const Operands& o, uint8_t* base,
                            const at::Tensor& out, bool tma_store) {
  const auto swz = CU_TENSOR_MAP_SWIZZLE_128B;
  const int M = pl.M, N = pl.N, K = pl.K, G = pl.G, BN = pl.BN;
  TensorMaps m{unused_map(), unused_map(), unused_map(), unused_map(), unused_map(), unused_map(), unused_map()};
  if (s.precision == Precision::kW4a8) {  // the activation codes are already int8 [M, K]: no copy
    m.A = make_map(o.act_codes.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, K, M, K, 128, sm90::BM, swz);
    m.B = make_map(base + pl.oB, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, N, K, 128, BN, swz);
  } else if (s.precision == Precision::kInt4) {
    m.A = make_map(base + pl.oA, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, M, K, 128, sm90::BM, swz);
    m.B = make_map(base + pl.oB, CU_TENSOR_MAP_DATA_TYPE_UINT8, K, N, K, 128, BN, swz);
    m.SA = make_map(base + pl.oSA, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, pl.Mp, G, pl.Mp * 4, sm90::BM, 2,
                    CU_TENSOR_MAP_SWIZZLE_NONE);
    m.SW = make_map(base + pl.oSW, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, int64_t(pl.n_tiles) * pl.SWP, G,
                    int64_t(pl.n_tiles) * pl.SWP * 4, pl.SWP, 2, CU_TENSOR_MAP_SWIZZLE_NONE);
  } else {
    m.A = make_map(base + pl.oA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, K, M, int64_t(K) * 2, 64, sm90::BM, swz);
    m.B = make_map(base + pl.oB, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, K, N, int64_t(K) * 2, 64, BN, swz);
  }
  if (pl.KL > 0) {
    m.LA = make_map(base + pl.oLA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pl.KL, M, int64_t(pl.KL) * 2, 64, sm90::BM, swz);
    m.UP = make_map(base + pl.oUP, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pl.KL, N, int64_t(pl.KL) * 2, 64, BN, swz);
  }
  if (tma_store) {
    m.C = make_map(out.data_ptr(),
                   out.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                   N, M, int64_t(N) * 2, 64, 64, swz);
  }
  return m;
}

sm90::Params sm90_params(const GemmShape& s, const Sm90Plan& pl, const PrepArgs& pa, const at::Tensor& out,
                         bool has_bias, bool tma_store) {
  sm90::Params p{};
  p.bias = has_bias ? pa.biasf : nullptr;
  p.gscale = pa.gsf;
  p.ascale = pa.SA;
  p.out = out.data_ptr();
  p.M = pl.M;
  p.N = pl.N;
  p.m_tiles = pl.m_tiles;
  p.n_tiles = pl.n_tiles;
  // K steps per tile: INT4 / W4A8 128 channels per stage, NVFP4 64 (bf16); the branch 64 bf16 channels per stage
  p.n_main = s.precision == Precision::kNvfp4 ? (pl.K + 63) / 64 : (pl.K + 127) / 128;
  p.n_branch = pl.KL / 64;
  p.out_kind = kind_of(out.scalar_type());
  p.tma_store = tma_store;
  return p;
}

template <int BN, int kKind, int kSched, bool kStore>
void launch_sm90(const TensorMaps& m, const sm90::Params& p, cudaStream_t stream) {
  using C = sm90::Cfg<BN, kKind, sm90::ring_stages(kSched), kSched == sm90::kVecSmem>;
  auto kernel = sm90::gemm_kernel<BN, kKind, kSched, kStore>;
  static PerDeviceOnce smem_attr;  // per instantiation and device, on its first (eager) call
  set_max_dynamic_smem(smem_attr, kernel, C::SMEM);
  const int grid = persistent_grid(p.m_tiles * p.n_tiles);
  launch_kernel(kernel, dim3(grid), dim3(384), C::SMEM, stream, m.A, m.B, m.SA, m.SW, m.LA, m.UP, m.C, p);
  debug_sync(stream, "gemm sm90");
}

#if SVDQ_DIAGNOSTICS
// kMulticast: clusters of two CTAs (one tile pair each at a time), as many clusters as can be resident at once,
// asked once per device (cudaOccupancyMaxActiveClusters, which may fail inside a graph capture: then not remembered).
// Returns false where no cluster of two fits or the driver cannot say now: the caller runs the shipped schedule.
template <int kSched, bool kStore>
bool launch_sm90_pairs(const TensorMaps& m, const sm90::Params& p, cudaStream_t stream) {
  using C = sm90::Cfg<128, sm90::kKindW4a8, sm90::ring_stages(kSched)>;
  auto kernel = sm90::gemm_kernel<128, sm90::kKindW4a8, kSched, kStore>;
  static PerDeviceOnce smem_attr;
  set_max_dynamic_smem(smem_attr, kernel, C::SMEM);
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(384);
  cfg.dynamicSmemBytes = C::SMEM;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cfg.gridDim = dim3(2);
  static PerDeviceOnce asked;
  static int clusters[kMaxDevices];
  try {
    asked([&] {
      int n = 0;
      const cudaError_t err = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        throw std::runtime_error(cudaGetErrorString(err));
      }
      clusters[current_device_index()] = n;
    });
  } catch (const std::runtime_error&) {
    return false;
  }
  const int n = clusters[current_device_index()];
  if (n < 1) return false;
  const int pairs = p.m_tiles * p.n_tiles / 2;
  cfg.gridDim = dim3(2 * std::min(pairs, n));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, m.A, m.B, m.SA, m.SW, m.LA, m.UP, m.C, p));
  debug_sync(stream, "gemm sm90 (2-CTA clusters)");
  return true;
}

// The W4A8 diagnostics schedules launched as the shipped one is, only the kernel's schedule index changed: launches
// the one of kScheds equal to `sched`, if any.
template <bool kStore, int... kScheds>
bool launch_w4a8_as(int sched, const TensorMaps& m, const sm90::Params& p, cudaStream_t stream) {
  return ((sched == kScheds && (launch_sm90<128, sm90::kKindW4a8, kScheds, kStore>(m, p, stream), true)) || ...);
}

// Where the W4A8 ping-pong (diagnostics) beat the shipped schedule on the H200: every CTA gets two tiles or more and
// K is at most 32 stages of 128 (0.96-0.98x of the time at K = 3072, M = 4608, N = 3072 / 9216 / 12288; 0.89x at
// K = 128); it lost at K = 12288 / 15360 (1.03-1.04x) and with fewer than two tiles per CTA (1.05-1.08x), where one
// warpgroup's MMAs alone feed the tensor cores most of the time. On an H100 a FLUX.1 step's GEMMs under this rule
// took +1.7 % (benchmarks/results/2026-12-05-h200-w4a8-pingpong.md), so it is not shipped.
bool w4a8_pingpong_pays(const sm90::Params& p) {
  return p.n_main <= 32 && int64_t(p.m_tiles) * p.n_tiles >= 2 * int64_t(num_sms()) &&
         p.n_branch <= sm90::Cfg<128, sm90::kKindW4a8>::STAGES;  // (its consumers' limit: branch stages fit the ring)
}
#endif

// The kernel instantiation of (precision, variant). A normal build compiles the four shipped ones (W4A8's 128 x 256
// kernel as kVecSmem) and the 128 x 256 kernel's shuffle variant, kPromote (SVDQUANT_OPS_CUDA_W4A8_EPI=shfl).
template <bool kStore>
void launch_variant(Precision precision, [[maybe_unused]] const Variant& v, int bn, const TensorMaps& m,
                    const sm90::Params& p, cudaStream_t stream) {
  // (the plan gives 256 only where the variant's schedule is the shipped one: kVecSmem, or kPromote with =shfl)
  if (precision == Precision::kW4a8 && bn == 256 && w4a8_epi_smem()) {
    launch_sm90<256, sm90::kKindW4a8, sm90::kVecSmem, kStore>(m, p, stream);
  } else if (precision == Precision::kW4a8 && bn == 256) {
    launch_sm90<256, sm90::kKindW4a8, sm90::kPromote, kStore>(m, p, stream);
  } else if (precision == Precision::kNvfp4) {
    launch_sm90<128, sm90::kKindNvfp4, sm90::kPromote, kStore>(m, p, stream);
#if SVDQ_DIAGNOSTICS
  } else if (precision == Precision::kW4a8 && v.w4_expand) {
    launch_sm90<128, sm90::kKindW4a8Expand, sm90::kPromote, kStore>(m, p, stream);
  } else if (precision == Precision::kW4a8 && v.sched == sm90::kOverlap) {
    if constexpr (kStore) launch_sm90<128, sm90::kKindW4a8, sm90::kOverlap, true>(m, p, stream);  // run_sm90 checks
  } else if (precision == Precision::kW4a8 && v.sched == sm90::kOverlapDeep) {
    if constexpr (kStore) launch_sm90<128, sm90::kKindW4a8, sm90::kOverlapDeep, true>(m, p, stream);
  } else if (precision == Precision::kW4a8 &&
             launch_w4a8_as<kStore, sm90::kCvtMagic, sm90::kInflight, sm90::kHalfFeed, sm90::kHalfFeedAct,
                            sm90::kRing4, sm90::kRing5, sm90::kRing7>(v.sched, m, p, stream)) {
    // (launched)
  } else if (precision == Precision::kW4a8 && v.sched == sm90::kMulticast && p.n_tiles % 2 == 0 &&
             launch_sm90_pairs<sm90::kMulticast, kStore>(m, p, stream)) {
    // (launched; where no 2-CTA cluster fits, the shipped schedule below)
  } else if (precision == Precision::kW4a8 && v.sched == sm90::kPingPong &&
             (!v.pingpong_auto || w4a8_pingpong_pays(p))) {
    if constexpr (kStore) launch_sm90<128, sm90::kKindW4a8, sm90::kPingPong, true>(m, p, stream);
#endif
  } else if (precision == Precision::kW4a8) {
    launch_sm90<128, sm90::kKindW4a8, sm90::kPromote, kStore>(m, p, stream);
#if SVDQ_DIAGNOSTICS
  } else if (v.sched == sm90::kSkeleton && v.wide) {
    launch_sm90<192, sm90::kKindInt4, sm90::kSkeleton, kStore>(m, p, stream);
  } else if (v.sched == sm90::kSkeleton) {
    launch_sm90<128, sm90::kKindInt4, sm90::kSkeleton, kStore>(m, p, stream);
#endif
  } else {
    launch_sm90<128, sm90::kKindInt4, sm90::kPromote, kStore>(m, p, stream);
  }
}

// Whether the GEMM kernel's three idle producer warps per CTA should expand `next` (SVDQUANT_OPS_CUDA_W4A8_NEXT).
// Measured per FLUX.1 GEMM on an H100 (results/2026-12-06-h100-ahead-ab.md, with the earlier 32-code loop): by the
// GEMM, the expansion cost about half of a kernel of its own wherever the GEMM's rows in flight fit L2 with room to
// spare (K = 3072 at M = 512..4608, and K = 12288 at M = 512), but more than the kernel for the two long-K GEMMs at
// M >= 4096 (K = 12288, 15360), whose 16 row tiles in flight hold 25-31 MB of activation codes: the expansion's
// writes then evict what the GEMM reuses. So: the GEMM takes it where those rows are at most 8 MB, where it runs on
// at least half the SMs (fewer CTAs have too few expanding warps), and where the expansion at ~1 TB/s (the three warps
// per SM, 24 bytes moved per 16 codes) is expected to end within the GEMM, estimated at 1000 TOPS or 3 TB/s of
// operand reads, whichever is longer: a 512-token GEMM expanding a large weight would otherwise wait for it.
bool next_in_gemm_pays(const GemmShape& s, const Sm90Plan& pl, const ExpandJob& next) {
  const int where = w4a8_next_where();
  if (where != 0) return where == 1;
  const int ctas = std::min(pl.m_tiles * pl.n_tiles, num_sms());
  const int64_t rows_in_flight = std::min<int64_t>(s.M, 16 * sm90::BM);  // tile_coords' groups of 16 row tiles
  const double gemm_us = std::max(2.0 * s.M * s.N * s.K / 1.0e9, double(s.N + s.M) * s.K / 3.0e6);
  const double expand_us = 24.0 * next.units / 1.0e6 * num_sms() / ctas;
  return 2 * ctas >= num_sms() && rows_in_flight * s.K <= (int64_t(8) << 20) && expand_us <= gemm_us;
}

// ---------------- W4A8 without weight prep: sm90::rega_kernel ----------------
// Where a W4A8 GEMM reads the packed weights in registers (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS, else this rule). The prep
// kernel costs ~1.5 bytes of traffic per weight on every call (0.5 read, 1 written, then the GEMM reads the 1 again)
// whatever M is, while the register path's stage costs ~10 % more than the 128 x 256 shared-memory kernel's (the
// expansion's integer instructions beside the MMAs) and its tiles are 256 tokens wide. Measured on an H200 over the
// GEMMs of a FLUX.1 step at 512x512 and 1024x1024 (bench_linear.py --weights-ab, benchmarks/results/
// 2026-12-06-h200-w4a8-weights-ab.md): of the 12 GEMMs of at most 1024 tokens, the register path won the 8 whose
// 256-token tiles cover at least half the SMs (1.05-1.17x) and lost the 4 whose 48 tiles leave most SMs idle (512
// tokens x N = 3072: 0.76-0.80x); it lost every 4096 / 4608-token GEMM (0.91-0.98x) and, at 1536 tokens, the one
// with K = 15360 (0.82x), while winning the two with K = 3072 by 4-6 %. The rule takes the 8 winners of at most
// 1024 tokens and leaves 1536 to the prep path (its two small wins against the larger loss there).
constexpr int64_t kRegaMaxTokens = 1024;
bool w4a8_regs_pay(const GemmShape& s) {
  const int w = w4a8_weights();
  if (w != 0) return w == 2;
  const int64_t tiles = (s.M + sm90::RegaCfg::TT - 1) / sm90::RegaCfg::TT * ((s.N + sm90::RegaCfg::TW - 1) /
                                                                             sm90::RegaCfg::TW);
  return s.M <= kRegaMaxTokens && 2 * tiles >= num_sms();
}

// The register path's operands: X the int8 activation codes [M, K] in boxes of 256 tokens x 128 channels, W the packed
// weight codes [N, K / 2] in boxes of 128 rows x 64 bytes (64-byte swizzle), the branch's bf16 parts (down_act: 256
// tokens, proj_up: 128 rows per box), and the output's 64 x 64 boxes: N columns from `out_col` of rows `ldo`
// elements apart (gemm_cat: a weight's columns of the concatenated output).
TensorMaps make_rega_maps(const Sm90Plan& pl, const Operands& o, uint8_t* base, const at::Tensor& out,
                          int64_t out_col, int64_t ldo) {
  const auto swz = CU_TENSOR_MAP_SWIZZLE_128B;
  const int M = pl.M, N = pl.N, K = pl.K;
  TensorMaps m{unused_map(), unused_map(), unused_map(), unused_map(), unused_map(), unused_map(), unused_map()};
  m.A = make_map(o.act_codes.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, K, M, K, 128, sm90::RegaCfg::TT, swz);
  m.B = make_map(o.codes.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, K / 2, N, K / 2, 64, sm90::RegaCfg::TW,
                 CU_TENSOR_MAP_SWIZZLE_64B);
  if (pl.KL > 0) {
    m.LA = make_map(base + pl.oLA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pl.KL, M, int64_t(pl.KL) * 2, 64,
                    sm90::RegaCfg::TT, swz);
    m.UP = make_map(base + pl.oUP, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pl.KL, N, int64_t(pl.KL) * 2, 64,
                    sm90::RegaCfg::TW, swz);
  }
  m.C = make_map(static_cast<uint8_t*>(out.data_ptr()) + out_col * 2,
                 out.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, N,
                 M, ldo * 2, 64, 64, swz);
  return m;
}

// W4A8 by the register path: the prep kernel writes only the small operands (branch parts, scales, bias), then
// rega_kernel. `out`: 2-byte, N % 8 == 0, 16-byte aligned (rega_applies); the result goes to its columns
// [out_col, out_col + N) of rows `ldo` elements apart (out_col % 8 == 0, ldo % 8 == 0).
void run_rega(const GemmShape& s, const Operands& o, at::Tensor& out, cudaStream_t stream, int64_t out_col = 0,
              int64_t ldo = -1) {
  const Sm90Plan pl = plan_sm90(s, o.proj_up.scalar_type(), false, /*w4_expand=*/true, 128, /*rega=*/true);
  auto workspace = at::empty({pl.bytes}, out.options().dtype(at::kByte));
  uint8_t* base = workspace.data_ptr<uint8_t>();
  PrepArgs pa = prep_args(s, pl, o, false, base);
  pa.skip_b = 1;
  launch_prep(pa, pl, stream);
  const TensorMaps m = make_rega_maps(pl, o, base, out, out_col, ldo < 0 ? s.N : ldo);
  sm90::Params p = sm90_params(s, pl, pa, out, o.bias.has_value(), true);
  p.wmult = o.scales.data_ptr<uint8_t>();
  p.G = pl.G;
  using C = sm90::RegaCfg;
  static PerDeviceOnce smem_attr;
  set_max_dynamic_smem(smem_attr, sm90::rega_kernel, C::SMEM);
  const int grid = persistent_grid(p.m_tiles * p.n_tiles);
  launch_kernel(sm90::rega_kernel, dim3(grid), dim3(384), C::SMEM, stream, m.A, m.B, m.LA, m.UP, m.C, p);
  debug_sync(stream, "gemm sm90 rega");
}

// Whether a W4A8 call can take the register path: 2-byte outputs whose rows are whole 16-byte units, 16-byte aligned
// (its only epilogue is the TMA store).
bool rega_applies(const GemmShape& s, const at::Tensor& out) {
  const at::ScalarType t = out.scalar_type();
  return s.precision == Precision::kW4a8 && (t == at::kBFloat16 || t == at::kHalf) && s.N % 8 == 0 &&
         aligned16(out.data_ptr());
}

// `weight`: W4A8's expanded int8 weight [N, K] (gemm_expanded): the GEMM loads it and the prep kernel expands
// nothing. `next`: a weight the GEMM kernel's idle producer warps expand meanwhile (W4A8; units == 0: none).
// Returns whether the GEMM kernel took `next` (next_in_gemm_pays).
bool run_sm90(const GemmShape& s, const Operands& o, bool act_unsigned, at::Tensor& out, cudaStream_t stream,
              const at::Tensor* weight = nullptr, const ExpandJob& next = ExpandJob{}) {
#if SVDQ_DIAGNOSTICS
  Variant v = diagnostic_variant();
  if (weight != nullptr) v.w4_expand = false;  // gemm_expanded: the weight is given expanded
  const bool always_stores = v.sched == sm90::kOverlap || v.sched == sm90::kOverlapDeep || v.sched == sm90::kPingPong;
  const bool w4a8_only = always_stores || v.sched == sm90::kCvtMagic || v.sched == sm90::kInflight ||
                         v.sched == sm90::kHalfFeed || v.sched == sm90::kHalfFeedAct || v.sched == sm90::kMulticast ||
                         sm90::ring_stages(v.sched) != 0;
  TORCH_CHECK(!w4a8_only || (s.precision == Precision::kW4a8 && !v.w4_expand),
              "SVDQUANT_OPS_GEMM_SCHEDULE=overlap[3] / pingpong[-auto] / promote-cvt / inflight / halffeed[-act] / "
              "multicast / ring4 / ring5 / ring7: a W4A8 schedule (with SVDQUANT_OPS_GEMM_WPREP=prep), but this "
              "call is ",
              s.precision == Precision::kW4a8 ? "W4A8 with the in-kernel expansion" : "not W4A8");
  TORCH_CHECK(!always_stores || v.store, "SVDQUANT_OPS_GEMM_SCHEDULE=overlap[3] / pingpong always stores: "
              "SVDQUANT_OPS_GEMM_EPILOGUE=none is not available with it");
#else
  const Variant v{};
#endif
  const bool w4_expand = v.w4_expand && s.precision == Precision::kW4a8;
  if (s.precision == Precision::kW4a8 && weight == nullptr && !w4_expand && v.sched == sm90::kPromote && v.store &&
      !v.force_direct && w4a8_regs_pay(s) && rega_applies(s, out)) {  // (the switch is read, and checked, first)
    run_rega(s, o, out, stream);
    return false;
  }
  Sm90Plan pl = plan_sm90(s, o.proj_up.scalar_type(), v.wide, w4_expand || weight != nullptr);
  // W4A8 on 128 x 256 tiles where the estimate says so (the diagnostics schedules, the in-kernel expansion and the
  // no-store epilogue are written for 128 x 128)
  const bool wide_ok = !w4_expand && v.sched == sm90::kPromote && v.store;
#if SVDQ_DIAGNOSTICS
  TORCH_CHECK(s.precision != Precision::kW4a8 || wide_ok || w4a8_tile() != 256,
              "SVDQUANT_OPS_CUDA_W4A8_TILE=256: the 128 x 256 W4A8 kernel has only the shipped schedule, the prep "
              "path and stores; unset SVDQUANT_OPS_GEMM_SCHEDULE / _WPREP / _EPILOGUE=none or the tile width");
#endif
  if (s.precision == Precision::kW4a8 && wide_ok && w4a8_tile_bn(s, pl) == 256) {
    pl = plan_sm90(s, o.proj_up.scalar_type(), v.wide, weight != nullptr, 256);
  }
#if SVDQ_DIAGNOSTICS
  // the ping-pong consumer waits on all of a tile's branch stages at once: they must fit in the ring
  constexpr int kRing = sm90::Cfg<128, sm90::kKindW4a8>::STAGES;
  // (pingpong-auto leaves such calls to the shipped schedule: w4a8_pingpong_pays)
  TORCH_CHECK(v.sched != sm90::kPingPong || v.pingpong_auto || pl.KL / 64 <= kRing,
              "SVDQUANT_OPS_GEMM_SCHEDULE=pingpong: at most ", kRing, " branch stages of 64 (rank x bf16 parts), but "
              "this call has ", pl.KL / 64, " (rank ", pl.R, ")");
#endif
  auto workspace = at::empty({pl.bytes}, out.options().dtype(at::kByte));
  uint8_t* base = workspace.data_ptr<uint8_t>();

  PrepArgs pa = prep_args(s, pl, o, act_unsigned, base);
  pa.skip_b = w4_expand || weight != nullptr;
  launch_prep(pa, pl, stream);

  // 2-byte outputs whose rows are whole 16-byte units go through the TMA-store epilogue (TMA needs 16-byte strides).
  const at::ScalarType out_dtype = out.scalar_type();
  const bool tma_store = !v.force_direct && (pl.BN == 128 || pl.BN == 256) &&
                         (out_dtype == at::kBFloat16 || out_dtype == at::kHalf) &&
                         pl.N % 8 == 0 && aligned16(out.data_ptr());
  TensorMaps maps = make_tensor_maps(s, pl, o, base, out, tma_store);
  sm90::Params p = sm90_params(s, pl, pa, out, o.bias.has_value(), tma_store);
  const bool takes_next = next.units != 0 && next_in_gemm_pays(s, pl, next);
  if (takes_next) p.next = next;
  if (weight != nullptr) {
    maps.B = make_map(weight->data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, pl.K, pl.N, pl.K, 128, pl.BN,
                      CU_TENSOR_MAP_SWIZZLE_128B);
  }
#if SVDQ_DIAGNOSTICS
  if (v.sched == sm90::kMulticast && s.precision == Precision::kW4a8) {
    // each CTA of a pair loads 64 of the tile's 128 rows for both: the W4A8 kernel's unused INT4 scale maps carry
    // those 64-row boxes of the activation codes (SA) and of the branch's down_act parts (SW)
    maps.SA = make_map(o.act_codes.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, pl.K, pl.M, pl.K, 128, 64,
                       CU_TENSOR_MAP_SWIZZLE_128B);
    if (pl.KL > 0) {
      maps.SW = make_map(base + pl.oLA, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pl.KL, pl.M, int64_t(pl.KL) * 2, 64, 64,
                         CU_TENSOR_MAP_SWIZZLE_128B);
    }
  }
#endif
  if (w4_expand) {  // the GEMM loads the packed codes [N, K / 2] itself: 64-byte rows of 128 codes, no swizzle
    maps.B = make_map(o.codes.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, pl.K / 2, pl.N, pl.K / 2, 64, pl.BN,
                      CU_TENSOR_MAP_SWIZZLE_NONE);
    p.wmult = o.scales.data_ptr<uint8_t>();
    p.G = pl.G;
#if SVDQ_DIAGNOSTICS
    p.exp_mode = v.w4_expand_mode;
#endif
  }
#if SVDQ_DIAGNOSTICS
  if (!v.store) {
    launch_variant<false>(s.precision, v, pl.BN, maps, p, stream);
    return takes_next;
  }
#endif
  launch_variant<true>(s.precision, v, pl.BN, maps, p, stream);
  return takes_next;
}

// gemm_cat's W4A8 weights as one GEMM: the plan is that of one weight of sum(N_i) rows, and each weight's prep
// writes its rows of B, UP, bias and global scale at its row offset (the first also the activation operands), so the
// GEMM kernel sees one operand and runs the shipped schedule (the diagnostics switches do not apply here). Every
// output column is computed as gemm computes it, with the same tile width rule for the whole width.
void run_sm90_cat(const GemmShape& total, const std::vector<GemmShape>& shapes, const std::vector<Operands>& os,
                  at::Tensor& out, cudaStream_t stream) {
  const Variant v{};
  Sm90Plan pl = plan_sm90(total, os[0].proj_up.scalar_type(), false, false);
  if (w4a8_tile_bn(total, pl) == 256) pl = plan_sm90(total, os[0].proj_up.scalar_type(), false, false, 256);
  auto workspace = at::empty({pl.bytes}, out.options().dtype(at::kByte));
  uint8_t* base = workspace.data_ptr<uint8_t>();
  const PrepArgs whole = prep_args(total, pl, os[0], false, base);
  bool any_bias = false;
  int64_t n0 = 0;
  for (size_t i = 0; i < os.size(); ++i) {
    const Operands& o = os[i];
    const int64_t n = shapes[i].N;
    PrepArgs pa = prep_args(shapes[i], pl, o, false, base);
    pa.N = n;
    pa.Np = i + 1 < os.size() ? n : pl.Np - n0;  // the last weight also zeroes the padding up to whole tiles
    pa.B = whole.B + n0 * pl.K;
    pa.UP = whole.UP + n0 * pl.KL;
    pa.biasf = whole.biasf + n0;
    pa.gsf = whole.gsf + n0;
    pa.weights_only = i > 0;
    launch_prep(pa, pl, stream);
    any_bias = any_bias || o.bias.has_value();
    n0 += n;
  }
  const at::ScalarType out_dtype = out.scalar_type();
  const bool tma_store = (pl.BN == 128 || pl.BN == 256) && (out_dtype == at::kBFloat16 || out_dtype == at::kHalf) &&
                         pl.N % 8 == 0 && aligned16(out.data_ptr());
  const TensorMaps maps = make_tensor_maps(total, pl, os[0], base, out, tma_store);
  const sm90::Params p = sm90_params(total, pl, whole, out, any_bias, tma_store);
  launch_variant<true>(total.precision, v, pl.BN, maps, p, stream);
}

}  // namespace
}  // namespace gemm

at::Tensor gemm_cat_cuda(const at::Tensor& act_codes, const at::Tensor& act_scales, at::TensorList codes,
                         at::TensorList scales, const c10::List<std::optional<at::Tensor>>& global_scale,
                         const at::Tensor& down_act, at::TensorList proj_up,
                         const c10::List<std::optional<at::Tensor>>& bias, c10::string_view precision,
                         at::ScalarType out_dtype, bool act_unsigned) {
  const auto shapes = check_gemm_cat(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias,
                                     precision, out_dtype, act_unsigned);
  const c10::cuda::CUDAGuard guard(act_codes.device());
  GemmShape total = shapes[0];
  total.N = 0;
  bool same_up = true;
  for (size_t i = 0; i < shapes.size(); ++i) {
    total.N += shapes[i].N;
    same_up = same_up && proj_up[i].scalar_type() == proj_up[0].scalar_type();
  }
  // One GEMM for W4A8 on Hopper where the weights' low-rank parts share a dtype (one bf16 split); otherwise one gemm
  // per weight (the same values: gemm_cat's specification).
  if (total.precision != Precision::kW4a8 || !same_up || force_portable() || !device_is_sm90() ||
      !gemm::fits_sm90_indexing(total) || total.M == 0) {
    std::vector<at::Tensor> outs;
    outs.reserve(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      outs.push_back(gemm_cuda(act_codes, act_scales, codes[i], scales[i], global_scale.get(i), down_act, proj_up[i],
                               bias.get(i), precision, out_dtype, act_unsigned));
    }
    return at::cat(outs, -1);
  }
  std::vector<gemm::Operands> os;
  os.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    os.push_back(gemm::contiguous_operands(act_codes, act_scales, codes[i], scales[i], global_scale.get(i), down_act,
                                           proj_up[i], bias.get(i)));
  }
  auto out = at::empty({total.M, total.N}, act_codes.options().dtype(out_dtype));
  // The register path reads each weight's packed codes where they are: one launch per weight, each writing its
  // columns of the output (no concatenated weight to build); the shared-memory path concatenates the expanded weights
  // into one GEMM.
  // The rule applies per weight: each launch has only its weight's tiles (three 512-token x 3072 weights have 48 tiles
  // each, where the register path measured 0.76-0.80x, although together they have 144).
  bool regs = gemm::rega_applies(total, out);
  for (size_t i = 0; i < shapes.size(); ++i) regs = gemm::w4a8_regs_pay(shapes[i]) && shapes[i].N % 8 == 0 && regs;
  if (regs) {
    int64_t n0 = 0;
    for (size_t i = 0; i < shapes.size(); ++i) {
      gemm::run_rega(shapes[i], os[i], out, current_stream(), n0, total.N);
      n0 += shapes[i].N;
    }
    return out.reshape(with_last_dim(act_codes, total.N));
  }
  gemm::run_sm90_cat(total, shapes, os, out, current_stream());
  return out.reshape(with_last_dim(act_codes, total.N));
}

at::Tensor gemm_cuda(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                     const at::Tensor& scales, const std::optional<at::Tensor>& global_scale,
                     const at::Tensor& down_act, const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                     c10::string_view precision, at::ScalarType out_dtype, bool act_unsigned) {
  const auto s = check_gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
                            out_dtype, act_unsigned);
  const c10::cuda::CUDAGuard guard(act_codes.device());
  auto out = at::empty({s.M, s.N}, act_codes.options().dtype(out_dtype));
  if (s.M == 0) return out.reshape(with_last_dim(act_codes, s.N));
  cudaStream_t stream = current_stream();
  const auto o =
      gemm::contiguous_operands(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias);
  if (!force_portable() && device_is_sm90() && gemm::fits_sm90_indexing(s)) {
    (void)gemm::run_sm90(s, o, act_unsigned, out, stream);
  } else {
    gemm::launch_portable(s, o, act_unsigned, out, stream);
  }
  return out.reshape(with_last_dim(act_codes, s.N));
}

at::Tensor expand_w4a8_weight_cuda(const at::Tensor& codes, const at::Tensor& scales) {
  constexpr const char* op = "svdquant::expand_w4a8_weight";
  const auto [N, K] = check_expand_w4a8(codes, scales, op);
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = at::empty({N, K}, codes.options().dtype(at::kChar));
  const auto c = gemm::contiguous_aligned(codes);
  const auto m = scales.contiguous();
  gemm::launch_expand(gemm::expand_job(c, m, out, op), current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> gemm_expanded_cuda(
    const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes, const at::Tensor& scales,
    const at::Tensor& global_scale, const at::Tensor& down_act, const at::Tensor& proj_up,
    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, const at::Tensor& weight,
    const std::optional<at::Tensor>& next_codes, const std::optional<at::Tensor>& next_scales) {
  constexpr const char* op = "svdquant::gemm_expanded";
  const auto s = check_gemm_expanded(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias,
                                     out_dtype, weight, next_codes, next_scales);
  const c10::cuda::CUDAGuard guard(act_codes.device());
  cudaStream_t stream = current_stream();
  auto out = at::empty({s.M, s.N}, act_codes.options().dtype(out_dtype));
  at::Tensor next = at::empty({0, 0}, weight.options());
  at::Tensor nc, nm;  // the next weight's codes and multipliers as the kernels read them (alive until launched)
  gemm::ExpandJob job{};
  if (next_codes.has_value()) {
    nc = gemm::contiguous_aligned(*next_codes);
    nm = next_scales->contiguous();
    next = at::empty({nc.size(0), nc.size(1) * 2}, weight.options());
    job = gemm::expand_job(nc, nm, next, op);
  }
  const auto w = gemm::contiguous_aligned(weight);
  if (s.M > 0) {
    const auto o =
        gemm::contiguous_operands(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias);
    if (!force_portable() && device_is_sm90() && gemm::fits_sm90_indexing(s)) {
      if (gemm::run_sm90(s, o, false, out, stream, &w, job)) job.units = 0;  // expanded by the GEMM kernel
    } else {
      gemm::launch_portable(s, o, false, out, stream, &w);
    }
  }
  gemm::launch_expand(job, stream);
  return {out.reshape(with_last_dim(act_codes, s.N)), next};
}

}  // namespace cuda_impl
}  // namespace svdquant
