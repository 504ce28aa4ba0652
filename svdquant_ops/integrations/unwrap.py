"""``unwrap_weights(model)``: quantized weights held as their plain parts, for a compiled model's per-call overhead.

A compiled model whose parameters are tensor subclasses pays on every call, before its first kernel: AOTAutograd's
runtime wrapper flattens each subclass input into its parts (``flatten_subclass``, Python, per weight and part). On a
FLUX.1-dev step (torch 2.11, an H100 host) that is most of the ~10 ms the host spends before a CUDA-graph replay
starts, with the GPU idle (``benchmarks/results/2026-12-06-h100-flux-1024px-b1-tile-criterion.md``: host profile).
This registers each of our weights (``PackedWeight``: SVDQuant and 4-bit weight-only) as a parametrization
(``torch.nn.utils.parametrize``) over its parts: the module stores plain tensors, and reading ``module.weight``
rebuilds the weight from them, which torch.compile traces once into the graph. The compiled call then takes plain
tensors only. The same mechanism as torch's ``unwrap_tensor_subclass_parameters`` and torchao's
``unwrap_tensor_subclass``, plus what our weights need:

- A part several weights hold as one tensor (``shared_fields``: the λ and down projection of linears that read one
  input) stays one parameter object for all of them, so torch.compile makes it one graph input and the pass that
  merges their ``quantize_act`` calls still applies (torch's version wraps each holder's part in a parameter of its
  own).
- ``state_dict()`` keeps the usual layout (``...weight`` entries holding the quantized weight), so ``save_pretrained``
  after unwrapping writes what ``from_pretrained`` reads. Loading into an unwrapped model, assigning it a new weight
  (``load_lora`` does), or changing its dtype (which would cast parts that must stay bit-exact) is refused with the
  way out: ``rewrap_weights(model)`` first. Writes into the parts in place (``set_lora_scale``) work as before.

Eagerly an unwrapped model computes the same outputs, a little slower (the weight is rebuilt at each read). Use it
for compiled models: ``unwrap_weights(model)`` after quantizing (and ``fuse_qkv``) and after moving the model to its
device, then ``torch.compile``. Device moves afterwards move the parts as plain parameters (shared parts stay one).
Rebinding a part on the weight read from a module (``module.weight.proj_up = t``) changes only that read's wrapper:
write into the part in place, or rewrap first.

It does not pay under every torch. The parametrizations roughly double Dynamo's guard tree (FLUX.1-dev depth: 17340
guard managers against 8416, 10.6 against 4.7 ms per call on this project's CPU machine under torch 2.13), which only
pays where AOTAutograd flattens the subclasses in Python at each call (torch 2.11, the GPU machine's). torch 2.13
generates code for that flattening (``torch._functorch._aot_autograd.subclass_codegen``) and the compiled function
took as long with as without unwrapping there. ``pays_off()`` tells which case this torch is; the compile recipes
(``svdquant generate --compile``, ``integrations/flux_compile.py``) unwrap only where it does.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..storage.base import PackedWeight
from ..storage.shared_moves import SHARED_MARK

_PATH = "parametrizations"  # where torch.nn.utils.parametrize keeps the parts: <module>.parametrizations.<name>


class WeightFromParts(nn.Module):
    """The parametrization: a quantized weight rebuilt from its plain parts (``right_inverse`` gives the parts)."""

    def __init__(self, weight: PackedWeight):
        super().__init__()
        names, meta = weight.__tensor_flatten__()
        self.cls = type(weight)
        self.names = tuple(names)
        self.meta = meta
        self.outer_size = tuple(weight.size())
        self.outer_stride = tuple(weight.stride())
        self.part_dtypes = tuple(getattr(weight, n).dtype for n in names)
        self.registered = False  # set once register_parametrization has taken the parts (right_inverse's one use)

    def forward(self, *parts: torch.Tensor) -> PackedWeight:
        dtypes = tuple(p.dtype for p in parts)
        if dtypes != self.part_dtypes:  # a .to(dtype) of the module cast parts that must stay as they are
            changed = [f"{n} {a} -> {b}" for n, a, b in zip(self.names, self.part_dtypes, dtypes) if a != b]
            raise TypeError(f"unwrapped {self.cls.__name__}: parts changed dtype ({', '.join(changed)}); change the "
                            "dtype of a model with quantized weights only after svdquant_ops.rewrap_weights(model)")
        return self.cls.__tensor_unflatten__(dict(zip(self.names, parts)), self.meta, self.outer_size,
                                             self.outer_stride)

    def right_inverse(self, weight: torch.Tensor) -> list[torch.Tensor]:
        # Assigning a new weight later would copy its parts into these parameters, some of them shared with other
        # weights (and of other shapes after a LoRA load): refused. In-place writes to the parts are fine.
        if self.registered or not isinstance(weight, self.cls):
            raise TypeError(f"cannot assign a weight to a linear whose {self.cls.__name__} is unwrapped for "
                            "torch.compile; call svdquant_ops.rewrap_weights(model) first (and unwrap again after)")
        return [getattr(weight, n) for n in self.names]


def _unwrapped(module: nn.Module) -> list[str]:
    if not parametrize.is_parametrized(module):
        return []
    return [n for n, plist in module.parametrizations.items() if isinstance(plist[0], WeightFromParts)]


def pays_off() -> bool:
    """Whether ``unwrap_weights`` should shorten a compiled call under this torch: True where AOTAutograd flattens
    tensor-subclass inputs in Python at each call (no generated code for it, as in torch 2.11)."""
    try:
        return importlib.util.find_spec("torch._functorch._aot_autograd.subclass_codegen") is None
    except ModuleNotFoundError:  # pragma: no cover - a torch without that package at all
        return True


def is_unwrapped(model: nn.Module) -> bool:
    """Whether any quantized weight of ``model`` is held as plain parts (``unwrap_weights``)."""
    return any(_unwrapped(m) for m in model.modules())


def refuse_unwrapped(model: nn.Module, what: str) -> None:
    """Stop ``what``, which replaces quantized weights, on a model whose weights are unwrapped."""
    if is_unwrapped(model):
        raise RuntimeError(f"{what}: the model's quantized weights are unwrapped for torch.compile "
                           "(svdquant_ops.unwrap_weights); call svdquant_ops.rewrap_weights(model) first, and unwrap "
                           "again after")


def unwrap_weights(model: nn.Module) -> int:
    """Hold every quantized weight of ``model`` (``SVDQuantTensor``, ``W4A16Tensor``) as its plain parts, in place;
    returns how many weights were unwrapped (weights already unwrapped are left as they are). See the module
    docstring for when to call it and what it changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap_weights: model must be an nn.Module, got {type(model).__name__}")
    one_object: dict[int, nn.Parameter] = {}  # id(part) -> the parameter every holder of that part gets
    held = []  # the original parts, alive until the end so that their ids stay unique
    count = 0
    for module in list(model.modules()):
        for name, weight in list(module._parameters.items()):
            if not isinstance(weight, PackedWeight):
                continue
            parts = weight._data_tensors()
            held.extend(parts)
            parametrize.register_parametrization(module, name, WeightFromParts(weight), unsafe=True)
            plist = getattr(module, _PATH)[name]
            plist[0].registered = True
            for i, part in enumerate(parts):
                key = f"original{i}"
                first = one_object.setdefault(id(part), plist._parameters[key])
                if first is not plist._parameters[key]:
                    plist._parameters[key] = first
                elif getattr(part, SHARED_MARK, False):  # the eager quantize_act cache reuses marked parts only
                    setattr(first, SHARED_MARK, True)
            if not getattr(module, "_svdquant_unwrap_hooks", False):
                module._register_state_dict_hook(_state_dict_hook)
                module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
                module._svdquant_unwrap_hooks = True
            count += 1
    return count


def rewrap_weights(model: nn.Module) -> int:
    """Undo ``unwrap_weights``: each weight becomes one quantized tensor again, over the same memory; returns how
    many. Parts held by several weights stay one tensor."""
    plain: dict[int, torch.Tensor] = {}  # id(part parameter) -> one plain tensor over its memory
    count = 0
    for module in list(model.modules()):
        for name in _unwrapped(module):
            plist = getattr(module, _PATH)[name]
            parts = [plist._parameters[f"original{i}"] for i in range(len(plist[0].names))]
            for p in parts:
                if id(p) not in plain:
                    plain[id(p)] = p.detach()
                    if getattr(p, SHARED_MARK, False):
                        setattr(plain[id(p)], SHARED_MARK, True)
            weight = plist[0](*[plain[id(p)] for p in parts])
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            module._buffers.pop(name, None)  # (parametrize leaves a weight that needs no grad as a buffer)
            module._parameters[name] = nn.Parameter(weight, requires_grad=False)
            count += 1
    return count


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    # the usual layout: '<prefix>weight' holding the quantized weight, not parametrize's '<prefix>parametrizations...'
    for name in _unwrapped(module):
        inner = f"{prefix}{_PATH}.{name}.original"
        for key in [k for k in state_dict if k.startswith(inner)]:
            del state_dict[key]
        state_dict[prefix + name] = getattr(module, name)
    return state_dict


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    names = _unwrapped(module)
    if any(prefix + n in state_dict or any(k.startswith(f"{prefix}{_PATH}.{n}.") for k in state_dict)
           for n in names):
        raise RuntimeError(f"load_state_dict into {prefix or 'the model'}: its quantized weights are unwrapped for "
                           "torch.compile (svdquant_ops.unwrap_weights); call svdquant_ops.rewrap_weights(model) "
                           "before loading, and unwrap again after")
