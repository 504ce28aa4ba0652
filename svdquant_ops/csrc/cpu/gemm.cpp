// CPU reference of svdquant::gemm: the executable specification the GPU kernels are tested against.
//   acc[m, n]  = sum_g float(dot_g(m, n)) * (act_scale[m, g] * scale[n, g])         (fp32, g ascending)
//                dot_g is the exact integer dot product of one group's codes (int32; NVFP4 uses twice the
//                e2m1 values, which are integers in [-12, 12], and multiplies by 0.25, also exact)
//   acc       *= global_scale[n]                                                     (NVFP4 only)
//   y[m, n]    = out_dtype(acc + sum_r down_act[m, r] * proj_up[n, r] + bias[n])
// W4A8 has no per-group rescaling: one exact int32 dot product over all of K of the int8 activation codes with
// the int8 weights code * multiplier (|.| <= 126), then one scale per token and one per output channel:
//   acc[m, n]  = float(dot(m, n)) * (act_scale[m] * global_scale[n])                (fp32)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../formats.h"

namespace svdquant {
namespace {

// Packed nibbles -> int8 integers: INT4 values, uint4 values, or twice the e2m1 values.
std::vector<int8_t> decode_codes(const at::Tensor& packed, int64_t rows, int64_t K, Precision precision,
                                 bool is_unsigned) {
  std::vector<int8_t> out(static_cast<size_t>(rows * K));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < K / 2; ++j) {
        const uint8_t byte = p[r * (K / 2) + j];
        const int nib[2] = {byte & 0xF, byte >> 4};
        for (int h = 0; h < 2; ++h) {
          int v;
          if (precision == Precision::kNvfp4) {
            v = e2m1_doubled(nib[h]);
          } else {
            v = is_unsigned ? nib[h] : sign_extend_nibble(nib[h]);
          }
          out[r * K + 2 * j + h] = static_cast<int8_t>(v);
        }
      }
    }
  });
  return out;
}

// y[m, n] = out_dtype(acc(m, n) + sum_r down_act[m, r] * proj_up[n, r] + bias[n]) for every precision; `acc` is
// the precision's fp32 4-bit (or W4A8) product. One task = one row of tokens times a block of output channels, so
// M = 1 still uses every core.
template <typename AccFn>
at::Tensor add_branch_and_store(const GemmShape& s, const at::Tensor& act_codes, const at::Tensor& down_act,
                                const at::Tensor& proj_up, const std::optional<at::Tensor>& bias,
                                at::ScalarType out_dtype, const AccFn& acc_of) {
  const int64_t M = s.M, N = s.N, R = s.R;
  const auto da = down_act.contiguous();
  const auto up = proj_up.to(at::kFloat).contiguous();
  const auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* da_p = da.data_ptr<float>();
  const float* up_p = up.data_ptr<float>();
  const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, act_codes.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  constexpr int64_t kBlockN = 64;
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, M * n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / n_blocks;
      const int64_t n_end = std::min(N, (t % n_blocks + 1) * kBlockN);
      for (int64_t n = (t % n_blocks) * kBlockN; n < n_end; ++n) {
        const float acc = acc_of(m, n);
        float branch = 0.f;
        for (int64_t r = 0; r < R; ++r) branch += da_p[m * R + r] * up_p[n * R + r];
        y[m * N + n] = acc + branch + (b_p != nullptr ? b_p[n] : 0.f);
      }
    }
  });
  return out.to(out_dtype).reshape(with_last_dim(act_codes, N));
}

// W4A8 weights as the exact int8 integers code * multiplier [N, K] (what the Hopper kernel multiplies), in the
// channel order of W4A8's activation codes (formats.h w4a8_pos), so the dot product below pairs equal channels.
at::Tensor expand_w4a8(const at::Tensor& codes, const at::Tensor& scales) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = K / kInt4Group;
  const auto wq = decode_codes(codes.contiguous(), N, K, Precision::kW4a8, /*is_unsigned=*/false);
  const auto mult = scales.contiguous();
  const uint8_t* mp = mult.data_ptr<uint8_t>();
  auto out = at::empty({N, K}, codes.options().dtype(at::kChar));
  int8_t* wm = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        wm[n * K + w4a8_pos(k)] = static_cast<int8_t>(int(wq[n * K + k]) * int(mp[n * G + k / kInt4Group]));
      }
    }
  });
  return out;
}

// The W4A8 product with the expanded weight `wm` [N, K] (see the header comment).
at::Tensor w4a8_product(const GemmShape& s, const at::Tensor& act_codes, const at::Tensor& act_scales,
                        const int8_t* wm, const at::Tensor& global_scale, const at::Tensor& down_act,
                        const at::Tensor& proj_up, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t K = s.K;
  const auto sa = act_scales.to(at::kFloat).contiguous();
  const float* sa_p = sa.data_ptr<float>();
  const auto ac = act_codes.contiguous();
  const int8_t* aq = ac.data_ptr<int8_t>();
  const auto gsc = global_scale.contiguous();
  const float* g_p = gsc.data_ptr<float>();
  return add_branch_and_store(s, act_codes, down_act, proj_up, bias, out_dtype, [&](int64_t m, int64_t n) {
    const int8_t* a_row = aq + m * K;
    const int8_t* w_row = wm + n * K;
    int32_t dot = 0;  // exact: K <= kW4a8MaxK (checked), |a * w| <= 127 * 126
    for (int64_t k = 0; k < K; ++k) dot += int32_t(a_row[k]) * int32_t(w_row[k]);
    return static_cast<float>(dot) * (sa_p[m] * g_p[n]);
  });
}

at::Tensor gemm_cpu(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes,
                    const at::Tensor& scales, const std::optional<at::Tensor>& global_scale, const at::Tensor& down_act,
                    const at::Tensor& proj_up, const std::optional<at::Tensor>& bias, c10::string_view precision,
                    at::ScalarType out_dtype, bool act_unsigned) {
  constexpr const char* op = "svdquant::gemm";
  const auto s = check_gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
                            out_dtype, act_unsigned);
  const int64_t K = s.K, G = s.G;

  if (s.precision == Precision::kW4a8) {  // see the header comment
    check_w4a8_multipliers(scales, op, "scales");
    check_finite(*global_scale, op, "global_scale");
    const auto wm = expand_w4a8(codes, scales);
    return w4a8_product(s, act_codes, act_scales, wm.data_ptr<int8_t>(), *global_scale, down_act, proj_up, bias,
                        out_dtype);
  }

  check_finite(scales, op, "scales");
  if (global_scale.has_value()) check_finite(*global_scale, op, "global_scale");
  const auto sa = act_scales.to(at::kFloat).contiguous();
  const float* sa_p = sa.data_ptr<float>();
  const auto wq = decode_codes(codes.contiguous(), s.N, K, s.precision, /*is_unsigned=*/false);
  const int gs = group_size(s.precision);
  const bool nvfp4 = s.precision == Precision::kNvfp4;
  const auto aq = decode_codes(act_codes.contiguous(), s.M, K, s.precision, act_unsigned);
  const auto sw = scales.to(at::kFloat).contiguous();
  const auto gsc = global_scale.has_value() ? global_scale->to(at::kFloat).contiguous() : at::Tensor();
  const float* sw_p = sw.data_ptr<float>();
  const float* g_p = gsc.defined() ? gsc.data_ptr<float>() : nullptr;
  const float dot_unit = nvfp4 ? 0.25f : 1.f;  // NVFP4 dots are of doubled values
  return add_branch_and_store(s, act_codes, down_act, proj_up, bias, out_dtype, [&](int64_t m, int64_t n) {
    const int8_t* a_row = aq.data() + m * K;
    const int8_t* w_row = wq.data() + n * K;
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t dot = 0;
      for (int i = 0; i < gs; ++i) dot += int32_t(a_row[g * gs + i]) * int32_t(w_row[g * gs + i]);
      acc += static_cast<float>(dot) * dot_unit * (sa_p[m * G + g] * sw_p[n * G + g]);
    }
    if (g_p != nullptr) acc *= g_p[s.per_channel_global_scale ? n : 0];
    return acc;
  });
}

// One gemm per weight, side by side: the specification of gemm_cat.
at::Tensor gemm_cat_cpu(const at::Tensor& act_codes, const at::Tensor& act_scales, at::TensorList codes,
                        at::TensorList scales, const c10::List<std::optional<at::Tensor>>& global_scale,
                        const at::Tensor& down_act, at::TensorList proj_up,
                        const c10::List<std::optional<at::Tensor>>& bias, c10::string_view precision,
                        at::ScalarType out_dtype, bool act_unsigned) {
  check_gemm_cat(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision, out_dtype,
                 act_unsigned);
  std::vector<at::Tensor> outs;
  outs.reserve(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) {
    outs.push_back(gemm_cpu(act_codes, act_scales, codes[i], scales[i], global_scale.get(i), down_act, proj_up[i],
                            bias.get(i), precision, out_dtype, act_unsigned));
  }
  return at::cat(outs, -1);
}

at::Tensor expand_w4a8_weight_cpu(const at::Tensor& codes, const at::Tensor& scales) {
  constexpr const char* op = "svdquant::expand_w4a8_weight";
  check_expand_w4a8(codes, scales, op);
  check_w4a8_multipliers(scales, op, "scales");
  return expand_w4a8(codes, scales);
}

std::tuple<at::Tensor, at::Tensor> gemm_expanded_cpu(
    const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& codes, const at::Tensor& scales,
    const at::Tensor& global_scale, const at::Tensor& down_act, const at::Tensor& proj_up,
    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, const at::Tensor& weight,
    const std::optional<at::Tensor>& next_codes, const std::optional<at::Tensor>& next_scales) {
  constexpr const char* op = "svdquant::gemm_expanded";
  const auto s = check_gemm_expanded(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias,
                                     out_dtype, weight, next_codes, next_scales);
  check_w4a8_multipliers(scales, op, "scales");
  check_finite(global_scale, op, "global_scale");
  const auto w = weight.contiguous();
  TORCH_CHECK(at::equal(w, expand_w4a8(codes, scales)), op,
              ": weight must equal expand_w4a8_weight(codes, scales) (the expansion of this layer's codes), but it "
              "differs");
  at::Tensor next = at::empty({0, 0}, weight.options());
  if (next_codes.has_value()) {
    check_w4a8_multipliers(*next_scales, op, "next_scales");
    next = expand_w4a8(*next_codes, *next_scales);
  }
  return {w4a8_product(s, act_codes, act_scales, w.data_ptr<int8_t>(), global_scale, down_act, proj_up, bias,
                       out_dtype),
          next};
}

}  // namespace
}  // namespace svdquant

TORCH_LIBRARY_IMPL(svdquant, CPU, m) {
  m.impl("gemm", &svdquant::gemm_cpu);
  m.impl("gemm_cat", &svdquant::gemm_cat_cpu);
  m.impl("expand_w4a8_weight", &svdquant::expand_w4a8_weight_cpu);
  m.impl("gemm_expanded", &svdquant::gemm_expanded_cpu);
}
