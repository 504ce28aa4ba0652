"""Every save/load path reproduces the quantized model's outputs bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchao.quantization import quantize_

import svdquant_ops
from svdquant_ops import SVDQuantConfig, SVDQuantTensor, W4A16Config, W4A16Tensor

from .builders import MLP, flux_inputs, tiny_flux


def _quantized_mlp(precision="int4", seed=0):
    torch.manual_seed(seed)
    m = MLP().to(torch.bfloat16).eval()
    quantize_(m, W4A16Config() if precision == "w4a16" else SVDQuantConfig(precision=precision))
    return m


def _run(model, x):
    with torch.inference_mode():
        return model(x)


def _assert_same_tensors(a, b):
    assert type(b) is type(a)
    for name in a.tensor_data_names + a.optional_tensor_data_names:
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8) if ta.dtype == torch.float8_e4m3fn
                                                        else ta, tb.view(torch.uint8) if tb.dtype == torch.float8_e4m3fn
                                                        else tb), name
    for name in a.tensor_attribute_names:
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8", "w4a16"])
def test_torch_save_load_weights_only(tmp_path, precision):
    model = _quantized_mlp(precision)
    x = torch.randn(3, 256).to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    _assert_same_tensors(model.fc1.weight, sd["fc1.weight"])
    # (a) load into a model quantized the same way (copy_ into the existing subclass)
    other = _quantized_mlp(precision, seed=1)
    other.load_state_dict(sd)
    assert torch.equal(_run(other, x), _run(model, x))
    # (b) assign into a plain 16-bit model
    plain = MLP().to(torch.bfloat16).eval()
    plain.load_state_dict(sd, assign=True)
    assert type(plain.fc1.weight) is type(model.fc1.weight)
    assert torch.equal(_run(plain, x), _run(model, x))


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8", "w4a16"])
def test_safetensors_round_trip(tmp_path, precision):
    model = _quantized_mlp(precision)
    x = torch.randn(2, 5, 256).to(torch.bfloat16)
    path = tmp_path / "model.safetensors"
    svdquant_ops.save_file(model.state_dict(), path)
    sd = svdquant_ops.load_file(path)
    _assert_same_tensors(model.fc2.weight, sd["fc2.weight"])
    plain = MLP().to(torch.bfloat16).eval()
    plain.load_state_dict(sd, assign=True)
    assert torch.equal(_run(plain, x), _run(model, x))


def test_w4a16_corrupt_parts_are_refused(tmp_path):
    model = _quantized_mlp("w4a16")
    assert isinstance(model.fc1.weight, W4A16Tensor)
    sd = model.state_dict()
    bad = sd["fc1.weight"]
    bad.zeros[0, 0] = float("nan")
    svdquant_ops.save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="W4A16Tensor: zeros contains NaN"):
        svdquant_ops.load_file(tmp_path / "bad.safetensors")
    w = model.fc2.weight
    with pytest.raises(ValueError, match=r"W4A16Tensor: scales must have shape \[96, 8\]"):
        W4A16Tensor(w.codes, w.scales[:, :2], w.zeros, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="zeros must have the dtype of scales"):
        W4A16Tensor(w.codes, w.scales, w.zeros.float(), 1, torch.bfloat16)
    with pytest.raises(TypeError, match="cannot copy a SVDQuantTensor into a W4A16Tensor"):
        w.copy_(_quantized_mlp("int4").fc2.weight)
    with pytest.raises(ValueError, match="part scales has dtype torch.float16 in the state dict but torch.bfloat16"):
        w.copy_(W4A16Tensor(w.codes, w.scales.half(), w.zeros.half(), 1, torch.bfloat16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        W4A16Tensor.from_float(torch.full((4, 64), float("nan")))
    with pytest.raises(ValueError, match="scales and zeros are required"):
        W4A16Tensor(w.codes, None, None, 1, torch.bfloat16)


def test_safetensors_corrupt_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _quantized_mlp()
    path = tmp_path / "model.safetensors"
    svdquant_ops.save_file(model.state_dict(), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # truncated scales: the constructor's shape check names the part
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith("_weight_scales"))
    bad[key] = bad[key][:, :1].contiguous()
    save_file(bad, str(tmp_path / "bad1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="scales must have shape"):
        svdquant_ops.load_file(tmp_path / "bad1.safetensors")
    # NaN in a 16-bit part: caught by validate()
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith("_weight_proj_up"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="proj_up contains NaN or Inf"):
        svdquant_ops.load_file(tmp_path / "bad2.safetensors")
    # plain safetensors without our metadata
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a quantized state dict"):
        svdquant_ops.load_file(tmp_path / "plain.safetensors")


def test_unsigned_bias_correction_round_trips(tmp_path):
    from svdquant_ops import prepare_model

    model = tiny_flux()
    prepare_model(model)  # marks ff.net.2 as GELU-fed: unsigned INT4 with a bias correction
    quantize_(model, SVDQuantConfig())
    w = model.transformer_blocks[0].ff.net[2].weight
    assert w.act_unsigned and w.bias_correction is not None
    svdquant_ops.save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = tiny_flux(seed=1)
    fresh.load_state_dict(svdquant_ops.load_file(tmp_path / "m.safetensors"), assign=True)
    _assert_same_tensors(w, fresh.transformer_blocks[0].ff.net[2].weight)
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(fresh(**inputs).sample, model(**inputs).sample)


def test_w4a8_safetensors_checks_multipliers_and_channel_scale(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _quantized_mlp("w4a8")
    w = model.fc1.weight
    assert w.precision == "w4a8" and w.scales.dtype == torch.uint8 and w.global_scale.shape == (512,)
    assert not w.act_unsigned and w.bias_correction is None
    h = w.to(torch.float16)  # the model dtype changes; codes, multipliers and channel scales stay exact
    assert h.scales.dtype == torch.uint8 and torch.equal(h.scales, w.scales) and torch.equal(h.global_scale, w.global_scale)
    path = tmp_path / "model.safetensors"
    svdquant_ops.save_file(model.state_dict(), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cases = [("_weight_scales", lambda t: t.index_fill_(1, torch.tensor([0]), 0), r"scales \(W4A8 multipliers\) "
              r"must be in \[1, 18\], found 0"),
             ("_weight_scales", lambda t: t.index_fill_(1, torch.tensor([0]), 19), "must be in .1, 18., found 19"),
             ("_weight_codes", lambda t: t.index_fill_(1, torch.tensor([5]), 0x80), r"W4A8 codes must be in \[-7, 7\], "
              "found -8"),
             ("_weight_scales", lambda t: t.to(torch.bfloat16), "scales must have shape .* and dtype in "
              r"\['torch.uint8'\]"),
             ("_weight_global_scale", lambda t: t.index_fill_(0, torch.tensor([3]), -1.0), "global_scale .* must be >= 0"),
             ("_weight_global_scale", lambda t: t.index_fill_(0, torch.tensor([3]), float("inf")), "global_scale contains NaN"),
             ("_weight_global_scale", lambda t: t[:1].clone(), r"global_scale must have shape \[512\] and dtype torch.float32"),
             ("_weight_global_scale", lambda t: t.half(), r"global_scale must have shape \[512\] and dtype torch.float32")]
    for i, (suffix, corrupt, msg) in enumerate(cases):
        bad = dict(tensors)
        key = next(k for k in bad if k.startswith("fc1") and k.endswith(suffix))
        bad[key] = corrupt(bad[key].clone()).contiguous()
        save_file(bad, str(tmp_path / f"bad{i}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=msg):
            svdquant_ops.load_file(tmp_path / f"bad{i}.safetensors")
    # A missing channel scale is refused at construction.
    with pytest.raises(ValueError, match="global_scale is required for precisions 'nvfp4' and 'w4a8'"):
        SVDQuantTensor(w.codes, w.scales, w.smooth, w.proj_down, w.proj_up, "w4a8", False, 1, w.dtype)


def test_safetensors_unreadable_files_name_the_file(tmp_path):
    """Files load_file cannot read at all: the error names the file (safetensors' own header errors do not)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with pytest.raises(IsADirectoryError, match="is a directory"):
        svdquant_ops.load_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        svdquant_ops.load_file(tmp_path / "missing.safetensors")
    for name, data in (("empty", b""), ("junk", b"not a safetensors file at all")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: cannot read it as a safetensors file"):
            svdquant_ops.load_file(tmp_path / name)
    # metadata that lost one weight's entry (JSON null where a string is expected)
    path = tmp_path / "model.safetensors"
    svdquant_ops.save_file(_quantized_mlp().state_dict(), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta[next(k for k in meta if k.endswith(".weight"))]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="bad.safetensors: corrupt quantized checkpoint"):
        svdquant_ops.load_file(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("precision,part", [("int4", "proj_down"), ("int4", "proj_up"), ("int4", "smooth"),
                                            ("int4", "scales"), ("w4a16", "scales"), ("w4a16", "zeros")])
def test_load_state_dict_checks_values(precision, part):
    """load_state_dict into a quantized model checks the values load_file checks, before writing: NaN in a
    low-rank factor used to load silently and make every output NaN."""
    import copy

    dst, src = _quantized_mlp(precision, seed=1), _quantized_mlp(precision, seed=0)
    before = copy.deepcopy(dst.fc1.weight)
    sd = copy.deepcopy(src.state_dict())
    t = getattr(sd["fc1.weight"], part)
    t.view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match=f"fc1.weight.*{part} contains NaN or Inf"):
        dst.load_state_dict(sd)
    _assert_same_tensors(before, dst.fc1.weight)  # nothing of the refused weight was written


def test_setting_data_takes_the_parts_or_refuses():
    """`weight.data = value` (torch's setter replaces only a wrapper's metadata): a weight of the same format is
    taken by its parts; anything else is refused instead of a layer that reports one weight and computes with
    another."""
    dst, src = _quantized_mlp(seed=1), _quantized_mlp(seed=0)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    for bad in (torch.randn(8, 8, dtype=torch.bfloat16), torch.randn(dst.fc1.weight.shape)):
        with pytest.raises(TypeError, match="SVDQuantTensor.data = ...: expected SVDQuantTensor of shape"):
            dst.fc1.weight.data = bad
    with pytest.raises(TypeError, match=r"expected SVDQuantTensor of shape \[512, 256\], got NoneType; "):
        dst.fc1.weight.data = None
    with pytest.raises(TypeError, match="precision differs"):
        dst.fc1.weight.data = _quantized_mlp("nvfp4").fc1.weight
    for name in ("fc1", "fc2", "fc3"):  # fc3 stays 16-bit (96 inputs)
        getattr(dst, name).weight.data = getattr(src, name).weight
        getattr(dst, name).bias.data = getattr(src, name).bias
    assert torch.equal(_run(dst, x), _run(src, x))
    assert dst.fc1.weight.codes is src.fc1.weight.codes and type(dst.fc1.weight.data) is SVDQuantTensor


def test_loading_into_a_differently_quantized_model_names_the_difference():
    src = _quantized_mlp("int4")
    dst = _quantized_mlp("nvfp4")
    with pytest.raises(RuntimeError, match="precision differs"):  # load_state_dict wraps the ValueError
        dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("safe", [True, False])
def test_diffusers_from_pretrained_and_save_pretrained(tmp_path, safe):
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    tiny_flux().save_pretrained(tmp_path / "bf16")
    qcfg = TorchAoConfig(SVDQuantConfig(), modules_to_not_convert=["x_embedder", "proj_out", "norm_out"])
    q = FluxTransformer2DModel.from_pretrained(tmp_path / "bf16", quantization_config=qcfg,
                                               torch_dtype=torch.bfloat16).eval()
    assert isinstance(q.transformer_blocks[0].attn.to_q.weight, SVDQuantTensor)
    assert not isinstance(q.proj_out.weight, SVDQuantTensor)
    # Quantize-on-load equals quantize_ on the same weights in memory (deterministic, same handler).
    ref_model = tiny_flux()
    skip = ("x_embedder", "proj_out", "norm_out")  # diffusers' rule: "<key>." occurs in "<module>.weight"
    quantize_(ref_model, SVDQuantConfig(), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear)
              and not any(k + "." in n + ".weight" for k in skip))
    inputs = flux_inputs()
    with torch.inference_mode():
        out = q(**inputs).sample
        assert torch.equal(out, ref_model(**inputs).sample)

    q.save_pretrained(tmp_path / "q", safe_serialization=safe)
    files = {p.name for p in (tmp_path / "q").iterdir()}
    assert ("diffusion_pytorch_model.safetensors" in files) == safe
    r = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16).eval()
    assert isinstance(r.transformer_blocks[0].attn.to_q.weight, SVDQuantTensor)
    _assert_same_tensors(q.transformer_blocks[1].ff.net[2].weight, r.transformer_blocks[1].ff.net[2].weight)
    with torch.inference_mode():
        assert torch.equal(r(**inputs).sample, out)


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fmt", ["safetensors", "pickle", "pickle-full"])
def test_layout1_checkpoints_still_load_bit_exact(fmt):
    """Checkpoints of svdquant_ops 0.1.0 (fields qweight / wscales / wglobal) load through the key map and compute
    the outputs 0.1.0 computed, bit for bit."""
    from safetensors.torch import load_file

    if fmt == "safetensors":
        sd = svdquant_ops.load_file(FIXTURES / "layout1.safetensors")
    else:  # weights_only=False: the full unpickler imports the 0.1.0 module path svdquant_ops.tensor
        sd = torch.load(FIXTURES / "layout1.pt", weights_only=fmt == "pickle")
    expected = load_file(str(FIXTURES / "layout1_expected.safetensors"))
    for precision in ("int4", "nvfp4", "w4a8"):
        w = sd[f"{precision}.weight"]
        assert isinstance(w, SVDQuantTensor) and w.precision == precision and w.layout_version == 1
        assert w.codes.shape == (32, 64) and w.codes.dtype == torch.uint8
        assert not hasattr(w, "qweight") and not hasattr(w, "wscales")
        assert (w.global_scale is None) == (precision == "int4")
        y = torch.nn.functional.linear(expected["x"], w, sd[f"{precision}.bias"])
        assert torch.equal(y, expected[f"{precision}.y"]), precision
    assert sd["int4.weight"].act_unsigned and sd["int4.weight"].bias_correction is not None
    assert sd["nvfp4.weight"].global_scale.shape == (32,)


def test_checkpoint_keys_use_the_field_names(tmp_path):
    from safetensors import safe_open

    model = _quantized_mlp("w4a8")
    svdquant_ops.save_file(model.state_dict(), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = {k for k in f.keys() if k.startswith("fc1.")}
    assert keys == {"fc1.bias", "fc1._weight_codes", "fc1._weight_scales", "fc1._weight_global_scale",
                    "fc1._weight_smooth", "fc1._weight_proj_down", "fc1._weight_proj_up"}


@pytest.mark.parametrize("safe", [True, False])
def test_quantize_model_then_save_pretrained_round_trips(tmp_path, safe):
    """A model quantized in memory (quantize_model) saves with diffusers' own save_pretrained and loads back with
    from_pretrained, bit for bit, with the same linears 4-bit and 16-bit."""
    from diffusers import FluxTransformer2DModel

    model = tiny_flux()
    summary = svdquant_ops.quantize_model(model, precision="w4a8", rank=8)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert isinstance(module.weight, SVDQuantTensor) == (name in summary.quantized), name
    _assert_same_tensors(model.single_transformer_blocks[0].proj_out.weight,
                         loaded.single_transformer_blocks[0].proj_out.weight)
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("part,corrupt,msg", [
    ("proj_up", lambda t: torch.full_like(t, float("inf")), "proj_up contains NaN or Inf"),
    ("smooth", lambda t: torch.full_like(t, float("nan")), "smooth contains NaN or Inf"),
    ("bias_correction", lambda t: t[:1].clone(), r"bias_correction must have shape \[128\]"),
    ("bias_correction", lambda t: t.bfloat16(), r"bias_correction must have shape \[128\] and dtype torch.float32"),
])
def test_from_pretrained_refuses_a_corrupt_weight(tmp_path, safe, part, corrupt, msg):
    """diffusers' from_pretrained runs the value and shape checks load_file runs, for safetensors and .bin files:
    a corrupt part does not load (it would give a broadcast bias or non-finite outputs)."""
    from diffusers import FluxTransformer2DModel

    model = tiny_flux()
    svdquant_ops.quantize_model(model)  # int4 with act_unsigned GELU-fed layers: ff.net.2 has a bias_correction
    model.save_pretrained(tmp_path, safe_serialization=safe)
    key = "transformer_blocks.0.ff.net.2.weight"
    if safe:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = next(tmp_path.glob("*.safetensors"))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        name = key.replace(".weight", f"._weight_{part}")
        tensors[name] = corrupt(tensors[name]).contiguous()
        save_file(tensors, str(path), metadata=meta)
    else:
        path = next(tmp_path.glob("*.bin"))
        sd = torch.load(path, weights_only=True)
        setattr(sd[key], part, corrupt(getattr(sd[key], part)))
        torch.save(sd, path)
    with pytest.raises((ValueError, OSError)) as info:
        FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    chain, e = [], info.value
    while e is not None:  # diffusers turns a failing torch.load into an OSError, ours in its chain
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, ValueError) and re.search(msg, str(e)) for e in chain), chain
