"""Every contract violation gets an error that names the argument and the expected value, in eager mode (C++
checks) and at trace time (fake kernels), with the same wording."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from svdquant_ops import ops

from .builders import generator, linear_inputs, op_args

BF = torch.bfloat16


def _good(precision="int4", M=3, N=8, K=128, R=16):
    """Valid arguments of quantize_act and gemm (keyed by argument name) that each case then breaks in one place."""
    a = linear_inputs(M, N, K, R, precision, BF, generator(("op_errors", precision)))
    act_codes, act_scales, down_act = ops.quantize_act(a["x"], a["smooth"], a["proj_down"], precision)
    return dict(a, act_codes=act_codes, act_scales=act_scales, down_act=down_act, precision=precision)


def _q(a, **kw):
    a = {**a, **kw}
    return ops.quantize_act(*op_args("quantize_act", a), a["precision"], a.get("act_unsigned", False))


def _g(a, **kw):
    a = {**a, **kw}
    return ops.gemm(*op_args("gemm", a), a["precision"], a.get("out_dtype", BF), a.get("act_unsigned", False))


SHAPE_DTYPE_CASES = [
    # (name, precision, call, expected message fragment)
    ("x float64", "int4", lambda a: _q(a, x=a["x"].double()), "x must be bfloat16, float16 or float32, got torch.float64"),
    ("x int", "int4", lambda a: _q(a, x=a["x"].int()), "x must be bfloat16, float16 or float32"),
    ("K not multiple of 64", "int4",
     lambda a: _q(a, x=a["x"][:, :100], smooth=a["smooth"][:100], proj_down=a["proj_down"][:100]),
     "x.size(-1) (K=100) must be a positive multiple of 64"),
    ("K not multiple of 16", "nvfp4",
     lambda a: _q(a, x=a["x"][:, :40], smooth=a["smooth"][:40], proj_down=a["proj_down"][:40]),
     "x.size(-1) (K=40) must be a positive multiple of 16"),
    ("smooth wrong K", "int4", lambda a: _q(a, smooth=a["smooth"][:64]), "smooth must have shape [K] = [128]"),
    ("smooth dtype", "int4", lambda a: _q(a, smooth=a["smooth"].float()), "smooth must have x's dtype"),
    ("proj_down K mismatch", "int4", lambda a: _q(a, proj_down=a["proj_down"][:64]),
     "proj_down must have shape [K, R] with K=128"),
    ("proj_down dtype", "int4", lambda a: _q(a, proj_down=a["proj_down"].half()), "proj_down must have x's dtype"),
    ("bad precision", "int4", lambda a: _q(a, precision="int8"),
     "precision must be 'int4', 'nvfp4' or 'w4a8', got 'int8'"),
    ("bad precision gemm", "int4", lambda a: _g(a, precision="w8a8"),
     "precision must be 'int4', 'nvfp4' or 'w4a8', got 'w8a8'"),
    ("unsigned nvfp4", "nvfp4", lambda a: _q(a, act_unsigned=True), "act_unsigned=True is only defined for precision 'int4'"),
    ("act_codes dtype", "int4", lambda a: _g(a, act_codes=a["act_codes"].to(torch.int8)),
     "act_codes must be uint8"),
    ("weight codes dtype", "int4", lambda a: _g(a, codes=a["codes"].to(torch.int8)),
     "svdquant::gemm: codes must be uint8"),
    ("weight K mismatch", "int4", lambda a: _g(a, codes=a["codes"][:, :32], scales=a["scales"][:, :1]),
     "K mismatch: act_codes holds K=128 input channels per row but codes holds K=64"),
    ("act_scales shape", "int4", lambda a: _g(a, act_scales=a["act_scales"][:, :1]),
     "act_scales must have shape [3, 2]"),
    ("scales shape", "int4", lambda a: _g(a, scales=a["scales"][:4]),
     "svdquant::gemm: scales must have shape [N, K/64] = [8, 2]"),
    ("int4 scales fp8", "int4", lambda a: _g(a, scales=a["scales"].to(torch.float8_e4m3fn)),
     "svdquant::gemm: scales must be bfloat16, float16 or float32 for precision 'int4'"),
    ("nvfp4 act_scales bf16", "nvfp4", lambda a: _g(a, act_scales=a["act_scales"].float().to(BF)),
     "act_scales must be float8_e4m3fn for precision 'nvfp4'"),
    ("global scale on int4", "int4", lambda a: _g(a, global_scale=torch.ones(1)),
     "global_scale is only used by precision 'nvfp4' and 'w4a8'; pass None for 'int4'"),
    ("global scale shape", "nvfp4", lambda a: _g(a, global_scale=torch.ones(3)),
     "global_scale must have shape [1] (per tensor) or [N] = [8]"),
    ("global scale dtype", "nvfp4", lambda a: _g(a, global_scale=torch.ones(1, dtype=BF)),
     "global_scale must be float32"),
    ("down_act dtype", "int4", lambda a: _g(a, down_act=a["down_act"].to(BF)), "down_act must be float32"),
    ("down_act rank", "int4", lambda a: _g(a, down_act=a["down_act"][:, :8]), "down_act must have shape [3, 16]"),
    ("proj_up N", "int4", lambda a: _g(a, proj_up=a["proj_up"][:4]), "proj_up must have shape [N, R] with N=8"),
    ("bias shape", "int4", lambda a: _g(a, bias=a["bias"][:5]), "bias must have shape [N] = [8]"),
    ("out dtype", "int4", lambda a: _g(a, out_dtype=torch.int32), "out_dtype must be bfloat16, float16 or float32"),
    ("device mismatch", "int4", lambda a: _q(a, smooth=a["smooth"].to("meta")), "must be on the same device"),
    # w4a8: int8 activation codes [..., K], one scale per token, uint8 multipliers, required fp32 [N] scale
    ("w4a8 K not multiple of 64", "w4a8", lambda a: _q(a, x=a["x"][:, :96], smooth=a["smooth"][:96],
                                                       proj_down=a["proj_down"][:96]),
     "x.size(-1) (K=96) must be a positive multiple of 64 for precision 'w4a8'"),
    ("w4a8 unsigned quantize_act", "w4a8", lambda a: _q(a, act_unsigned=True),
     "act_unsigned=True is only defined for precision 'int4', got precision 'w4a8'"),
    ("w4a8 unsigned gemm", "w4a8", lambda a: _g(a, act_unsigned=True),
     "act_unsigned=True is only defined for precision 'int4', got precision 'w4a8'"),
    ("w4a8 act codes uint8", "w4a8", lambda a: _g(a, act_codes=a["act_codes"].view(torch.uint8)),
     "act_codes must be int8 (one 8-bit code per byte) for precision 'w4a8', got torch.uint8"),
    ("w4a8 given packed int4 act codes", "w4a8",
     lambda a: _g(a, act_codes=a["act_codes"][:, :64].contiguous()),
     "K mismatch: act_codes holds K=64 input channels per row but codes holds K=128"),
    ("w4a8 act_scales per group", "w4a8", lambda a: _g(a, act_scales=a["act_scales"].expand(3, 2).contiguous()),
     "act_scales must have shape [3, 1] (act_codes' leading dims and one scale per token for precision 'w4a8'), "
     "got [3, 2]"),
    ("w4a8 act_scales dtype", "w4a8", lambda a: _g(a, act_scales=a["act_scales"].double()),
     "act_scales must be bfloat16, float16 or float32 for precision 'w4a8', got torch.float64"),
    ("w4a8 multipliers dtype", "w4a8", lambda a: _g(a, scales=a["scales"].to(BF)),
     "svdquant::gemm: scales must be uint8 (integer multipliers in [1, 18]) for precision 'w4a8', got torch.bfloat16"),
    ("w4a8 multipliers shape", "w4a8", lambda a: _g(a, scales=a["scales"][:, :1]),
     "svdquant::gemm: scales must have shape [N, K/64] = [8, 2], got [8, 1]"),
    ("w4a8 missing global scale", "w4a8", lambda a: _g(a, global_scale=None),
     "global_scale is required for precision 'w4a8' (the fp32 per-output-channel scale, shape [N] = [8]), "
     "got None"),
    ("w4a8 per-tensor global scale", "w4a8", lambda a: _g(a, global_scale=torch.ones(1)),
     "global_scale must have shape [N] = [8] (per output channel) for precision 'w4a8', got [1]"),
    ("w4a8 global scale dtype", "w4a8", lambda a: _g(a, global_scale=a["global_scale"].to(BF)),
     "global_scale must be float32"),
    ("w4a8 K too large", "w4a8",
     lambda a: _g(a, act_codes=torch.zeros(1, 131136, dtype=torch.int8), act_scales=torch.ones(1, 1),
                  codes=torch.zeros(1, 65568, dtype=torch.uint8), scales=torch.ones(1, 2049, dtype=torch.uint8),
                  global_scale=torch.ones(1), down_act=torch.zeros(1, 0), proj_up=torch.zeros(1, 0), bias=None),
     "K (131136) must be at most 131072 for precision 'w4a8' (so that the int32 dot product of int8 codes cannot "
     "overflow)"),
]


@pytest.mark.parametrize("name,precision,call,msg", SHAPE_DTYPE_CASES, ids=[c[0] for c in SHAPE_DTYPE_CASES])
def test_eager_errors(name, precision, call, msg):
    a = _good(precision)
    with pytest.raises(RuntimeError) as exc:
        call(a)
    assert msg in str(exc.value)


@pytest.mark.parametrize("name,precision,call,msg", SHAPE_DTYPE_CASES, ids=[c[0] for c in SHAPE_DTYPE_CASES])
def test_fake_kernel_errors_match(name, precision, call, msg):
    a = _good(precision)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in a.items()}
    with mode, pytest.raises(RuntimeError) as exc:
        call(fake)
    assert msg in str(exc.value)


def _w4_good():
    """Valid w4a16_linear arguments: x [3, 128] bf16, N = 8, bf16 scales and zeros, bias."""
    g = generator("op_errors_w4a16")
    return dict(x=torch.randn(3, 128, generator=g).to(BF),
                codes=torch.randint(0, 256, (8, 64), generator=g).to(torch.uint8),
                scales=torch.rand(8, 2, generator=g).to(BF), zeros=-torch.rand(8, 2, generator=g).to(BF),
                bias=torch.randn(8, generator=g).to(BF))


def _w4(a, kw):
    """w4a16_linear on `a` with the case's replacements (a value, or a function of `a` evaluated here, so that under
    a FakeTensorMode the broken tensor is derived from the fake ones)."""
    a = {**a, **{k: (v(a) if callable(v) else v) for k, v in kw.items()}}
    return ops.w4a16_linear(a["x"], a["codes"], a["scales"], a["zeros"], a["bias"])


W4A16_CASES = [
    # (name, replacements (value or function of the valid arguments), expected message)
    ("x float64", dict(x=lambda a: a["x"].double()), "x must be bfloat16, float16 or float32, got torch.float64"),
    ("x 0-d", dict(x=lambda a: a["x"].sum()), "x must have at least 1 dimension [..., K], got a 0-d tensor"),
    ("K not multiple of 64", dict(x=lambda a: a["x"][:, :100]), "x.size(-1) (K=100) must be a positive multiple of 64"),
    ("codes dtype", dict(codes=lambda a: a["codes"].to(torch.int8)),
     "svdquant::w4a16_linear: codes must be uint8 (two 4-bit codes per byte), got torch.int8"),
    ("codes K mismatch", dict(codes=lambda a: a["codes"][:, :32]),
     "codes must have shape [N, K/2] = [N, 64] to match x.size(-1) (K=128), got [8, 32]"),
    ("codes unpacked", dict(codes=lambda a: a["codes"].repeat(1, 2)),
     "codes must have shape [N, K/2] = [N, 64] to match x.size(-1) (K=128), got [8, 128]"),
    ("codes 1-d", dict(codes=lambda a: a["codes"][0]), "codes must have shape [N, K/2] = [N, 64]"),
    ("no output rows", dict(codes=lambda a: a["codes"][:0], scales=lambda a: a["scales"][:0],
                            zeros=lambda a: a["zeros"][:0], bias=None),
     "codes must have at least one output row (N >= 1), got N=0"),
    ("scales dtype", dict(scales=lambda a: a["scales"].to(torch.int32), zeros=lambda a: a["zeros"].to(torch.int32)),
     "svdquant::w4a16_linear: scales must be bfloat16, float16 or float32, got torch.int32"),
    ("scales shape", dict(scales=lambda a: a["scales"][:, :1]),
     "svdquant::w4a16_linear: scales must have shape [N, K/64] = [8, 2], got [8, 1]"),
    ("scales rows", dict(scales=lambda a: a["scales"][:4]), "scales must have shape [N, K/64] = [8, 2], got [4, 2]"),
    ("zeros dtype", dict(zeros=lambda a: a["zeros"].float()),
     "zeros must have scales' dtype torch.bfloat16, got torch.float32"),
    ("zeros shape", dict(zeros=lambda a: a["zeros"][:4]), "zeros must have shape [N, K/64] = [8, 2], got [4, 2]"),
    ("bias shape", dict(bias=lambda a: a["bias"][:5]), "bias must have shape [N] = [8], got [5]"),
    ("bias dtype", dict(bias=lambda a: a["bias"].double()),
     "bias must be bfloat16, float16 or float32, got torch.float64"),
    ("codes device", dict(codes=lambda a: a["codes"].to("meta")),
     "codes must be on the same device as x (cpu), got meta"),
    ("scales device", dict(scales=lambda a: a["scales"].to("meta")),
     "scales must be on the same device as x (cpu), got meta"),
    ("zeros device", dict(zeros=lambda a: a["zeros"].to("meta")),
     "zeros must be on the same device as x (cpu), got meta"),
    ("bias device", dict(bias=lambda a: a["bias"].to("meta")), "bias must be on the same device as x (cpu), got meta"),
]


@pytest.mark.parametrize("name,kw,msg", W4A16_CASES, ids=[c[0] for c in W4A16_CASES])
def test_w4a16_eager_errors(name, kw, msg):
    with pytest.raises(RuntimeError) as exc:
        _w4(_w4_good(), kw)
    assert msg in str(exc.value)


@pytest.mark.parametrize("name,kw,msg", W4A16_CASES, ids=[c[0] for c in W4A16_CASES])
def test_w4a16_fake_kernel_errors_match(name, kw, msg):
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake = {k: mode.from_tensor(v) for k, v in _w4_good().items()}
    with mode, pytest.raises(RuntimeError) as exc:
        _w4(fake, kw)
    assert msg in str(exc.value)


@pytest.mark.parametrize(
    "bad,msg",
    [(float("nan"), "smooth must be finite"), (float("inf"), "smooth must be finite"), (0.0, "smooth must be > 0"),
     (-1.0, "smooth must be > 0")],
)
def test_non_finite_or_non_positive_smooth(bad, msg):
    a = _good()
    smooth = a["smooth"].clone()
    smooth[5] = bad
    with pytest.raises(RuntimeError, match=msg):
        _q(a, smooth=smooth)


def test_fake_quantize_act_w4a8_shapes():
    a = _good("w4a8")
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    x = mode.from_tensor(torch.randn(2, 5, 128).to(BF))
    with mode:
        act_codes, act_scales, down_act = ops.quantize_act(x, mode.from_tensor(a["smooth"]),
                                                           mode.from_tensor(a["proj_down"]), "w4a8")
    real = ops.quantize_act(torch.randn(2, 5, 128).to(BF), a["smooth"], a["proj_down"], "w4a8")
    for f, r in zip((act_codes, act_scales, down_act), real):
        assert f.shape == r.shape and f.dtype == r.dtype
    assert act_codes.shape == (2, 5, 128) and act_codes.dtype == torch.int8 and act_scales.shape == (2, 5, 1)


@pytest.mark.parametrize("bad", [0, 19, 255])
def test_w4a8_multiplier_out_of_range(bad):
    a = _good("w4a8")
    scales = a["scales"].clone()
    scales[3, 1] = bad
    with pytest.raises(RuntimeError, match=rf"scales \(W4A8 multipliers\) must be in \[1, 18\], found {bad}"):
        _g(a, scales=scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_w4a8_non_finite_global_scale(bad):
    a = _good("w4a8")
    gsc = a["global_scale"].clone()
    gsc[2] = bad
    with pytest.raises(RuntimeError, match="global_scale must be finite"):
        _g(a, global_scale=gsc)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_non_finite_weight_scales(precision):
    a = _good(precision)
    scales = a["scales"].float().clone()
    scales[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="svdquant::gemm: scales must be finite"):
        _g(a, scales=scales.to(a["scales"].dtype))
    if precision == "nvfp4":
        with pytest.raises(RuntimeError, match="global_scale must be finite"):
            _g(a, global_scale=torch.tensor([float("inf")]))
