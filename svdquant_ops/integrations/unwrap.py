"""``unwrap_weights(model)``: quantized weights held as their plain parts, for a compiled model's per-call overhead.

A compiled model whose parameters are tensor subclasses pays on every call, before its first kernel: AOTAutograd's
runtime wrapper flattens each subclass input into its parts (``flatten_subclass``, Python, per weight and part). On a
FLUX.1-dev step (torch 2.11, an H100 host) that is most of the ~10 ms the host spends before a CUDA-graph replay
starts, with the GPU idle (``benchmarks/results/2026-12-06-h100-flux-1024px-b1-tile-criterion.md``: host profile).

This moves each of our weights (``PackedWeight``: SVDQuant and 4-bit weight-only) out of the module's parameters and
registers its parts there instead, as plain parameters: the parts the weight holds alone packed into one flat
parameter per dtype (``weight_parts_uint8``: codes and scales; ``weight_parts_bfloat16``: λ and the projections;
each part 256-byte aligned, read as a view of it), a part alone in its dtype or held by several weights as a
parameter of its own (``weight_part_global_scale``, ``weight_part_smooth``). Every graph input costs host time before
the first kernel (guards, gathering the inputs, Inductor's size asserts); packing takes a FLUX.1-dev w4a8 graph from
2260 inputs to 1613 (bf16: 1156). The
module's class becomes a subclass of its own (same name) whose ``weight`` is a property rebuilding the quantized
weight from those parts; torch.compile traces that once into the graph, so the compiled call takes plain tensors
only. What a weight's rebuild needs besides its parts (class, attributes, shape) is written into the property
function's code as constants (one generated function and class per base class and weight layout), so Dynamo guards
little more than the parts and that code object (torch 2.11 guards a function's default arguments entry by entry:
on a FLUX.1-dev-depth CPU probe the guard check took 0.84 ms with them as defaults, 0.32 ms as constants, bf16 0.17). (torch's
``unwrap_tensor_subclass_parameters`` and torchao's ``unwrap_tensor_subclass`` do the same with
``torch.nn.utils.parametrize``, whose modules and attributes Dynamo guards one by one: on a tiny FLUX.1, 1795 guard
managers against 1001 without unwrapping, and 1115 this way; and they give each holder of a shared part a
parameter of its own.) Also:

- A part several weights hold as one tensor (``shared_fields``: the λ and down projection of linears that read one
  input) stays one parameter object for all of them, so torch.compile makes it one graph input and the pass that
  merges their ``quantize_act`` calls still applies.
- ``state_dict()`` keeps the usual layout (``...weight`` entries holding the quantized weight), so ``save_pretrained``
  after unwrapping writes what ``from_pretrained`` reads. Loading into an unwrapped model, assigning it a new weight
  (``load_lora``, ``fuse_qkv`` do), or changing its dtype is refused with the way out: ``rewrap_weights(model)``
  first (a cast to the dtype it has, ``pipe.to("cuda", torch.bfloat16)``, only moves it; fp32 scales stay fp32, as
  in the wrapped weight). Writes into the parts in place (``set_lora_scale``) work, packed parts included.
- Packing treats a part as the weight's own when no other weight *in the model given* holds it and it is not marked
  shared (``share_inputs`` marks what it shares): unwrap the whole model (the compile recipe does), as a part shared
  by hand with a weight outside it would be copied and stop being shared.

Eagerly an unwrapped model computes the same outputs, a little slower (the weight is rebuilt at each read). Use it
for compiled models: ``unwrap_weights(model)`` after quantizing (and ``fuse_qkv``) and after moving the model to its
device, then ``torch.compile``. Device moves afterwards move the parts as plain parameters (shared parts stay one).
``copy.deepcopy`` and pickling keep an unwrapped model unwrapped. Limits, each undone by ``rewrap_weights``:
- The weight read from a module is a new wrapper at each read: rebinding a part on it (``module.weight.proj_up = t``)
  or its ``.data`` changes nothing; write into a part in place instead. Assigning an ``nn.Parameter`` to the weight
  stops in torch itself ("attribute 'weight' already exists"); a tensor, with the message naming ``rewrap_weights``.
- The parts are frozen parameters of their own dtypes: ``model.requires_grad_(True)`` fails on the integer codes,
  and diffusers' ``num_parameters()`` counts the packed parts.
- Offloading: model offloading (``enable_model_cpu_offload``) and diffusers' group offloading without streams work
  (tested on an H100). Sequential offloading (accelerate's ``cpu_offload``) maps the state dict's ``...weight``
  entries, which are not the unwrapped modules' parameters (``KeyError``). Leaf-level group offloading with
  ``use_stream=True`` moves a part two linears share (λ, the down projection) back to the CPU with the first
  linear's offload, after the second one's prefetch: the second weight's read brings it back to the device of the
  weight's own parts (a copy of K + K x R values), eagerly; under torch.compile that read raises, naming the ways
  out (block-level groups, no streams, or ``rewrap_weights``).
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext

import torch
from torch import nn

from ..storage.base import PackedWeight
from ..storage.shared_moves import SHARED_MARK

_SPECS = "_svdquant_unwrapped"  # on a swapped class: {parameter name: _Spec}
_HOOKS = "_svdquant_unwrap_hooks"  # on a module: its state-dict hooks are registered
_CLASSES: dict[tuple, type] = {}  # (base class, specs' keys) -> the swapped class


_ALIGN = 256  # bytes: where each packed part starts in its flat parameter


def part_name(name: str, part: str) -> str:
    """The parameter that holds part ``part`` of the unwrapped weight ``name`` (a part not packed)."""
    return f"{name}_part_{part}"


def group_name(name: str, dtype: torch.dtype) -> str:
    """The flat parameter that holds the packed parts of dtype ``dtype`` of the unwrapped weight ``name``."""
    return f"{name}_parts_{str(dtype).removeprefix('torch.')}"


class _Spec:
    """What rebuilds one weight besides its parts."""

    def __init__(self, weight: PackedWeight):
        names, meta = weight.__tensor_flatten__()
        self.cls = type(weight)
        self.names = tuple(names)
        self.meta = meta
        self.size = tuple(weight.size())
        self.stride = tuple(weight.stride())
        self.dtypes = tuple(getattr(weight, n).dtype for n in names)
        # parts marked as held by several weights (nn.Parameter's deepcopy drops the mark: set again on copies)
        self.marked = tuple(n for n in names if getattr(getattr(weight, n), SHARED_MARK, False))
        self.position = 0  # the weight's index among the module's parameters (rewrap puts it back there)
        # where each part is read from, in `names` order: (parameter name, offset, numel, shape), offset None for a
        # part that is a parameter of its own (set by unwrap_weights)
        self.sources: tuple = ()

    def params(self) -> tuple[str, ...]:
        """The module parameters holding this weight's parts, each once, in order."""
        return tuple(dict.fromkeys(src[0] for src in self.sources))

    def key(self) -> tuple:
        return (self.cls, self.names, tuple(sorted((k, repr(v)) for k, v in self.meta.items())), self.size,
                self.stride, self.dtypes, self.sources)

    def build(self, parts: list[torch.Tensor]) -> PackedWeight:
        return self.cls.__tensor_unflatten__(dict(zip(self.names, parts)), self.meta, self.size, self.stride)


# The weight classes the generated getters name, by qualified name (one global of this module: Dynamo guards it once
# for all modules, not once per module as it would a function's default argument or closure cell)
_WEIGHT_CLASSES: dict[str, type] = {}


def _literal(value) -> str | None:
    """Python source evaluating, in this module's globals, to a value equal to ``value`` and of its type; None where
    there is none (the getter then takes it as a default argument)."""
    if value is None or isinstance(value, (bool, int, str)):
        try:
            src = repr(value)
        except ValueError:  # an int beyond the interpreter's digit limit
            return None
    elif isinstance(value, float):  # repr round-trips a finite float exactly
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    elif isinstance(value, torch.dtype):
        src = str(value)  # torch.bfloat16
    elif isinstance(value, (tuple, list)):
        items = [_literal(v) for v in value]
        if any(i is None for i in items):
            return None
        src = ("(" + "".join(f"{i}, " for i in items) + ")") if isinstance(value, tuple) else f"[{', '.join(items)}]"
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _literal(v) for k, v in value.items()}
        if any(i is None for i in items.values()):
            return None
        src = "{" + ", ".join(f"{k!r}: {v}" for k, v in items.items()) + "}"
    else:
        return None
    try:
        back = eval(src, globals())  # noqa: S307 - source built above from plain values
    except Exception:
        return None
    return src if type(back) is type(value) and back == value else None


def _getter(spec: _Spec):
    """The ``weight`` property's function for ``spec``: its parts read from the module, checked, rebuilt into the
    weight. Generated with the spec's values as constants in its code, where they can be (torch 2.11's Dynamo guards
    a function's default arguments entry by entry, once per module holding the property: ~40 guards per linear on
    FLUX.1-dev, the guard check 5x bf16's; the code object is guarded once, by identity, and its constants not at all).
    A value without a literal (or a weight class whose name another class took) is a default argument instead."""
    key = f"{spec.cls.__module__}.{spec.cls.__qualname__}"
    _WEIGHT_CLASSES.setdefault(key, spec.cls)
    values = {"_cls": spec.cls, "_names": spec.names, "_meta": spec.meta, "_size": spec.size, "_stride": spec.stride,
              "_dtypes": spec.dtypes, "_marked": spec.marked}
    expr = {k: _literal(v) for k, v in values.items() if k != "_cls"}
    expr["_cls"] = f"_WEIGHT_CLASSES[{key!r}]" if _WEIGHT_CLASSES[key] is spec.cls else None
    defaults = {k: values[k] for k, e in expr.items() if e is None}
    expr.update({k: k for k in defaults})
    reads = []
    for p, at, n, shape in spec.sources:
        # getattr with the name as a string: source identifiers are NFKC-normalized, parameter names are not
        read = f"getattr(self, {p!r})"
        reads.append(read if at is None else f"{read}[{at}:{at + n}].view({_literal(tuple(shape))})")
    src = (f"def get(self{''.join(f', {k}={k}' for k in defaults)}):\n"
           f"    parts = [{', '.join(reads)}]\n"
           f"    if tuple(p.dtype for p in parts) != {expr['_dtypes']}:\n"
           f"        _dtype_changed({expr['_names']}, {expr['_dtypes']}, parts, {expr['_cls']})\n"
           f"    if any(p.device != parts[0].device for p in parts):  # static under compile: traced away\n"
           f"        _gather_shared({expr['_names']}, {expr['_marked']}, parts, {expr['_cls']})\n"
           f"    return {expr['_cls']}.__tensor_unflatten__(dict(zip({expr['_names']}, parts)), {expr['_meta']}, "
           f"{expr['_size']}, {expr['_stride']})\n")
    scope = dict(defaults)  # where the default arguments' expressions find their values
    exec(compile(src, f"<svdquant_ops unwrapped {spec.cls.__name__} weight>", "exec"), globals(), scope)  # noqa: S102
    return scope["get"]


def _dtype_changed(names, dtypes, parts, cls):
    # a .to(dtype) cast parts that must stay as they are
    changed = [f"{n} {a} -> {p.dtype}" for n, a, p in zip(names, dtypes, parts) if p.dtype != a]
    raise TypeError(f"unwrapped {cls.__name__} weight: parts changed dtype ({', '.join(changed)}); change the dtype "
                    "of a model with quantized weights only after svdquant_ops.rewrap_weights(model)")


def _property(name: str, spec: _Spec) -> property:
    def set(self, value):
        raise TypeError(f"cannot assign {name} of a linear whose {spec.cls.__name__} is unwrapped for torch.compile; "
                        "call svdquant_ops.rewrap_weights(model) first (and unwrap again after)")

    return property(_getter(spec), set)


def _gather_shared(names, marked, parts, cls) -> None:
    """The parts of one unwrapped weight on one device, where only parts shared with other linears (λ, the down
    projection) are elsewhere: those are moved to the device of the weight's own parts, in place (the same parameter
    objects, so every holder sees the move). diffusers' leaf-level group offloading with use_stream=True does this
    to them: the next linear's group is prefetched, then the previous linear's offload moves the part they share
    back to the CPU. The copy is small (K + K x R values) and happens only then. Any other disagreement, or one met
    while compiling, is an error naming the devices."""
    own = {p.device for n, p in zip(names, parts) if n not in marked}
    if len(own) != 1 or torch.compiler.is_compiling():
        where = ", ".join(f"{n} {p.device}" for n, p in zip(names, parts))
        raise RuntimeError(f"unwrapped {cls.__name__} weight: its parts are on different devices ({where}). Move the "
                           "model with .to(device) as a whole; a module-level offload that moves a part shared with "
                           "another linear (λ, the down projection) cannot be compiled: use "
                           "offload_type='block_level' or use_stream=False, or svdquant_ops.rewrap_weights(model)")
    (device,) = own
    for p in parts:
        if p.device != device:
            with _outside_inference(p), torch.no_grad():
                p.data = p.data.to(device)  # the same parameter object: every holder sees the move


def _outside_inference(p: torch.Tensor):
    """A context leaving inference mode for a normal tensor (nothing for an inference tensor), so that a part moved
    or cast under ``inference_mode`` stays a normal tensor."""
    return torch.inference_mode(False) if not p.is_inference() else nullcontext()


def _apply(self, fn, recurse=True):
    # nn.Module._apply for the parts of the unwrapped weights: a move applies to them as to any parameter, but a
    # cast applies only to parts already in the new dtype's kind, as the wrapped weight's .to(dtype) keeps its fp32
    # scales: a same-dtype cast (pipe.to("cuda", torch.bfloat16)) moves them, and a real dtype change, which the
    # wrapped weight would apply to λ and the low-rank factors with its checks, is refused before this module changes
    # (nn.Module._apply visits the modules in turn: those visited before may be converted already).
    keys = list(dict.fromkeys(k for spec in _specs(self).values() for k in spec.params()))
    parts = {k: self._parameters[k] for k in keys}
    model_dtypes = {spec.meta.get("dtype") for spec in _specs(self).values()}
    new = {}
    for k, p in parts.items():
        if id(p) in new:
            continue
        with _outside_inference(p):
            trial = fn(torch.empty(0, dtype=p.dtype, device=p.device))
            if trial.dtype == p.dtype:
                new[id(p)] = fn(p)
            elif p.dtype in model_dtypes:
                raise TypeError(f"{type(self).__name__} with an unwrapped quantized weight: cannot convert its parts "
                                f"from {p.dtype} to {trial.dtype} (modules visited before it may be converted "
                                "already); call svdquant_ops.rewrap_weights(model), then change the model's dtype "
                                "again (and unwrap after)")
            else:  # a part kept in its own dtype (fp32 scales): moved only
                new[id(p)] = p.to(trial.device)
    for k in keys:
        del self._parameters[k]
    try:
        type(self).__dict__["_svdquant_base"]._apply(self, fn, recurse)
    finally:
        self._parameters.update(parts)
    for p in parts.values():
        if new[id(p)] is not p:
            with _outside_inference(p), torch.no_grad():
                p.data = new[id(p)]  # the same parameter object: shared parts stay one
    return self


def _marked(t: torch.Tensor, spec: _Spec, part: str) -> torch.Tensor:
    """``t`` with the shared-part mark where ``spec`` recorded it (the eager quantize_act cache reuses marked parts
    only; a new tensor object, or nn.Parameter's deepcopy, does not carry it)."""
    if part in spec.marked:
        setattr(t, SHARED_MARK, True)
    return t


def _setstate(self, state):
    type(self).__dict__["_svdquant_base"].__setstate__(self, state)
    for name, spec in _specs(self).items():
        for part in spec.marked:
            _marked(self._parameters[part_name(name, part)], spec, part)


def _new_unwrapped(base: type, specs: dict[str, _Spec]) -> nn.Module:
    """An empty instance of the swapped class for ``base`` and ``specs`` (copy and pickle rebuild through it: the
    class is made at run time, so it cannot be found by name)."""
    cls = _swapped_class(base, specs)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    return _new_unwrapped, (type(self).__dict__["_svdquant_base"], dict(_specs(self))), self.__getstate__()


def _swapped_class(base: type, specs: dict[str, _Spec]) -> type:
    key = (base, tuple(sorted((n, s.key()) for n, s in specs.items())))
    cls = _CLASSES.get(key)
    if cls is None:
        attrs = {n: _property(n, s) for n, s in specs.items()}
        attrs[_SPECS] = dict(specs)
        attrs["_svdquant_base"] = base
        attrs["__reduce_ex__"] = _reduce_ex
        attrs["__setstate__"] = _setstate
        attrs["_apply"] = _apply
        cls = _CLASSES[key] = type(base.__name__, (base,), attrs)
        cls.__qualname__ = base.__qualname__
        cls.__module__ = base.__module__
    return cls


def _specs(module: nn.Module) -> dict[str, _Spec]:
    return type(module).__dict__.get(_SPECS, {})


def is_unwrapped(model: nn.Module) -> bool:
    """Whether any quantized weight of ``model`` is held as plain parts (``unwrap_weights``)."""
    return any(_specs(m) for m in model.modules())


def refuse_unwrapped(model: nn.Module, what: str) -> None:
    """Stop ``what``, which replaces quantized weights, on a model whose weights are unwrapped."""
    if is_unwrapped(model):
        raise RuntimeError(f"{what}: the model's quantized weights are unwrapped for torch.compile "
                           "(svdquant_ops.unwrap_weights); call svdquant_ops.rewrap_weights(model) first, and unwrap "
                           "again after")


def unwrap_weights(model: nn.Module, pack: bool = True) -> int:
    """Hold every quantized weight of ``model`` (``SVDQuantTensor``, ``W4A16Tensor``) as its plain parts, in place;
    returns how many weights were unwrapped (weights already unwrapped are left as they are). See the module
    docstring for when to call it and what it changes.

    pack: the parts a weight holds alone are copied into one flat parameter per dtype (fewer graph inputs; the
    copy is made one weight at a time); False keeps every part a parameter of its own, over its own memory."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap_weights: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(pack, bool):
        raise TypeError(f"unwrap_weights: pack must be True or False, got {pack!r}")
    # Parts held by one weight only are copied into one flat parameter per dtype (_pack): a compiled call's host
    # time before its first kernel grows with its graph inputs (guards, gathering them, Inductor's size asserts;
    # ~0.3 us each on the CPU probe, an estimated ~2 us from an H200 host's profile), and this takes a W4A8
    # weight's inputs from six to three (codes and scales, the 16-bit parts, the fp32 scale). Parts several weights
    # hold stay one parameter object for all of them.
    holders = Counter(id(t) for m in model.modules() for w in m._parameters.values() if isinstance(w, PackedWeight)
                      for t in w._data_tensors())
    one_object: dict[int, nn.Parameter] = {}  # id(part) -> the parameter every holder of that part gets
    count = 0
    for module in list(model.modules()):
        weights = {n: w for n, w in module._parameters.items() if isinstance(w, PackedWeight)}
        if not weights:
            continue
        specs = dict(_specs(module))
        order = list(module._parameters)  # before any part is added: rewrap puts each weight back at its index
        for name, weight in weights.items():
            spec = _Spec(weight)
            spec.position = order.index(name)
            values = weight._data_tensors()
            own = [holders[id(v)] == 1 and part not in spec.marked for part, v in zip(spec.names, values)]
            groups: dict[torch.dtype, list[int]] = {}
            for i, v in enumerate(values):
                if own[i] and pack:
                    groups.setdefault(v.dtype, []).append(i)
            sources: list = [None] * len(values)
            for dtype, idx in groups.items():
                if len(idx) < 2:  # a part alone in its dtype stays a parameter of its own (no copy)
                    continue
                param = group_name(name, dtype)
                flat, places = _pack([values[i] for i in idx])
                module._parameters[param] = nn.Parameter(flat, requires_grad=False)
                for i, (at, n) in zip(idx, places):
                    sources[i] = (param, at, n, tuple(values[i].shape))
            for i, (part, value) in enumerate(zip(spec.names, values)):
                if sources[i] is not None:
                    continue
                sources[i] = (part_name(name, part), None, None, None)
                # (ids are of parts alive together in the count above: a later lookup cannot meet a reused id)
                param = one_object.get(id(value))
                if param is None:
                    param = one_object[id(value)] = _marked(nn.Parameter(value, requires_grad=False), spec, part)
                module._parameters[sources[i][0]] = param
            spec.sources = tuple(sources)
            del module._parameters[name]
            specs[name] = spec
            count += 1
        base = type(module).__dict__.get("_svdquant_base", type(module))
        module.__class__ = _swapped_class(base, specs)
        if not module.__dict__.get(_HOOKS):
            module._register_state_dict_hook(_state_dict_hook)
            module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
            module.__dict__[_HOOKS] = True
    return count


def _pack(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``parts`` (one dtype and device) copied into one flat tensor, each starting ``_ALIGN`` bytes aligned (the
    kernels' vector and TMA loads need 16); returns it and each part's (offset, numel) in it."""
    step = max(1, _ALIGN // parts[0].element_size())
    places, total = [], 0
    for t in parts:
        places.append((total, t.numel()))
        total += -(-t.numel() // step) * step
    # a normal tensor, as the parts were, even when unwrapping under inference_mode (in-place writes into a part
    # outside it, set_lora_scale's, must keep working)
    with _outside_inference(parts[0]), torch.no_grad():
        flat = torch.zeros(total, dtype=parts[0].dtype, device=parts[0].device)
        for t, (at, n) in zip(parts, places):
            flat[at:at + n].copy_(t.reshape(-1))
    return flat, places


def rewrap_weights(model: nn.Module) -> int:
    """Undo ``unwrap_weights``: each weight becomes one quantized tensor again, returns how many. Parts that were
    parameters of their own keep their memory (parts held by several weights stay one tensor); packed parts are
    copied out of their flat parameter into memory of their own."""
    plain: dict[int, torch.Tensor] = {}  # id(part parameter) -> one plain tensor over its memory
    count = 0
    for module in list(model.modules()):
        specs = _specs(module)
        if not specs:
            continue
        rebuilt = {}
        for name, spec in specs.items():
            params = {k: module._parameters.pop(k) for k in spec.params()}
            parts = []
            for part, (k, at, n, shape) in zip(spec.names, spec.sources):
                p = params[k]
                if at is not None:  # a packed part: memory of its own again (a normal tensor, as in _pack)
                    with _outside_inference(p), torch.no_grad():
                        parts.append(p.detach()[at:at + n].view(shape).clone())
                    continue
                if id(p) not in plain:
                    plain[id(p)] = _marked(p.detach(), spec, part)
                parts.append(plain[id(p)])
            rebuilt[name] = spec.build(parts)
            count += 1
        module.__class__ = type(module).__dict__["_svdquant_base"]
        items = list(module._parameters.items())
        for name, weight in sorted(rebuilt.items(), key=lambda kv: specs[kv[0]].position):
            items.insert(min(specs[name].position, len(items)), (name, nn.Parameter(weight, requires_grad=False)))
        module._parameters.clear()
        module._parameters.update(items)
    return count


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    # the usual layout: '<prefix>weight' holding the quantized weight, not its parts' parameters
    for name, spec in _specs(module).items():
        for k in spec.params():
            state_dict.pop(prefix + k, None)
        state_dict[prefix + name] = getattr(module, name)
    return state_dict


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # any load (with or without this module's keys: a strict one would report the parts' internal names as missing)
    if _specs(module):
        raise RuntimeError(f"load_state_dict into {prefix or 'the model'}: its quantized weights are unwrapped for "
                           "torch.compile (svdquant_ops.unwrap_weights); call svdquant_ops.rewrap_weights(model) "
                           "before loading, and unwrap again after")
