// Registers the CUDA kernels of the svdquant ops (schemas in ../ops.cpp).
#include <torch/library.h>

#include "ops_cuda.h"

TORCH_LIBRARY_IMPL(svdquant, CUDA, m) {
  m.impl("quantize_act", &svdquant::cuda_impl::quantize_act_cuda);
  m.impl("quantize_act_given_amax", &svdquant::cuda_impl::quantize_act_given_amax_cuda);
  m.impl("gemm", &svdquant::cuda_impl::gemm_cuda);
  m.impl("gemm_cat", &svdquant::cuda_impl::gemm_cat_cuda);
  m.impl("expand_w4a8_weight", &svdquant::cuda_impl::expand_w4a8_weight_cuda);
  m.impl("gemm_expanded", &svdquant::cuda_impl::gemm_expanded_cuda);
  m.impl("w4a16_linear", &svdquant::cuda_impl::w4a16_linear_cuda);
  m.impl("w4a16_linear_group", &svdquant::cuda_impl::w4a16_linear_group_cuda);
  m.impl("parallel_linears", &svdquant::cuda_impl::parallel_linears_cuda);
}
