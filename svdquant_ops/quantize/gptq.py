"""GPTQ for the 4-bit residual, with act-order and lazy blocks.

int4 / nvfp4: the scales (and the NVFP4 global scale) stay as RTN chose them (as in the reference), only the codes
change. w4a8: the per-channel scale s stays as RTN chose it from the residual's rows (before any GPTQ update); the
integer multiplier of each 64-group is chosen when GPTQ reaches the group's first column, from the group's weights
as updated by the error feedback so far.
"""

from __future__ import annotations

import torch

from ..formats import GROUP_SIZE, INT4_QMAX, NVFP4, W4A8
from ..layout import e2m1_decode
from ..quantizers import e2m1_encode, w4a8_multipliers


def gptq_quantize(r: torch.Tensor, hessian: torch.Tensor, precision: str, scales: torch.Tensor,
                  global_scale: torch.Tensor | None = None, *, damp: float = 0.01, block: int = 128,
                  act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``r`` [N, K] column by column, spreading each column's error over the not-yet-quantized columns
    through the inverse Hessian ``hessian`` [K, K] = XᵀX of the (smoothed) inputs.

    ``scales`` [N, K/g] (and the NVFP4 ``global_scale``) are RTN's and are kept. For w4a8 ``global_scale`` is the
    per-channel scale s [N] (kept) and ``scales`` (RTN's multipliers) is replaced by multipliers chosen during the
    sweep (see the module docstring).
    Returns (codes [N, K], scales [N, K/g]): codes are int8 values (INT4, W4A8) or uint8 e2m1 patterns (NVFP4);
    scales are the ones the codes go with (the input ``scales`` except for w4a8).
    """
    n, k = r.shape
    gs = GROUP_SIZE[precision]
    w4a8 = precision == W4A8
    if w4a8 and (global_scale is None or global_scale.numel() != n):
        raise ValueError(f"gptq_quantize: w4a8 needs global_scale = the per-channel scale s [{n}]")
    w = r.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    if w4a8:
        s = global_scale.float().reshape(n)
        mult = torch.ones(n, k // gs, dtype=torch.uint8, device=w.device)
        step = torch.zeros(n, k, device=w.device)  # filled group by group (permuted column order)
        group_of = perm // gs  # group of each permuted position
        reached = torch.zeros(k // gs, dtype=torch.bool)
    else:
        step = scales.float().repeat_interleave(gs, dim=1)  # [N, K]: the scale of each weight's group
        if global_scale is not None:
            gsc = global_scale.float()
            step = step * (gsc.unsqueeze(1) if gsc.numel() > 1 else gsc)
        step = step[:, perm]

    def quant(col, st):
        q = col / st
        if precision != NVFP4:  # INT4 and W4A8 weights: integer codes in [-7, 7]
            c = torch.round(q).clamp(-INT4_QMAX, INT4_QMAX)
            c = torch.where(st == 0, torch.zeros_like(c), c)
            return c, c * st
        c = e2m1_encode(q)
        c = torch.where(st == 0, torch.zeros_like(c), c)
        return c, e2m1_decode(c) * st

    codes = torch.zeros(n, k, dtype=torch.uint8 if precision == NVFP4 else torch.int8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if w4a8:
                g = int(group_of[i1 + i])
                if not reached[g]:  # first column of group g: pick its multipliers from the current weights
                    reached[g] = True
                    pos = inv_perm[g * gs:(g + 1) * gs]  # permuted positions of the group's columns, all >= i1 + i
                    vals = torch.empty(n, gs, device=w.device)
                    here = pos < i2
                    vals[:, here] = w1[:, pos[here] - i1]
                    later = pos[~here]  # not yet updated with this block's errors: apply them now
                    vals[:, ~here] = w[:, later] - err1[:, :i] @ hinv[i1:i1 + i, later]
                    m = w4a8_multipliers(vals.abs().amax(1, keepdim=True), s).squeeze(1)
                    mult[:, g] = m
                    step[:, pos] = (m.float() * s).unsqueeze(1)  # m * s in fp32
            c, deq = quant(w1[:, i], step[:, i1 + i])
            codes[:, i1 + i] = c.to(codes.dtype)
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, inv_perm], (mult if w4a8 else scales)
