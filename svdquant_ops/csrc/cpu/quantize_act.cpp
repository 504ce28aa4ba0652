// CPU reference of svdquant::quantize_act: the executable specification the GPU kernels are tested against.
//   x_hat = x / smooth                      (signed formats)
//   x_hat = (x + 0.171875) / smooth         (act_unsigned: inputs produced by a GELU)
// per (token, group): scale = amax / qmax rounded to the scale dtype, code = round_half_even(x_hat / scale)
// clamped to the code range (0 when scale == 0); down_act = x @ proj_down in fp32 on the *raw* x.
// W4A8: one scale per token (row) instead of per group: scale = amax(|x_hat| over the row) / 127 rounded to x's
// dtype, code = int8_code(x_hat / scale) (0 when scale == 0), one int8 per code (not packed) in W4A8's channel
// order (formats.h w4a8_pos: per 32-channel slice the even channels, then the odd ones), scales [..., 1].
// quantize_act_given_amax: the same with each row's amax given instead of computed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "../formats.h"

namespace svdquant {
namespace {

template <typename scalar_t>
void quantize_rows(const scalar_t* x, const scalar_t* smooth, uint8_t* codes, void* scales_out, int64_t M,
                   int64_t K, Precision precision, bool act_unsigned) {
  const int gs = group_size(precision);
  const int64_t G = K / gs;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    float xh[kInt4Group];
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs;
        float amax = 0.f;
        for (int i = 0; i < gs; ++i) {
          const float xv = static_cast<float>(x[m * K + k0 + i]);
          const float lv = static_cast<float>(smooth[k0 + i]);
          xh[i] = act_unsigned ? (xv + kActShift) / lv : xv / lv;
          amax = nan_max(amax, act_unsigned ? xh[i] : fabsf(xh[i]));
        }
        int q[kInt4Group];
        if (precision == Precision::kInt4) {
          const float qmax = act_unsigned ? kUint4Qmax : kInt4Qmax;
          const float s = int4_scale<scalar_t>(amax, qmax);
          static_cast<scalar_t*>(scales_out)[m * G + g] = static_cast<scalar_t>(s);
          for (int i = 0; i < gs; ++i) {
            q[i] = s == 0.f ? 0 : (act_unsigned ? uint4_code(xh[i] / s) : int4_code(xh[i] / s));
          }
        } else {
          const c10::Float8_e4m3fn s8 = nvfp4_scale(amax);
          static_cast<c10::Float8_e4m3fn*>(scales_out)[m * G + g] = s8;
          const float s = static_cast<float>(s8);
          for (int i = 0; i < gs; ++i) q[i] = s == 0.f ? 0 : e2m1_code(xh[i] / s);
        }
        uint8_t* out = codes + m * (K / 2) + k0 / 2;
        for (int i = 0; i < gs; i += 2) out[i / 2] = static_cast<uint8_t>((q[i] & 0xF) | ((q[i + 1] & 0xF) << 4));
      }
    }
  });
}

template <typename scalar_t>
void quantize_rows_w4a8(const scalar_t* x, const scalar_t* smooth, const float* given_amax, int8_t* codes,
                        scalar_t* scales, int64_t M, int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xh(static_cast<size_t>(K));
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k = 0; k < K; ++k) xh[k] = static_cast<float>(x[m * K + k]) / static_cast<float>(smooth[k]);
      float amax = 0.f;
      if (given_amax != nullptr) {
        amax = given_amax[m];
      } else {
        for (int64_t k = 0; k < K; ++k) amax = nan_max(amax, fabsf(xh[k]));
      }
      const float s = int4_scale<scalar_t>(amax, kInt8Qmax);
      scales[m] = static_cast<scalar_t>(s);
      for (int64_t k = 0; k < K; ++k)  // stored in W4A8's channel order (formats.h w4a8_pos)
        codes[m * K + w4a8_pos(k)] = static_cast<int8_t>(s == 0.f ? 0 : int8_code(xh[k] / s));
    }
  });
}

// fp32 products of the raw input with the down projection (exact products of 16-bit values, fp32 sums).
at::Tensor down_act_of(const at::Tensor& xc, const at::Tensor& proj_down, const QuantizeActShape& s) {
  return at::matmul(xc.reshape({s.M, s.K}).to(at::kFloat), proj_down.to(at::kFloat)).reshape(with_last_dim(xc, s.R));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cpu(const at::Tensor& x, const at::Tensor& smooth,
                                                                const at::Tensor& proj_down,
                                                                c10::string_view precision, bool act_unsigned) {
  const auto s = check_quantize_act(x, smooth, proj_down, precision, act_unsigned);
  check_finite_positive(smooth, "svdquant::quantize_act", "smooth");
  auto xc = x.contiguous();
  auto sc = smooth.contiguous();
  const bool w4a8 = s.precision == Precision::kW4a8;
  auto act_codes = w4a8 ? at::empty(with_last_dim(x, s.K), x.options().dtype(at::kChar))
                        : at::empty(with_last_dim(x, s.K / 2), x.options().dtype(at::kByte));
  const auto scale_dtype = s.precision == Precision::kNvfp4 ? at::kFloat8_e4m3fn : x.scalar_type();
  auto act_scales = at::empty(with_last_dim(x, s.G), x.options().dtype(scale_dtype));
  SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_cpu", [&] {
    if (w4a8) {
      quantize_rows_w4a8<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), nullptr,
                                   act_codes.data_ptr<int8_t>(), act_scales.data_ptr<scalar_t>(), s.M, s.K);
    } else {
      quantize_rows<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), act_codes.data_ptr<uint8_t>(),
                              act_scales.data_ptr(), s.M, s.K, s.precision, act_unsigned);
    }
  });
  return {act_codes, act_scales, down_act_of(xc, proj_down, s)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_given_amax_cpu(const at::Tensor& x,
                                                                           const at::Tensor& smooth,
                                                                           const at::Tensor& proj_down,
                                                                           const at::Tensor& amax) {
  constexpr const char* op = "svdquant::quantize_act_given_amax";
  const auto s = check_quantize_act_given_amax(x, smooth, proj_down, amax);
  check_finite_positive(smooth, op, "smooth");
  check_not_negative(amax, op, "amax");
  auto xc = x.contiguous();
  auto sc = smooth.contiguous();
  auto ac = amax.contiguous();
  auto act_codes = at::empty(with_last_dim(x, s.K), x.options().dtype(at::kChar));
  auto act_scales = at::empty(with_last_dim(x, 1), x.options());
  SVDQ_DISPATCH_FLOAT16_32(x.scalar_type(), "quantize_act_given_amax_cpu", [&] {
    quantize_rows_w4a8<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), ac.data_ptr<float>(),
                                 act_codes.data_ptr<int8_t>(), act_scales.data_ptr<scalar_t>(), s.M, s.K);
  });
  return {act_codes, act_scales, down_act_of(xc, proj_down, s)};
}

}  // namespace
}  // namespace svdquant

TORCH_LIBRARY_IMPL(svdquant, CPU, m) {
  m.impl("quantize_act", &svdquant::quantize_act_cpu);
  m.impl("quantize_act_given_amax", &svdquant::quantize_act_given_amax_cpu);
}
