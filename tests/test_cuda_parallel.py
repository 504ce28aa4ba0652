"""``svdquant::parallel_linears`` on the GPU: linear 0 on the caller's stream, the others on side streams forked from
it and joined back (csrc/cuda/parallel.cpp). The same kernels as one ``linear`` after the other, so every output
must equal theirs bit for bit: right after the call on the caller's stream (the join), over many calls whose memory
the caching allocator recycles between the streams (a missing wait or a block reused too early shows as a
difference), in a CUDA graph capture (the side stream joins the capture), and compiled with the pass
(``install_compile_pass(parallel_linears=True)``), also under CUDA graphs. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from svdquant_ops import ops, quantize_model  # noqa: E402
from svdquant_ops.integrations.fusion import fuse_qkv  # noqa: E402

from .builders import (capture_cuda_graph, count_calls, flux_inputs, fresh_compile_state, linear_inputs,  # noqa: E402
                       session_generator, tiny_flux)

ops.load()
OPS = torch.ops.svdquant
DEV = torch.device("cuda")
_fresh = pytest.fixture(autouse=True)(fresh_compile_state)
NAMES = ("x", "smooth", "proj_down", "codes", "scales", "global_scale", "proj_up", "bias")
# a FLUX.1 double block's to_out / to_add_out at a tenth of its size: the image stream's tokens, then the text's
PAIR = [((1, 4096), 3072, 3072, 32), ((1, 512), 3072, 3072, 32)]


def entries(shapes, precision, key):
    gen = session_generator(("cuda_parallel", key, precision))
    ls = [linear_inputs(lead, N, K, R, precision, torch.bfloat16, gen) for lead, N, K, R in shapes]
    return {k: [v.to(DEV) if isinstance(v, torch.Tensor) else v for v in (lin[k] for lin in ls)] for k in NAMES}


def one_by_one(e, precision):
    return [OPS.linear(*(e[k][i] for k in NAMES), precision, False) for i in range(len(e["x"]))]


def fresh_stream() -> torch.cuda.ExternalStream:
    """A CUDA stream that no call has used before (PyTorch's own come from a small pool per device, which earlier
    tests may have drawn from), created through the CUDA runtime PyTorch loaded: so a call on it, inside a capture,
    creates its side streams there."""
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        pytest.skip("no CUDA runtime library to create a fresh stream with")
    handle = ctypes.c_void_p()
    assert runtime.cudaStreamCreateWithFlags(ctypes.byref(handle), 1) == 0  # cudaStreamNonBlocking
    return torch.cuda.ExternalStream(handle.value)


def same(outs, refs) -> bool:
    return len(outs) == len(refs) and all(torch.equal(o.view(torch.int16), r.view(torch.int16))
                                          for o, r in zip(outs, refs))


@pytest.mark.parametrize("precision", ["w4a8", "int4", "nvfp4"])
def test_parallel_equals_one_linear_each(precision):
    """Bit-equal to the linears one by one, read on the caller's stream straight after the call (no sync between:
    the join must order it); three linears use two side streams."""
    e = entries(PAIR + [((3, 100), 3072, 3072, 16)], precision, "three")
    refs = one_by_one(e, precision)
    outs = OPS.parallel_linears(*(e[k] for k in NAMES), precision, False)
    sums = [o.float().sum(-1) for o in outs]  # on the caller's stream, at once
    torch.cuda.synchronize()
    assert same(outs, refs)
    assert all(torch.equal(s, r.float().sum(-1)) for s, r in zip(sums, refs))


@pytest.mark.parametrize("precision", ["w4a8", "int4"])
def test_sms_set_aside_for_the_side_stream_change_no_bits(precision, monkeypatch):
    """SVDQUANT_OPS_CUDA_PARALLEL_SMS=S: linear 0's persistent GEMM on SMs - S CTAs, the side stream's on S (also the
    extreme S = SMs - 1, linear 0 on one CTA). Only which CTA computes a tile changes, so every bit stays."""
    e = entries(PAIR, precision, "sms")
    refs = one_by_one(e, precision)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for reserved in (16, sms - 1):
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_PARALLEL_SMS", str(reserved))
        assert same(OPS.parallel_linears(*(e[k] for k in NAMES), precision, False), refs), reserved
        assert same(one_by_one(e, precision), refs), reserved  # (outside parallel_linears: no cap)


def test_sms_set_aside_shape_the_gemm_grids(monkeypatch, tmp_path):
    """With S = 16 the two GEMMs of the pair launch on SMs - 16 and 16 CTAs (both have more tiles than that), read
    from the profiler's kernel records; without the variable, on one CTA per SM, at most one per tile."""
    import json

    e = entries(PAIR, "w4a8", "sms-grid")
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count

    def gemm_grids():
        OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)  # (set-up outside the profile)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
        events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        return sorted(ev["args"]["grid"][0] for ev in events
                      if ev.get("cat") == "kernel" and ("gemm_kernel" in ev["name"] or "rega_kernel" in ev["name"]))

    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PARALLEL_SMS", "16")
    assert gemm_grids() == [16, sms - 16]
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_PARALLEL_SMS")
    grids = gemm_grids()
    assert len(grids) == 2 and grids[1] == sms and 16 < grids[0] <= sms, grids


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "SMS"])
def test_sms_set_aside_must_be_a_whole_number_below_the_sm_count(value, monkeypatch):
    e = entries(PAIR, "w4a8", "sms-bad")
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PARALLEL_SMS", str(sms) if value == "SMS" else value)
    with pytest.raises(RuntimeError, match=rf"SVDQUANT_OPS_CUDA_PARALLEL_SMS must be a whole number of SMs in "
                                           rf"\[0, {sms - 1}\] or unset"):
        OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)


def test_parallel_against_the_cpu_reference():
    """The CUDA op against the CPU op (the specification): integer parts exact there, so the outputs differ only
    by fp32 summation order and one bf16 rounding."""
    e = entries([((64,), 256, 512, 16), ((8,), 256, 512, 16)], "w4a8", "cpu")
    cpu = OPS.parallel_linears(*([v.cpu() if v is not None else None for v in e[k]] for k in NAMES), "w4a8", False)
    outs = OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)
    for o, r in zip(outs, cpu):
        torch.testing.assert_close(o.cpu().float(), r.float(), rtol=1.6e-2, atol=1e-2)


def test_the_side_stream_waits_for_its_input():
    """The fork: linear 1's input is written on the caller's stream behind a long kernel, just before the call; the
    side stream must read the written values, not what the memory held before."""
    e = entries(PAIR, "w4a8", "fork")
    new = torch.randn_like(e["x"][1])
    refs = one_by_one(dict(e, x=[e["x"][0], new]), "w4a8")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the write
    e["x"][1].copy_(new)
    outs = OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)
    torch.cuda.synchronize()
    assert same(outs, refs)


def test_outputs_read_late_on_one_stream_survive_a_call_on_another():
    """Call 1 on stream s1, whose output 1 (allocated on a side stream) s1 reads only after a long kernel, dropped
    on the host at once; then call 2 on stream s2. Its side-stream allocations must not take output 1's memory
    while s1 still reads it (the side streams belong to their caller stream)."""
    e = entries(PAIR, "w4a8", "streams")
    refs = one_by_one(e, "w4a8")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s1):
        outs = OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False)
        torch.cuda._sleep(50_000_000)
        late = outs[1].float().sum()
        del outs
    with torch.cuda.stream(s2):
        xs = [torch.randn_like(x) for x in e["x"]]
        again = OPS.parallel_linears(xs, *(e[k] for k in NAMES[1:]), "w4a8", False)
    torch.cuda.synchronize()
    assert torch.equal(late, refs[1].float().sum())
    assert same(again, one_by_one(dict(e, x=xs), "w4a8"))


def test_an_error_in_a_side_linear_under_capture_is_reported():
    """Linear 1's weight does not match its input: the error is raised after the side stream was forked, inside a
    CUDA graph capture. The side stream is joined all the same, so the capture ends and the error that reaches the
    caller is the op's own, not the capture's "unjoined" one."""
    e = entries(PAIR, "w4a8", "capture-error")
    bad = dict(e, codes=[e["codes"][0], e["codes"][1][:, :64]])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"parallel_linears \(linear 1\): K mismatch"):
        with torch.cuda.graph(graph, stream=fresh_stream()):  # (its side streams created inside the capture)
            OPS.parallel_linears(*(bad[k] for k in NAMES), "w4a8", False)
    # the device and the library still work afterwards
    assert same(OPS.parallel_linears(*(e[k] for k in NAMES), "w4a8", False), one_by_one(e, "w4a8"))


def test_many_calls_recycling_memory_stay_equal():
    """50 calls on fresh inputs, each output read and dropped at once while new tensors are allocated: the blocks
    the side stream freed are reused across the streams. Every call equals its linears one by one."""
    e = entries(PAIR, "w4a8", "churn")
    gen = torch.Generator(device=DEV).manual_seed(1)
    for i in range(50):
        xs = [torch.randn(x.shape, generator=gen, device=DEV, dtype=x.dtype) for x in e["x"]]
        outs = OPS.parallel_linears(xs, *(e[k] for k in NAMES[1:]), "w4a8", False)
        sums = [o.float().sum() for o in outs]
        del outs
        junk = torch.empty(64 << 20, dtype=torch.uint8, device=DEV).fill_(i)  # take the freed blocks
        refs = one_by_one(dict(e, x=xs), "w4a8")
        assert all(torch.equal(s, r.float().sum()) for s, r in zip(sums, refs)), f"call {i}"
        del junk


def assert_replay_on_new_inputs(graph, static, outs, e):
    """New inputs copied into the captured ones (`static`): the replay's outputs equal the linears one by one."""
    xs = [torch.randn_like(x) for x in e["x"]]
    for s, x in zip(static, xs):
        s.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert same(outs, one_by_one(dict(e, x=xs), "w4a8"))


def test_cuda_graph_replays_the_pair():
    """Captured in a CUDA graph (the side stream joins the capture through the fork's event), a replay equals the
    eager call, also after new inputs are copied in."""
    e = entries(PAIR, "w4a8", "graph")
    static = [x.clone() for x in e["x"]]
    graph, outs = capture_cuda_graph(lambda: OPS.parallel_linears(static, *(e[k] for k in NAMES[1:]), "w4a8", False))
    for _ in range(2):
        assert_replay_on_new_inputs(graph, static, outs, e)


def test_cuda_graph_on_a_new_stream_replays_the_pair():
    """A capture whose stream the op has not seen: its side streams are created inside the capture (in relaxed
    capture mode), and the replay equals the eager call."""
    e = entries(PAIR, "w4a8", "graph-new-stream")
    static = [x.clone() for x in e["x"]]
    run = lambda: OPS.parallel_linears(static, *(e[k] for k in NAMES[1:]), "w4a8", False)  # noqa: E731
    run()  # (warmed up on the default stream: the library's lazy set-up outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=fresh_stream()):
        outs = run()
    assert_replay_on_new_inputs(graph, static, outs, e)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_flux_with_the_pass_equals_without(mode):
    """A tiny FLUX.1 (w4a8, q/k/v fused) compiled with the pass: 4 parallel_linears calls per double block, the
    output bit-equal to the same compile without the pass, one graph, CUDA graphs included."""
    from torch._dynamo.utils import counters

    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=16)
    fuse_qkv(model)
    model.to(DEV)
    inputs = {k: v.to(DEV) for k, v in flux_inputs(img_tokens=256, txt_tokens=64).items()}
    runs = {}
    with torch.inference_mode():
        for parallel in (False, True):
            torch._dynamo.reset()
            counters.clear()
            ops.install_compile_pass(parallel_linears=parallel)
            try:
                compiled = torch.compile(copy.deepcopy(model), fullgraph=True, mode=mode)
                for _ in range(3):  # warm-up, record, replay
                    compiled(**inputs)
                runs[parallel] = count_calls(lambda: compiled(**inputs).sample.clone(), ("parallel_linears",))
            finally:
                ops.install_compile_pass(parallel_linears=ops.PARALLEL_LINEARS_DEFAULT)
            assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    doubles = len(model.transformer_blocks)
    if mode is None:  # (a CUDA-graph replay runs no op on the host: nothing to count)
        assert runs[False][1] == 0 and runs[True][1] == 4 * doubles
    assert torch.equal(runs[True][0], runs[False][0])
