// Dtype-tagged loads and stores shared by the GEMM kernels (internal header of ../gemm.cu). The kernels take their
// scale, projection, bias and output tensors as untyped pointers plus a ScalarKind, so that one kernel serves every
// dtype combination the op accepts.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace svdquant {
namespace cuda_impl {
namespace gemm {

enum ScalarKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kE4M3 = 3, kU8 = 4 };

inline int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat8_e4m3fn: return kE4M3;
    case at::kByte: return kU8;  // W4A8 weight multipliers
    default: TORCH_CHECK(false, "svdquant::gemm: unexpected dtype ", t);
  }
}

__device__ __forceinline__ float load_f(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kU8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::Float8_e4m3fn*>(p)[i]);
  }
}

__device__ __forceinline__ void store_out(void* out, int kind, int64_t i, float v) {
  switch (kind) {
    case kF32: static_cast<float*>(out)[i] = v; break;
    case kF16: static_cast<c10::Half*>(out)[i] = static_cast<c10::Half>(v); break;
    default: static_cast<c10::BFloat16*>(out)[i] = static_cast<c10::BFloat16>(v); break;
  }
}

// Two adjacent outputs (col, col + 1) of one row; `vec` when both exist and the pair is aligned.
__device__ __forceinline__ void store_out2(void* out, int kind, int64_t i, float v0, float v1, bool vec,
                                           bool second) {
  if (vec) {
    switch (kind) {
      case kF32: *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0, v1); break;
      case kF16: {
        const c10::Half h0 = static_cast<c10::Half>(v0), h1 = static_cast<c10::Half>(v1);
        *reinterpret_cast<uint32_t*>(static_cast<c10::Half*>(out) + i) = uint32_t(h0.x) | (uint32_t(h1.x) << 16);
        break;
      }
      default: {
        const c10::BFloat16 h0 = static_cast<c10::BFloat16>(v0), h1 = static_cast<c10::BFloat16>(v1);
        *reinterpret_cast<uint32_t*>(static_cast<c10::BFloat16*>(out) + i) =
            uint32_t(h0.x) | (uint32_t(h1.x) << 16);
        break;
      }
    }
  } else {
    store_out(out, kind, i, v0);
    if (second) store_out(out, kind, i + 1, v1);
  }
}

}  // namespace gemm
}  // namespace cuda_impl
}  // namespace svdquant
