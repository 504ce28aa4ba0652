"""SVDQuantTensor: the weight of an SVDQuant linear, as a torchao tensor subclass.

It holds everything the kernels read, already in the layout they read (no transposes or slicing in the forward
path): packed residual codes ``qweight`` [N, K/2], their scales ``wscales`` [N, K/g] (model dtype for int4, fp8
for nvfp4, uint8 multipliers in [1, 18] for w4a8), the global scale ``wglobal`` (nvfp4: fp32 [1] or [N]; w4a8: the
fp32 per-output-channel scale [N]; int4: None), the smoothing vector ``smooth`` [K], the low-rank factors
``proj_down`` [K, R] (multiplies the raw input) and ``proj_up`` [N, R], and for GELU-fed int4 layers a
``bias_correction`` [N] that undoes the input shift.
``F.linear(x, weight, bias)`` on it runs ``svdquant::linear``. Its logical shape is the 16-bit weight's [N, K] and
its dtype is the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from . import ops
from .formats import FLOAT_DTYPES, GROUP_SIZE, INT4, NVFP4, W4A8, W4A8_MULT_MAX, check_precision
from .layout import LAYOUT_VERSION, check_layout_version, pack_nibbles, unpack_nibbles
from .quantize.decompose import SVDQuantParts, decompose
from .quantize.quantizers import dequantize as dequantize_codes

aten = torch.ops.aten
RANK_MULTIPLE = 16  # ranks are zero-padded to a multiple of 16 (exact) so GPU kernels see whole MMA tiles


def _pad_rank(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[1]) % RANK_MULTIPLE
    return F.pad(t, (0, pad)) if pad else t


class SVDQuantTensor(TorchAOBaseTensor):
    tensor_data_names = ["qweight", "wscales", "smooth", "proj_down", "proj_up"]
    tensor_attribute_names = ["precision", "act_unsigned", "layout_version", "dtype"]
    optional_tensor_data_names = ["wglobal", "bias_correction"]

    def __new__(cls, qweight, wscales, smooth, proj_down, proj_up, precision, act_unsigned, layout_version, dtype,
                wglobal=None, bias_correction=None):
        shape = (qweight.shape[0], qweight.shape[1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qweight.device,
                                                   requires_grad=False)

    def __init__(self, qweight, wscales, smooth, proj_down, proj_up, precision, act_unsigned, layout_version, dtype,
                 wglobal=None, bias_correction=None):
        super().__init__()
        check_precision(precision)
        check_layout_version(layout_version)
        n, k = qweight.shape[0], qweight.shape[1] * 2
        gs = GROUP_SIZE[precision]
        r = proj_down.shape[-1]
        scale_dtypes = {INT4: FLOAT_DTYPES, NVFP4: (torch.float8_e4m3fn,), W4A8: (torch.uint8,)}[precision]
        expect = {
            "qweight": (qweight, (n, k // 2), (torch.uint8,)),
            "wscales": (wscales, (n, k // gs), scale_dtypes),
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
        if (wglobal is not None) != (precision != INT4):
            given = "given" if wglobal is not None else "None"
            raise ValueError("SVDQuantTensor: wglobal is required for precisions 'nvfp4' and 'w4a8' and must be None "
                             f"for 'int4' (precision {precision!r}, wglobal {given})")
        if precision == W4A8 and (tuple(wglobal.shape) != (n,) or wglobal.dtype != torch.float32):
            raise ValueError(f"SVDQuantTensor: wglobal must have shape [{n}] and dtype torch.float32 for precision "
                             f"'w4a8' (the per-output-channel scale), got {list(wglobal.shape)} {wglobal.dtype} "
                             "(corrupt checkpoint?)")
        if act_unsigned and precision != INT4:
            raise ValueError("SVDQuantTensor: act_unsigned is only defined for precision 'int4'")
        self.qweight = qweight
        self.wscales = wscales
        self.smooth = smooth
        self.proj_down = proj_down
        self.proj_up = proj_up
        self.precision = precision
        self.act_unsigned = bool(act_unsigned)
        self.layout_version = int(layout_version)
        self.wglobal = wglobal
        self.bias_correction = bias_correction

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_parts(cls, parts: SVDQuantParts, dtype: torch.dtype) -> "SVDQuantTensor":
        codes = parts.codes if parts.precision != NVFP4 else parts.codes.to(torch.uint8)
        qt = cls(
            pack_nibbles(codes).contiguous(), parts.scales.contiguous(), parts.smooth.to(dtype).contiguous(),
            _pad_rank(parts.proj_down.to(dtype)).contiguous(), _pad_rank(parts.proj_up.to(dtype)).contiguous(),
            parts.precision, parts.act_unsigned, LAYOUT_VERSION, dtype,
            wglobal=None if parts.global_scale is None else parts.global_scale.float().contiguous(),
            bias_correction=None if parts.bias_correction is None else parts.bias_correction.float().contiguous(),
        )
        if parts.precision == W4A8:
            qt._validate_w4a8()  # offline, so the value check costs nothing that matters
        return qt

    @classmethod
    def from_hp(cls, weight: torch.Tensor, precision: str = "int4", rank: int = 32, *,
                smooth: torch.Tensor | None = None, svd: str = "exact", act_unsigned: bool = False,
                per_channel_global: bool = False, seed: int = 0) -> "SVDQuantTensor":
        """Data-free SVDQuant of a 16-bit weight [N, K]: λ (default 1), truncated SVD, RTN residual."""
        parts = decompose(weight, precision=precision, rank=rank, smooth=smooth, svd=svd, act_unsigned=act_unsigned,
                          per_channel_global=per_channel_global, dtype=weight.dtype, seed=seed)
        return cls.from_parts(parts, weight.dtype)

    # ---------------------------------------------------------------- inspection
    @property
    def rank(self) -> int:
        return self.proj_down.shape[1]

    def _data_tensors(self) -> list[torch.Tensor]:
        names = self.tensor_data_names + self.optional_tensor_data_names
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def _validate_w4a8(self) -> None:
        if self.wscales.numel():
            lo, hi = int(self.wscales.min()), int(self.wscales.max())
            if lo < 1 or hi > W4A8_MULT_MAX:
                raise ValueError(f"SVDQuantTensor: wscales (W4A8 multipliers) must be in [1, {W4A8_MULT_MAX}], found "
                                 f"{lo if lo < 1 else hi} (corrupt checkpoint?)")
        if not torch.isfinite(self.wglobal).all():
            raise ValueError("SVDQuantTensor: wglobal contains NaN or Inf (corrupt checkpoint?)")
        if not (self.wglobal >= 0).all():
            raise ValueError("SVDQuantTensor: wglobal (W4A8 per-channel scale) must be >= 0 everywhere, found a "
                             "negative value (corrupt checkpoint?)")

    def validate(self) -> "SVDQuantTensor":
        """Value checks (finite, positive λ; W4A8 multipliers in [1, 18] and per-channel scale >= 0) that the
        constructor skips to stay sync-free; run after loading (``load_file``) and by ``from_parts``."""
        if self.precision == W4A8:
            self._validate_w4a8()
        for name in ("wscales", "smooth", "proj_down", "proj_up", "wglobal", "bias_correction"):
            t = getattr(self, name)
            if t is not None and t.numel() and not torch.isfinite(t.float()).all():
                raise ValueError(f"SVDQuantTensor: {name} contains NaN or Inf (corrupt checkpoint?)")
        if not (self.smooth.float() > 0).all():
            raise ValueError("SVDQuantTensor: smooth must be > 0 everywhere (corrupt checkpoint?)")
        return self

    def residual(self) -> torch.Tensor:
        """Dequantized 4-bit residual Q(R) in smoothed coordinates, fp32 [N, K]."""
        codes = unpack_nibbles(self.qweight, signed=self.precision != NVFP4)
        return dequantize_codes(codes, self.wscales, self.precision, self.wglobal)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective 16-bit weight: Q(R)·diag(1/λ) + proj_up·proj_downᵀ."""
        w = self.residual() / self.smooth.float() + self.proj_up.float() @ self.proj_down.float().T
        return w.to(output_dtype or self.dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"SVDQuantTensor(precision={self.precision!r}, shape=[{n}, {k}], rank={self.rank}, dtype={self.dtype}, "
                f"act_unsigned={self.act_unsigned}, layout_version={self.layout_version}, device={self.device})")

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"SVDQuant linear: input dtype {x.dtype} does not match the quantized weight's dtype "
                            f"{self.dtype}; cast the input or the model")
        if self.bias_correction is not None:
            bias = self.bias_correction if bias is None else bias.float() + self.bias_correction
        return ops.linear(x, self.smooth, self.proj_down, self.qweight, self.wscales, self.wglobal, self.proj_up,
                          bias, self.precision, self.act_unsigned)


implements = SVDQuantTensor.implements
implements_torch_function = SVDQuantTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return w.linear(x, bias)


@implements(aten.is_pinned.default)
def _(func, types, args, kwargs):
    w = args[0]
    return all(t.is_pinned() for t in w._data_tensors())


@implements(aten._pin_memory.default)
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


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """.to(device) moves every part; .to(dtype) changes the model dtype of the 16-bit parts (smooth and the
    low-rank factors); codes and weight scales are kept bit-exact (the GEMM reads scales of any float dtype)."""
    self = args[0]
    kw = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype, nb = kw["device"], kw["dtype"], kw["non_blocking"]
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"SVDQuantTensor can only be cast to {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")

    def move(t, cast):
        if t is None:
            return None
        t = t.to(device, non_blocking=nb)
        return t.to(dtype) if cast else t

    return SVDQuantTensor(
        move(self.qweight, False), move(self.wscales, False), move(self.smooth, True), move(self.proj_down, True),
        move(self.proj_up, True), self.precision, self.act_unsigned, self.layout_version, dtype,
        wglobal=move(self.wglobal, False), bias_correction=move(self.bias_correction, False))
