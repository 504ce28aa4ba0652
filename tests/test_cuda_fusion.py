"""``fuse_qkv`` on the GPU: the fused model's outputs equal the unfused model's bit for bit with the CUDA kernels
(each output element of the wider GEMM is computed as in the narrow one), after a move of the fused model to the
GPU, and under torch.compile with CUDA graphs. Skips without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from torch._dynamo.utils import counters  # noqa: E402

from svdquant_ops import fuse_qkv, quantize_model  # noqa: E402

from .builders import flux_inputs, fresh_compile_state, tiny_flux  # noqa: E402

_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("precision", ["w4a8", "int4", "nvfp4"])
def test_fused_equals_unfused_on_gpu(precision):
    model = tiny_flux()
    quantize_model(model, precision=precision)
    fused = copy.deepcopy(model)
    assert len(fuse_qkv(fused).fused) == 4
    model.cuda()
    with torch.inference_mode():  # the fused model moves under inference_mode, as a user's script may
        fused.to("cuda")
    inputs = _cuda(flux_inputs())
    with torch.inference_mode():
        ref = model(**inputs).sample
        out = fused(**inputs).sample
    assert torch.equal(out, ref)
    block = fused.single_transformer_blocks[0]
    assert block.attn.to_qkv.weight.codes.is_cuda


def test_fused_compiles_with_cuda_graphs():
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    fuse_qkv(model)
    model.cuda()
    inputs = _cuda(flux_inputs())
    with torch.inference_mode():
        eager = model(**inputs).sample
        counters.clear()
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # compile, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(**inputs).sample.clone()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)  # Inductor's fused elementwise rounding


# (compile-pass setting, the op its rewrite calls and how often per step, the op it replaces and how often)
PASSES = {"expand_ahead": ("gemm_expanded", 22, "gemm", 22), "group_w4a16": ("w4a16_linear_group", 1, "w4a16_linear", 7)}


@pytest.mark.parametrize("which", sorted(PASSES))
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_pass_compiled_equals_without(monkeypatch, which, mode):
    """A compiled fused w4a8 model with an optional compile pass on (install_compile_pass(expand_ahead=True): its
    GEMMs expand each other's weights; group_w4a16=True: its 7 AdaLN linears as one grouped call) gives the output
    of the same model compiled without, bit for bit, on the CUDA kernels; in one graph, also with CUDA graphs.
    (expand_ahead's GEMMs take the weights expanded, the prep path's operands: it is compared with the prep path.)"""
    from torch._inductor import config

    from svdquant_ops import ops

    if which == "expand_ahead":
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")

    new_op, new_calls, old_op, old_calls = PASSES[which]
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    fuse_qkv(model)
    model.cuda()
    inputs = _cuda(flux_inputs())
    outs = []
    for on in (False, True):
        torch._dynamo.reset()
        with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False), torch.inference_mode():
            ops.install_compile_pass(**{which: on})
            counters.clear()
            compiled = torch.compile(model, fullgraph=True, mode=mode)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(**inputs).sample.clone()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.compiler.cudagraph_mark_step_begin()
                compiled(**inputs)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
        if mode is None:  # (CUDA graph replays call no op)
            names = [e.name for e in prof.events()]
            assert names.count(f"svdquant::{new_op}") == (new_calls if on else 0)
            assert names.count(f"svdquant::{old_op}") == (0 if on else old_calls)
        outs.append(out)
    assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("tile", ["128", "256"])
def test_gemm_cat_pass_on_gpu(monkeypatch, tile):
    """install_compile_pass(cat_gemms=True) on the GPU with unwrapped weights: each single block's to_qkv and
    proj_mlp run as one gemm_cat call, and at a forced tile width the output equals the compiled model's without the
    pass bit for bit."""
    from svdquant_ops import ops, unwrap_weights

    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", tile)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")  # (the tile widths are the prep path's)
    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=16, weight_only="w4a16")
    fuse_qkv(model)
    model.cuda()
    unwrap_weights(model)
    inputs = _cuda(flux_inputs())
    outs, calls = [], []
    try:
        for cat in (False, True):
            ops.install_compile_pass(cat_gemms=cat)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)
            with torch.inference_mode():
                compiled(**inputs)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    outs.append(compiled(**inputs).sample)
            calls.append(sum(e.name == "svdquant::gemm_cat" for e in prof.events()))
    finally:
        ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert calls == [0, len(model.single_transformer_blocks)]
    assert torch.equal(outs[0], outs[1])
