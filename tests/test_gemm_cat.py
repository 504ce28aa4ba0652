"""``svdquant::gemm_cat`` (one activation against several weights, outputs side by side) and the compile pass
``cat_w4a8_gemms`` that gives it the W4A8 GEMMs of one quantized activation (a FLUX.1 single block's q/k/v and
proj_mlp). The CPU op is the specification: ``torch.cat`` of one ``gemm`` per weight, bit for bit. The CUDA kernel
is tested against gemm's CUDA kernel in test_cuda_ops.py."""

from __future__ import annotations

import copy

import pytest
import torch

from svdquant_ops import ops, quantize_model
from svdquant_ops.integrations.fusion import fuse_qkv

from .builders import (count_calls, flux_inputs, fresh_compile_state, gemm_inputs, generator, tiny_flux,
                       weight_inputs)

ops.load()
OPS = torch.ops.svdquant
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)
WEIGHT = ("codes", "scales", "global_scale", "proj_up", "bias")


def cat_inputs(lead, Ns, K, R, precision, dtype=torch.bfloat16, seed=0, biases=None):
    """gemm_cat's arguments (lists for the weight parts) for weights of Ns rows; biases[i] False drops weight i's."""
    gen = generator(("cat", lead, tuple(Ns), K, R, precision, seed))
    a = gemm_inputs(lead, Ns[0], K, R, precision, dtype, gen, bias=biases is None or biases[0])
    ws = [{k: a[k] for k in WEIGHT}] + [weight_inputs(N, K, R, precision, dtype, gen,
                                                      bias=biases is None or biases[i + 1])
                                        for i, N in enumerate(Ns[1:])]
    return dict(act_codes=a["act_codes"], act_scales=a["act_scales"], down_act=a["down_act"],
                **{k: [w[k] for w in ws] for k in WEIGHT})


def call(fn, c, precision, out_dtype=torch.bfloat16, act_unsigned=False):
    return fn(c["act_codes"], c["act_scales"], c["codes"], c["scales"], c["global_scale"], c["down_act"],
              c["proj_up"], c["bias"], precision, out_dtype, act_unsigned)


def separate(c, precision, out_dtype=torch.bfloat16, act_unsigned=False):
    return torch.cat([OPS.gemm(c["act_codes"], c["act_scales"], *(c[k][i] for k in WEIGHT[:3]), c["down_act"],
                               c["proj_up"][i], c["bias"][i], precision, out_dtype, act_unsigned)
                      for i in range(len(c["codes"]))], -1)


@pytest.mark.parametrize("precision,act_unsigned", [("w4a8", False), ("int4", False), ("int4", True),
                                                    ("nvfp4", False)])
@pytest.mark.parametrize("Ns,biases", [((40,), None), ((24, 40, 8), (True, False, True))])
def test_cat_equals_one_gemm_per_weight(precision, act_unsigned, Ns, biases):
    c = cat_inputs((2, 3), Ns, 128, 16, precision, biases=biases)
    out = call(OPS.gemm_cat, c, precision, act_unsigned=act_unsigned)
    assert out.shape == (2, 3, sum(Ns))
    assert torch.equal(out, separate(c, precision, act_unsigned=act_unsigned))


@pytest.mark.parametrize("precision", ["w4a8", "int4"])
def test_opcheck_gemm_cat(precision):
    c = cat_inputs((3,), (24, 40), 128, 16, precision, biases=(False, True))
    args = (c["act_codes"], c["act_scales"], c["codes"], c["scales"], c["global_scale"], c["down_act"], c["proj_up"],
            c["bias"], precision, torch.bfloat16, False)
    torch.library.opcheck(OPS.gemm_cat.default, args)


def test_errors_name_the_weight_and_the_argument():
    c = cat_inputs((3,), (24, 40), 128, 16, "w4a8")
    with pytest.raises(RuntimeError, match="codes must hold at least one weight"):
        OPS.gemm_cat(c["act_codes"], c["act_scales"], [], [], [], c["down_act"], [], [], "w4a8", torch.bfloat16)
    short = dict(c, bias=c["bias"][:1])
    with pytest.raises(RuntimeError, match="one entry per weight, got 2, 2, 2, 2 and 1"):
        call(OPS.gemm_cat, short, "w4a8")
    wrong = dict(c, codes=[c["codes"][0], c["codes"][1][:, :32]])  # weight 1 with K = 64
    for fn in (OPS.gemm_cat, lambda *a: OPS.gemm_cat(*[_fake(x) for x in a])):
        with pytest.raises(RuntimeError, match=r"gemm_cat \(weight 1\).*codes"):
            call(fn, wrong, "w4a8")


def _fake(x):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = _fake.mode = getattr(_fake, "mode", None) or FakeTensorMode()
    if isinstance(x, list):
        return [_fake(v) for v in x]
    return mode.from_tensor(x) if isinstance(x, torch.Tensor) else x


def _events(fn):
    return count_calls(fn, ("gemm", "gemm_cat"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_compiled_single_blocks_run_one_gemm_cat(fused):
    """With the pass on, each single block's q/k/v (fused or not) and proj_mlp run as one gemm_cat call (and an
    unfused double block's q/k/v as one, its added q/k/v as another); the output equals the compiled model's
    without the pass bit for bit, in one graph."""
    from torch._dynamo.utils import counters

    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=16)
    if fused:
        fuse_qkv(model)
    singles = len(model.single_transformer_blocks)
    inputs = flux_inputs()
    with torch.no_grad():
        ops.install_compile_pass(cat_gemms=False)
        plain = torch.compile(copy.deepcopy(model), fullgraph=True)
        plain(**inputs)
        ref, g_ref, c_ref = _events(lambda: plain(**inputs).sample)
        torch._dynamo.reset()
        counters.clear()
        ops.install_compile_pass(cat_gemms=True)
        try:
            compiled = torch.compile(model, fullgraph=True)
            compiled(**inputs)
            out, g, c = _events(lambda: compiled(**inputs).sample)
        finally:
            ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    # single blocks: to_qkv + proj_mlp, or to_q, to_k, to_v + proj_mlp; double blocks unfused: to_q/k/v and
    # add_q/k/v_proj (fused, each is one GEMM of its own activation)
    doubles = len(model.transformer_blocks)
    cats = singles + (0 if fused else 2 * doubles)
    merged = singles * (2 if fused else 4) + (0 if fused else 6 * doubles)
    assert c_ref == 0 and (c, g) == (cats, g_ref - merged)
    assert torch.equal(out, ref)


def test_pass_leaves_gemms_of_different_activations_alone():
    """The double blocks' GEMMs each read their own quantize_act (q/k/v fused): nothing to put side by side there."""
    model = tiny_flux()
    model.single_transformer_blocks = torch.nn.ModuleList()
    quantize_model(model, precision="w4a8", rank=16)
    fuse_qkv(model)
    with torch.no_grad():
        ops.install_compile_pass(cat_gemms=True)
        try:
            compiled = torch.compile(model, fullgraph=True)
            compiled(**flux_inputs())
            _, g, c = _events(lambda: compiled(**flux_inputs()).sample)
        finally:
            ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert c == 0 and g > 0


def test_gemms_whose_outputs_leave_the_graph_stay_apart():
    """A compiled region that returns the GEMM outputs themselves gets them as gemm computes them (contiguous, each
    its own memory), not as column slices of one shared result; outputs used inside the region are merged."""
    c = cat_inputs((2, 5), (24, 40, 8), 128, 16, "w4a8")

    def gemms(act_codes, act_scales, down_act):
        return [OPS.gemm(act_codes, act_scales, c["codes"][i], c["scales"][i], c["global_scale"][i], down_act,
                         c["proj_up"][i], c["bias"][i], "w4a8", torch.bfloat16) for i in range(3)]

    args = (c["act_codes"], c["act_scales"], c["down_act"])
    ops.install_compile_pass(cat_gemms=True)
    try:
        returned = torch.compile(gemms, fullgraph=True)
        returned(*args)
        _, g, n = _events(lambda: returned(*args))
        outs = returned(*args)
        assert (g, n) == (3, 0) and all(o.is_contiguous() for o in outs)
        torch._dynamo.reset()
        used = torch.compile(lambda *a: torch.cat([o.float().sum(-1) for o in gemms(*a)], -1), fullgraph=True)
        used(*args)
        out, g, n = _events(lambda: used(*args))
    finally:
        ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert (g, n) == (0, 1)
    assert torch.equal(out, torch.cat([o.float().sum(-1) for o in gemms(*args)], -1))
