"""SVDQuantTensor: the weight of an SVDQuant linear, as a torchao tensor subclass.

Fields (one name each, used alike by the algorithm's ``SVDQuantParts``, the ops' arguments and checkpoint keys,
which torchao writes as ``<module>._weight_<field>``):

* ``codes`` uint8 [N, K/2]: the 4-bit residual codes, packed as ``layout.py`` says (version ``layout_version``),
* ``scales`` [N, K/g]: their group scales (model dtype for int4, fp8 e4m3 for nvfp4, uint8 multipliers in [1, 18]
  for w4a8),
* ``global_scale`` fp32: nvfp4 [1] or [N], w4a8 the per-output-channel scale [N], int4 None,
* ``smooth`` [K]: λ, the smoothing vector the input is divided by,
* ``proj_down`` [K, R] (multiplies the raw input) and ``proj_up`` [N, R]: the 16-bit low-rank branch, R a multiple
  of 16 (zero-padded, exact),
* ``bias_correction`` fp32 [N] or None: undoes the input shift of GELU-fed int4 layers (``act_unsigned``).

Everything is already in the layout the kernels read (no transposes or slicing in the forward path). Its logical
shape is the 16-bit weight's [N, K] and its dtype the model dtype. ``F.linear(x, weight, bias)`` on it runs
``svdquant::linear``: that dispatch is registered by ``svdquant_ops.ops`` (imported with the package), so this
module stays free of kernels. Built by ``from_parts`` (the offline algorithm, ``svdquant_ops.quantize``) or by
loading a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from ..formats import FLOAT_DTYPES, GROUP_SIZE, INT4, NVFP4, W4A8, W4A8_MULT_MAX, check_precision
from ..layout import LAYOUT_VERSION, check_layout_version, pack_nibbles, unpack_nibbles
from ..quantizers import dequantize as dequantize_codes
from .parts import SVDQuantParts

aten = torch.ops.aten
RANK_MULTIPLE = 16  # ranks are zero-padded to a multiple of 16 (exact) so GPU kernels see whole MMA tiles
# Field names written by svdquant_ops 0.1.0 (layout version 1 checkpoints), mapped to today's names.
LEGACY_FIELD_NAMES = {"qweight": "codes", "wscales": "scales", "wglobal": "global_scale"}


def _rewrap(weight: "SVDQuantTensor", requires_grad: bool, extra) -> "SVDQuantTensor":
    """``SVDQuantTensor(weight, requires_grad=False)``, the call ``nn.Parameter`` subclasses answer and accelerate's
    offloading makes to rebuild a parameter of a class it does not know: a new wrapper around the same parts."""
    if extra is not None:
        raise TypeError("SVDQuantTensor(weight, ...) takes only requires_grad besides the weight")
    if requires_grad:
        raise ValueError("SVDQuantTensor does not support requires_grad=True: its ops are inference-only")
    return _alias(weight)


def _alias(weight: "SVDQuantTensor") -> "SVDQuantTensor":
    """A new wrapper around the same parts."""
    return weight._apply_fn_to_data(lambda t: t)


def _pad_rank(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[1]) % RANK_MULTIPLE
    return F.pad(t, (0, pad)) if pad else t


class SVDQuantTensor(TorchAOBaseTensor):
    tensor_data_names = ["codes", "scales", "smooth", "proj_down", "proj_up"]
    tensor_attribute_names = ["precision", "act_unsigned", "layout_version", "dtype"]
    optional_tensor_data_names = ["global_scale", "bias_correction"]

    def __new__(cls, codes, scales=None, smooth=None, proj_down=None, proj_up=None, precision=None,
                act_unsigned=None, layout_version=None, dtype=None, global_scale=None, bias_correction=None,
                requires_grad=False):
        if isinstance(codes, SVDQuantTensor):  # SVDQuantTensor(weight, requires_grad=...): see _rewrap
            return _rewrap(codes, requires_grad, scales)
        shape = (codes.shape[0], codes.shape[1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes, scales=None, smooth=None, proj_down=None, proj_up=None, precision=None,
                 act_unsigned=None, layout_version=None, dtype=None, global_scale=None, bias_correction=None,
                 requires_grad=False):
        if isinstance(codes, SVDQuantTensor):  # built by __new__ already
            return
        super().__init__()
        check_precision(precision)
        check_layout_version(layout_version)
        n, k = codes.shape[0], codes.shape[1] * 2
        gs = GROUP_SIZE[precision]
        r = proj_down.shape[-1]
        scale_dtypes = {INT4: FLOAT_DTYPES, NVFP4: (torch.float8_e4m3fn,), W4A8: (torch.uint8,)}[precision]
        expect = {
            "codes": (codes, (n, k // 2), (torch.uint8,)),
            "scales": (scales, (n, k // gs), scale_dtypes),
            "smooth": (smooth, (k,), (dtype,)),
            "proj_down": (proj_down, (k, r), (dtype,)),
            "proj_up": (proj_up, (n, r), (dtype,)),
        }
        for name, (t, shape, dtypes) in expect.items():
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(f"SVDQuantTensor: {name} must have shape {list(shape)} and dtype in "
                                 f"{[str(d) for d in dtypes]}, got {list(t.shape)} {t.dtype} (corrupt checkpoint?)")
        if k % gs:
            raise ValueError(f"SVDQuantTensor: in_features ({k}) must be a multiple of {gs} for precision {precision!r}")
        if (global_scale is not None) != (precision != INT4):
            given = "given" if global_scale is not None else "None"
            raise ValueError("SVDQuantTensor: global_scale is required for precisions 'nvfp4' and 'w4a8' and must be "
                             f"None for 'int4' (precision {precision!r}, global_scale {given})")
        if precision == W4A8 and (tuple(global_scale.shape) != (n,) or global_scale.dtype != torch.float32):
            raise ValueError(f"SVDQuantTensor: global_scale must have shape [{n}] and dtype torch.float32 for "
                             f"precision 'w4a8' (the per-output-channel scale), got {list(global_scale.shape)} "
                             f"{global_scale.dtype} (corrupt checkpoint?)")
        if act_unsigned and precision != INT4:
            raise ValueError("SVDQuantTensor: act_unsigned is only defined for precision 'int4'")
        self.codes = codes
        self.scales = scales
        self.smooth = smooth
        self.proj_down = proj_down
        self.proj_up = proj_up
        self.precision = precision
        self.act_unsigned = bool(act_unsigned)
        self.layout_version = int(layout_version)
        self.global_scale = global_scale
        self.bias_correction = bias_correction

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_parts(cls, parts: SVDQuantParts, dtype: torch.dtype) -> "SVDQuantTensor":
        """Pack the algorithm's unpacked parts into the storage layout (rank padded to ``RANK_MULTIPLE``)."""
        codes = parts.codes if parts.precision != NVFP4 else parts.codes.to(torch.uint8)
        qt = cls(
            pack_nibbles(codes).contiguous(), parts.scales.contiguous(), parts.smooth.to(dtype).contiguous(),
            _pad_rank(parts.proj_down.to(dtype)).contiguous(), _pad_rank(parts.proj_up.to(dtype)).contiguous(),
            parts.precision, parts.act_unsigned, LAYOUT_VERSION, dtype,
            global_scale=None if parts.global_scale is None else parts.global_scale.float().contiguous(),
            bias_correction=None if parts.bias_correction is None else parts.bias_correction.float().contiguous(),
        )
        if parts.precision == W4A8:
            qt._validate_w4a8()  # offline, so the value check costs nothing that matters
        return qt

    # ---------------------------------------------------------------- inspection
    @property
    def rank(self) -> int:
        return self.proj_down.shape[1]

    def storage_nbytes(self) -> int:
        """Bytes held by all parts (the logical ``nbytes`` would count a 16-bit [N, K] weight)."""
        return sum(t.numel() * t.element_size() for t in self._data_tensors())

    def _data_tensors(self) -> list[torch.Tensor]:
        names = self.tensor_data_names + self.optional_tensor_data_names
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def _validate_w4a8(self) -> None:
        if self.scales.numel():
            lo, hi = int(self.scales.min()), int(self.scales.max())
            if lo < 1 or hi > W4A8_MULT_MAX:
                raise ValueError(f"SVDQuantTensor: scales (W4A8 multipliers) must be in [1, {W4A8_MULT_MAX}], found "
                                 f"{lo if lo < 1 else hi} (corrupt checkpoint?)")
        if not torch.isfinite(self.global_scale).all():
            raise ValueError("SVDQuantTensor: global_scale contains NaN or Inf (corrupt checkpoint?)")
        if not (self.global_scale >= 0).all():
            raise ValueError("SVDQuantTensor: global_scale (W4A8 per-channel scale) must be >= 0 everywhere, found a "
                             "negative value (corrupt checkpoint?)")

    def validate(self) -> "SVDQuantTensor":
        """Value checks (finite, positive λ; W4A8 multipliers in [1, 18] and per-channel scale >= 0) that the
        constructor skips to stay sync-free; run after loading (``load_file``) and by ``from_parts``."""
        if self.precision == W4A8:
            self._validate_w4a8()
        for name in ("scales", "smooth", "proj_down", "proj_up", "global_scale", "bias_correction"):
            t = getattr(self, name)
            if t is not None and t.numel() and not torch.isfinite(t.float()).all():
                raise ValueError(f"SVDQuantTensor: {name} contains NaN or Inf (corrupt checkpoint?)")
        if not (self.smooth.float() > 0).all():
            raise ValueError("SVDQuantTensor: smooth must be > 0 everywhere (corrupt checkpoint?)")
        return self

    def residual(self) -> torch.Tensor:
        """Dequantized 4-bit residual Q(R) in smoothed coordinates, fp32 [N, K]."""
        codes = unpack_nibbles(self.codes, signed=self.precision != NVFP4)
        return dequantize_codes(codes, self.scales, self.precision, self.global_scale)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective 16-bit weight: Q(R)·diag(1/λ) + proj_up·proj_downᵀ."""
        w = self.residual() / self.smooth.float() + self.proj_up.float() @ self.proj_down.float().T
        return w.to(output_dtype or self.dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"SVDQuantTensor(precision={self.precision!r}, shape=[{n}, {k}], rank={self.rank}, dtype={self.dtype}, "
                f"act_unsigned={self.act_unsigned}, layout_version={self.layout_version}, device={self.device})")


implements = SVDQuantTensor.implements
implements_torch_function = SVDQuantTensor.implements_torch_function


@implements(aten.is_pinned.default)
def _(func, types, args, kwargs):
    w = args[0]
    return all(t.is_pinned() for t in w._data_tensors())


@implements([aten._pin_memory.default, aten.pin_memory.default])
def _(func, types, args, kwargs):
    return args[0]._apply_fn_to_data(lambda t: t.pin_memory())


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    """load_state_dict into an already-quantized model: parts are copied in place when the layouts agree."""
    dst, src = args[0], args[1]
    if not isinstance(src, SVDQuantTensor):
        raise TypeError(f"cannot copy a {type(src).__name__} into an SVDQuantTensor; load the state dict with "
                        "assign=True or quantize the model the same way first")
    for name in dst.tensor_attribute_names:
        if getattr(dst, name) != getattr(src, name):
            raise ValueError(f"cannot load SVDQuantTensor: {name} differs ({getattr(src, name)!r} in the state dict, "
                             f"{getattr(dst, name)!r} in the model); quantize the model with the same config or "
                             "load with assign=True")
    for name in dst.tensor_data_names + dst.optional_tensor_data_names:
        a, b = getattr(dst, name), getattr(src, name)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            what = "present" if b is not None else "absent"
            raise ValueError(f"cannot load SVDQuantTensor: part {name} is {what} in the state dict with shape "
                             f"{None if b is None else list(b.shape)} but {None if a is None else list(a.shape)} in "
                             "the model; quantize the model with the same config or load with assign=True")
        if a is not None:
            a.copy_(b)
    return dst


def _moved(self: SVDQuantTensor, device, dtype, non_blocking: bool) -> SVDQuantTensor:
    """A copy of ``self`` on ``device`` with model dtype ``dtype``: every part moves; the 16-bit parts (smooth and the
    low-rank factors) take the new dtype; codes and weight scales stay bit-exact (the GEMM reads scales of any
    float dtype)."""
    device = self.device if device is None else torch.device(device)
    dtype = self.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"SVDQuantTensor can only be cast to {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")

    def move(t, cast):
        if t is None:
            return None
        t = t.to(device, non_blocking=non_blocking, copy=not (cast and t.dtype != dtype))  # the cast copies
        return t.to(dtype) if cast else t

    return SVDQuantTensor(
        move(self.codes, False), move(self.scales, False), move(self.smooth, True), move(self.proj_down, True),
        move(self.proj_up, True), self.precision, self.act_unsigned, self.layout_version, dtype,
        global_scale=move(self.global_scale, False), bias_correction=move(self.bias_correction, False))


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    kw = args[0]._get_to_kwargs(*args[1:], **kwargs)
    return _moved(args[0], kw["device"], kw["dtype"], kw["non_blocking"])


# Under inference_mode the aten.to overloads reach the subclass undecomposed; torchao's inherited handler returns
# an alias with corrected storage, which is wrong for a device change. Each one is a _to_copy, or an alias when
# nothing changes and no copy is asked for (as aten.to does). The alias is a new wrapper around the same parts, not
# self: nn.Module._apply swaps a parameter with what .to returned, and swapping a tensor with itself fails under
# inference_mode.
def _to(self: SVDQuantTensor, device, dtype, non_blocking: bool, copy: bool) -> SVDQuantTensor:
    same_device = device is None or _same_device(self.device, device)
    if not copy and same_device and (dtype is None or dtype == self.dtype):
        return _alias(self)
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
    if not isinstance(args[0], SVDQuantTensor):
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
    if not isinstance(a["self"], SVDQuantTensor):  # x.to(weight) under inference_mode: an ordinary move of x
        return a["self"].to(device, dtype, non_blocking, copy)
    return _to(a["self"], device, dtype, non_blocking, copy)


def _setstate(self, state: dict) -> None:
    """Unpickling (``torch.load``): rename the fields of checkpoints written by svdquant_ops 0.1.0 (layout 1)."""
    state = {LEGACY_FIELD_NAMES.get(k, k): v for k, v in state.items()}
    _torchao_setstate(self, state)


# torchao's __init_subclass__ installs its own __setstate__ after the class body runs; wrap it here.
_torchao_setstate = SVDQuantTensor.__setstate__
SVDQuantTensor.__setstate__ = _setstate
