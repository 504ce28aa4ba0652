"""The ops: typed Python entry points to ``torch.ops.svdquant`` (schemas in ``csrc/ops.cpp``), and the dispatch
that makes ``F.linear(x, weight)`` run them for an ``SVDQuantTensor`` or ``W4A16Tensor`` weight.

The C++/CUDA library is built and loaded on first use of an op (``build.py``), not on import; ``load()`` does it
ahead of time. Fake kernels (``svdquant_ops/meta``) are registered with it, so the ops trace under torch.compile.

precision: "int4", "nvfp4" or "w4a8" (formats.py). Weight operands are named as the ``SVDQuantTensor`` fields.

quantize_act(x, smooth, proj_down, precision, act_unsigned=False) -> (act_codes, act_scales, down_act)
    act_codes uint8 [..., K/2] (layout.py), act_scales [..., K/group], down_act = x @ proj_down in fp32 [..., R].
    w4a8: act_codes int8 [..., K] (one per byte, not packed), act_scales [..., 1] in x's dtype (one per token).
gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision, out_dtype,
     act_unsigned=False) -> y [..., N]
    Q(x)·Q(R)ᵀ + down_act·proj_upᵀ + bias. w4a8: scales are uint8 multipliers [N, K/64] in [1, 18], global_scale
    the fp32 per-channel scale [N] (required), K <= 131072.
linear(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision, act_unsigned=False)
    -> y [..., N] in x's dtype: quantize_act then gemm (CompositeImplicitAutograd, so tracing sees both).
w4a16_linear(x, codes, scales, zeros, bias=None) -> y [..., N] in x's dtype
    The weight-only format (formats.py "w4a16"): x @ (code * scale + zero)ᵀ + bias, fp32 accumulation. codes uint8
    [N, K/2] (unsigned nibbles, layout.py), scales and zeros [N, K/64] in one float dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..storage import SVDQuantTensor, W4A16Tensor
from . import build

__all__ = ["load", "quantize_act", "gemm", "linear", "quantized_linear", "w4a16_linear", "weight_only_linear"]


def load(verbose: bool = False):
    """Build (first time only) and load the op library and register the fake kernels; returns the library path."""
    path = build.load(verbose=verbose)
    from .. import meta  # noqa: F401  (registers the fake kernels; needs the schemas loaded above)

    return path


# torch.compile calls this at trace time, eagerly, and folds the result: a first op call inside a compiled region
# still builds the library outside the graph.
@torch.compiler.assume_constant_result
def _ready() -> bool:
    load()
    return True


def quantize_act(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, precision: str,
                 act_unsigned: bool = False):
    _ready()
    return torch.ops.svdquant.quantize_act.default(x, smooth, proj_down, precision, act_unsigned)


def gemm(act_codes: torch.Tensor, act_scales: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
         global_scale: torch.Tensor | None, down_act: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None,
         precision: str, out_dtype: torch.dtype, act_unsigned: bool = False) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.gemm.default(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up,
                                           bias, precision, out_dtype, act_unsigned)


def linear(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, codes: torch.Tensor,
           scales: torch.Tensor, global_scale: torch.Tensor | None, proj_up: torch.Tensor, bias: torch.Tensor | None,
           precision: str, act_unsigned: bool = False) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.linear.default(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias,
                                             precision, act_unsigned)


def w4a16_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.w4a16_linear.default(x, codes, scales, zeros, bias)


def quantized_linear(x: torch.Tensor, weight: SVDQuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a quantized weight: one ``svdquant::linear`` call."""
    if x.dtype != weight.dtype:
        raise TypeError(f"SVDQuant linear: input dtype {x.dtype} does not match the quantized weight's dtype "
                        f"{weight.dtype}; cast the input or the model")
    if weight.bias_correction is not None:
        bias = weight.bias_correction if bias is None else bias.float() + weight.bias_correction
    return linear(x, weight.smooth, weight.proj_down, weight.codes, weight.scales, weight.global_scale,
                  weight.proj_up, bias, weight.precision, weight.act_unsigned)


def weight_only_linear(x: torch.Tensor, weight: W4A16Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 4-bit weight-only weight: one ``svdquant::w4a16_linear`` call."""
    if x.dtype != weight.dtype:
        raise TypeError(f"W4A16 linear: input dtype {x.dtype} does not match the quantized weight's dtype "
                        f"{weight.dtype}; cast the input or the model")
    return w4a16_linear(x, weight.codes, weight.scales, weight.zeros, bias)


@W4A16Tensor.implements(torch.ops.aten.linear.default)
@W4A16Tensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return weight_only_linear(args[0], args[1], bias)


@SVDQuantTensor.implements(torch.ops.aten.linear.default)
@SVDQuantTensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return quantized_linear(x, w, bias)
