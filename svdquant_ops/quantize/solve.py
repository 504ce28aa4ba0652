"""Per-layer entry point of the offline algorithm, called by the SVDQuantConfig handler."""

from __future__ import annotations

import torch
from torch import nn

from ..tensor import SVDQuantTensor
from .decompose import check_weight


def quantize_linear(module: nn.Linear, config, rank: int) -> SVDQuantTensor:
    """Quantize one linear's weight: data-free (λ = 1, truncated SVD, RTN residual)."""
    name = getattr(module, "_svdquant_fqn", None) or type(module).__name__
    weight = module.weight.detach()
    try:
        check_weight(weight)
    except ValueError as exc:
        raise ValueError(f"svdquant_ops: cannot quantize {name}: {exc}") from None
    with torch.no_grad():
        return SVDQuantTensor.from_hp(weight, config.precision, rank, svd=config.svd,
                                      per_channel_global=config.nvfp4_per_channel_scale)
