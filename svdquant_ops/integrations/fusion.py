"""``fuse_qkv(model)``: one GEMM for an attention's q, k and v, on a quantized diffusers model.

diffusers' own ``fuse_qkv_projections()`` builds ``to_qkv`` (and ``to_added_qkv`` from ``add_q/k/v_proj``) by copying
the weights into a new 16-bit ``nn.Linear``, which a quantized weight cannot go through, and it keeps ``to_q`` etc.
beside the fused copy. This does the same for SVDQuant weights without requantizing and without the extra copy: q,
k and v already read their input alike (one λ and one down projection, ``share_inputs``), so stacking their output
rows (``SVDQuantTensor.stack_rows``) gives one weight whose outputs are q, k and v side by side, the same values bit
for bit. One wide GEMM then runs where three narrow ones did (fewer tiles lost to wave quantization, one weight
expansion and one launch instead of three), and the compiled model has fewer weights to unwrap and guard on each
call. 16-bit weights are concatenated as diffusers does (for a fair 16-bit or torchao baseline, fuse before
quantizing).

The attention classes are diffusers' ``AttentionModuleMixin`` ones that fuse the standard way (the mixin's
``fuse_projections``) and whose processors read ``attn.fused_projections`` (FLUX.1 and its relatives; Wan fuses its
own way and is left alone); the others are left as they are, with the reason, in the result. A FLUX single block's
``proj_mlp`` reads the same input but is called by the block, not the attention, so it stays its own GEMM (its
quantize_act is still the one of q/k/v: ``to_qkv`` keeps the shared λ and down projection objects).

Checkpoints keep diffusers' layout: ``state_dict()`` of a fused model gives ``to_q`` / ``to_k`` / ``to_v`` entries
(rows of the fused weight, copied: a transient copy of the q/k/v weights, ~1.1 GB for FLUX.1 w4a8), so
``save_pretrained`` writes what ``from_pretrained`` of the unfused class reads, and ``load_state_dict`` stacks such
entries into ``to_qkv``. ``unfuse_qkv(model)`` (or diffusers' ``unfuse_qkv_projections()``) goes back, before loading
a LoRA, which targets ``to_q`` etc. The same layout is why accelerate's sequential offloading (``cpu_offload``,
``pipe.enable_sequential_cpu_offload()``) cannot run a fused model: it keeps the weights under their state-dict keys
and looks them up by parameter name (``to_qkv.weight``); model offloading and diffusers' group offloading move the
parameters themselves and work.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quantize import structure
from ..storage import SVDQuantTensor

log = logging.getLogger("svdquant_ops")

FUSED_ATTR = "_svdquant_fused_qkv"  # set on an attention module fuse_qkv fused
_ROOT_HOOK_ATTR = "_svdquant_fused_qkv_load_hook"
# (fused name, member names) as diffusers' AttentionModuleMixin.fuse_projections names them
PROJECTIONS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


@dataclass
class FuseSummary:
    fused: list[str] = field(default_factory=list)  # attention modules now running one GEMM for q/k/v
    skipped: dict[str, str] = field(default_factory=dict)  # attention module -> why it was left as it is

    def __str__(self) -> str:
        s = f"fused q/k/v of {len(self.fused)} attention modules"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            s += f"; left {len(self.skipped)} as they are ({'; '.join(reasons)})"
        return s


@functools.cache
def _fused_names_read(processor_cls: type) -> frozenset:
    """The fused linears (``to_qkv``, ``to_added_qkv``) a processor class's module reads when
    ``attn.fused_projections`` is set; empty if it never tests the flag. diffusers declares no such capability; the
    processors that support it test the attribute in their module's code (FLUX's ``_get_qkv_projections``), and
    those that do not would call the deleted ``to_q``."""
    module = inspect.getmodule(processor_cls)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return frozenset()
    if "attn.fused_projections" not in source:
        return frozenset()
    return frozenset(f for f, _ in PROJECTIONS if f"attn.{f}" in source)


def _attention_modules(model: nn.Module):
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # no diffusers: no diffusers attention to fuse
        return
    for name, m in model.named_modules():
        if isinstance(m, AttentionModuleMixin):
            yield name, m


def _why_not(attn: nn.Module) -> str | None:
    """Why ``attn`` cannot be fused, or None."""
    from diffusers.models.attention import AttentionModuleMixin

    if not getattr(attn, "_supports_qkv_fusion", False):
        return "the class does not support q/k/v fusion"
    if type(attn).fuse_projections is not AttentionModuleMixin.fuse_projections:
        return "the class fuses its projections its own way"
    if getattr(attn, "is_cross_attention", False):
        return "cross-attention (only k/v would fuse)"
    processor = type(getattr(attn, "processor", None))
    reads = _fused_names_read(processor)
    if not reads:
        return f"its processor {processor.__name__} does not read fused_projections"
    for fused, names in PROJECTIONS:
        members = [getattr(attn, n, None) for n in names]
        if fused == "to_added_qkv" and all(m is None for m in members):
            continue
        if fused not in reads:
            return f"its processor {processor.__name__} does not read {fused}"
        if not all(isinstance(m, nn.Linear) for m in members):
            return f"{'/'.join(names)} are not all nn.Linear"
        if any(m._forward_hooks or m._forward_pre_hooks for m in members):
            return f"{'/'.join(names)} have forward hooks (offloading, calibration or a LoRA side branch)"
        kinds = {type(m.weight) for m in members}
        if len(kinds) != 1 or not (kinds <= {SVDQuantTensor, nn.Parameter, torch.Tensor}):
            return f"{'/'.join(names)} have weights of types {sorted(k.__name__ for k in kinds)}"
        if len({m.bias is None for m in members}) != 1:
            return f"{'/'.join(names)}: some have a bias and some do not"
        if isinstance(members[0].weight, SVDQuantTensor):
            problem = SVDQuantTensor.stack_mismatch([m.weight for m in members])
            if problem is not None:
                return f"{'/'.join(names)}: {problem}"
        else:
            meta = {(m.in_features, m.weight.dtype, m.weight.device) for m in members}
            meta |= {(m.in_features, m.bias.dtype, m.bias.device) for m in members if m.bias is not None}
            if len(meta) != 1:
                return f"{'/'.join(names)} differ in in_features, dtype or device: {sorted(map(str, meta))}"
    return None


def _stack(weights: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(weights[0], SVDQuantTensor):
        return SVDQuantTensor.stack_rows(weights)
    if any(isinstance(w, SVDQuantTensor) for w in weights):
        raise ValueError("cannot stack quantized and 16-bit q/k/v weights into one")
    return torch.cat([w.detach() for w in weights])


def _split(weight: torch.Tensor, sizes: list[int], per_tensor: list[bool] | None = None) -> list[torch.Tensor]:
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    if isinstance(weight, SVDQuantTensor):
        per_tensor = per_tensor or [False] * len(sizes)
        return [weight.rows(a, b, per_tensor_scale=p) for a, b, p in zip(bounds, bounds[1:], per_tensor)]
    return [weight.detach()[a:b].clone() for a, b in zip(bounds, bounds[1:])]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False if isinstance(weight, SVDQuantTensor)
                              else like.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=like.bias.requires_grad)
    return out


def _carry_structure(new: nn.Linear, members: list[nn.Linear], name: str) -> None:
    """The fused linear reads what its members read: same input group (so share_inputs and the compile pass keep it
    with a FLUX single block's proj_mlp), the same keep / weight-only decisions; it is one linear, no branch group."""
    q = members[0]
    structure.mark(new, gelu_fed=structure.gelu_fed(q), keep_reason=structure.keep_reason(q),
                   weight_only_reason=structure.weight_only_reason(q),
                   input_group=getattr(q, structure.INPUT_GROUP_ATTR, None))
    calibrated = getattr(q, structure.CALIBRATED_GROUP_ATTR, None)
    if calibrated is not None:
        setattr(new, structure.CALIBRATED_GROUP_ATTR, calibrated)
    setattr(new, structure.FQN_ATTR, name)
    if not structure.prepared(q):
        setattr(new, structure.PREPARED_ATTR, False)


def _release(members: list[nn.Linear]) -> None:
    """Drop the data-free branch group the members were quantized in: it lists them, and that reference cycle would
    keep the unfused weights in memory until the next garbage collection."""
    for m in members:
        group = m.__dict__.pop(structure.BRANCH_GROUP_ATTR, None)
        if group is not None:
            group.members = [x for x in group.members if x is not m]
            group.solved.pop(m, None)


def _fuse_one(attn: nn.Module) -> None:
    base = structure.module_name(attn)
    for fused, names in PROJECTIONS:
        members = [getattr(attn, n, None) for n in names]
        if any(m is None for m in members):
            continue
        weight = _stack([m.weight for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        new = _linear(weight, bias, members[0])
        _carry_structure(new, members, f"{base}.{fused}" if base else fused)
        _release(members)
        for n in names:
            delattr(attn, n)
        setattr(attn, fused, new)
        setattr(attn, f"_svdquant_{fused}_sizes", [m.out_features for m in members])
        # an NVFP4 per-tensor scale that stack_rows made per-channel is per-tensor again in the unfused layout
        setattr(attn, f"_svdquant_{fused}_per_tensor", [isinstance(m.weight, SVDQuantTensor)
                                                        and m.weight.global_scale is not None
                                                        and m.weight.global_scale.shape == (1,) for m in members])
    attn.fused_projections = True
    setattr(attn, FUSED_ATTR, True)
    attn._svdquant_fused_hooks = (attn.register_state_dict_post_hook(_unfused_state_dict),
                                  attn.register_load_state_dict_pre_hook(_fused_load_hook))
    # diffusers' model.unfuse_qkv_projections() calls this: without it, it would delete to_qkv and leave no q/k/v
    attn.unfuse_projections = functools.partial(_unfuse_one, attn)


def _unfuse_one(attn: nn.Module) -> None:
    base = structure.module_name(attn)
    for fused, names in PROJECTIONS:
        new = getattr(attn, fused, None)
        if new is None:
            continue
        sizes = getattr(attn, f"_svdquant_{fused}_sizes")
        weights = _split(new.weight, sizes, getattr(attn, f"_svdquant_{fused}_per_tensor", None))
        biases = [None] * len(sizes) if new.bias is None else _split(new.bias, sizes)
        for n, w, b in zip(names, weights, biases):
            lin = _linear(w, b, new)
            _carry_structure(lin, [new], f"{base}.{n}" if base else n)
            setattr(attn, n, lin)
        delattr(attn, fused)
    attn.fused_projections = False
    setattr(attn, FUSED_ATTR, False)
    for handle in attn.__dict__.pop("_svdquant_fused_hooks", ()):
        handle.remove()
    attn.__dict__.pop("unfuse_projections", None)  # the class's own again


def fuse_qkv(model: nn.Module) -> FuseSummary:
    """Fuse q/k/v (and the added q/k/v of joint attention) of every supported attention module of ``model`` (a
    diffusers model, quantized by svdquant_ops or 16-bit) into one linear each, as diffusers'
    ``fuse_qkv_projections()`` does, without requantizing and without keeping the unfused weights. Outputs are
    unchanged bit for bit. Idempotent; returns (and logs) what was fused and what was left as it is and why."""
    if not isinstance(model, nn.Module):
        hint = "; pass its denoiser (pipe.transformer or pipe.unet)" if hasattr(model, "components") else ""
        raise TypeError(f"fuse_qkv: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    from .lora import has_lora
    from .unwrap import refuse_unwrapped

    refuse_unwrapped(model, "fuse_qkv")
    if has_lora(model):
        raise ValueError("fuse_qkv: the model holds LoRA adapters (load_lora), which target to_q, to_k, ... by name; "
                         "unload them first (svdquant_ops.lora.unload_lora), and load LoRAs only on an unfused model "
                         "(unfuse_qkv)")
    structure.record_names(model)
    summary = FuseSummary()
    todo = []
    for name, attn in _attention_modules(model):
        if getattr(attn, FUSED_ATTR, False):
            summary.fused.append(name)
            continue
        if getattr(attn, "fused_projections", False):
            summary.skipped[name] = "already fused by diffusers (its to_q etc. are kept beside to_qkv)"
            continue
        why = _why_not(attn)
        if why is not None:
            summary.skipped[name] = why
            continue
        todo.append(attn)
        summary.fused.append(name)
    # Checked all first, so that nothing is half fused. Outside inference mode: weights made under it could not be
    # loaded into in place later (load_state_dict).
    with torch.inference_mode(False), torch.no_grad():
        for attn in todo:
            _fuse_one(attn)
    if summary.fused and not getattr(model, _ROOT_HOOK_ATTR, False):
        # Runs before any other pre-hook of the model (share_inputs' in-place check must see to_qkv's entries)
        handle = model.register_load_state_dict_pre_hook(_fused_load_hook_all)
        model._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
        setattr(model, _ROOT_HOOK_ATTR, True)
    log.info("svdquant_ops: %s", summary)
    return summary


def unfuse_qkv(model: nn.Module) -> int:
    """Undo ``fuse_qkv``: ``to_q`` / ``to_k`` / ``to_v`` (and ``add_*_proj``) again, with the same values bit for bit
    (their λ and down projection stay the shared tensors). Returns the number of attention modules unfused."""
    from .lora import has_lora
    from .unwrap import refuse_unwrapped

    refuse_unwrapped(model, "unfuse_qkv")
    if has_lora(model):
        raise ValueError("unfuse_qkv: the model holds LoRA adapters (load_lora) loaded onto the fused linears; "
                         "unload them first (svdquant_ops.lora.unload_lora), then unfuse and load them again")
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for _, attn in _attention_modules(model):
            if getattr(attn, FUSED_ATTR, False):
                _unfuse_one(attn)
                n += 1
    return n


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is an attention fused by ``fuse_qkv``."""
    return any(getattr(m, FUSED_ATTR, False) for m in module.modules())


# ---------------------------------------------------------------- checkpoints in diffusers' (unfused) layout
def _unfused_state_dict(attn: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    if not getattr(attn, FUSED_ATTR, False):
        return
    for fused, names in PROJECTIONS:
        sizes = getattr(attn, f"_svdquant_{fused}_sizes", None)
        if sizes is None or f"{prefix}{fused}.weight" not in state_dict:
            continue
        per_tensor = getattr(attn, f"_svdquant_{fused}_per_tensor", None)
        for p in ("weight", "bias"):
            t = state_dict.pop(f"{prefix}{fused}.{p}", None)
            if t is not None:
                for n, part in zip(names, _split(t, sizes, per_tensor if p == "weight" else None)):
                    state_dict[f"{prefix}{n}.{p}"] = part


def _to_fused_entries(attn: nn.Module, state_dict: dict, prefix: str) -> None:
    for fused, names in PROJECTIONS:
        if getattr(attn, fused, None) is None:
            continue
        for p in ("weight", "bias"):
            keys = [f"{prefix}{n}.{p}" for n in names]
            present = [k in state_dict for k in keys]
            if not any(present):
                continue
            if not all(present):
                missing = [k for k, ok in zip(keys, present) if not ok]
                raise KeyError(f"load_state_dict into a fused model (fuse_qkv): the state dict has some of "
                               f"{keys} but not {missing}")
            try:
                state_dict[f"{prefix}{fused}.{p}"] = _stack([state_dict.pop(k) for k in keys])
            except ValueError as e:
                raise ValueError(f"load_state_dict into a fused model (fuse_qkv): {keys} cannot be stacked into "
                                 f"{prefix}{fused}.{p}: {e}; unfuse_qkv(model) before loading it") from None


def _fused_load_hook(attn, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _to_fused_entries(attn, state_dict, prefix)


def _fused_load_hook_all(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    for name, attn in model.named_modules():
        if getattr(attn, FUSED_ATTR, False):
            _to_fused_entries(attn, state_dict, f"{prefix}{name}." if name else prefix)
