"""``fuse_qkv``: one GEMM for an attention's q/k/v (issue 14 item 1, "several narrow GEMMs where one wide one
could"), on a quantized model, without requantizing.

Tiny FLUX (2 double + 2 single blocks): 34 SVDQuant GEMMs per forward unfused (12 per double block, 5 per single
block); fused, q/k/v and add_q/k/v are one GEMM each (8 per double block) and a single block's q/k/v one (3 per
single block): 22. The quantize_act calls stay 20 (one per input, ``share_inputs``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdquant_ops
from svdquant_ops import SVDQuantTensor, quantize_model
from svdquant_ops.integrations.fusion import fuse_qkv, is_fused, unfuse_qkv

from .builders import count_calls, flux_inputs, fresh_compile_state, tiny_flux, tiny_wan

UNFUSED_GEMMS, FUSED_GEMMS, QUANTIZE_ACTS = 34, 22, 20

_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _pair(precision="w4a8", **options):
    model = tiny_flux()
    quantize_model(model, precision=precision, **options)
    fused = copy.deepcopy(model)
    summary = fuse_qkv(fused)
    assert len(summary.fused) == 4 and not summary.skipped
    return model, fused


@pytest.mark.parametrize("precision", ["w4a8", "int4", "nvfp4"])
def test_fused_outputs_equal_unfused_bit_for_bit(precision):
    model, fused = _pair(precision)
    inputs = flux_inputs()
    with torch.no_grad():  # the eager quantize_act cache needs version counters: not under inference_mode
        ref, n_ref, g_ref = count_calls(lambda: model(**inputs).sample)
        out, n, g = count_calls(lambda: fused(**inputs).sample)
    assert (n_ref, g_ref) == (QUANTIZE_ACTS, UNFUSED_GEMMS)
    assert (n, g) == (QUANTIZE_ACTS, FUSED_GEMMS)
    assert torch.equal(out, ref)


def test_fused_modules_and_shared_parts():
    model, fused = _pair()
    attn = fused.transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q") and not hasattr(attn, "add_k_proj")
    q = model.transformer_blocks[0].attn.to_q.weight
    w = attn.to_qkv.weight
    assert isinstance(w, SVDQuantTensor) and tuple(w.shape) == (3 * q.shape[0], q.shape[1])
    assert torch.equal(attn.to_qkv.bias, torch.cat([getattr(model.transformer_blocks[0].attn, n).bias
                                                    for n in ("to_q", "to_k", "to_v")]))
    block = fused.single_transformer_blocks[0]
    # the single block's proj_mlp still reads the input with to_qkv: one λ and down projection object, one quantize_act
    assert block.attn.to_qkv.weight.smooth is block.proj_mlp.weight.smooth
    assert block.attn.to_qkv.weight.proj_down is block.proj_mlp.weight.proj_down
    names = [n for n, _ in fused.named_modules()]
    assert "transformer_blocks.0.attn.to_added_qkv" in names and "transformer_blocks.0.attn.to_q" not in names
    assert svdquant_ops.integrations.fusion.FuseSummary  # the summary type is public with the function
    assert len(fuse_qkv(fused).fused) == 4  # idempotent
    assert is_fused(fused) and not is_fused(model)


def test_no_extra_memory():
    model, fused = _pair()
    from svdquant_ops.integrations.api import model_nbytes

    assert model_nbytes(fused) == model_nbytes(model)


def test_compiled_one_graph_and_fewer_gemms():
    from torch._dynamo.utils import counters

    model, fused = _pair()
    inputs = flux_inputs()
    with torch.inference_mode():
        eager = fused(**inputs).sample
        counters.clear()
        compiled = torch.compile(fused, fullgraph=True)
        compiled(**inputs)
        out, n, g = count_calls(lambda: compiled(**inputs).sample)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert (n, g) == (QUANTIZE_ACTS, FUSED_GEMMS)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)  # Inductor's fused elementwise rounding


def test_state_dict_keeps_the_diffusers_layout():
    model, fused = _pair()
    sd, ref = fused.state_dict(), model.state_dict()
    assert list(sorted(sd)) == list(sorted(ref))
    for k, v in ref.items():
        if hasattr(v, "__tensor_flatten__"):  # SVDQuantTensor, W4A16Tensor
            for f in v.__tensor_flatten__()[0]:
                assert torch.equal(getattr(sd[k], f), getattr(v, f)), (k, f)
        else:
            assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_of_a_fused_model_loads_unfused(tmp_path, safe):
    from diffusers import FluxTransformer2DModel

    model, fused = _pair()
    fused.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    inputs = flux_inputs()
    with torch.inference_mode():
        ref = model(**inputs).sample
        assert torch.equal(loaded(**inputs).sample, ref)
        fuse_qkv(loaded)
        assert torch.equal(loaded(**inputs).sample, ref)


def test_load_state_dict_into_a_fused_model_keeps_sharing():
    model, fused = _pair()
    other = tiny_flux(seed=1)
    quantize_model(other, precision="w4a8")
    fused.load_state_dict(other.state_dict())
    inputs = flux_inputs()
    with torch.no_grad():
        ref = other(**inputs).sample
        out, n, _ = count_calls(lambda: fused(**inputs).sample)
    assert torch.equal(out, ref)
    assert n == QUANTIZE_ACTS  # the single blocks' to_qkv and proj_mlp still hold one λ and down projection
    block = fused.single_transformer_blocks[0]
    assert block.attn.to_qkv.weight.smooth is block.proj_mlp.weight.smooth


def test_load_state_dict_with_part_of_qkv_names_the_keys():
    model, fused = _pair()
    sd = model.state_dict()
    del sd["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(KeyError, match=r"to_k.weight"):
        fused.load_state_dict(sd)


def test_unfuse_restores_modules_bit_for_bit():
    model, fused = _pair()
    assert unfuse_qkv(fused) == 4 and not is_fused(fused)
    attn, ref = fused.transformer_blocks[1].attn, model.transformer_blocks[1].attn
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        a, b = getattr(attn, n).weight, getattr(ref, n).weight
        for f in b.__tensor_flatten__()[0]:
            assert torch.equal(getattr(a, f), getattr(b, f)), (n, f)
    assert not hasattr(attn, "to_qkv") and not attn.fused_projections
    assert attn.to_q.weight.proj_down is attn.to_v.weight.proj_down  # still one input side
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(fused(**inputs).sample, model(**inputs).sample)
    assert list(sorted(fused.state_dict())) == list(sorted(model.state_dict()))


def test_lora_needs_the_unfused_model():
    from svdquant_ops.lora import load_lora

    model, fused = _pair()
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, attn.to_q.in_features, generator=g),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(attn.to_q.out_features, 4, generator=g)}
    with pytest.raises(ValueError, match=r"fused into to_qkv .*unfuse_qkv"):
        load_lora(fused, lora, "a")
    load_lora(model, lora, "a")
    with pytest.raises(ValueError, match=r"fuse_qkv: the model holds LoRA adapters"):
        fuse_qkv(model)


def test_fused_16bit_model_quantizes_like_the_unfused_one():
    """Fusing first (as a 16-bit baseline would) and quantizing the fused model: the data-free path solved q/k/v as
    one stacked weight anyway, so the result is the unfused quantization's."""
    ref = tiny_flux()
    quantize_model(ref, precision="w4a8")
    bf16 = tiny_flux()
    inputs = flux_inputs()
    with torch.inference_mode():
        plain = bf16(**inputs).sample
    fuse_qkv(bf16)
    with torch.inference_mode():
        torch.testing.assert_close(bf16(**inputs).sample, plain, rtol=0, atol=1e-2)
    summary = quantize_model(bf16, precision="w4a8")
    assert "transformer_blocks.0.attn.to_qkv" in summary.quantized
    with torch.no_grad():
        out, n, g = count_calls(lambda: bf16(**inputs).sample)
        expect = ref(**inputs).sample
    assert (n, g) == (QUANTIZE_ACTS, FUSED_GEMMS)
    torch.testing.assert_close(out, expect, rtol=0, atol=2e-2)


def test_models_without_the_fused_path_are_left_alone():
    wan = tiny_wan()
    quantize_model(wan, precision="w4a8")
    summary = fuse_qkv(wan)
    assert not summary.fused and summary.skipped
    assert all("its own way" in why for why in summary.skipped.values())
    assert not is_fused(wan)


def test_stack_rows_refuses_weights_that_read_their_input_differently():
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    attn = model.transformer_blocks[0].attn
    with pytest.raises(ValueError, match=r"weights\[1\]\.(smooth|proj_down) differs"):
        SVDQuantTensor.stack_rows([attn.to_q.weight, attn.add_q_proj.weight])
    with pytest.raises(ValueError, match=r"rows: need 0 <= start < stop <= 128"):
        attn.to_q.weight.rows(64, 200)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_qkv(object())


def test_moves_keep_the_fused_weight_shared_with_proj_mlp():
    _, fused = _pair()
    fused.to(torch.float16)
    block = fused.single_transformer_blocks[0]
    assert block.attn.to_qkv.weight.dtype == torch.float16
    assert block.attn.to_qkv.weight.smooth is block.proj_mlp.weight.smooth
    inputs = {k: v.half() if v.dtype == torch.bfloat16 else v for k, v in flux_inputs().items()}
    with torch.no_grad():
        _, n, g = count_calls(lambda: fused(**inputs).sample)
    assert (n, g) == (QUANTIZE_ACTS, FUSED_GEMMS)


def test_nvfp4_per_tensor_scales_become_per_channel():
    model = tiny_flux()
    quantize_model(model, precision="nvfp4")
    attn = model.transformer_blocks[0].attn
    q, k, v = (getattr(attn, n).weight for n in ("to_q", "to_k", "to_v"))
    assert q.global_scale.shape == (1,)
    k = SVDQuantTensor(k.codes, k.scales, k.smooth, k.proj_down, k.proj_up, k.precision, k.act_unsigned,
                       k.layout_version, k.dtype, global_scale=k.global_scale * 2)  # another per-tensor scale
    stacked = SVDQuantTensor.stack_rows([q, k, v])
    n = q.shape[0]
    assert stacked.global_scale.shape == (3 * n,)
    assert torch.equal(stacked.global_scale[n:2 * n], k.global_scale.expand(n))
    x = torch.randn(5, q.shape[1], dtype=torch.bfloat16)
    assert torch.equal(nn.functional.linear(x, stacked), torch.cat([nn.functional.linear(x, w) for w in (q, k, v)], -1))
    again = SVDQuantTensor.stack_rows([q, q, v])  # equal per-tensor scales stay per tensor
    assert again.global_scale.shape == (1,)


def test_deepcopy_and_pickle_keep_the_fusion_and_its_checkpoint_layout():
    import io

    model, fused = _pair()
    inputs = flux_inputs()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert is_fused(other) and sorted(other.state_dict()) == sorted(model.state_dict())
        with torch.no_grad():
            assert torch.equal(other(**inputs).sample, model(**inputs).sample)
        assert unfuse_qkv(other) == 4


def test_unfused_weights_are_freed_without_a_garbage_collection():
    import gc
    import weakref

    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    attn = model.transformer_blocks[0].attn
    old = [weakref.ref(attn.to_q), weakref.ref(attn.to_q.weight.codes)]
    gc.disable()
    try:
        fuse_qkv(model)
        assert all(r() is None for r in old)  # no reference cycle (the data-free branch group) keeps them
    finally:
        gc.enable()


def test_diffusers_unfuse_qkv_projections_unfuses():
    model, fused = _pair()
    fused.unfuse_qkv_projections()  # diffusers' own, model level
    assert not is_fused(fused) and hasattr(fused.transformer_blocks[0].attn, "to_q")
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(fused(**inputs).sample, model(**inputs).sample)
    assert sorted(fused.state_dict()) == sorted(model.state_dict())
    fuse_qkv(fused)  # and again
    assert is_fused(fused)


def test_unfuse_refuses_a_model_with_lora():
    from svdquant_ops.lora import load_lora

    _, fused = _pair()
    mlp = fused.single_transformer_blocks[0].proj_mlp
    g = torch.Generator().manual_seed(0)
    key = "single_transformer_blocks.0.proj_mlp"
    load_lora(fused, {f"{key}.lora_A.weight": torch.randn(4, mlp.in_features, generator=g),
                      f"{key}.lora_B.weight": torch.randn(mlp.out_features, 4, generator=g)}, "a")
    with pytest.raises(ValueError, match="unfuse_qkv: the model holds LoRA adapters"):
        unfuse_qkv(fused)


def test_nvfp4_per_tensor_scales_keep_their_checkpoint_shape():
    model = tiny_flux()
    quantize_model(model, precision="nvfp4")
    attn = model.transformer_blocks[0].attn
    k = attn.to_k.weight
    attn.to_k.weight = nn.Parameter(SVDQuantTensor(k.codes, k.scales, k.smooth, k.proj_down, k.proj_up, k.precision,
                                                   k.act_unsigned, k.layout_version, k.dtype,
                                                   global_scale=k.global_scale * 2), requires_grad=False)
    ref = model.state_dict()
    fused = copy.deepcopy(model)
    fuse_qkv(fused)
    assert fused.transformer_blocks[0].attn.to_qkv.weight.global_scale.shape == (3 * k.shape[0],)
    sd = fused.state_dict()
    for n in ("to_q", "to_k", "to_v"):
        key = f"transformer_blocks.0.attn.{n}.weight"
        assert sd[key].global_scale.shape == (1,) and torch.equal(sd[key].global_scale, ref[key].global_scale)
    fused.load_state_dict(ref)  # in place, from the unfused checkpoint
    unfuse_qkv(fused)
    assert fused.transformer_blocks[0].attn.to_k.weight.global_scale.shape == (1,)
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(fused(**inputs).sample, model(**inputs).sample)


def test_fused_under_inference_mode_still_loads_in_place():
    model = tiny_flux()
    quantize_model(model, precision="w4a8")
    with torch.inference_mode():  # as a script that fuses where it generates might
        fuse_qkv(model)
    assert not model.transformer_blocks[0].attn.to_qkv.weight.codes.is_inference()
    other = tiny_flux(seed=1)
    quantize_model(other, precision="w4a8")
    model.load_state_dict(other.state_dict())
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, other(**inputs).sample)


def test_16bit_members_that_cannot_stack_are_left_alone():
    model = tiny_flux()
    model.transformer_blocks[0].attn.to_k.register_forward_hook(lambda *a: None)
    model.transformer_blocks[1].attn.add_v_proj.to(torch.float16)
    summary = fuse_qkv(model)
    assert "forward hooks" in summary.skipped["transformer_blocks.0.attn"]
    assert "differ in in_features, dtype or device" in summary.skipped["transformer_blocks.1.attn"]
    assert len(summary.fused) == 2  # the single blocks
    with pytest.raises(ValueError, match="weights must be a non-empty list"):
        SVDQuantTensor.stack_rows([])


@pytest.mark.parametrize("how", ["model_cpu_offload", "group_leaf", "group_block"])
def test_offloading_a_fused_model_keeps_its_outputs(how):
    """Model offloading and diffusers' group offloading move the fused parameters themselves (the README says these
    work on a fused model, sequential offloading does not); CPU to CPU here, the GPU cases in test_cuda_moves."""
    unfused, model = _pair()
    inputs = flux_inputs()
    with torch.no_grad():
        ref = unfused(**inputs).sample
    if how == "model_cpu_offload":
        from accelerate import cpu_offload_with_hook

        model, _ = cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
    else:
        kwargs = dict(offload_type="leaf_level") if how == "group_leaf" else dict(offload_type="block_level",
                                                                                   num_blocks_per_group=1)
        model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), **kwargs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref)
    assert sum(is_fused(m) for m in model.modules()) > 0
