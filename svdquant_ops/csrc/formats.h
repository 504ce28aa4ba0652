// Scalar rules of the two 4-bit formats, shared by the CPU reference kernels and the CUDA kernels so that
// both produce bit-identical codes and scales. Mirrors svdquant_ops/formats.py (the tests check they agree).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SVDQ_HD __host__ __device__ __forceinline__
#else
#define SVDQ_HD inline
#endif

namespace svdquant {

constexpr int kInt4Group = 64;
constexpr int kNvfp4Group = 16;
constexpr float kInt4Qmax = 7.f;
constexpr float kUint4Qmax = 15.f;
constexpr float kInt8Qmax = 127.f;    // W4A8 activations
constexpr int kW4a8MultMax = 18;       // W4A8 weight multipliers in [1, 18]: 7 * 18 = 126 fits int8
constexpr float kActShift = 0.171875f;  // >= -min(GELU); exact in bf16/fp16/fp32
constexpr float kNvfp4Qmax = 6.f;
constexpr float kFp8E4m3Max = 448.f;

// kW4a8: INT4 weight codes with two-level scales (fp32 per channel x integer multiplier per 64-group), INT8
// per-token activations (svdquant_ops/formats.py has the full rule).
enum class Precision { kInt4, kNvfp4, kW4a8 };

// Weight group size (W4A8 activations have one scale per token).
SVDQ_HD int group_size(Precision p) { return p == Precision::kNvfp4 ? kNvfp4Group : kInt4Group; }

// max that keeps a NaN once one has been seen (fmaxf would drop it and hide bad input).
SVDQ_HD float nan_max(float acc, float v) { return (v > acc || v != v) ? v : acc; }
// min(v, hi) for finite v; NaN and +Inf pass through, so an input holding NaN or Inf yields a non-finite scale
// and a non-finite output row instead of a finite, wrong one.
SVDQ_HD float nan_propagating_min(float v, float hi) { return (v != v || v > 3.4028234663852886e38f) ? v : (v < hi ? v : hi); }

template <typename T>
struct FiniteMax;
template <>
struct FiniteMax<float> {
  static constexpr float value = 3.4028234663852886e38f;
};
template <>
struct FiniteMax<c10::Half> {
  static constexpr float value = 65504.f;
};
template <>
struct FiniteMax<c10::BFloat16> {
  static constexpr float value = 3.3895313892515355e38f;
};

// INT4 group scale: amax / qmax, saturated to the largest finite value of the scale dtype T, rounded to T
// (round to nearest even), returned as float. A NaN amax gives a NaN scale so bad input stays visible.
template <typename T>
SVDQ_HD float int4_scale(float amax, float qmax) {
  float s = nan_propagating_min(amax / qmax, FiniteMax<T>::value);
  return static_cast<float>(static_cast<T>(s));
}

// NVFP4 group scale: amax / 6 saturated to 448, rounded to fp8 e4m3 (round to nearest even).
SVDQ_HD c10::Float8_e4m3fn nvfp4_scale(float amax) {
  const float s = nan_propagating_min(amax / kNvfp4Qmax, kFp8E4m3Max);
  // e4m3fn has no Inf and the conversion saturates it to 448: map NaN/Inf to the NaN pattern explicitly.
  return s <= kFp8E4m3Max ? c10::Float8_e4m3fn(s) : c10::Float8_e4m3fn(0x7F, c10::Float8_e4m3fn::from_bits());
}

// Codes of q = value / scale. Round half to even, clamp to the code range, NaN -> 0.
SVDQ_HD int int4_code(float q) {
  if (q != q) return 0;
  float r = rintf(q);
  r = r < -kInt4Qmax ? -kInt4Qmax : (r > kInt4Qmax ? kInt4Qmax : r);
  return static_cast<int>(r);
}

// W4A8 activation code of q = value / scale: round half to even, clamp to [-127, 127], NaN -> 0.
SVDQ_HD int int8_code(float q) {
  if (q != q) return 0;
  float r = rintf(q);
  r = r < -kInt8Qmax ? -kInt8Qmax : (r > kInt8Qmax ? kInt8Qmax : r);
  return static_cast<int>(r);
}

SVDQ_HD int uint4_code(float q) {
  if (q != q) return 0;
  float r = rintf(q);
  r = r < 0.f ? 0.f : (r > kUint4Qmax ? kUint4Qmax : r);
  return static_cast<int>(r);
}

// e2m1 bit pattern (sign in bit 3) nearest to q; ties to the even mantissa; saturates at +-6; NaN -> 0.
SVDQ_HD int e2m1_code(float q) {
  if (q != q) return 0;
  float a = fabsf(q);
  int m = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
#if defined(__CUDA_ARCH__)
  const bool negative = signbit(q);
#else
  const bool negative = std::signbit(q);
#endif
  return (negative ? 8 : 0) | m;
}

// Twice the e2m1 value of a code: an integer in [-12, 12], so group dot products are exact in int32.
SVDQ_HD int e2m1_doubled(int code) {
  constexpr int kMag2[8] = {0, 1, 2, 3, 4, 6, 8, 12};
  int v = kMag2[code & 7];
  return (code & 8) ? -v : v;
}

SVDQ_HD int sign_extend_nibble(int nib) { return nib >= 8 ? nib - 16 : nib; }

// W4A8's channel order inside the int8 intermediates (quantize_act's activation codes, expand_w4a8_weight's weights):
// within each 32-channel slice, the even channels first, then the odd ones: channel k sits at
//   (k & ~31) | (k & 1) << 4 | ((k >> 1) & 15).
// Read against the packed 4-bit weight (layout 1: byte b of a slice holds channels 2b and 2b + 1), position b of a
// slice is the low nibble of its byte b and position 16 + b the high nibble. That is the order in which wgmma's
// 8-bit register-A fragment takes a k32 step (thread t of a quad: positions 4t..4t+3 and 16+4t..16+4t+3), so a
// GEMM can feed one 32-bit word of packed codes to the tensor cores with a few integer instructions and no
// shuffle. A dot product does not depend on the order its terms are listed in, as long as both operands use the same.
SVDQ_HD int64_t w4a8_pos(int64_t k) { return (k & ~int64_t(31)) | ((k & 1) << 4) | ((k >> 1) & 15); }

}  // namespace svdquant
