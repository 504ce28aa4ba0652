// parallel_linears on the GPU: linear 0 on the caller's stream, each other linear on a side stream of its own,
// forked from the caller's stream and joined back to it, so the call is one unit to the caller and to a CUDA graph
// capture (the side streams join the capture through the fork's event). The same kernels as one linear() after the
// other, so the same bits; only their launches overlap.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../linear.h"
#include "ops_cuda.h"

namespace svdquant {
namespace cuda_impl {
namespace {

// Side stream `i` of the caller's stream `main`, created on first use and never handed to other code. That is what
// makes the memory safe without record_stream: a block the caching allocator gave to a side stream (an output, a
// workspace) goes back to that stream's free list when it is freed, and only a later call from the same caller
// stream allocates on that side stream again, after its fork made it wait for everything queued on the caller's
// stream so far, hence for every read of that block there. (One set per caller stream, also so that a graph capture
// on one stream and eager calls on another, in two threads, never share a side stream.) They live as long as the
// process: PyTorch's own streams are few and never destroyed; a caller making a new external stream per call would
// get new side streams each time. Highest priority: the block scheduler then gives SMs that free up to the side
// stream's short launches first.
c10::cuda::CUDAStream side_stream(const c10::cuda::CUDAStream& main, size_t i) {
  static std::mutex mutex;
  static std::map<std::tuple<c10::DeviceIndex, c10::StreamId, size_t>, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& s = streams[{main.device_index(), main.id(), i}];
  if (s == nullptr) {
    // (a first call may come inside a graph capture, the caller's stream being the capture's own: creating a stream
    // enqueues nothing, so it is done in relaxed mode, where a global-mode capture would refuse it as "unsafe")
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    int least = 0, greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  }
  return c10::cuda::getStreamFromExternal(s, main.device_index());
}

// Joins the side streams it was given back to the caller's stream: join() on the way out (its errors raised), the
// destructor for those left when a linear throws. A capture left with an unjoined stream fails at its end
// (cudaErrorStreamCaptureUnjoined), which would hide the linear's own error.
class Joins {
 public:
  explicit Joins(const c10::cuda::CUDAStream& main) : main_(main) {}
  Joins(const Joins&) = delete;
  Joins& operator=(const Joins&) = delete;
  void add(const c10::cuda::CUDAStream& side) { sides_.push_back(side); }
  void join() {
    while (!sides_.empty()) {
      join_one(sides_.back());
      sides_.pop_back();
    }
  }
  ~Joins() {
    for (const auto& side : sides_) {
      try {
        join_one(side);
      } catch (...) {  // (a destructor must not throw; the error being unwound is the one to report)
      }
    }
  }

 private:
  void join_one(const c10::cuda::CUDAStream& side) const {
    c10::cuda::CUDAEvent join;  // (events without timing: what a graph capture records as a dependency)
    join.record(side);
    join.block(main_);
  }

  c10::cuda::CUDAStream main_;
  std::vector<c10::cuda::CUDAStream> sides_;
};

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
  c10::cuda::CUDAEvent fork;
  if (n > 1) {
    fork.record(main);
  }
  // SMs set aside for the side streams' GEMMs (0: none; ops_cuda.h)
  const int reserved = n > 1 ? parallel_reserved_sms() : 0;
  Joins joins(main);
  {
    const CtaCap cap(reserved > 0 ? device_sm_count() - reserved : 0);
    out[0] = one(0);  // (in order, so that errors come in the definition's order)
  }
  const CtaCap cap(reserved);
  for (size_t i = 1; i < n; ++i) {
    const c10::cuda::CUDAStream side = side_stream(main, i - 1);
    fork.block(side);
    joins.add(side);
    const c10::cuda::CUDAStreamGuard on_side(side);
    out[i] = one(i);
  }
  joins.join();
  return out;
}

}  // namespace cuda_impl
}  // namespace svdquant
