"""The offline quantizers (svdquant_ops.quantize.quantizers) on hand-computed cases, and their agreement with the
runtime kernels (same codes and scales, bit for bit)."""

from __future__ import annotations

import pytest
import torch

import svdquant_ops
from svdquant_ops import layout
from svdquant_ops.quantize import quantizers as q

from . import reference as ref


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
    codes2, m2, s2 = q.quantize_weight(w, "w4a8", torch.bfloat16)
    assert torch.equal(codes2, codes) and torch.equal(m2, m) and torch.equal(s2, s)


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_python_act_quantizer_matches_kernel_bit_exact(precision, unsigned, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 192, generator=g) * torch.rand(192, generator=g) * 20).to(dtype)
    if unsigned:
        x = torch.nn.functional.gelu(x.float()).to(dtype)
    smooth = (torch.rand(192, generator=g) * 4 + 0.1).to(dtype)
    codes, scales = q.quantize_act(x, smooth, precision, unsigned=unsigned)
    k_codes, k_scales, _ = svdquant_ops.quantize_act(x, smooth, torch.zeros(192, 0, dtype=dtype), precision, unsigned)
    if precision == "w4a8":
        assert codes.dtype == torch.int8 and torch.equal(k_codes, codes) and scales.shape == (37, 1)
    else:
        signed = precision == "int4" and not unsigned
        assert torch.equal(layout.unpack_nibbles(k_codes, signed=signed), codes.to(torch.int8))
    assert k_scales.dtype == scales.dtype and torch.equal(k_scales.float(), scales.float())


def test_w4a8_act_has_no_unsigned_variant():
    with pytest.raises(ValueError, match="only defined for precision 'int4'"):
        q.quantize_act(torch.randn(2, 64), torch.ones(64), "w4a8", unsigned=True)


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_packed_weights_through_the_kernel_equal_fake_quant(precision):
    """quantize_weight -> pack -> gemm_w4a4 multiplies by exactly fake_quant_weight's values."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 128, generator=g)
    codes, scales, gsc = q.quantize_weight(w, precision, torch.bfloat16)
    fq = q.fake_quant_weight(w, precision, torch.bfloat16)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    one = torch.ones(128, dtype=torch.bfloat16)
    a_codes, a_scales, lora = svdquant_ops.quantize_act(x, one, torch.zeros(128, 0, dtype=torch.bfloat16), precision)
    y = svdquant_ops.gemm_w4a4(a_codes, a_scales, layout.pack_nibbles(codes), scales, gsc, lora,
                               torch.zeros(48, 0, dtype=torch.bfloat16), None, precision, torch.float32)
    xq = q.fake_quant_act(x, one, precision)
    torch.testing.assert_close(y, (xq.double() @ fq.double().T).float(), rtol=1e-5, atol=1e-5)
