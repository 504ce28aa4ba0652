"""SVDQuantConfig and its torchao handler: ``quantize_(model, SVDQuantConfig())``.

The handler swaps only the ``weight`` of each eligible ``nn.Linear`` for an :class:`SVDQuantTensor` and returns
the same module (diffusers' loading path calls ``quantize_`` with each bare linear as the root and ignores a
returned replacement). Where ``calibrate(model)`` recorded data for a layer, the calibrated algorithm runs;
everywhere else the layer is quantized data-free (λ = 1, truncated SVD, RTN residual).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .formats import FLOAT_DTYPES, GROUP_SIZE, PRECISIONS
from .quantize.lowrank import SVD_METHODS
from .tensor import SVDQuantTensor

log = logging.getLogger("svdquant_ops")

# Layers the reference keeps in 16-bit for diffusion transformers: embedders, AdaLN modulation linears (they see
# one token, so 4-bit activations buy nothing and cost accuracy) and the final projection.
DEFAULT_SKIP = ["*embed*", "*norm*.linear", "norm_out.*", "proj_out"]

# Set on modules by calibrate() (and name_modules()) so the handler, which torchao calls without names, knows them.
FQN_ATTR = "_svdquant_fqn"


@dataclass
class SVDQuantConfig(AOBaseConfig):
    """Configuration of SVDQuant W4A4 quantization.

    Args:
        precision: "int4" (groups of 64, default) or "nvfp4" (groups of 16, fp8 scales).
        rank: rank of the 16-bit low-rank branch (32). Ranks are zero-padded to a multiple of 16 in storage.
        skip: fnmatch patterns over module names kept in 16-bit. Names are known to the handler for modules that
            ``calibrate()`` or ``name_modules()`` has seen, and to ``filter_fn()``; see ``skip_filter``.
        svd: "exact" (torch.linalg.svd) or "lowrank" (randomized torch.svd_lowrank, much faster on big layers).
        nvfp4_per_channel_scale: NVFP4 weights get a per-output-channel fp32 scale instead of a per-tensor one.
    """

    precision: str = "int4"
    rank: int = 32
    skip: list = field(default_factory=lambda: list(DEFAULT_SKIP))
    svd: str = "exact"
    nvfp4_per_channel_scale: bool = False
    version: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"SVDQuantConfig.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"SVDQuantConfig.rank must be an integer >= 0, got {self.rank!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"SVDQuantConfig.svd must be one of {list(SVD_METHODS)}, got {self.svd!r}")
        if not isinstance(self.skip, list) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"SVDQuantConfig.skip must be a list of fnmatch patterns (str), got {self.skip!r}")

    def skips(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, p) for p in self.skip)

    def filter_fn(self, module: nn.Module, fqn: str) -> bool:
        """A ``quantize_`` filter: linear layers whose name matches no ``skip`` pattern."""
        return isinstance(module, nn.Linear) and not self.skips(fqn)


def name_modules(model: nn.Module) -> nn.Module:
    """Record each submodule's name on it, so the handler can apply ``SVDQuantConfig.skip`` by name."""
    for fqn, m in model.named_modules():
        setattr(m, FQN_ATTR, fqn)
    return model


def _describe(module: nn.Module) -> str:
    fqn = getattr(module, FQN_ATTR, None)
    return fqn if fqn is not None else f"{type(module).__name__}({module.in_features}->{module.out_features})"


@register_quantize_module_handler(SVDQuantConfig)
def _svdquant_transform(module: nn.Module, config: SVDQuantConfig, *, parameter_name: str = "weight") -> nn.Module:
    if not isinstance(module, nn.Linear) or parameter_name != "weight":
        raise TypeError(f"SVDQuantConfig applies to the weight of nn.Linear modules, got {type(module).__name__}."
                        f"{parameter_name}")
    weight = module.weight
    if isinstance(weight, SVDQuantTensor):  # idempotent: already quantized
        return module
    fqn = getattr(module, FQN_ATTR, None)
    if fqn is not None and config.skips(fqn):
        log.info("svdquant_ops: keeping %s in 16-bit (matches SVDQuantConfig.skip)", fqn)
        return module
    gs = GROUP_SIZE[config.precision]
    if module.in_features % gs:
        log.info("svdquant_ops: keeping %s in 16-bit: in_features=%d is not a multiple of %d (%s group size)",
                 _describe(module), module.in_features, gs, config.precision)
        return module
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"svdquant_ops: {_describe(module)} has weight dtype {weight.dtype}; expected one of "
                        f"{[str(d) for d in FLOAT_DTYPES]}")
    rank = min(config.rank, module.in_features, module.out_features)
    if rank < config.rank:
        log.info("svdquant_ops: %s uses rank %d (min(in_features, out_features) < %d)", _describe(module), rank,
                 config.rank)
    from .quantize.solve import quantize_linear  # calibrated when calibrate() recorded data for this module

    qweight = quantize_linear(module, config, rank)
    module.weight = nn.Parameter(qweight, requires_grad=False)
    if module.bias is not None:
        module.bias.requires_grad_(False)  # no autograd through the inference ops (and compile needs it)
    return module


def quantized_weight(module: nn.Module) -> SVDQuantTensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, SVDQuantTensor) else None
