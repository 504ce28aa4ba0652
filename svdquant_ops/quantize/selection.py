"""The one rule for which linears get quantized, used by the handler, the calibration progress bar and the
``quantize_model`` summary, so the three can never disagree."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..formats import GROUP_SIZE
from ..storage import SVDQuantTensor
from .structure import keep_reason, module_name, prepared

ALREADY_QUANTIZED = "already quantized"


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str = ""  # why the layer stays as it is (empty when it is quantized)


def matching_pattern(name: str | None, patterns: list[str]) -> str | None:
    if name is None:
        return None
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def decide(module: nn.Module, config) -> Decision:
    """Quantize ``module`` with ``config`` (an ``SVDQuantConfig``), or keep it and say why.

    Order: not a linear; already quantized; kept by name (``config.skip`` patterns, or with ``skip=None`` the
    reason the model family's ``prepare_model`` recorded); ``in_features`` not a multiple of the group size."""
    if not isinstance(module, nn.Linear):
        return Decision(False, "not an nn.Linear")
    if isinstance(module.weight, SVDQuantTensor):
        return Decision(False, ALREADY_QUANTIZED)
    if config.skip is None:
        reason = keep_reason(module)
        if reason:
            return Decision(False, reason)
    else:
        pattern = matching_pattern(module_name(module), config.skip)
        if pattern is not None:
            return Decision(False, f"matches SVDQuantConfig.skip pattern {pattern!r}")
    gs = GROUP_SIZE[config.precision]
    if module.in_features % gs:
        return Decision(False, f"in_features={module.in_features} is not a multiple of {gs} (the "
                               f"{config.precision} group size)")
    return Decision(True)


def unapplied_rules(module: nn.Module, config) -> list[str]:
    """The structure rules ``config`` relies on that could not apply to ``module`` (empty when all did): the family's
    skip rules and GELU detection need a prepared model; skip patterns need the module's name."""
    lost = []
    if config.skip is None and not prepared(module):
        lost.append("the model family's skip rules (embedders, AdaLN modulation and final projection stay 16-bit)")
    elif config.skip and module_name(module) is None:
        lost.append(f"the skip patterns {config.skip} (module names are unknown)")
    if config.precision == "int4" and config.act_unsigned == "auto" and not prepared(module):
        lost.append("the unsigned INT4 of GELU-fed layers")
    return lost
