"""Independent pure-PyTorch reference for the svdquant ops, written without the C++ code in view of its loops.

Quantization follows the published rules (formats.py docstring); e2m1 rounding is done by a nearest-value search
with ties to the even code, not by the threshold formula the kernels use. The GEMM dequantizes and multiplies in
float64, so it is the exact value the kernels approximate with fp32 accumulation.
"""

from __future__ import annotations

import torch

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
SHIFT = 0.171875


def e2m1_nearest(q: torch.Tensor) -> torch.Tensor:
    """Codes (sign bit 3) of the e2m1 value nearest to q; ties to the even magnitude index; NaN -> 0."""
    mag = q.double().abs().unsqueeze(-1)
    d = (mag - E2M1_MAGNITUDES).abs()
    best = d == d.min(dim=-1, keepdim=True).values
    even = best & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.int().argmax(-1), best.int().argmax(-1))
    code = idx + 8 * torch.signbit(q).long()
    return torch.where(torch.isnan(q), torch.zeros_like(code), code)


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    v = E2M1_MAGNITUDES[code.long() & 7]
    return torch.where(code.long() >= 8, -v, v)


def quantize_act(x, smooth, proj_down, precision, act_unsigned=False):
    """-> (codes int64 [..., K] (signed ints / uint4 / e2m1 patterns), scales (scale dtype), down_act float64)."""
    K = x.shape[-1]
    if precision == "w4a8":
        return _quantize_act_w4a8(x, smooth, proj_down)
    gs = 64 if precision == "int4" else 16
    xf = x.float()
    xh = ((xf + SHIFT) if act_unsigned else xf) / smooth.float()
    grp = xh.reshape(*x.shape[:-1], K // gs, gs)
    if precision == "int4":
        qmax = 15.0 if act_unsigned else 7.0
        amax = grp.amax(-1) if act_unsigned else grp.abs().amax(-1)
        if act_unsigned:
            amax = amax.clamp(min=0)
        amax = torch.where(torch.isnan(grp).any(-1), torch.nan, amax)
        v = amax / qmax
        s = torch.where(torch.isinf(v), v, torch.clamp(v, max=torch.finfo(x.dtype).max)).to(x.dtype)
        sf = s.float().unsqueeze(-1)
        lo = 0.0 if act_unsigned else -7.0
        q = torch.round(grp / sf).clamp(lo, qmax)
        q = torch.where((sf == 0) | torch.isnan(q), torch.zeros_like(q), q)
        codes = q.long()
    else:
        amax = grp.abs().amax(-1)
        amax = torch.where(torch.isnan(grp).any(-1), torch.nan, amax)
        v = amax / 6.0
        s = torch.where(torch.isinf(v), torch.nan, torch.clamp(v, max=448.0)).to(torch.float8_e4m3fn)
        sf = s.float().unsqueeze(-1)
        codes = e2m1_nearest(grp / sf)
        codes = torch.where(sf == 0, torch.zeros_like(codes), codes)
    down = x.double().reshape(-1, K) @ proj_down.double()
    return codes.reshape(*x.shape[:-1], K), s, down.reshape(*x.shape[:-1], proj_down.shape[1])


def _quantize_act_w4a8(x, smooth, proj_down):
    """INT8 per token: scale = amax over the whole row / 127 (NaN if the row holds one), saturated to the largest
    finite value of x's dtype and rounded to it; codes nearest integer (ties to even) clamped to [-127, 127]."""
    K = x.shape[-1]
    xh = x.float() / smooth.float()
    amax = xh.abs().amax(-1, keepdim=True)
    amax = torch.where(torch.isnan(xh).any(-1, keepdim=True), torch.nan, amax)
    v = amax / 127.0
    s = torch.where(torch.isinf(v), v, torch.clamp(v, max=torch.finfo(x.dtype).max)).to(x.dtype)
    sf = s.float()
    q = torch.round(xh / sf).clamp(-127.0, 127.0)
    q = torch.where((sf == 0) | torch.isnan(q), torch.zeros_like(q), q)
    down = x.double().reshape(-1, K) @ proj_down.double()
    return q.long(), s, down.reshape(*x.shape[:-1], proj_down.shape[1])


def quantize_w4a8_weight(w):
    """W4A8 weight rule (formats.py): s = rowmax|W| / 126, m = clamp(ceil(groupmax / (7 s)), 1, 18), codes
    round(W / (m s)) in [-7, 7]; all products and quotients in fp32. Returns (codes int64, m int64, s fp32)."""
    N, K = w.shape
    wf = w.float()
    grp = wf.reshape(N, K // 64, 64)
    gmax = grp.abs().amax(-1)
    s = gmax.amax(-1) / torch.tensor(126.0)
    seven_s = (torch.tensor(7.0) * s).unsqueeze(-1)
    m = torch.where(seven_s == 0, torch.ones_like(gmax), torch.ceil(gmax / seven_s).clamp(1, 18))
    step = (m * s.unsqueeze(-1)).unsqueeze(-1)
    q = torch.where(step == 0, torch.zeros_like(grp), torch.round(grp / step).clamp(-7, 7))
    return q.reshape(N, K).long(), m.long(), s


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 [..., K/2] -> int64 [..., K]: element 2i in the low nibble of byte i, 2i+1 in the high nibble
    (layout version 1); signed: two's complement 4-bit (-8..7), else 0..15 (also the e2m1 bit patterns)."""
    b = packed.long()
    v = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return torch.where(v >= 8, v - 16, v) if signed else v


def code_values(codes: torch.Tensor, precision: str) -> torch.Tensor:
    """Integer / e2m1 codes -> float64 values before scaling."""
    return e2m1_value(codes) if precision == "nvfp4" else codes.double()


def dequantize(values: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    rep = scales.double().repeat_interleave(group, dim=-1)
    return values.double() * rep


def gemm(a_vals, a_scales, w_vals, w_scales, global_scale, down_act, proj_up, bias, precision):
    """float64 y = deq(a) deq(w)^T [* global] + down_act proj_up^T + bias; returns (y, magnitude bound).

    w4a8: a_scales [M, 1] (per token), w_scales the integer multipliers [N, K/64], global_scale s [N]."""
    gs = 16 if precision == "nvfp4" else 64
    a = a_vals.double() * a_scales.double() if precision == "w4a8" else dequantize(a_vals, a_scales, gs)
    w = dequantize(w_vals, w_scales, gs)
    if global_scale is not None:
        w = w * global_scale.double().reshape(-1, 1)
    up = proj_up.double()
    y = a @ w.T + down_act.double() @ up.T
    mag = a.abs() @ w.abs().T + down_act.double().abs() @ up.abs().T
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gemm_error_bound(mag: torch.Tensor, y_ref: torch.Tensor, n_terms: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound for an fp32 accumulation of n_terms exact products then one rounding to out_dtype.

    Each group term is the exact integer dot times the fp32 product of two scales (2 roundings), summed in fp32
    (n_terms - 1 roundings, each at most 2^-24 of the running magnitude <= mag); then the final cast rounds once
    more (half an ulp: unit roundoff of out_dtype times |y|). Subnormal outputs get an absolute floor.
    """
    u = UNIT_ROUNDOFF[out_dtype]
    tiny = torch.finfo(out_dtype).tiny
    return (n_terms + 4) * 2.0**-24 * mag + u * y_ref.abs() * (1 + 2.0**-20) + tiny
