// CPU reference of svdquant::w4a16_linear (weight-only 4-bit, formats.py "w4a16"): the executable specification
// the CUDA kernels are tested against.
//   w[n, k]  = float(code[n, k]) * float(scale[n, k / 64]) + float(zero[n, k / 64])       (fp32)
//   y[m, n]  = x_dtype(sum_k float(x[m, k]) * w[n, k] + float(bias[n]))                   (fp32, k ascending)
// code[n, k] is the unsigned nibble of logical element k (layout.py: element 2j in the low nibble of byte j).
// No value checks: every nibble is a valid code, and NaN / Inf in scales, zeros or x propagate to the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace svdquant {
namespace {

at::Tensor w4a16_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& zeros, const std::optional<at::Tensor>& bias) {
  const auto s = check_w4a16_linear(x, codes, scales, zeros, bias);
  const int64_t M = s.M, N = s.N, K = s.K, G = s.G;
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M > 0) {
    const auto xf = x.reshape({M, K}).to(at::kFloat).contiguous();
    const auto c = codes.contiguous();
    const auto sc = scales.to(at::kFloat).contiguous();
    const auto zc = zeros.to(at::kFloat).contiguous();
    const auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* x_p = xf.data_ptr<float>();
    const uint8_t* c_p = c.data_ptr<uint8_t>();
    const float* s_p = sc.data_ptr<float>();
    const float* z_p = zc.data_ptr<float>();
    const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;
    float* y = out.data_ptr<float>();
    // One task = a block of output channels times a block of tokens: M = 1 still uses every core, and each task
    // dequantizes its rows once for all of its tokens.
    constexpr int64_t kBlockN = 16, kBlockM = 64;
    const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
    const int64_t m_blocks = (M + kBlockM - 1) / kBlockM;
    at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> w(static_cast<size_t>(kBlockN * K));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n_begin = (task / m_blocks) * kBlockN, n_end = std::min(N, n_begin + kBlockN);
        const int64_t m_begin = (task % m_blocks) * kBlockM, m_end = std::min(M, m_begin + kBlockM);
        for (int64_t n = n_begin; n < n_end; ++n) {
          float* w_row = w.data() + (n - n_begin) * K;
          for (int64_t k = 0; k < K; ++k) {
            const uint8_t byte = c_p[n * (K / 2) + k / 2];
            const int code = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);
            const int64_t g = n * G + k / kW4a16Group;
            w_row[k] = static_cast<float>(code) * s_p[g] + z_p[g];
          }
        }
        for (int64_t m = m_begin; m < m_end; ++m) {
          const float* x_row = x_p + m * K;
          for (int64_t n = n_begin; n < n_end; ++n) {
            const float* w_row = w.data() + (n - n_begin) * K;
            float acc = 0.f;
            for (int64_t k = 0; k < K; ++k) acc += x_row[k] * w_row[k];
            y[m * N + n] = acc + (b_p != nullptr ? b_p[n] : 0.f);
          }
        }
      }
    });
  }
  return out.to(x.scalar_type()).reshape(with_last_dim(x, N));
}

// One w4a16_linear per weight: the grouped op's specification.
std::vector<at::Tensor> w4a16_linear_group_cpu(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                               at::TensorList zeros,
                                               const c10::List<std::optional<at::Tensor>>& bias) {
  check_w4a16_linear_group(x, codes, scales, zeros, bias);
  std::vector<at::Tensor> out;
  out.reserve(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) out.push_back(w4a16_linear_cpu(x, codes[i], scales[i], zeros[i], bias.get(i)));
  return out;
}

}  // namespace
}  // namespace svdquant

TORCH_LIBRARY_IMPL(svdquant, CPU, m) {
  m.impl("w4a16_linear", &svdquant::w4a16_linear_cpu);
  m.impl("w4a16_linear_group", &svdquant::w4a16_linear_group_cpu);
}
