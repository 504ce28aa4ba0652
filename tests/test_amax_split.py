"""W4A8's per-token amax out of the op (issue 14 item 3): ``svdquant::quantize_act_given_amax`` (the CPU reference)
and the compile pass ``split_w4a8_amax`` that rewrites each W4A8 ``quantize_act`` into ATen ops for the amax
(which Inductor fuses into the kernel producing x) plus that op, so the op reads x once.

The GPU kernel of the op is tested against this reference in test_cuda_ops.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, layout, ops, prepare_model
from svdquant_ops.quantize.sharing import share_inputs

from .builders import act_inputs, flux_inputs, fresh_compile_state, generator, op_args, tiny_flux

OPS = torch.ops.svdquant
ops.load()
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def exact_amax(x, smooth):
    return (x.float() / smooth.float()).abs().amax(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_amax_gives_quantize_act(dtype):
    x, smooth, pd = op_args("quantize_act", act_inputs((3, 7), 320, 16, dtype, generator(("amax", str(dtype)))))
    x[0, 1, 5] = float("nan")
    x[1, 2, 9] = float("inf")
    x[2, 3] = 0
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    out = OPS.quantize_act_given_amax(x, smooth, pd, exact_amax(x, smooth))
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1].float().nan_to_num(-1.0), ref[1].float().nan_to_num(-1.0))
    assert torch.isnan(out[1][0, 1]).all() and torch.isinf(out[1][1, 2]).all() and out[1][2, 3].item() == 0
    assert torch.equal(out[2].nan_to_num(), ref[2].nan_to_num())


def test_the_given_amax_sets_the_scale():
    # amax 127 -> scale 1: codes are the rounded values; half the amax -> scale 0.5, codes double and clamp at 127;
    # twice -> scale 2; amax 0 -> every code 0; NaN amax -> scale NaN, codes 0
    x = torch.zeros(5, 64)
    x[:, :4] = torch.tensor([100.0, -3.5, 70.0, 127.0])
    amax = torch.tensor([[127.0], [63.5], [254.0], [0.0], [float("nan")]])
    codes, scales, _ = OPS.quantize_act_given_amax(x, torch.ones(64), torch.zeros(64, 0), amax)
    codes = layout.w4a8_from_stored(codes)  # (stored in W4A8's channel order)
    assert scales[:4, 0].tolist() == [1.0, 0.5, 2.0, 0.0] and torch.isnan(scales[4]).all()
    assert codes[0, :4].tolist() == [100, -4, 70, 127]
    assert codes[1, :4].tolist() == [127, -7, 127, 127]
    assert codes[2, :4].tolist() == [50, -2, 35, 64]  # 3.5 / 2 = 1.75 -> 2; 127 / 2 = 63.5 -> 64 (even)
    assert (codes[3:] == 0).all()


def _args():
    x, smooth, pd = op_args("quantize_act", act_inputs(3, 128, 16, torch.bfloat16, generator("amax-errors")))
    return dict(x=x, smooth=smooth, proj_down=pd, amax=exact_amax(x, smooth))


ERROR_CASES = [
    ("amax bf16", lambda a: dict(a, amax=a["amax"].bfloat16()),
     "amax must be float32 (each token's amax of |x / smooth|), got torch.bfloat16"),
    ("amax without its last dim", lambda a: dict(a, amax=a["amax"][:, 0]),
     "amax must have shape [3, 1] (x's leading dims and one value per token), got [3]"),
    ("amax of other tokens", lambda a: dict(a, amax=a["amax"][:2]), "amax must have shape [3, 1]"),
    ("K not a multiple of 64", lambda a: dict(a, x=a["x"][:, :100], smooth=a["smooth"][:100],
                                              proj_down=a["proj_down"][:100]),
     "x.size(-1) (K=100) must be a positive multiple of 64 for precision 'w4a8'"),
    ("smooth of another dtype", lambda a: dict(a, smooth=a["smooth"].half()),
     "smooth must have x's dtype torch.bfloat16, got torch.float16"),
]


@pytest.mark.parametrize("name,change,msg", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_eager_and_fake(name, change, msg):
    a = change(_args())
    call = lambda a: OPS.quantize_act_given_amax(a["x"], a["smooth"], a["proj_down"], a["amax"])  # noqa: E731
    with pytest.raises(RuntimeError) as exc:
        call(a)
    assert "svdquant::quantize_act_given_amax: " + msg in str(exc.value)
    mode = FakeTensorMode()
    fake = {k: mode.from_tensor(v) for k, v in a.items()}
    with mode, pytest.raises(RuntimeError) as exc:
        call(fake)
    assert "svdquant::quantize_act_given_amax: " + msg in str(exc.value)


def test_negative_amax_is_refused():
    a = _args()
    a["amax"][1] = -2.0
    with pytest.raises(RuntimeError, match=r"amax must be >= 0 \(or NaN\), found -2"):
        OPS.quantize_act_given_amax(a["x"], a["smooth"], a["proj_down"], a["amax"])


# ------------------------------------------------------------------------------------------------------------------
# the compile pass
# ------------------------------------------------------------------------------------------------------------------
def _count(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return out, names.count("svdquant::quantize_act"), names.count("svdquant::quantize_act_given_amax")


def _w4a8_flux():
    model = tiny_flux()
    prepare_model(model)
    quantize_(model, SVDQuantConfig(precision="w4a8"))
    share_inputs(model)
    return model


@pytest.mark.parametrize("dynamic", [False, True])
def test_pass_rewrites_every_w4a8_quantize_act_bit_identical_to_eager(dynamic):
    """One linear whose input is the graph's input: Inductor's amax reads the same bf16 values the op would, and the
    CPU's division is IEEE, so the compiled output equals eager's bit for bit, with the op run once per input; also
    with symbolic shapes (the amax's fake value carries them)."""
    from torch._inductor import config

    model = torch.nn.Sequential(torch.nn.Linear(256, 96)).to(torch.bfloat16)
    quantize_(model, SVDQuantConfig(precision="w4a8", rank=16))
    x = torch.randn(4, 9, 256).to(torch.bfloat16) * 3
    with torch.inference_mode():
        eager = model(x)
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        ops.install_compile_pass(amax_split=True)
        compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
        with torch.inference_mode():
            compiled(x)
            out, n_qa, n_given = _count(lambda: compiled(x))
    assert (n_qa, n_given) == (0, 1)
    assert torch.equal(out, eager)


def test_pass_on_a_shared_w4a8_flux():
    """Tiny FLUX, w4a8, shared inputs: compiled with the pass, every activation quantization is the given-amax op,
    one per input (20, as test_sharing counts), and the output matches eager within Inductor's fused rounding."""
    from torch._inductor import config

    model = _w4a8_flux()
    inputs = flux_inputs()
    with torch.no_grad():  # (inference tensors bypass the eager cache: 34 calls there)
        eager, n_eager, _ = _count(lambda: model(**inputs).sample)
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        ops.install_compile_pass(amax_split=True)
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            compiled(**inputs)
            out, n_qa, n_given = _count(lambda: compiled(**inputs).sample)
    assert n_eager == 20 and (n_qa, n_given) == (0, 20)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_pass_leaves_int4_alone():
    graph = torch.fx.Graph()
    x, smooth, pd = (graph.placeholder(n) for n in ("x", "smooth", "pd"))
    q = graph.call_function(OPS.quantize_act.default, (x, smooth, pd, "int4", False))
    graph.output(q)
    assert ops.split_w4a8_amax(copy.deepcopy(graph)) == 0


def test_split_is_opt_in():
    """install_compile_pass() merges but does not split (until the CUDA kernel has passed its GPU tests); a second
    call with amax_split=True turns the split on in the same pass object, with another cache key, and a later plain
    call (quantize_model's) leaves it on."""
    from torch._inductor import config

    model = torch.nn.Sequential(torch.nn.Linear(128, 64)).to(torch.bfloat16)
    quantize_(model, SVDQuantConfig(precision="w4a8", rank=16))
    x = torch.randn(5, 128).to(torch.bfloat16)
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        ops.install_compile_pass()
        p = config.post_grad_custom_pre_pass
        key = p.uuid()
        with torch.inference_mode():
            compiled = torch.compile(model, fullgraph=True)
            compiled(x)
            _, n_qa, n_given = _count(lambda: compiled(x))
        assert (p.amax_split, n_qa, n_given) == (False, 1, 0)
        ops.install_compile_pass(amax_split=True)
        assert config.post_grad_custom_pre_pass is p and p.amax_split and p.uuid() != key
        ops.install_compile_pass()  # as quantize_model calls it: keeps the split
        assert p.amax_split
        ops.install_compile_pass(amax_split=False)
        assert not p.amax_split and p.uuid() == key
