"""From a 16-bit weight to SVDQuant's three parts: smoothing λ, low-rank branch (U, D) and the 4-bit residual.

``quantize_weight`` is the data-free entry point for one weight (returns an ``SVDQuantTensor``).

This is the data-free path (λ = 1 unless given, one truncated SVD, RTN residual) and the last step of the
calibrated path, which passes a searched λ and its own branch. All of it works in fp32 on the weight's device,
and the residual is taken against the branch *as the runtime applies it* (factors rounded to the model dtype),
so rounding of the factors is absorbed by the 4-bit residual instead of being an unaccounted error.
"""

from __future__ import annotations

import torch

from ..formats import ACT_SHIFT, FLOAT_DTYPES, check_precision
from ..quantizers import dequantize, rtn_weight
from ..storage import SVDQuantParts, SVDQuantTensor
from .args import integer
from .lowrank import DEFAULT_SVD, truncated_svd


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it has no values): load the model's weights before "
                         "quantizing")
    # one pass over the weight: its fp32 norm is finite only if every value is, and quantizing works in fp32 on sums
    # of squares (the SVD, the smoothing search), where a norm that overflows cannot be used either
    if not torch.isfinite(torch.linalg.vector_norm(weight, dtype=torch.float32)):
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name} contains NaN or Inf values; refusing to quantize a corrupt weight")
        raise ValueError(f"{name} has values too large for quantizing in fp32 (max |{name}| "
                         f"{weight.abs().max().item():.3g}: its sum of squares overflows fp32); refusing to quantize "
                         "a corrupt weight")


def check_layer_weight(weight: torch.Tensor, name: str) -> None:
    """``check_weight`` for the weight of layer ``name`` about to be quantized: one of the model dtypes, finite;
    errors name the layer."""
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"svdquant_ops: {name} has weight dtype {weight.dtype}; expected one of "
                        f"{[str(d) for d in FLOAT_DTYPES]}")
    try:
        check_weight(weight)
    except ValueError as exc:
        raise ValueError(f"svdquant_ops: cannot quantize {name}: {exc}") from None


def branch_in_smoothed_space(proj_up: torch.Tensor, proj_down: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """The low-rank term the runtime adds, expressed on Ŵ = W·diag(λ): U · (proj_downᵀ · diag(λ)), fp32 [N, K]."""
    return proj_up.float() @ (proj_down.float() * smooth.float().unsqueeze(1)).T


def residual_parts(w_hat: torch.Tensor, smooth_q: torch.Tensor, proj_up: torch.Tensor, proj_down: torch.Tensor,
                   precision: str, dtype: torch.dtype, *, act_unsigned: bool = False,
                   per_channel_global: bool = False, residual_codes=None) -> SVDQuantParts:
    """Quantize R = Ŵ − L (RTN unless ``residual_codes`` = (codes, scales, global) is given, e.g. from GPTQ)."""
    r = w_hat - branch_in_smoothed_space(proj_up, proj_down, smooth_q)
    if residual_codes is None:
        codes, scales, gsc = rtn_weight(r, precision, dtype, per_channel_global=per_channel_global)
    else:
        codes, scales, gsc = residual_codes
    corr = None
    if act_unsigned:
        # The 4-bit path sees (x + s)/λ: it adds Q(R)·(s/λ) to every output, which the bias takes back.
        corr = -(dequantize(codes, scales, precision, gsc) @ (ACT_SHIFT / smooth_q.float()))
    return SVDQuantParts(codes=codes, scales=scales, global_scale=gsc, smooth=smooth_q.to(dtype),
                         proj_down=proj_down, proj_up=proj_up, precision=precision, act_unsigned=act_unsigned,
                         bias_correction=corr)


def decompose(weight: torch.Tensor, *, precision: str = "int4", rank: int = 32, smooth: torch.Tensor | None = None,
              svd: str = DEFAULT_SVD, act_unsigned: bool = False, per_channel_global: bool = False,
              dtype: torch.dtype | None = None, seed: int = 0) -> SVDQuantParts:
    """Data-free SVDQuant of one weight: λ (default ones), one rank-``rank`` SVD of W·diag(λ), RTN residual."""
    check_precision(precision)
    check_weight(weight)
    if act_unsigned and precision != "int4":
        raise ValueError(f"act_unsigned=True is only defined for precision 'int4', got {precision!r}")
    rank = integer(rank, "rank", 0)
    dtype = dtype or weight.dtype
    n, k = weight.shape
    smooth_given = smooth is not None
    if smooth is None:
        smooth = torch.ones(k, device=weight.device)
    smooth_q = smooth.to(dtype).float()  # the runtime divides by the stored (rounded) λ
    if smooth.shape != (k,) or not torch.isfinite(smooth_q).all() or not (smooth_q > 0).all():
        raise ValueError(f"smooth must be a positive [in_features] = [{k}] vector that is finite and non-zero in "
                         f"{dtype}")
    w_hat = weight.float() * smooth_q
    us, v = truncated_svd(w_hat, rank, svd, seed=seed)
    proj_up = us.to(dtype)
    proj_down = (v / smooth_q.unsqueeze(1)).to(dtype)
    if not (torch.isfinite(proj_up).all() and torch.isfinite(proj_down).all()):
        why = ("with this smooth vector; use a milder smoothing" if smooth_given else
               f"(max |weight| {weight.abs().max().item():.4g}); quantize a bfloat16 or float32 copy of it")
        raise ValueError(f"the low-rank factors overflow {dtype} {why}")
    return residual_parts(w_hat, smooth_q, proj_up, proj_down, precision, dtype, act_unsigned=act_unsigned,
                          per_channel_global=per_channel_global)


def quantize_weight(weight: torch.Tensor, precision: str = "int4", rank: int = 32, *,
                    smooth: torch.Tensor | None = None, svd: str = DEFAULT_SVD, act_unsigned: bool = False,
                    per_channel_global: bool = False, seed: int = 0) -> SVDQuantTensor:
    """Data-free SVDQuant of a 16-bit weight [N, K] into an ``SVDQuantTensor`` in the weight's dtype and device:
    λ (default 1), truncated SVD (``svd``: "lowrank" seeded randomized, or "exact"), RTN residual."""
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_weight: weight must be {', '.join(str(d) for d in FLOAT_DTYPES)} (the model dtype "
                        f"the quantized weight keeps), got {weight.dtype}")
    parts = decompose(weight, precision=precision, rank=rank, smooth=smooth, svd=svd, act_unsigned=act_unsigned,
                      per_channel_global=per_channel_global, dtype=weight.dtype, seed=seed)
    return SVDQuantTensor.from_parts(parts, weight.dtype)
