"""Per-architecture acceptance: a tiny randomly initialised version of each supported family (FLUX.1, SD3, SANA,
PixArt-Σ, Qwen-Image, Wan 2.x, the SDXL UNet), built from a config, quantized with ``quantize_model`` (int4, rank 8,
data-free): the summary is right (embedders, final projection and norms 16-bit, AdaLN modulation 4-bit weight-only,
attention / MLP projections SVDQuant), the output is close to the 16-bit model's, save_pretrained / from_pretrained
is exact and ``torch.compile(fullgraph=True)`` compiles one frame."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from svdquant_ops import SVDQuantTensor, W4A16Tensor, quantize_model

from .builders import (flux_inputs, pixart_inputs, qwen_image_inputs, sana_inputs, sd3_inputs, sdxl_unet_inputs,
                       sqnr_db, wan_inputs)
from .test_selection import ADALN, MODELS

INPUTS = {"flux": flux_inputs, "sd3": sd3_inputs, "sana": sana_inputs, "pixart": pixart_inputs,
          "qwen-image": qwen_image_inputs, "wan": wan_inputs, "sdxl-unet": sdxl_unet_inputs}
FAMILIES = sorted(MODELS)

# SQNR (dB) of the quantized model's output against the 16-bit model's on the same inputs: int4, rank 8, data-free,
# random weights, AdaLN in w4a16. Measured (torch 2.13 CPU, model and input seed 0; seeds 1 and 2 in brackets):
# flux 36.1 (35.6, 37.3), sd3 38.0 (36.2, 38.5), sana 25.7 (22.3, 27.7), pixart 37.4 (35.0, 35.1),
# qwen-image 41.1 (40.5, 41.8), wan 34.0 (33.8, 34.3), sdxl-unet 17.5 (16.6, 17.7). The bars are 3 dB below seed 0
# (sana: below seed 1). sdxl-unet is low because every Transformer2DModel's proj_in / proj_out (quantized) sits on
# the whole transformer path with no bypass (~25 dB each alone); sana's error is dominated by its text path
# (cross-attention to_v / to_out; its caption_projection, the text embedder, stays 16-bit: 18.5 dB on seed 2 when
# it was quantized).
# Since q/k/v are decomposed data-free as one stacked SVD (rank 8 shared by three layers, for one activation
# quantization per input), seed 0 measures: flux 36.5, sd3 38.2, sana 22.2, pixart 35.7, qwen-image 40.7, wan 34.5,
# sdxl-unet 17.1; the bars above are unchanged.
MIN_SQNR_DB = {"flux": 33.0, "sd3": 35.0, "sana": 21.0, "pixart": 34.0, "qwen-image": 38.0, "wan": 31.0,
               "sdxl-unet": 14.5}


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _norm_params(model) -> dict[str, torch.Tensor]:
    """The parameters held by norm modules themselves (LayerNorm, RMSNorm, GroupNorm, FP32LayerNorm, ...), not those
    of the linears inside an AdaLN module."""
    return {f"{n}.{p}": t for n, m in model.named_modules() if "Norm" in type(m).__name__
            for p, t in m.named_parameters(recurse=False)}


def _run(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).sample


class _Quantized:
    """One family's model quantized once, with what the tests compare it to.

    The 16-bit model is loaded with ``from_pretrained(torch_dtype=torch.bfloat16)`` from a saved copy of the tiny
    model, as a user would load it, rather than taken from the builder: ``from_pretrained`` keeps non-persistent
    buffers (PixArt's ``pos_embed``, Wan's rotary tables) and ``_keep_in_fp32_modules`` (Wan) in float32 where the
    builder's ``.to(torch.bfloat16)`` casts everything, so the builder's model and its own save_pretrained /
    from_pretrained copy differ already in 16-bit."""

    def __init__(self, family: str, directory):
        build, expected = MODELS[family]
        built = build()
        built.save_pretrained(directory)
        self.model = type(built).from_pretrained(directory, torch_dtype=torch.bfloat16).eval()
        self.inputs = INPUTS[family]()
        self.reference = _run(self.model, self.inputs)  # the 16-bit model's output
        self.params = {n: t.detach().clone() for n, t in self.model.named_parameters()}
        self.linears = set(_linears(self.model))
        self.summary = quantize_model(self.model, rank=8)
        self.output = _run(self.model, self.inputs)
        self.kept = {n: r for n, r in expected.items() if r != ADALN}
        self.weight_only = {n: r for n, r in expected.items() if r == ADALN}


@pytest.fixture(scope="module")
def _built(tmp_path_factory):
    return {}, tmp_path_factory.mktemp("bf16")


@pytest.fixture
def quantized(family, _built) -> _Quantized:
    """The family's quantized model, built on first use and shared by the tests of this module."""
    cache, directory = _built
    if family not in cache:
        cache[family] = _Quantized(family, directory / family)
    return cache[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_is_right(family, quantized):
    q, summary = quantized, quantized.summary
    assert summary.kept == q.kept
    assert summary.weight_only == q.weight_only
    assert set(summary.quantized) == q.linears - set(q.kept) - set(q.weight_only)
    assert len(summary.quantized) == len(set(summary.quantized)) > 0
    linears = _linears(q.model)
    for name, module in linears.items():
        expected = (torch.nn.Parameter if name in q.kept else W4A16Tensor if name in q.weight_only
                    else SVDQuantTensor)
        assert type(module.weight) is expected, (name, type(module.weight).__name__)
    # Norms untouched (still plain parameters, same dtype and values), and so is every other parameter but the
    # 4-bit weights: biases, convolutions, embedding and scale-shift tables. (SD3's and PixArt's tiny models have
    # no norm parameters: all their LayerNorms are elementwise_affine=False or AdaLN.)
    four_bit = {f"{n}.weight" for n, m in linears.items() if type(m.weight) is not torch.nn.Parameter}
    params = dict(q.model.named_parameters())
    assert params.keys() == q.params.keys()
    assert set(_norm_params(q.model)) <= params.keys() - four_bit
    for name, t in params.items():
        if name not in four_bit:
            before = q.params[name]
            assert type(t) is torch.nn.Parameter and t.dtype == before.dtype and torch.equal(t, before), name
    assert 0 < summary.bytes_after < summary.bytes_before


@pytest.mark.parametrize("family", FAMILIES)
def test_output_close_to_16_bit(family, quantized):
    assert quantized.output.shape == quantized.reference.shape
    assert torch.isfinite(quantized.output).all()
    sqnr = sqnr_db(quantized.reference, quantized.output)
    assert sqnr >= MIN_SQNR_DB[family], f"{family}: SQNR {sqnr:.1f} dB < {MIN_SQNR_DB[family]} dB"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_from_pretrained_is_exact(family, quantized, tmp_path):
    q = quantized
    q.model.save_pretrained(tmp_path)
    loaded = type(q.model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    before, after = _linears(q.model), _linears(loaded)
    assert {n: type(m.weight) for n, m in after.items()} == {n: type(m.weight) for n, m in before.items()}
    assert torch.equal(_run(loaded, q.inputs), q.output)


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_compile_one_frame(family, quantized):
    q = quantized
    inputs2 = INPUTS[family](seed=1)
    eager2 = _run(q.model, inputs2)
    torch._dynamo.reset()
    try:
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(q.model, fullgraph=True, backend=cnt)
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**q.inputs).sample
            out2 = compiled(**inputs2).sample
        assert cnt.frame_count == 1
    finally:
        torch._dynamo.reset()
    # aot_eager runs the same aten and svdquant ops as eager: bit-identical
    assert torch.equal(out, q.output)
    assert torch.equal(out2, eager2)
