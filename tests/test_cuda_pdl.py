"""Programmatic dependent launch (``SVDQUANT_OPS_CUDA_PDL=1``, Hopper) changes when our kernels are launched, never
what they compute: each kernel launched that way waits for the grids before it before touching memory
(``csrc/cuda/common.cuh``). So every output with PDL on must equal the same call with PDL off bit for bit, also in
chains where each kernel reads what the one before wrote a moment ago (the case a missing wait would break), in a
CUDA graph, and under torch.compile with CUDA graphs. Skipped without CUDA; on GPUs other than compute capability
9.0 the switch launches plainly and the tests still check equality."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from svdquant_ops import ops, quantize_model  # noqa: E402
from svdquant_ops.integrations.fusion import fuse_qkv  # noqa: E402
from svdquant_ops.integrations.unwrap import unwrap_weights  # noqa: E402

from .builders import (capture_cuda_graph, flux_inputs, fresh_compile_state, gemm_inputs, linear_inputs,  # noqa: E402
                       op_args, session_generator, tiny_flux, weight_inputs)
from .test_w4a16_op import w4a16_inputs  # noqa: E402

ops.load()
OPS = torch.ops.svdquant
DEV = torch.device("cuda")
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _cuda(d: dict) -> dict:
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _both(monkeypatch, fn):
    """fn() with PDL off, then on (each synchronized): the two results."""
    out = []
    for on in ("0", "1"):
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", on)
        out.append(fn())
        torch.cuda.synchronize()
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


def _chain(precision: str, M: int, width: int, depth: int, key):
    """``depth`` linears of width x width, each layer's output the next one's input as it is, so every kernel of the
    chain reads what the kernel just before it wrote (the GEMM's output -> the next quantize_act's first pass ->
    its token pass -> prep -> GEMM), the case a missing wait would break; one weight per layer. The random weights
    grow the values per layer (on the CPU ops: w4a8 ~1.6x, int4 ~4x): 12 layers stay finite in bf16. Returns the function of x, and x."""
    g = session_generator(("pdl-chain", precision, M, width, depth, key))
    layers = [_cuda(linear_inputs(M, width, width, 32, precision, torch.bfloat16, g)) for _ in range(depth)]
    x = layers[0]["x"]

    def run(inp):
        for a in layers:
            inp = OPS.linear(inp, *op_args("linear", a)[1:], precision)
        return inp

    return run, x


def _overlaps(fn) -> tuple[int, int]:
    """(pairs of consecutive kernels where the later one started before the earlier one ended, kernels) in a CUDA
    trace of fn(): in one stream that happens only with programmatic dependent launch."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                     if e.get("cat") == "kernel" and "dur" in e)
    return sum(b[0] < a[1] for a, b in zip(kernels, kernels[1:])), len(kernels)


@pytest.mark.parametrize("tile", [None, "128", "256", "regs"])
@pytest.mark.parametrize("precision,M", [("w4a8", 4608), ("w4a8", 512), ("w4a8", 77), ("int4", 1024)])
def test_chains_equal_plain_launches_bit_for_bit(monkeypatch, precision, M, tile):
    """(tile "regs": W4A8's GEMM on the packed weights expanded in registers, rega_kernel)"""
    if tile is not None and precision != "w4a8":
        pytest.skip("the tile width and the register path are W4A8's")
    if tile == "regs":
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "regs")
    elif tile:
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", tile)
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    run, x = _chain(precision, M, 1024, 12, tile)
    plain, pdl = _both(monkeypatch, lambda: run(x))
    assert torch.isfinite(plain.float()).all() and plain.float().abs().max() > 0
    assert torch.equal(_bits(plain), _bits(pdl))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "1")
    for _ in range(3):  # deterministic with PDL
        assert torch.equal(_bits(run(x)), _bits(pdl))


def test_cuda_graph_with_pdl_replays_the_plain_eager_result(monkeypatch):
    run, x = _chain("w4a8", 4608, 1024, 8, "graph")
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "0")
    want = run(x)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "1")
    static_x = x.clone()
    graph, static_y = capture_cuda_graph(lambda: run(static_x))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(static_y), _bits(want))
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "0")
    assert torch.equal(_bits(static_y), _bits(run(x2)))


def test_gemm_cat_and_w4a16_group_equal_plain_launches(monkeypatch):
    g = session_generator("pdl-cat")
    a = _cuda(gemm_inputs(4608, 3072, 3072, 32, "w4a8", torch.bfloat16, g))
    w2 = _cuda(weight_inputs(4096, 3072, 32, "w4a8", torch.bfloat16, g))
    lists = [[a[k], w2[k]] for k in ("codes", "scales", "global_scale", "proj_up", "bias")]
    plain, pdl = _both(monkeypatch, lambda: ops.gemm_cat(a["act_codes"], a["act_scales"], lists[0], lists[1], lists[2],
                                                         a["down_act"], lists[3], lists[4], "w4a8", torch.bfloat16))
    assert torch.equal(_bits(plain), _bits(pdl))

    ws = [_cuda(w4a16_inputs((1,), n, 3072, torch.bfloat16, torch.bfloat16, g)) for n in (18432, 9216, 6144)]
    x = ws[0]["x"]
    args = [[w[k] for w in ws] for k in ("codes", "scales", "zeros", "bias")]
    plain, pdl = _both(monkeypatch, lambda: torch.cat(OPS.w4a16_linear_group(x, *args), -1))
    assert torch.equal(_bits(plain), _bits(pdl))
    square = [_cuda(w4a16_inputs((1,), 3072, 3072, torch.bfloat16, torch.bfloat16, g)) for _ in range(8)]

    def gemv_chain():  # each GEMV reads the one before's output (M = 1, the modulation shape)
        y = x
        for w in square:
            y = OPS.w4a16_linear(y, w["codes"], w["scales"], w["zeros"], w["bias"])
        return y

    plain, pdl = _both(monkeypatch, gemv_chain)
    assert torch.equal(_bits(plain), _bits(pdl))


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0), reason="programmatic dependent launch is Hopper's")
def test_the_switch_takes_effect(monkeypatch):
    """Equal outputs alone would also pass if the attribute were never set: with PDL on, some kernel of a chain
    starts before the one before it has ended (it waits inside); with it off, none does."""
    run, x = _chain("w4a8", 4608, 1024, 6, "effect")
    run(x)  # warm-up: first-call attributes, allocator
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "0")
    off, n_off = _overlaps(lambda: run(x))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "1")
    on, n_on = _overlaps(lambda: run(x))
    assert n_on == n_off >= 6 * 4
    assert off == 0 and on > 0, (off, on, n_on)


def test_compiled_flux_with_cuda_graphs_equals_plain_launches(monkeypatch):
    """The library's compile recipe on a tiny FLUX (fused, unwrapped, gemm_cat; reduce-overhead), compiled once
    per setting (plain; our kernels with PDL; Inductor's Triton kernels with PDL as well, which then launch early
    after ours and ours after them): the outputs of the replays equal bit for bit."""
    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=16, weight_only="w4a16")
    fuse_qkv(model)
    model.to(DEV)
    unwrap_weights(model)
    inputs = {k: v.to(DEV) for k, v in flux_inputs().items()}
    out = []
    try:
        ops.install_compile_pass(cat_gemms=True)
        for on, inductor in (("0", False), ("1", False), ("1", True)):
            monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", on)
            torch._dynamo.reset()
            with torch._inductor.config.patch({"triton.enable_pdl": inductor}):
                comp = torch.compile(model, fullgraph=True, mode="reduce-overhead")
                with torch.inference_mode():
                    for _ in range(3):
                        torch.compiler.cudagraph_mark_step_begin()
                        y = comp(**inputs).sample.clone()
            out.append(y)
    finally:
        ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert torch.equal(_bits(out[0]), _bits(out[1]))
    assert torch.equal(_bits(out[0]), _bits(out[2]))


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0),
                    reason="the portable kernels other GPUs run do not read the switch")
def test_a_bad_value_names_the_variable(monkeypatch):
    run, x = _chain("w4a8", 64, 256, 1, "bad")
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PDL", "yes")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_PDL must be '1', '0' or unset, got 'yes'"):
        run(x)
