"""The torchao handler of ``SVDQuantConfig``: ``quantize_(model, SVDQuantConfig())`` calls ``transform`` once per
linear.

It swaps only the ``weight`` of each linear that ``selection.decide`` picks, for an :class:`SVDQuantTensor` (or, for
the linears the model family marks weight-only, a ``W4A16Tensor``: ``weight_only.py``) and returns the same module (diffusers' loading path calls ``quantize_`` with each bare linear as the root and ignores
a returned replacement). Where ``calibrate(model)`` recorded data for a layer, the calibrated algorithm
(``solve.solve_group``) runs for its whole shared-input group; everywhere else the layer is quantized data-free
(λ = 1, truncated SVD, RTN residual: ``decompose``).
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ..formats import ACT_SHIFT, INT4
from ..ops.devices import check_device_arg
from ..storage import PackedWeight, SVDQuantTensor
from .calibration import RECORD_ATTR, SESSION_ATTR, InputRecord, forget_calibration
from .config import SVDQuantConfig
from .decompose import check_layer_weight, decompose, quantize_weight
from .selection import ALREADY_QUANTIZED, KEEP, SVDQUANT, WEIGHT_ONLY, decide, unapplied_rules
from .solve import _member_parts, solve_group
from .structure import CALIBRATED_GROUP_ATTR, branch_group, branch_key, describe, gelu_fed
from .weight_only import quantize_weight_only

log = logging.getLogger("svdquant_ops")
_warned_configs: list[weakref.ref] = []  # configs whose "rules unknown" warning was given (unhashable dataclasses)


def _warn_once(config: SVDQuantConfig, module: nn.Module, lost: list[str]) -> None:
    _warned_configs[:] = [r for r in _warned_configs if r() is not None]
    if any(r() is config for r in _warned_configs):
        return
    _warned_configs.append(weakref.ref(config))
    log.warning("svdquant_ops: quantize_ got %s from a model that svdquant_ops did not prepare, so %s cannot apply. "
                "Use svdquant_ops.quantize_model(model, config) instead (or call svdquant_ops.prepare_model(model) "
                "before quantize_).", describe(module), " and ".join(lost))


def transform(module: nn.Module, config: SVDQuantConfig, *, parameter_name: str = "weight") -> nn.Module:
    """Quantize ``module.weight`` in place (or keep it, logging why); registered for ``SVDQuantConfig`` in config.py."""
    if not isinstance(module, nn.Linear) or parameter_name != "weight":
        raise TypeError(f"SVDQuantConfig applies to the weight of nn.Linear modules, got {type(module).__name__}."
                        f"{parameter_name}")
    lost = unapplied_rules(module, config)
    if lost:
        _warn_once(config, module, lost)
    decision = decide(module, config)
    if decision.action == KEEP:
        if decision.reason != ALREADY_QUANTIZED:  # quantizing twice is a no-op
            log.info("svdquant_ops: keeping %s in 16-bit: %s", describe(module), decision.reason)
            forget_calibration(module)
        return module
    if decision.action == WEIGHT_ONLY:
        log.info("svdquant_ops: giving %s 4-bit weights only (w4a16): %s", describe(module), decision.reason)
        forget_calibration(module)
        return quantize_weight_only(module)
    check_layer_weight(module.weight.detach(), describe(module))
    rank = min(config.rank, module.in_features, module.out_features)
    if rank < config.rank:
        log.info("svdquant_ops: %s uses rank %d (min(in_features, out_features) < %d)", describe(module), rank,
                 config.rank)
    weight = quantize_linear(module, config, rank)
    module.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        module.bias.requires_grad_(False)  # no autograd through the inference ops (and compile needs it)
    return module


def check_config_device(config) -> None:
    """SVDQuantConfig.device names a device this machine has (else torch's bare "not compiled with CUDA" mid-way)."""
    if config.device is not None:
        check_device_arg(config.device, "SVDQuantConfig.device", hint=" (leave device unset, or use 'cpu')")


def _solve_device(config, weight: torch.Tensor) -> torch.device:
    if config.device is not None:
        check_config_device(config)
        return torch.device(config.device)
    return torch.device("cuda") if torch.cuda.is_available() else weight.device


def _unsigned_for(module: nn.Module, config, rec: InputRecord | None) -> bool:
    # Unsigned activations exist only in INT4 (nvfp4 has none; w4a8's 8 bits cover GELU's negative tail).
    if config.precision != INT4 or config.act_unsigned is False:
        return False
    if config.act_unsigned is True:
        return True
    if not gelu_fed(module):  # "auto": only inputs produced by a GELU
        return False
    if rec is not None and rec.minimum is not None and float(rec.minimum) < -ACT_SHIFT:
        log.info("svdquant_ops: %s follows a GELU but saw inputs below -%g; using signed INT4", describe(module),
                 ACT_SHIFT)
        return False
    return True


def _data_free(module: nn.Linear, config, rank: int, unsigned: bool) -> SVDQuantTensor:
    qt = _data_free_branch(module, config, rank)
    if qt is not None:
        return qt
    weight = module.weight.detach()
    qt = quantize_weight(weight.to(_solve_device(config, weight)), config.precision, rank, svd=config.svd,
                         act_unsigned=unsigned, per_channel_global=config.nvfp4_per_channel_scale, seed=config.seed)
    return qt.to(weight.device)


def _stack_with(module: nn.Linear, config) -> list:
    """The linears sharing ``module``'s branch key that the data-free path decomposes with it (one SVD of the
    row-stacked weights, as the calibrated path does): still 16-bit, picked for SVDQuant by ``config``, same input
    width and dtype, not waiting for a calibrated solve."""
    group = branch_group(module)
    if group is None or module not in group.members:
        return [module]
    out = []
    for m in group.members:
        if m is module:
            out.append(m)
            continue
        if (not isinstance(m, nn.Linear) or isinstance(m.weight, PackedWeight) or m in group.solved
                or m.in_features != module.in_features or m.weight.dtype != module.weight.dtype
                or decide(m, config).action != SVDQUANT):
            continue
        rec = getattr(m, RECORD_ATTR, None)
        if rec is not None and config.calibration != "off" and rec.seen_rows > 0 and rec.rows is not None:
            continue  # quantized by its calibrated group
        out.append(m)
    return out


def _data_free_branch(module: nn.Linear, config, rank: int) -> SVDQuantTensor | None:
    """Data-free q/k/v: one decomposition of the stacked weights, shared down projection; results of the other
    members are kept on the group until the handler reaches them. None when ``module`` has no branch group."""
    group = branch_group(module)
    if group is None:
        return None
    if module in group.solved:
        qt = group.solved.pop(module)
        if group.solved_config == config:
            return qt
        # solved with another member's config: quantize this one alone
    members = _stack_with(module, config)
    if len(members) < 2:
        return None
    r = min([rank] + [min(m.in_features, m.out_features) for m in members])
    unsigned = all(_unsigned_for(m, config, None) for m in members)
    w0 = module.weight.detach()
    device = _solve_device(config, w0)
    stacked = torch.cat([m.weight.detach().to(device) for m in members])
    parts = decompose(stacked, precision=config.precision, rank=r, svd=config.svd, act_unsigned=unsigned,
                      per_channel_global=config.nvfp4_per_channel_scale, dtype=w0.dtype, seed=config.seed)
    split = _member_parts(None, parts, [m.out_features for m in members])
    group.solved_config = config
    for m, p in zip(members, split):
        qt = SVDQuantTensor.from_parts(p, w0.dtype).to(m.weight.device)
        if m is module:
            mine = qt
        else:
            group.solved[m] = qt
    log.info("svdquant_ops: %s: data-free, one rank-%d decomposition of %d stacked weights", group.key, r,
             len(members))
    return mine


def _solve_record(rec: InputRecord, config, rank: int) -> None:
    # Only the members that get SVDQuant share the solve (λ, branch): a weight-only or 16-bit linear reading the
    # same input (an AdaLN beside an MLP) takes no part in it.
    members = [m for m in rec.members if isinstance(m.weight, SVDQuantTensor) or decide(m, config).action == SVDQUANT]
    w0 = members[0].weight
    device = _solve_device(config, w0)
    dtype = w0.dtype
    for m in members:
        if isinstance(m.weight, PackedWeight):
            raise ValueError(f"svdquant_ops: {describe(m)} is already quantized but shares its input with "
                             f"{rec.name}; quantize the whole group at once")
    r = min([rank] + [min(m.in_features, m.out_features) for m in members])
    unsigned = all(_unsigned_for(m, config, rec) for m in members)
    stats: dict = {}
    with torch.no_grad():
        parts = solve_group([m.weight.detach().to(device) for m in members], rec.rows.to(device),
                            rec.absmax.to(device), config, rank=r, dtype=dtype, unsigned=unsigned,
                            branch_keys=[branch_key(m) for m in members], input_stats=rec.input_stats(),
                            stats=stats, name=rec.name)
    for m, p in zip(members, parts):
        rec.solved[m] = SVDQuantTensor.from_parts(p, dtype).to(m.weight.device)
        object.__setattr__(m, CALIBRATED_GROUP_ATTR, f"calibrated:{rec.name}")  # one λ: sharing.share_inputs
    rec.solved_config = config
    log.info("svdquant_ops: %s: %d rows, rank %d, %s%s, SQNR %.1f dB on calibration rows", rec.name,
             rec.rows.shape[0], r, config.precision, " unsigned" if unsigned else "", stats["sqnr_db"])
    rec.release()
    rec.session.group_done(rec, config)


def quantize_linear(module: nn.Linear, config, rank: int) -> SVDQuantTensor:
    """Quantize one linear: calibrated where ``calibrate`` recorded its input, data-free otherwise."""
    name = describe(module)
    rec: InputRecord | None = getattr(module, RECORD_ATTR, None)
    watched = getattr(module, SESSION_ATTR, None) is not None  # calibrate() ran over this layer
    if config.calibration == "off":
        rec = None
    if rec is not None and module in rec.solved:  # solved with the rest of its shared-input group
        if rec.solved_config != config:
            raise ValueError(f"svdquant_ops: {name} shares its input (and λ) with {rec.name}, which was quantized "
                             "with a different SVDQuantConfig; give every member of a shared-input group the same "
                             "config")
        return _take(module, rec)
    if rec is not None and rec.in_features != module.in_features:
        raise ValueError(f"svdquant_ops: {name}: recorded inputs have {rec.in_features} features but the layer has "
                         f"{module.in_features} (the model changed after calibrate())")
    usable = rec is not None and rec.seen_rows > 0 and rec.rows is not None
    if rec is not None and rec.nonfinite:
        if config.calibration == "required":
            raise ValueError(f"svdquant_ops: {rec.name}: recorded calibration inputs contain NaN or Inf")
        log.warning("svdquant_ops: %s: recorded calibration inputs contain NaN or Inf; quantizing data-free",
                    rec.name)
        usable = False
    if not usable:
        if config.calibration == "required":
            raise ValueError(f"svdquant_ops: {name}: SVDQuantConfig(calibration='required') but calibrate() "
                             "recorded no input for this layer (run the model inside `with calibrate(model):`)")
        if config.calibration != "off" and watched and not (rec is not None and rec.nonfinite):
            log.info("svdquant_ops: %s never saw calibration data; quantizing data-free", name)
        with torch.no_grad():
            qt = _data_free(module, config, rank, _unsigned_for(module, config, None))
        forget_calibration(module)
        return qt
    _solve_record(rec, config, rank)
    return _take(module, rec)


def _take(module: nn.Module, rec: InputRecord) -> SVDQuantTensor:
    qt = rec.solved.pop(module)
    forget_calibration(module)
    return qt
