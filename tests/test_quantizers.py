"""The PyTorch rounding rules (svdquant_ops.quantizers) on hand-computed cases, their agreement with the runtime
kernels (same codes and scales, bit for bit), and SVDQuantTensor.dequantize() against the layer it describes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import svdquant_ops
from svdquant_ops import layout, ops
from svdquant_ops import quantizers as q

from . import reference as ref
from .builders import GROUP, act_inputs, generator


def test_int4_hand_cases_bf16_scale_rounding():
    # amax 1.0 -> 1/7 = 0.142857... rounds to bf16 0.142578125 (RNE), codes use the rounded scale.
    w = torch.zeros(1, 64)
    w[0, :6] = torch.tensor([1.0, -1.0, 0.0714, 0.0713, 0.5, -0.2142])
    codes, scales = q.quantize_int4(w, torch.bfloat16)
    s = torch.tensor(1 / 7).to(torch.bfloat16).float().item()
    assert scales.dtype == torch.bfloat16 and scales.float().item() == s == 0.142578125
    # 1/s = 7.0137 -> clamps to 7; 0.0714/s = 0.5008 -> 1; 0.0713/s = 0.50007 -> 1; 0.5/s = 3.507 -> 4
    assert codes[0, :6].tolist() == [7, -7, 1, 1, 4, -2]


def test_int4_round_half_even_exact_ties():
    w = torch.zeros(1, 64)
    w[0, :7] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5])  # amax 7: scale exactly 1
    codes, scales = q.quantize_int4(w, torch.float32)
    assert scales.item() == 1.0
    assert codes[0, :7].tolist() == [7, 0, 2, 2, 0, -2, -2]


def test_uint4_scale_and_clamp():
    x = torch.full((1, 64), 0.25)
    x[0, 0] = 15.0
    x[0, 1] = -1.0  # below zero: clamps to code 0
    codes, scales = q.quantize_int4(x, torch.float32, unsigned=True)
    assert scales.item() == 1.0 and codes[0, :3].tolist() == [15, 0, 0]  # 0.25 -> 0 (ties to even)


def test_zero_group_has_zero_scale_and_codes():
    codes, scales = q.quantize_int4(torch.zeros(2, 128), torch.bfloat16)
    assert (scales.float() == 0).all() and (codes == 0).all()
    codes, micro = q.quantize_nvfp4(torch.zeros(1, 32))
    assert (micro.float() == 0).all() and (codes == 0).all()


def test_e2m1_encode_ties_and_saturation():
    vals = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.1, -0.0, 0.26, float("nan")])
    assert q.e2m1_encode(vals).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 8, 1, 0]


def test_nvfp4_micro_scale_saturates_at_448_with_global_scale():
    w = torch.zeros(2, 16)
    w[0, 0] = 6.0 * 448 * 4  # with global 1: micro would be 1792 -> saturates at 448, codes clamp at 6
    w[1, 0] = 3.0
    codes, micro = q.quantize_nvfp4(w, torch.ones(1))
    assert micro.float()[:, 0].tolist() == [448.0, 0.5]
    assert codes[0, 0].item() == 7 and codes[1, 0].item() == 7  # 6.0: saturated / exactly 3 / 0.5 = 6
    g = q.nvfp4_global_scale(w)
    assert g.item() == pytest.approx(w.abs().max().item() / (6 * 448))
    codes, micro = q.quantize_nvfp4(w, g)
    assert micro.float()[0, 0].item() == 448.0  # the largest group uses the top of the fp8 range
    deq = q.dequantize(codes, micro, "nvfp4", g)
    assert deq[0, 0].item() == pytest.approx(w[0, 0].item(), rel=1e-6)


def test_w4a8_weight_hand_case():
    # Row 0: rowmax 7.875 -> s = 7.875 / 126 = 1/16, 7 s = 0.4375; group 0 (amax 7.875) -> m = 18, step 1.125;
    # group 1 (amax 0.875) -> m = 2, step 0.125. Row 1: all zero -> s = 0, m = 1, codes 0. Row 2: s = 1, a tiny
    # group's multiplier clamps up to 1.
    w = torch.zeros(3, 128)
    w[0, :3] = torch.tensor([7.875, -3.9375, 0.25])  # / 1.125: 7, -3.5 -> -4 (ties to even), 0.22 -> 0
    w[0, 64:66] = torch.tensor([-0.875, 0.4375])  # / 0.125: -7, 3.5 -> 4 (ties to even)
    w[2, 0], w[2, 64] = 126.0, 1e-6
    codes, m, s = q.quantize_w4a8_weight(w)
    assert codes.dtype == torch.int8 and m.dtype == torch.uint8 and s.dtype == torch.float32
    assert s.tolist() == [0.0625, 0.0, 1.0]
    assert m.tolist() == [[18, 2], [1, 1], [18, 1]]
    assert codes[0, :3].tolist() == [7, -4, 0] and codes[0, 64:66].tolist() == [-7, 4]
    assert (codes[1] == 0).all() and codes[2, 0].item() == 7 and codes[2, 64].item() == 0
    deq = q.dequantize(codes, m, "w4a8", s)
    assert deq[0, :3].tolist() == [7.875, -4.5, 0.0] and deq[2, 0].item() == 126.0
    with pytest.raises(ValueError, match="W4A8 weights need global_scale"):
        q.dequantize(codes, m, "w4a8")


def test_w4a8_weight_matches_reference_and_bounds():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 256, generator=g) * torch.rand(37, 1, generator=g) * 3
    w[:, 64:128] *= 0.01  # a quiet group: small multipliers
    w[5] = 0
    codes, m, s = q.quantize_w4a8_weight(w)
    r_codes, r_m, r_s = ref.quantize_w4a8_weight(w)
    assert torch.equal(codes.long(), r_codes) and torch.equal(m.long(), r_m) and torch.equal(s, r_s)
    assert codes.abs().max() <= 7 and m.min() >= 1 and m.max() <= 18
    assert (m[:, 1] <= 2).all() and (m.amax(1)[s > 0] == 18).all()
    # RTN error: at most half a step (m * s / 2) everywhere.
    step = (m.float() * s.unsqueeze(1)).repeat_interleave(64, 1)
    assert ((q.dequantize(codes, m, "w4a8", s) - w).abs() <= step / 2 * (1 + 1e-6)).all()
    codes2, m2, s2 = q.rtn_weight(w, "w4a8", torch.bfloat16)
    assert torch.equal(codes2, codes) and torch.equal(m2, m) and torch.equal(s2, s)


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_python_act_quantizer_matches_kernel_bit_exact(precision, unsigned, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 192, generator=g) * torch.rand(192, generator=g) * 20).to(dtype)
    if unsigned:
        x = torch.nn.functional.gelu(x.float()).to(dtype)
    smooth = (torch.rand(192, generator=g) * 4 + 0.1).to(dtype)
    codes, scales = q.rtn_act(x, smooth, precision, unsigned=unsigned)
    k_codes, k_scales, _ = ops.quantize_act(x, smooth, torch.zeros(192, 0, dtype=dtype), precision, unsigned)
    if precision == "w4a8":
        assert codes.dtype == torch.int8 and torch.equal(layout.w4a8_from_stored(k_codes), codes)
        assert scales.shape == (37, 1)
    else:
        signed = precision == "int4" and not unsigned
        assert torch.equal(layout.unpack_nibbles(k_codes, signed=signed), codes.to(torch.int8))
    assert k_scales.dtype == scales.dtype and torch.equal(k_scales.float(), scales.float())


def test_w4a8_act_has_no_unsigned_variant():
    with pytest.raises(ValueError, match="only defined for precision 'int4'"):
        q.rtn_act(torch.randn(2, 64), torch.ones(64), "w4a8", unsigned=True)


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_packed_weights_through_the_kernel_equal_fake_quant(precision):
    """rtn_weight -> pack -> gemm multiplies by exactly fake_quant_weight's values."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 128, generator=g)
    codes, scales, gsc = q.rtn_weight(w, precision, torch.bfloat16)
    fq = q.fake_quant_weight(w, precision, torch.bfloat16)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    one = torch.ones(128, dtype=torch.bfloat16)
    a_codes, a_scales, down_act = ops.quantize_act(x, one, torch.zeros(128, 0, dtype=torch.bfloat16), precision)
    y = ops.gemm(a_codes, a_scales, layout.pack_nibbles(codes), scales, gsc, down_act,
                 torch.zeros(48, 0, dtype=torch.bfloat16), None, precision, torch.float32)
    xq = q.fake_quant_act(x, one, precision)
    torch.testing.assert_close(y, (xq.double() @ fq.double().T).float(), rtol=1e-5, atol=1e-5)


def _act_values(act_codes, act_scales, precision, act_unsigned):
    """float64 Q(x̂) from quantize_act's codes and scales, decoded by the reference."""
    if precision == "w4a8":  # int8 codes (stored in W4A8's channel order), one scale per token
        return layout.w4a8_from_stored(act_codes).double() * act_scales.double()
    vals = ref.unpack_nibbles(act_codes, signed=precision == "int4" and not act_unsigned)
    return ref.dequantize(ref.code_values(vals, precision), act_scales, GROUP[precision])


@pytest.mark.parametrize("precision,act_unsigned",
                         [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
def test_dequantize_matches_layer_math(precision, act_unsigned):
    """dequantize() is the layer's effective weight W_eff = Q(R)·diag(1/λ) + proj_up·proj_downᵀ: the layer's output
    F.linear(x, qt, b) equals x·W_effᵀ + b up to exactly the activation-quantization term (Q(x̂) − x̂)·Q(R)ᵀ, with
    x̂ = x/λ ((x + shift)/λ for unsigned INT4, whose bias correction removes the shift) and Q(x̂) the codes the
    layer's quantize_act produced; that term is at most half an activation step per input channel. residual() is
    Q(R) decoded from the packed codes exactly."""
    N, K, rank = 96, 256, 20
    g = generator(("dequantize", precision, act_unsigned))
    a = act_inputs((4, 6), K, 0, torch.bfloat16, g, unsigned=act_unsigned, outliers=True)
    x, smooth = a["x"], a["smooth"]  # λ in [0.25, 3.25]: a missing or inverted 1/λ is visible
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    qt = svdquant_ops.quantize_weight(w, precision, rank, smooth=smooth, act_unsigned=act_unsigned)
    assert torch.equal(qt.smooth, smooth)
    assert qt.rank == 32 and not qt.proj_up[:, rank:].any() and not qt.proj_down[:, rank:].any()  # padding is zero

    # residual(): Q(R) = code · scale (· global scale), decoded independently from the packed codes, bit for bit
    # (every product before the global scale is exact in fp32, which then rounds once, as float64 -> fp32 does).
    r = ref.dequantize(ref.code_values(ref.unpack_nibbles(qt.codes, signed=precision != "nvfp4"), precision),
                       qt.scales, GROUP[precision])
    if qt.global_scale is not None:
        r = r * qt.global_scale.double().reshape(-1, 1)
    assert torch.equal(qt.residual(), r.float())

    # dequantize(): Q(R)·diag(1/λ) + proj_up·proj_downᵀ (fp32 arithmetic: a few roundings of 2^-24).
    lam, up, down = smooth.double(), qt.proj_up.double(), qt.proj_down.double()
    w_eff64 = r / lam + up @ down.T
    w_eff = qt.dequantize(torch.float32)
    assert w_eff.dtype == torch.float32
    assert ((w_eff.double() - w_eff64).abs() <= 2.0**-21 * ((r / lam).abs() + up.abs() @ down.abs().T)).all()
    assert qt.dequantize().dtype == torch.bfloat16 and torch.equal(qt.dequantize(), w_eff.to(torch.bfloat16))
    # ... and a 4-bit approximation of w (0.07-0.2 here: a random λ makes the small-λ channels coarser).
    assert (w_eff - w.float()).norm() / w.float().norm() < 0.3

    # The layer, through SVDQuantTensor's F.linear dispatch (svdquant::linear), and its quantized activations.
    with torch.inference_mode():
        y = F.linear(x, qt, bias)
        act_codes, act_scales, _ = ops.quantize_act(x, qt.smooth, qt.proj_down, precision, act_unsigned)
    M = x.numel() // K
    x64 = x.double().reshape(M, K)
    x_hat = ((x64 + ref.SHIFT) if act_unsigned else x64) / lam
    x_q = _act_values(act_codes, act_scales, precision, act_unsigned).reshape(M, K)
    act_err = (x_q - x_hat) @ r.T  # the activation-quantization term
    pred = x64 @ w_eff.double().T + bias.double() + act_err
    # Rounding of the layer: fp32 sums of the 4-bit products, of x·proj_down and of the branch, the bias (with the
    # unsigned bias correction Q(R)·shift/λ in fp32), one bf16 rounding of the output; and dequantize()'s fp32.
    mag = (x_q.abs() @ r.abs().T + x64.abs() @ (r.abs() / lam + up.abs() @ down.abs().T).T
           + bias.double().abs() + ((ref.SHIFT / lam) @ r.abs().T if act_unsigned else 0))
    tol = ref.gemm_error_bound(mag, pred, K + qt.rank + 8, torch.bfloat16)
    err = (y.double().reshape(M, N) - pred).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3e}"
    # The comparison is sharp: the activation term is far outside the tolerance (most outputs would fail without it)
    assert act_err.norm() > 5 * tol.norm() and (act_err.abs() > tol).double().mean() > 0.75
    # ... and x·W_effᵀ + b is the layer up to at most half an activation step per input channel (nvfp4: half the
    # widest e2m1 spacing, 2 * scale / 2) times |Q(R)|.
    half_step = {"int4": 0.5, "nvfp4": 1.0, "w4a8": 0.5}[precision]
    scales = act_scales.double()
    steps = scales if precision == "w4a8" else scales.repeat_interleave(GROUP[precision], dim=-1)
    step_bound = (half_step * steps.reshape(M, -1).expand(M, K)) @ r.abs().T
    assert ((y.double().reshape(M, N) - x64 @ w_eff.double().T - bias.double()).abs() <= step_bound + tol).all()
