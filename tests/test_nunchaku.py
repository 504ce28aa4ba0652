"""Nunchaku's SVDQuant checkpoints (svdquant_ops.nunchaku): the reference converter's packed layer (the fixture) is
unpacked exactly and packed back bit for bit; the imported layer computes Nunchaku's layer (a float64 reference of
its semantics); a tiny FLUX-architecture file written by our packer loads into diffusers' model, matches the same
layers built directly from their canonical tensors, compiles in one frame, converts to w4a8, runs in a FluxPipeline
and in `svdquant generate`; bad files fail with messages that say what is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from svdquant_ops import SVDQuantTensor, W4A16Tensor
from svdquant_ops.integrations import nunchaku as N
from svdquant_ops.integrations import nunchaku_pack as P
from svdquant_ops.integrations.nunchaku_write import write_nunchaku_flux
from svdquant_ops.layout import unpack_nibbles
from svdquant_ops.nunchaku import load_nunchaku_transformer, unpack_linear
from svdquant_ops.storage import SVDQuantParts

from .builders import sqnr_db

# A copy of ../shared/fixtures/nunchaku_linear_layer.safetensors (the reference converter's output), kept in the
# repository so that a clean clone runs this test.
FIXTURE = Path(__file__).parent / "data" / "nunchaku_linear_layer.safetensors"
SHIFT = 0.171875
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)


def _fixture(precision: str) -> tuple[dict, dict]:
    t = load_file(FIXTURE)
    packed = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(f"{precision}.nunchaku.")}
    canon = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(f"{precision}.canonical.")}
    return packed, canon


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ------------------------------------------------------------------------------------------------ reference
def _e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value, ties to the even mantissa (even index), saturating at 6."""
    mags = E2M1[:8]
    d = (v.abs().clamp(max=6.0).unsqueeze(-1) - mags).abs()
    cand = d == d.amin(-1, keepdim=True)
    even = cand & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.to(torch.int8).argmax(-1), cand.to(torch.int8).argmax(-1))
    return torch.where(v < 0, -mags[idx], mags[idx])


def nunchaku_reference(x: torch.Tensor, c: dict, precision: str, unsigned: bool = False) -> torch.Tensor:
    """Nunchaku's layer in float64 from canonical tensors: Q(x̂)·Wᵀ + (x·proj_down)·proj_upᵀ + stored bias, with
    x̂ = x/λ ((x + 0.171875)/λ unsigned); INT4 activations per 64 with scale amax/7 (max/15 unsigned) rounded to the
    model dtype, NVFP4 per 16 with fp8 scale amax/6; round half to even, saturating."""
    xd = x.double()
    m, k = xd.shape
    # the activation quantizer's arithmetic is fp32 (x̂ and x̂ / scale), as in both libraries' kernels: a float64
    # x̂ would move values that sit within an fp32 rounding of a rounding tie to the other code
    xf = x.float()
    xh = ((xf + SHIFT) if unsigned else xf) / c["smooth"].float()
    if precision == "int4":
        g = xh.reshape(m, k // 64, 64)
        qmax = 15.0 if unsigned else 7.0
        amax = g.amax(-1).clamp(min=0) if unsigned else g.abs().amax(-1)
        s = (amax / qmax).to(x.dtype).float().unsqueeze(-1)
        q = torch.where(s == 0, 0.0, torch.round(g / s)).clamp(0.0 if unsigned else -7.0, qmax)
        w = c["codes"].double() * c["wscales"].double().repeat_interleave(64, 1)
    else:
        g = xh.reshape(m, k // 16, 16)
        s = (g.abs().amax(-1) / 6).clamp(max=448).to(torch.float8_e4m3fn).float().unsqueeze(-1)
        q = torch.where(s == 0, 0.0, _e2m1_round((g / s).double()))
        w = (E2M1[c["codebook_index"].long()] * c["micro_scales"].double().repeat_interleave(16, 1)
             * c["channel_scales"].double().unsqueeze(1))
    xq = (q.double() * s.double()).reshape(m, k)
    y = xq @ w.T + (xd @ c["proj_down_raw_x"].double()) @ c["proj_up"].double().T
    return y + c["bias"].double() if "bias" in c else y


# ------------------------------------------------------------------------------------------------ the fixture
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_fixture_unpacks_exactly_and_packs_back_bit_for_bit(precision):
    packed, canon = _fixture(precision)
    got = N.unpack_canonical(packed, precision)
    for name, want in canon.items():
        if name == "codebook_index":  # the converter writes the codebook's -0 (index 8) as +0 (index 0)
            assert (want == 8).any()
            want = torch.where(want == 8, torch.zeros_like(want), want)
        assert got[name].dtype == want.dtype, name
        assert torch.equal(_bits(got[name]), _bits(want)), name
    if precision == "int4":
        assert got["codes"].min() == -8 and got["codes"].max() == 7  # Nunchaku's full signed range
    repacked = N.pack_canonical(canon, precision)  # from the canonical tensors, -0 included
    assert sorted(repacked) == sorted(packed)
    for name, want in packed.items():
        assert repacked[name].dtype == want.dtype and torch.equal(_bits(repacked[name]), _bits(want)), name


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_fixture_layer_computes_nunchakus_layer(precision, unsigned):
    """F.linear through our ops equals the float64 reference of Nunchaku's semantics to the output rounding (half a
    bf16 ulp, plus fp32 accumulation); codes of -8 included. unsigned: the layer as a GELU-fed fc2."""
    packed, canon = _fixture(precision)
    weight, bias = unpack_linear(packed, precision, act_unsigned=unsigned)
    assert isinstance(weight, SVDQuantTensor) and weight.act_unsigned == unsigned
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 384, generator=g)
    x[:, 5] *= 30  # an outlier channel: group scales differ widely
    x = (F.gelu(x, approximate="tanh") if unsigned else x).to(torch.bfloat16)
    y = F.linear(x, weight, bias)
    ref = nunchaku_reference(x, canon, precision, unsigned)
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-4 * ref.abs().max()  # half a bf16 ulp (eps 2^-7) + fp32 sums
    assert (err <= bound).all(), (err - bound).max()
    if unsigned:  # our split: the linear's bias is the 16-bit layer's; bias + bias_correction is the stored one
        assert torch.equal(bias.float() + weight.bias_correction, canon["bias"].float())
        shift_comp = (canon["codes"].double() * canon["wscales"].double().repeat_interleave(64, 1)) @ (
            SHIFT / canon["smooth"].double())
        true = canon["bias"].double() + shift_comp
        assert torch.equal(bias, true.to(torch.bfloat16))


@pytest.mark.parametrize("unsigned", [False, True])
def test_fixture_w4a8_conversion_error_is_recorded(unsigned):
    """w4a8 cannot hold code -8: the residual is re-quantized (codes [-7, 7]). The converted layer stays close to
    both the exact INT4 layer and the 16-bit weight the file approximates. Numbers seen (SQNR): w4a8 vs INT4 13.9 dB,
    w4a8 vs 16-bit 22.9 dB, INT4 vs 16-bit 14.3 dB on these outlier-heavy inputs; as a GELU-fed layer (unsigned INT4;
    w4a8 signed, without the shift compensation in its bias) 20.9 / 26.0 / 23.1 dB. Residual weights: 23.0 dB."""
    packed, _ = _fixture("int4")
    weight, bias = unpack_linear(packed, "int4", act_unsigned=unsigned)
    w8, b8 = N.to_w4a8([(weight, bias)])
    codes = unpack_nibbles(w8.codes, signed=True)
    assert codes.min() >= -7 and codes.max() <= 7
    assert sqnr_db(weight.residual(), w8.residual()) > 20
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 384, generator=g)
    x[:, 5] *= 30
    x = (F.gelu(x, approximate="tanh") if unsigned else x).to(torch.bfloat16)
    y4, y8 = F.linear(x, weight, bias), F.linear(x, w8, b8)
    y16 = F.linear(x.float(), weight.dequantize(torch.float32), N.true_bias(weight, bias))
    assert sqnr_db(y16, y8) > 20 and sqnr_db(y4, y8) > 12 and sqnr_db(y16, y4) > 12


# ------------------------------------------------------------------------------------------------ a tiny FLUX file
def write_tiny_nunchaku(path: Path, ref: torch.nn.Module, precision: str, seed: int = 0) -> dict:
    """Write ``ref`` (a bf16 FluxTransformer2DModel) as a Nunchaku v1 file with our packer (the library's
    ``write_nunchaku_flux``: data-free SVDQuant in Nunchaku's conventions); returns the canonical tensors of every
    quantized layer by its Nunchaku name (value: (canonical, unsigned))."""
    return write_nunchaku_flux(path, ref, precision, seed=seed, keep_canonical=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny FLUX pipeline (FLUX.1's blocks at 1/12 width; seeded, no download) saved as a base
    directory, its transformer written as an INT4 Nunchaku file ("int4"), and a 1 + 1 block model of the same width
    written as INT4 and NVFP4 files ("small-int4", "small-nvfp4": quicker to load and compile)."""
    from diffusers import FluxTransformer2DModel

    from svdquant_ops.integrations.pipelines import tiny_flux_pipeline

    work = tmp_path_factory.mktemp("nunchaku")
    pipe = tiny_flux_pipeline()
    base = work / "base"
    pipe.save_pretrained(base)
    torch.manual_seed(1)
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    small = FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 1}).to(torch.bfloat16).eval()
    refs = {"int4": pipe.transformer, "small-int4": small, "small-nvfp4": small}
    files, canon = {}, {}
    for name, ref in refs.items():
        files[name] = work / f"svdq-{name}_r32-tiny-flux.safetensors"
        canon[name] = write_tiny_nunchaku(files[name], ref, name.rsplit("-", 1)[-1])
    return dict(pipe=pipe, refs=refs, files=files, canon=canon, base=base, work=work)


def _flux_inputs(model, seed=0, img=16, txt=8):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(hidden_states=torch.randn(1, img, c.in_channels, generator=g).to(torch.bfloat16),
                encoder_hidden_states=torch.randn(1, txt, c.joint_attention_dim, generator=g).to(torch.bfloat16),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(torch.bfloat16),
                timestep=torch.full((1,), 0.5), guidance=torch.full((1,), 3.5),
                img_ids=torch.stack([torch.zeros(img), torch.arange(img) // 4, torch.arange(img) % 4], 1),
                txt_ids=torch.zeros(txt, 3))


def _direct(c: dict, unsigned: bool, precision: str) -> tuple[SVDQuantTensor, torch.Tensor | None]:
    """The layer built with our own classes straight from its canonical tensors (fused, stored bias)."""
    if precision == "int4":
        codes, scales, gs = c["codes"], c["wscales"], None
    else:
        codes, scales, gs = c["codebook_index"], c["micro_scales"], c["channel_scales"].float()
    parts = SVDQuantParts(codes=codes, scales=scales, global_scale=gs, smooth=c["smooth"],
                          proj_down=c["proj_down_raw_x"], proj_up=c["proj_up"], precision=precision,
                          act_unsigned=unsigned)
    return SVDQuantTensor.from_parts(parts, torch.bfloat16), c.get("bias")


@pytest.mark.parametrize("name", ["int4", "small-nvfp4"])
def test_tiny_file_loads_and_matches_the_layers_built_directly(tiny, name):
    model = load_nunchaku_transformer(tiny["files"][name])
    canon, ref = tiny["canon"][name], tiny["refs"][name]
    precision = name.rsplit("-", 1)[-1]
    s = len(model.single_transformer_blocks) - 1
    blk, sblk = model.transformer_blocks[0], model.single_transformer_blocks[s]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1024, generator=g).to(torch.bfloat16)
    # fused q/k/v, split three ways: the same outputs bit for bit, one λ and one down projection
    w, b = _direct(*canon["transformer_blocks.0.qkv_proj"], precision)
    attn = blk.attn
    parts = [attn.to_q, attn.to_k, attn.to_v]
    assert len({p.weight.smooth.data_ptr() for p in parts}) == 1  # one tensor (Parameter wraps make new views)
    assert len({p.weight.proj_down.data_ptr() for p in parts}) == 1
    assert torch.equal(torch.cat([p(x[:, :256]) for p in parts], -1), F.linear(x[:, :256], w, b))
    # a GELU-fed fc2 (unsigned in INT4)
    c, unsigned = canon["transformer_blocks.0.mlp_context_fc2"]
    assert blk.ff_context.net[2].weight.act_unsigned == unsigned == (precision == "int4")
    xg = F.gelu(x.float(), approximate="tanh").to(torch.bfloat16)
    w, b = _direct(c, unsigned, precision)
    assert torch.equal(blk.ff_context.net[2](xg), F.linear(xg, w, b))
    # a single block's proj_out: out_proj (signed) + mlp_fc2 (unsigned in INT4), summed
    xs = torch.cat([x[:, :256], xg], dim=-1)
    wa, ba = _direct(*canon[f"single_transformer_blocks.{s}.out_proj"], precision)
    wf, bf = _direct(*canon[f"single_transformer_blocks.{s}.mlp_fc2"], precision)
    assert isinstance(sblk.proj_out, N.SplitInputLinear)
    assert torch.equal(sblk.proj_out(xs), F.linear(xs[:, :256], wa, ba) + F.linear(xs[:, 256:], wf, bf))
    # AdaLN: the exact W4A16 weight of the 16-bit one, in diffusers' chunk order; the scale chunks' +1 taken back
    for mod, rmod in ((blk.norm1.linear, ref.transformer_blocks[0].norm1.linear),
                      (sblk.norm.linear, ref.single_transformer_blocks[s].norm.linear)):
        want = W4A16Tensor.from_float(rmod.weight)
        assert isinstance(mod.weight, W4A16Tensor)
        for f in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(mod.weight, f), getattr(want, f)), f
        torch.testing.assert_close(mod.bias, rmod.bias, atol=2 ** -8, rtol=0)  # bias - 1 + 1 in bf16
    assert torch.equal(model.transformer_blocks[-1].attn.norm_added_k.weight,
                       ref.transformer_blocks[-1].attn.norm_added_k.weight)
    # the whole model approximates the 16-bit one it was quantized from (a wrong permutation, chunk order or +1
    # gives noise: about 0 dB)
    inputs = _flux_inputs(model)
    with torch.inference_mode():
        out, want = model(**inputs).sample, ref(**inputs).sample
    assert torch.isfinite(out).all()
    assert sqnr_db(want, out) > 8, sqnr_db(want, out)


def test_an_imported_model_refuses_save_pretrained_and_round_trips_through_save_file(tiny, tmp_path):
    """diffusers would load a re-saved import without its split single-block proj_out (the stock module tree has one
    linear there): save_pretrained says so instead; the state dict round-trips bit for bit through save_file."""
    import svdquant_ops

    model = load_nunchaku_transformer(tiny["files"]["int4"])
    with pytest.raises(NotImplementedError, match="cannot be saved with save_pretrained.*keep the Nunchaku file"):
        model.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved").exists()
    svdquant_ops.save_file(model.state_dict(), tmp_path / "sd.safetensors")
    other = load_nunchaku_transformer(tiny["files"]["int4"])
    other.load_state_dict(svdquant_ops.load_file(tmp_path / "sd.safetensors"))
    inputs = _flux_inputs(model)
    with torch.inference_mode():
        assert torch.equal(other(**inputs).sample, model(**inputs).sample)


def test_every_packed_layer_of_the_tiny_file_round_trips(tiny):
    for precision in ("int4", "nvfp4"):
        t = load_file(tiny["files"][f"small-{precision}"])
        prefixes = sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".lora_down")})
        assert len(prefixes) == 8 + 4
        for prefix in prefixes:
            packed = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}
            again = N.pack_canonical(N.unpack_canonical(packed, precision), precision)
            assert all(torch.equal(_bits(again[k]), _bits(v)) for k, v in packed.items()), prefix
        for prefix in sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".wzeros")}):
            packed = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}
            chunks = 3 if prefix.startswith("single") else 6
            w, b = N.unpack_awq_linear(packed, chunks)
            again = N.pack_awq_linear(w, b, chunks)
            for k in ("qweight", "wscales", "wzeros"):
                assert torch.equal(again[k], packed[k]), (prefix, k)
            assert packed["wscales"].shape[0] == 16  # TinyChat pads 4 groups to 16


def test_compiles_in_one_frame_and_shares_activation_quantization(tiny):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    model = load_nunchaku_transformer(tiny["files"]["small-int4"])
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    inputs = _flux_inputs(model)
    with torch.inference_mode():
        eager = model(**inputs).sample
        out = compiled(**inputs).sample
    torch._dynamo.reset()
    assert cnt.frame_count == 1
    assert torch.equal(out, eager)
    # a single block's q/k/v and MLP-in projection share one λ and down projection (one quantize_act)
    sb = model.single_transformer_blocks[0]
    assert sb.proj_mlp.weight.proj_down.data_ptr() == sb.attn.to_q.weight.proj_down.data_ptr()


def test_w4a8_conversion_of_the_tiny_model(tiny):
    """precision="w4a8" re-quantizes every INT4 weight (codes [-7, 7], one linear for proj_out); the converted
    model stays close to the exact INT4 model and to the 16-bit one. Numbers seen (output SQNR, 1 + 1 blocks, random
    weights, 64 image + 16 text tokens): w4a8 vs INT4 38 dB, w4a8 vs 16-bit 38 dB, INT4 vs 16-bit 37 dB; the 2 + 4
    block model: 33-35 dB each."""
    exact = load_nunchaku_transformer(tiny["files"]["small-int4"])
    w4a8 = load_nunchaku_transformer(tiny["files"]["small-int4"], precision="w4a8")
    ref = tiny["refs"]["small-int4"]
    proj_out = w4a8.single_transformer_blocks[0].proj_out
    assert isinstance(proj_out, torch.nn.Linear) and proj_out.weight.precision == "w4a8"
    assert proj_out.weight.shape == (256, 1280)
    for m in w4a8.modules():
        if isinstance(getattr(m, "weight", None), SVDQuantTensor):
            assert m.weight.precision == "w4a8"
            assert unpack_nibbles(m.weight.codes, signed=True).min() >= -7
    errs = []
    for seed in (0,):
        inputs = _flux_inputs(exact, seed=seed)
        with torch.inference_mode():
            y4, y8, y16 = (m(**inputs).sample for m in (exact, w4a8, ref))
        errs.append((sqnr_db(y4, y8), sqnr_db(y16, y8), sqnr_db(y16, y4)))
    print("w4a8 vs int4, w4a8 vs 16-bit, int4 vs 16-bit (dB):", errs)
    assert all(a > 25 and b > 25 for a, b, _ in errs), errs


def test_flux_pipeline_and_cli_generate(tiny, capsys):
    from diffusers import FluxPipeline

    from svdquant_ops.integrations import cli

    transformer = load_nunchaku_transformer(tiny["files"]["int4"])
    pipe = FluxPipeline.from_pretrained(tiny["base"], transformer=transformer, torch_dtype=torch.bfloat16)
    assert pipe.transformer is transformer  # the base's own transformer is not loaded
    with torch.inference_mode():
        image = pipe("a red fox", num_inference_steps=1, height=64, width=64, max_sequence_length=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0
    # the one-liner (on the built-in base pipeline: a base directory goes through the same from_pretrained call)
    out = tiny["work"] / "fox.png"
    rc = cli.main(["generate", str(tiny["files"]["int4"]), "--base", cli.BUILTIN, "--prompt", "a red fox",
                   "--steps", "1", "--out", str(out)])
    assert rc == 0 and out.is_file()
    rc = cli.main(["generate", str(tiny["files"]["int4"]), "--prompt", "x"])
    assert rc == 2 and "--base" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ errors
def _rewrite(src: Path, dst: Path, *, meta=None, drop=(), change=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    metadata.update(meta or {})
    for k, fn in (change or {}).items():
        tensors[k] = fn(tensors[k])
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_bad_files_fail_with_a_message_that_says_why(tiny, tmp_path):
    src = tiny["files"]["small-int4"]
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a Nunchaku SVDQuant checkpoint"):
        load_nunchaku_transformer(plain)
    with pytest.raises(ValueError, match="model_class 'NunchakuQwenImageTransformer2DModel' is not supported"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "a.safetensors",
                                           meta={"model_class": "NunchakuQwenImageTransformer2DModel"}))
    mx = {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": "ue8m0", "group_size": 32},
          "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "ue8m0", "group_size": 32}, "rank": 32}
    with pytest.raises(ValueError, match="quantization_config not supported.*group_size 32"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "b.safetensors", meta={"quantization_config":
                                                                                  json.dumps(mx)}))
    q = json.loads(load_meta(src)["quantization_config"]) | {"rank": 64}
    with pytest.raises(ValueError, match="rank 32 but quantization_config says rank 64"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "c.safetensors", meta={"quantization_config":
                                                                                  json.dumps(q)}))
    config = json.loads(load_meta(src)["config"]) | {"num_attention_heads": 2}  # hidden 128 instead of 256
    with pytest.raises(ValueError, match="does not match"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "d.safetensors", meta={"config": json.dumps(config)}))
    config = json.loads(load_meta(src)["config"]) | {"num_single_layers": 2}
    with pytest.raises(ValueError, match="missing quantized layer single_transformer_blocks.1"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "e.safetensors", meta={"config": json.dumps(config)}))
    key = "transformer_blocks.0.mlp_fc1.lora_up"
    with pytest.raises(ValueError, match=f"{key.rsplit('.', 1)[0]}.lora_up contains NaN"):
        load_nunchaku_transformer(_rewrite(src, tmp_path / "f.safetensors",
                                           change={key: lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))}))
    with pytest.raises(ValueError, match="precision must be None, 'int4'"):
        load_nunchaku_transformer(src, precision="nvfp4")


def test_bad_device_argument_is_named_not_blamed_on_the_file(tiny, tmp_path, monkeypatch):
    """device= is checked before the file is opened: a ValueError naming the argument and the accepted values,
    never 'not a safetensors file'; a real non-safetensors file still gets the file-format error."""
    src = tiny["files"]["small-int4"]
    for device, why in (("bogus", "is not a device"), ("meta", "meta device holds no weights"),
                        ("mps", "CPU and CUDA devices only")):
        with pytest.raises(ValueError, match=f"device='{device}'.*{why}.*expected 'cpu', 'cuda'") as info:
            load_nunchaku_transformer(src, device=device)
        assert not isinstance(info.value, N.NunchakuFormatError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="device=.*cuda.*: no CUDA GPU is available on this machine") as info:
            load_nunchaku_transformer(src, device=device)
        assert not isinstance(info.value, N.NunchakuFormatError)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(N.NunchakuFormatError, match="garbage.safetensors: not a safetensors file"):
        load_nunchaku_transformer(garbage)


def test_a_directory_is_not_a_missing_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}: is a directory; expected a Nunchaku .safetensors"):
        load_nunchaku_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_nunchaku_transformer(tmp_path / "none.safetensors")


@pytest.mark.parametrize("key", [
    "single_transformer_blocks.0.mlp_fc1.qweight",  # was a bare KeyError: 'qweight'
    "single_transformer_blocks.0.mlp_fc1.lora_down",  # was "has rank 0 but quantization_config says rank 32"
    "transformer_blocks.0.mlp_fc2.bias",  # was loaded silently (the bias became the GELU-shift compensation alone)
    "transformer_blocks.0.qkv_proj.smooth_orig",
    "transformer_blocks.0.norm1.linear.bias",  # AdaLN
    "single_transformer_blocks.0.norm.linear.wzeros",
])
def test_a_missing_layer_key_is_named_with_file_and_layer(tiny, tmp_path, key):
    """Every key a Nunchaku file holds per layer is required (the converter writes them all; Nunchaku's V2 loader
    loads strictly); the single block's out_proj bias may be absent (the tiny file has none: it loads)."""
    bad = _rewrite(tiny["files"]["small-int4"], tmp_path / "drop.safetensors", drop=(key,))
    layer = key.rsplit(".", 1)[0]
    with pytest.raises(N.NunchakuFormatError, match=f"drop.safetensors: .*layer {layer} is missing {key} ") as info:
        load_nunchaku_transformer(bad)
    assert str(bad) in str(info.value)
    assert "single_transformer_blocks.0.out_proj.bias" not in load_file(tiny["files"]["small-int4"])


@pytest.mark.parametrize("field,value,expected", [
    ("in_channels", "16", "in_channels '16' (str; expected a positive integer)"),
    ("num_layers", -1, "num_layers -1 (int; expected an integer >= 0)"),
    ("attention_head_dim", 64.0, "attention_head_dim 64.0 (float; expected a positive integer)"),
    ("axes_dims_rope", [16, "24", 24], "axes_dims_rope [16, '24', 24] (expected a list of positive integers)"),
])
def test_config_fields_of_the_wrong_type_are_named(tiny, tmp_path, field, value, expected):
    src = tiny["files"]["small-int4"]
    config = json.loads(load_meta(src)["config"]) | {field: value}
    bad = _rewrite(src, tmp_path / "cfg.safetensors", meta={"config": json.dumps(config)})
    with pytest.raises(N.NunchakuFormatError, match="cfg.safetensors: the 'config' metadata has invalid fields: "
                       + re.escape(expected)):
        load_nunchaku_transformer(bad)


@pytest.mark.parametrize("key", ["transformer_blocks.0.mlp_fc1.wscales", "transformer_blocks.0.norm1.linear.wscales"])
def test_scales_whose_dequantized_weight_overflows_are_refused(tiny, tmp_path, key):
    """A scale that is finite in bf16 but whose product with the largest code is not (an inf weight) is refused;
    finite scales, however large, are loaded as they are (no principled smaller bound)."""
    bad = _rewrite(tiny["files"]["small-int4"], tmp_path / "huge.safetensors",
                   change={key: lambda t: torch.where(t != 0, 1e38, 0.0).to(t.dtype)})  # AWQ padding stays 0
    with pytest.raises(N.NunchakuFormatError, match=f"{re.escape(key)}: scales out of range: the dequantized weight "
                       r".* reaches .*, past the largest bfloat16 value"):
        load_nunchaku_transformer(bad)


def load_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_pack_functions_are_inverses_on_random_layouts():
    """Every packing of nunchaku_pack against its inverse, on shapes with several tiles in each direction."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (256, 384), generator=g, dtype=torch.int8)
    assert torch.equal(P.unpack_codes(P.pack_codes(codes)).to(torch.int16), codes.to(torch.int16) & 0xF)
    s = torch.randn(384, 6, generator=g).to(torch.bfloat16)
    assert torch.equal(P.unpack_lanes(P.pack_lanes(s)), s)
    m = torch.rand(256, 24, generator=g).to(torch.float8_e4m3fn)
    assert torch.equal(_bits(P.unpack_micro_scales(P.pack_micro_scales(m))), _bits(m))
    d, u = torch.randn(384, 48, generator=g), torch.randn(256, 48, generator=g)
    assert torch.equal(P.unpack_down(P.pack_down(d)), d) and torch.equal(P.unpack_up(P.pack_up(u)), u)
    awq = torch.randint(0, 16, (96, 192), generator=g, dtype=torch.uint8)
    assert torch.equal(P.unpack_awq(P.pack_awq(awq)), awq)
    rows = torch.arange(12)
    assert P.interleave_rows(rows, 3).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert torch.equal(P.deinterleave_rows(P.interleave_rows(rows, 3), 3), rows)


def test_lora_on_an_imported_model_reaches_the_split_proj_out(tiny):
    """FLUX LoRAs target a single block's proj_out, which an INT4 import holds as SplitInputLinear: the adapter's A
    is split along the two parts (B·A·x = B·A₁·x₁ + B·A₂·x₂), fused into both branches; unload restores the layer
    bit for bit. Tolerance: the two parts sum their deltas in the model dtype (bf16), so a few bf16 ulps of the
    output's magnitude."""
    from svdquant_ops.lora import load_lora, unload_lora

    model = load_nunchaku_transformer(tiny["files"]["small-int4"])
    proj = model.single_transformer_blocks[0].proj_out
    assert isinstance(proj, N.SplitInputLinear)
    g = torch.Generator().manual_seed(3)
    n, k, r = proj.out_features, proj.in_features, 8
    a, b = torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) / 2
    name = "single_transformer_blocks.0.proj_out"
    x = torch.randn(2, 5, k, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        base = proj(x)
    counts = load_lora(model, {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}, "style", scale=0.5)
    assert counts == {"fused": 2, "side": 0}  # out_proj and mlp_fc2
    with torch.inference_mode():
        got = proj(x).double() - base.double()
    want = 0.5 * (x.double() @ a.double().T) @ b.double().T
    tol = 8 * 2.0**-8 * (base.double().abs() + want.abs()).max()
    assert (got - want).abs().max() < tol, ((got - want).abs().max(), tol)
    unload_lora(model)
    with torch.inference_mode():
        assert torch.equal(proj(x), base)


@pytest.mark.parametrize("name", ["small-int4", "small-nvfp4"])
def test_imported_model_fuses_qkv_back_into_one_linear(tiny, name):
    """Nunchaku stores q/k/v as one qkv_proj, which the importer splits into diffusers' to_q / to_k / to_v;
    fuse_qkv stacks them again: one GEMM each, outputs unchanged bit for bit."""
    from svdquant_ops import fuse_qkv

    model = load_nunchaku_transformer(tiny["files"][name])
    inputs = _flux_inputs(model)
    with torch.inference_mode():
        ref = model(**inputs).sample
        assert len(fuse_qkv(model).fused) == 2  # one double and one single block
        out = model(**inputs).sample
    assert torch.equal(out, ref)
    sb = model.single_transformer_blocks[0]
    assert sb.attn.to_qkv.weight.proj_down is sb.proj_mlp.weight.proj_down
