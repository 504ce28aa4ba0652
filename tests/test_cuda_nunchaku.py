"""Nunchaku checkpoints on the GPU (issue 15): a tiny FLUX-architecture file written by our packer loads onto CUDA,
exact INT4 / NVFP4 and converted to w4a8, matches the same file run on the CPU, compiles in one graph with CUDA
graphs, and replays a manual capture bit for bit. Skips without CUDA (run on the GPU machine by
``benchmarks/gpu_run.sh tests``)."""

from __future__ import annotations

import pytest
import torch

from svdquant_ops.nunchaku import load_nunchaku_transformer

from .builders import capture_cuda_graph, sqnr_db
from .test_nunchaku import _flux_inputs, write_tiny_nunchaku

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    from svdquant_ops.integrations.pipelines import tiny_flux_pipeline

    work = tmp_path_factory.mktemp("nunchaku_cuda")
    config = {k: v for k, v in dict(tiny_flux_pipeline().transformer.config).items() if not k.startswith("_")}
    torch.manual_seed(1)
    ref = FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 1}).to(torch.bfloat16).eval()
    out = {}
    for precision in ("int4", "nvfp4"):
        out[precision] = work / f"svdq-{precision}_r32-small.safetensors"
        write_tiny_nunchaku(out[precision], ref, precision)
    return out


@pytest.mark.parametrize("fmt,precision", [("int4", None), ("int4", "w4a8"), ("nvfp4", None)])
def test_runs_on_cuda_like_cpu_compiles_and_replays(files, fmt, precision):
    cpu = load_nunchaku_transformer(files[fmt], precision=precision)
    gpu = load_nunchaku_transformer(files[fmt], device="cuda", precision=precision)
    inputs = _flux_inputs(cpu)
    cuda_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        y_cpu = cpu(**inputs).sample
        y_gpu = gpu(**cuda_inputs).sample
    # Same codes and scales on both devices; the GEMMs sum in another fp32 order, then one bf16 rounding.
    assert sqnr_db(y_cpu.float(), y_gpu.float().cpu()) > 40

    torch._dynamo.reset()
    compiled = torch.compile(gpu, fullgraph=True, mode="reduce-overhead")
    with torch.inference_mode():
        for _ in range(3):  # compile, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            y_c = compiled(**cuda_inputs).sample.clone()
    torch._dynamo.reset()
    torch.testing.assert_close(y_c, y_gpu, rtol=2e-2, atol=2e-2)  # Inductor fuses the elementwise parts differently

    static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cuda_inputs.items()}
    with torch.inference_mode():
        g, static_y = capture_cuda_graph(lambda: gpu(**static).sample)
        fresh = _flux_inputs(cpu, seed=1)
        for k, v in fresh.items():
            if isinstance(v, torch.Tensor):
                static[k].copy_(v)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, gpu(**static).sample)
