"""``share_inputs(model)``: linears that read the same tensor get one λ and one down projection, so that the
forward runs one ``svdquant::quantize_act`` per input (the ops' eager cache and compile pass merge the calls whose
``smooth`` and ``proj_down`` are the same tensors; ``svdquant_ops.ops``).

For each input group (``structure.input_group``: the group calibration solved together, else the model family's
structural group recorded by ``prepare_model``) whose quantized members agree on precision, act_unsigned, dtype,
device and λ values, every member gets

* the very same ``smooth`` tensor object (``nn.Parameter`` keeps it: ``PackedWeight``'s detach), which
  torch.compile makes one graph input for the whole group,
* the very same ``proj_down`` object: the concatenation along the rank of the group's distinct down projections (q/k/v
  share one; a FLUX single block's MLP-in projection has its own: [pd_qkv | pd_mlp]),
* a ``proj_up`` [N, R_total] with its own branch's columns in place and zeros elsewhere.

The result is exact: the extra columns of ``x @ proj_down`` meet zero columns of ``proj_up``, and adding exact
zeros in fp32 changes nothing. No field or layout changes, so checkpoints are written as before (the shared tensors
are written once per member; a loaded model has separate copies with equal values, and calling ``share_inputs``
on it shares them again: distinct down projections are found by value, ``torch.equal``). An in-place
``load_state_dict`` into a shared model writes a shared tensor only when the checkpoint gives all its holders the same
values; a member whose part differs gets its own copy (the hooks at the end of this module).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..storage import SVDQuantTensor
from ..storage.shared_moves import LOAD_IN_PLACE, mark_shared
from .structure import describe, input_group

log = logging.getLogger("svdquant_ops")
_LOAD_HOOKS = "_svdquant_load_hooks"  # set on a model once share_inputs registered its load hooks


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor object (torch.compile makes it one graph input); views of one memory are not enough."""
    return a is b


def _compatible(a: SVDQuantTensor, b: SVDQuantTensor) -> bool:
    return (a.precision == b.precision and a.act_unsigned == b.act_unsigned and a.dtype == b.dtype
            and a.device == b.device and a.shape[1] == b.shape[1] and a.layout_version == b.layout_version
            and a.proj_down.dtype == b.proj_down.dtype and (_same(a.smooth, b.smooth) or torch.equal(a.smooth, b.smooth)))


def _share(members: list[nn.Linear]) -> bool:
    weights = [m.weight for m in members]
    downs: list[torch.Tensor] = []  # distinct down projections, by value
    which = []
    for w in weights:
        j = next((i for i, d in enumerate(downs) if _same(d, w.proj_down) or (d.shape == w.proj_down.shape
                                                                          and torch.equal(d, w.proj_down))), None)
        if j is None:
            downs.append(w.proj_down)
            j = len(downs) - 1
        which.append(j)
    smooth = weights[0].smooth
    proj_down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=1).contiguous()
    for t in (smooth, proj_down):
        mark_shared(t)  # also when already shared: an unpickled model keeps the objects but not always the marks
    if len(downs) == 1 and all(_same(w.proj_down, proj_down) and _same(w.smooth, smooth) for w in weights):
        return False  # already shared
    offsets = [0]
    for d in downs:
        offsets.append(offsets[-1] + d.shape[1])
    total = offsets[-1]
    for m, w, j in zip(members, weights, which):
        up = w.proj_up
        if up.shape[1] != total:
            padded = torch.zeros(up.shape[0], total, dtype=up.dtype, device=up.device)
            padded[:, offsets[j]:offsets[j + 1]] = up
            up = padded
        qt = SVDQuantTensor(w.codes, w.scales, smooth, proj_down, up, w.precision, w.act_unsigned,
                            w.layout_version, w.dtype, global_scale=w.global_scale,
                            bias_correction=w.bias_correction)
        m.weight = nn.Parameter(qt, requires_grad=False)
    return True


@torch.no_grad()
def share_inputs(model: nn.Module) -> int:
    """Give the quantized linears of each input group of ``model`` one λ tensor and one concatenated down
    projection (see the module docstring). Needs the groups recorded (``prepare_model``, which ``quantize_model``
    runs; or a calibrated solve). Members that cannot share (λ values, precision, dtype differ) are left alone,
    logged at INFO. Idempotent. Returns the number of groups changed."""
    groups: dict[str, list[nn.Linear]] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor):
            key = input_group(m)
            if key is not None:
                groups.setdefault(key, []).append(m)
    if groups and not getattr(model, _LOAD_HOOKS, False):
        model.register_load_state_dict_pre_hook(_allow_in_place)
        model.register_load_state_dict_post_hook(_end_load)
        setattr(model, _LOAD_HOOKS, True)
    changed = 0
    for key, members in groups.items():
        clusters: list[list[nn.Linear]] = []
        for m in members:
            c = next((c for c in clusters if _compatible(c[0].weight, m.weight)), None)
            if c is None:
                clusters.append([m])
            else:
                c.append(m)
        if len(clusters) > 1:
            log.info("svdquant_ops: input group %s: %s cannot share λ and the down projection (λ values, "
                     "precision, act_unsigned or dtype differ); sharing within %d subsets", key,
                     " / ".join(",".join(describe(m) for m in c) for c in clusters), len(clusters))
        for c in clusters:
            if len(c) > 1 and _share(c):
                changed += 1
    return changed


# An in-place load_state_dict writes a shared part only when the load gives every holder of it the same values:
# otherwise the values would reach every member. The model share_inputs ran on checks that before its children load
# (a pre-hook sees the whole state dict) and lets PackedWeight's copy_ write such parts in place (LOAD_IN_PLACE,
# cleared after the load); any other differing part, and every load into a single member, gives that member its own
# copy instead.
def _shared_parts(module: nn.Module):
    """(module name, field, part) for every part of a quantized linear's weight that may be shared."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor):
            for field in m.weight.shared_fields:
                yield name, field, getattr(m.weight, field)


def _allow_in_place(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    holders: dict[int, tuple[torch.Tensor, str, list[str]]] = {}
    for name, field, t in _shared_parts(module):
        holders.setdefault(id(t), (t, field, []))[2].append(f"{prefix}{name + '.' if name else ''}weight")
    for t, field, keys in holders.values():
        incoming = [state_dict.get(k) for k in keys]
        if len(keys) < 2 or not all(isinstance(w, SVDQuantTensor) for w in incoming):
            continue
        parts = [getattr(w, field) for w in incoming]
        if (all(p.shape == t.shape and p.dtype == t.dtype for p in parts)
                and all(torch.equal(parts[0], p.to(parts[0].device)) for p in parts[1:])):
            setattr(t, LOAD_IN_PLACE, True)


def _end_load(module: nn.Module, incompatible_keys) -> None:
    for _, _, t in _shared_parts(module):
        if getattr(t, LOAD_IN_PLACE, False):
            delattr(t, LOAD_IN_PLACE)
