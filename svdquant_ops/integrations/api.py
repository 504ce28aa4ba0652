"""The explicit entry points: ``prepare_model``, ``calibrate`` and ``quantize_model`` (prepare, quantize, summary)."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quantize.calibration import check_storage, record_inputs
from ..quantize.config import SVDQuantConfig
from ..quantize.decompose import check_layer_weight
from ..quantize.handler import check_config_device
from ..quantize.selection import ALREADY_QUANTIZED, KEEP, SVDQUANT, decide
from ..ops import install_compile_pass
from ..quantize.sharing import share_inputs
from ..quantize.structure import describe, weight_only_reason
from ..storage import SVDQuantTensor, W4A16Tensor
from ..storage.base import distinct_nbytes
from .diffusers import attach_to_diffusers, prepare_model

log = logging.getLogger("svdquant_ops")


def model_nbytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers: quantized weights by their parts (not their logical 16-bit size),
    torchao's subclasses by their inner tensors, shared parts once (``storage.base.distinct_nbytes``)."""
    return distinct_nbytes([*module.parameters(), *module.buffers()])


@dataclass
class QuantizeSummary:
    """What ``quantize_model`` did: linears quantized with SVDQuant, linears with 4-bit weights only (name ->
    reason), linears kept in 16-bit (name -> reason), bytes of all parameters and buffers before and after."""

    quantized: list[str] = field(default_factory=list)
    weight_only: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def kept_reasons(self) -> str:
        """How many linears were kept for each reason, most frequent first ("8 embedder, 1 final projection")."""
        return _counts(self.kept)

    def __str__(self) -> str:
        why, wo = self.kept_reasons(), _counts(self.weight_only)
        return (f"{len(self.quantized)} linears SVDQuant, {len(self.weight_only)} 4-bit weight-only"
                f"{' (' + wo + ')' if wo else ''}, {len(self.kept)} kept in 16-bit"
                f"{' (' + why + ')' if why else ''}; weights {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB" + (f" ({self.ratio:.2f}x)" if self.bytes_before else ""))


def _counts(reasons: dict[str, str]) -> str:
    counts = Counter(reasons.values())
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# Options that change how a linear is quantized (not which linears are, nor where the algorithm runs)
_WEIGHT_OPTIONS = ("rank", "svd", "calibration", "smooth_grid", "lowrank_iters", "gptq", "gptq_damp", "gptq_block",
                   "gptq_act_order", "refit_after_gptq", "act_unsigned", "nvfp4_per_channel_scale", "seed")


def _warn_kept_weights(model: nn.Module, config: SVDQuantConfig, previous: SVDQuantConfig | None) -> None:
    """A second ``quantize_model`` that quantizes more linears leaves those already quantized as they are: say so
    where the options that made them (``previous``, see ``_previous_config``) differ from this call's."""
    quantized = sum(isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor) for m in model.modules())
    if previous is None or not quantized:
        return
    changed = [f"{k}={getattr(config, k)!r} (was {getattr(previous, k)!r})" for k in _WEIGHT_OPTIONS
               if getattr(config, k) != getattr(previous, k)]
    if changed:
        warnings.warn(f"quantize_model: {quantized} linears are already quantized and keep their weights; "
                      f"{', '.join(changed)} applies only to the linears still in 16-bit. Load the 16-bit model "
                      f"again to quantize all of it with these options", stacklevel=3)


def _previous_config(model: nn.Module) -> SVDQuantConfig | None:
    """The config the first ``quantize_model`` of ``model`` used (``_svdquant_config``); for a diffusers model loaded
    back with ``from_pretrained``, the config of the ``quantize_model`` call that preceded its save."""
    recorded = getattr(model, "_svdquant_config", None)
    if recorded is None:  # a diffusers model loaded back: its quantization_config holds the config
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        recorded = getattr(qc, "quant_type", None)
    return recorded if isinstance(recorded, SVDQuantConfig) else None


def quantize_model(model: nn.Module, config: SVDQuantConfig | None = None, **options) -> QuantizeSummary:
    """Quantize every eligible linear of ``model`` in place with SVDQuant, applying the model family's skip rules.

    ``config`` defaults to ``SVDQuantConfig(**options)``; passing both is an error. Uses what ``calibrate`` recorded
    where present (calibrated algorithm), data-free elsewhere. Linears that read the same input then share λ and
    one down projection (``share_inputs``), and Inductor gets the pass that merges their activation quantization
    (``ops.install_compile_pass``, chained after any pass already installed). Returns (and logs) the summary. A
    diffusers model can then be saved with ``model.save_pretrained(dir)`` and loaded with ``from_pretrained(dir)``."""
    from torchao.quantization import quantize_

    if config is None:
        config = SVDQuantConfig(**options)
    elif options:
        raise TypeError(f"quantize_model: pass either config or options, not both (got options {sorted(options)})")
    if not isinstance(config, SVDQuantConfig):
        raise TypeError(f"quantize_model: config must be an SVDQuantConfig, got {type(config).__name__}")
    prepare_model(model)
    other = next((m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor)
                  and m.weight.precision != config.precision), None)
    if other is not None:  # quantize_ leaves a quantized linear alone: the model would not be what config says
        raise ValueError(f"quantize_model: the model is already quantized with precision {other.weight.precision!r} "
                         f"({describe(other)}), and quantizing again leaves those weights as they are; load the "
                         f"16-bit model again to quantize it with precision {config.precision!r}")
    previous = _previous_config(model)  # before this call's attach_to_diffusers records its own
    summary = QuantizeSummary(bytes_before=model_nbytes(model))
    reasons = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            d = decide(module, config)
            if d.reason != ALREADY_QUANTIZED:  # already 4-bit: counted by its weight below
                reasons[module] = d
            # every weight quantize_ will replace is checked before any is: a NaN in the last layer must not leave
            # the model half quantized (torchao's quantize_ skips NonDynamicallyQuantizableLinear, and so do we)
            if d.action != KEEP and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
                check_layer_weight(module.weight, describe(module))
    if any(d.action == SVDQUANT for d in reasons.values()):
        _warn_kept_weights(model, config, previous)
        check_config_device(config)  # where the algorithm runs: before the weight-only layers (first) are replaced
    with torch.no_grad():
        quantize_(model, config)
    share_inputs(model)  # one λ and one down projection per input: one quantize_act per input at run time
    install_compile_pass()  # and under torch.compile, where Inductor does not merge custom ops by itself
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        d = reasons.get(m)
        if isinstance(m.weight, SVDQuantTensor):
            summary.quantized.append(describe(m))
        elif isinstance(m.weight, W4A16Tensor):
            summary.weight_only[describe(m)] = d.reason if d is not None else (weight_only_reason(m) or "weight-only")
        elif d is not None and d.action == KEEP:
            summary.kept[describe(m)] = d.reason
        else:  # e.g. torchao's quantize_ filter leaves NonDynamicallyQuantizableLinear alone
            summary.kept[describe(m)] = "left unchanged by torchao's quantize_ filter"
    summary.bytes_after = model_nbytes(model)
    if summary.bytes_after > summary.bytes_before:
        warnings.warn(f"quantize_model: the quantized weights take more memory than the 16-bit ones "
                      f"({summary.bytes_before} -> {summary.bytes_after} bytes, {summary.ratio:.2f}x): the linears "
                      f"are too small for 4-bit codes plus a rank-{config.rank} branch to pay", stacklevel=2)
    attach_to_diffusers(model, config, list(summary.kept))  # model.save_pretrained then writes a quantized model
    if previous is None:  # the first call's options: what the quantized linears were made with
        object.__setattr__(model, "_svdquant_config", config)
    log.info("svdquant_ops: %s", summary)
    return summary


def calibrate(model: nn.Module, *, max_rows: int = 4096, storage: str = "auto", seed: int = 0,
              hessian: bool = False):
    """Prepare ``model`` (``prepare_model``) and record calibration statistics of every linear input while the
    block runs; ``quantize_model`` / ``quantize_`` then use them. Arguments: ``quantize.calibration.record_inputs``;
    ``storage`` (where the sampled rows live) is "auto" (each input's device), "cpu", or a CUDA device ("cuda",
    "cuda:1"), checked here, at the call: an unknown name, or a CUDA device this machine does not have, is a
    ValueError before any forward runs. Use as ``with calibrate(model): model(...)``.
    """
    check_storage(storage, "calibrate")
    return _calibrating(model, max_rows=max_rows, storage=storage, seed=seed, hessian=hessian)


@contextmanager
def _calibrating(model: nn.Module, **options):
    """``calibrate``'s context, once its arguments are checked."""
    prepare_model(model)
    with record_inputs(model, **options) as session:
        yield session
