"""Weight-only linears of one input as one call (issue 14 item 4): ``svdquant::w4a16_linear_group`` (CPU op and fake
kernel) and the compile pass ``group_w4a16`` that gives the w4a16 calls reading one tensor (FLUX.1's AdaLN linears,
each through its own SiLU of temb) to one grouped call.

The CUDA kernel (one GEMV launch over all the weights) is tested against this op in test_cuda_w4a16.py, the compiled
model with the pass on the GPU in test_cuda_fusion.py; the pass's setting in test_expand_ahead.py
(test_optional_pass_setting).
"""

from __future__ import annotations

import operator

import pytest
import torch

from svdquant_ops import ops, quantize_model

from .builders import FakeGraph, flux_inputs, fresh_compile_state, generator, tiny_flux
from .test_w4a16_op import w4a16_inputs

OPS = torch.ops.svdquant
ops.load()
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _weights(Ns, lead=(2,), K=128, x_dtype=torch.bfloat16, scale_dtype=torch.bfloat16, biases=None, seed="grp"):
    """x and one w4a16 weight per N (bias as w4a16_inputs draws it, or None where biases[i] is False)."""
    g = generator(seed)
    ws = [w4a16_inputs(lead, N, K, x_dtype, scale_dtype, g, bias=True if biases is None else biases[i])
          for i, N in enumerate(Ns)]
    return ws[0]["x"], ws


def _group(x, ws):
    return ops.w4a16_linear_group(x, [w["codes"] for w in ws], [w["scales"] for w in ws], [w["zeros"] for w in ws],
                                  [w["bias"] for w in ws])


@pytest.mark.parametrize("lead", [(1,), (3, 2), (0,)])
def test_group_equals_one_call_per_weight(lead):
    """Every output is w4a16_linear's for its weight, bit for bit: mixed row counts, biases in several dtypes and
    none."""
    x, ws = _weights((32, 24, 7, 48), lead=lead, biases=[True, False, torch.float32, torch.float16])
    out = _group(x, ws)
    assert len(out) == 4
    for o, w in zip(out, ws):
        ref = ops.w4a16_linear(x, w["codes"], w["scales"], w["zeros"], w["bias"])
        assert o.shape == (*lead, w["codes"].shape[0]) and torch.equal(o, ref)


def test_group_errors_name_the_argument_and_the_weight():
    x, ws = _weights((16, 16))
    with pytest.raises(RuntimeError, match="codes must hold at least one weight"):
        ops.w4a16_linear_group(x, [], [], [], [])
    with pytest.raises(RuntimeError, match="one entry per weight, got 2, 2, 1 and 2"):
        ops.w4a16_linear_group(x, [w["codes"] for w in ws], [w["scales"] for w in ws], [ws[0]["zeros"]],
                               [w["bias"] for w in ws])
    bad = torch.zeros(16, 32, dtype=torch.uint8)  # K = 64, x has 128
    with pytest.raises(RuntimeError, match=r"w4a16_linear_group \(weight 1\): codes must have shape \[N, K/2\]"):
        ops.w4a16_linear_group(x, [ws[0]["codes"], bad], [w["scales"] for w in ws], [w["zeros"] for w in ws],
                               [w["bias"] for w in ws])
    # the fake kernel says the same
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=r"\(weight 1\): codes must have shape"):
        OPS.w4a16_linear_group(mode.from_tensor(x), [mode.from_tensor(ws[0]["codes"]), mode.from_tensor(bad)],
                               [mode.from_tensor(w["scales"]) for w in ws], [mode.from_tensor(w["zeros"]) for w in ws],
                               [None, None])


def _compiled(model, inputs, group):
    from torch._inductor import config
    from torch.profiler import profile

    torch._dynamo.reset()
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        ops.install_compile_pass(group_w4a16=group)
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            compiled(**inputs)
            with profile() as prof:
                out = compiled(**inputs).sample
    names = [e.name for e in prof.events()]
    return out, {k: names.count("svdquant::" + k) for k in ("w4a16_linear", "w4a16_linear_group")}


def test_pass_groups_the_adaln_linears_of_flux_bit_for_bit():
    """Tiny FLUX, w4a8 with its 7 AdaLN linears weight-only: compiled with the pass, one grouped call runs instead of
    7 (each module applies its own SiLU to temb: the pass sees that they compute one value); the output equals the
    compiled model without the pass bit for bit."""
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    inputs = flux_inputs()
    ref, calls_ref = _compiled(model, inputs, group=False)
    out, calls = _compiled(model, inputs, group=True)
    assert calls_ref == {"w4a16_linear": 7, "w4a16_linear_group": 0}
    assert calls == {"w4a16_linear": 0, "w4a16_linear_group": 1}
    assert torch.equal(out, ref)


def _silu_of(g, t):
    """SiLU written out as the post-grad graph has it: x / (1 + exp(-x)) in fp32, back to bf16."""
    aten, prims = torch.ops.aten, torch.ops.prims
    f = g.call(prims.convert_element_type.default, t, torch.float32)
    d = g.call(aten.add.Tensor, g.call(aten.exp.default, g.call(aten.neg.default, f)), 1)
    return g.call(prims.convert_element_type.default, g.call(aten.div.Tensor, f, d), torch.bfloat16)


def _w4a16_graph(late_weight=False, other_input=False, temb_twice=False):
    """Three w4a16 calls on SiLU(temb), each with its own SiLU nodes. late_weight: the third call's codes are computed
    (a clone) after the first call; other_input: the second call reads SiLU of another tensor; temb_twice: two
    placeholders hold temb (equal values, separate inputs: not one value)."""
    x, ws = _weights((16, 32, 48), lead=(1,))
    g = FakeGraph()
    temb, other, temb2 = g.inputs("t", [x, x.clone(), x.clone()])
    weights = [g.inputs(f"w{i}_", [w["codes"], w["scales"], w["zeros"], w["bias"]]) for i, w in enumerate(ws)]
    ys = []
    for i, (c, s, z, b) in enumerate(weights):
        src = other if other_input and i == 1 else temb2 if temb_twice and i == 2 else temb
        if late_weight and i == 2:
            c = g.call(torch.ops.aten.clone.default, c)
        ys.append(g.call(OPS.w4a16_linear.default, _silu_of(g, src), c, s, z, b))
    g.graph.output(tuple(ys))
    return g.graph


def _calls(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def test_pass_merges_equal_inputs_and_erases_the_duplicate_silus():
    graph = _w4a16_graph()
    assert len(_calls(graph, torch.ops.aten.exp.default)) == 3
    assert ops.group_w4a16(graph) == 3
    graph.lint()
    (grp,) = _calls(graph, OPS.w4a16_linear_group.default)
    assert not _calls(graph, OPS.w4a16_linear.default)
    assert [len(lst) for lst in grp.args[1:]] == [3, 3, 3, 3]
    assert len(_calls(graph, torch.ops.aten.exp.default)) == 1  # the other two SiLUs were only read by the calls
    outs = graph.output_node().args[0]
    assert [o.target for o in outs] == [operator.getitem] * 3 and [o.args[1] for o in outs] == [0, 1, 2]
    assert [tuple(o.meta["val"].shape) for o in outs] == [(1, 16), (1, 32), (1, 48)]


@pytest.mark.parametrize("case", ["late_weight", "other_input", "temb_twice"])
def test_pass_groups_only_calls_on_one_value_with_weights_ready(case):
    """A call whose weight is computed after the group's first call, or whose input is another value (another
    tensor, or an equal tensor passed separately), stays a w4a16_linear; the other two are grouped."""
    graph = _w4a16_graph(**{case: True})
    assert ops.group_w4a16(graph) == 2
    graph.lint()
    assert len(_calls(graph, OPS.w4a16_linear_group.default)) == 1
    assert len(_calls(graph, OPS.w4a16_linear.default)) == 1


def test_pass_leaves_a_lone_call_alone():
    x, (w,) = _weights((16,), lead=(1,))
    g = FakeGraph()
    t, c, s, z, b = g.inputs("p", [x, w["codes"], w["scales"], w["zeros"], w["bias"]])
    g.graph.output(g.call(OPS.w4a16_linear.default, t, c, s, z, b))
    assert ops.group_w4a16(g.graph) == 0
    assert len(_calls(g.graph, OPS.w4a16_linear.default)) == 1


def _weight_nodes(g, Ns, K=128):
    x, ws = _weights(Ns, lead=(1,), K=K, seed=("nodes", tuple(Ns)))
    return x, [g.inputs(f"w{i}_", [w["codes"], w["scales"], w["zeros"], w["bias"]]) for i, w in enumerate(ws)]


def test_pass_keeps_the_graph_valid_where_a_group_reads_another_groups_output():
    """y = w(x, A) is grouped with w(x, B); two later calls read y: their group must read the getitem that replaced
    y, not the erased call."""
    g = FakeGraph()
    x, (wa, wb, wc, wd) = _weight_nodes(g, (128, 16, 16, 32))
    (xn,) = g.inputs("x", [x])
    y = g.call(OPS.w4a16_linear.default, xn, *wa)
    y1 = g.call(OPS.w4a16_linear.default, xn, *wb)
    z2 = g.call(OPS.w4a16_linear.default, y, *wc)
    z3 = g.call(OPS.w4a16_linear.default, y, *wd)
    g.graph.output((y1, z2, z3))
    assert ops.group_w4a16(g.graph) == 4
    g.graph.lint()
    first, second = _calls(g.graph, OPS.w4a16_linear_group.default)
    assert second.args[0].target is operator.getitem and second.args[0].args == (first, 0)


def test_pass_keeps_the_graph_valid_where_the_first_equal_input_is_erased():
    """s1 = neg(t) and s2 = neg(t) are one value (s1 first); abs(s1), abs(s2) another. The calls on abs(s2), abs(s1)
    form one group, those on s2, s2 another: erasing the first group's duplicate chain must not take a node the
    second group reads."""
    aten = torch.ops.aten
    g = FakeGraph()
    x, ws = _weight_nodes(g, (16, 16, 16, 16))
    (t,) = g.inputs("t", [x])
    s1, s2 = g.call(aten.neg.default, t), g.call(aten.neg.default, t)
    r0, r1 = g.call(aten.abs.default, s2), g.call(aten.abs.default, s1)
    outs = [g.call(OPS.w4a16_linear.default, src, *w) for src, w in zip((r0, r1, s2, s2), ws)]
    g.graph.output(tuple(outs))
    assert ops.group_w4a16(g.graph) == 4
    g.graph.lint()
    assert len(_calls(g.graph, OPS.w4a16_linear_group.default)) == 2
    assert len(_calls(g.graph, aten.neg.default)) == 1 and len(_calls(g.graph, aten.abs.default)) == 1


def test_value_numbering_tells_scalars_of_other_types_apart():
    """mul(x, 0.0) and mul(x, -0.0), add(x, 1) and add(x, 1.0) are different values (Python's == says equal)."""
    aten = torch.ops.aten
    g = FakeGraph()
    (t,) = g.inputs("t", [torch.randn(2, 4)])
    a, b = g.call(aten.mul.Tensor, t, 0.0), g.call(aten.mul.Tensor, t, -0.0)
    c, d = g.call(aten.add.Tensor, t, 1), g.call(aten.add.Tensor, t, 1.0)
    e = g.call(aten.add.Tensor, t, 1)
    g.graph.output((a, b, c, d, e))
    canon = ops._value_numbers(g.graph)
    assert canon[b] is b and canon[d] is d and canon[e] is c
