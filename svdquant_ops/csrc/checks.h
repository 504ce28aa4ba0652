// Argument validation shared by every backend of the svdquant ops. Each check names the argument and the
// expected value; backends call these first and then only deal with valid, described inputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string_view>

#include "formats.h"

// Dispatch over the three activation / model dtypes the ops accept.
#define SVDQ_DISPATCH_FLOAT16_32(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace svdquant {

Precision parse_precision(std::string_view precision);

struct QuantizeActShape {
  Precision precision;
  int64_t M;  // tokens: product of the leading dims of x
  int64_t K;
  int64_t R;
  int64_t G;  // groups per row
};

QuantizeActShape check_quantize_act(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                                    std::string_view precision, bool act_unsigned);

struct GemmShape {
  Precision precision;
  int64_t M;
  int64_t N;
  int64_t K;
  int64_t R;
  int64_t G;
  bool per_channel_global_scale;
};

GemmShape check_gemm_w4a4(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wgt_codes,
                          const at::Tensor& wgt_scales, const std::optional<at::Tensor>& wgt_global_scale,
                          const at::Tensor& lora_act, const at::Tensor& proj_up,
                          const std::optional<at::Tensor>& bias, std::string_view precision,
                          at::ScalarType out_dtype, bool act_unsigned);

// Data-dependent checks (need the values): run by the CPU kernels. GPU kernels skip them to stay free of host
// synchronization; SVDQuantTensor validates weights once when it is built or loaded.
void check_finite_positive(const at::Tensor& t, const char* op, const char* name);
void check_finite(const at::Tensor& t, const char* op, const char* name);

// Output shape helpers: leading dims of `t` with the last dim replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

}  // namespace svdquant
