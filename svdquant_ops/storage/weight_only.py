"""W4A16Tensor: a 4-bit weight-only linear weight (formats.py "w4a16"), as a torchao tensor subclass.

For linears that see one token per sample (AdaLN modulation): activation quantization buys nothing there, but the
weights are large (a quarter of FLUX.1's parameters), so they are stored in 4 bits and dequantized exactly on the
fly. Fields (checkpoint keys ``<module>._weight_<field>``):

* ``codes`` uint8 [N, K/2]: unsigned 4-bit codes, packed as ``layout.py`` says (version ``layout_version``),
* ``scales``, ``zeros`` [N, K/64], one float dtype: weight = code * scale + zero.

``F.linear(x, weight, bias)`` on it runs ``svdquant::w4a16_linear`` (dispatch registered by ``svdquant_ops.ops``).
"""

from __future__ import annotations

import torch

from ..formats import FLOAT_DTYPES, W4A16_GROUP
from ..layout import LAYOUT_VERSION, check_layout_version, pack_nibbles, unpack_nibbles
from ..quantizers import dequantize_w4a16, quantize_w4a16_weight
from .base import PackedWeight, check_on_unpickle, rewrap


class W4A16Tensor(PackedWeight):
    tensor_data_names = ["codes", "scales", "zeros"]
    tensor_attribute_names = ["layout_version", "dtype"]

    def __new__(cls, codes, scales=None, zeros=None, layout_version=None, dtype=None, requires_grad=False):
        if isinstance(codes, W4A16Tensor):  # W4A16Tensor(weight, requires_grad=...): see base.rewrap
            return rewrap(codes, requires_grad, scales)
        shape = (codes.shape[0], codes.shape[1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes, scales=None, zeros=None, layout_version=None, dtype=None, requires_grad=False):
        if isinstance(codes, W4A16Tensor):  # built by __new__ already
            return
        super().__init__()
        check_layout_version(layout_version)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"W4A16Tensor: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"W4A16Tensor: codes must be uint8 [N, K/2], got {list(codes.shape)} {codes.dtype} "
                             "(corrupt checkpoint?)")
        if scales is None or zeros is None:
            raise ValueError("W4A16Tensor: scales and zeros are required")
        n, k = codes.shape[0], codes.shape[1] * 2
        if k % W4A16_GROUP:
            raise ValueError(f"W4A16Tensor: in_features ({k}) must be a multiple of {W4A16_GROUP}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (n, k // W4A16_GROUP) or t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"W4A16Tensor: {name} must have shape [{n}, {k // W4A16_GROUP}] and a float dtype, "
                                 f"got {list(t.shape)} {t.dtype} (corrupt checkpoint?)")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.device != codes.device:
                raise ValueError(f"W4A16Tensor: {name} must be on the device of codes ({codes.device}), got {t.device}")
        if zeros.dtype != scales.dtype:
            raise ValueError(f"W4A16Tensor: zeros must have the dtype of scales ({scales.dtype}), got {zeros.dtype} "
                             "(corrupt checkpoint?)")
        self.codes = codes
        self.scales = scales
        self.zeros = zeros
        self.layout_version = int(layout_version)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "W4A16Tensor":
        """Quantize a 16-bit [N, K] weight (round to nearest, formats.py); scales and zeros in its dtype."""
        if weight.dim() != 2:
            raise ValueError(f"W4A16Tensor.from_float: weight must be 2-D [N, K], got shape {list(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"W4A16Tensor.from_float: weight must be {[str(d) for d in FLOAT_DTYPES]}, got "
                            f"{weight.dtype}")
        if weight.shape[1] % W4A16_GROUP:
            raise ValueError(f"W4A16Tensor.from_float: in_features ({weight.shape[1]}) must be a multiple of "
                             f"{W4A16_GROUP}")
        if not torch.isfinite(weight).all():
            raise ValueError("W4A16Tensor.from_float: weight contains NaN or Inf values; refusing to quantize a "
                             "corrupt weight")
        codes, scales, zeros = quantize_w4a16_weight(weight.detach(), weight.dtype)
        if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
            raise ValueError(f"W4A16Tensor.from_float: a group's range overflows {weight.dtype} (scale = (max - min) "
                             "/ 15 is not finite)")
        return cls(pack_nibbles(codes).contiguous(), scales.contiguous(), zeros.contiguous(), LAYOUT_VERSION,
                   weight.dtype)

    def validate(self) -> "W4A16Tensor":
        """Value checks the constructor skips to stay sync-free; run after loading."""
        for name in ("scales", "zeros"):
            if not torch.isfinite(getattr(self, name).float()).all():
                raise ValueError(f"W4A16Tensor: {name} contains NaN or Inf (corrupt checkpoint?)")
        if not (self.scales.float() >= 0).all():
            raise ValueError("W4A16Tensor: scales must be >= 0 (corrupt checkpoint?)")
        return self

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the op multiplies with: code * scale + zero (fp32, then ``output_dtype``)."""
        w = dequantize_w4a16(unpack_nibbles(self.codes, signed=False), self.scales, self.zeros)
        return w.to(output_dtype or self.dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"W4A16Tensor(shape=[{n}, {k}], dtype={self.dtype}, layout_version={self.layout_version}, "
                f"device={self.device})")


check_on_unpickle(W4A16Tensor)
