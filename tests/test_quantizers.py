"""The offline quantizers (svdquant_ops.quantize.quantizers) on hand-computed cases, and their agreement with the
runtime kernels (same codes and scales, bit for bit)."""

from __future__ import annotations

import pytest
import torch

import svdquant_ops
from svdquant_ops import layout
from svdquant_ops.quantize import quantizers as q


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


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_python_act_quantizer_matches_kernel_bit_exact(precision, unsigned, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 192, generator=g) * torch.rand(192, generator=g) * 20).to(dtype)
    if unsigned:
        x = torch.nn.functional.gelu(x.float()).to(dtype)
    smooth = (torch.rand(192, generator=g) * 4 + 0.1).to(dtype)
    codes, scales = q.quantize_act(x, smooth, precision, unsigned=unsigned)
    k_codes, k_scales, _ = svdquant_ops.quantize_act(x, smooth, torch.zeros(192, 0, dtype=dtype), precision, unsigned)
    signed = precision == "int4" and not unsigned
    assert torch.equal(layout.unpack_nibbles(k_codes, signed=signed), codes.to(torch.int8))
    assert torch.equal(k_scales.float(), scales.float())


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
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
