"""PackedWeight: what every quantized weight of ours shares, whatever its format. A torchao tensor subclass whose
logical shape and dtype are the 16-bit weight's, holding its parts as plain tensors (``tensor_data_names``).

Shared here, registered once and inherited by each format's class (torchao copies a parent's handlers into a
subclass defined after them): device and dtype moves in every autograd mode, pinning, in-place loading
(``copy_``) and the ``Cls(weight, requires_grad=False)`` rewrap accelerate uses. A subclass names the parts that
follow the model dtype on ``.to(dtype)`` in ``dtype_fields``; every other part stays bit-exact. Parts that several
weights may hold as one tensor (``shared_fields``) are still one tensor after a move.
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from ..formats import FLOAT_DTYPES
from .shared_moves import LOAD_IN_PLACE, SHARED_MARK, copy_part, move_part

aten = torch.ops.aten

try:  # any exception while AOTAutograd computes its cache key bypasses the cache; this one says it is deliberate
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache as _BypassAOTAutogradCache
except ImportError:  # pragma: no cover - another torch layout
    _BypassAOTAutogradCache = RuntimeError


def _computing_aot_cache_key() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "autograd_cache_key" and frame.f_globals.get("__name__", "").startswith("torch."):
            return True
        frame = frame.f_back
    return False


class PackedWeight(TorchAOBaseTensor):
    dtype_fields: tuple[str, ...] = ()  # parts cast to the new model dtype by .to(dtype)
    shared_fields: tuple[str, ...] = ()  # parts several weights may hold as one tensor; a move keeps them shared
    positive_fields: tuple[str, ...] = ()  # dtype_fields a cast must not flush to 0 (λ, which inputs are divided by)
    optional_tensor_data_names: list[str] = []  # parts that may be None

    # torch's `param.data = value` replaces only a wrapper subclass's own metadata (shape, dtype, device) and keeps
    # its parts: the layer would report one weight and compute with another. Take a weight of the same class, shape
    # and format by its parts instead (aliased, as .data aliases a plain tensor's storage); refuse anything else.
    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self, type(self))

    @data.setter
    def data(self, value):
        cls = type(self).__name__
        if type(value) is not type(self) or value.shape != self.shape:
            shape = getattr(value, "shape", None)
            raise TypeError(f"{cls}.data = ...: expected {cls} of shape {list(self.shape)}, got "
                            f"{type(value).__name__}{'' if shape is None else f' of shape {list(shape)}'}; to change "
                            "a quantized weight, quantize the layer again or load a state dict")
        for name in self.tensor_attribute_names:
            if getattr(value, name) != getattr(self, name):
                raise TypeError(f"{cls}.data = ...: {name} differs ({getattr(value, name)!r}, the weight has "
                                f"{getattr(self, name)!r}); quantize the layer again instead")
        torch._C.TensorBase.data.__set__(self, value)  # the wrapper's device
        for name in self.tensor_data_names + self.optional_tensor_data_names:
            setattr(self, name, getattr(value, name))
        if value.__dict__.get("_holds_shared"):
            self._holds_shared = True

    def _data_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.__tensor_flatten__()[0]]

    def validate(self):  # overridden by formats with value checks beyond shapes and dtypes
        return self

    def _stable_hash_for_caching(self) -> str:
        # AOTAutograd's cache key for a weight that is a graph input: what the compiled graph depends on (class,
        # logical shape, format attributes, each part's metadata), never the values. Without it torch warns and
        # falls back to the same information through a generic path.
        names, attrs = self.__tensor_flatten__()
        if attrs.get("holds_shared"):
            # One part object held by several weights is one graph input (torch.compile deduplicates it, and the
            # merge pass in svdquant_ops.ops relies on that). A per-weight key cannot tell that layout from separate
            # parts of the same shapes, so a cached graph could be reused for the wrong one: keep it out of the
            # AOTAutograd cache (Inductor's own cache keys the graph, which shows the layout, and still applies).
            raise _BypassAOTAutogradCache(f"{type(self).__name__} holds parts shared with other weights")
        parts = [(n, tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype), str(t.device))
                 for n in names for t in (getattr(self, n),)]
        key = (type(self).__module__, type(self).__qualname__, tuple(self.shape), self.requires_grad,
               sorted((k, str(v)) for k, v in attrs.items()), parts)
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def __reduce_ex__(self, protocol):
        # torch 2.11's AOTAutograd cache key pickles the fake weights torch.compile traced with (it has no
        # _stable_hash_for_caching): the same bypass there, for the same reason. Only inside that key's computation:
        # every other pickle (torch.save, also of fakes) works as always.
        if (self.__dict__.get("_holds_shared") and isinstance(getattr(self, self.tensor_data_names[0]), FakeTensor)
                and _computing_aot_cache_key()):
            raise _BypassAOTAutogradCache(f"{type(self).__name__} holds parts shared with other weights")
        return super().__reduce_ex__(protocol)

    def __tensor_flatten__(self):
        # torchao's generic version, without its hasattr probes and reading the instance dict directly: a compiled
        # model calls this twice per quantized weight and step (Dynamo's metadata guard, AOTAutograd's unwrapping),
        # ~1000 times per FLUX step.
        d = self.__dict__
        names = self.tensor_data_names + [n for n in self.optional_tensor_data_names if d[n] is not None]
        dtype = d.get("_dtype")
        if dtype is None:  # a tensor's dtype never changes, and reading it goes through __torch_function__ (1.5 us)
            dtype = d["_dtype"] = self.dtype
        ctx = {a: dtype if a == "dtype" else d[a] for a in self.tensor_attribute_names}
        # whether a part may be one object with other weights' (shared_moves); the fake weight torch.compile
        # builds gets it through __tensor_unflatten__, for the cache key above
        if d.get("_holds_shared") or any(getattr(d[n], SHARED_MARK, False) for n in self.shared_fields):
            ctx["holds_shared"] = True
        return names, ctx

    @classmethod
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size, outer_stride):
        weight = super().__tensor_unflatten__(tensor_data_dict, tensor_attributes, outer_size, outer_stride)
        if tensor_attributes.get("holds_shared"):
            weight._holds_shared = True
        return weight


def check_on_unpickle(cls, rename: dict[str, str] | None = None) -> None:
    """Make an unpickled ``cls`` weight (``torch.load``, ``from_pretrained`` of a ``.bin`` file) value-checked like a
    safetensors one, the fields in ``rename`` renamed first. Wraps torchao's ``__setstate__``, which its
    ``__init_subclass__`` installs after the class body, so it is called once the class exists."""
    inner = cls.__setstate__

    def __setstate__(self, state: dict) -> None:
        if rename:
            state = {rename.get(k, k): v for k, v in state.items()}
        inner(self, state)
        part = getattr(self, self.tensor_data_names[0])
        if part.device.type != "meta" and not isinstance(part, FakeTensor):  # shapes without values: nothing to check
            self.validate()

    cls.__setstate__ = __setstate__


def distinct_nbytes(tensors) -> int:
    """Bytes held by ``tensors``, each storage counted once. Tensor subclasses (our quantized weights, torchao's)
    count by their inner tensors, not their logical 16-bit size; the members of a shared input group hold one λ and
    one down projection (``quantize.sharing``), counted once."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen, total = set(), 0
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if t is None:
            continue
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            stack.extend(getattr(t, n) for n in names)
            continue
        if t.device.type == "meta":  # no storage to tell apart
            total += t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def rewrap(weight: PackedWeight, requires_grad: bool, extra) -> PackedWeight:
    """``Cls(weight, requires_grad=False)``, the call ``nn.Parameter`` subclasses answer and accelerate's offloading
    makes to rebuild a parameter of a class it does not know: a new wrapper around the same parts."""
    if extra is not None:
        raise TypeError(f"{type(weight).__name__}(weight, ...) takes only requires_grad besides the weight")
    if requires_grad:
        raise ValueError(f"{type(weight).__name__} does not support requires_grad=True: the 4-bit weight is frozen "
                         "(inputs and biases do get gradients)")
    return alias(weight)


def alias(weight: PackedWeight) -> PackedWeight:
    """A new wrapper around the same parts."""
    return weight._apply_fn_to_data(lambda t: t)


implements = PackedWeight.implements
implements_torch_function = PackedWeight.implements_torch_function


@implements(aten.detach.default)
def _(func, types, args, kwargs):
    # nn.Parameter(weight) detaches. torchao's handler detaches every part into a new view; the parts never require
    # grad, so the new wrapper holds the very same part objects instead: parts that several weights share stay one
    # object, which torch.compile turns into one graph input for all of them. Under inference_mode a normal weight's
    # alias is made as a normal tensor (an inference tensor has no version counter to share with it).
    with torch.inference_mode(False) if not args[0].is_inference() else nullcontext():
        return return_and_correct_aliasing(func, args, kwargs, alias(args[0]))


@implements(aten.is_pinned.default)
def _(func, types, args, kwargs):
    return all(t.is_pinned() for t in args[0]._data_tensors())


@implements([aten._pin_memory.default, aten.pin_memory.default])
def _(func, types, args, kwargs):
    return args[0]._apply_fn_to_data(lambda t: t.pin_memory())


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    """load_state_dict into an already-quantized model: parts are copied in place when the layouts agree, except a
    shared part whose values differ, which this weight gets its own copy of."""
    dst, src = args[0], args[1]
    cls = type(dst).__name__
    if type(src) is not type(dst):
        raise TypeError(f"cannot copy a {type(src).__name__} into a {cls}; load the state dict with assign=True or "
                        "quantize the model the same way first")
    for name in dst.tensor_attribute_names:
        if getattr(dst, name) != getattr(src, name):
            raise ValueError(f"cannot load {cls}: {name} differs ({getattr(src, name)!r} in the state dict, "
                             f"{getattr(dst, name)!r} in the model); quantize the model with the same config or "
                             "load with assign=True")
    for name in dst.tensor_data_names + dst.optional_tensor_data_names:
        a, b = getattr(dst, name), getattr(src, name)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            what = "present" if b is not None else "absent"
            raise ValueError(f"cannot load {cls}: part {name} is {what} in the state dict with shape "
                             f"{None if b is None else list(b.shape)} but {None if a is None else list(a.shape)} in "
                             "the model; quantize the model with the same config or load with assign=True")
        if a is not None and a.dtype != b.dtype:  # a silent cast would round scales: outputs would change
            raise ValueError(f"cannot load {cls}: part {name} has dtype {b.dtype} in the state dict but {a.dtype} in "
                             "the model; load with assign=True or quantize the model in the same dtype")
    # the values load_file checks (finite parts, positive λ, W4A8's multipliers), before anything is written: NaN
    # in a low-rank factor would otherwise load silently and make every output NaN
    if not any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in src._data_tensors()):
        src.validate()
    for name in dst.tensor_data_names + dst.optional_tensor_data_names:
        a, b = getattr(dst, name), getattr(src, name)
        if a is None:
            continue
        if name in dst.shared_fields and getattr(a, SHARED_MARK, False) and not getattr(a, LOAD_IN_PLACE, False):
            # other weights hold this very tensor (share_inputs): writing into it would hand them this weight's
            # values, unless the load gives all of them the same (share_inputs' load hook then sets LOAD_IN_PLACE).
            # Equal values need no write; other values go into a copy of this weight's own.
            if not torch.equal(a, b.to(a.device)):
                with torch.inference_mode(False) if not a.is_inference() else nullcontext():
                    own = torch.empty_like(a)
                own.copy_(b)
                setattr(dst, name, own)
            continue
        a.copy_(b)
    return dst


def _moved(self: PackedWeight, device, dtype, non_blocking: bool) -> PackedWeight:
    """A copy of ``self`` on ``device`` with model dtype ``dtype``: every part moves; the ``dtype_fields`` take the
    new dtype; codes and scales stay bit-exact (the kernels read scales of any float dtype). ``shared_fields`` that
    several weights hold as one tensor stay one tensor (``shared_moves``)."""
    device = self.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:  # one key per physical device
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = self.dtype if dtype is None else dtype

    def move(name, t):
        to = dtype if name in self.dtype_fields else None
        if name in self.shared_fields:
            return move_part(self, t, device, to, non_blocking)
        return copy_part(t, device, to, non_blocking)

    moved = _rebuilt(self, move, dtype)
    if dtype != self.dtype:  # a narrower dtype can overflow a calibrated λ's range (or take a tiny λ to 0)
        for name in self.tensor_data_names:
            t = getattr(moved, name)
            if (name in self.dtype_fields and t.device.type != "meta"
                    and not _representable(getattr(self, name), t, nonzero=name in self.positive_fields)):
                src = getattr(self, name).float().abs()
                raise ValueError(f"{type(self).__name__}: converting to {dtype} overflows {name} or flushes it to 0 "
                                 f"(|values| from {src.min().item():.3g} to {src.max().item():.3g}); keep this model "
                                 f"in {self.dtype} or quantize it again in {dtype}")
    return moved


def _rebuilt(self: PackedWeight, part, dtype: torch.dtype) -> PackedWeight:
    """A new weight of ``self``'s type and attributes with model dtype ``dtype``, each present part ``t`` named
    ``name`` replaced by ``part(name, t)``."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{type(self).__name__} can only be cast to {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")

    def one(name):
        t = getattr(self, name)
        return None if t is None else part(name, t)

    data = [one(n) for n in self.tensor_data_names]
    optional = {n: one(n) for n in self.optional_tensor_data_names}
    attrs = [dtype if a == "dtype" else getattr(self, a) for a in self.tensor_attribute_names]
    return type(self)(*data, *attrs, **optional)


def _representable(src: torch.Tensor, dst: torch.Tensor, nonzero: bool) -> bool:
    """Whether casting ``src`` gave ``dst`` with no new Inf (and, with ``nonzero``, no value flushed to zero)."""
    s, d = src.float(), dst.to(src.device).float()
    return bool((torch.isfinite(d) | ~torch.isfinite(s)).all() and (not nonzero or ((d != 0) | (s == 0)).all()))


# The wrapper has no storage of its own, and torch's share_memory_ / is_shared read it (a segfault): they act on
# the parts instead, which is what a worker process receiving the module needs.
@implements_torch_function(torch.Tensor.share_memory_)
def _(func, types, args, kwargs):
    for t in args[0]._data_tensors():
        t.share_memory_()
    return args[0]


@implements_torch_function(torch.Tensor.is_shared)
def _(func, types, args, kwargs):
    return all(t.is_shared() for t in args[0]._data_tensors())


@implements(aten.empty_like.default)
def _(func, types, args, kwargs):
    """``module.to_empty(device=...)`` (a model built on the meta device, then loaded): every part uninitialized on
    the device, the model dtype from ``dtype`` where given. Parts that were shared come out separate; the load fills
    them."""
    self, kwargs = args[0], kwargs or {}
    device = self.device if kwargs.get("device") is None else torch.device(kwargs["device"])
    dtype = kwargs.get("dtype") or self.dtype

    def empty(name, t):
        return torch.empty_like(t, device=device, dtype=dtype if name in self.dtype_fields else t.dtype)

    return _rebuilt(self, empty, dtype)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    kw = args[0]._get_to_kwargs(*args[1:], **kwargs)
    return _moved(args[0], kw["device"], kw["dtype"], kw["non_blocking"])


# Under inference_mode the aten.to overloads reach the subclass undecomposed; torchao's inherited handler returns
# an alias with corrected storage, which is wrong for a device change. Each one is a _to_copy, or an alias when
# nothing changes and no copy is asked for (as aten.to does). The alias is a new wrapper around the same parts, not
# self: nn.Module._apply swaps a parameter with what .to returned, and swapping a tensor with itself fails under
# inference_mode.
def _to(self: PackedWeight, device, dtype, non_blocking: bool, copy: bool) -> PackedWeight:
    same_device = device is None or _same_device(self.device, device)
    if not copy and same_device and (dtype is None or dtype == self.dtype):
        return alias(self)
    return _moved(self, device, dtype, non_blocking)  # a full copy, as .to(dtype) of a plain tensor: no shared parts


def _same_device(a: torch.device, b) -> bool:
    b = torch.device(b)
    if b.type == "cuda" and b.index is None:  # "cuda" means the current device
        b = torch.device("cuda", torch.cuda.current_device())
    return a == b


def _plain(func, args, kwargs):
    """The call as torch runs it without us, where the weight is only an argument (``x.to(weight)``)."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **(kwargs or {}))


# Tensor.cpu() / .cuda() / .to() of a tensor already there return the very same object (aten.to aliases without
# reaching the subclass outside inference_mode). Code that keeps that result as a separate copy and later swaps the
# parameter (diffusers' group offloading with low_cpu_mem_usage) would then see its "CPU copy" move too: return a
# new wrapper.
@implements_torch_function(torch.Tensor.cpu)
def _(func, types, args, kwargs):
    return _to(args[0], "cpu", None, False, False)


@implements_torch_function(torch.Tensor.to)
def _(func, types, args, kwargs):
    if not isinstance(args[0], PackedWeight):
        return _plain(func, args, kwargs)
    kwargs = dict(kwargs or {})
    rest = list(args[1:])
    copy = kwargs.pop("copy", False)
    if len(rest) >= 2 and all(isinstance(v, bool) for v in rest[-2:]):  # ..., non_blocking, copy positionally
        copy = rest.pop()
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
    return _to(args[0], device, dtype, non_blocking, copy)


@implements_torch_function(torch.Tensor.cuda)
def _(func, types, args, kwargs):
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    return _to(args[0], device, None, kwargs.get("non_blocking", False), False)


@implements([aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten.to.other])
def _(func, types, args, kwargs):
    a = {arg.name: v for arg, v in zip(func._schema.arguments, args)} | dict(kwargs)  # bind to the schema's names
    other = a.get("other")
    device = other.device if other is not None else a.get("device")
    dtype = other.dtype if other is not None else a.get("dtype")
    non_blocking, copy = bool(a.get("non_blocking", False)), bool(a.get("copy", False))
    if not isinstance(a["self"], PackedWeight):  # x.to(weight) under inference_mode: an ordinary move of x
        return a["self"].to(device, dtype, non_blocking, copy)
    return _to(a["self"], device, dtype, non_blocking, copy)
