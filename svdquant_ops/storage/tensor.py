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

from ..formats import FLOAT_DTYPES, GROUP_SIZE, INT4, NVFP4, W4A8, W4A8_MULT_MAX, check_precision
from ..layout import LAYOUT_VERSION, check_layout_version, pack_nibbles, unpack_nibbles
from ..quantizers import dequantize as dequantize_codes
from .base import PackedWeight, check_on_unpickle, rewrap
from .parts import SVDQuantParts

aten = torch.ops.aten
RANK_MULTIPLE = 16  # ranks are zero-padded to a multiple of 16 (exact) so GPU kernels see whole MMA tiles
# Field names written by svdquant_ops 0.1.0 (layout version 1 checkpoints), mapped to today's names.
LEGACY_FIELD_NAMES = {"qweight": "codes", "wscales": "scales", "wglobal": "global_scale"}


def _pad_rank(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[1]) % RANK_MULTIPLE
    return F.pad(t, (0, pad)) if pad else t


class SVDQuantTensor(PackedWeight):
    tensor_data_names = ["codes", "scales", "smooth", "proj_down", "proj_up"]
    tensor_attribute_names = ["precision", "act_unsigned", "layout_version", "dtype"]
    optional_tensor_data_names = ["global_scale", "bias_correction"]
    dtype_fields = ("smooth", "proj_down", "proj_up")  # the 16-bit parts; codes and scales stay bit-exact
    positive_fields = ("smooth",)
    shared_fields = ("smooth", "proj_down")  # one tensor for the linears that read one input (share_inputs)

    def __new__(cls, codes, scales=None, smooth=None, proj_down=None, proj_up=None, precision=None,
                act_unsigned=None, layout_version=None, dtype=None, global_scale=None, bias_correction=None,
                requires_grad=False):
        if isinstance(codes, SVDQuantTensor):  # SVDQuantTensor(weight, requires_grad=...): see base.rewrap
            return rewrap(codes, requires_grad, scales)
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
        if precision == NVFP4 and (tuple(global_scale.shape) not in ((1,), (n,))
                                   or global_scale.dtype != torch.float32):
            raise ValueError(f"SVDQuantTensor: global_scale must have shape [1] (per tensor) or [{n}] (per output "
                             f"channel) and dtype torch.float32 for precision 'nvfp4', got "
                             f"{list(global_scale.shape)} {global_scale.dtype} (corrupt checkpoint?)")
        if bias_correction is not None and (tuple(bias_correction.shape) != (n,)
                                            or bias_correction.dtype != torch.float32):
            raise ValueError(f"SVDQuantTensor: bias_correction must have shape [{n}] and dtype torch.float32 (one "
                             f"correction per output channel), got {list(bias_correction.shape)} "
                             f"{bias_correction.dtype} (corrupt checkpoint?)")
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

    # ---------------------------------------------------------------- stacking along the outputs
    @classmethod
    def stack_rows(cls, weights: list["SVDQuantTensor"]) -> "SVDQuantTensor":
        """One weight whose output rows are ``weights``' in order (q, k, v -> qkv). Every output row of the GEMM
        depends only on its own codes, scales, per-channel scale and ``proj_up`` row and on the shared input side, so
        the stacked layer's outputs are the members' outputs side by side. Needs one input side: the same λ and
        down projection (same tensors, or equal values; the first member's objects are kept), precision, format
        attributes and rank. An NVFP4 per-tensor global scale that differs between members becomes per-channel."""
        if not weights:
            raise ValueError("SVDQuantTensor.stack_rows: weights must be a non-empty list of SVDQuantTensor")
        problem = cls.stack_mismatch(weights)
        if problem is not None:
            raise ValueError(f"SVDQuantTensor.stack_rows: {problem}")
        first = weights[0]
        global_scale = None
        if first.global_scale is not None:
            parts = [w.global_scale for w in weights]
            if all(p.shape == (1,) for p in parts) and all(torch.equal(p, parts[0]) for p in parts[1:]):
                global_scale = parts[0].clone()
            else:  # per channel: [1] per-tensor scales expand to their rows
                global_scale = torch.cat([p.expand(w.shape[0]) for p, w in zip(parts, weights)])
        return cls(torch.cat([w.codes for w in weights]), torch.cat([w.scales for w in weights]), first.smooth,
                   first.proj_down, torch.cat([w.proj_up for w in weights]), first.precision, first.act_unsigned,
                   first.layout_version, first.dtype, global_scale=global_scale,
                   bias_correction=None if first.bias_correction is None else
                   torch.cat([w.bias_correction for w in weights]))

    @classmethod
    def stack_mismatch(cls, weights: list) -> str | None:
        """Why ``stack_rows(weights)`` would refuse them, or None."""
        first = weights[0]
        for i, w in enumerate(weights):
            if not isinstance(w, SVDQuantTensor):
                return f"weights[{i}] is a {type(w).__name__}, not an SVDQuantTensor"
            same = {"precision": (w.precision, first.precision), "act_unsigned": (w.act_unsigned, first.act_unsigned),
                    "layout_version": (w.layout_version, first.layout_version), "dtype": (w.dtype, first.dtype),
                    "device": (w.device, first.device), "in_features": (w.shape[1], first.shape[1]),
                    "rank": (w.rank, first.rank), "scales dtype": (w.scales.dtype, first.scales.dtype),
                    "bias_correction given": (w.bias_correction is not None, first.bias_correction is not None)}
            for what, (a, b) in same.items():
                if a != b:
                    return f"weights[{i}] has {what} {a}, weights[0] {b}"
            for field in cls.shared_fields:
                a, b = getattr(w, field), getattr(first, field)
                if a is not b and not torch.equal(a, b):
                    return (f"weights[{i}].{field} differs from weights[0]'s: stacked weights must read their input "
                            f"alike (one λ and down projection: svdquant_ops.share_inputs)")
        return None

    def rows(self, start: int, stop: int, *, per_tensor_scale: bool = False) -> "SVDQuantTensor":
        """The weight of output rows ``start:stop`` (undoes ``stack_rows``: the same values bit for bit), holding
        copies of its row parts and this weight's λ and down projection tensors. ``per_tensor_scale``: an NVFP4
        per-channel global scale that is one value over these rows (a per-tensor scale ``stack_rows`` expanded) is
        returned per tensor ([1]) again."""
        n = self.shape[0]
        if not 0 <= start < stop <= n:
            raise ValueError(f"SVDQuantTensor.rows: need 0 <= start < stop <= {n} (out_features), got {start}:{stop}")
        gs = self.global_scale
        if gs is not None:
            gs = gs.clone() if gs.shape == (1,) else gs[start:stop].clone()
            if per_tensor_scale and gs.shape != (1,):
                if self.precision != NVFP4 or not torch.equal(gs, gs[:1].expand_as(gs)):
                    raise ValueError("SVDQuantTensor.rows: per_tensor_scale needs an NVFP4 weight whose global "
                                     f"scale is one value over rows {start}:{stop}")
                gs = gs[:1].clone()
        return SVDQuantTensor(self.codes[start:stop].clone(), self.scales[start:stop].clone(), self.smooth,
                              self.proj_down, self.proj_up[start:stop].clone(), self.precision, self.act_unsigned,
                              self.layout_version, self.dtype, global_scale=gs,
                              bias_correction=None if self.bias_correction is None else
                              self.bias_correction[start:stop].clone())

    # ---------------------------------------------------------------- inspection
    @property
    def rank(self) -> int:
        return self.proj_down.shape[1]

    def _validate_w4a8(self) -> None:
        if self.scales.numel():
            lo, hi = int(self.scales.min()), int(self.scales.max())
            if lo < 1 or hi > W4A8_MULT_MAX:
                raise ValueError(f"SVDQuantTensor: scales (W4A8 multipliers) must be in [1, {W4A8_MULT_MAX}], found "
                                 f"{lo if lo < 1 else hi} (corrupt checkpoint?)")
        # code -8 (nibble 8) times a multiplier up to 18 leaves int8: W4A8 codes are [-7, 7] (INT4's are [-8, 7])
        if self.codes.numel() and (((self.codes & 0xF) == 8) | ((self.codes >> 4) == 8)).any():
            raise ValueError("SVDQuantTensor: W4A8 codes must be in [-7, 7], found -8 (an INT4 weight relabelled as "
                             "W4A8, or a corrupt checkpoint?)")
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


# Unpickling (torch.load) renames the fields of checkpoints written by svdquant_ops 0.1.0 (layout 1).
check_on_unpickle(SVDQuantTensor, LEGACY_FIELD_NAMES)
