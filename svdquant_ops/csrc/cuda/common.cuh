// Shared helpers of the CUDA kernels: path selection, exact fast division, small PTX wrappers (mbarrier, TMA,
// wgmma fences, register reconfiguration). Everything sm_90a-only is guarded by __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

namespace svdquant {
namespace cuda_impl {

// ---------------------------------------------------------------------------------------------------------------
// Build modes. SVDQUANT_OPS_DIAGNOSTICS=1 (a compiler define, set by the Python build when the environment variable
// of that name is 1 at build time) also compiles the diagnostic kernels and their run-time switches (README.md in
// this folder lists them). A normal build has neither: its kernels read no diagnostic environment variable.
// ---------------------------------------------------------------------------------------------------------------
#if defined(SVDQUANT_OPS_DIAGNOSTICS) && SVDQUANT_OPS_DIAGNOSTICS
#define SVDQ_DIAGNOSTICS 1
#else
#define SVDQ_DIAGNOSTICS 0
#endif

// ---------------------------------------------------------------------------------------------------------------
// Path selection. SVDQUANT_OPS_CUDA_PORTABLE=1 forces the portable kernels (plain CUDA, any sm_70+ GPU) on every
// GPU; it is read at every call so tests can flip it. The Hopper kernels run only on compute capability 9.0 (the
// library is then compiled for sm_90a, see the Python build).
// ---------------------------------------------------------------------------------------------------------------
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}
inline bool force_portable() { return env_flag("SVDQUANT_OPS_CUDA_PORTABLE"); }
// A two-way run-time switch read at every call (tests and benchmarks compare both settings in one process): true for
// `on`, false for `off`, `fallback` (the library's default) when unset or empty; any other value is an error naming
// the variable.
inline bool env_switch(const char* name, const char* on, const char* off, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  if (std::strcmp(v, on) == 0) return true;
  if (std::strcmp(v, off) == 0) return false;
  TORCH_CHECK(false, "svdquant: ", name, " must be '", on, "', '", off, "' or unset, got '", v, "'");
  return fallback;  // not reached
}
// SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=1|0: whether W4A8's token kernel splits K over blocks where M is small
// (token_kernel_k_per_block in quantize_act.cu); unset: `fallback` (kW4a8TokenSplitDefault there).
inline bool w4a8_token_split(bool fallback) {
  return env_switch("SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", "1", "0", fallback);
}

// SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=1|0: W4A8's token kernel (second pass) with its lean loop for warps on the fast
// paths (quantize_tokens_fast_kernel<T, true> in quantize_act.cu: the same bytes; the default since 2026-12-07: on an
// H100 6.28-6.30 against 6.59-6.61 ms per FLUX.1 1024² step in two runs of opposite order); =0 keeps the plain loop.
inline bool w4a8_token_lean() { return env_switch("SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN", "1", "0", true); }

// SVDQUANT_OPS_CUDA_PDL=1|0: programmatic dependent launch of the hot kernels on Hopper (launch_kernel below);
// unset: kPdlDefault. Off: on an H100 it closed the idle gaps before our kernels but did not shorten a FLUX step
// (benchmarks/HISTORY.md, eighteenth session).
constexpr bool kPdlDefault = false;
inline bool pdl_requested() { return env_switch("SVDQUANT_OPS_CUDA_PDL", "1", "0", kPdlDefault); }

// A run-time choice among named values, read at every call: the index of the variable's value in `names`
// (`fallback`, by default 0, the first, when unset or empty); any other value is an error naming the variable and
// the choices.
template <size_t N>
inline int env_choice(const char* name, const char* const (&names)[N], int fallback = 0) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  std::string expected;
  for (size_t i = 0; i < N; ++i) {
    if (std::strcmp(v, names[i]) == 0) return static_cast<int>(i);
    expected += std::string(i == 0 ? "'" : "', '") + names[i];
  }
  TORCH_CHECK(false, "svdquant: ", name, " must be ", expected, "' or unset, got '", v, "'");
  return 0;  // not reached
}

// SVDQUANT_OPS_CUDA_W4A8_CLUSTER=0|1|small puts W4A8's quantize_act on the one-pass cluster kernel on Hopper: "1"
// every call where such a cluster fits, "small" only calls of at most kW4a8ClusterSmallTokens tokens (FLUX.1's
// 512-token text stream, where the two passes are bound by launch and latency, not bytes), "0" or unset none (the
// default: exact, but 1.7-2.8x slower than the two passes at M >= 4096, see quantize_act.cu). Read at every call, so
// tests and benchmarks compare the paths in one process.
constexpr int64_t kW4a8ClusterSmallTokens = 1024;
enum class W4a8Cluster : int { kNone = 0, kAll = 1, kSmall = 2 };
inline W4a8Cluster w4a8_cluster_mode() {
  static constexpr const char* kNames[] = {"0", "1", "small"};
  return static_cast<W4a8Cluster>(env_choice("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", kNames));
}

// SVDQUANT_OPS_CUDA_W4A8_GMAX=regs|pipe|lean: W4A8's first pass (the two passes' group-max pass) by the
// register-prefetch kernel (regs), on Hopper the pipelined one (pipe), or the register-prefetch kernel with fewer
// instructions around the same arithmetic (lean, R <= 32); unset: `fallback` (kW4a8GroupMaxDefault in
// quantize_act.cu). 0 / 1 / 2.
enum W4a8GroupMax : int { kGmaxRegs = 0, kGmaxPipe = 1, kGmaxLean = 2 };
inline int w4a8_groupmax_kind(int fallback) {
  static constexpr const char* kNames[] = {"regs", "pipe", "lean"};
  return env_choice("SVDQUANT_OPS_CUDA_W4A8_GMAX", kNames, fallback);
}

// SVDQUANT_OPS_CUDA_W4A8_NEXT=auto|gemm|kernel: where gemm_expanded expands the next weight on Hopper: by the GEMM
// kernel's idle warps where that measured cheaper (auto, the default: next_in_gemm_pays in gemm.cu), always there
// (gemm), or always in a kernel of its own after the GEMM (kernel). 0 / 1 / 2.
inline int w4a8_next_where() {
  static constexpr const char* kNames[] = {"auto", "gemm", "kernel"};
  return env_choice("SVDQUANT_OPS_CUDA_W4A8_NEXT", kNames);
}

// SVDQUANT_OPS_CUDA_W4A8_TILE=auto|128|256: the output tile width of W4A8's Hopper GEMM: as the library's estimate
// chooses per call (auto, the default: w4a8_tile_bn in gemm.cu), or always 128 / 256 columns. 0 / 128 / 256.
inline int w4a8_tile() {
  static constexpr const char* kNames[] = {"auto", "128", "256"};
  static constexpr int kWidths[] = {0, 128, 256};
  return kWidths[env_choice("SVDQUANT_OPS_CUDA_W4A8_TILE", kNames)];
}

// SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=auto|prep|regs: how W4A8's Hopper GEMM reads the weights: expanded to int8 by the
// prep kernel on every call and fed to wgmma from shared memory (prep), or as the packed 4-bit codes, expanded in the
// consumers' registers (regs: sm90::rega_kernel, no weight prep); auto (the default) chooses per call
// (w4a8_regs_pay in gemm.cu). 0 / 1 / 2.
inline int w4a8_weights() {
  static constexpr const char* kNames[] = {"auto", "prep", "regs"};
  return env_choice("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", kNames);
}

// SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS=4|1: how many 16-code weight units the prep kernel's threads keep loads in flight
// for (4, the default since the nineteenth session; 1, the loop before it: the same bytes), so that a benchmark can
// compare both in one run. 4 / 1.
inline int w4a8_prep_units() {
  static constexpr const char* kNames[] = {"4", "1"};
  static constexpr int kUnits[] = {4, 1};
  return kUnits[env_choice("SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS", kNames)];
}

// SVDQUANT_OPS_CUDA_W4A8_EXPAND=warp|pair: how the W4A8 weight expansion (the prep kernel's weight row and
// expand_w4a8_kernel) exchanges the halves of each 32-channel slice: with every lane of the warp in every step (warp,
// the default since 2026-12-07: a full-warp shuffle, no convergence check per unit; on an H100 prep took 4.84-4.85
// against 4.94-4.97 ms per FLUX.1 1024² step in two runs, and 3.98 against 4.06 alone) or by a shuffle between the two
// lanes of a pair (pair). The same bytes.
inline bool w4a8_expand_warp() {
  static constexpr const char* kNames[] = {"pair", "warp"};
  return env_choice("SVDQUANT_OPS_CUDA_W4A8_EXPAND", kNames, 1) == 1;
}

// SVDQUANT_OPS_CUDA_W4A8_EPI=smem|shfl: how W4A8's GEMM on 128 x 256 tiles hands each thread the tile's channel
// scales and bias: through shared memory, two column groups per 16-byte load (smem, sm90::kVecSmem: the default since
// 2026-12-07; on an H100 the 128 x 256 kernel took 42.12-42.16 against 42.34-42.69 ms per FLUX.1 1024² step in two
// runs, the shuffle rows before and after it) or by warp shuffles from registers (shfl). The same bytes.
inline bool w4a8_epi_smem() {
  static constexpr const char* kNames[] = {"shfl", "smem"};
  return env_choice("SVDQUANT_OPS_CUDA_W4A8_EPI", kNames, 1) == 1;
}

// SVDQUANT_OPS_CUDA_PREP_ROWS=used|all: whether the prep kernel's grid has only the rows with work (used, the
// default since 2026-12-07: W4A8 skips the activation row, whose codes quantize_act wrote as int8 already, and the
// weight row where the weights are expanded elsewhere; weight-only calls skip the activation row) or all three rows
// (activation codes, weight codes, small operands), those with nothing to do returning at once (all, the grid before
// it). The same bytes; on an H100 "used" took prep_kernel from 5.08-5.10 to 4.97-4.98 ms per FLUX step, in two runs
// of opposite order (benchmarks/results/2026-12-07-h100-twentyfourth-summary.md).
constexpr bool kPrepUsedRowsDefault = true;
inline bool prep_used_rows() { return env_switch("SVDQUANT_OPS_CUDA_PREP_ROWS", "used", "all", kPrepUsedRowsDefault); }

constexpr int kMaxDevices = 64;

inline int current_device_index() {
  const int dev = c10::cuda::current_device();
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "svdquant: unsupported CUDA device index ", dev);
  return dev;
}

// Runs a setup step once per CUDA device, thread-safe (std::call_once; a step that throws is retried on the next
// call). For state that CUDA keeps per device, such as cudaFuncSetAttribute: declare one `static PerDeviceOnce` per
// kernel instantiation next to its launch.
class PerDeviceOnce {
 public:
  template <typename F>
  void operator()(F&& f) {
    std::call_once(flags_[current_device_index()], std::forward<F>(f));
  }

 private:
  std::once_flag flags_[kMaxDevices];
};

// Per-device attributes, read once (no CUDA call on later ops, so nothing new happens during graph capture).
struct DeviceInfo {
  int major = -1, minor = -1, sms = 0, l2_bytes = 0;
};
inline const DeviceInfo& device_info() {
  static DeviceInfo infos[kMaxDevices];
  static PerDeviceOnce once;
  const int dev = current_device_index();
  once([&] {
    DeviceInfo d;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, dev));
    infos[dev] = d;
  });
  return infos[dev];
}

// Allows `kernel` up to `bytes` of dynamic shared memory on the current device. CUDA keeps this attribute per device,
// so it is set once per (kernel instantiation, device): `once` is a static PerDeviceOnce of the instantiation. The
// first call on each device is eager in practice (a warm-up or the first forward), so the attribute is set before
// any CUDA-graph capture on that device.
template <typename Kernel>
void set_max_dynamic_smem(PerDeviceOnce& once, Kernel kernel, int bytes) {
  once([&] { C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)); });
}

inline bool device_is_sm90() { return device_info().major == 9 && device_info().minor == 0; }

inline int num_sms() { return device_info().sms; }
inline int64_t l2_bytes() { return device_info().l2_bytes; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// SVDQUANT_OPS_CUDA_SYNC_DEBUG=1: synchronize after every kernel launch and name the kernel that failed (debugging
// only: not usable under CUDA-graph capture).
inline void debug_sync(cudaStream_t stream, const char* what) {
  static const bool on = [] {
    const char* v = std::getenv("SVDQUANT_OPS_CUDA_SYNC_DEBUG");
    return v != nullptr && v[0] == '1';
  }();
  if (!on) return;
  const cudaError_t err = cudaStreamSynchronize(stream);
  TORCH_CHECK(err == cudaSuccess, "svdquant: kernel ", what, " failed: ", cudaGetErrorString(err));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (PDL, compute capability 9.0). A FLUX.1 step runs ~1000 of our kernels, each
// mostly waiting on the one before it; between two of them the GPU idles ~1.5 us (the launch of the next grid after
// the previous one completes: ~1.6 ms per step on an H100, the profile's idle time before our kernels). With PDL a
// kernel is launched while its predecessor still runs; its blocks become resident as SMs free up and wait in
// pdl_wait_then_release() until every grid before it has completed and its writes are visible, exactly the
// ordering of a plain stream launch. So every kernel launched through launch_kernel() must call
// pdl_wait_then_release() before its first global-memory access; then nothing about the results changes. The
// release after the wait lets the next PDL launch begin: at most one grid waits ahead of the one running. On other
// GPUs, or with PDL off, the launch is a plain one and both instructions are no-ops (griddepcontrol is defined as
// such for a grid launched without the attribute).
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void pdl_wait_then_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool pdl_on() { return pdl_requested() && device_is_sm90(); }

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization where pdl_on(): `kernel`
// must begin with pdl_wait_then_release(). Errors are raised as after a <<<>>> launch.
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  if (pdl_on()) {
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// ---------------------------------------------------------------------------------------------------------------
// Correctly rounded a / b with a precomputed reciprocal. rcp_for_div(b) is the refined reciprocal that the CUDA
// compiler's IEEE division (div.rn.f32) computes on its fast path (MUFU.RCP + one Newton step); div_rn_fast then
// runs the same remainder correction as that fast path, so for operands in [2^-60, 2^60] the result is bit-identical
// to a / b (the quantize_act tests compare codes and scales bit for bit with the CPU op, including a case over
// 80 binades with zeros and -0.0). Outside that range (zeros,
// denormals, huge values, NaN, Inf) it falls back to __fdiv_rn. rcp_for_div returns NaN for b outside the range,
// which routes every division by that b to the fallback.
// ---------------------------------------------------------------------------------------------------------------
// rcp_refined: the reciprocal itself, for callers that know b lies in the range.
__device__ __forceinline__ float rcp_refined(float b) {
  float y0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(b));
  const float e = fmaf(-b, y0, 1.f);
  return fmaf(y0, e, y0);
}

__device__ __forceinline__ float rcp_for_div(float b) {
  const float ab = fabsf(b);
  if (!(ab >= 0x1p-60f && ab <= 0x1p60f)) return __int_as_float(0x7fffffff);
  return rcp_refined(b);
}

__device__ __forceinline__ float div_rn_fast(float a, float b, float y) {
  const float q = __fmul_rn(a, y);
  const float r = fmaf(-b, q, a);
  const float q1 = fmaf(y, r, q);
  const float aa = fabsf(a);
  if (aa >= 0x1p-60f && aa <= 0x1p60f && q1 == q1) return q1;
  return __fdiv_rn(a, b);
}

// max that keeps NaN (PTX max.NaN, sm_80+), the device twin of formats.h nan_max for the values we use.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_90)
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Makes initialized mbarriers visible to the async proxy (TMA complete_tx) as well as to the other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE_%=;\n"
      "bra WAIT_%=;\n"
      "DONE_%=:\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_prefetch_desc(const void* desc) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
}

// 2-D bulk tensor copy global -> shared, completion counted on `bar` (bytes).
__device__ __forceinline__ void tma_load_2d(const void* desc, void* dst, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// The same copy multicast to the CTAs of the cluster in `mask` (same shared-memory offset in each; completion
// counted on the mbarrier at `bar`'s offset in each of them).
__device__ __forceinline__ void tma_load_2d_multicast(const void* desc, void* dst, uint64_t* bar, int c0, int c1,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
      "%4}], [%2], %5;" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// Thread-block clusters: an arrival on the mbarrier at `bar`'s offset in CTA `cta` of the cluster, and a barrier of
// all threads of the cluster (release / acquire: shared-memory writes before it are visible after).
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(bar)), "r"(cta));
  // (.release.cta, PTX's default: the arriving consumers only read the stage, and their MMAs have completed. With
  // .release.cluster ptxas puts MEMBAR.ALL.GPU before every arrival, which made the 2-CTA schedule 2.1x slower.)
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

// 2-D bulk tensor copy shared -> global (a TMA store), tracked by this thread's bulk async-groups.
__device__ __forceinline__ void tma_store_2d(const void* desc, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(desc)),
               "r"(smem_u32(src)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's bulk groups are still reading their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// Waits until at most N of this thread's bulk groups are incomplete (their global writes done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes before later async-proxy (TMA, wgmma) accesses.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Named hardware barrier (id 1..15; 0 is __syncthreads) over `n` threads, a multiple of 32.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
// Arrives on a named barrier without waiting (the producer side of a bar.sync over `n` threads).
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
#endif

// Keeps the compiler from moving accesses of wgmma accumulators across the asynchronous MMA.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(int (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Shared-memory matrix descriptor of a K-major tile written by TMA with 128-byte swizzle: rows of 128 bytes,
// 8-row core-matrix groups 1024 bytes apart (SBO), tile base 1024-byte aligned.
__device__ __forceinline__ uint64_t desc_sw128(const void* smem_ptr) {
  const uint32_t addr = smem_u32(smem_ptr);
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

}  // namespace cuda_impl
}  // namespace svdquant
