// Argument validation shared by every backend of the svdquant ops. Each check names the argument and the
// expected value; backends call these first and then only deal with valid, described inputs.
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "formats.h"

// Dispatch over the three activation / model dtypes the ops accept.
#define SVDQ_DISPATCH_FLOAT16_32(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace svdquant {

Precision parse_precision(std::string_view precision);
const char* precision_name(Precision p);

// W4A8: |act code| * |weight code * multiplier| <= 127 * 126 = 16002, so an int32 dot product over K <= 131072
// channels cannot overflow (131072 * 16002 < 2^31). Larger K is refused by check_gemm.
constexpr int64_t kW4a8MaxK = 131072;

struct QuantizeActShape {
  Precision precision;
  int64_t M;  // tokens: product of the leading dims of x
  int64_t K;
  int64_t R;
  int64_t G;  // activation scales per row: K / group size (int4, nvfp4), 1 for w4a8 (one scale per token)
};

QuantizeActShape check_quantize_act(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                                    std::string_view precision, bool act_unsigned,
                                    const char* op = "svdquant::quantize_act");

// quantize_act_given_amax: quantize_act's checks for precision 'w4a8', and amax fp32 [..., 1] on x's device.
QuantizeActShape check_quantize_act_given_amax(const at::Tensor& x, const at::Tensor& smooth,
                                               const at::Tensor& proj_down, const at::Tensor& amax);

struct GemmShape {
  Precision precision;
  int64_t M;
  int64_t N;
  int64_t K;
  int64_t R;
  int64_t G;  // weight groups per row: K / group size (w4a8: K / 64, the multipliers' groups)
  bool per_channel_global_scale;  // always true for w4a8
};

GemmShape check_gemm(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                     const at::Tensor& scales, const std::optional<at::Tensor>& global_scale,
                     const at::Tensor& down_act, const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                     std::string_view precision, at::ScalarType out_dtype, bool act_unsigned,
                     const char* op = "svdquant::gemm");

// gemm_cat: as many codes, scales, global_scale, proj_up and bias entries, at least one; each weight checked as
// gemm's against the one activation. Returns one shape per weight.
std::vector<GemmShape> check_gemm_cat(const at::Tensor& act_codes, const at::Tensor& act_scales, at::TensorList codes,
                                      at::TensorList scales, const c10::List<std::optional<at::Tensor>>& global_scale,
                                      const at::Tensor& down_act, at::TensorList proj_up,
                                      const c10::List<std::optional<at::Tensor>>& bias, std::string_view precision,
                                      at::ScalarType out_dtype, bool act_unsigned);

// expand_w4a8_weight: codes uint8 [N, K/2] (K a positive multiple of 64, N >= 1) and the multipliers uint8
// [N, K/64] on one device; returns {N, K}. `prefix` names the arguments ("next_" for gemm_expanded's next weight).
std::pair<int64_t, int64_t> check_expand_w4a8(const at::Tensor& codes, const at::Tensor& scales, const char* op,
                                              const char* prefix = "");

// gemm_expanded: gemm's checks for precision 'w4a8', plus `weight` int8 [N, K] on act_codes' device, and the next
// weight's codes and multipliers both given or both None (check_expand_w4a8, on the same device).
GemmShape check_gemm_expanded(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                              const at::Tensor& scales, const at::Tensor& global_scale, const at::Tensor& down_act,
                              const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype, const at::Tensor& weight,
                              const std::optional<at::Tensor>& next_codes, const std::optional<at::Tensor>& next_scales);

// W4A16 (weight-only): unsigned 4-bit codes, one scale and one zero per 64 input channels of a row.
constexpr int kW4a16Group = 64;

struct W4a16Shape {
  int64_t M;  // tokens: product of the leading dims of x
  int64_t N;
  int64_t K;
  int64_t G;  // groups per row: K / 64
};

W4a16Shape check_w4a16_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                              const char* op = "svdquant::w4a16_linear");
// w4a16_linear_group: as many codes, scales, zeros and bias entries, at least one; each weight checked as
// w4a16_linear's against x. Returns one shape per weight.
std::vector<W4a16Shape> check_w4a16_linear_group(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                                 at::TensorList zeros,
                                                 const c10::List<std::optional<at::Tensor>>& bias);

// parallel_linears: as many smooth, proj_down, codes, scales, global_scale, proj_up and bias entries as x, at
// least one; every x on x[0]'s device; each linear's x, smooth and proj_down checked as quantize_act's. Returns
// each linear's name for its messages ("svdquant::parallel_linears (linear i)"); its gemm side is checked by
// check_gemm under that name once its activation is quantized.
std::vector<std::string> check_parallel_linears(at::TensorList x, at::TensorList smooth, at::TensorList proj_down,
                                                at::TensorList codes, at::TensorList scales,
                                                const c10::List<std::optional<at::Tensor>>& global_scale,
                                                at::TensorList proj_up,
                                                const c10::List<std::optional<at::Tensor>>& bias,
                                                std::string_view precision, bool act_unsigned);

// Data-dependent checks (need the values): run by the CPU kernels. GPU kernels skip them to stay free of host
// synchronization; SVDQuantTensor validates weights once when it is built or loaded.
void check_finite_positive(const at::Tensor& t, const char* op, const char* name);
void check_finite(const at::Tensor& t, const char* op, const char* name);
// W4A8 weight multipliers (uint8) must lie in [1, kW4a8MultMax].
void check_w4a8_multipliers(const at::Tensor& t, const char* op, const char* name);
// Each value >= 0 or NaN (a per-token amax).
void check_not_negative(const at::Tensor& t, const char* op, const char* name);

// Output shape helpers: leading dims of `t` with the last dim replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

}  // namespace svdquant
