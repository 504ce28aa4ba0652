"""Round-to-nearest quantizers of both formats, in PyTorch, for weights (offline) and activations (fake-quant in
the calibration loop).

They follow the same rules as the C++ kernels (``csrc/formats.h``): the activation quantizer here produces exactly
the codes and scales of ``svdquant::quantize_act`` (tested), so fake-quantized activations in the algorithm are the
ones the deployed layer will see. Packing into the storage layout is ``layout.pack_nibbles`` on the codes
returned here, so fake-quant and packed weights share one code path.
"""

from __future__ import annotations

import torch

from ..formats import (
    ACT_SHIFT,
    E2M1_BOUNDS,
    FP8_E4M3_MAX,
    GROUP_SIZE,
    INT4,
    INT4_QMAX,
    NVFP4_QMAX,
    UINT4_QMAX,
    check_precision,
)
from ..layout import e2m1_decode


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
    """Codes [..., K] (int8 INT4 values or e2m1 patterns) and scales -> float32 values."""
    gsz = GROUP_SIZE[check_precision(precision)]
    vals = codes.float() if precision == INT4 else e2m1_decode(codes)
    out = vals.reshape(*vals.shape[:-1], -1, gsz) * scales.float().unsqueeze(-1)
    out = out.flatten(-2)
    if global_scale is not None:
        gsc = global_scale.float()
        out = out * (gsc.unsqueeze(-1) if gsc.numel() > 1 else gsc)
    return out


def quantize_weight(w: torch.Tensor, precision: str, scale_dtype: torch.dtype, *, per_channel_global: bool = False):
    """RTN weight quantization. Returns (codes [N, K], scales [N, K/g], global_scale or None)."""
    if check_precision(precision) == INT4:
        codes, scales = quantize_int4(w, scale_dtype)
        return codes, scales, None
    gsc = nvfp4_global_scale(w, per_channel_global)
    codes, micro = quantize_nvfp4(w, gsc)
    return codes, micro, gsc


def fake_quant_weight(w: torch.Tensor, precision: str, scale_dtype: torch.dtype) -> torch.Tensor:
    codes, scales, gsc = quantize_weight(w, precision, scale_dtype)
    return dequantize(codes, scales, precision, gsc)


def smooth_act(x: torch.Tensor, smooth: torch.Tensor, *, unsigned: bool = False) -> torch.Tensor:
    """x_hat = x / smooth (or (x + shift) / smooth) in fp32, exactly as the kernel computes it."""
    xf = x.float()
    return ((xf + ACT_SHIFT) if unsigned else xf) / smooth.float()


def quantize_act(x: torch.Tensor, smooth: torch.Tensor, precision: str, *, unsigned: bool = False):
    """The codes and scales ``svdquant::quantize_act`` produces (INT4 scales in x's dtype), unpacked."""
    x_hat = smooth_act(x, smooth, unsigned=unsigned)
    if check_precision(precision) == INT4:
        return quantize_int4(x_hat, x.dtype, unsigned=unsigned)
    return quantize_nvfp4(x_hat)


def fake_quant_act(x: torch.Tensor, smooth: torch.Tensor, precision: str, *, unsigned: bool = False) -> torch.Tensor:
    """Q(x_hat) dequantized, in fp32: what the 4-bit path of the deployed layer multiplies with Q(R)."""
    codes, scales = quantize_act(x, smooth, precision, unsigned=unsigned)
    return dequantize(codes, scales, precision)
