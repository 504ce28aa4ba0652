"""The number formats of the 4-bit weights and their activations, and their constants.

This module is the single source of truth for format constants on the Python side; the C++ kernels
(`csrc/formats.h`) mirror them and the tests check that both agree.

INT4 (``"int4"``)
    Groups of 64 input channels. Weights: signed codes in [-7, 7], one scale per (output row, group) in the
    model dtype, scale = absmax / 7. Activations: dynamic, one scale per (token, group) in the input dtype,
    same rule. The *unsigned* variant (for inputs produced by a GELU) adds ``ACT_SHIFT`` before smoothing and
    uses codes in [0, 15] with scale = max / 15.

NVFP4 (``"nvfp4"``)
    Groups of 16 input channels. Codes are e2m1 bit patterns (sign bit 3, value ``E2M1_VALUES[code]``).
    Scales are fp8 e4m3 (``torch.float8_e4m3fn``), scale = absmax / 6 saturated to 448. Weights carry one more
    fp32 scale, per tensor or per output channel; activations have none.

W4A8 (``"w4a8"``, a Hopper format: no per-group rescaling inside the GEMM)
    Weights: the INT4 codes in [-7, 7] (same packing, groups of 64 input channels) with *two-level* scales: one
    fp32 scale per output channel ``s[n]`` (passed as the global scale) times one integer multiplier per (row, group)
    ``m[n, g]`` in [1, ``W4A8_MULT_MAX``] (uint8, passed as the weight scales). Weight value = code * m * s, and
    code * m is an exact int8 (7 * 18 = 126), so one int8 GEMM runs over all of K. Rule:
    ``s = rowmax(|W|) / (7 * 18)``, ``m = clamp(ceil(groupmax(|W|) / (7 * s)), 1, 18)``, codes round(W / (m * s)).
    Activations: dynamic INT8, one scale per token in the input dtype, scale = amax over the whole row / 127
    (same saturation and rounding rule as INT4), codes int8 in [-127, 127], one byte per code (not packed), and
    the scales have shape [..., 1]. No unsigned variant (8 bits leave room for GELU's negative tail). The int8
    activation codes (and ``expand_w4a8_weight``'s int8 weights) list the channels of each 32-channel slice in W4A8's
    order, even channels first (``layout.w4a8_channel_order``): the order in which the Hopper GEMM feeds the packed
    weight codes to the tensor cores without a prep pass.

W4A16 (``"w4a16"``, weight-only: for linears that see one token per sample, such as AdaLN modulation)
    Weights: unsigned codes in [0, 15] (same nibble packing), groups of 64 input channels, asymmetric: one scale and
    one zero per (output row, group), both in the model dtype, weight value = code * scale + zero (exactly as
    Nunchaku's AWQ layers store it). Rule: zero = min(group), scale = (max(group) - min(group)) / 15, both rounded to
    the model dtype first, codes = clamp(round((W - zero) / scale), 0, 15) (0 where scale is 0). Activations stay in
    16-bit; the op dequantizes exactly (fp32 code * scale + zero) and accumulates in fp32 (the CUDA path
    for more than 8 tokens rounds each weight once to the activation dtype and calls cuBLAS). Not an SVDQuant
    precision (no smoothing, no low-rank branch): ``SVDQuantConfig.weight_only`` picks it for the linears the
    model family marks.

Rounding is round-half-to-even everywhere (``torch.round`` / ``rintf``); for e2m1 "even" means an even
mantissa bit, which gives the rule in ``E2M1_BOUNDS``.
"""

from __future__ import annotations

import torch

INT4 = "int4"
NVFP4 = "nvfp4"
W4A8 = "w4a8"
PRECISIONS = (INT4, NVFP4, W4A8)  # the SVDQuant (W4A4 / W4A8) precisions
W4A16 = "w4a16"  # weight-only
W4A16_GROUP = 64

GROUP_SIZE = {INT4: 64, NVFP4: 16, W4A8: 64}  # weight groups (W4A8 activations have one scale per token)

INT4_QMAX = 7  # signed codes are clamped to [-INT4_QMAX, INT4_QMAX]
UINT4_QMAX = 15  # unsigned codes are clamped to [0, UINT4_QMAX]
INT8_QMAX = 127  # W4A8 activation codes are clamped to [-INT8_QMAX, INT8_QMAX]
W4A8_MULT_MAX = 18  # W4A8 weight multipliers are in [1, W4A8_MULT_MAX]: INT4_QMAX * 18 = 126 fits int8
ACT_SHIFT = 0.171875  # >= -min(GELU) (0.16997...), exact in every float format we use

NVFP4_QMAX = 6.0
FP8_E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive e2m1 magnitudes: bound i separates magnitude codes i and i+1. A value exactly on
# a bound goes to the even code (round half to even mantissa): it stays at i when i is even, moves up when odd.
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_precision(precision: str, *, arg: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{arg} must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision

