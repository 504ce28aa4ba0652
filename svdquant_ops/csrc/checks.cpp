#include "checks.h"

#include <c10/util/Exception.h>

namespace svdquant {
namespace {

// torch-style dtype names ("torch.bfloat16"), matching the fake kernels' messages.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

bool is_float16_32(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                  const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_scale_dtype(const at::Tensor& t, Precision p, const char* op, const char* name, bool weight) {
  if (p == Precision::kNvfp4) {
    TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn, op, ": ", name,
                " must be float8_e4m3fn for precision 'nvfp4', got ", dtype_name(t.scalar_type()));
  } else if (p == Precision::kW4a8 && weight) {
    TORCH_CHECK(t.scalar_type() == at::kByte, op, ": ", name, " must be uint8 (integer multipliers in [1, ",
                kW4a8MultMax, "]) for precision 'w4a8', got ", dtype_name(t.scalar_type()));
  } else {
    TORCH_CHECK(is_float16_32(t.scalar_type()), op, ": ", name, " must be bfloat16, float16 or float32 for precision '",
                precision_name(p), "', got ", dtype_name(t.scalar_type()));
  }
}

}  // namespace

Precision parse_precision(std::string_view precision) {
  if (precision == "int4") return Precision::kInt4;
  if (precision == "nvfp4") return Precision::kNvfp4;
  if (precision == "w4a8") return Precision::kW4a8;
  TORCH_CHECK(false, "precision must be 'int4', 'nvfp4' or 'w4a8', got '", std::string(precision), "'");
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kInt4: return "int4";
    case Precision::kNvfp4: return "nvfp4";
    case Precision::kW4a8: return "w4a8";
  }
  return "?";
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

QuantizeActShape check_quantize_act(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& proj_down,
                                    std::string_view precision, bool act_unsigned, const char* op) {
  QuantizeActShape s{};
  s.precision = parse_precision(precision);
  TORCH_CHECK(!(act_unsigned && s.precision != Precision::kInt4), op,
              ": act_unsigned=True is only defined for precision 'int4', got precision '", precision_name(s.precision),
              "'");
  TORCH_CHECK(is_float16_32(x.scalar_type()), op, ": x must be bfloat16, float16 or float32, got ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., K], got a 0-d tensor");
  s.K = x.size(-1);
  const int gs = group_size(s.precision);
  TORCH_CHECK(s.K > 0 && s.K % gs == 0, op, ": x.size(-1) (K=", s.K, ") must be a positive multiple of ", gs,
              " for precision '", std::string(precision), "'");
  s.G = s.precision == Precision::kW4a8 ? 1 : s.K / gs;  // W4A8: one scale per token
  s.M = x.numel() / s.K;
  TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == s.K, op, ": smooth must have shape [K] = [", s.K,
              "] to match x.size(-1), got ", smooth.sizes());
  TORCH_CHECK(smooth.scalar_type() == x.scalar_type(), op, ": smooth must have x's dtype ", dtype_name(x.scalar_type()),
              ", got ", dtype_name(smooth.scalar_type()));
  check_device(smooth, x, op, "smooth", "x");
  TORCH_CHECK(proj_down.dim() == 2 && proj_down.size(0) == s.K, op, ": proj_down must have shape [K, R] with K=",
              s.K, " to match x.size(-1), got ", proj_down.sizes());
  TORCH_CHECK(proj_down.scalar_type() == x.scalar_type(), op, ": proj_down must have x's dtype ",
              dtype_name(x.scalar_type()), ", got ", dtype_name(proj_down.scalar_type()));
  check_device(proj_down, x, op, "proj_down", "x");
  s.R = proj_down.size(1);
  return s;
}

QuantizeActShape check_quantize_act_given_amax(const at::Tensor& x, const at::Tensor& smooth,
                                               const at::Tensor& proj_down, const at::Tensor& amax) {
  constexpr const char* op = "svdquant::quantize_act_given_amax";
  const auto s = check_quantize_act(x, smooth, proj_down, "w4a8", false, op);
  TORCH_CHECK(amax.scalar_type() == at::kFloat, op, ": amax must be float32 (each token's amax of |x / smooth|), got ",
              dtype_name(amax.scalar_type()));
  TORCH_CHECK(amax.sizes() == at::IntArrayRef(with_last_dim(x, 1)), op, ": amax must have shape ",
              at::IntArrayRef(with_last_dim(x, 1)), " (x's leading dims and one value per token), got ", amax.sizes());
  check_device(amax, x, op, "amax", "x");
  return s;
}

GemmShape check_gemm(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                     const at::Tensor& scales, const std::optional<at::Tensor>& global_scale,
                     const at::Tensor& down_act, const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                     std::string_view precision, at::ScalarType out_dtype, bool act_unsigned, const char* op) {
  GemmShape s{};
  s.precision = parse_precision(precision);
  const bool w4a8 = s.precision == Precision::kW4a8;
  TORCH_CHECK(!(act_unsigned && s.precision != Precision::kInt4), op,
              ": act_unsigned=True is only defined for precision 'int4', got precision '", precision_name(s.precision),
              "'");
  if (w4a8) {
    TORCH_CHECK(act_codes.scalar_type() == at::kChar, op,
                ": act_codes must be int8 (one 8-bit code per byte) for precision 'w4a8', got ",
                dtype_name(act_codes.scalar_type()));
  } else {
    TORCH_CHECK(act_codes.scalar_type() == at::kByte, op,
                ": act_codes must be uint8 (two 4-bit codes per byte), got ", dtype_name(act_codes.scalar_type()));
  }
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8 (two 4-bit codes per byte), got ",
              dtype_name(codes.scalar_type()));
  TORCH_CHECK(act_codes.dim() >= 1, op, ": act_codes must have shape [..., ", w4a8 ? "K" : "K/2",
              "], got a 0-d tensor");
  TORCH_CHECK(codes.dim() == 2, op, ": codes must have shape [N, K/2], got ", codes.sizes());
  s.K = w4a8 ? act_codes.size(-1) : act_codes.size(-1) * 2;
  s.N = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == s.K, op, ": K mismatch: act_codes holds K=", s.K,
              " input channels per row but codes holds K=", codes.size(1) * 2);
  TORCH_CHECK(s.N >= 1, op, ": codes must have at least one output row (N >= 1), got N=0");
  const int gs = group_size(s.precision);
  TORCH_CHECK(s.K > 0 && s.K % gs == 0, op, ": K (", s.K, ") must be a positive multiple of ", gs,
              " for precision '", std::string(precision), "'");
  TORCH_CHECK(!w4a8 || s.K <= kW4a8MaxK, op, ": K (", s.K, ") must be at most ", kW4a8MaxK,
              " for precision 'w4a8' (so that the int32 dot product of int8 codes cannot overflow)");
  s.G = s.K / gs;
  s.M = act_codes.numel() / (w4a8 ? s.K : s.K / 2);

  if (w4a8) {
    TORCH_CHECK(act_scales.sizes() == at::IntArrayRef(with_last_dim(act_codes, 1)), op,
                ": act_scales must have shape ", at::IntArrayRef(with_last_dim(act_codes, 1)),
                " (act_codes' leading dims and one scale per token for precision 'w4a8'), got ", act_scales.sizes());
  } else {
    TORCH_CHECK(act_scales.sizes() == at::IntArrayRef(with_last_dim(act_codes, s.G)), op,
                ": act_scales must have shape ", at::IntArrayRef(with_last_dim(act_codes, s.G)),
                " (act_codes' leading dims and K/", gs, " groups), got ", act_scales.sizes());
  }
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == s.N && scales.size(1) == s.G, op,
              ": scales must have shape [N, K/", gs, "] = [", s.N, ", ", s.G, "], got ", scales.sizes());
  check_scale_dtype(act_scales, s.precision, op, "act_scales", /*weight=*/false);
  check_scale_dtype(scales, s.precision, op, "scales", /*weight=*/true);

  if (s.precision == Precision::kInt4) {
    TORCH_CHECK(!global_scale.has_value(), op,
                ": global_scale is only used by precision 'nvfp4' and 'w4a8'; pass None for 'int4'");
  } else if (w4a8) {
    TORCH_CHECK(global_scale.has_value(), op,
                ": global_scale is required for precision 'w4a8' (the fp32 per-output-channel scale, shape [N] = [",
                s.N, "]), got None");
    const auto& g = *global_scale;
    TORCH_CHECK(g.scalar_type() == at::kFloat, op, ": global_scale must be float32, got ", dtype_name(g.scalar_type()));
    TORCH_CHECK(g.dim() == 1 && g.numel() == s.N, op, ": global_scale must have shape [N] = [", s.N,
                "] (per output channel) for precision 'w4a8', got ", g.sizes());
    check_device(g, act_codes, op, "global_scale", "act_codes");
    s.per_channel_global_scale = true;
  } else if (global_scale.has_value()) {
    const auto& g = *global_scale;
    TORCH_CHECK(g.scalar_type() == at::kFloat, op, ": global_scale must be float32, got ", dtype_name(g.scalar_type()));
    TORCH_CHECK(g.dim() <= 1 && (g.numel() == 1 || g.numel() == s.N), op,
                ": global_scale must have shape [1] (per tensor) or [N] = [", s.N,
                "] (per output channel), got ", g.sizes());
    check_device(g, act_codes, op, "global_scale", "act_codes");
    s.per_channel_global_scale = g.numel() == s.N && s.N > 1;
  }

  TORCH_CHECK(down_act.scalar_type() == at::kFloat, op, ": down_act must be float32, got ",
              dtype_name(down_act.scalar_type()));
  TORCH_CHECK(proj_up.dim() == 2 && proj_up.size(0) == s.N, op, ": proj_up must have shape [N, R] with N=", s.N,
              ", got ", proj_up.sizes());
  TORCH_CHECK(is_float16_32(proj_up.scalar_type()), op, ": proj_up must be bfloat16, float16 or float32, got ",
              dtype_name(proj_up.scalar_type()));
  s.R = proj_up.size(1);
  TORCH_CHECK(down_act.sizes() == at::IntArrayRef(with_last_dim(act_codes, s.R)), op,
              ": down_act must have shape ", at::IntArrayRef(with_last_dim(act_codes, s.R)),
              " (act_codes' leading dims and proj_up's rank R=", s.R, "), got ", down_act.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, op, ": bias must have shape [N] = [", s.N, "], got ",
                bias->sizes());
    TORCH_CHECK(is_float16_32(bias->scalar_type()), op, ": bias must be bfloat16, float16 or float32, got ",
                dtype_name(bias->scalar_type()));
    check_device(*bias, act_codes, op, "bias", "act_codes");
  }
  TORCH_CHECK(is_float16_32(out_dtype), op, ": out_dtype must be bfloat16, float16 or float32, got ", dtype_name(out_dtype));
  check_device(act_scales, act_codes, op, "act_scales", "act_codes");
  check_device(codes, act_codes, op, "codes", "act_codes");
  check_device(scales, act_codes, op, "scales", "act_codes");
  check_device(down_act, act_codes, op, "down_act", "act_codes");
  check_device(proj_up, act_codes, op, "proj_up", "act_codes");
  return s;
}

std::pair<int64_t, int64_t> check_expand_w4a8(const at::Tensor& codes, const at::Tensor& scales, const char* op,
                                              const char* prefix) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": ", prefix, "codes must be uint8 (two 4-bit codes per byte), got ",
              dtype_name(codes.scalar_type()));
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, op, ": ", prefix,
              "codes must have shape [N, K/2] with N >= 1, got ", codes.sizes());
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(K > 0 && K % kInt4Group == 0, op, ": ", prefix, "codes must hold K (", K,
              ") input channels per row, a positive multiple of ", kInt4Group, " for precision 'w4a8'");
  TORCH_CHECK(scales.scalar_type() == at::kByte, op, ": ", prefix, "scales must be uint8 (integer multipliers in [1, ",
              kW4a8MultMax, "]) for precision 'w4a8', got ", dtype_name(scales.scalar_type()));
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / kInt4Group, op, ": ", prefix,
              "scales must have shape [N, K/", kInt4Group, "] = [", N, ", ", K / kInt4Group, "], got ", scales.sizes());
  check_device(scales, codes, op, (std::string(prefix) + "scales").c_str(), (std::string(prefix) + "codes").c_str());
  return {N, K};
}

GemmShape check_gemm_expanded(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                              const at::Tensor& scales, const at::Tensor& global_scale, const at::Tensor& down_act,
                              const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype, const at::Tensor& weight,
                              const std::optional<at::Tensor>& next_codes,
                              const std::optional<at::Tensor>& next_scales) {
  constexpr const char* op = "svdquant::gemm_expanded";
  const GemmShape s = check_gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, "w4a8",
                                 out_dtype, false, op);
  TORCH_CHECK(weight.scalar_type() == at::kChar, op,
              ": weight must be int8 (the expanded weight code * multiplier, expand_w4a8_weight), got ",
              dtype_name(weight.scalar_type()));
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == s.N && weight.size(1) == s.K, op,
              ": weight must have shape [N, K] = [", s.N, ", ", s.K, "] (codes' expansion), got ", weight.sizes());
  check_device(weight, act_codes, op, "weight", "act_codes");
  TORCH_CHECK(next_codes.has_value() == next_scales.has_value(), op,
              ": next_codes and next_scales must be given together (the next weight to expand) or both be None");
  if (next_codes.has_value()) {
    check_expand_w4a8(*next_codes, *next_scales, op, "next_");
    check_device(*next_codes, act_codes, op, "next_codes", "act_codes");
  }
  return s;
}

W4a16Shape check_w4a16_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              const at::Tensor& zeros, const std::optional<at::Tensor>& bias, const char* op) {
  W4a16Shape s{};
  TORCH_CHECK(is_float16_32(x.scalar_type()), op, ": x must be bfloat16, float16 or float32, got ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., K], got a 0-d tensor");
  s.K = x.size(-1);
  TORCH_CHECK(s.K > 0 && s.K % kW4a16Group == 0, op, ": x.size(-1) (K=", s.K, ") must be a positive multiple of ",
              kW4a16Group);
  s.G = s.K / kW4a16Group;
  s.M = x.numel() / s.K;
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8 (two 4-bit codes per byte), got ",
              dtype_name(codes.scalar_type()));
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == s.K / 2, op, ": codes must have shape [N, K/2] = [N, ", s.K / 2,
              "] to match x.size(-1) (K=", s.K, "), got ", codes.sizes());
  s.N = codes.size(0);
  TORCH_CHECK(s.N >= 1, op, ": codes must have at least one output row (N >= 1), got N=0");
  check_device(codes, x, op, "codes", "x");
  TORCH_CHECK(is_float16_32(scales.scalar_type()), op, ": scales must be bfloat16, float16 or float32, got ",
              dtype_name(scales.scalar_type()));
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == s.N && scales.size(1) == s.G, op,
              ": scales must have shape [N, K/", kW4a16Group, "] = [", s.N, ", ", s.G, "], got ", scales.sizes());
  check_device(scales, x, op, "scales", "x");
  TORCH_CHECK(zeros.scalar_type() == scales.scalar_type(), op, ": zeros must have scales' dtype ",
              dtype_name(scales.scalar_type()), ", got ", dtype_name(zeros.scalar_type()));
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == s.N && zeros.size(1) == s.G, op,
              ": zeros must have shape [N, K/", kW4a16Group, "] = [", s.N, ", ", s.G, "], got ", zeros.sizes());
  check_device(zeros, x, op, "zeros", "x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, op, ": bias must have shape [N] = [", s.N, "], got ",
                bias->sizes());
    TORCH_CHECK(is_float16_32(bias->scalar_type()), op, ": bias must be bfloat16, float16 or float32, got ",
                dtype_name(bias->scalar_type()));
    check_device(*bias, x, op, "bias", "x");
  }
  return s;
}

std::vector<GemmShape> check_gemm_cat(const at::Tensor& act_codes, const at::Tensor& act_scales, at::TensorList codes,
                                      at::TensorList scales, const c10::List<std::optional<at::Tensor>>& global_scale,
                                      const at::Tensor& down_act, at::TensorList proj_up,
                                      const c10::List<std::optional<at::Tensor>>& bias, std::string_view precision,
                                      at::ScalarType out_dtype, bool act_unsigned) {
  constexpr const char* op = "svdquant::gemm_cat";
  const size_t n = codes.size();
  TORCH_CHECK(n >= 1, op, ": codes must hold at least one weight, got an empty list");
  TORCH_CHECK(scales.size() == n && global_scale.size() == n && proj_up.size() == n && bias.size() == n, op,
              ": codes, scales, global_scale, proj_up and bias must have one entry per weight, got ", n, ", ",
              scales.size(), ", ", global_scale.size(), ", ", proj_up.size(), " and ", bias.size());
  std::vector<GemmShape> shapes;
  shapes.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string where = std::string(op) + " (weight " + std::to_string(i) + ")";
    shapes.push_back(check_gemm(act_codes, act_scales, codes[i], scales[i], global_scale.get(i), down_act,
                                proj_up[i], bias.get(i), precision, out_dtype, act_unsigned, where.c_str()));
  }
  return shapes;
}

std::vector<std::string> check_parallel_linears(at::TensorList x, at::TensorList smooth, at::TensorList proj_down,
                                                at::TensorList codes, at::TensorList scales,
                                                const c10::List<std::optional<at::Tensor>>& global_scale,
                                                at::TensorList proj_up,
                                                const c10::List<std::optional<at::Tensor>>& bias,
                                                std::string_view precision, bool act_unsigned) {
  constexpr const char* op = "svdquant::parallel_linears";
  const size_t n = x.size();
  TORCH_CHECK(n >= 1, op, ": x must hold at least one input, got an empty list");
  TORCH_CHECK(smooth.size() == n && proj_down.size() == n && codes.size() == n && scales.size() == n &&
                  global_scale.size() == n && proj_up.size() == n && bias.size() == n,
              op, ": x, smooth, proj_down, codes, scales, global_scale, proj_up and bias must have one entry per "
              "linear, got ", n, ", ", smooth.size(), ", ", proj_down.size(), ", ", codes.size(), ", ", scales.size(),
              ", ", global_scale.size(), ", ", proj_up.size(), " and ", bias.size());
  std::vector<std::string> names;
  names.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    names.push_back(std::string(op) + " (linear " + std::to_string(i) + ")");
    TORCH_CHECK(x[i].device() == x[0].device(), names.back(), ": x must be on the same device as linear 0's x (",
                x[0].device(), "), got ", x[i].device());
    check_quantize_act(x[i], smooth[i], proj_down[i], precision, act_unsigned, names.back().c_str());
  }
  return names;
}

std::vector<W4a16Shape> check_w4a16_linear_group(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                                 at::TensorList zeros,
                                                 const c10::List<std::optional<at::Tensor>>& bias) {
  constexpr const char* op = "svdquant::w4a16_linear_group";
  const size_t n = codes.size();
  TORCH_CHECK(n >= 1, op, ": codes must hold at least one weight, got an empty list");
  TORCH_CHECK(scales.size() == n && zeros.size() == n && bias.size() == n, op,
              ": codes, scales, zeros and bias must have one entry per weight, got ", n, ", ", scales.size(), ", ",
              zeros.size(), " and ", bias.size());
  std::vector<W4a16Shape> shapes;
  shapes.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string where = std::string(op) + " (weight " + std::to_string(i) + ")";
    shapes.push_back(check_w4a16_linear(x, codes[i], scales[i], zeros[i], bias.get(i), where.c_str()));
  }
  return shapes;
}

void check_finite(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t.to(at::kFloat)).all().item<bool>(), op, ": ", name,
              " must be finite, found NaN or Inf");
}

void check_not_negative(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(!(t < 0).any().item<bool>(), op, ": ", name, " must be >= 0 (or NaN), found ",
              t.masked_select(t < 0).min().item<float>());
}

void check_w4a8_multipliers(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  const int lo = t.min().item<uint8_t>();
  const int hi = t.max().item<uint8_t>();
  TORCH_CHECK(lo >= 1 && hi <= kW4a8MultMax, op, ": ", name, " (W4A8 multipliers) must be in [1, ", kW4a8MultMax,
              "], found ", lo < 1 ? lo : hi);
}

void check_finite_positive(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  auto f = t.to(at::kFloat);
  TORCH_CHECK(at::isfinite(f).all().item<bool>(), op, ": ", name, " must be finite, found NaN or Inf");
  TORCH_CHECK((f > 0).all().item<bool>(), op, ": ", name, " must be > 0 everywhere, found a value <= 0");
}

}  // namespace svdquant
