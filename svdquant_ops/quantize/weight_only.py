"""W4A16Config: 4-bit weight-only quantization (formats.py "w4a16") as a torchao config, for the linears that see
one token per sample (AdaLN modulation). ``SVDQuantConfig`` applies it to the linears the model family marks;
``quantization_config()`` maps it onto them by name on diffusers' ``from_pretrained`` path; on its own,
``quantize_(model, W4A16Config())`` gives every eligible linear 4-bit weights (its own data-free rule, no
calibration: round to nearest with per-group min / max).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from ..formats import W4A16_GROUP
from ..storage import PackedWeight, W4A16Tensor
from .decompose import check_layer_weight
from .structure import describe

log = logging.getLogger("svdquant_ops")


@dataclass
class W4A16Config(AOBaseConfig):
    """4-bit weights (unsigned codes, groups of 64, a scale and a zero per group), 16-bit activations."""

    version: int = 1

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"W4A16Config.version must be 1, got {self.version!r}")


torch.serialization.add_safe_globals([W4A16Config])


def quantize_weight_only(module: nn.Linear) -> nn.Linear:
    """Swap ``module.weight`` for a ``W4A16Tensor`` in place (errors name the layer)."""
    weight = module.weight.detach()
    check_layer_weight(weight, describe(module))
    with torch.no_grad():
        module.weight = nn.Parameter(W4A16Tensor.from_float(weight), requires_grad=False)
    if module.bias is not None:
        module.bias.requires_grad_(False)
    return module


@register_quantize_module_handler(W4A16Config)
def _transform(module: nn.Module, config: W4A16Config, *, parameter_name: str = "weight") -> nn.Module:
    if parameter_name != "weight":
        raise TypeError(f"W4A16Config applies to the weight of nn.Linear modules, got {type(module).__name__}."
                        f"{parameter_name}")
    if not isinstance(module, nn.Linear):  # FqnToConfig name patterns also reach a block's norm or SiLU
        return module
    if isinstance(module.weight, PackedWeight):
        return module
    if module.in_features % W4A16_GROUP:
        log.info("svdquant_ops: keeping %s in 16-bit: in_features=%d is not a multiple of %d", describe(module),
                 module.in_features, W4A16_GROUP)
        return module
    return quantize_weight_only(module)
