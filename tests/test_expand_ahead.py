"""W4A8 weights expanded ahead of their GEMM (issue 14 item 2): ``svdquant::expand_w4a8_weight`` and
``svdquant::gemm_expanded`` (CPU reference and fake kernels), and the compile pass ``expand_w4a8_ahead`` that chains
a compiled model's W4A8 GEMMs so that each one expands the next one's weight.

The CUDA kernels are tested against this reference in test_cuda_ops.py (ops) and test_cuda_fusion.py (compiled).
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from svdquant_ops import layout, ops, quantize_model
from svdquant_ops.integrations.fusion import fuse_qkv

from .builders import (FakeGraph, flux_inputs, fresh_compile_state, gemm_inputs, generator, op_args,
                       packed_w4a8_weight, tiny_flux)

OPS = torch.ops.svdquant
ops.load()
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _sext(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n >= 8, n - 16, n)


def reference_expansion(codes: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """code * multiplier as int8 (two's complement wrap, as int8 arithmetic gives), written out independently."""
    lo, hi = _sext((codes & 0xF).long()), _sext((codes >> 4).long())
    vals = torch.stack([lo, hi], -1).reshape(codes.shape[0], -1)
    prod = vals * mult.long().repeat_interleave(64, dim=1)
    return ((prod + 128) % 256 - 128).to(torch.int8)


def _gemm_args(M=6, N=72, K=192, R=16, dtype=torch.bfloat16, seed="expand"):
    a = gemm_inputs(M, N, K, R, "w4a8", dtype, generator(seed))
    return op_args("gemm", a)


@pytest.mark.parametrize("N,K", [(1, 64), (72, 192), (130, 1024)])
def test_expansion_is_code_times_multiplier(N, K):
    g = generator(("expand", N, K))
    codes, mult = packed_w4a8_weight(N, K, g)  # every nibble, -8 included
    out = OPS.expand_w4a8_weight(codes, mult)
    assert out.dtype == torch.int8 and out.shape == (N, K)
    assert torch.equal(layout.w4a8_from_stored(out), reference_expansion(codes, mult))  # W4A8's channel order


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_gemm_expanded_equals_gemm_and_expands_the_next_weight(dtype, out_dtype):
    args = _gemm_args(dtype=dtype)
    ac, asc, codes, scales, gsc, da, up, bias = args
    ref = OPS.gemm(*args, "w4a8", out_dtype, False)
    weight = OPS.expand_w4a8_weight(codes, scales)
    nxt = op_args("gemm", gemm_inputs(1, 40, 320, 0, "w4a8", dtype, generator("next")))
    out, next_weight = OPS.gemm_expanded(ac, asc, codes, scales, gsc, da, up, bias, out_dtype, weight, nxt[2], nxt[3])
    assert torch.equal(out, ref)
    assert torch.equal(next_weight, OPS.expand_w4a8_weight(nxt[2], nxt[3]))
    out, none = OPS.gemm_expanded(ac, asc, codes, scales, gsc, da, up, None, out_dtype, weight)
    assert torch.equal(out, OPS.gemm(ac, asc, codes, scales, gsc, da, up, None, "w4a8", out_dtype, False))
    assert none.dtype == torch.int8 and none.shape == (0, 0)


def test_opcheck():
    args = _gemm_args(M=3)
    weight = OPS.expand_w4a8_weight(args[2], args[3])
    torch.library.opcheck(OPS.expand_w4a8_weight.default, (args[2], args[3]))
    nxt = _gemm_args(N=24, K=128, seed="next")
    torch.library.opcheck(OPS.gemm_expanded.default, (*args, torch.bfloat16, weight, nxt[2], nxt[3]))
    torch.library.opcheck(OPS.gemm_expanded.default, (*args, torch.float32, weight, None, None))


def _expanded_call(a):
    return OPS.gemm_expanded(a["ac"], a["asc"], a["codes"], a["scales"], a["gsc"], a["da"], a["up"], a["bias"],
                             torch.bfloat16, a["weight"], a["next_codes"], a["next_scales"])


def _named_args():
    ac, asc, codes, scales, gsc, da, up, bias = _gemm_args()
    nxt = _gemm_args(N=24, K=128, seed="next")
    return dict(ac=ac, asc=asc, codes=codes, scales=scales, gsc=gsc, da=da, up=up, bias=bias,
                weight=OPS.expand_w4a8_weight(codes, scales), next_codes=nxt[2], next_scales=nxt[3])


GEMM_ERRORS = [
    ("weight uint8", lambda a: dict(a, weight=a["weight"].view(torch.uint8)),
     "weight must be int8 (the expanded weight code * multiplier, expand_w4a8_weight), got torch.uint8"),
    ("weight of another shape", lambda a: dict(a, weight=a["weight"][:, :128]),
     "weight must have shape [N, K] = [72, 192] (codes' expansion), got [72, 128]"),
    ("next codes alone", lambda a: dict(a, next_scales=None),
     "next_codes and next_scales must be given together (the next weight to expand) or both be None"),
    ("next scales of another shape", lambda a: dict(a, next_scales=a["next_scales"][:, :1]),
     "next_scales must have shape [N, K/64] = [24, 2], got [24, 1]"),
    ("next codes int8", lambda a: dict(a, next_codes=a["next_codes"].view(torch.int8)),
     "next_codes must be uint8 (two 4-bit codes per byte), got torch.int8"),
    ("next K not a multiple of 64", lambda a: dict(a, next_codes=a["next_codes"][:, :48]),
     "next_codes must hold K (96) input channels per row, a positive multiple of 64 for precision 'w4a8'"),
    ("act codes of int4", lambda a: dict(a, ac=a["ac"].view(torch.uint8)),
     "act_codes must be int8 (one 8-bit code per byte) for precision 'w4a8', got torch.uint8"),
]


@pytest.mark.parametrize("name,change,msg", GEMM_ERRORS, ids=[c[0] for c in GEMM_ERRORS])
def test_gemm_expanded_errors_eager_and_fake(name, change, msg):
    a = change(_named_args())
    with pytest.raises(RuntimeError) as exc:
        _expanded_call(a)
    assert "svdquant::gemm_expanded: " + msg in str(exc.value)
    mode = FakeTensorMode()
    fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    with mode, pytest.raises(RuntimeError) as exc:
        _expanded_call(fake)
    assert "svdquant::gemm_expanded: " + msg in str(exc.value)


def test_cpu_op_refuses_a_weight_that_is_not_the_expansion():
    a = _named_args()
    a["weight"] = a["weight"].clone()
    a["weight"][3, 5] += 1
    with pytest.raises(RuntimeError, match="weight must equal expand_w4a8_weight\\(codes, scales\\)"):
        _expanded_call(a)


def test_multipliers_out_of_range_are_refused():
    a = _named_args()
    bad = a["scales"].clone()
    bad[0, 0] = 19
    with pytest.raises(RuntimeError, match=r"svdquant::expand_w4a8_weight: scales \(W4A8 multipliers\) must be in "
                                           r"\[1, 18\], found 19"):
        OPS.expand_w4a8_weight(a["codes"], bad)
    a["next_scales"] = a["next_scales"].clone()
    a["next_scales"][1, 1] = 0
    with pytest.raises(RuntimeError, match=r"next_scales \(W4A8 multipliers\) must be in \[1, 18\], found 0"):
        _expanded_call(a)


EXPAND_ERRORS = [
    ("codes int8", lambda c, m: (c.view(torch.int8), m), "codes must be uint8 (two 4-bit codes per byte), got torch.int8"),
    ("codes 1-d", lambda c, m: (c[0], m), "codes must have shape [N, K/2] with N >= 1, got [96]"),
    ("K not a multiple of 64", lambda c, m: (c[:, :40], m),
     "codes must hold K (80) input channels per row, a positive multiple of 64 for precision 'w4a8'"),
    ("multipliers float", lambda c, m: (c, m.float()),
     "scales must be uint8 (integer multipliers in [1, 18]) for precision 'w4a8', got torch.float32"),
    ("multipliers of another shape", lambda c, m: (c, m[:3]), "scales must have shape [N, K/64] = [72, 3], got [3, 3]"),
]


@pytest.mark.parametrize("name,change,msg", EXPAND_ERRORS, ids=[c[0] for c in EXPAND_ERRORS])
def test_expand_errors_eager_and_fake(name, change, msg):
    a = _named_args()
    codes, mult = change(a["codes"], a["scales"])
    with pytest.raises(RuntimeError) as exc:
        OPS.expand_w4a8_weight(codes, mult)
    assert "svdquant::expand_w4a8_weight: " + msg in str(exc.value)
    mode = FakeTensorMode()
    with mode, pytest.raises(RuntimeError) as exc:
        OPS.expand_w4a8_weight(mode.from_tensor(codes), mode.from_tensor(mult))
    assert "svdquant::expand_w4a8_weight: " + msg in str(exc.value)


# ------------------------------------------------------------------------------------------------------------------
# the compile pass
# ------------------------------------------------------------------------------------------------------------------
def _count(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return out, {k: names.count("svdquant::" + k) for k in ("gemm", "gemm_expanded", "expand_w4a8_weight")}


def _compiled(model, inputs, expand_ahead, **compile_kw):
    from torch._inductor import config

    torch._dynamo.reset()
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        # (parallel_linears off: the linears it pairs leave the expand-ahead chain, README)
        ops.install_compile_pass(expand_ahead=expand_ahead, parallel_linears=False)
        compiled = torch.compile(model, fullgraph=True, **compile_kw)
        with torch.inference_mode():
            compiled(**inputs)
            return _count(lambda: compiled(**inputs).sample)


@pytest.mark.parametrize("fused", [False, True])
def test_pass_chains_every_w4a8_gemm_bit_for_bit(fused):
    """Tiny FLUX, w4a8 (34 GEMMs, 22 with q/k/v fused): compiled with the pass, every GEMM is gemm_expanded and one
    weight is expanded on its own (the first); the output equals the compiled model without the pass bit for bit."""
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    if fused:
        fuse_qkv(model)
    n = 22 if fused else 34
    inputs = flux_inputs()
    ref, calls_ref = _compiled(model, inputs, expand_ahead=False)
    out, calls = _compiled(model, inputs, expand_ahead=True)
    assert calls_ref == {"gemm": n, "gemm_expanded": 0, "expand_w4a8_weight": 0}
    assert calls == {"gemm": 0, "gemm_expanded": n, "expand_w4a8_weight": 1}
    assert torch.equal(out, ref)


def test_pass_leaves_int4_alone():
    model = tiny_flux()
    quantize_model(model, precision="int4")
    _, calls = _compiled(model, flux_inputs(), expand_ahead=True)
    assert calls == {"gemm": 34, "gemm_expanded": 0, "expand_w4a8_weight": 0}


def _graph_with_two_gemms(second_codes_after_first: bool):
    """An FX graph of two W4A8 gemm calls; the second weight's codes are a placeholder, or computed (a clone) after
    the first call."""
    g = FakeGraph()
    p1, p2 = g.inputs("a", _gemm_args(seed="g1")), g.inputs("b", _gemm_args(N=24, K=128, seed="g2"))
    y1 = g.call(OPS.gemm.default, *p1, "w4a8", torch.bfloat16, False)
    if second_codes_after_first:
        p2[2] = g.call(torch.ops.aten.clone.default, p2[2])
    y2 = g.call(OPS.gemm.default, *p2, "w4a8", torch.bfloat16, False)
    g.graph.output((y1, y2))
    return g.graph


def test_pass_keeps_the_graph_valid_where_a_gemm_reads_another_gemms_output():
    """A GEMM whose argument is an earlier GEMM's output (here its fp32 output as the next one's down_act): the
    rewritten call must read the replacement, not the erased node."""
    g = FakeGraph()
    p1 = g.inputs("a", _gemm_args(N=16, R=16, seed="c1"))  # out [6, 16] fp32 = the next call's down_act [6, R = 16]
    p2 = g.inputs("b", _gemm_args(N=24, K=128, R=16, seed="c2"))
    y1 = g.call(OPS.gemm.default, *p1, "w4a8", torch.float32, False)
    p2[5] = y1
    y2 = g.call(OPS.gemm.default, *p2, "w4a8", torch.bfloat16, False)
    g.graph.output((y1, y2))
    graph = g.graph
    assert ops.expand_w4a8_ahead(graph) == 2
    graph.lint()
    gemms = [n for n in graph.nodes if n.target is OPS.gemm_expanded.default]
    assert gemms[1].args[5].target is operator.getitem and gemms[1].args[5].args[0] is gemms[0]


@pytest.mark.parametrize("late", [False, True])
def test_pass_restarts_the_chain_where_the_next_codes_come_later(late):
    graph = _graph_with_two_gemms(late)
    assert ops.expand_w4a8_ahead(graph) == 2
    graph.lint()
    calls = [n for n in graph.nodes if n.op == "call_function"]
    expands = [n for n in calls if n.target is OPS.expand_w4a8_weight.default]
    gemms = [n for n in calls if n.target is OPS.gemm_expanded.default]
    assert len(gemms) == 2 and not [n for n in calls if n.target is OPS.gemm.default]
    assert len(expands) == (2 if late else 1)
    assert (gemms[0].args[10] is None) == late  # next_codes of the first call


@pytest.mark.parametrize("name", ["expand_ahead", "group_w4a16"])
def test_optional_pass_setting(name):
    """install_compile_pass(expand_ahead=...) / (group_w4a16=...) sets the installed pass, with another cache key; a
    later plain call (quantize_model's) keeps it."""
    from torch._inductor import config

    default = getattr(ops, {"expand_ahead": "EXPAND_AHEAD_DEFAULT", "group_w4a16": "GROUP_W4A16_DEFAULT"}[name])
    with config.patch(post_grad_custom_pre_pass=None):
        ops.install_compile_pass()
        p = config.post_grad_custom_pre_pass
        assert getattr(p, name) == default
        key = p.uuid()
        ops.install_compile_pass(**{name: not default})
        assert config.post_grad_custom_pre_pass is p and p.uuid() != key
        ops.install_compile_pass()
        assert getattr(p, name) != default
        ops.install_compile_pass(**{name: default})
        assert p.uuid() == key
