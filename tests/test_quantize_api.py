"""quantize_(model, SVDQuantConfig()) on real module trees: what gets quantized, how close, and bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

import svdquant_ops
from svdquant_ops import SVDQuantConfig, SVDQuantTensor, prepare_model, quantize_model, quantize_weight
from svdquant_ops.ops import quantized_linear
from svdquant_ops.quantize.calibration import record_inputs

from .builders import flux_inputs, sqnr_db, tiny_flux


@pytest.mark.parametrize("precision,min_sqnr", [("int4", 14.0), ("nvfp4", 14.0), ("w4a8", 14.0)])
def test_mlp_quantized_close_to_16bit_and_skips_unsupported(mlp, precision, min_sqnr, caplog):
    x = torch.randn(2, 7, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = mlp(x)
    fc3_weight = mlp.fc3.weight
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(mlp, SVDQuantConfig(precision=precision))
    assert isinstance(mlp.fc1.weight, SVDQuantTensor) and isinstance(mlp.fc2.weight, SVDQuantTensor)
    if precision != "nvfp4":  # 96 inputs: not a multiple of 64, untouched and logged
        assert mlp.fc3.weight is fc3_weight
        assert any("in_features=96 is not a multiple of 64" in r.message for r in caplog.records)
    else:  # 96 is a multiple of NVFP4's 16
        assert isinstance(mlp.fc3.weight, SVDQuantTensor)
    assert mlp.fc1.weight.precision == precision
    assert not mlp.fc1.bias.requires_grad
    with torch.inference_mode():
        out = mlp(x)
    s = sqnr_db(ref, out)
    print(f"MLP {precision} data-free SQNR vs bf16: {s:.1f} dB")
    assert s > min_sqnr


def test_quantize_is_idempotent(mlp):
    quantize_(mlp, SVDQuantConfig())
    w = mlp.fc1.weight
    quantize_(mlp, SVDQuantConfig(rank=16))
    assert mlp.fc1.weight is w


def test_quantize_model_twice_keeps_or_refuses():
    """A second quantize_model leaves quantized linears alone: with the same precision it quantizes only what the
    first left in 16-bit (the saved config lists what is 16-bit now); with another precision it says so instead of
    leaving a model whose weights and saved config disagree."""
    model = tiny_flux()
    quantize_model(model, weight_only=None)
    w = model.transformer_blocks[0].attn.to_q.weight
    assert "transformer_blocks.0.norm1.linear" in model.config.quantization_config.modules_to_not_convert
    quantize_model(model, rank=16)  # adds only the weight-only AdaLN linears: no SVDQuant option is ignored
    assert model.transformer_blocks[0].attn.to_q.weight is w
    assert "transformer_blocks.0.norm1.linear" not in model.config.quantization_config.modules_to_not_convert
    first = model.config.quantization_config
    with pytest.raises(ValueError, match="already quantized with precision 'int4'.*precision 'w4a8'"):
        quantize_model(model, precision="w4a8")
    assert model.config.quantization_config is first


def test_second_quantize_model_warns_against_the_first_calls_options():
    """The warning compares with what the quantized linears were made with (the first call), on a plain module and on
    a diffusers model (whose saved config each call rewrites), and says nothing when a call quantizes nothing."""
    import warnings

    def messages(model, **options):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_model(model, **options)
        return [str(w.message) for w in caught if "already quantized" in str(w.message)]

    plain = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)).bfloat16()
    quantize_model(plain, skip=["1"], rank=32)  # the first call keeps layer 1 in 16-bit
    assert messages(plain, rank=32) == []  # same options: layer 1 quantized, no warning
    assert messages(plain, rank=16) == []  # nothing left to quantize: nothing to warn about
    model = tiny_flux()  # a diffusers model: each call rewrites its saved config, the reference must not move
    steps = ((["*ff*"], 32, None), (["*ff.net.2*", "*ff_context*"], 16, "rank=16 (was 32)"),
             (["*ff_context*"], 16, "rank=16 (was 32)"), (None, 32, None))
    for i, (skip, rank, want) in enumerate(steps):
        got = messages(model, skip=skip, rank=rank)
        assert (len(got) == 1 and want in got[0]) if want else got == [], (i, got)
    assert messages(model, rank=16) == []  # nothing left to quantize


def test_quantize_model_keeps_empty_linears_and_warns_when_it_grows_the_model():
    """A linear with no outputs stays 16-bit (it computes an empty tensor, as before) instead of failing in its
    first forward; a model whose linears are too small for 4-bit codes plus the branch says it grew."""
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 0)).bfloat16()
    with pytest.warns(UserWarning, match=r"take more memory than the 16-bit ones .*rank-32 branch"):
        summary = quantize_model(model)
    assert summary.quantized == ["0"] and summary.kept == {"1": "empty weight (0 x 64)"}
    assert model(torch.randn(3, 128, dtype=torch.bfloat16)).shape == (3, 0)


def test_quantize_weight_names_what_is_wrong():
    huge = torch.randn(64, 64)
    huge[0, 0] = 3e38  # finite, but its square is not in fp32, where the decomposition works
    with pytest.raises(ValueError, match=r"too large for quantizing in fp32 \(max \|weight\| 3e\+38"):
        quantize_weight(huge.bfloat16())
    with pytest.raises(TypeError, match="weight must be torch.bfloat16, torch.float16, torch.float32.*float64"):
        quantize_weight(torch.randn(64, 64, dtype=torch.float64))
    # fp16 holds the weight but not its low-rank factors (|w| 6e4 over 64 columns): no smooth was given to blame
    with pytest.raises(ValueError, match=r"overflow torch.float16 \(max \|weight\| 6e\+04\); quantize a bfloat16"):
        quantize_weight(torch.full((64, 64), 60000.0).half())


def test_rank_improves_data_free_error():
    torch.manual_seed(0)
    # A weight with a strong low-rank part (as real layers have): the branch must capture it.
    w = (torch.randn(256, 8) @ torch.randn(8, 512) + 0.1 * torch.randn(256, 512)).to(torch.bfloat16)
    errs = []
    for rank in (0, 16, 32):
        qt = quantize_weight(w, "int4", rank)
        errs.append((qt.dequantize().float() - w.float()).norm().item())
    assert errs[0] > errs[1] > errs[2] * 0.999


def test_tiny_flux_one_line(caplog):
    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        ref = model(**inputs).sample
    prepare_model(model)  # records names and the model family's skip rules for the handler
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(model, SVDQuantConfig())
    quantized = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), SVDQuantTensor)}
    assert "transformer_blocks.0.attn.to_q" in quantized
    assert "transformer_blocks.1.ff.net.2" in quantized
    assert "single_transformer_blocks.1.proj_out" in quantized
    for kept in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
                 "time_text_embed.timestep_embedder.linear_1", "single_transformer_blocks.0.norm.linear"):
        assert kept not in quantized, kept
    assert any("keeping x_embedder in 16-bit" in r.message for r in caplog.records)
    with torch.inference_mode():
        out = model(**inputs).sample
    s = sqnr_db(ref, out)
    print(f"tiny FLUX int4 data-free SQNR vs bf16: {s:.1f} dB over {len(quantized)} quantized linears")
    assert s > 8.0


def test_explicit_skip_patterns_replace_the_family_rules():
    model = tiny_flux()
    prepare_model(model)
    quantize_(model, SVDQuantConfig(skip=["proj_out", "*.ff.*"]))
    assert not isinstance(model.proj_out.weight, SVDQuantTensor)
    assert not isinstance(model.transformer_blocks[0].ff.net[2].weight, SVDQuantTensor)
    assert isinstance(model.transformer_blocks[0].attn.to_k.weight, SVDQuantTensor)
    assert isinstance(model.context_embedder.weight, SVDQuantTensor)  # not kept: the patterns replace the rules


def test_fqn_to_config_mixes_with_torchao_configs(mlp):
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = mlp(x)
    quantize_(mlp, FqnToConfig({"fc1": SVDQuantConfig(), "fc2": Int8WeightOnlyConfig()}), filter_fn=None)
    assert isinstance(mlp.fc1.weight, SVDQuantTensor)
    assert not isinstance(mlp.fc2.weight, SVDQuantTensor)
    assert type(mlp.fc2.weight).__name__ == "Int8Tensor"
    with torch.inference_mode():
        assert sqnr_db(ref, mlp(x)) > 14.0


def test_tensor_repr_to_detach_clone_pin(mlp):
    quantize_(mlp, SVDQuantConfig(rank=20))
    w = mlp.fc1.weight
    r = repr(w)
    assert "SVDQuantTensor(precision='int4', shape=[512, 256], rank=32" in r  # 20 padded to 32
    assert w.shape == (512, 256) and w.dtype == torch.bfloat16
    for t in (w.detach(), w.clone()):
        assert isinstance(t, SVDQuantTensor) and torch.equal(t.codes, w.codes)
    assert w.is_pinned() is False
    h = w.to(torch.float16)
    assert h.dtype == torch.float16 and h.smooth.dtype == torch.float16 and torch.equal(h.codes, w.codes)
    assert torch.equal(h.scales, w.scales)  # scales kept bit-exact
    x = torch.randn(4, 256)
    # fp16 inputs round differently, so a few 4-bit codes may flip: compare accuracy, not bits.
    assert sqnr_db(quantized_linear(x.bfloat16(), w), quantized_linear(x.half(), h)) > 20
    mlp.to(torch.float32)
    assert mlp.fc1.weight.dtype == torch.float32 and isinstance(mlp.fc1.weight, SVDQuantTensor)
    with torch.inference_mode():
        assert mlp(torch.randn(2, 256)).dtype == torch.float32


def test_input_dtype_mismatch_is_a_clear_error(mlp):
    quantize_(mlp, SVDQuantConfig())
    with pytest.raises(TypeError, match="input dtype torch.float32 does not match the quantized weight's dtype"):
        mlp.fc1(torch.randn(2, 256))
    for width in (320, 255):  # not λ's shape or the op's multiple-of-64 rule: the layer's in_features
        with pytest.raises(ValueError, match=f"input has {width} features .* expects in_features=256"):
            mlp.fc1(torch.randn(2, width, dtype=torch.bfloat16))


def test_weight_only_input_width_is_a_clear_error():
    from svdquant_ops import W4A16Config

    m = torch.nn.Sequential(torch.nn.Linear(256, 64)).to(torch.bfloat16)
    quantize_(m, W4A16Config())
    with pytest.raises(ValueError, match="W4A16 linear: input has 128 features .* expects in_features=256"):
        m(torch.randn(2, 128, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs,msg",
    [(dict(precision="int8"), "precision must be one of"), (dict(rank=-1), "rank must be an integer >= 0"),
     (dict(rank=3.5), "rank must be an integer"), (dict(svd="fast"), "svd must be one of"),
     (dict(skip="proj_out"), "skip must be None .* or a list")],
)
def test_bad_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SVDQuantConfig(**kwargs)


class _Pipeline:  # what a diffusers pipeline looks like to the check: not a module, has components
    components: dict = {}


@pytest.mark.parametrize(
    "call,error,msg",
    [(lambda: quantize_model(None), TypeError, "model must be a torch.nn.Module, got NoneType"),
     (lambda: quantize_model(_Pipeline()), TypeError, r"got _Pipeline; pass its denoiser \(pipe.transformer"),
     (lambda: svdquant_ops.calibrate(torch.zeros(3)).__enter__(), TypeError, "model must be a torch.nn.Module"),
     (lambda: svdquant_ops.calibrate(torch.nn.Linear(64, 64), max_rows=0.5).__enter__(), ValueError,
      "max_rows must be an integer >= 1"),
     (lambda: svdquant_ops.calibrate(torch.nn.Linear(64, 64), hessian="yes").__enter__(), ValueError,
      "hessian must be True or False"),
     (lambda: quantize_weight(torch.randn(64, 128), "w4a8", "8"), ValueError, "rank must be an integer >= 0, got '8'"),
     (lambda: svdquant_ops.save_file([1], "x.safetensors"), TypeError, "state_dict must be a dict of str -> "
      "torch.Tensor .* got list"),
     (lambda: svdquant_ops.save_file({"a": 1}, "x.safetensors"), TypeError, "got 'a': int"),
     (lambda: svdquant_ops.save_file({"a": torch.zeros(1)}, "x.safetensors", {"v": 1}), TypeError,
      "metadata must be a dict of str -> str"),
     (lambda: svdquant_ops.save_file({"weight": quantize_weight(torch.randn(64, 128), "int4", 8)}, "x.safetensors"),
      ValueError, r"'weight' needs a key of the form '<module>.<parameter>'")],
)
def test_bad_arguments_are_named(call, error, msg):
    with pytest.raises(error, match=msg):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weight_is_refused(mlp, bad):
    with torch.no_grad():
        mlp.fc2.weight[3, 5] = bad
    prepare_model(mlp)
    with pytest.raises(ValueError, match="cannot quantize fc2: weight contains NaN or Inf"):
        quantize_(mlp, SVDQuantConfig())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a CUDA GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error():
    model = tiny_flux()  # its AdaLN linears (weight-only) come before the first SVDQuant linear
    with pytest.raises(ValueError, match="SVDQuantConfig.device='cuda': no CUDA GPU is available"):
        quantize_model(model, device="cuda")
    assert not any(isinstance(p, (SVDQuantTensor, svdquant_ops.W4A16Tensor)) for p in model.parameters())


def test_a_nan_weight_leaves_the_model_unquantized(mlp):
    """Every weight is checked before any is replaced: NaN in fc2 does not leave fc1 quantized."""
    with torch.no_grad():
        mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="cannot quantize fc2: weight contains NaN or Inf"):
        quantize_model(mlp)
    assert not any(isinstance(m.weight, SVDQuantTensor) for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    assert "(" not in str(quantize_model(torch.nn.Sequential()))  # no ratio of 0 bytes ("nanx")
    bare = torch.nn.Linear(256, 256).to(torch.bfloat16)
    with torch.no_grad():
        bare.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot quantize Linear\(256->256\): weight contains NaN"):
        quantize_model(bare)


def test_layers_quantize_skips_are_not_checked():
    """torchao's quantize_ leaves MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) alone, and so
    does the check before it: a NaN there is the model's, not a reason to refuse the rest."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(256, 4, batch_first=True)
            self.fc = torch.nn.Linear(256, 256)

    m = Block().to(torch.bfloat16)
    with torch.no_grad():
        m.attn.out_proj.weight[0, 0] = float("nan")
    summary = quantize_model(m)
    assert summary.quantized == ["fc"] and "attn.out_proj" in summary.kept


def test_meta_weights_are_refused_by_name():
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(256, 512)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="cannot quantize 0: weight is on the meta device"):
        quantize_model(m)


def test_corrupt_tensor_parts_are_refused(mlp):
    quantize_(mlp, SVDQuantConfig())
    w = mlp.fc1.weight
    with pytest.raises(ValueError, match="scales must have shape"):
        SVDQuantTensor(w.codes, w.scales[:, :1], w.smooth, w.proj_down, w.proj_up, "int4", False, 1, w.dtype)
    with pytest.raises(ValueError, match="layout_version must be one of"):
        SVDQuantTensor(w.codes, w.scales, w.smooth, w.proj_down, w.proj_up, "int4", False, 99, w.dtype)
    bad = w.smooth.clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="smooth must be > 0"):
        SVDQuantTensor(w.codes, w.scales, bad, w.proj_down, w.proj_up, "int4", False, 1, w.dtype).validate()


def test_svdquant_tensor_exported():
    assert svdquant_ops.SVDQuantTensor is SVDQuantTensor


def test_data_free_weight_is_close_and_keeps_its_rank():
    """The effective weight of a data-free int4 quantization is close to w, and the stored rank is the one asked for
    (16 is already a multiple of 16: no padding). These were the assertions of 0.1.0's
    test_dequantize_matches_layer_math, whose new version (test_quantizers.py) uses a different weight."""
    torch.manual_seed(1)
    w = torch.randn(64, 128).to(torch.bfloat16)
    for svd in ("exact", "lowrank"):
        qt = quantize_weight(w, "int4", 16, svd=svd)
        assert (qt.dequantize().float() - w.float()).norm() / w.float().norm() < 0.15
        assert qt.rank == 16


def test_calibrate_checks_storage_at_the_call():
    """``storage`` is "auto", "cpu" or a CUDA device this machine has; anything else is refused by ``calibrate(...)``
    itself, naming ``storage`` and what it accepts, not by torch inside the first forward."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    for bad, why in (("gpu", "is not a device"), ("CPU", "is not a device"), ("", "is not a device"),
                     ("cuda:x", "is not a device"), ("meta", "the meta device holds no weights"),
                     ("mps", "CPU and CUDA devices only")):
        with pytest.raises(ValueError, match=rf"calibrate: storage='{bad}'.*{why}.*expected 'auto'.*'cpu'.*'cuda'"):
            svdquant_ops.calibrate(model, storage=bad)  # at the call, before any `with`
    for bad in (None, 0, True):
        with pytest.raises(TypeError, match=rf"calibrate: storage={bad!r} is not a device name.*expected 'auto'"):
            svdquant_ops.calibrate(model, storage=bad)
    # the lower-level recorder checks the same when its block is entered
    with pytest.raises(ValueError, match=r"record_inputs: storage='gpu' is not a device"):
        with record_inputs(model, storage="gpu"):
            pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"storage='cuda:{n}': this machine has {n} CUDA GPU"):
            svdquant_ops.calibrate(model, storage=f"cuda:{n}")
    else:
        for cuda in ("cuda", "cuda:0", torch.device("cuda")):
            with pytest.raises(ValueError, match=r"calibrate: storage=.*cuda.*: no CUDA GPU is available"):
                svdquant_ops.calibrate(model, storage=cuda)
    for good in ("auto", "cpu", torch.device("cpu")):
        with svdquant_ops.calibrate(model, storage=good) as session:
            model(torch.randn(4, 64))
        assert [r.rows.device.type for r in session.records] == ["cpu"]
