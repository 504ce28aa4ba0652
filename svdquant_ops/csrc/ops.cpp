// The op schemas of the `svdquant` namespace, defined once. Backends register kernels in their own files
// (cpu/, cuda/); fake kernels for tracing live in svdquant_ops/meta.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "linear.h"

namespace svdquant {

// y = gemm(quantize_act(x)), through the dispatcher (linear.h).
at::Tensor linear_named(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                        const at::Tensor& codes, const at::Tensor& scales,
                        const std::optional<at::Tensor>& global_scale, const at::Tensor& proj_up,
                        const std::optional<at::Tensor>& bias, c10::string_view precision, bool act_unsigned,
                        const char* name) {
  static auto quantize_act =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("svdquant::quantize_act", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, c10::string_view, bool)>();
  static auto gemm = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("svdquant::gemm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                           at::ScalarType, bool)>();
  auto [act_codes, act_scales, down_act] = quantize_act.call(x, smooth, proj_down, precision, act_unsigned);
  if (name != nullptr) {  // a parallel_linears entry: its gemm-side errors name it
    check_gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
               x.scalar_type(), act_unsigned, name);
  }
  return gemm.call(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
                   x.scalar_type(), act_unsigned);
}

// The whole SVDQuant linear. CompositeImplicitAutograd, so tracing and torch.compile see the two ops (each with its
// fake kernel) instead of an opaque one.
at::Tensor linear(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                  const at::Tensor& codes, const at::Tensor& scales,
                  const std::optional<at::Tensor>& global_scale, const at::Tensor& proj_up,
                  const std::optional<at::Tensor>& bias, c10::string_view precision, bool act_unsigned) {
  return linear_named(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision, act_unsigned,
                      nullptr);
}

// parallel_linears, the definition: one linear after the other (CompositeExplicitAutograd, so every backend without
// a kernel of its own runs it; the CUDA kernel overlaps them on streams, cuda/parallel.cpp).
std::vector<at::Tensor> parallel_linears(at::TensorList x, at::TensorList smooth, at::TensorList proj_down,
                                         at::TensorList codes, at::TensorList scales,
                                         const c10::List<std::optional<at::Tensor>>& global_scale,
                                         at::TensorList proj_up, const c10::List<std::optional<at::Tensor>>& bias,
                                         c10::string_view precision, bool act_unsigned) {
  const auto names =
      check_parallel_linears(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision, act_unsigned);
  std::vector<at::Tensor> out;
  out.reserve(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    out.push_back(linear_named(x[i], smooth[i], proj_down[i], codes[i], scales[i], global_scale.get(i), proj_up[i],
                               bias.get(i), precision, act_unsigned, names[i].c_str()));
  }
  return out;
}

}  // namespace svdquant

TORCH_LIBRARY(svdquant, m) {
  m.def(
      "quantize_act(Tensor x, Tensor smooth, Tensor proj_down, str precision, bool act_unsigned=False) "
      "-> (Tensor act_codes, Tensor act_scales, Tensor down_act)");
  // W4A8's quantize_act with each token's amax of |x / smooth| given (fp32 [..., 1]) instead of computed: the
  // compiled path lets Inductor compute that row reduction inside the kernel that produces x (ops.install_compile_pass),
  // so this op reads x once. Codes and scales as quantize_act's for that amax (equal to quantize_act(x, smooth,
  // proj_down, "w4a8") when amax is the exact one); a smaller amax clamps codes to +-127.
  m.def(
      "quantize_act_given_amax(Tensor x, Tensor smooth, Tensor proj_down, Tensor amax) "
      "-> (Tensor act_codes, Tensor act_scales, Tensor down_act)");
  m.def(
      "gemm(Tensor act_codes, Tensor act_scales, Tensor codes, Tensor scales, Tensor? global_scale, "
      "Tensor down_act, Tensor proj_up, Tensor? bias, str precision, ScalarType out_dtype, "
      "bool act_unsigned=False) -> Tensor");
  // One activation against several weights, the outputs side by side: cat([gemm(act, weight i) for i], -1) (bit for
  // bit on the CPU; on Hopper each column as gemm computes it at the tile width chosen for the whole). The compile pass gives it the W4A8 GEMMs that read one quantize_act (a FLUX.1 single block's q/k/v and
  // proj_mlp), so their tiles fill one persistent launch: one partial last wave instead of one per GEMM. On Hopper
  // the W4A8 weights are expanded side by side into one operand and one GEMM kernel runs.
  m.def(
      "gemm_cat(Tensor act_codes, Tensor act_scales, Tensor[] codes, Tensor[] scales, Tensor?[] global_scale, "
      "Tensor down_act, Tensor[] proj_up, Tensor?[] bias, str precision, ScalarType out_dtype, "
      "bool act_unsigned=False) -> Tensor");
  // W4A8 weights expanded ahead of their GEMM (ops.install_compile_pass): expand_w4a8_weight gives the int8 weight
  // code * multiplier [N, K] that gemm's Hopper kernel multiplies; gemm_expanded is gemm(..., "w4a8") with that
  // expansion given as `weight` (it must equal expand_w4a8_weight(codes, scales); the CPU op checks it), and it also
  // returns the expansion of the next weight (next_codes, next_scales; int8 [0, 0] when None), which the CUDA kernel
  // writes with warps that its GEMM leaves idle. So a compiled model's W4A8 GEMMs expand no weight of their own.
  m.def("expand_w4a8_weight(Tensor codes, Tensor scales) -> Tensor");
  m.def(
      "gemm_expanded(Tensor act_codes, Tensor act_scales, Tensor codes, Tensor scales, Tensor global_scale, "
      "Tensor down_act, Tensor proj_up, Tensor? bias, ScalarType out_dtype, Tensor weight, Tensor? next_codes=None, "
      "Tensor? next_scales=None) -> (Tensor out, Tensor next_weight)");
  m.def(
      "linear(Tensor x, Tensor smooth, Tensor proj_down, Tensor codes, Tensor scales, Tensor? global_scale, "
      "Tensor proj_up, Tensor? bias, str precision, bool act_unsigned=False) -> Tensor");
  // Independent linears side by side: out[i] = linear(x[i], smooth[i], ..., precision, act_unsigned), bit for bit.
  // The compile pass gives it pairs of same-shape linears that do not depend on each other (a FLUX.1 double block's
  // image and text streams); on the GPU the second runs on a stream of its own, so the small text-stream calls
  // (512 tokens: short, latency-bound launches) fill the SMs the image stream's kernels leave idle.
  m.def(
      "parallel_linears(Tensor[] x, Tensor[] smooth, Tensor[] proj_down, Tensor[] codes, Tensor[] scales, "
      "Tensor?[] global_scale, Tensor[] proj_up, Tensor?[] bias, str precision, bool act_unsigned=False) "
      "-> Tensor[]");
  // Weight-only 4-bit linear (formats.py "w4a16"): y = x @ (code * scale + zero)^T + bias in x's dtype.
  m.def("w4a16_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, Tensor? bias=None) -> Tensor");
  // Several weight-only linears of one input as one call: out[i] = w4a16_linear(x, codes[i], scales[i], zeros[i],
  // bias[i]), bit for bit. The compile pass groups the calls that read one tensor (FLUX.1's 77 AdaLN modulation
  // linears all read silu(temb)); on the GPU one GEMV launch streams all of their weights.
  m.def(
      "w4a16_linear_group(Tensor x, Tensor[] codes, Tensor[] scales, Tensor[] zeros, Tensor?[] bias) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(svdquant, CompositeImplicitAutograd, m) { m.impl("linear", &svdquant::linear); }
TORCH_LIBRARY_IMPL(svdquant, CompositeExplicitAutograd, m) {
  m.impl("parallel_linears", &svdquant::parallel_linears);
}

// Inference ops: no derivative formulas. The autograd kernel runs the op below autograd (so the kernels' own
// ATen calls record nothing) and makes a backward through a float output raise "not implemented".
TORCH_LIBRARY_IMPL(svdquant, Autograd, m) {
  m.impl("quantize_act", torch::autograd::autogradNotImplementedFallback());
  m.impl("quantize_act_given_amax", torch::autograd::autogradNotImplementedFallback());
  m.impl("gemm", torch::autograd::autogradNotImplementedFallback());
  m.impl("gemm_cat", torch::autograd::autogradNotImplementedFallback());
  m.impl("expand_w4a8_weight", torch::autograd::autogradNotImplementedFallback());
  m.impl("gemm_expanded", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a16_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a16_linear_group", torch::autograd::autogradNotImplementedFallback());
  m.impl("parallel_linears", torch::autograd::autogradNotImplementedFallback());
}
