"""GPU tests of svdquant::w4a16_linear (csrc/cuda/w4a16.cu) against the CPU op (csrc/cpu/w4a16.cpp).

Skipped without a CUDA device (SVDQ_TEST_DEVICE=cpu runs the comparisons CPU against CPU: a self-check of this
file). Every case draws fresh random inputs (tests/builders.py session_generator; the seed is in the report header)
and compares the CUDA op with the CPU op element-wise, |gpu - cpu| <= allowed, where mag = |x| @ (|code * scale| +
|zero|).T + |bias| is the size of the terms the fp32 sums add:

* GEMV path (M <= 8 tokens): the CPU sums x * w with w = code * scale + zero in fp32, k ascending; the GPU sums the
  same quantity as scale * sum(x * code) + zero * sum(x) per 64-group, with exact products (codes and x are exact
  in bf16 / fp16 tensor-core inputs; fp32 x is split exactly into three bf16 pieces) and fp32 accumulation. Only
  the fp32 rounding of the sums differs. The CPU's sequential sum dominates it: typically sqrt(K) * u * mag (u =
  2^-24: ~3e-6 of mag at K = 3072; the worst case K * u is never approached by random signs), the GPU's path has
  ~100 additions. Allowed: 2e-5 * mag. A 16-bit output rounds two fp32 values that agree that closely, so it may
  differ by one unit in the last place on top.
* matmul path (M > 8): the weight is dequantized into x's dtype (each weight rounded once: relative error
  <= u = 2^-8 for bf16, 2^-11 for fp16, exact for fp32) and the bias too, then cuBLAS, which may round partial sums
  to the 16-bit dtype (PyTorch's default reduced-precision reductions). Allowed: (2e-5 + 2u) * mag + one ulp.

Also: leading dims and M = 0, unaligned and non-contiguous inputs, the GEMV path allocating nothing but its output,
determinism (bit-identical repeated runs), CUDA-graph replay equal to eager, torch.compile(fullgraph=True).
"""

from __future__ import annotations

import os

import pytest
import torch

# SVDQ_TEST_DEVICE=cpu runs the test logic CPU against CPU (a self-check of this file on machines without a GPU).
DEV = torch.device(os.environ.get("SVDQ_TEST_DEVICE", "cuda"))
if DEV.type == "cuda" and not torch.cuda.is_available():  # pragma: no cover - CPU-only CI
    pytest.skip("CUDA is not available", allow_module_level=True)

from svdquant_ops import layout, ops  # noqa: E402

from .builders import assert_cuda_graph_replays_eager, session_generator  # noqa: E402
from .test_w4a16_op import w4a16_args, w4a16_inputs  # noqa: E402

ops.load()
OPS = torch.ops.svdquant
ON_GPU = DEV.type == "cuda"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
ULP_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
GEMV_MAX_M = 8
BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def to_dev(args):
    return [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]


def magnitude(a: dict) -> torch.Tensor:
    """|x| @ (|code * scale| + |zero|).T + |bias|: the scale of the fp32 sums' rounding (both paths). Per group,
    sum_k |x| * code * |s| + sum_k |x| * |z| (float32 is plenty for a tolerance and needs no [N, K] float copy)."""
    K = a["x"].shape[-1]
    G = K // 64
    x = a["x"].to(DEV).float().abs().reshape(-1, G, 64).transpose(0, 1)  # [G, M, 64]
    c = layout.unpack_nibbles(a["codes"].to(DEV), signed=False).reshape(-1, G, 64).transpose(0, 1)  # [G, N, 64]
    dots = torch.bmm(x, c.float().transpose(1, 2)).permute(1, 2, 0)  # [M, N, G]
    mag = (dots * a["scales"].to(DEV).float().abs()).sum(-1) + x.sum(-1).T @ a["zeros"].to(DEV).float().abs().T
    if a["bias"] is not None:
        mag = mag + a["bias"].to(DEV).float().abs()
    return mag.double().cpu().reshape(*a["x"].shape[:-1], -1)


def assert_close_to_cpu(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, M: int, what: str):
    out = out.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, out.shape, ref.shape)
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite output"
    dtype = ref.dtype
    u = {BF: 2.0**-8, F16: 2.0**-11, F32: 0.0}[dtype] if M > GEMV_MAX_M else 0.0
    allowed = (2e-5 + 2 * u) * mag
    if dtype != F32:
        r = ref.double()
        allowed = allowed + torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(1e-30))) - (ULP_BITS[dtype] - 1))
    err = (out.double() - ref.double()).abs()
    bad = err > allowed
    assert not bad.any(), (f"{what}: {bad.sum().item()} of {ref.numel()} elements off; worst err/mag "
                           f"{(err / mag.clamp_min(1e-30)).max().item():.3e}")


def run_case(lead, N, K, x_dtype, scale_dtype, bias=True, key=None):
    a = w4a16_inputs(lead, N, K, x_dtype, scale_dtype, session_generator(key or (lead, N, K, str(x_dtype),
                                                                                  str(scale_dtype), str(bias))),
                     bias=bias)
    ref = OPS.w4a16_linear(*w4a16_args(a))
    out = OPS.w4a16_linear(*to_dev(w4a16_args(a)))
    M = a["x"].numel() // K
    assert_close_to_cpu(out, ref, magnitude(a), M, f"M={M} N={N} K={K} x {x_dtype} "
                        f"scales {scale_dtype} bias {bias}")
    return a, out


CASES = [
    # (M, K, N, x dtype, scale dtype, bias): M <= 8 -> GEMV kernel
    (1, 64, 1, BF, BF, True),
    (1, 3072, 3072, BF, BF, True),
    (1, 3072, 18432, BF, BF, False),  # FLUX AdaLN modulation (one token)
    (2, 192, 7, F16, F32, True),
    (3, 3072, 3072, F32, BF, True),  # fp32 x: three bf16 pieces
    (4, 192, 18432, BF, F16, True),
    (8, 3072, 3072, BF, BF, True),
    (8, 3072, 18432, F16, F16, False),
    (8, 64, 7, F32, F32, True),
    (5, 4096, 1000, BF, BF, True),  # N % 16 != 0: the last tile reads row N - 1 for its missing rows
    (2, 3072, 24576, BF, BF, True),
    (1, 4096, 32768, BF, BF, True),  # more tiles than a block's partial sums hold: a second wave of blocks
    (4, 64, 70001, BF, BF, True),  # one-warp blocks (a single K slice), many tiles each, ragged tail
    (8, 16384, 96, BF, BF, True),  # 64 K slices over 16 warps: each warp adds several slices into its partials
    (7, 15360, 33, F32, BF, True),  # fp32 x: one-group slices, 240 of them
    (3, 320, 40, F16, BF, True),  # 5 groups: a slice with 3 groups past K (zero fragments)
    (1, 192, 7, F32, F16, False),
    # M > 8 -> dequantize + cuBLAS
    (9, 192, 7, BF, BF, True),
    (9, 3072, 18432, F16, F16, False),
    (64, 3072, 3072, BF, F32, True),
    (64, 64, 1, F32, BF, True),
    (33, 192, 18432, F32, F32, True),
]


@pytest.mark.parametrize("M,K,N,x_dtype,scale_dtype,bias", CASES, ids=[f"M{c[0]}-K{c[1]}-N{c[2]}-{str(c[3])[6:]}-"
                                                                        f"{str(c[4])[6:]}-{'b' if c[5] else 'nob'}"
                                                                        for c in CASES])
def test_matches_cpu(M, K, N, x_dtype, scale_dtype, bias):
    run_case((M,), N, K, x_dtype, scale_dtype, bias)


@pytest.mark.parametrize("x_dtype,bias_dtype", [(BF, F32), (F16, BF), (F32, F16)])
@pytest.mark.parametrize("M", [2, 12])
def test_bias_dtype_differs_from_x(M, x_dtype, bias_dtype):
    run_case((M,), 96, 256, x_dtype, BF, bias_dtype)


@pytest.mark.parametrize("lead", [(2, 3), (3, 4), (0,), (2, 0, 5), ()], ids=str)
def test_leading_dims(lead):
    a = w4a16_inputs(lead, 40, 192, BF, BF, session_generator(("lead", lead)))
    ref = OPS.w4a16_linear(*w4a16_args(a))
    out = OPS.w4a16_linear(*to_dev(w4a16_args(a)))
    assert out.shape == (*lead, 40) and out.device.type == DEV.type
    M = a["x"].numel() // 192
    if M:
        assert_close_to_cpu(out, ref, magnitude(a), M, f"lead {lead}")


def _offset(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is `elements` elements past an allocation's start."""
    out = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)[elements:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("K", [320, 256])
def test_unaligned_and_non_contiguous_inputs(M, K):
    """Data pointers off 16-byte alignment (x and codes: the op clones them; scales and zeros: 2-byte aligned, read
    without the 8-byte vector loads) and strided views (made contiguous): the same result as the contiguous, aligned
    call."""
    a = w4a16_inputs((M,), 72, K, BF, BF, session_generator(("unaligned", M, K)))
    args = to_dev(w4a16_args(a))
    ref = OPS.w4a16_linear(*args)
    cpu_ref, mag = OPS.w4a16_linear(*w4a16_args(a)), magnitude(a)
    x, codes, scales, zeros, bias = args

    def check(out, what):
        if M <= GEMV_MAX_M:  # our kernel: the same result, bit for bit
            assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), what
        else:  # cuBLAS may pick another algorithm for another pointer alignment: within tolerance of the CPU op
            assert_close_to_cpu(out, cpu_ref, mag, M, what)

    check(OPS.w4a16_linear(_offset(x, 1), _offset(codes, 3), _offset(scales, 1), _offset(zeros, 3), bias), "offsets")
    scales_t = scales.T.contiguous().T
    zeros_w = torch.cat([zeros, zeros], 1)[:, : zeros.shape[1]]
    bias_s = torch.stack([bias, bias], 1)[:, 0]
    assert not (scales_t.is_contiguous() or zeros_w.is_contiguous() or bias_s.is_contiguous())
    check(OPS.w4a16_linear(x, codes, scales_t, zeros_w, bias_s), "strided")
    check(OPS.w4a16_linear(x.T.contiguous().T if M > 1 else x, codes, scales, zeros, bias), "x column-major")


@needs_gpu
def test_gemv_allocates_only_its_output():
    """The GEMV path reads the packed weights directly: no 16-bit weight (2 * N * K bytes) is ever allocated."""
    M, N, K = 4, 18432, 3072
    x, codes, scales, zeros, bias = to_dev(w4a16_args(w4a16_inputs((M,), N, K, BF, BF, session_generator(3))))
    OPS.w4a16_linear(x, codes, scales, zeros, bias)  # first call: one-time setup
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = OPS.w4a16_linear(x, codes, scales, zeros, bias)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= max(y.numel() * y.element_size(), 512)


# ------------------------------------------------------------------------------------------------------------------
# determinism, CUDA graphs, torch.compile
# ------------------------------------------------------------------------------------------------------------------
def _dev_inputs(M, N=3072, K=3072, x_dtype=BF, seed=31):
    return to_dev(w4a16_args(w4a16_inputs((M,), N, K, x_dtype, BF, session_generator((seed, M, N, K)))))


@pytest.mark.parametrize("M,x_dtype", [(1, BF), (8, F16), (3, F32), (16, BF)])
def test_deterministic(M, x_dtype):
    args = _dev_inputs(M, N=18432, x_dtype=x_dtype)
    first = OPS.w4a16_linear(*args)
    bits = {2: torch.int16, 4: torch.int32}[first.element_size()]
    for _ in range(3):
        assert torch.equal(OPS.w4a16_linear(*args).view(bits), first.view(bits))


@needs_gpu
@pytest.mark.parametrize("M", [1, 8, 16])
def test_cuda_graph_replay_equals_eager(M):
    x, codes, scales, zeros, bias = _dev_inputs(M)

    def fn(inp):
        return OPS.w4a16_linear(inp, codes, scales, zeros, bias)

    assert_cuda_graph_replays_eager(fn, x)


@needs_gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    x, codes, scales, zeros, bias = _dev_inputs(1, N=9216)

    def fn(inp):
        return ops.w4a16_linear(inp, codes, scales, zeros, bias)

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    for _ in range(3):
        y = compiled(x)
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), eager.view(torch.int16))


# ---------------------------------------------------------------------------------------------------------------
# w4a16_linear_group: one GEMV launch over several weights (up to 48 per launch), each output equal to its weight's
# w4a16_linear on the GPU bit for bit (the grouped kernel sums every row as the single one does); where the group
# cannot be one launch (M > 8, a weight with N % 16 != 0, two bias dtypes, two scale dtypes), one call per weight.
# ---------------------------------------------------------------------------------------------------------------
def _group_inputs(M, Ns, K, x_dtype=BF, scale_dtype=BF, biases=None, key="group"):
    g = session_generator((key, M, tuple(Ns), K, str(x_dtype), str(scale_dtype), str(biases)))
    ws = [w4a16_inputs((M,), N, K, x_dtype, scale_dtype if not isinstance(scale_dtype, list) else scale_dtype[i], g,
                       bias=True if biases is None else biases[i]) for i, N in enumerate(Ns)]
    x = ws[0]["x"].to(DEV)
    lists = [[w[k].to(DEV) if w[k] is not None else None for w in ws] for k in ("codes", "scales", "zeros", "bias")]
    return x, lists


def _group_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "w4a16_gemv" in e.name]


GROUP_CASES = [
    # (M, Ns, K, x dtype, scale dtype, biases, grouped launches expected (0: one call per weight))
    (1, [18432, 18432, 9216, 6144], 3072, BF, BF, None, 1),  # FLUX AdaLN modulation shapes
    (8, [16, 48, 32], 192, F16, F32, [True, False, True], 1),
    (3, [64, 16], 3072, F32, BF, None, 1),  # fp32 x: three bf16 pieces
    (2, [32] * 50, 320, BF, BF, None, 2),  # 50 weights: two launches of 25; K = 320: the generic (not full) kernel
    (1, [16, 7, 32], 192, BF, BF, None, 0),  # N = 7: one call per weight
    (9, [16, 32], 192, BF, BF, None, 0),  # M > 8: matmul path per weight
    (1, [16, 32], 192, BF, BF, [torch.float32, torch.bfloat16], 0),  # two bias dtypes
    (1, [16, 32], 192, BF, [BF, F16], None, 0),  # two scale dtypes
]


@needs_gpu
@pytest.mark.parametrize("M,Ns,K,x_dtype,scale_dtype,biases,launches", GROUP_CASES,
                         ids=[f"M{c[0]}-n{len(c[1])}-K{c[2]}-{c[6]}" for c in GROUP_CASES])
def test_group_equals_single_calls(M, Ns, K, x_dtype, scale_dtype, biases, launches):
    x, (codes, scales, zeros, bias) = _group_inputs(M, Ns, K, x_dtype, scale_dtype, biases)
    out = OPS.w4a16_linear_group(x, codes, scales, zeros, bias)
    for i, o in enumerate(out):
        ref = OPS.w4a16_linear(x, codes[i], scales[i], zeros[i], bias[i])
        assert o.shape == ref.shape and torch.equal(o, ref), f"weight {i} (N={Ns[i]})"
    names = _group_kernels(lambda: OPS.w4a16_linear_group(x, codes, scales, zeros, bias))
    assert sum("group_kernel" in n for n in names) == launches, names
    if launches:
        assert not [n for n in names if "group_kernel" not in n], names


@needs_gpu
def test_group_deterministic_and_cuda_graph_replay_equals_eager():
    x, (codes, scales, zeros, bias) = _group_inputs(1, [18432, 9216, 6144], 3072, key="group-graph")

    def fn(inp):
        return torch.cat(OPS.w4a16_linear_group(inp, codes, scales, zeros, bias), dim=-1)

    first = fn(x)
    for _ in range(3):
        assert torch.equal(fn(x).view(torch.int16), first.view(torch.int16))
    assert_cuda_graph_replays_eager(fn, x)


@needs_gpu
def test_group_with_mixed_alignment_runs_one_call_per_weight():
    """One weight's scales and zeros start 2 bytes past an 8-byte boundary (the single op runs the generic kernel for
    it, the lean one for the others): the group runs one call per weight, each equal to its single call."""
    x, (codes, scales, zeros, bias) = _group_inputs(1, [32, 48], 3072, key="group-align")

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    scales[1], zeros[1] = shifted(scales[1]), shifted(zeros[1])
    out = OPS.w4a16_linear_group(x, codes, scales, zeros, bias)
    for i, o in enumerate(out):
        assert torch.equal(o, OPS.w4a16_linear(x, codes[i], scales[i], zeros[i], bias[i]))
    names = _group_kernels(lambda: OPS.w4a16_linear_group(x, codes, scales, zeros, bias))
    assert len(names) == 2 and not [n for n in names if "group_kernel" in n], names
