// parallel_linears on the GPU: linear 0 on the caller's stream, each other linear on a side stream of its own,
// forked from the caller's stream and joined back to it, so the call is one unit to the caller and to a CUDA graph
// capture (the side streams join the capture through the fork's event). The same kernels as one linear() after the
// other, so the same bits; only their launches overlap.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../linear.h"
#include "ops_cuda.h"

namespace svdquant {
namespace cuda_impl {
namespace {

// Side stream `i` of `device`, created on first use and never handed to other code. That is what makes the memory
// safe without record_stream: a block the caching allocator gave to a side stream (an output, a workspace) goes back
// to that stream's free list, and only a later parallel_linears call allocates on that stream again, after its fork
// made the stream wait for everything queued on the caller's stream so far, hence for every read of that block.
// Highest priority: the block scheduler then gives SMs that free up to the side stream's short launches first.
c10::cuda::CUDAStream side_stream(c10::DeviceIndex device, size_t i) {
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, size_t>, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& s = streams[{device, i}];
  if (s == nullptr) {
    int least = 0, greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  }
  return c10::cuda::getStreamFromExternal(s, device);
}

}  // namespace

std::vector<at::Tensor> parallel_linears_cuda(at::TensorList x, at::TensorList smooth, at::TensorList proj_down,
                                              at::TensorList codes, at::TensorList scales,
                                              const c10::List<std::optional<at::Tensor>>& global_scale,
                                              at::TensorList proj_up,
                                              const c10::List<std::optional<at::Tensor>>& bias,
                                              c10::string_view precision, bool act_unsigned) {
  const auto names =
      check_parallel_linears(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision,
                             act_unsigned);
  const size_t n = x.size();
  const c10::cuda::CUDAGuard guard(x[0].device());
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  auto one = [&](size_t i) {
    return linear_named(x[i], smooth[i], proj_down[i], codes[i], scales[i], global_scale.get(i), proj_up[i],
                        bias.get(i), precision, act_unsigned, names[i].c_str());
  };
  std::vector<at::Tensor> out(n);
  if (n == 1) {
    out[0] = one(0);
    return out;
  }
  c10::cuda::CUDAEvent fork;  // (events without timing: what a graph capture records as a dependency)
  fork.record(main);
  std::vector<c10::cuda::CUDAEvent> joins(n - 1);
  for (size_t i = 1; i < n; ++i) {  // the side streams first: their launches are the short ones
    const c10::cuda::CUDAStream side = side_stream(main.device_index(), i - 1);
    fork.block(side);
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      out[i] = one(i);
    }
    joins[i - 1].record(side);
  }
  out[0] = one(0);
  for (auto& join : joins) {
    join.block(main);
  }
  return out;
}

}  // namespace cuda_impl
}  // namespace svdquant
