"""Round-to-nearest rules of the formats (int4, nvfp4, w4a8; weight-only w4a16) in PyTorch: weights (offline), activations
(fake-quant in the calibration loop) and dequantization (storage inspection).

They follow the same rules as the C++ kernels (``csrc/formats.h``): the activation quantizer here produces exactly
the codes and scales of ``svdquant::quantize_act`` (tested), so fake-quantized activations in the algorithm are the
ones the deployed layer will see. Packing into the storage layout is ``layout.pack_nibbles`` on the codes
returned here, so fake-quant and packed weights share one code path.
"""

from __future__ import annotations

import torch

from .formats import (
    ACT_SHIFT,
    E2M1_BOUNDS,
    FP8_E4M3_MAX,
    GROUP_SIZE,
    INT4,
    INT4_QMAX,
    INT8_QMAX,
    NVFP4,
    NVFP4_QMAX,
    UINT4_QMAX,
    W4A16_GROUP,
    W4A8,
    W4A8_MULT_MAX,
    check_precision,
)
from .layout import e2m1_decode


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    if x.shape[-1] % group:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of the group size {group}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)


def _saturate(v: torch.Tensor, hi: float) -> torch.Tensor:
    """min(v, hi), letting NaN and +Inf through (as csrc/formats.h does): bad input stays visible."""
    return torch.where(torch.isnan(v) | torch.isposinf(v), v, v.clamp(max=hi))


def quantize_int4(x: torch.Tensor, scale_dtype: torch.dtype, *, unsigned: bool = False):
    """Per-64 INT4: scale = amax/7 (or max/15 unsigned) rounded to ``scale_dtype``; codes round-half-even.

    Returns (codes int8 [..., K], scales [..., K/64] in scale_dtype). No shift or smoothing is applied here.
    """
    g = _groups(x, GROUP_SIZE[INT4])
    qmax = float(UINT4_QMAX if unsigned else INT4_QMAX)
    amax = g.amax(-1).clamp(min=0) if unsigned else g.abs().amax(-1)
    scales = _saturate(amax / qmax, torch.finfo(scale_dtype).max).to(scale_dtype)
    s = scales.float().unsqueeze(-1)
    q = torch.round(g / s).clamp(0.0 if unsigned else -qmax, qmax)
    q = torch.where((s == 0) | torch.isnan(q), torch.zeros_like(q), q)
    return q.to(torch.int8).flatten(-2), scales


def quantize_int8_per_token(x: torch.Tensor, scale_dtype: torch.dtype):
    """W4A8 activations: one scale per row (token), scale = amax / 127 saturated and rounded to ``scale_dtype``;
    codes round-half-even clamped to [-127, 127] (0 where the scale is 0 or the value NaN).

    Returns (codes int8 [..., K], scales [..., 1] in scale_dtype). No smoothing is applied here.
    """
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)  # torch.amax propagates NaN, as nan_max does
    scales = _saturate(amax / float(INT8_QMAX), torch.finfo(scale_dtype).max).to(scale_dtype)
    s = scales.float()
    q = torch.round(xf / s).clamp(-float(INT8_QMAX), float(INT8_QMAX))
    q = torch.where((s == 0) | torch.isnan(q), torch.zeros_like(q), q)
    return q.to(torch.int8), scales


def w4a8_multipliers(amax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Integer multipliers m = clamp(ceil(amax / (7 s)), 1, 18) (uint8) of groups with absmax ``amax`` [N, G] in a
    row with per-channel scale ``s`` [N] (fp32); rows with s == 0 get m = 1."""
    step = (float(INT4_QMAX) * s.float()).unsqueeze(-1)  # 7 * s in fp32
    m = torch.ceil(amax.float() / step).clamp(1, W4A8_MULT_MAX)
    m = torch.where((step == 0) | torch.isnan(m), torch.ones_like(m), m)
    return m.to(torch.uint8)


def w4a8_channel_scale(w: torch.Tensor) -> torch.Tensor:
    """W4A8 per-output-channel scale s = rowmax(|W|) / (7 * 18) in fp32 (0 for an all-zero row)."""
    return w.float().abs().amax(-1) / float(INT4_QMAX * W4A8_MULT_MAX)


def quantize_w4a8_weight(w: torch.Tensor):
    """W4A8 weights (formats.py): s[n] = rowmax / 126, m[n, g] = clamp(ceil(groupmax / (7 s)), 1, 18),
    codes = clamp(round(W / (m s)), -7, 7) with m * s in fp32.

    Returns (codes int8 [N, K], multipliers uint8 [N, K/64], s float32 [N]).
    """
    g = _groups(w, GROUP_SIZE[W4A8])  # [N, G, 64] fp32
    s = w4a8_channel_scale(w)
    m = w4a8_multipliers(g.abs().amax(-1), s)
    step = (m.float() * s.unsqueeze(-1)).unsqueeze(-1)  # m * s in fp32
    q = torch.round(g / step).clamp(-float(INT4_QMAX), float(INT4_QMAX))
    q = torch.where((step == 0) | torch.isnan(q), torch.zeros_like(q), q)
    return q.to(torch.int8).flatten(-2), m, s


def e2m1_encode(q: torch.Tensor) -> torch.Tensor:
    """float -> e2m1 bit patterns (uint8, sign in bit 3): nearest value, ties to even mantissa, saturating."""
    mag = q.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for i, b in enumerate(E2M1_BOUNDS):
        code += (mag > b) if i % 2 == 0 else (mag >= b)
    code = code | (torch.signbit(q).to(torch.uint8) << 3)
    return torch.where(torch.isnan(q), torch.zeros_like(code), code)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    """Per-16 NVFP4: micro-scale = fp8_e4m3(amax / 6 / global) saturated at 448; codes e2m1 of x / (micro*global).

    ``global_scale`` broadcasts against the leading dims of x ([1] per tensor or [N] per row) or is None (=1).
    Returns (codes uint8 e2m1 patterns [..., K], micro_scales float8_e4m3fn [..., K/16]).
    """
    g = _groups(x, GROUP_SIZE["nvfp4"])
    gs = torch.ones((), device=x.device) if global_scale is None else global_scale.float()
    gs = gs.reshape(*gs.shape, 1) if gs.dim() else gs  # [N] -> [N, 1] against [N, G]
    amax = g.abs().amax(-1)
    micro = _saturate(amax / NVFP4_QMAX / gs, FP8_E4M3_MAX)
    micro = torch.where(torch.isposinf(micro), torch.nan, micro).to(torch.float8_e4m3fn)  # e4m3fn has no Inf
    s = (micro.float() * gs).unsqueeze(-1)
    codes = e2m1_encode(g / s)
    codes = torch.where(s == 0, torch.zeros_like(codes), codes)
    return codes.flatten(-2), micro


def nvfp4_global_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """fp32 scale that maps the largest group scale onto the top of the fp8 range (amax / (6 * 448))."""
    amax = w.float().abs().amax(dim=-1) if per_channel else w.float().abs().amax().reshape(1)
    scale = amax / (NVFP4_QMAX * FP8_E4M3_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, precision: str,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [..., K] (int8 INT4 / W4A8 values or e2m1 patterns) and scales -> float32 values.

    W4A8 weights: scales are the multipliers [N, K/64] and ``global_scale`` the per-channel s [N]: code * m * s
    (code * m is exact, then one fp32 rounding). W4A8 activations (one scale per token) are ``codes * scales``.
    """
    gsz = GROUP_SIZE[check_precision(precision)]
    if precision == W4A8 and global_scale is None:
        raise ValueError("dequantize: W4A8 weights need global_scale (the fp32 per-channel scale s [N])")
    vals = e2m1_decode(codes) if precision == NVFP4 else codes.float()
    out = vals.reshape(*vals.shape[:-1], -1, gsz) * scales.float().unsqueeze(-1)
    out = out.flatten(-2)
    if global_scale is not None:
        gsc = global_scale.float()
        out = out * (gsc.unsqueeze(-1) if gsc.numel() > 1 else gsc)
    return out


def rtn_weight(w: torch.Tensor, precision: str, scale_dtype: torch.dtype, *, per_channel_global: bool = False):
    """RTN weight quantization. Returns (codes [N, K], scales [N, K/g], global_scale or None).

    int4: scales in ``scale_dtype``, no global scale. nvfp4: fp8 micro-scales and an fp32 global scale ([1], or [N]
    with ``per_channel_global``). w4a8: uint8 multipliers and the fp32 per-channel scale [N] (``scale_dtype`` and
    ``per_channel_global`` do not apply).
    """
    if check_precision(precision) == INT4:
        codes, scales = quantize_int4(w, scale_dtype)
        return codes, scales, None
    if precision == W4A8:
        return quantize_w4a8_weight(w)
    gsc = nvfp4_global_scale(w, per_channel_global)
    codes, micro = quantize_nvfp4(w, gsc)
    return codes, micro, gsc


def fake_quant_weight(w: torch.Tensor, precision: str, scale_dtype: torch.dtype) -> torch.Tensor:
    codes, scales, gsc = rtn_weight(w, precision, scale_dtype)
    return dequantize(codes, scales, precision, gsc)


def quantize_w4a16_weight(w: torch.Tensor, scale_dtype: torch.dtype):
    """W4A16 weights (formats.py): per group of 64, zero = min and scale = (max - min) / 15, both rounded to
    ``scale_dtype``; codes = clamp(round((w - zero) / scale), 0, 15), 0 where scale is 0. Returns uint8 codes
    [N, K], scales and zeros [N, K/64]."""
    g = _groups(w.float(), W4A16_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    zeros = lo.to(scale_dtype)
    scales = ((hi - lo) / UINT4_QMAX).to(scale_dtype)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((g - z) / torch.where(s > 0, s, 1.0)), 0.0)
    codes = q.clamp(0, UINT4_QMAX).to(torch.uint8).flatten(-2)
    return codes, scales, zeros


def dequantize_w4a16(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15), scales and zeros [N, K/64] -> fp32 weights, code * scale + zero (the op's rule)."""
    c = _groups(codes.float(), W4A16_GROUP)
    return (c * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).flatten(-2)


def smooth_act(x: torch.Tensor, smooth: torch.Tensor, *, unsigned: bool = False) -> torch.Tensor:
    """x_hat = x / smooth (or (x + shift) / smooth) in fp32, exactly as the kernel computes it."""
    xf = x.float()
    return ((xf + ACT_SHIFT) if unsigned else xf) / smooth.float()


def rtn_act(x: torch.Tensor, smooth: torch.Tensor, precision: str, *, unsigned: bool = False):
    """The codes and scales ``svdquant::quantize_act`` produces (INT4 / W4A8 scales in x's dtype), unpacked.

    W4A8: int8 codes [..., K] in natural channel order (the op stores them in W4A8's channel order:
    ``layout.w4a8_from_stored`` maps between the two) and one scale per token [..., 1]; ``unsigned`` is not defined
    for it.
    """
    check_precision(precision)
    if unsigned and precision != INT4:
        raise ValueError(f"unsigned activations are only defined for precision 'int4', got {precision!r}")
    x_hat = smooth_act(x, smooth, unsigned=unsigned)
    if precision == INT4:
        return quantize_int4(x_hat, x.dtype, unsigned=unsigned)
    if precision == W4A8:
        return quantize_int8_per_token(x_hat, x.dtype)
    return quantize_nvfp4(x_hat)


def fake_quant_act(x: torch.Tensor, smooth: torch.Tensor, precision: str, *, unsigned: bool = False) -> torch.Tensor:
    """Q(x_hat) dequantized, in fp32: what the quantized path of the deployed layer multiplies with Q(R)."""
    codes, scales = rtn_act(x, smooth, precision, unsigned=unsigned)
    if precision == W4A8:
        return codes.float() * scales.float()
    return dequantize(codes, scales, precision)
