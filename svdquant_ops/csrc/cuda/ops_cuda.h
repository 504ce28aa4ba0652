// CUDA entry points of the svdquant ops (registered for the CUDA dispatch key in register_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace svdquant {
namespace cuda_impl {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda(const at::Tensor& x, const at::Tensor& smooth,
                                                                 const at::Tensor& proj_down,
                                                                 c10::string_view precision, bool act_unsigned);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_given_amax_cuda(const at::Tensor& x,
                                                                            const at::Tensor& smooth,
                                                                            const at::Tensor& proj_down,
                                                                            const at::Tensor& amax);

at::Tensor gemm_cuda(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                     const at::Tensor& scales, const std::optional<at::Tensor>& global_scale,
                     const at::Tensor& down_act, const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                     c10::string_view precision, at::ScalarType out_dtype, bool act_unsigned);

at::Tensor gemm_cat_cuda(const at::Tensor& act_codes, const at::Tensor& act_scales, at::TensorList codes,
                         at::TensorList scales, const c10::List<std::optional<at::Tensor>>& global_scale,
                         const at::Tensor& down_act, at::TensorList proj_up,
                         const c10::List<std::optional<at::Tensor>>& bias, c10::string_view precision,
                         at::ScalarType out_dtype, bool act_unsigned);

at::Tensor expand_w4a8_weight_cuda(const at::Tensor& codes, const at::Tensor& scales);

std::tuple<at::Tensor, at::Tensor> gemm_expanded_cuda(
    const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes, const at::Tensor& scales,
    const at::Tensor& global_scale, const at::Tensor& down_act, const at::Tensor& proj_up,
    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, const at::Tensor& weight,
    const std::optional<at::Tensor>& next_codes, const std::optional<at::Tensor>& next_scales);

at::Tensor w4a16_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& zeros, const std::optional<at::Tensor>& bias);

std::vector<at::Tensor> w4a16_linear_group_cuda(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                                at::TensorList zeros,
                                                const c10::List<std::optional<at::Tensor>>& bias);

std::vector<at::Tensor> parallel_linears_cuda(at::TensorList x, at::TensorList smooth, at::TensorList proj_down,
                                              at::TensorList codes, at::TensorList scales,
                                              const c10::List<std::optional<at::Tensor>>& global_scale,
                                              at::TensorList proj_up,
                                              const c10::List<std::optional<at::Tensor>>& bias,
                                              c10::string_view precision, bool act_unsigned);

// While a CtaCap lives, the persistent GEMM launches made on this thread (gemm.cu: the sm90 and register-path
// kernels, whose tiles stride over the grid) take at most `cap` CTAs; 0: no cap (one CTA per SM, at most one per
// tile). parallel_linears sets it around each of its linears.
class CtaCap {
 public:
  explicit CtaCap(int cap);
  ~CtaCap();
  CtaCap(const CtaCap&) = delete;
  CtaCap& operator=(const CtaCap&) = delete;

 private:
  int saved_;
};

// SVDQUANT_OPS_CUDA_PARALLEL_SMS=S (0 <= S < the device's SMs): inside parallel_linears, linear 0's persistent GEMM
// runs on at most SMs - S CTAs and each side stream's on at most S, so that the side streams' kernels run beside
// linear 0's GEMM instead of only in its gaps (a persistent GEMM holds every SM until its last tile). Unset or 0: no
// cap, the default until measured (benchmarks/HISTORY.md, thirtieth session: S ~ 15 would balance FLUX.1's 512 text
// tokens against its 4096 image tokens). Read at every call, so benchmarks compare settings in one process.
int parallel_reserved_sms();

// The current device's number of SMs.
int device_sm_count();

}  // namespace cuda_impl
}  // namespace svdquant
