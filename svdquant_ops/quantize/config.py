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

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .formats import FLOAT_DTYPES, GROUP_SIZE, PRECISIONS
from .quantize.calibration import forget_calibration
from .quantize.lowrank import SVD_METHODS
from .quantize.structure import annotate, describe, module_name
from .tensor import SVDQuantTensor

log = logging.getLogger("svdquant_ops")

# Layers the reference keeps in 16-bit for diffusion transformers: embedders, AdaLN modulation linears (they see
# one token, so 4-bit activations buy nothing and cost accuracy) and the final projection.
DEFAULT_SKIP = ["*embed*", "*norm*.linear", "norm_out.*", "proj_out"]



@dataclass
class SVDQuantConfig(AOBaseConfig):
    """Configuration of SVDQuant W4A4 (or W4A8) quantization.

    Args:
        precision: "int4" (groups of 64, default), "nvfp4" (groups of 16, fp8 scales) or "w4a8" (INT4 weights in
            groups of 64 with an fp32 per-channel scale times an integer multiplier per group, INT8 per-token
            activations; for Hopper GPUs, where one int8 GEMM over all of K beats per-group rescaling).
        rank: rank of the 16-bit low-rank branch (32). Ranks are zero-padded to a multiple of 16 in storage.
        skip: fnmatch patterns over module names kept in 16-bit. Names are known to the handler for modules that
            ``calibrate()`` or ``name_modules()`` has seen; otherwise pass ``filter_fn=config.filter_fn`` to
            ``quantize_``.
        svd: "lowrank" (seeded randomized ``torch.svd_lowrank`` in fp32, the fast default) or "exact"
            (``torch.linalg.svd``).
        nvfp4_per_channel_scale: NVFP4 weights get a per-output-channel fp32 scale instead of a per-tensor one.
        calibration: "auto" (use what ``calibrate()`` recorded where present, data-free elsewhere, logged),
            "required" (error for any layer without usable calibration data) or "off" (always data-free).
        smooth_grid: c steps of the smoothing grid: candidates (0,0), (c,0), (c,1-c) for c = 1/n..(n-1)/n;
            20 gives the reference's 39 candidates, 0 or 1 disables the search (λ = 1).
        lowrank_iters: most rounds of the iterative low-rank refit (stops at the first error increase).
        gptq: quantize the residual with GPTQ (Hessian of the smoothed inputs) instead of RTN.
        gptq_damp, gptq_block, gptq_act_order: GPTQ damping (fraction of the mean diagonal), block size, order.
        refit_after_gptq: refit the branch to the GPTQ residual; kept only where the output error drops.
        act_unsigned: "auto" (unsigned INT4 for inputs produced by a GELU, when calibration never saw a value
            below -0.171875), False, or True (every layer; inputs below -0.171875 would clamp to code 0). Only
            precision "int4" has unsigned activations: "auto" means False for "nvfp4" and "w4a8".
        device: where the algorithm runs (default: "cuda" when available, else the weight's device).
        seed: seed of the randomized SVD.
    """

    precision: str = "int4"
    rank: int = 32
    skip: list = field(default_factory=lambda: list(DEFAULT_SKIP))
    svd: str = "lowrank"
    nvfp4_per_channel_scale: bool = False
    calibration: str = "auto"
    smooth_grid: int = 20
    lowrank_iters: int = 100
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    refit_after_gptq: bool = False
    act_unsigned: object = "auto"
    device: object = None
    seed: int = 0
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
        if self.calibration not in ("auto", "required", "off"):
            raise ValueError(f"SVDQuantConfig.calibration must be 'auto', 'required' or 'off', got {self.calibration!r}")
        for name in ("smooth_grid", "lowrank_iters", "gptq_block", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "gptq_block" else 0):
                raise ValueError(f"SVDQuantConfig.{name} must be a non-negative integer, got {v!r}")
        if not 0.0 <= float(self.gptq_damp) < 1.0:
            raise ValueError(f"SVDQuantConfig.gptq_damp must be in [0, 1), got {self.gptq_damp!r}")
        if self.act_unsigned not in ("auto", True, False):
            raise ValueError(f"SVDQuantConfig.act_unsigned must be 'auto', True or False, got {self.act_unsigned!r}")
        if self.act_unsigned is True and self.precision != "int4":
            raise ValueError("SVDQuantConfig.act_unsigned=True is only defined for precision 'int4'")
        if self.device is not None:
            self.device = str(torch.device(self.device))  # validates; a string keeps the config JSON-serializable

    def skips(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, p) for p in self.skip)

    def filter_fn(self, module: nn.Module, fqn: str) -> bool:
        """A ``quantize_`` filter: linear layers whose name matches no ``skip`` pattern."""
        return isinstance(module, nn.Linear) and not self.skips(fqn)


def name_modules(model: nn.Module) -> nn.Module:
    """Record each submodule's name (and the structure facts the algorithm uses: GELU-fed inputs, q/k/v branch
    sharing) on it, so the handler can apply ``SVDQuantConfig.skip`` by name. ``calibrate`` does this too."""
    return annotate(model)


@register_quantize_module_handler(SVDQuantConfig)
def _svdquant_transform(module: nn.Module, config: SVDQuantConfig, *, parameter_name: str = "weight") -> nn.Module:
    if not isinstance(module, nn.Linear) or parameter_name != "weight":
        raise TypeError(f"SVDQuantConfig applies to the weight of nn.Linear modules, got {type(module).__name__}."
                        f"{parameter_name}")
    weight = module.weight
    if isinstance(weight, SVDQuantTensor):  # idempotent: already quantized
        return module
    fqn = module_name(module)
    if fqn is not None and config.skips(fqn):
        log.info("svdquant_ops: keeping %s in 16-bit (matches SVDQuantConfig.skip)", fqn)
        forget_calibration(module)
        return module
    gs = GROUP_SIZE[config.precision]
    if module.in_features % gs:
        log.info("svdquant_ops: keeping %s in 16-bit: in_features=%d is not a multiple of %d (%s group size)",
                 describe(module), module.in_features, gs, config.precision)
        forget_calibration(module)
        return module
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"svdquant_ops: {describe(module)} has weight dtype {weight.dtype}; expected one of "
                        f"{[str(d) for d in FLOAT_DTYPES]}")
    rank = min(config.rank, module.in_features, module.out_features)
    if rank < config.rank:
        log.info("svdquant_ops: %s uses rank %d (min(in_features, out_features) < %d)", describe(module), rank,
                 config.rank)
    from .quantize.solve import quantize_linear  # calibrated when calibrate() recorded data for this module

    qweight = quantize_linear(module, config, rank)
    module.weight = nn.Parameter(qweight, requires_grad=False)
    if module.bias is not None:
        module.bias.requires_grad_(False)  # no autograd through the inference ops (and compile needs it)
    return module

