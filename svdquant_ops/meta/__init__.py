"""Fake (meta) kernels: shapes and dtypes of every ``torch.ops.svdquant`` op, for tracing and torch.compile.

They run the same argument checks as the C++ kernels (``csrc/checks.cpp``) that can be decided from shapes and
dtypes alone, so a bad call fails at trace time with the same message instead of deep inside a compiled graph.
``svdquant::linear`` is CompositeImplicitAutograd and decomposes into quantize_act and gemm, so it needs none.
"""

from __future__ import annotations

import torch

from ..formats import FLOAT_DTYPES, GROUP_SIZE, INT4, NVFP4, PRECISIONS, W4A8, W4A8_MULT_MAX, W4A16_GROUP

_FLOAT_NAMES = "bfloat16, float16 or float32"
# W4A8: |act code * weight code * multiplier| <= 127 * 126, so an int32 dot over K <= 131072 cannot overflow
# (csrc/checks.h kW4a8MaxK).
W4A8_MAX_K = 131072


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"svdquant::{op}: {msg}")


def _check_precision(op: str, precision: str, act_unsigned: bool) -> int:
    _check(precision in PRECISIONS, op, f"precision must be 'int4', 'nvfp4' or 'w4a8', got '{precision}'")
    _check(not (act_unsigned and precision != INT4), op,
           f"act_unsigned=True is only defined for precision 'int4', got precision '{precision}'")
    return GROUP_SIZE[precision]


def _check_scale_dtype(op: str, name: str, t: torch.Tensor, precision: str, weight: bool) -> None:
    if precision == NVFP4:
        _check(t.dtype == torch.float8_e4m3fn, op,
               f"{name} must be float8_e4m3fn for precision 'nvfp4', got {t.dtype}")
    elif precision == W4A8 and weight:
        _check(t.dtype == torch.uint8, op,
               f"{name} must be uint8 (integer multipliers in [1, {W4A8_MULT_MAX}]) for precision 'w4a8', "
               f"got {t.dtype}")
    else:
        _check(t.dtype in FLOAT_DTYPES, op,
               f"{name} must be {_FLOAT_NAMES} for precision '{precision}', got {t.dtype}")


def _check_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check(t.device == ref.device, op,
           f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _check_act_inputs(op: str, x, smooth, proj_down, precision: str) -> int:
    """quantize_act's shape / dtype / device checks of x, smooth and proj_down; returns K."""
    gs = GROUP_SIZE[precision]
    _check(x.dtype in FLOAT_DTYPES, op, f"x must be {_FLOAT_NAMES}, got {x.dtype}")
    _check(x.dim() >= 1, op, "x must have at least 1 dimension [..., K], got a 0-d tensor")
    K = x.shape[-1]
    _check(K > 0 and K % gs == 0, op,
           f"x.size(-1) (K={K}) must be a positive multiple of {gs} for precision '{precision}'")
    _check(smooth.dim() == 1 and smooth.shape[0] == K, op,
           f"smooth must have shape [K] = [{K}] to match x.size(-1), got {list(smooth.shape)}")
    _check(smooth.dtype == x.dtype, op, f"smooth must have x's dtype {x.dtype}, got {smooth.dtype}")
    _check_device(op, "smooth", smooth, "x", x)
    _check(proj_down.dim() == 2 and proj_down.shape[0] == K, op,
           f"proj_down must have shape [K, R] with K={K} to match x.size(-1), got {list(proj_down.shape)}")
    _check(proj_down.dtype == x.dtype, op, f"proj_down must have x's dtype {x.dtype}, got {proj_down.dtype}")
    _check_device(op, "proj_down", proj_down, "x", x)
    return K


def _act_outputs(x, proj_down, precision: str):
    """(act_codes, act_scales, down_act) of an activation quantization of x."""
    lead, K, gs = x.shape[:-1], x.shape[-1], GROUP_SIZE[precision]
    if precision == W4A8:  # int8 codes, one per byte; one scale per token
        act_codes = x.new_empty((*lead, K), dtype=torch.int8)
        act_scales = x.new_empty((*lead, 1), dtype=x.dtype)
    else:
        scale_dtype = x.dtype if precision == INT4 else torch.float8_e4m3fn
        act_codes = x.new_empty((*lead, K // 2), dtype=torch.uint8)
        act_scales = x.new_empty((*lead, K // gs), dtype=scale_dtype)
    return act_codes, act_scales, x.new_empty((*lead, proj_down.shape[1]), dtype=torch.float32)


@torch.library.register_fake("svdquant::quantize_act")
def _quantize_act_fake(x, smooth, proj_down, precision, act_unsigned=False):
    _check_precision("quantize_act", precision, act_unsigned)
    _check_act_inputs("quantize_act", x, smooth, proj_down, precision)
    return _act_outputs(x, proj_down, precision)


@torch.library.register_fake("svdquant::quantize_act_given_amax")
def _quantize_act_given_amax_fake(x, smooth, proj_down, amax):
    op = "quantize_act_given_amax"
    _check_act_inputs(op, x, smooth, proj_down, W4A8)
    lead = x.shape[:-1]
    _check(amax.dtype == torch.float32, op,
           f"amax must be float32 (each token's amax of |x / smooth|), got {amax.dtype}")
    _check(tuple(amax.shape) == (*lead, 1), op,
           f"amax must have shape {[*lead, 1]} (x's leading dims and one value per token), got {list(amax.shape)}")
    _check_device(op, "amax", amax, "x", x)
    return _act_outputs(x, proj_down, W4A8)


def _check_gemm(op, act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
                out_dtype, act_unsigned):
    """gemm's checks (csrc/checks.cpp check_gemm); returns (leading dims, N, K)."""
    gs = _check_precision(op, precision, act_unsigned)
    w4a8 = precision == W4A8
    if w4a8:
        _check(act_codes.dtype == torch.int8, op,
               f"act_codes must be int8 (one 8-bit code per byte) for precision 'w4a8', got {act_codes.dtype}")
    else:
        _check(act_codes.dtype == torch.uint8, op,
               f"act_codes must be uint8 (two 4-bit codes per byte), got {act_codes.dtype}")
    _check(codes.dtype == torch.uint8, op,
           f"codes must be uint8 (two 4-bit codes per byte), got {codes.dtype}")
    _check(act_codes.dim() >= 1, op, f"act_codes must have shape [..., {'K' if w4a8 else 'K/2'}], got a 0-d tensor")
    _check(codes.dim() == 2, op, f"codes must have shape [N, K/2], got {list(codes.shape)}")
    K = act_codes.shape[-1] if w4a8 else act_codes.shape[-1] * 2
    N = codes.shape[0]
    _check(codes.shape[1] * 2 == K, op,
           f"K mismatch: act_codes holds K={K} input channels per row but codes holds K={codes.shape[1] * 2}")
    _check(N >= 1, op, "codes must have at least one output row (N >= 1), got N=0")
    _check(K > 0 and K % gs == 0, op, f"K ({K}) must be a positive multiple of {gs} for precision '{precision}'")
    _check(not w4a8 or K <= W4A8_MAX_K, op,
           f"K ({K}) must be at most {W4A8_MAX_K} for precision 'w4a8' (so that the int32 dot product of int8 "
           "codes cannot overflow)")
    G = K // gs
    lead = tuple(act_codes.shape[:-1])
    if w4a8:
        _check(tuple(act_scales.shape) == (*lead, 1), op,
               f"act_scales must have shape {[*lead, 1]} (act_codes' leading dims and one scale per token for "
               f"precision 'w4a8'), got {list(act_scales.shape)}")
    else:
        _check(tuple(act_scales.shape) == (*lead, G), op,
               f"act_scales must have shape {[*lead, G]} (act_codes' leading dims and K/{gs} groups), "
               f"got {list(act_scales.shape)}")
    _check(tuple(scales.shape) == (N, G), op,
           f"scales must have shape [N, K/{gs}] = [{N}, {G}], got {list(scales.shape)}")
    _check_scale_dtype(op, "act_scales", act_scales, precision, weight=False)
    _check_scale_dtype(op, "scales", scales, precision, weight=True)
    if precision == INT4:
        _check(global_scale is None, op,
               "global_scale is only used by precision 'nvfp4' and 'w4a8'; pass None for 'int4'")
    elif w4a8:
        _check(global_scale is not None, op,
               f"global_scale is required for precision 'w4a8' (the fp32 per-output-channel scale, shape [N] = "
               f"[{N}]), got None")
        g = global_scale
        _check(g.dtype == torch.float32, op, f"global_scale must be float32, got {g.dtype}")
        _check(g.dim() == 1 and g.numel() == N, op,
               f"global_scale must have shape [N] = [{N}] (per output channel) for precision 'w4a8', "
               f"got {list(g.shape)}")
        _check_device(op, "global_scale", g, "act_codes", act_codes)
    elif global_scale is not None:
        g = global_scale
        _check(g.dtype == torch.float32, op, f"global_scale must be float32, got {g.dtype}")
        _check(g.dim() <= 1 and g.numel() in (1, N), op,
               f"global_scale must have shape [1] (per tensor) or [N] = [{N}] (per output channel), "
               f"got {list(g.shape)}")
        _check_device(op, "global_scale", g, "act_codes", act_codes)
    _check(down_act.dtype == torch.float32, op, f"down_act must be float32, got {down_act.dtype}")
    _check(proj_up.dim() == 2 and proj_up.shape[0] == N, op,
           f"proj_up must have shape [N, R] with N={N}, got {list(proj_up.shape)}")
    _check(proj_up.dtype in FLOAT_DTYPES, op, f"proj_up must be {_FLOAT_NAMES}, got {proj_up.dtype}")
    R = proj_up.shape[1]
    _check(tuple(down_act.shape) == (*lead, R), op,
           f"down_act must have shape {[*lead, R]} (act_codes' leading dims and proj_up's rank R={R}), "
           f"got {list(down_act.shape)}")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == N, op, f"bias must have shape [N] = [{N}], got {list(bias.shape)}")
        _check(bias.dtype in FLOAT_DTYPES, op, f"bias must be {_FLOAT_NAMES}, got {bias.dtype}")
        _check_device(op, "bias", bias, "act_codes", act_codes)
    _check(out_dtype in FLOAT_DTYPES, op, f"out_dtype must be {_FLOAT_NAMES}, got {out_dtype}")
    for name, t in (("act_scales", act_scales), ("codes", codes), ("scales", scales),
                    ("down_act", down_act), ("proj_up", proj_up)):
        _check_device(op, name, t, "act_codes", act_codes)
    return lead, N, K


@torch.library.register_fake("svdquant::gemm")
def _gemm_fake(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision,
               out_dtype, act_unsigned=False):
    lead, N, _ = _check_gemm("gemm", act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias,
                             precision, out_dtype, act_unsigned)
    return act_codes.new_empty((*lead, N), dtype=out_dtype)


@torch.library.register_fake("svdquant::gemm_cat")
def _gemm_cat_fake(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision, out_dtype,
                   act_unsigned=False):
    op = "gemm_cat"
    n = len(codes)
    _check(n >= 1, op, "codes must hold at least one weight, got an empty list")
    _check(len(scales) == n and len(global_scale) == n and len(proj_up) == n and len(bias) == n, op,
           f"codes, scales, global_scale, proj_up and bias must have one entry per weight, got {n}, {len(scales)}, "
           f"{len(global_scale)}, {len(proj_up)} and {len(bias)}")
    lead, total = (), 0
    for i in range(n):
        lead, N, _ = _check_gemm(f"{op} (weight {i})", act_codes, act_scales, codes[i], scales[i], global_scale[i],
                                 down_act, proj_up[i], bias[i], precision, out_dtype, act_unsigned)
        total += N
    return act_codes.new_empty((*lead, total), dtype=out_dtype)


def _check_expand_w4a8(op: str, codes, scales, prefix: str = "") -> tuple[int, int]:
    """expand_w4a8_weight's checks (csrc/checks.cpp check_expand_w4a8); returns (N, K)."""
    _check(codes.dtype == torch.uint8, op, f"{prefix}codes must be uint8 (two 4-bit codes per byte), got {codes.dtype}")
    _check(codes.dim() == 2 and codes.shape[0] >= 1, op,
           f"{prefix}codes must have shape [N, K/2] with N >= 1, got {list(codes.shape)}")
    N, K = codes.shape[0], codes.shape[1] * 2
    _check(K > 0 and K % GROUP_SIZE[W4A8] == 0, op,
           f"{prefix}codes must hold K ({K}) input channels per row, a positive multiple of {GROUP_SIZE[W4A8]} for "
           "precision 'w4a8'")
    _check(scales.dtype == torch.uint8, op,
           f"{prefix}scales must be uint8 (integer multipliers in [1, {W4A8_MULT_MAX}]) for precision 'w4a8', "
           f"got {scales.dtype}")
    G = K // GROUP_SIZE[W4A8]
    _check(tuple(scales.shape) == (N, G), op,
           f"{prefix}scales must have shape [N, K/{GROUP_SIZE[W4A8]}] = [{N}, {G}], got {list(scales.shape)}")
    _check_device(op, f"{prefix}scales", scales, f"{prefix}codes", codes)
    return N, K


@torch.library.register_fake("svdquant::expand_w4a8_weight")
def _expand_w4a8_weight_fake(codes, scales):
    N, K = _check_expand_w4a8("expand_w4a8_weight", codes, scales)
    return codes.new_empty((N, K), dtype=torch.int8)


@torch.library.register_fake("svdquant::gemm_expanded")
def _gemm_expanded_fake(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, out_dtype,
                        weight, next_codes=None, next_scales=None):
    op = "gemm_expanded"
    lead, N, K = _check_gemm(op, act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, W4A8,
                             out_dtype, False)
    _check(weight.dtype == torch.int8, op,
           f"weight must be int8 (the expanded weight code * multiplier, expand_w4a8_weight), got {weight.dtype}")
    _check(tuple(weight.shape) == (N, K), op,
           f"weight must have shape [N, K] = [{N}, {K}] (codes' expansion), got {list(weight.shape)}")
    _check_device(op, "weight", weight, "act_codes", act_codes)
    _check((next_codes is None) == (next_scales is None), op,
           "next_codes and next_scales must be given together (the next weight to expand) or both be None")
    if next_codes is None:
        next_weight = weight.new_empty((0, 0))
    else:
        nN, nK = _check_expand_w4a8(op, next_codes, next_scales, "next_")
        _check_device(op, "next_codes", next_codes, "act_codes", act_codes)
        next_weight = weight.new_empty((nN, nK))
    return act_codes.new_empty((*lead, N), dtype=out_dtype), next_weight



@torch.library.register_fake("svdquant::w4a16_linear")
def _w4a16_linear_fake(x, codes, scales, zeros, bias=None, op="w4a16_linear"):
    _check(x.dtype in FLOAT_DTYPES, op, f"x must be {_FLOAT_NAMES}, got {x.dtype}")
    _check(x.dim() >= 1, op, "x must have at least 1 dimension [..., K], got a 0-d tensor")
    K = x.shape[-1]
    _check(K > 0 and K % W4A16_GROUP == 0, op, f"x.size(-1) (K={K}) must be a positive multiple of {W4A16_GROUP}")
    G = K // W4A16_GROUP
    _check(codes.dtype == torch.uint8, op, f"codes must be uint8 (two 4-bit codes per byte), got {codes.dtype}")
    _check(codes.dim() == 2 and codes.shape[1] == K // 2, op,
           f"codes must have shape [N, K/2] = [N, {K // 2}] to match x.size(-1) (K={K}), got {list(codes.shape)}")
    N = codes.shape[0]
    _check(N >= 1, op, "codes must have at least one output row (N >= 1), got N=0")
    _check_device(op, "codes", codes, "x", x)
    _check(scales.dtype in FLOAT_DTYPES, op, f"scales must be {_FLOAT_NAMES}, got {scales.dtype}")
    _check(tuple(scales.shape) == (N, G), op,
           f"scales must have shape [N, K/{W4A16_GROUP}] = [{N}, {G}], got {list(scales.shape)}")
    _check_device(op, "scales", scales, "x", x)
    _check(zeros.dtype == scales.dtype, op, f"zeros must have scales' dtype {scales.dtype}, got {zeros.dtype}")
    _check(tuple(zeros.shape) == (N, G), op,
           f"zeros must have shape [N, K/{W4A16_GROUP}] = [{N}, {G}], got {list(zeros.shape)}")
    _check_device(op, "zeros", zeros, "x", x)
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == N, op, f"bias must have shape [N] = [{N}], got {list(bias.shape)}")
        _check(bias.dtype in FLOAT_DTYPES, op, f"bias must be {_FLOAT_NAMES}, got {bias.dtype}")
        _check_device(op, "bias", bias, "x", x)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("svdquant::w4a16_linear_group")
def _w4a16_linear_group_fake(x, codes, scales, zeros, bias):
    op = "w4a16_linear_group"
    n = len(codes)
    _check(n >= 1, op, "codes must hold at least one weight, got an empty list")
    _check(len(scales) == n and len(zeros) == n and len(bias) == n, op,
           f"codes, scales, zeros and bias must have one entry per weight, got {n}, {len(scales)}, {len(zeros)} "
           f"and {len(bias)}")
    return [_w4a16_linear_fake(x, c, s, z, b, op=f"{op} (weight {i})")
            for i, (c, s, z, b) in enumerate(zip(codes, scales, zeros, bias))]


@torch.library.register_fake("svdquant::parallel_linears")
def _parallel_linears_fake(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision,
                           act_unsigned=False):
    op = "parallel_linears"
    n = len(x)
    _check(n >= 1, op, "x must hold at least one input, got an empty list")
    lengths = [len(v) for v in (smooth, proj_down, codes, scales, global_scale, proj_up, bias)]
    _check(all(m == n for m in lengths), op,
           "x, smooth, proj_down, codes, scales, global_scale, proj_up and bias must have one entry per linear, got "
           f"{n}, {', '.join(map(str, lengths[:-1]))} and {lengths[-1]}")
    names = [f"{op} (linear {i})" for i in range(n)]
    # in the C++ op's order: every linear's quantize side (check_parallel_linears), then each one's gemm side
    for i, name in enumerate(names):
        _check_device(name, "x", x[i], "linear 0's x", x[0])
        _check_precision(name, precision, act_unsigned)
        _check_act_inputs(name, x[i], smooth[i], proj_down[i], precision)
    out = []
    for i, name in enumerate(names):
        act_codes, act_scales, down_act = _act_outputs(x[i], proj_down[i], precision)
        lead, N, _ = _check_gemm(name, act_codes, act_scales, codes[i], scales[i], global_scale[i], down_act,
                                 proj_up[i], bias[i], precision, x[i].dtype, act_unsigned)
        out.append(x[i].new_empty((*lead, N)))
    return out
