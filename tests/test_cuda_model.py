"""A quantized model on the GPU: device move of SVDQuantTensor, eager vs CPU reference, torch.compile with
CUDA graphs (mode="reduce-overhead", fullgraph=True) and a manual torch.cuda.graph capture. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, SVDQuantTensor, calibrate, prepare_model

from .builders import MLP, assert_cuda_graph_replays_eager, sqnr_db


class GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(1024, 512))

    def forward(self, x):
        return self.net(x)


# Accuracy against the bf16 model (random weights, 4-batch calibration; measured on the CPU path, which the GPU
# matches to > 40 dB): int4 15.9 dB, nvfp4 15.5 dB, w4a8 19.3 dB (8-bit activations: only the weights' error).
@pytest.mark.parametrize("precision,min_sqnr", [("int4", 14.0), ("nvfp4", 14.0), ("w4a8", 17.0)])
def test_quantized_model_on_gpu_matches_cpu_and_graphs(precision, min_sqnr):
    torch.manual_seed(0)
    model = GeluMLP().to(torch.bfloat16).eval()
    x = torch.randn(3, 77, 512).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    prepare_model(model)  # net.2 is GELU-fed: unsigned INT4 (bias correction) for int4
    with calibrate(model):
        with torch.no_grad():
            model(torch.randn(4, 77, 512).to(torch.bfloat16))
    quantize_(model, SVDQuantConfig(precision=precision, device="cpu", lowrank_iters=4))
    assert isinstance(model.net[2].weight, SVDQuantTensor) and model.net[2].weight.precision == precision
    assert model.net[2].weight.act_unsigned == (precision == "int4")  # nvfp4 and w4a8 have no unsigned variant
    with torch.inference_mode():
        y_cpu = model(x)
    model.cuda()
    assert model.net[0].weight.codes.is_cuda and model.net[2].weight.device.type == "cuda"
    xc = x.cuda()
    with torch.inference_mode():
        y_gpu = model(xc)
        # Same codes and scales on both devices; only fp32 summation order differs, then one bf16 rounding.
        assert sqnr_db(y_cpu.float(), y_gpu.float().cpu()) > 40
        assert sqnr_db(ref.float(), y_gpu.float().cpu()) > min_sqnr
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            y_c = compiled(xc)
        torch.testing.assert_close(y_c, y_gpu, rtol=2e-2, atol=2e-2)  # Inductor may fuse the GELU differently

    # Manual CUDA graph capture of the eager model: replay equals eager, bit for bit (inputs that are not inference
    # tensors, so the eager quantize_act cache is in play and must stay out of the capture).
    with torch.no_grad():
        assert_cuda_graph_replays_eager(model, xc)


def test_mixed_size_model_moves_to_gpu_and_compiles_one_frame():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16).eval()
    quantize_(model, SVDQuantConfig())
    model.cuda()
    x, x2 = torch.randn(2, 5, 256, device="cuda", dtype=torch.bfloat16)  # both made outside inference_mode
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=cnt)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(x)
            compiled(x2)
    assert cnt.frame_count == 1
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_w4a8_compiled_with_the_amax_split_on_gpu():
    """W4A8 compiled with the compile pass (ops.install_compile_pass): each quantize_act becomes Inductor's amax
    (fused into the kernel that writes x: net.2's input is the GELU's output) plus quantize_act_given_amax. The
    compiled output matches eager to > 40 dB (Inductor's GELU and fp32 division round differently from eager's),
    runs the given-amax op once per linear and no quantize_act, and CUDA-graph replay (reduce-overhead) equals the
    default compile bit for bit."""
    from torch._inductor import config

    from svdquant_ops import ops

    torch.manual_seed(0)
    model = GeluMLP().to(torch.bfloat16).eval()
    quantize_(model, SVDQuantConfig(precision="w4a8", device="cpu"))
    model.cuda()
    x = torch.randn(3, 77, 512, device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        eager = model(x)
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        ops.install_compile_pass(amax_split=True)
        outs = {}
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode, fullgraph=True)
            with torch.inference_mode():
                for _ in range(3):
                    compiled(x)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    outs[mode] = compiled(x).clone()
            names = [e.name for e in prof.events()]
            if mode == "default":  # (CUDA-graph replays record no op calls)
                assert names.count("svdquant::quantize_act_given_amax") == 2
                assert names.count("svdquant::quantize_act") == 0
    assert sqnr_db(eager.float(), outs["default"].float()) > 40
    assert torch.equal(outs["default"].view(torch.int16), outs["reduce-overhead"].view(torch.int16))


@pytest.mark.parametrize("precision", ["int4", "w4a8"])
def test_input_gradient_on_gpu_is_the_dequantized_weights(precision):
    """A quantized linear on the GPU whose input needs a gradient (a LoRA trained on the quantized base): the
    forward is the CUDA kernels' (bit-equal to the no-grad call), the input's gradient that of the dequantized weight,
    eager and compiled."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).to(torch.bfloat16)
    quantize_(lin, SVDQuantConfig(precision=precision, skip=[], device="cpu"))
    lin.cuda()
    x = torch.randn(4, 33, 512, device="cuda").to(torch.bfloat16)
    g = torch.randn(4, 33, 256, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        forward = lin(x)
    want = (g.float() @ lin.weight.dequantize(torch.float32)).to(torch.bfloat16)
    for fn in (lin, torch.compile(lin, fullgraph=True)):
        xr = x.clone().requires_grad_()
        out = fn(xr)
        (out * g).sum().backward()
        assert torch.equal(out.detach(), forward)
        # bf16 matmul of g with the bf16-rounded dequantized weight, against fp32: a few bf16 ulps
        torch.testing.assert_close(xr.grad, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision,weights", [("int4", None), ("nvfp4", None), ("w4a8", "prep"), ("w4a8", "regs")])
def test_layout1_checkpoint_runs_on_the_gpu(precision, weights, monkeypatch):
    """A checkpoint of svdquant_ops 0.1.0 (layout 1) on the GPU: moved to CUDA, its linear computes the outputs 0.1.0
    computed on the CPU (the fixture) within fp32 summation order, through each W4A8 weight path (expanded by the prep
    kernel, or packed codes expanded in the GEMM's registers), and a CUDA graph replays it bit for bit."""
    from pathlib import Path

    from safetensors.torch import load_file

    import svdquant_ops

    if weights is not None:
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", weights)
    fixtures = Path(__file__).parent / "fixtures"
    sd = svdquant_ops.load_file(fixtures / "layout1.safetensors")
    expected = load_file(str(fixtures / "layout1_expected.safetensors"))
    w, b = sd[f"{precision}.weight"].cuda(), sd[f"{precision}.bias"].cuda()
    assert w.layout_version == 1 and w.codes.is_cuda
    x = expected["x"].cuda()
    fn = lambda v: torch.nn.functional.linear(v, w, b)  # noqa: E731
    with torch.inference_mode():
        y = fn(x)
        assert sqnr_db(expected[f"{precision}.y"].float(), y.float().cpu()) > 40, precision
        assert_cuda_graph_replays_eager(fn, x)
