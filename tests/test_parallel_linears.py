"""``svdquant::parallel_linears`` (independent linears side by side; on the GPU the second on a side stream) and the
compile pass ``parallelize_linears`` that gives it a FLUX.1 double block's image / text linear pairs. The CPU op is
the specification: one ``linear`` per entry, bit for bit. The CUDA kernel is tested against it in
test_cuda_parallel.py."""

from __future__ import annotations

import copy

import pytest
import torch

from svdquant_ops import ops, quantize_model
from svdquant_ops.integrations.fusion import fuse_qkv

from .builders import (count_calls, flux_inputs, fresh_compile_state, generator, linear_inputs, sd3_inputs, tiny_flux,
                       tiny_sd3)

ops.load()
OPS = torch.ops.svdquant
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)
NAMES = ("x", "smooth", "proj_down", "codes", "scales", "global_scale", "proj_up", "bias")


def entries(shapes, precision, dtype=torch.bfloat16, seed=0, biases=None):
    """parallel_linears' list arguments for linears of (lead, N, K, R) each; biases[i] False drops linear i's."""
    gen = generator(("parallel", tuple(shapes), precision, seed))
    ls = [linear_inputs(lead, N, K, R, precision, dtype, gen, bias=biases is None or biases[i])
          for i, (lead, N, K, R) in enumerate(shapes)]
    return {k: [lin[k] for lin in ls] for k in NAMES}


def call(fn, e, precision, act_unsigned=False):
    return fn(*(e[k] for k in NAMES), precision, act_unsigned)


def one_by_one(e, precision, act_unsigned=False):
    return [OPS.linear(*(e[k][i] for k in NAMES), precision, act_unsigned) for i in range(len(e["x"]))]


SHAPES = [((2, 24), 40, 128, 16), ((5,), 40, 128, 16), ((3,), 24, 192, 8)]


@pytest.mark.parametrize("precision,act_unsigned", [("w4a8", False), ("int4", False), ("int4", True),
                                                    ("nvfp4", False)])
def test_parallel_equals_one_linear_each(precision, act_unsigned):
    e = entries(SHAPES, precision, biases=(True, False, True))
    outs = call(OPS.parallel_linears, e, precision, act_unsigned)
    assert [tuple(o.shape) for o in outs] == [(2, 24, 40), (5, 40), (3, 24)]
    refs = one_by_one(e, precision, act_unsigned)
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert all(torch.equal(o, r) for o, r in zip(ops.parallel_linears(*(e[k] for k in NAMES), precision,
                                                                        act_unsigned), refs))


@pytest.mark.parametrize("precision", ["w4a8", "int4"])
def test_opcheck_parallel_linears(precision):
    e = entries(SHAPES[:2], precision, biases=(False, True))
    torch.library.opcheck(OPS.parallel_linears.default, (*(e[k] for k in NAMES), precision, False))


def _fake(x):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = _fake.mode = getattr(_fake, "mode", None) or FakeTensorMode()
    if isinstance(x, list):
        return [_fake(v) for v in x]
    return mode.from_tensor(x) if isinstance(x, torch.Tensor) else x


def test_errors_name_the_linear_and_the_argument():
    e = entries(SHAPES[:2], "w4a8")
    fake = lambda *a: OPS.parallel_linears(*[_fake(x) for x in a])  # noqa: E731
    for fn in (OPS.parallel_linears, fake):
        with pytest.raises(RuntimeError, match="x must hold at least one input"):
            fn(*([] for _ in NAMES), "w4a8", False)
        with pytest.raises(RuntimeError, match=r"one entry per linear, got 2, 2, 2, 2, 2, 2, 2 and 1"):
            call(fn, dict(e, bias=e["bias"][:1]), "w4a8")
        # linear 1's weight with K = 64 against its x's 128 channels: named by gemm's check, under the linear's name
        with pytest.raises(RuntimeError, match=r"parallel_linears \(linear 1\): K mismatch"):
            call(fn, dict(e, codes=[e["codes"][0], e["codes"][1][:, :32]]), "w4a8")
        with pytest.raises(RuntimeError, match=r"parallel_linears \(linear 0\): smooth must have shape \[K\]"):
            call(fn, dict(e, smooth=[e["smooth"][0][:64], e["smooth"][1]]), "w4a8")
        with pytest.raises(RuntimeError, match=r"precision must be 'int4', 'nvfp4' or 'w4a8', got 'w4a4'"):
            call(fn, e, "w4a4")
        # every linear's activation side is checked before any gemm side, as the C++ op checks them
        with pytest.raises(RuntimeError, match=r"\(linear 1\): smooth must have shape"):
            call(fn, dict(e, codes=[e["codes"][0][:, :32], e["codes"][1]], smooth=[e["smooth"][0],
                                                                                 e["smooth"][1][:64]]), "w4a8")
    with pytest.raises(ValueError, match="one entry per linear and at least one, got 2, 2, 2, 2, 2, 2, 2, 1"):
        ops.parallel_linears(*(e[k] for k in NAMES[:-1]), e["bias"][:1], "w4a8")


def _events(fn):
    return count_calls(fn, ("gemm", "parallel_linears"))


def _compiled(model, inputs, parallel: bool):
    """(output, gemm calls, parallel_linears calls) of ``model`` compiled with the pass on or off; one graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ops.install_compile_pass(parallel_linears=parallel)
    try:
        compiled = torch.compile(model, fullgraph=True)
        compiled(**inputs)
        out = _events(lambda: compiled(**inputs).sample)
    finally:
        ops.install_compile_pass(parallel_linears=ops.PARALLEL_LINEARS_DEFAULT)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("precision", ["w4a8", "int4"])
def test_compiled_double_blocks_pair_image_and_text(precision, fused):
    """With the pass on, each double block's image and text linears of one shape run as one parallel_linears call:
    to_qkv / add_qkv (fused; unfused, q/k/v read one quantize_act and are not whole linears), to_out / to_add_out,
    ff / ff_context in and out. The single blocks' linears each depend on the one before: nothing pairs there. The
    output equals the compiled model's without the pass bit for bit, as do the GEMMs that run."""
    model = tiny_flux()
    quantize_model(model, precision=precision, rank=16)
    if fused:
        fuse_qkv(model)
    inputs = flux_inputs()
    with torch.no_grad():
        ref, g_ref, p_ref = _compiled(copy.deepcopy(model), inputs, parallel=False)
        out, g, p = _compiled(model, inputs, parallel=True)
    doubles = len(model.transformer_blocks)
    assert p_ref == 0 and p == (4 if fused else 3) * doubles
    assert g == g_ref  # each pair's two linears still run one gemm each, inside the op
    assert torch.equal(out, ref)


def test_compiled_sd3_pairs_its_joint_blocks():
    """Not only FLUX: SD3's joint blocks run the image and text streams through twin linears too (q/k/v and
    add_q/k/v, to_out and to_add_out, ff and ff_context). Unfused, q/k/v share one quantize_act and stay apart; the
    tiny SD3's first block has three pairs of whole linears (its last block is context_pre_only: no text-stream
    output linears); the output is unchanged."""
    model = tiny_sd3()
    quantize_model(model, precision="w4a8", rank=16)
    inputs = sd3_inputs()
    with torch.no_grad():
        ref, g_ref, p_ref = _compiled(copy.deepcopy(model), inputs, parallel=False)
        out, g, p = _compiled(model, inputs, parallel=True)
    assert (p_ref, p) == (0, 3) and g == g_ref
    assert torch.equal(out, ref)


def test_dependent_linears_stay_apart_and_readers_move_after_the_pair():
    """Of three linears of one shape, b reads a's output and c reads neither: a pairs with c, not b. A reader of a's
    output traced before c's input (a's output times 2) moves after the pair, and the result is unchanged."""
    e = entries([((6,), 128, 128, 16)] * 3, "w4a8")
    w = {k: [e[k][i] for i in range(3)] for k in NAMES[1:]}

    def lin(x, i):
        return OPS.linear(x, *(w[k][i] for k in NAMES[1:]), "w4a8", False)

    def fn(x, y):
        a = lin(x, 0)
        early = a * 2  # reads a before c's input exists
        b = lin(a, 1)
        c = lin(torch.tanh(y), 2)
        return early + b + c

    x, y = e["x"][0], e["x"][1]
    runs = {}
    for parallel in (False, True):  # (against compiled without the pass: Inductor rounds the sum once, eager thrice)
        torch._dynamo.reset()
        ops.install_compile_pass(parallel_linears=parallel)
        try:
            compiled = torch.compile(fn, fullgraph=True)
            compiled(x, y)
            runs[parallel] = _events(lambda: compiled(x, y))
        finally:
            ops.install_compile_pass(parallel_linears=ops.PARALLEL_LINEARS_DEFAULT)
    assert runs[False][1:] == (3, 0) and runs[True][1:] == (3, 1)
    assert torch.equal(runs[True][0], runs[False][0])


def test_pass_pairs_in_the_graph_and_keeps_it_valid():
    """The pass on a traced graph: one pair per two independent linears (the one with more tokens first), a valid
    graph (lint) whose nodes are in dependency order, and no quantize_act / gemm left of the paired linears."""
    from torch.fx.experimental.proxy_tensor import make_fx

    e = entries([((4,), 128, 128, 16), ((12,), 128, 128, 16)], "w4a8")

    def fn(*flat):  # every tensor an input, so that tracing makes each a fake tensor
        a = [flat[i::2] for i in range(2)]  # each linear's x, smooth, ..., bias
        outs = [OPS.linear(*a[i], "w4a8", False) for i in range(2)]
        return outs[0].sum() + outs[1].sum()

    flat = [e[k][i] for k in NAMES for i in range(2)]
    gm = make_fx(fn, tracing_mode="fake")(*flat)
    assert ops.parallelize_linears(gm.graph) == 1
    gm.graph.lint()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    pair = [n for n in nodes if n.target is OPS.parallel_linears.default]
    assert len(pair) == 1 and not any(n.target in (OPS.quantize_act.default, OPS.gemm.default) for n in nodes)
    assert pair[0].args[0][0].meta["val"].shape[0] == 12  # the linear with more tokens stays on the caller's stream
    gm.recompile()
    assert torch.equal(gm(*flat), fn(*flat))


def test_chained_pairs_read_the_pairs_outputs():
    """Four linears of one shape, b reading a's output and d reading c's: (a, c) pair first, then (b, d), whose
    inputs are now outputs of the first pair's node. The graph stays valid and computes the same."""
    from torch.fx.experimental.proxy_tensor import make_fx

    e = entries([((6,), 128, 128, 16)] * 4, "w4a8")

    def fn(*flat):
        w = [flat[i::4] for i in range(4)]  # each linear's x, smooth, ..., bias
        lin = lambda x, i: OPS.linear(x, *w[i][1:], "w4a8", False)  # noqa: E731
        a = lin(w[0][0], 0)
        c = lin(w[2][0], 2)
        return lin(a, 1) + lin(c, 3)

    flat = [e[k][i] for k in NAMES for i in range(4)]
    gm = make_fx(fn, tracing_mode="fake")(*flat)
    assert ops.parallelize_linears(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    assert torch.equal(gm(*flat), fn(*flat))


def test_install_compile_pass_keeps_the_setting():
    from torch._inductor import config

    ops.install_compile_pass(parallel_linears=True)
    try:
        ops.install_compile_pass(cat_gemms=True)  # another option leaves it as it is
        assert config.post_grad_custom_pre_pass.parallel_linears is True
    finally:
        ops.install_compile_pass(parallel_linears=ops.PARALLEL_LINEARS_DEFAULT, cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert config.post_grad_custom_pre_pass.parallel_linears is ops.PARALLEL_LINEARS_DEFAULT
