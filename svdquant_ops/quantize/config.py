"""SVDQuantConfig: the options of SVDQuant quantization, a torchao ``AOBaseConfig``.

``quantize_(model, SVDQuantConfig())`` runs the handler in ``handler.py``; ``svdquant_ops.quantize_model(model)``
prepares the model first so that the skip rules of its model family apply (``integrations``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from ..formats import PRECISIONS
from .args import flag, fraction, integer
from .lowrank import DEFAULT_SVD, SVD_METHODS


@dataclass
class SVDQuantConfig(AOBaseConfig):
    """Configuration of SVDQuant W4A4 (or W4A8) quantization.

    Args:
        precision: "int4" (groups of 64, default), "nvfp4" (groups of 16, fp8 scales) or "w4a8" (INT4 weights in
            groups of 64 with an fp32 per-channel scale times an integer multiplier per group, INT8 per-token
            activations; for Hopper GPUs, where one int8 GEMM over all of K beats per-group rescaling).
        rank: rank of the 16-bit low-rank branch (32). Ranks are zero-padded to a multiple of 16 in storage.
        skip: which linears stay in 16-bit by name. None (default): the model family's rules, which
            ``quantize_model`` / ``prepare_model`` / ``calibrate`` record on the model (for diffusion transformers:
            embedders and the final projection stay 16-bit, AdaLN modulation linears get ``weight_only``;
            ``integrations.diffusers``). A list of fnmatch patterns over module names: exactly those stay 16-bit
            and every other eligible linear gets SVDQuant (``[]``: all of them). Without a prepared model the
            handler cannot know names or families: it warns once and gives every linear SVDQuant.
        weight_only: format of the linears the family rules mark weight-only (they see one token per sample, so
            4-bit activations buy nothing there): "w4a16" (default: 4-bit weights, 16-bit activations, exact
            dequantization) or None (keep them in 16-bit).
        svd: "lowrank" (seeded randomized ``torch.svd_lowrank`` in fp32, the default everywhere) or "exact"
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
    skip: list | None = None
    weight_only: str | None = "w4a16"
    svd: str = DEFAULT_SVD
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
        self.rank = integer(self.rank, "SVDQuantConfig.rank", 0)
        if self.svd not in SVD_METHODS:
            raise ValueError(f"SVDQuantConfig.svd must be one of {list(SVD_METHODS)}, got {self.svd!r}")
        if self.skip is not None and (not isinstance(self.skip, list) or not all(isinstance(p, str) for p in self.skip)):
            raise ValueError("SVDQuantConfig.skip must be None (the model family's rules) or a list of fnmatch "
                             f"patterns (str), got {self.skip!r}")
        if self.weight_only not in ("w4a16", None):
            raise ValueError(f"SVDQuantConfig.weight_only must be 'w4a16' or None, got {self.weight_only!r}")
        if self.calibration not in ("auto", "required", "off"):
            raise ValueError(f"SVDQuantConfig.calibration must be 'auto', 'required' or 'off', got {self.calibration!r}")
        for name in ("smooth_grid", "lowrank_iters", "gptq_block", "seed"):
            least = 1 if name == "gptq_block" else 0
            setattr(self, name, integer(getattr(self, name), f"SVDQuantConfig.{name}", least))
        for name in ("nvfp4_per_channel_scale", "gptq", "gptq_act_order", "refit_after_gptq"):
            setattr(self, name, flag(getattr(self, name), f"SVDQuantConfig.{name}"))  # a string "False" reads as True
        self.gptq_damp = fraction(self.gptq_damp, "SVDQuantConfig.gptq_damp")
        if not (isinstance(self.act_unsigned, str) and self.act_unsigned == "auto"):
            self.act_unsigned = flag(self.act_unsigned, "SVDQuantConfig.act_unsigned", "'auto', True or False")
        if self.act_unsigned is True and self.precision != "int4":
            raise ValueError("SVDQuantConfig.act_unsigned=True is only defined for precision 'int4'")
        if self.device is not None:
            self.device = str(torch.device(self.device))  # validates; a string keeps the config JSON-serializable


# torch.load(weights_only=True) of a pickled config needs the class allowlisted (config.json lookups: serialization).
torch.serialization.add_safe_globals([SVDQuantConfig, (SVDQuantConfig, "svdquant_ops.config.SVDQuantConfig")])


@register_quantize_module_handler(SVDQuantConfig)
def _transform(module: nn.Module, config: SVDQuantConfig, *, parameter_name: str = "weight") -> nn.Module:
    # The algorithm is imported on first use: loading a saved model needs this class (config.json), not the solver.
    from .handler import transform

    return transform(module, config, parameter_name=parameter_name)
