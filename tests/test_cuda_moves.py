"""The paths a diffusers user takes on a GPU machine, for a quantized transformer: quantizing a CPU model, device
and dtype moves in grad mode, no_grad and inference_mode, pinning, accelerate's model and sequential CPU offload,
diffusers group offloading (leaf and block level, with and without streams), and compile with offloading.
Every path is checked against the same model's output on the GPU without any move."""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from svdquant_ops import SVDQuantTensor, quantize_model  # noqa: E402

from .builders import flux_inputs, sqnr_db, tiny_flux  # noqa: E402

MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _on(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()}


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), SVDQuantTensor)]


@pytest.fixture(scope="module")
def quantized():
    """A w4a8 tiny FLUX quantized on the CPU (the algorithm itself runs on the GPU) and its GPU reference output."""
    model = tiny_flux()
    with torch.inference_mode():
        quantize_model(model, precision="w4a8", rank=16)
    inputs = flux_inputs()
    gpu = copy.deepcopy(model).to("cuda")
    with torch.inference_mode():
        ref = gpu(**_on(inputs, "cuda")).sample.float().cpu()
    return model, inputs, ref


def _check(model, inputs, ref, device="cuda"):
    with torch.inference_mode():
        out = model(**_on(inputs, device)).sample.float().cpu()
    assert sqnr_db(ref, out) > 40, sqnr_db(ref, out)


def test_quantizing_a_cpu_model_returns_a_cpu_model(quantized):
    model, _, _ = quantized
    assert all(w.device.type == "cpu" and w.codes.device.type == "cpu" for w in _weights(model))


def test_load_state_dict_and_data_setter_on_gpu_weights(quantized):
    """A CPU state dict loaded into a GPU model (copy_ checks the values on the way, then copies across devices),
    a NaN in it refused with the GPU weights untouched, and `weight.data = w` between GPU models."""
    model, inputs, ref = quantized
    dst = tiny_flux(seed=1)
    with torch.inference_mode():
        quantize_model(dst, precision="w4a8", rank=16)
    dst = dst.to("cuda")
    other = copy.deepcopy(dst)  # seed 1's weights, for the data setter below
    sd = copy.deepcopy(model.state_dict())
    name = next(k for k, v in sd.items() if isinstance(v, SVDQuantTensor))
    sd[name].proj_down.view(-1)[0] = float("nan")
    before = dict(dst.named_parameters())[name].proj_down.clone()
    with pytest.raises(RuntimeError, match="proj_down contains NaN or Inf"):
        dst.load_state_dict(sd)
    assert torch.equal(dict(dst.named_parameters())[name].proj_down, before)
    dst.load_state_dict(model.state_dict())
    assert all(w.codes.device.type == "cuda" for w in _weights(dst))
    _check(dst, inputs, ref)

    src = copy.deepcopy(model).to("cuda")
    for d, s in zip(other.modules(), src.modules()):
        if isinstance(getattr(d, "weight", None), SVDQuantTensor):
            d.weight.data = s.weight
            assert d.weight.codes is s.weight.codes
    plain = {k: v for k, v in src.state_dict().items() if not isinstance(v, SVDQuantTensor)}
    assert not other.load_state_dict(plain, strict=False).unexpected_keys
    _check(other, inputs, ref)


MOVES = {
    "to(cuda)": lambda m: m.to("cuda"),
    "cuda()": lambda m: m.cuda(),
    "to(cuda, non_blocking)": lambda m: m.to("cuda", non_blocking=True),
    "to(cuda, bf16)": lambda m: m.to("cuda", torch.bfloat16),
    "to(cuda) then to(cpu) then cuda()": lambda m: m.to("cuda").to("cpu").cuda(),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("move", sorted(MOVES))
def test_device_moves(quantized, mode, move):
    model, inputs, ref = quantized
    m = copy.deepcopy(model)
    with MODES[mode]():
        m = MOVES[move](m)
    torch.cuda.synchronize()
    assert all(w.device.type == "cuda" and w.codes.device.type == "cuda" and w.proj_up.device.type == "cuda"
               for w in _weights(m))
    _check(m, inputs, ref)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fp16_and_pinning(quantized, mode):
    model, inputs, ref = quantized
    with MODES[mode]():
        pinned = _weights(model)[0].pin_memory()
        m = copy.deepcopy(model).to("cuda").to(torch.float16)
    assert pinned.is_pinned() and pinned.codes.is_pinned()
    assert all(w.dtype == torch.float16 and w.smooth.dtype == torch.float16 for w in _weights(m))
    with torch.inference_mode():
        out = m(**_on({k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}, "cuda")).sample
    assert sqnr_db(ref, out.float().cpu()) > 25  # fp16 activations round differently: accuracy, not bits


def test_accelerate_sequential_cpu_offload(quantized):
    from accelerate import cpu_offload

    model, inputs, ref = quantized
    m = copy.deepcopy(model)
    cpu_offload(m, execution_device=torch.device("cuda"))
    _check(m, inputs, ref)


def test_accelerate_model_cpu_offload(quantized):
    from accelerate import cpu_offload_with_hook

    model, inputs, ref = quantized
    m, hook = cpu_offload_with_hook(copy.deepcopy(model), execution_device=torch.device("cuda"))
    _check(m, inputs, ref)
    hook.offload()
    assert all(w.device.type == "cpu" for w in _weights(m))


GROUP_OFFLOAD = [
    dict(offload_type="leaf_level"),
    dict(offload_type="leaf_level", use_stream=True),
    dict(offload_type="leaf_level", use_stream=True, record_stream=True),
    dict(offload_type="leaf_level", use_stream=True, low_cpu_mem_usage=True),
    dict(offload_type="block_level", num_blocks_per_group=1),
    dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True),
    dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True, low_cpu_mem_usage=True),
]


@pytest.mark.parametrize("kwargs", GROUP_OFFLOAD, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_diffusers_group_offload(quantized, kwargs):
    model, inputs, ref = quantized
    m = copy.deepcopy(model)
    m.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"), **kwargs)
    _check(m, inputs, ref)
    _check(m, inputs, ref)  # a second call reuses the offload state (pinned copies, streams)


def test_compile_repeated_blocks_with_leaf_level_group_offload(quantized):
    """diffusers' offload hooks are torch.compiler.disable()d: with group offloading the blocks compile with graph
    breaks at the hooks (fullgraph=False, README), and still compute the same outputs."""
    model, inputs, ref = quantized
    m = copy.deepcopy(model)
    m.enable_group_offload(onload_device=torch.device("cuda"), offload_type="leaf_level")
    m.compile_repeated_blocks(fullgraph=False)
    _check(m, inputs, ref)


def test_compile_repeated_blocks_fullgraph_without_offload(quantized):
    model, inputs, ref = quantized
    m = copy.deepcopy(model).to("cuda")
    m.compile_repeated_blocks(fullgraph=True)
    _check(m, inputs, ref)


# ---------------------------------------------------------------- a whole pipeline (the built-in tiny FLUX one)
@pytest.fixture(scope="module")
def pipeline():
    """The built-in tiny FLUX pipeline with its transformer quantized (w4a8, on the CPU) and the latents the same
    pipeline computes after pipe.to("cuda")."""
    from svdquant_ops.integrations.pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    quantize_model(pipe.transformer, precision="w4a8", rank=16)
    ref = _latents(copy.deepcopy(pipe).to("cuda"))
    return pipe, ref


def _latents(pipe):
    from svdquant_ops.integrations.pipelines import BUILTIN_CALL

    with torch.inference_mode():
        out = pipe("a red fox in the snow", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="latent", **BUILTIN_CALL).images
    return out.float().cpu()


@pytest.mark.parametrize("how", ["pipe.to(cuda) in inference_mode", "enable_model_cpu_offload",
                                 "enable_sequential_cpu_offload"])
def test_pipeline_moves_and_offloading(pipeline, how):
    pipe, ref = pipeline
    p = copy.deepcopy(pipe)
    if how == "enable_model_cpu_offload":
        p.enable_model_cpu_offload(device="cuda")
    elif how == "enable_sequential_cpu_offload":
        p.enable_sequential_cpu_offload(device="cuda")
    else:
        with torch.inference_mode():
            p = p.to("cuda")
    out = _latents(p)
    assert sqnr_db(ref, out) > 30, sqnr_db(ref, out)


def test_text_encoder_weight_only_int8_beside_svdquant_transformer(pipeline):
    """Composition: torchao's own weight-only config on the T5 text encoder, SVDQuant on the transformer."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe, ref = pipeline
    p = copy.deepcopy(pipe).to("cuda")
    quantize_(p.text_encoder_2, Int8WeightOnlyConfig())
    assert type(p.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    assert sqnr_db(ref, _latents(p)) > 20
