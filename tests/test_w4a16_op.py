"""svdquant::w4a16_linear on the CPU (the reference kernel, csrc/cpu/w4a16.cpp) against an independent PyTorch
formula: ``quantizers.dequantize_w4a16(layout.unpack_nibbles(codes, signed=False), scales, zeros)`` in fp32, then
``x @ w.T + bias`` in float64.

Tolerance: the op sums the K products in fp32 (k ascending), so it differs from the float64 formula by fp32
rounding only: typically sqrt(K) * 2^-24 * sum_k |x_k * w_k| (~3e-6 of that sum at K = 3072, the largest K here;
allowed 2e-5), plus one unit in the last place of a 16-bit output dtype after its rounding. The weights themselves are
identical on both sides (code * scale + zero in fp32). Argument errors are tested in test_op_errors.py, opcheck in
test_opcheck.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from svdquant_ops import layout, ops
from svdquant_ops.quantizers import dequantize_w4a16

from .builders import generator

ops.load()
OPS = torch.ops.svdquant
ULP_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def w4a16_inputs(lead, N: int, K: int, x_dtype: torch.dtype, scale_dtype: torch.dtype, gen: torch.Generator, *,
                 bias: bool | torch.dtype = True) -> dict:
    """w4a16_linear's arguments: x [*lead, K] (Gaussian), codes uint8 [N, K/2] (every nibble pattern, unsigned),
    scales and zeros [N, K/64] in scale_dtype (scale in [1e-3, 2.1e-2], zero in [-0.16, 0]: weights O(0.1) of both
    signs), bias [N] in x's dtype (or the dtype given), or None. All on the CPU."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    G = K // 64
    codes = layout.pack_nibbles(torch.randint(0, 16, (N, K), generator=gen))
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zeros = (-torch.rand(N, G, generator=gen) * 0.16).to(scale_dtype)
    x = torch.randn(*lead, K, generator=gen).to(x_dtype)
    b = None
    if bias is not False:
        b = (torch.randn(N, generator=gen) * 0.5).to(x_dtype if bias is True else bias)
    return dict(x=x, codes=codes, scales=scales, zeros=zeros, bias=b)


def w4a16_args(a: dict) -> list:
    return [a["x"], a["codes"], a["scales"], a["zeros"], a["bias"]]


def formula(a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mag) in float64: y = x @ w.T + bias with w from quantizers.dequantize_w4a16, and
    mag = |x| @ |w|.T + |bias|, the scale of fp32 summation error."""
    w = dequantize_w4a16(layout.unpack_nibbles(a["codes"], signed=False), a["scales"], a["zeros"]).double()
    x = a["x"].double()
    y, mag = x @ w.T, x.abs() @ w.abs().T
    if a["bias"] is not None:
        y, mag = y + a["bias"].double(), mag + a["bias"].double().abs()
    return y, mag


def assert_matches_formula(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
                           rel: float = 2e-5):
    """|out - ref| <= rel * mag (fp32 summation) + one ulp of the output dtype at |ref| (its final rounding)."""
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    o = out.double()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - (ULP_BITS[dtype] - 1))
    allowed = rel * mag + (ulp if dtype != torch.float32 else 0.0)
    bad = (o - ref).abs() > allowed
    assert not bad.any(), (f"{bad.sum().item()} of {ref.numel()} elements off; worst excess "
                           f"{((o - ref).abs() - allowed).max().item():.3e}")


LEADS = [(), (1,), (2, 3), (0,), (2, 0)]


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_matches_formula(lead, x_dtype, scale_dtype, bias):
    a = w4a16_inputs(lead, 40, 192, x_dtype, scale_dtype, generator(("w4a16", lead, str(x_dtype),
                                                                     str(scale_dtype), bias)), bias=bias)
    out = ops.w4a16_linear(*w4a16_args(a))
    ref, mag = formula(a)
    assert out.shape == (*lead, 40)
    assert_matches_formula(out, ref, mag, x_dtype)


@pytest.mark.parametrize("x_dtype,scale_dtype,bias_dtype", [
    (torch.bfloat16, torch.float16, torch.float32),  # every dtype different
    (torch.float16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
])
def test_cpu_mixed_dtypes(x_dtype, scale_dtype, bias_dtype):
    a = w4a16_inputs((5,), 24, 128, x_dtype, scale_dtype, generator(("mixed", str(x_dtype))), bias=bias_dtype)
    ref, mag = formula(a)
    assert_matches_formula(ops.w4a16_linear(*w4a16_args(a)), ref, mag, x_dtype)


def test_cpu_large_k_m1():
    """A FLUX AdaLN row count at K = 3072, one token (the shape the GPU's GEMV serves)."""
    a = w4a16_inputs((1,), 300, 3072, torch.bfloat16, torch.bfloat16, generator(7))
    ref, mag = formula(a)
    assert_matches_formula(ops.w4a16_linear(*w4a16_args(a)), ref, mag, torch.bfloat16)


def test_cpu_exact_on_small_integers():
    """Integer x, codes, scales and zeros keep every product and partial sum an exact fp32 integer: the op must
    then equal the formula exactly (this pins the nibble order and the group of each channel)."""
    g = generator(11)
    N, K = 9, 256
    codes_u = torch.randint(0, 16, (N, K), generator=g)
    a = dict(x=torch.randint(-3, 4, (4, K), generator=g).float(), codes=layout.pack_nibbles(codes_u),
             scales=torch.randint(1, 4, (N, K // 64), generator=g).float(),
             zeros=torch.randint(-20, 1, (N, K // 64), generator=g).float(), bias=torch.arange(N).float())
    w = codes_u.double() * a["scales"].double().repeat_interleave(64, 1) + a["zeros"].double().repeat_interleave(64, 1)
    expected = a["x"].double() @ w.T + a["bias"].double()
    assert torch.equal(ops.w4a16_linear(*w4a16_args(a)).double(), expected)


def test_cpu_non_contiguous_inputs():
    a = w4a16_inputs((6,), 32, 128, torch.bfloat16, torch.bfloat16, generator(13))
    ref = ops.w4a16_linear(*w4a16_args(a))
    x_t = a["x"].T.contiguous().T  # same values, column-major
    codes_w = torch.cat([a["codes"], a["codes"]], 1)[:, : a["codes"].shape[1]]  # row stride 2x
    scales_t = a["scales"].T.contiguous().T
    zeros_w = torch.cat([a["zeros"], a["zeros"]], 1)[:, : a["zeros"].shape[1]]
    bias_s = torch.stack([a["bias"], a["bias"]], 1)[:, 0]
    out = ops.w4a16_linear(x_t, codes_w, scales_t, zeros_w, bias_s)
    assert not (x_t.is_contiguous() or codes_w.is_contiguous() or zeros_w.is_contiguous() or bias_s.is_contiguous())
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_fake_kernel_shapes():
    mode = FakeTensorMode()
    for lead in LEADS:
        a = w4a16_inputs(lead, 40, 192, torch.float16, torch.bfloat16, generator(17))
        with mode:
            fake = ops.w4a16_linear(*[mode.from_tensor(t) if t is not None else None for t in w4a16_args(a)])
        real = ops.w4a16_linear(*w4a16_args(a))
        assert fake.shape == real.shape and fake.dtype == real.dtype == torch.float16


def test_backward_raises_not_implemented():
    a = w4a16_inputs((2,), 16, 64, torch.float32, torch.float32, generator(19))
    x = a["x"].requires_grad_(True)
    y = ops.w4a16_linear(x, a["codes"], a["scales"], a["zeros"], a["bias"])
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()
