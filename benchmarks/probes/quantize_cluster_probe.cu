// Probe: W4A8 activation quantization reading x once, with a thread-block cluster along K (benchmarks/HISTORY.md,
// 2026-12-05: the next quantize_act design). Driven by quantize_cluster_probe.py, which checks it against the
// library's CPU op (codes and scales bit-exact, down_act within fp32 tolerance) and times it next to the library's
// CUDA quantize_act (two passes over x) in the same process.
//
// One cluster of C CTAs owns 16 tokens; CTA r of the cluster owns the K slice [r*Ks, (r+1)*Ks), Ks = K / C:
//   1. its 16 x Ks tile of x goes to shared memory (cp.async, one read of x from DRAM);
//   2. per token the partial amax of |x / smooth| over the slice (8 threads per token), and the partial down
//      projection x . proj_down over the slice with mma.m16n8k16 (4 warps split the slice, reduced in a fixed order);
//   3. cluster barrier; every CTA reads the C partial amaxes of its tokens through distributed shared memory, so
//      all compute the same scale (scale = amax / 127 rounded to bf16, as formats.h's int4_scale); CTA r sums the C
//      partial down projections (rank order: deterministic) for the tokens t with t % C == r;
//   4. codes of its slice from the tile in shared memory (int8_code(x_hat / scale), 0 where scale == 0);
//   5. cluster barrier before exit (peers may still read this CTA's shared memory).
// proj_down is passed transposed ([R, K], K contiguous) so that each B fragment of the MMA is one 32-bit load.
// bf16 x / smooth / proj_down, R = 32 only: enough to decide whether the design is worth building into the library.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

namespace cg = cooperative_groups;

namespace {

constexpr int kRows = 16;     // tokens per cluster
constexpr int kR = 32;        // rank of the down projection
constexpr int kThreads = 128; // 4 warps; 8 threads per token in the elementwise phases
constexpr float kQmax = 127.f;
constexpr float kBf16Max = 3.3895313892515355e38f;

__device__ __forceinline__ float nan_max(float acc, float v) { return (v > acc || v != v) ? v : acc; }

__device__ __forceinline__ float token_scale(float amax) {  // formats.h: int4_scale<bf16>(amax, 127)
  float s = amax / kQmax;
  if (!(s != s || s > 3.4028234663852886e38f)) s = s < kBf16Max ? s : kBf16Max;
  return __bfloat162float(__float2bfloat16_rn(s));
}

__device__ __forceinline__ int int8_code(float q) {  // formats.h
  if (q != q) return 0;
  float r = rintf(q);
  r = r < -kQmax ? -kQmax : (r > kQmax ? kQmax : r);
  return static_cast<int>(r);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared memory: the x tile [16][Ks + 8] (8 elements of padding per row: ldmatrix without bank conflicts), then the
// partial amax [16], the per-warp down partials [4][16][32] and the CTA's down partial [16][32] (fp32).
__global__ void __launch_bounds__(kThreads) quantize_cluster_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ smooth,
    const __nv_bfloat16* __restrict__ pd_t, int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ scales,
    float* __restrict__ down, int M, int K, int Ks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int C = static_cast<int>(cluster.num_blocks());
  const int ld = Ks + 8;
  __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  float* amax_part = reinterpret_cast<float*>(tile + kRows * ld);
  float* warp_down = amax_part + kRows;
  float* cta_down = warp_down + 4 * kRows * kR;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = (blockIdx.x / C) * kRows;  // clusters tile the x dimension of the grid
  const int k0 = rank * Ks;
  const int rows = min(kRows, M - m0);

  // 1. the tile (rows past M are zero: they feed the MMA but are never stored)
  const int chunks = Ks / 8;  // 16-byte chunks per row
  for (int i = tid; i < kRows * chunks; i += kThreads) {
    const int r = i / chunks, c = i % chunks;
    __nv_bfloat16* dst = tile + r * ld + c * 8;
    if (r < rows) {
      cp_async16(dst, x + static_cast<size_t>(m0 + r) * K + k0 + c * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
  asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();

  // 2a. partial amax of |x / smooth| per token: 8 consecutive lanes per token, chunk c to lane c % 8
  const int tok = tid / 8, sub = tid % 8;
  float amax = 0.f;
  for (int c = sub; c < chunks; c += 8) {
    const uint4 xv = *reinterpret_cast<const uint4*>(tile + tok * ld + c * 8);
    const uint4 sv = *reinterpret_cast<const uint4*>(smooth + k0 + c * 8);
    const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
    const __nv_bfloat16* se = reinterpret_cast<const __nv_bfloat16*>(&sv);
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = nan_max(amax, fabsf(__fdiv_rn(__bfloat162float(xe[j]), __bfloat162float(se[j]))));
  }
#pragma unroll
  for (int off = 4; off > 0; off /= 2) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (sub == 0) amax_part[tok] = amax;

  // 2b. partial down projection: warp w takes k16 steps w, w + 4, ... of the slice; m16 x n32 accumulators
  float acc[4][4] = {};
  const int steps = Ks / 16;
  for (int s = warp; s < steps; s += 4) {
    const int kk = s * 16;
    unsigned a[4];
    // lanes 0-15: rows 0-15 at column kk; lanes 16-31: rows 0-15 at kk + 8 (a0..a3 = m16k16 row-major A)
    ldmatrix_x4(a, tile + (lane % 16) * ld + kk + (lane / 16) * 8);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_bfloat16* col = pd_t + static_cast<size_t>(j * 8 + lane / 4) * K + k0 + kk + (lane % 4) * 2;
      const unsigned b0 = __ldg(reinterpret_cast<const unsigned*>(col));
      const unsigned b1 = __ldg(reinterpret_cast<const unsigned*>(col + 8));
      mma_bf16(acc[j], a, b0, b1);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = lane / 4, c = j * 8 + (lane % 4) * 2;
    float* w = warp_down + warp * kRows * kR;
    w[r * kR + c] = acc[j][0];
    w[r * kR + c + 1] = acc[j][1];
    w[(r + 8) * kR + c] = acc[j][2];
    w[(r + 8) * kR + c + 1] = acc[j][3];
  }
  __syncthreads();
  for (int i = tid; i < kRows * kR; i += kThreads) {
    cta_down[i] = ((warp_down[i] + warp_down[kRows * kR + i]) + warp_down[2 * kRows * kR + i]) +
                  warp_down[3 * kRows * kR + i];
  }

  // 3. exchange through distributed shared memory
  cluster.sync();
  float full = 0.f;
  for (int r = 0; r < C; ++r) full = nan_max(full, cluster.map_shared_rank(amax_part, r)[tok]);
  const float scale = token_scale(full);
  if (rank == 0 && sub == 0 && tok < rows) scales[m0 + tok] = __float2bfloat16_rn(scale);
  for (int i = tid; i < kRows * kR; i += kThreads) {
    const int t = i / kR;
    if (t % C != rank || t >= rows) continue;
    float sum = 0.f;
    for (int r = 0; r < C; ++r) sum += cluster.map_shared_rank(cta_down, r)[i];
    down[static_cast<size_t>(m0 + t) * kR + (i % kR)] = sum;
  }

  // 4. codes of this slice
  if (tok < rows) {
    for (int c = sub; c < chunks; c += 8) {
      const uint4 xv = *reinterpret_cast<const uint4*>(tile + tok * ld + c * 8);
      const uint4 sv = *reinterpret_cast<const uint4*>(smooth + k0 + c * 8);
      const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
      const __nv_bfloat16* se = reinterpret_cast<const __nv_bfloat16*>(&sv);
      unsigned packed[2] = {0u, 0u};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float xh = __fdiv_rn(__bfloat162float(xe[j]), __bfloat162float(se[j]));
        const int q = scale == 0.f ? 0 : int8_code(__fdiv_rn(xh, scale));
        packed[j / 4] |= (static_cast<unsigned>(q) & 0xFFu) << (8 * (j % 4));
      }
      *reinterpret_cast<uint2*>(codes + static_cast<size_t>(m0 + tok) * K + k0 + c * 8) =
          make_uint2(packed[0], packed[1]);
    }
  }
  // 5. peers may still be reading this CTA's amax / down partials
  cluster.sync();
}

}  // namespace

// Cluster size: the fewest CTAs (at most 8, the portable limit) that make slices of at most 768 channels (tile
// 25 KB: several CTAs per SM), else 8 with slices up to 1920 (61 KB); slices are multiples of 64 channels.
int cluster_size(int64_t K) {
  for (int c = 1; c <= 8; c *= 2) {
    if (K % (c * 64) == 0 && K / c <= 768) return c;
  }
  return K % (8 * 64) == 0 && K / 8 <= 1920 ? 8 : -1;
}

std::vector<at::Tensor> quantize_w4a8_cluster(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& pd_t) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M > 0, "x: no tokens");
  TORCH_CHECK(smooth.is_cuda() && smooth.scalar_type() == at::kBFloat16 && smooth.is_contiguous() &&
              smooth.numel() == K, "smooth: bf16 [K] contiguous");
  TORCH_CHECK(pd_t.is_cuda() && pd_t.scalar_type() == at::kBFloat16 && pd_t.is_contiguous() && pd_t.dim() == 2 &&
              pd_t.size(0) == kR && pd_t.size(1) == K, "pd_t: bf16 [32, K] contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(smooth.data_ptr()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(pd_t.data_ptr()) % 4 == 0, "x and smooth 16-byte aligned, pd_t 4-byte");
  TORCH_CHECK(x.device() == smooth.device() && x.device() == pd_t.device() &&
              x.get_device() == c10::cuda::current_device(), "all inputs on the current CUDA device");
  const int C = cluster_size(K);
  TORCH_CHECK(C > 0, "K must split into <= 8 slices of <= 1920 channels, each a multiple of 64");
  const int Ks = static_cast<int>(K / C);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scales = at::empty({M, 1}, x.options());
  auto down = at::empty({M, kR}, x.options().dtype(at::kFloat));
  const size_t smem = sizeof(__nv_bfloat16) * kRows * (Ks + 8) + sizeof(float) * (kRows + 5 * kRows * kR);
  TORCH_CHECK(cudaFuncSetAttribute(quantize_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)) == cudaSuccess, "shared memory attribute");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(((M + kRows - 1) / kRows) * C));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(
      &cfg, quantize_cluster_kernel, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(smooth.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(pd_t.data_ptr()),
      codes.data_ptr<int8_t>(), reinterpret_cast<__nv_bfloat16*>(scales.data_ptr()), down.data_ptr<float>(),
      static_cast<int>(M), static_cast<int>(K), Ks);
  TORCH_CHECK(err == cudaSuccess, "launch: ", cudaGetErrorString(err));
  return {codes, scales, down};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_w4a8_cluster", &quantize_w4a8_cluster, "W4A8 quantize_act with one read of x (probe)");
  m.def("cluster_size", &cluster_size, "CTAs per cluster for K");
}
