"""GPTQ for the 4-bit residual, with scales fixed from RTN (as in the reference), act-order and lazy blocks."""

from __future__ import annotations

import torch

from ..formats import INT4, INT4_QMAX, GROUP_SIZE
from ..layout import e2m1_decode
from .quantizers import e2m1_encode


def gptq_quantize(r: torch.Tensor, hessian: torch.Tensor, precision: str, scales: torch.Tensor,
                  global_scale: torch.Tensor | None = None, *, damp: float = 0.01, block: int = 128,
                  act_order: bool = True) -> torch.Tensor:
    """Quantize ``r`` [N, K] column by column, spreading each column's error over the not-yet-quantized columns
    through the inverse Hessian ``hessian`` [K, K] = XᵀX of the (smoothed) inputs.

    ``scales`` [N, K/g] (and the NVFP4 ``global_scale``) stay as RTN chose them, so only the codes change.
    Returns codes [N, K]: int8 values (INT4) or uint8 e2m1 patterns (NVFP4).
    """
    n, k = r.shape
    gs = GROUP_SIZE[precision]
    w = r.float().clone()
    h = hessian.float().clone()
    step = scales.float().repeat_interleave(gs, dim=1)  # [N, K]: the scale of each weight's group
    if global_scale is not None:
        gsc = global_scale.float()
        step = step * (gsc.unsqueeze(1) if gsc.numel() > 1 else gsc)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h, step = w[:, perm], h[perm][:, perm], step[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    def quant(col, s):
        q = col / s
        if precision == INT4:
            c = torch.round(q).clamp(-INT4_QMAX, INT4_QMAX)
            c = torch.where(s == 0, torch.zeros_like(c), c)
            return c, c * s
        c = e2m1_encode(q)
        c = torch.where(s == 0, torch.zeros_like(c), c)
        return c, e2m1_decode(c) * s

    codes = torch.zeros(n, k, dtype=torch.int8 if precision == INT4 else torch.uint8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, deq = quant(w1[:, i], step[:, i1 + i])
            codes[:, i1 + i] = c.to(codes.dtype)
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]
