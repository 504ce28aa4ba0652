"""The C++ CPU kernels against the independent float64 reference (tests/reference.py).

Integer parts (codes) and scales must match exactly; floating outputs must lie inside the elementwise rounding
bound derived in reference.gemm_error_bound.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import svdquant_ops
from svdquant_ops import formats, layout, ops

from . import reference as ref
from .builders import act_inputs, generator, op_args, weight_inputs

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _w4a8_max_k() -> int:
    ops.load()  # svdquant_ops.meta registers the fake kernels, so it needs the op schemas loaded
    from svdquant_ops.meta import W4A8_MAX_K

    return W4A8_MAX_K


def _assert_scales_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.float().isnan(), b.float().isnan())
    fin = ~a.float().isnan()
    assert torch.equal(a.float()[fin], b.float()[fin])


CASES = [
    # (leading shape, K, R)
    ((1,), 64, 0),
    ((5,), 128, 16),
    ((3, 7), 192, 32),
    ((2, 1, 9), 64, 5),
    ((17,), 320, 64),
    ((), 128, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision,act_unsigned",
                         [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_quantize_act_matches_reference(dtype, precision, act_unsigned, case):
    lead, K, R = CASES[case]
    a = act_inputs(lead, K, R, dtype, generator(1000 + case), unsigned=act_unsigned, outliers=True)
    x, smooth, proj_down = op_args("quantize_act", a)
    codes, scales, down_act = ops.quantize_act(x, smooth, proj_down, precision, act_unsigned)
    r_codes, r_scales, r_down = ref.quantize_act(x, smooth, proj_down, precision, act_unsigned)

    if precision == "w4a8":  # one int8 code per byte, one scale per token
        assert codes.dtype == torch.int8 and codes.shape == (*lead, K)
        assert scales.shape == (*lead, 1) and scales.dtype == dtype
        got = layout.w4a8_from_stored(codes).long()  # stored in W4A8's channel order
    else:
        assert codes.dtype == torch.uint8 and codes.shape == (*lead, K // 2)
        signed = precision == "int4" and not act_unsigned
        got = ref.unpack_nibbles(codes, signed=signed)
    assert torch.equal(got, r_codes), "codes differ from the reference"
    _assert_scales_equal(scales, r_scales)
    # down_act: K fp32 additions of exact products of 16-bit numbers (fp32 inputs: one more rounding each).
    bound = (K + 2) * 2.0**-24 * (x.double().abs().reshape(-1, K) @ proj_down.double().abs())
    assert down_act.dtype == torch.float32 and down_act.shape == (*lead, R)
    M = x.numel() // K
    assert ((down_act.double().reshape(M, R) - r_down.reshape(M, R)).abs() <= bound + 1e-30).all()


def _weight_values(w, precision):
    """float64 values of the weight codes (before scaling), decoded by the reference."""
    return ref.code_values(ref.unpack_nibbles(w["codes"], signed=precision != "nvfp4"), precision)


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,N,K,R,with_bias",
    [((1,), 1, 64, 0, False), ((3,), 130, 128, 16, True), ((2, 5), 64, 256, 32, True), ((7,), 33, 64, 3, False),
     ((1, 1), 200, 192, 64, True)],
)
def test_gemm_matches_reference(precision, out_dtype, lead, N, K, R, with_bias):
    g = generator((precision, str(out_dtype), N, K, R))
    model_dtype = torch.bfloat16 if out_dtype == torch.float32 else out_dtype
    a = act_inputs(lead, K, R, model_dtype, g, outliers=True)
    act_codes, act_scales, down_act = ops.quantize_act(*op_args("quantize_act", a), precision)
    # nvfp4: odd N gets a per-output-channel global scale [N], even N a per-tensor one [1]
    gscale = {"int4": None, "nvfp4": "channel" if N % 2 else "tensor", "w4a8": "channel"}[precision]
    w = weight_inputs(N, K, R, precision, model_dtype, g, global_scale=gscale, bias=with_bias)

    y = ops.gemm(act_codes, act_scales, w["codes"], w["scales"], w["global_scale"], down_act, w["proj_up"], w["bias"],
                 precision, out_dtype)
    assert y.dtype == out_dtype and y.shape == (*lead, N)

    if precision == "w4a8":
        a_vals, n_scales = layout.w4a8_from_stored(act_codes).long(), 1  # int8 codes, one per byte; one scale per token
    else:
        a_vals = ref.unpack_nibbles(act_codes, signed=precision == "int4")
        n_scales = K // formats.GROUP_SIZE[precision]
    a_vals = ref.code_values(a_vals, precision)
    M = a["x"].numel() // K
    y_ref, mag = ref.gemm(a_vals.reshape(M, K), act_scales.reshape(M, n_scales), _weight_values(w, precision),
                          w["scales"], w["global_scale"], down_act.reshape(M, R), w["proj_up"], w["bias"], precision)
    n_terms = n_scales + R + 2
    bound = ref.gemm_error_bound(mag, y_ref, n_terms, out_dtype)
    err = (y.double().reshape(M, N) - y_ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


def test_gemm_unsigned_activations():
    g = generator(7)
    M, N, K, R = 9, 70, 128, 16
    a = act_inputs(M, K, R, torch.bfloat16, g, unsigned=True)
    act_codes, act_scales, down_act = ops.quantize_act(*op_args("quantize_act", a), "int4", True)
    vals = ref.unpack_nibbles(act_codes, signed=False)
    assert vals.min() >= 0 and vals.max() == 15  # the group max maps to 15
    w = weight_inputs(N, K, R, "int4", torch.bfloat16, g, bias=False)
    y = ops.gemm(act_codes, act_scales, w["codes"], w["scales"], None, down_act, w["proj_up"], None, "int4",
                 torch.float32, act_unsigned=True)
    y_ref, mag = ref.gemm(vals.double(), act_scales, _weight_values(w, "int4"), w["scales"], None, down_act,
                          w["proj_up"], None, "int4")
    assert ((y.double() - y_ref).abs() <= ref.gemm_error_bound(mag, y_ref, K // 64 + R + 2, torch.float32)).all()
    # Decoding unsigned codes as signed would be a real bug: it must change the result.
    y_wrong = ops.gemm(act_codes, act_scales, w["codes"], w["scales"], None, down_act, w["proj_up"], None, "int4",
                       torch.float32, act_unsigned=False)
    assert not torch.allclose(y, y_wrong)


@pytest.mark.parametrize("precision,act_unsigned",
                         [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
def test_linear_is_gemm_of_quantize_act(precision, act_unsigned):
    a = act_inputs((2, 3), 128, 16, torch.bfloat16, generator(11), unsigned=act_unsigned, outliers=True)
    w = weight_inputs(48, 128, 16, precision, torch.bfloat16, generator(12))
    y = ops.linear(**a, **w, precision=precision, act_unsigned=act_unsigned)
    act_codes, act_scales, down_act = ops.quantize_act(**a, precision=precision, act_unsigned=act_unsigned)
    y2 = ops.gemm(act_codes, act_scales, w["codes"], w["scales"], w["global_scale"], down_act, w["proj_up"], w["bias"],
                  precision, torch.bfloat16, act_unsigned)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert torch.equal(y, y2)


def test_int4_round_half_even_and_saturation():
    # One group whose amax is 7 -> scale exactly 1: codes are round-half-even of the values themselves.
    vals = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 7.0, -7.0, 6.5, 0.0, -3.5]
    x = torch.zeros(1, 64)
    x[0, : len(vals)] = torch.tensor(vals)
    codes, scales, _ = ops.quantize_act(x, torch.ones(64), torch.zeros(64, 0), "int4")
    got = layout.unpack_nibbles(codes, signed=True)[0, : len(vals)].tolist()
    assert scales.item() == 1.0
    assert got == [0, 2, 2, 0, -2, -2, 3, 7, -7, 6, 0, -4]


def test_int4_scale_rounding_and_clamp_fp16():
    # amax/7 overflows fp16 -> the scale saturates at 65504 instead of becoming inf; codes clamp to +-7.
    x = torch.zeros(1, 64, dtype=torch.float16)
    x[0, 0], x[0, 1] = 60000.0, -30000.0
    smooth = torch.full((64,), 0.125, dtype=torch.float16)  # x_hat = 8 x: 480000 > 7 * 65504
    codes, scales, _ = ops.quantize_act(x, smooth, torch.zeros(64, 0, dtype=torch.float16), "int4")
    assert scales.item() == 65504.0
    assert layout.unpack_nibbles(codes, signed=True)[0, :2].tolist() == [7, -4]


def test_nvfp4_rounding_hand_cases():
    # amax 6 -> fp8 scale exactly 1.0; e2m1 ties go to the even mantissa; sign of zero is kept.
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.1, -6.0, 0.26, 0.0, 6.0, 2.9, -1.3, 4.9]
    x = torch.tensor([vals])
    codes, scales, _ = ops.quantize_act(x, torch.ones(16), torch.zeros(16, 0), "nvfp4")
    assert scales.dtype == torch.float8_e4m3fn and scales.float().item() == 1.0
    got = layout.unpack_nibbles(codes, signed=False)[0].tolist()
    #        .25 .75 1.25 1.75 2.5 3.5 5.0 5.5 -.1 -6  .26  0   6  2.9 -1.3 4.9
    assert got == [0, 2, 2, 4, 4, 6, 6, 7, 8, 15, 1, 0, 7, 5, 11, 6]


def test_unsigned_shift_applied_before_smoothing():
    # x = -0.171875 is exactly -shift: (x + shift) / smooth = 0 for any smooth.
    x = torch.full((1, 64), -0.171875)
    x[0, 0] = 1.0
    smooth = torch.full((64,), 2.0)
    codes, scales, _ = ops.quantize_act(x, smooth, torch.zeros(64, 0), "int4", True)
    assert scales.item() == pytest.approx((1.171875 / 2) / 15, rel=1e-7)
    v = layout.unpack_nibbles(codes, signed=False)[0]
    assert v[0] == 15 and (v[1:] == 0).all()


def test_zero_group_and_nan_propagation():
    x = torch.zeros(2, 128)
    x[1, 64] = float("nan")
    x[1, 0] = 1.0
    pd = torch.ones(128, 2)
    for precision in ("int4", "nvfp4"):
        codes, scales, down_act = ops.quantize_act(x, torch.ones(128), pd, precision)
        assert (codes[0] == 0).all() and (scales[0].float() == 0).all()
        gs = formats.GROUP_SIZE[precision]
        assert torch.isnan(scales[1, 64 // gs].float())  # the group holding the NaN
        assert not torch.isnan(scales[1, 0].float())
        w = layout.pack_nibbles(torch.ones(4, 128, dtype=torch.int8) * (1 if precision == "int4" else 2))
        ws = torch.ones(4, 128 // gs).to(scales.dtype)
        y = ops.gemm(codes, scales, w, ws, None, down_act, torch.zeros(4, 2), None, precision, torch.float32)
        assert (y[0] == 0).all() and torch.isnan(y[1]).all()  # NaN input is visible in the output


@pytest.mark.parametrize("precision,dtype", [("int4", torch.bfloat16), ("int4", torch.float16), ("nvfp4", torch.bfloat16)])
def test_inf_input_gives_non_finite_row_not_a_finite_wrong_one(precision, dtype):
    x = torch.randn(3, 128).to(dtype)
    x[1, 7] = float("inf")
    x[2, 9] = float("-inf")
    pd = torch.zeros(128, 0, dtype=dtype)
    codes, scales, down_act = ops.quantize_act(x, torch.ones(128, dtype=dtype), pd, precision)
    gs = formats.GROUP_SIZE[precision]
    w = layout.pack_nibbles(torch.randint(1, 7, (8, 128)))
    ws = torch.full((8, 128 // gs), 0.5).to(scales.dtype)
    y = ops.gemm(codes, scales, w, ws, None, down_act, torch.zeros(8, 0, dtype=dtype), None, precision,
                 torch.float32)
    assert torch.isfinite(y[0]).all()
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).any()


def test_w4a8_act_round_half_even_and_saturation():
    # amax 127 -> scale exactly 1: codes are round-half-even of the values; one scale for the whole row (K=128).
    vals = [0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5, 127.0, 3.49, 0.0]
    x = torch.zeros(1, 128)
    x[0, 64: 64 + len(vals)] = torch.tensor(vals)
    codes, scales, _ = ops.quantize_act(x, torch.ones(128), torch.zeros(128, 0), "w4a8")
    assert codes.dtype == torch.int8 and scales.shape == (1, 1) and scales.item() == 1.0
    codes = layout.w4a8_from_stored(codes)
    assert codes[0, 64: 64 + len(vals)].tolist() == [0, 2, 2, 0, -2, -126, 126, 127, 3, 0]
    assert (codes[0, :64] == 0).all()
    # fp16: amax / 127 overflows -> the scale saturates at 65504 and the codes clamp to +-127.
    x = torch.zeros(2, 64, dtype=torch.float16)
    x[0, 0], x[0, 1], x[0, 2] = 60000.0, -30000.0, 500.0
    smooth = torch.full((64,), 2.0**-8, dtype=torch.float16)  # x_hat = 256 x: 1.5e7 > 127 * 65504
    codes, scales, _ = ops.quantize_act(x, smooth, torch.zeros(64, 0, dtype=torch.float16), "w4a8")
    codes = layout.w4a8_from_stored(codes)
    assert scales[0].item() == 65504.0 and scales[1].item() == 0.0
    assert codes[0, :3].tolist() == [127, -117, 2]  # -7.68e6 / 65504 = -117.2; 128000 / 65504 = 1.95
    assert (codes[1] == 0).all()  # zero row: scale 0, codes 0


def test_w4a8_scale_is_rounded_to_the_input_dtype():
    # bf16: 100 / 127 = 0.78740 rounds to 0.7890625 (202 / 256), and the codes divide by the rounded scale:
    # 100 / s = 126.73 -> 127, s / 2 is an exact tie -> 0 (even), 50 / s = 63.37 -> 63.
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([100.0, 0.39453125, -0.39453125, 50.0])
    codes, scales, _ = ops.quantize_act(x, torch.ones(64, dtype=torch.bfloat16),
                                        torch.zeros(64, 0, dtype=torch.bfloat16), "w4a8")
    assert scales.dtype == torch.bfloat16 and scales.item() == 0.7890625
    assert layout.w4a8_from_stored(codes)[0, :4].tolist() == [127, 0, 0, 63]


def test_w4a8_codes_and_expanded_weights_share_the_channel_order():
    # Channel k of a row holds code k (k < 128 fits int8): the stored codes list each 32-channel slice's even
    # channels, then its odd ones; the expanded weight puts channel k at the same place, so the dot product pairs
    # equal channels.
    K = 128
    x = torch.arange(K, dtype=torch.float32).reshape(1, K)  # amax 127: scale 1, code k at channel k
    codes, scales, _ = ops.quantize_act(x, torch.ones(K), torch.zeros(K, 0), "w4a8")
    assert scales.item() == 1.0
    c = torch.arange(K).to(torch.int8)  # codes in natural order
    expected = torch.cat([torch.cat([c[s:s + 32:2], c[s + 1:s + 32:2]]) for s in range(0, K, 32)])
    assert torch.equal(codes[0], expected)
    assert layout.w4a8_channel_order(64)[:20].tolist() == [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                          8, 24, 9, 25]
    assert torch.equal(layout.w4a8_from_stored(layout.w4a8_to_stored(c)), c)
    vals = torch.arange(K).remainder(15) - 7  # codes -7..7, channel k -> (k % 15) - 7
    w = ops.expand_w4a8_weight(layout.pack_nibbles(vals.reshape(1, K)), torch.full((1, K // 64), 3, dtype=torch.uint8))
    assert torch.equal(layout.w4a8_from_stored(w)[0], (vals * 3).to(torch.int8))
    with pytest.raises(ValueError, match="K must be a positive multiple of 32"):
        layout.w4a8_channel_order(48)


def test_w4a8_nan_and_inf_rows():
    x = torch.randn(4, 128)
    x[1, 100] = float("nan")
    x[2, 7] = float("inf")
    x[3] = 0
    pd = torch.ones(128, 2)
    codes, scales, down_act = ops.quantize_act(x, torch.ones(128), pd, "w4a8")
    assert torch.isfinite(scales[0]).all() and torch.isnan(scales[1]).all() and torch.isinf(scales[2]).all()
    assert scales[3].item() == 0 and (codes[1] == 0).all() and (codes[3] == 0).all()
    w = layout.pack_nibbles(torch.randint(1, 7, (8, 128)))
    m = torch.full((8, 2), 3, dtype=torch.uint8)
    y = ops.gemm(codes, scales, w, m, torch.full((8,), 0.01), down_act, torch.zeros(8, 2), None, "w4a8",
                 torch.float32)
    assert torch.isfinite(y[0]).all() and (y[3] == 0).all()
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).any()  # bad input stays visible


def test_w4a8_gemm_is_one_integer_dot_over_k():
    # Hand case: every product is 127 * (7 * 18) = 16002, K = 128 -> dot = 2048256 exactly; then
    # float(dot) * (act_scale * s): act_scale 0.5 (x = 63.5), s = 2^-10.
    K = 128
    x = torch.full((1, K), 63.5)
    codes, scales, down_act = ops.quantize_act(x, torch.ones(K), torch.zeros(K, 0), "w4a8")
    assert scales.item() == 0.5 and (codes == 127).all()
    w = layout.pack_nibbles(torch.full((2, K), 7))
    m = torch.tensor([[18, 18], [1, 18]], dtype=torch.uint8)
    s = torch.tensor([2.0**-10, 1.0])
    y = ops.gemm(codes, scales, w, m, s, down_act, torch.zeros(2, 0), None, "w4a8", torch.float32)
    assert y[0, 0].item() == 2048256 * 0.5 * 2.0**-10
    assert y[0, 1].item() == float(127 * 7 * (18 + 1) * 64) * 0.5


def test_w4a8_gemm_at_the_k_limit_does_not_overflow():
    # The largest allowed K with every product at its maximum: 131072 * 16002 = 2097414144 < 2^31.
    K = _w4a8_max_k()
    codes = torch.full((1, K), 127, dtype=torch.int8)
    w = layout.pack_nibbles(torch.full((1, K), -7, dtype=torch.int8))
    m = torch.full((1, K // 64), 18, dtype=torch.uint8)
    y = ops.gemm(codes, torch.ones(1, 1), w, m, torch.ones(1), torch.zeros(1, 0), torch.zeros(1, 0), None,
                 "w4a8", torch.float32)
    assert y.item() == float(-16002 * K)


def test_formats_header_matches_python_constants():
    text = (Path(svdquant_ops.__file__).parent / "csrc" / "formats.h").read_text()

    def const(name):
        return float(re.search(rf"{name} = ([0-9.e+-]+)f?;", text).group(1))

    assert const("kInt4Group") == formats.GROUP_SIZE["int4"]
    assert const("kNvfp4Group") == formats.GROUP_SIZE["nvfp4"]
    assert const("kInt4Qmax") == formats.INT4_QMAX
    assert const("kUint4Qmax") == formats.UINT4_QMAX
    assert const("kActShift") == formats.ACT_SHIFT
    assert const("kNvfp4Qmax") == formats.NVFP4_QMAX
    assert const("kFp8E4m3Max") == formats.FP8_E4M3_MAX
    assert const("kInt8Qmax") == formats.INT8_QMAX
    assert const("kW4a8MultMax") == formats.W4A8_MULT_MAX
    assert formats.GROUP_SIZE["w4a8"] == formats.GROUP_SIZE["int4"]  # group_size(kW4a8) is the INT4 group
    checks = (Path(svdquant_ops.__file__).parent / "csrc" / "checks.h").read_text()
    assert int(re.search(r"kW4a8MaxK = ([0-9]+);", checks).group(1)) == _w4a8_max_k()


def test_pack_unpack_round_trip():
    g = generator(3)
    s = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int8)
    assert torch.equal(layout.unpack_nibbles(layout.pack_nibbles(s), signed=True), s)
    u = torch.randint(0, 16, (3, 2, 32), generator=g)
    assert torch.equal(layout.unpack_nibbles(layout.pack_nibbles(u), signed=False).long(), u)
    packed = layout.pack_nibbles(torch.tensor([[1, 2, -1, 7]]))
    assert packed.tolist() == [[0x21, 0x7F]]  # element 0 in the low nibble
