"""The calibrated algorithm: the paper's ablation ordering on planted outliers, rank sweep, calibrated vs
data-free, GPTQ, fast vs exact SVD, grouping, determinism and bad input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, SVDQuantTensor, calibrate
from svdquant_ops import quantizers as q
from svdquant_ops.quantize.calibration import RECORD_ATTR
from svdquant_ops.quantize.gptq import gptq_quantize
from svdquant_ops.quantize.solve import smoothing_candidates, solve_group

from .builders import flux_inputs, sqnr_db, tiny_flux

K, N = 256, 256


def _outlier_data(seed: int, rows: int):
    """Diffusion-like activations: Gaussian with a few channels 20-100x larger (fixed channels across seeds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    gains = torch.tensor([20.0, 40.0, 70.0, 100.0])
    x[:, [3, 50, 121, 200]] *= gains
    return x.to(torch.bfloat16)


@pytest.fixture(scope="module")
def layer_and_data():
    torch.manual_seed(0)
    layer = nn.Linear(K, N).to(torch.bfloat16)
    calib = [_outlier_data(s, 128) for s in range(4)]  # 512 rows over 4 calls
    test = _outlier_data(100, 512)
    with torch.no_grad():
        ref = layer(test)
    return layer, calib, test, ref


def _quantized_error(layer_and_data, calibrated=True, **cfg) -> float:
    layer, calib, test, ref = layer_and_data
    q = copy.deepcopy(layer)
    if calibrated:
        with calibrate(q):
            with torch.no_grad():
                for x in calib:
                    q(x)
    quantize_(q, SVDQuantConfig(**cfg))
    assert isinstance(q.weight, SVDQuantTensor)
    with torch.inference_mode():
        return float((q(test).double() - ref.double()).pow(2).sum())


def test_smoothing_grid_has_39_candidates():
    cands = smoothing_candidates(20)
    assert len(cands) == 39 and cands[0] == (0.0, 0.0)
    assert (0.05, 0.0) in cands and (0.95, 0.0) in cands and (0.05, 0.95) in cands and (0.5, 0.5) in cands


def test_ablation_ordering_matches_paper(layer_and_data):
    naive = _quantized_error(layer_and_data, rank=0, smooth_grid=0)
    smooth_only = _quantized_error(layer_and_data, rank=0)
    lowrank_only = _quantized_error(layer_and_data, rank=32, smooth_grid=0)
    full = _quantized_error(layer_and_data, rank=32)
    print(f"\noutput squared error: naive {naive:.4g}, smoothing only {smooth_only:.4g}, "
          f"low-rank only {lowrank_only:.4g}, SVDQuant {full:.4g}")
    assert full < smooth_only
    assert full < lowrank_only
    assert smooth_only < naive and lowrank_only < naive


def test_error_falls_as_rank_grows(layer_and_data):
    errs = [_quantized_error(layer_and_data, rank=r) for r in (0, 16, 32, 64)]
    print("\nrank 0/16/32/64 errors:", [f"{e:.4g}" for e in errs])
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_calibrated_beats_data_free(layer_and_data):
    data_free = _quantized_error(layer_and_data, calibrated=False)
    calibrated = _quantized_error(layer_and_data)
    print(f"\ndata-free {data_free:.4g} vs calibrated {calibrated:.4g}")
    assert calibrated < data_free


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_gptq_halves_the_weight_error_it_optimizes(precision):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)
    mix = torch.randn(256, 256, generator=g) * 0.3 + torch.eye(256)
    x_cal, x_test = torch.randn(2048, 256, generator=g) @ mix, torch.randn(1024, 256, generator=g) @ mix
    codes, scales, gsc = q.rtn_weight(w, precision, torch.float32)
    rtn = q.dequantize(codes, scales, precision, gsc)
    g_codes, g_scales = gptq_quantize(w, x_cal.T @ x_cal, precision, scales, gsc)
    if precision != "w4a8":
        assert g_scales is scales  # int4 / nvfp4: RTN's scales are kept
    gptq = q.dequantize(g_codes, g_scales, precision, gsc)
    e_rtn, e_gptq = ((x_test @ (w - rtn).T) ** 2).sum(), ((x_test @ (w - gptq).T) ** 2).sum()
    assert e_gptq < 0.7 * e_rtn  # held-out inputs: ~0.5x in practice


def test_gptq_end_to_end():
    """Through calibrate + quantize_: GPTQ with a Hessian over all calibration rows (hessian=True) against RTN."""
    torch.manual_seed(0)
    layer = nn.Linear(K, N).to(torch.bfloat16)
    calib = [_outlier_data(s, 128) for s in range(32)]  # 4096 rows = 16 per input feature
    test = _outlier_data(100, 1024)
    with torch.no_grad():
        ref = layer(test)
    errs = {}
    for name, cfg in (("rtn", {}), ("gptq", dict(gptq=True)), ("refit", dict(gptq=True, refit_after_gptq=True))):
        q = copy.deepcopy(layer)
        with calibrate(q, max_rows=512, hessian=True):
            with torch.no_grad():
                for x in calib:
                    q(x)
        quantize_(q, SVDQuantConfig(**cfg))
        with torch.inference_mode():
            errs[name] = float((q(test).double() - ref.double()).pow(2).sum())
    print(f"\nW4A4 held-out error: RTN {errs['rtn']:.4g}, GPTQ {errs['gptq']:.4g}, "
          f"GPTQ + branch refit {errs['refit']:.4g}")
    # On this layer 4-bit activation noise dominates, so GPTQ's halving of the weight term (test above) moves
    # the total by ~0.2% (measured 1023.7 -> 1025.3 -> 1020.9); a broken GPTQ is far off.
    assert errs["gptq"] < 1.02 * errs["rtn"]
    assert errs["refit"] <= errs["gptq"]


def test_gptq_end_to_end_w4a8():
    """W4A8 through calibrate + quantize_ (s from RTN, multipliers picked during the sweep). The inputs are
    correlated across channels (GPTQ has nothing to exploit in independent channels: on _outlier_data it moves
    the error by < 1% either way, for int4 too) and have a few 10x channels; 8-bit activations leave the weight
    error dominant, so GPTQ must not do worse than RTN on held-out inputs (measured: ~15% lower)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)

    def data(seed, rows):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) @ mix
        x[:, [3, 50, 121, 200]] *= 10
        return x.to(torch.bfloat16)

    torch.manual_seed(0)
    layer = nn.Linear(K, N).to(torch.bfloat16)
    calib, test = [data(s, 128) for s in range(32)], data(100, 1024)
    ref = test.double() @ layer.weight.double().T + layer.bias.double()
    errs = {}
    for name, cfg in (("rtn", {}), ("gptq", dict(gptq=True))):
        qm = copy.deepcopy(layer)
        with calibrate(qm, max_rows=512, hessian=True):
            with torch.no_grad():
                for x in calib:
                    qm(x)
        quantize_(qm, SVDQuantConfig(precision="w4a8", **cfg))
        assert qm.weight.precision == "w4a8" and int(qm.weight.scales.max()) <= 18
        with torch.inference_mode():
            errs[name] = float((qm(test).double() - ref).pow(2).sum())
    print(f"\nW4A8 held-out error: RTN {errs['rtn']:.4g}, GPTQ {errs['gptq']:.4g}")
    assert errs["gptq"] <= errs["rtn"]


def test_w4a8_beats_int4_with_activation_outliers():
    """A layer whose inputs have a few channels 30x larger than the rest: with the whole calibrated algorithm
    (smoothing, low-rank branch), 8-bit per-token activations give a smaller output error than 4-bit groups."""
    torch.manual_seed(0)
    layer = nn.Linear(K, N).to(torch.bfloat16)

    def data(seed, rows):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, K, generator=g)
        x[:, [7, 64, 130, 250]] *= 30.0
        return x.to(torch.bfloat16)

    calib, test = [data(s, 128) for s in range(4)], data(100, 512)
    ref = test.double() @ layer.weight.double().T + layer.bias.double()  # the fp32 (exact) layer
    rel = {}
    for precision in ("int4", "w4a8"):
        qm = copy.deepcopy(layer)
        with calibrate(qm):
            with torch.no_grad():
                for x in calib:
                    qm(x)
        quantize_(qm, SVDQuantConfig(precision=precision))
        with torch.inference_mode():
            rel[precision] = float((qm(test).double() - ref).norm() / ref.norm())
    print(f"\nrelative output error vs the fp32 layer, 30x activation outliers: int4 {rel['int4']:.4f}, "
          f"w4a8 {rel['w4a8']:.4f}")
    assert rel["w4a8"] < rel["int4"]


def test_w4a8_calibrated_tiny_flux_groups_and_no_unsigned_activations():
    """Calibrated w4a8 on tiny FLUX: shared-input groups get one λ, q/k/v share a down projection and each member
    keeps its own rows of the per-channel scale; GELU-fed layers (unsigned INT4 under "auto") stay signed, since
    w4a8 has no unsigned variant."""
    model = tiny_flux()
    inputs = flux_inputs(seed=9)
    with torch.no_grad():
        ref = model(**inputs).sample
    with calibrate(model, max_rows=128):
        with torch.no_grad():
            model(**flux_inputs())
    quantize_(model, SVDQuantConfig(precision="w4a8", smooth_grid=4, lowrank_iters=1))
    attn = model.transformer_blocks[0].attn
    q, k, v = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    assert q.precision == "w4a8" and torch.equal(q.smooth, k.smooth) and torch.equal(q.proj_down, v.proj_down)
    assert q.global_scale.shape == (q.shape[0],) and q.scales.dtype == torch.uint8
    assert not torch.equal(q.global_scale, k.global_scale)  # its own rows of the stacked q/k/v scale, not a shared copy
    ff2 = model.transformer_blocks[0].ff.net[2].weight
    assert isinstance(ff2, SVDQuantTensor) and ff2.precision == "w4a8"
    assert not ff2.act_unsigned and ff2.bias_correction is None
    with torch.inference_mode():
        s = sqnr_db(ref, model(**inputs).sample)
    print(f"\ncalibrated tiny FLUX w4a8 SQNR {s:.1f} dB")
    assert s > 20


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_w4a8_multipliers_follow_the_updated_weights(act_order):
    """w4a8 GPTQ keeps RTN's per-channel scale s and picks each group's multiplier when it reaches the group, from
    the weights as updated so far: the lazy block updates must give exactly what column-by-column updates give."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    mix = torch.randn(256, 256, generator=g) * 0.3 + torch.eye(256)
    x = torch.randn(1024, 256, generator=g) @ mix
    h = x.T @ x
    h[:, 17] = h[17, :] = 0  # a dead input channel
    codes, m, s = q.rtn_weight(w, "w4a8", torch.float32)
    c1, m1 = gptq_quantize(w, h, "w4a8", m, s, block=1, act_order=act_order)
    for block in (100, 128):  # block boundaries inside a group and on one
        c, mb = gptq_quantize(w, h, "w4a8", m, s, block=block, act_order=act_order)
        assert torch.equal(mb, m1) and torch.equal(c, c1)
    assert m1.dtype == torch.uint8 and int(m1.min()) >= 1 and int(m1.max()) <= 18
    assert c1.dtype == torch.int8 and int(c1.abs().max()) <= 7 and (c1[:, 17] == 0).all()
    assert (m1 != m).any()  # the updated weights moved some groups' multipliers away from RTN's
    with pytest.raises(ValueError, match="w4a8 needs global_scale"):
        gptq_quantize(w, h, "w4a8", m, None)


def test_gptq_with_too_few_rows_falls_back_to_rtn(layer_and_data, caplog):
    layer, calib, test, _ = layer_and_data
    outs = []
    for cfg in ({}, dict(gptq=True)):
        q = copy.deepcopy(layer)
        with calibrate(q, max_rows=300):  # 300 rows < 2K = 512, no Hessian accumulated
            with torch.no_grad():
                for x in calib:
                    q(x)
        with caplog.at_level(logging.WARNING, logger="svdquant_ops"):
            quantize_(q, SVDQuantConfig(**cfg))
        outs.append(q.weight)
    assert any("GPTQ needs a Hessian from at least 2K = 512 rows but only 300" in r.message for r in caplog.records)
    assert torch.equal(outs[0].codes, outs[1].codes)


def test_fast_svd_lands_close_to_exact(layer_and_data):
    exact = _quantized_error(layer_and_data, svd="exact")
    fast = _quantized_error(layer_and_data, svd="lowrank")
    print(f"\nexact SVD {exact:.4g}, svd_lowrank {fast:.4g} ({100 * (fast / exact - 1):+.2f}%)")
    assert fast < exact * 1.05


def test_nvfp4_calibrated_beats_naive(layer_and_data):
    naive = _quantized_error(layer_and_data, precision="nvfp4", rank=0, smooth_grid=0)
    full = _quantized_error(layer_and_data, precision="nvfp4")
    assert full < naive


def test_deterministic_for_fixed_seed(layer_and_data):
    layer, calib, _, _ = layer_and_data
    outs = []
    for _ in range(2):
        q = copy.deepcopy(layer)
        with calibrate(q, max_rows=200, seed=3, hessian=True):
            with torch.no_grad():
                for x in calib:
                    q(x)
        quantize_(q, SVDQuantConfig(gptq=True, precision="nvfp4", nvfp4_per_channel_scale=True))
        outs.append(q.weight)
    for name in outs[0].tensor_data_names + outs[0].optional_tensor_data_names:
        a, b = getattr(outs[0], name), getattr(outs[1], name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name


def test_calibrated_nvfp4_per_channel_scale(layer_and_data):
    layer, calib, _, _ = layer_and_data
    q = copy.deepcopy(layer)
    with calibrate(q):
        with torch.no_grad():
            q(calib[0])
    quantize_(q, SVDQuantConfig(precision="nvfp4", nvfp4_per_channel_scale=True))
    assert q.weight.global_scale.shape == (N,)


def test_group_members_with_different_configs_are_refused():
    from torchao.quantization import FqnToConfig

    model = tiny_flux()
    with calibrate(model):
        with torch.no_grad():
            model(**flux_inputs())
    cfgs = FqnToConfig({"transformer_blocks.0.attn.to_q": SVDQuantConfig(rank=16),
                        "transformer_blocks.0.attn.to_k": SVDQuantConfig(precision="nvfp4")})
    with pytest.raises(ValueError, match="shares its input .* with a different SVDQuantConfig"):
        quantize_(model, cfgs, filter_fn=None)


def test_fp16_smoothing_candidates_that_overflow_are_skipped():
    torch.manual_seed(0)
    layer = nn.Linear(128, 64).to(torch.float16)
    with torch.no_grad():
        layer.weight[:, 7] = 1e-6  # b_7 tiny: a^α / b^β overflows fp16 for large β
    x = torch.randn(256, 128)
    x[:, 7] = 3e4
    with calibrate(layer):
        with torch.no_grad():
            layer(x.half())
    quantize_(layer, SVDQuantConfig())
    w = layer.weight
    assert torch.isfinite(w.smooth).all() and torch.isfinite(w.proj_down).all() and torch.isfinite(w.proj_up).all()
    with torch.inference_mode():
        assert torch.isfinite(layer(x[:4].half())).all()


def test_records_are_freed_and_detached_after_quantize():
    model = tiny_flux()
    with calibrate(model) as session:
        with torch.no_grad():
            model(**flux_inputs())
    quantize_(model, SVDQuantConfig(lowrank_iters=1))
    assert all(r.rows is None and not r.solved for r in session.records)
    leftover = [n for n, m in model.named_modules() if hasattr(m, RECORD_ATTR)]
    assert leftover == []


def test_calibrating_a_submodule_keeps_full_names():
    from svdquant_ops import prepare_model

    model = tiny_flux()
    prepare_model(model)
    blk = model.single_transformer_blocks[0]
    with calibrate(blk):
        with torch.no_grad():
            model(**flux_inputs())
    quantize_(model, SVDQuantConfig(lowrank_iters=1))
    assert isinstance(blk.proj_out.weight, SVDQuantTensor)  # not mistaken for the root "proj_out"
    assert not isinstance(model.proj_out.weight, SVDQuantTensor)


def test_recorder_is_bounded_and_exact_on_absmax(layer_and_data):
    layer, calib, _, _ = layer_and_data
    q = copy.deepcopy(layer)
    with calibrate(q, max_rows=100) as session:
        with torch.no_grad():
            for x in calib:
                q(x)
    rec = getattr(q, RECORD_ATTR)
    assert rec.rows.shape == (100, K) and rec.seen_rows == 512 and rec.calls == 4
    allx = torch.cat(calib).float()
    assert torch.equal(rec.absmax, allx.abs().amax(0))
    assert float(rec.minimum) == allx.min().item()
    # every sampled row is one of the recorded rows
    assert (rec.rows.float()[:, None, :] == allx[None]).all(-1).any(-1).all()
    assert "1 inputs recorded for 1 linears" in session.summary()


def test_flux_groups_share_smoothing_and_qkv_share_down_projection(caplog, capsys):
    model = tiny_flux()
    with calibrate(model, max_rows=256) as session:
        with torch.no_grad():
            for s in range(3):
                model(**flux_inputs(seed=s))
    groups = {r.name for r in session.records if len(r.members) > 1}
    assert ("transformer_blocks.0.attn.to_q + transformer_blocks.0.attn.to_k + transformer_blocks.0.attn.to_v"
            in groups)
    assert any(n.startswith("single_transformer_blocks.1.proj_mlp + ") and n.count("+") == 3 for n in groups)
    ref_in = flux_inputs(seed=9)
    with torch.no_grad():
        ref = model(**ref_in).sample
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(model, SVDQuantConfig(lowrank_iters=4))
    blk = model.single_transformer_blocks[0]
    q, k, v, mlp = blk.attn.to_q.weight, blk.attn.to_k.weight, blk.attn.to_v.weight, blk.proj_mlp.weight
    assert torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, mlp.smooth)
    assert torch.equal(q.proj_down, v.proj_down) and not torch.equal(q.proj_down, mlp.proj_down)
    ff2 = model.transformer_blocks[0].ff.net[2].weight
    assert ff2.act_unsigned and ff2.bias_correction is not None  # GELU-fed: unsigned INT4
    assert not model.transformer_blocks[0].ff.net[0].proj.weight.act_unsigned
    err = capsys.readouterr().err
    # The bar counts, from its first line, exactly the groups the handler will solve (the selection rule), and runs
    # to completion: 20 of the 26 recorded inputs (embedders and AdaLN linears are kept in 16-bit).
    assert "SVDQuant groups" in err and "| 0/20 [" in err and "20/20" in err
    with torch.inference_mode():
        s = sqnr_db(ref, model(**ref_in).sample)
    print(f"\ncalibrated tiny FLUX SQNR {s:.1f} dB")
    assert s > 20


def test_required_calibration_without_data_is_an_error():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"calibration='required'\) but calibrate\(\) recorded no input"):
        quantize_(m, SVDQuantConfig(calibration="required"))


class _TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        return self.used(x)


def test_layer_that_never_saw_data(caplog):
    torch.manual_seed(0)
    m = _TwoPaths().to(torch.bfloat16)
    with calibrate(m):
        with torch.no_grad():
            m(torch.randn(8, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="unused: SVDQuantConfig.calibration='required'|unused: SVDQuantConfig"):
        quantize_(copy.deepcopy(m), SVDQuantConfig(calibration="required"))
    with caplog.at_level(logging.INFO, logger="svdquant_ops"):
        quantize_(m, SVDQuantConfig())
    assert any("unused never saw calibration data; quantizing data-free" in r.message for r in caplog.records)
    assert isinstance(m.unused.weight, SVDQuantTensor)


def test_nan_in_recorded_activations(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    x = torch.randn(8, 64).to(torch.bfloat16)
    x[2, 5] = float("nan")
    with calibrate(m):
        with torch.no_grad():
            m(x)
    with pytest.raises(ValueError, match="recorded calibration inputs contain NaN or Inf"):
        quantize_(copy.deepcopy(m), SVDQuantConfig(calibration="required"))
    with caplog.at_level(logging.WARNING, logger="svdquant_ops"):
        quantize_(m, SVDQuantConfig())
    assert any("contain NaN or Inf; quantizing data-free" in r.message for r in caplog.records)


def test_solve_group_rejects_mismatched_shapes():
    cfg = SVDQuantConfig()
    x = torch.randn(16, 128)
    with pytest.raises(ValueError, match="weights\\[0\\] has 64 input features but the recorded input has 128"):
        solve_group([torch.randn(32, 64)], x, x.abs().amax(0), cfg, rank=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="absmax must have shape"):
        solve_group([torch.randn(32, 128)], x, torch.ones(64), cfg, rank=8, dtype=torch.float32)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="recorded activations contain NaN or Inf"):
        solve_group([torch.randn(32, 128)], bad, x.abs().amax(0), cfg, rank=8, dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs,msg",
    [(dict(calibration="maybe"), "calibration must be"), (dict(smooth_grid=-1), "smooth_grid must be"),
     (dict(gptq_damp=2.0), "gptq_damp must be a number in"), (dict(gptq_damp="0.1"), "gptq_damp must be"),
     (dict(gptq_block=0), r"gptq_block must be an integer >= 1"), (dict(gptq="False"), "gptq must be True or False"),
     (dict(refit_after_gptq=1), "refit_after_gptq must be True or False"), (dict(act_unsigned="yes"), "act_unsigned must be"),
     (dict(precision="nvfp4", act_unsigned=True), "only defined for precision 'int4'"),
     (dict(precision="w4a8", act_unsigned=True), "only defined for precision 'int4'"),
     (dict(device="gpu0"), "device")],
)
def test_bad_algorithm_config(kwargs, msg):
    with pytest.raises((ValueError, RuntimeError), match=msg):
        SVDQuantConfig(**kwargs)


def test_config_takes_numpy_numbers_and_stores_python_ones():
    import numpy as np

    cfg = SVDQuantConfig(rank=np.int64(16), gptq=np.bool_(True), gptq_damp=np.float32(0.25), act_unsigned=np.False_)
    assert (cfg.rank, cfg.gptq, cfg.gptq_damp, cfg.act_unsigned) == (16, True, 0.25, False)
    assert [type(v) for v in (cfg.rank, cfg.gptq, cfg.gptq_damp, cfg.act_unsigned)] == [int, bool, float, bool]


def test_config_device_is_stored_as_a_string_for_json():
    from torchao.core.config import config_from_dict, config_to_dict

    cfg = SVDQuantConfig(device=torch.device("cpu"), gptq=True)
    assert cfg.device == "cpu"
    assert config_from_dict(config_to_dict(cfg)) == cfg
