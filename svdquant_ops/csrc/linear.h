// The whole SVDQuant linear, y = gemm(quantize_act(x)), through the dispatcher (defined in ops.cpp): what
// svdquant::linear and each entry of svdquant::parallel_linears compute, on every backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>

namespace svdquant {

// `name` (or nullptr): the caller's name for this linear, with which its gemm-side arguments are checked
// ("svdquant::parallel_linears (linear 1)"); nullptr leaves the checks to gemm itself.
at::Tensor linear_named(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                        const at::Tensor& codes, const at::Tensor& scales,
                        const std::optional<at::Tensor>& global_scale, const at::Tensor& proj_up,
                        const std::optional<at::Tensor>& bias, c10::string_view precision, bool act_unsigned,
                        const char* name);

}  // namespace svdquant
