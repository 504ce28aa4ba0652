"""Which linears get quantized: one rule (``quantize.selection.decide``) for the handler, the calibration progress
bar and the summary; never silent when the rules cannot apply."""

from __future__ import annotations

import logging

import pytest
import torch
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, SVDQuantTensor, W4A16Tensor, prepare_model, quantize_model
from svdquant_ops.quantize import handler

from .builders import tiny_flux, tiny_pixart, tiny_qwen_image, tiny_sana, tiny_sd3, tiny_sdxl_unet, tiny_wan

# What the default rules do not give SVDQuant in each tiny model, written out by hand from the diffusers module
# trees: AdaLN modulation linears get 4-bit weights only (W4A16Tensor), the rest stay 16-bit.
ADALN = "AdaLN modulation"
FLUX_KEPT = {
    "x_embedder": "embedder", "context_embedder": "embedder",
    "time_text_embed.timestep_embedder.linear_1": "embedder", "time_text_embed.timestep_embedder.linear_2": "embedder",
    "time_text_embed.text_embedder.linear_1": "embedder", "time_text_embed.text_embedder.linear_2": "embedder",
    "transformer_blocks.0.norm1.linear": "AdaLN modulation", "transformer_blocks.0.norm1_context.linear": "AdaLN modulation",
    "transformer_blocks.1.norm1.linear": "AdaLN modulation", "transformer_blocks.1.norm1_context.linear": "AdaLN modulation",
    "single_transformer_blocks.0.norm.linear": "AdaLN modulation",
    "single_transformer_blocks.1.norm.linear": "AdaLN modulation",
    "norm_out.linear": "AdaLN modulation", "proj_out": "final projection",
}
SD3_KEPT = {
    "time_text_embed.timestep_embedder.linear_1": "embedder", "time_text_embed.timestep_embedder.linear_2": "embedder",
    "time_text_embed.text_embedder.linear_1": "embedder", "time_text_embed.text_embedder.linear_2": "embedder",
    "context_embedder": "embedder",
    "transformer_blocks.0.norm1.linear": "AdaLN modulation", "transformer_blocks.0.norm1_context.linear": "AdaLN modulation",
    "transformer_blocks.1.norm1.linear": "AdaLN modulation", "transformer_blocks.1.norm1_context.linear": "AdaLN modulation",
    "norm_out.linear": "AdaLN modulation", "proj_out": "final projection",
}
SANA_KEPT = {
    "time_embed.emb.timestep_embedder.linear_1": "embedder", "time_embed.emb.timestep_embedder.linear_2": "embedder",
    "time_embed.linear": "AdaLN modulation", "proj_out": "final projection",
    "caption_projection.linear_1": "embedder", "caption_projection.linear_2": "embedder",
}

PIXART_KEPT = {
    "adaln_single.emb.timestep_embedder.linear_1": "embedder", "adaln_single.emb.timestep_embedder.linear_2": "embedder",
    "adaln_single.linear": "AdaLN modulation", "proj_out": "final projection",
    "caption_projection.linear_1": "embedder", "caption_projection.linear_2": "embedder",
}
QWEN_KEPT = {
    "time_text_embed.timestep_embedder.linear_1": "embedder", "time_text_embed.timestep_embedder.linear_2": "embedder",
    "img_in": "embedder", "txt_in": "embedder", "transformer_blocks.0.img_mod.1": "AdaLN modulation",
    "transformer_blocks.0.txt_mod.1": "AdaLN modulation", "norm_out.linear": "AdaLN modulation",
    "proj_out": "final projection",
}
WAN_KEPT = {
    "condition_embedder.time_embedder.linear_1": "embedder", "condition_embedder.time_embedder.linear_2": "embedder",
    "condition_embedder.time_proj": "embedder", "condition_embedder.text_embedder.linear_1": "embedder",
    "condition_embedder.text_embedder.linear_2": "embedder", "proj_out": "final projection",
}
# The SDXL UNet: its transformer linears (attention, feed-forward, proj_in / proj_out of each Transformer2DModel) are
# quantized; the time and added-condition embeddings and every resnet's per-sample time projection stay 16-bit.
SDXL_KEPT = {
    **{f"{e}.linear_{i}": "embedder" for e in ("time_embedding", "add_embedding") for i in (1, 2)},
    **{f"{b}.resnets.{r}.time_emb_proj": "AdaLN modulation"
       for b, rs in (("down_blocks.0", (0,)), ("down_blocks.1", (0,)), ("up_blocks.0", (0, 1)),
                     ("up_blocks.1", (0, 1)), ("mid_block", (0, 1))) for r in rs},
}

MODELS = {"flux": (tiny_flux, FLUX_KEPT), "sd3": (tiny_sd3, SD3_KEPT), "sana": (tiny_sana, SANA_KEPT),
          "pixart": (tiny_pixart, PIXART_KEPT), "qwen-image": (tiny_qwen_image, QWEN_KEPT), "wan": (tiny_wan, WAN_KEPT),
          "sdxl-unet": (tiny_sdxl_unet, SDXL_KEPT)}


def _split(expected: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(kept in 16-bit, weight-only) parts of a model's expected table."""
    return ({n: r for n, r in expected.items() if r != ADALN}, {n: r for n, r in expected.items() if r == ADALN})


def _by_kind(model) -> tuple[set[str], set[str]]:
    """(16-bit, weight-only) linears of a quantized model, from their weights."""
    lin = _linears(model)
    return ({n for n, m in lin.items() if type(m.weight) is torch.nn.Parameter},
            {n for n, m in lin.items() if isinstance(m.weight, W4A16Tensor)})


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "svdquant_ops" and r.levelno >= logging.WARNING]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    handler._warned_configs.clear()
    yield
    handler._warned_configs.clear()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_prepared_quantize_follows_exactly_the_default_rules(family, caplog):
    build, expected = MODELS[family]
    kept, weight_only = _split(expected)
    model = build()
    prepare_model(model)
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(model, SVDQuantConfig(rank=8))
    assert _by_kind(model) == (set(kept), set(weight_only))
    for name, reason in kept.items():
        assert any(f"keeping {name} in 16-bit: {reason}" in r.message for r in caplog.records), name
    for name, reason in weight_only.items():
        assert any(f"giving {name} 4-bit weights only (w4a16): {reason}" in r.message for r in caplog.records), name
    assert _warnings(caplog) == []
    # weight_only=None keeps them in 16-bit, as before 4-bit AdaLN existed
    model = build()
    quantize_model(model, rank=8, weight_only=None)
    assert _by_kind(model) == (set(expected), set())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_unprepared_quantize_warns_once_and_names_the_right_call(family, caplog):
    build, kept = MODELS[family]
    model = build()
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(model, SVDQuantConfig(rank=8))
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "svdquant_ops.quantize_model(model, config)" in warnings[0].getMessage()
    # It did what it said: every linear of a supported size quantized, the family's rules not applied.
    assert all(isinstance(m.weight, SVDQuantTensor) == (m.in_features % 64 == 0) for m in _linears(model).values())


def test_quantize_model_summary_matches_what_happened(caplog):
    model = tiny_flux()
    before = {n: m.weight for n, m in _linears(model).items()}
    kept, weight_only = _split(FLUX_KEPT)
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        summary = quantize_model(model, precision="w4a8", rank=8)
    assert summary.kept == kept and summary.weight_only == weight_only
    assert set(summary.quantized) == set(before) - set(FLUX_KEPT)
    assert all(isinstance(_linears(model)[n].weight, SVDQuantTensor) for n in summary.quantized)
    assert 0 < summary.bytes_after < summary.bytes_before
    assert (f"{len(summary.quantized)} linears SVDQuant, {len(weight_only)} 4-bit weight-only (7 AdaLN modulation), "
            f"{len(kept)} kept in 16-bit (6 embedder, 1 final projection)") in str(summary)
    assert any(str(summary) in r.getMessage() for r in caplog.records)
    assert _warnings(caplog) == []
    with pytest.raises(TypeError, match="either config or options"):
        quantize_model(tiny_flux(), SVDQuantConfig(), rank=4)


def test_gelu_fed_layer_gets_unsigned_activations_only_when_prepared():
    prepared = tiny_flux()
    quantize_model(prepared, rank=8)
    assert prepared.transformer_blocks[0].ff.net[2].weight.act_unsigned
    assert not prepared.transformer_blocks[0].ff.net[0].proj.weight.act_unsigned
    plain = tiny_flux()
    quantize_(plain, SVDQuantConfig(rank=8))
    assert not plain.transformer_blocks[0].ff.net[2].weight.act_unsigned


def test_skip_patterns_warn_only_when_they_cannot_apply(caplog):
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        # no pattern to apply, and w4a8 has no unsigned variant (no GELU detection needed): nothing to warn about
        quantize_(torch.nn.Linear(64, 64).to(torch.bfloat16), SVDQuantConfig(precision="w4a8", skip=[]))
        assert _warnings(caplog) == []
        model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
        quantize_(model, SVDQuantConfig(precision="w4a8", skip=["0"]))  # the handler cannot know the name "0"
    assert len(_warnings(caplog)) == 1
    assert isinstance(model[0].weight, SVDQuantTensor)
    assert "the skip patterns ['0']" in _warnings(caplog)[0].getMessage()
    named = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
    prepare_model(named)
    quantize_(named, SVDQuantConfig(precision="w4a8", skip=["0"]))
    assert not isinstance(named[0].weight, SVDQuantTensor)


def test_unprepared_int4_warns_even_with_explicit_patterns(caplog):
    """skip=[] needs no names, but int4's unsigned activations for GELU-fed layers need the structure: without it
    ff.net.2 silently got signed INT4; now that is said, once per config."""
    model = tiny_flux()
    config = SVDQuantConfig(rank=8, skip=[])
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(model, config)
        quantize_(tiny_flux(), config)
    assert len(_warnings(caplog)) == 1
    assert not model.transformer_blocks[0].ff.net[2].weight.act_unsigned


def test_warning_once_per_config_object(caplog):
    with caplog.at_level(logging.WARNING, logger="svdquant_ops"):
        for _ in range(20):
            quantize_(torch.nn.Linear(64, 64).to(torch.bfloat16), SVDQuantConfig(rank=8))
    assert len(_warnings(caplog)) == 20


def test_names_from_an_enclosing_model_are_kept():
    model = tiny_flux()
    prepare_model(model)
    block = model.single_transformer_blocks[0]
    quantize_model(block, rank=8)  # a block of a prepared model: its proj_out is not the final projection
    assert isinstance(block.proj_out.weight, SVDQuantTensor)
    other = tiny_flux()
    from svdquant_ops import calibrate

    with calibrate(other.single_transformer_blocks[0]):  # named on its own first: relative names
        pass
    with calibrate(other):  # then the whole model: full names replace them
        pass
    quantize_(other, SVDQuantConfig(rank=8))
    assert isinstance(other.single_transformer_blocks[0].proj_out.weight, SVDQuantTensor)
    assert isinstance(other.single_transformer_blocks[1].proj_out.weight, SVDQuantTensor)
    assert not isinstance(other.proj_out.weight, SVDQuantTensor)


def test_quantize_model_twice_is_a_no_op_with_the_same_summary():
    model = tiny_flux()
    first = quantize_model(model, rank=8)
    second = quantize_model(model, rank=8)
    assert second.kept == first.kept and sorted(second.quantized) == sorted(first.quantized)
    assert second.weight_only == first.weight_only


@pytest.mark.parametrize("precision", ["int4", "w4a8"])
def test_from_pretrained_with_our_quantization_config_keeps_the_family_rules(tmp_path, caplog, precision):
    """diffusers quantizes each linear alone while loading; svdquant_ops.quantization_config hands it the family
    rules as an FqnToConfig that diffusers resolves per parameter name: the same kept set, no warning, and the
    config survives save_pretrained / from_pretrained bit-exactly."""
    from diffusers import FluxTransformer2DModel

    import svdquant_ops

    from .builders import flux_inputs

    tiny_flux().save_pretrained(tmp_path / "bf16")
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        q = FluxTransformer2DModel.from_pretrained(
            tmp_path / "bf16", torch_dtype=torch.bfloat16,
            quantization_config=svdquant_ops.quantization_config(precision=precision, rank=8))
    kept, weight_only = _split(FLUX_KEPT)
    assert _by_kind(q) == (set(kept), set(weight_only))
    assert _warnings(caplog) == []
    assert not q.transformer_blocks[0].ff.net[2].weight.act_unsigned  # no GELU detection on this path: signed
    q.save_pretrained(tmp_path / "q")
    r = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(q(**inputs).sample, r(**inputs).sample)
    with pytest.raises(TypeError, match="either config or options"):
        svdquant_ops.quantization_config(SVDQuantConfig(), rank=4)


class _UnknownDiT(torch.nn.Module):
    """A diffusion transformer whose names no family rule knows: the structural rules must still keep its
    embedders and input / output projections in 16-bit and give its modulation linears 4-bit weights only."""

    def __init__(self, dim: int = 64):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.normalization import AdaLayerNormZero

        self.t_mlp = TimestepEmbedding(32, dim)  # an *Embedding* class: 16-bit
        self.inp = torch.nn.Linear(dim, dim)  # directly under the root, outside the blocks: 16-bit
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({
            "ada": AdaLayerNormZero(dim),  # AdaLayerNorm* class: weight-only
            "mod": torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 2 * dim)),  # SiLU then linear
            "qkv": torch.nn.Linear(dim, 3 * dim),
            "ff": torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)),
        }) for _ in range(2)])
        self.out = torch.nn.Linear(dim, dim)


def test_structural_rules_cover_a_model_with_unknown_names():
    model = _UnknownDiT().to(torch.bfloat16)
    summary = quantize_model(model, rank=8)
    assert summary.kept == {
        "t_mlp.linear_1": "embedder (Embedding class)", "t_mlp.linear_2": "embedder (Embedding class)",
        "inp": "input / output projection (outside the blocks)", "out": "input / output projection (outside the blocks)"}
    assert summary.weight_only == {
        **{f"blocks.{i}.ada.linear": "AdaLN modulation (AdaLayerNorm class)" for i in range(2)},
        **{f"blocks.{i}.mod.1": "AdaLN modulation (SiLU then linear)" for i in range(2)}}
    assert sorted(summary.quantized) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "ff.0", "ff.2"))
    assert model.blocks[0]["ff"][2].weight.act_unsigned  # GELU-fed, found by structure too
    # a lone block has no "outside": its direct linears are not taken for input / output projections
    block = _UnknownDiT().to(torch.bfloat16).blocks[0]
    assert quantize_model(block, rank=8).kept == {}


def test_an_mlp_with_silu_is_not_modulation():
    """Only exactly Sequential(SiLU, Linear) is modulation; the second linear of an MLP with a SiLU is not."""
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(),
                                                            torch.nn.Linear(128, 64))])
    summary = quantize_model(model.to(torch.bfloat16), rank=8)
    assert sorted(summary.quantized) == ["blocks.0.0", "blocks.0.2"] and summary.weight_only == {}


class _SharedSiluBlock(torch.nn.Module):
    """A modulation linear and an MLP reading the very same tensor: calibration records them as one input group."""

    def __init__(self):
        super().__init__()
        self.mod = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(64, 128))
        self.ff = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = torch.nn.functional.silu(x)
        return self.mod[1](h).sum() + self.ff(h).sum()


@pytest.mark.parametrize("order", ["weight-only first", "svdquant first"])
def test_calibrated_group_with_a_weight_only_member(order):
    from svdquant_ops import calibrate

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([_SharedSiluBlock()])
    model.to(torch.bfloat16)
    block = model.blocks[0]
    if order == "svdquant first":  # torchao visits modules in registration order
        block._modules = {"ff": block.ff, "mod": block.mod}
    with calibrate(model) as session:
        block(torch.randn(32, 64, dtype=torch.bfloat16))
    assert len(session.records) == 1 and len(session.records[0].members) == 2  # one input group
    summary = quantize_model(model, rank=8)
    assert summary.quantized == ["blocks.0.ff"] and list(summary.weight_only) == ["blocks.0.mod.1"]
    assert isinstance(block.mod[1].weight, W4A16Tensor) and isinstance(block.ff.weight, SVDQuantTensor)


def test_fqn_config_name_patterns_reaching_non_linears_are_harmless():
    """quantization_config()'s name patterns also match a block's norm or SiLU (norm_out.norm, img_mod.0) when the
    table is used with torchao's quantize_ directly: those are left alone."""
    import svdquant_ops

    model = tiny_flux()
    quantize_(model, svdquant_ops.quantization_config(rank=8).quant_type, filter_fn=None)
    assert isinstance(model.norm_out.linear.weight, W4A16Tensor)
    assert isinstance(model.transformer_blocks[0].attn.to_q.weight, SVDQuantTensor)


def test_quantization_config_honours_explicit_skip():
    import svdquant_ops

    table = svdquant_ops.quantization_config(skip=["*attn.to_q"], rank=8).quant_type
    model = tiny_flux()
    quantize_(model, table, filter_fn=None)
    assert type(model.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter
    assert isinstance(model.norm_out.linear.weight, SVDQuantTensor)  # no family rules with an explicit list
