"""The one rule for what happens to each linear, used by the handler, the calibration progress bar and the
``quantize_model`` summary, so the three can never disagree: SVDQuant, 4-bit weight-only, or kept in 16-bit."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..formats import GROUP_SIZE, W4A16, W4A16_GROUP
from ..storage import PackedWeight
from .structure import keep_reason, module_name, prepared, weight_only_reason

ALREADY_QUANTIZED = "already quantized"
SVDQUANT = "svdquant"  # actions
WEIGHT_ONLY = W4A16
KEEP = "keep"


@dataclass(frozen=True)
class Decision:
    action: str  # SVDQUANT, WEIGHT_ONLY or KEEP
    reason: str = ""  # why the layer is weight-only or kept (empty for SVDQuant)


def matching_pattern(name: str | None, patterns: list[str]) -> str | None:
    if name is None:
        return None
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def decide(module: nn.Module, config) -> Decision:
    """What ``config`` (an ``SVDQuantConfig``) does to ``module``, and why.

    Order: not a linear; already quantized; an empty weight; with ``skip=None`` the role the model family's
    ``prepare_model`` recorded (kept in 16-bit, or 4-bit weight-only unless ``config.weight_only`` is None), with a
    ``skip`` list its patterns; ``in_features`` not a multiple of the group size."""
    if not isinstance(module, nn.Linear):
        return Decision(KEEP, "not an nn.Linear")
    if isinstance(module.weight, PackedWeight):
        return Decision(KEEP, ALREADY_QUANTIZED)
    if module.in_features == 0 or module.out_features == 0:  # nothing to quantize, and the kernels need rows
        return Decision(KEEP, f"empty weight ({module.out_features} x {module.in_features})")
    if config.skip is None:
        reason = keep_reason(module)
        if reason:
            return Decision(KEEP, reason)
        reason = weight_only_reason(module)
        if reason:
            if config.weight_only is None:
                return Decision(KEEP, f"{reason} (SVDQuantConfig.weight_only=None)")
            if module.in_features % W4A16_GROUP:
                return Decision(KEEP, f"{reason}; in_features={module.in_features} is not a multiple of "
                                      f"{W4A16_GROUP} (the w4a16 group size)")
            return Decision(WEIGHT_ONLY, reason)
    else:
        pattern = matching_pattern(module_name(module), config.skip)
        if pattern is not None:
            return Decision(KEEP, f"matches SVDQuantConfig.skip pattern {pattern!r}")
    gs = GROUP_SIZE[config.precision]
    if module.in_features % gs:
        return Decision(KEEP, f"in_features={module.in_features} is not a multiple of {gs} (the "
                              f"{config.precision} group size)")
    return Decision(SVDQUANT)


def unapplied_rules(module: nn.Module, config) -> list[str]:
    """The structure rules ``config`` relies on that could not apply to ``module`` (empty when all did): the family's
    rules and GELU detection need a prepared model; skip patterns need the module's name."""
    lost = []
    if config.skip is None and not prepared(module):
        lost.append("the model family's rules (embedders and final projection stay 16-bit, AdaLN modulation "
                    "4-bit weight-only)")
    elif config.skip and module_name(module) is None:
        lost.append(f"the skip patterns {config.skip} (module names are unknown)")
    if config.precision == "int4" and config.act_unsigned == "auto" and not prepared(module):
        lost.append("the unsigned INT4 of GELU-fed layers")
    return lost
