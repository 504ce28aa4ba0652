"""GPU tests of the CUDA kernels of ``torch.ops.svdquant`` against the CPU reference kernels.

Skipped without a CUDA device. Every check draws fresh random inputs, runs the CUDA op and the CPU op (the
executable specification) on the same inputs and compares:

* quantize_act: codes and scales bit-exact (NaN scales compared by position); down_act (x @ proj_down in fp32)
  to a relative Frobenius error below 1e-5. The GPU sums the exact bf16/fp16 products in another order than the
  CPU's BLAS, so only fp32 rounding differs: ~1e-7 * sqrt(K) relative.
* gemm with out_dtype float32: relative Frobenius error below 1e-4 and every element within
  1e-4 * (|ref| + rms(ref)). Sources of difference, all at fp32-rounding level: the GPU accumulates groups with FMA
  in another order; the Hopper path feeds the low-rank branch to bf16 tensor cores as down_act = hi + lo (and
  proj_up = hi + lo when proj_up is not bf16), which keeps ~16 mantissa bits (relative error <= 2^-16 of the branch).
  Observed on an H200: fp32 relative error 2e-7..7e-7; the portable path is bit-identical to the CPU op.
* gemm with bf16 / fp16 outputs: both sides round fp32 values that agree within the fp32 criterion above, so
  they may differ by one unit in the last place of the output dtype plus that fp32 tolerance (element-wise).

Both CUDA paths are tested: the Hopper kernels (on compute capability 9.0) and the portable kernels, forced with
SVDQUANT_OPS_CUDA_PORTABLE=1. Also: determinism (bit-identical repeated runs), CUDA-graph replay equal to eager,
and torch.compile(mode="reduce-overhead"). Inputs: tests/builders.py.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

# SVDQ_TEST_DEVICE=cpu runs the test logic CPU against CPU (a self-check of this file on machines without a GPU).
DEV = torch.device(os.environ.get("SVDQ_TEST_DEVICE", "cuda"))
if DEV.type == "cuda" and not torch.cuda.is_available():  # pragma: no cover - CPU-only CI
    pytest.skip("CUDA is not available", allow_module_level=True)

from svdquant_ops import layout, ops  # noqa: E402

# session_generator(key): fresh inputs every session; SVDQ_TEST_SEED (printed in the report header) replays a run.
from .builders import (  # noqa: E402
    act_inputs, assert_cuda_graph_replays_eager, gemm_inputs, linear_inputs, op_args, packed_w4a8_weight,
    session_generator, weight_inputs)

ops.load()  # builds / loads the library with its CUDA kernels
OPS = torch.ops.svdquant
ON_GPU = DEV.type == "cuda"
IS_SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
PATHS = ["fast", "portable"]
ULP_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def _select_path(monkeypatch, name):
    for var, on in (("SVDQUANT_OPS_CUDA_PORTABLE", name == "portable"),
                    ("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", name == "cluster")):
        if on:
            monkeypatch.setenv(var, "1")
        else:
            monkeypatch.delenv(var, raising=False)
    if name.startswith("gmax-"):  # W4A8's first pass by the named kernel: gmax-pipe (Hopper), gmax-regs, gmax-lean
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_GMAX", name[len("gmax-"):])
    elif name == "qa-plain":  # both W4A8 passes without their lean variants (the bench's -qaregs rows)
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_GMAX", "regs")
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_GMAX", raising=False)
    if name in ("token-plain", "qa-plain"):  # W4A8's token kernel without its lean loop (the default has it)
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN", "0")
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN", raising=False)
    if name.startswith("tile"):  # W4A8's Hopper GEMM on 128 x 128 or 128 x 256 tiles: tile128, tile256
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", name[len("tile"):len("tile256")])
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_TILE", raising=False)
    if name == "tile256-shfl":  # ... with the tile's channel scales and bias by warp shuffles (the default: smem)
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_EPI", "shfl")
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_EPI", raising=False)
    # W4A8's Hopper GEMM on packed weights expanded in registers (regs), or on weights expanded by the prep kernel
    # (the tile widths are the prep path's)
    if name == "regs" or name.startswith("tile"):
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "regs" if name == "regs" else "prep")
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", raising=False)
    if name in ("token-split", "token-nosplit"):  # W4A8's token kernel with / without K split where M is small
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", "1" if name == "token-split" else "0")
    else:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", raising=False)
    return name


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    return _select_path(monkeypatch, request.param)


@pytest.fixture(params=["fast", "gmax-pipe", "gmax-regs", "gmax-lean", "token-plain", "qa-plain", "token-split",
                        "token-nosplit", "cluster", "portable"])
def w4a8_path(request, monkeypatch):
    """W4A8's quantize_act has three fast paths on Hopper: the two passes (the default, "fast"), whose first pass is
    the register-prefetch kernel's lean variant for R <= 32 (the default; =lean names it: "gmax-lean"; the same
    arithmetic as the register-prefetch kernel, fewer instructions around it), the pipelined group-max kernel where
    R <= 64 with SVDQUANT_OPS_CUDA_W4A8_GMAX=pipe ("gmax-pipe") or the register-prefetch kernel with =regs
    ("gmax-regs"; ranks above 32 take it by default), the token kernel with its lean loop (the default) or without it,
    SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=0 ("token-plain"; "qa-plain": neither lean variant), and, opted into with
    SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1 ("cluster"), one pass by the cluster kernel where K splits into at most 8 slices
    of at most 1920 channels. The second pass splits K over blocks where M is small (the default; also forced with
    SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=1, "token-split", any GPU), or not with =0 ("token-nosplit")."""
    return _select_path(monkeypatch, request.param)


def to_dev(args):
    return [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]


# ------------------------------------------------------------------------------------------------------------------
# comparison helpers
# ------------------------------------------------------------------------------------------------------------------
def assert_bits_equal(gpu: torch.Tensor, cpu: torch.Tensor, what: str):
    gpu = gpu.cpu()
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype, what
    if gpu.dtype == torch.uint8:
        mism = (gpu != cpu).sum().item()
        assert mism == 0, f"{what}: {mism} of {cpu.numel()} bytes differ"
        return
    gf, cf = gpu.float(), cpu.float()
    nan_g, nan_c = torch.isnan(gf), torch.isnan(cf)
    assert torch.equal(nan_g, nan_c), f"{what}: NaN positions differ"
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[gpu.element_size()]
    gb, cb = gpu.view(bits)[~nan_c], cpu.view(bits)[~nan_c]
    mism = (gb != cb).sum().item()
    assert mism == 0, f"{what}: {mism} of {cpu.numel()} values differ"


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def assert_output_close(gpu: torch.Tensor, ref: torch.Tensor, what: str):
    gpu = gpu.cpu()
    assert gpu.dtype == ref.dtype and gpu.shape == ref.shape, what
    assert torch.isfinite(gpu.float()).all(), f"{what}: non-finite output"
    g, r = gpu.double(), ref.double()
    if ref.dtype == torch.float32:
        err = rel_fro(g, r)
        assert err < 1e-4, f"{what}: relative Frobenius error {err:.3e}"
        rms = r.pow(2).mean().sqrt().item() if r.numel() else 0.0
        bad = ((g - r).abs() > 1e-4 * (r.abs() + rms)).sum().item()
        assert bad == 0, f"{what}: {bad} elements off by more than 1e-4 * (|ref| + rms)"
    else:
        # The fp32 results agree within the fp32 criterion above (1e-4 * (|ref| + rms)); rounding both to 16 bits
        # adds at most one unit in the last place of the output dtype.
        ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(1e-30))) - (ULP_BITS[ref.dtype] - 1))
        rms = r.pow(2).mean().sqrt().item() if r.numel() else 0.0
        bad = ((g - r).abs() > ulp * 1.0001 + 1e-4 * (r.abs() + rms)).sum().item()
        assert bad == 0, f"{what}: {bad} elements differ by more than one ulp + the fp32 tolerance"


# ------------------------------------------------------------------------------------------------------------------
# quantize_act
# ------------------------------------------------------------------------------------------------------------------
QA_CASES = [
    # (M, K, R, dtype, precision, unsigned)
    (1, 64, 0, torch.bfloat16, "int4", False),
    (1, 3072, 32, torch.bfloat16, "int4", False),
    (7, 192, 16, torch.bfloat16, "int4", False),
    (33, 640, 32, torch.float16, "int4", False),
    (130, 1024, 64, torch.bfloat16, "int4", False),
    (257, 512, 32, torch.bfloat16, "int4", True),
    (45, 256, 24, torch.float16, "int4", True),
    (64, 128, 20, torch.bfloat16, "int4", False),  # R % 8 != 0: portable path
    (100, 320, 32, torch.float32, "int4", False),  # fp32 input: portable path
    (5, 256, 32, torch.bfloat16, "nvfp4", False),
    (129, 768, 64, torch.float16, "nvfp4", False),
    (3, 48, 16, torch.bfloat16, "nvfp4", False),  # K % 64 != 0: portable path
    (64, 96, 0, torch.float32, "nvfp4", False),
    (1200, 3072, 32, torch.bfloat16, "int4", False),  # > 32 * SMs rows on some GPUs: 32-row blocks
    (4224, 256, 32, torch.bfloat16, "int4", False),
    (1, 64, 0, torch.bfloat16, "w4a8", False),
    (33, 640, 32, torch.float16, "w4a8", False),
    (130, 3072, 32, torch.bfloat16, "w4a8", False),
    (64, 128, 20, torch.bfloat16, "w4a8", False),  # R % 8 != 0: portable path
    (100, 320, 32, torch.float32, "w4a8", False),  # fp32 input: portable path
    (1200, 3072, 64, torch.bfloat16, "w4a8", False),
    (77, 1344, 16, torch.float16, "w4a8", False),  # K % 256 != 0: the token kernel's tail loop
    # 64 < R <= 128 (a LoRA fused into a shared branch): the fast kernel's RP = 128 instantiation
    (130, 1024, 80, torch.bfloat16, "int4", False),
    (45, 512, 128, torch.float16, "nvfp4", False),
    (257, 3072, 128, torch.bfloat16, "w4a8", False),
    (33, 768, 96, torch.bfloat16, "int4", True),
    # shapes for W4A8's opt-in cluster kernel (Hopper; test_quantize_act_w4a8_other_paths_match_cpu): 8 CTAs of
    # 768 / 1536 / 1920 channels, 8 of 512 (K = 4096), 1 of 576; token counts that are not multiples of its 16 rows;
    # R = 16 / 24 (padded to 32) / 128 / 0
    (40, 6144, 16, torch.bfloat16, "w4a8", False),
    (129, 12288, 32, torch.float16, "w4a8", False),
    (65, 15360, 128, torch.bfloat16, "w4a8", False),
    (31, 4096, 24, torch.bfloat16, "w4a8", False),
    (17, 576, 0, torch.float16, "w4a8", False),
    (16, 128, 16, torch.bfloat16, "w4a8", False),  # K < 256: lanes of the token kernel with no channels
    # W4A8's pipelined group-max pass (Hopper, R <= 64): a FLUX step's image + text tokens (132 SMs: 3 slices of 16
    # chunks), the text stream alone (32 slices of 6 chunks), 31 chunks (the last slice's last round has one chunk:
    # one k-warp idle), R = 64 (3 stages)
    (4608, 3072, 32, torch.bfloat16, "w4a8", False),
    (512, 12288, 32, torch.bfloat16, "w4a8", False),
    (2500, 1984, 64, torch.float16, "w4a8", False),
]
W4A8_QA_CASES = [c[:4] for c in QA_CASES if c[4] == "w4a8"]


@pytest.mark.parametrize("M,K,R,dtype,precision,unsigned", QA_CASES)
def test_quantize_act_matches_cpu(path, M, K, R, dtype, precision, unsigned):
    g = session_generator((M, K, R, str(dtype), precision, unsigned))
    x, smooth, pd = op_args("quantize_act", act_inputs(M, K, R, dtype, g, unsigned=unsigned))
    ref = OPS.quantize_act(x, smooth, pd, precision, unsigned)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), precision, unsigned)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    assert out[2].shape == ref[2].shape and out[2].dtype == torch.float32
    if R > 0:
        assert rel_fro(out[2], ref[2]) < 1e-5


@pytest.mark.parametrize("other", ["cluster", "gmax-pipe", "gmax-regs", "gmax-lean", "token-plain", "qa-plain",
                                   "token-split", "token-nosplit"])
@pytest.mark.parametrize("M,K,R,dtype", W4A8_QA_CASES)
def test_quantize_act_w4a8_other_paths_match_cpu(monkeypatch, other, M, K, R, dtype):
    """The W4A8 cases above again with the cluster kernel opted into (on Hopper it serves those whose K splits), with
    each group-max kernel named (the lean one too), with the token kernel's plain loop (alone and with the
    register-prefetch first pass), and with the token kernel's K split forced on (all but the 4608-token cases split
    K) and off."""
    _select_path(monkeypatch, other)
    g = session_generator((other, M, K, R, str(dtype)))
    x, smooth, pd = op_args("quantize_act", act_inputs(M, K, R, dtype, g))
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "w4a8", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    if R > 0:
        assert rel_fro(out[2], ref[2]) < 1e-5


def _w4a8_quantize_kernels(M, K, R):
    """Names of the CUDA kernels one W4A8 quantize_act call launches (after a warm-up call)."""
    x, smooth, pd = to_dev(op_args("quantize_act", act_inputs(M, K, R, torch.bfloat16, session_generator((K, R)))))
    OPS.quantize_act(x, smooth, pd, "w4a8", False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.quantize_act(x, smooth, pd, "w4a8", False)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.skipif(not IS_SM90, reason="the cluster kernel runs on compute capability 9.0 only")
@pytest.mark.parametrize("M,K,mode,cluster", [(64, 3072, "1", True), (64, 15360, "1", True), (64, 1344, "1", False),
                                              (64, 3072, None, False), (64, 3072, "0", False),
                                              (512, 3072, "small", True), (1024, 12288, "small", True),
                                              (1025, 3072, "small", False), (4608, 3072, "small", False),
                                              (4608, 3072, "1", True)])
def test_quantize_act_w4a8_cluster_dispatch(monkeypatch, M, K, mode, cluster):
    """Which kernels a W4A8 quantize_act launches: with SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1, the cluster kernel alone
    where K splits (3072: 4 slices, 15360: 8) and the two passes where it does not (1344 = 21 x 64); with =small, the
    cluster kernel for calls of at most 1024 tokens (kW4a8ClusterSmallTokens) and the two passes above; unset or 0,
    the two passes."""
    _select_path(monkeypatch, "fast")  # no other switch left set by the caller
    if mode is None:
        monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", raising=False)
    else:
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", mode)
    launched = [n for n in _w4a8_quantize_kernels(M, K, 32) if "quantize" in n]
    if cluster:
        assert len(launched) == 1 and "quantize_w4a8_cluster_kernel" in launched[0], launched
    else:
        assert launched and not any("cluster" in n for n in launched), launched


@needs_gpu
@pytest.mark.parametrize("path", PATHS)
def test_quantize_act_w4a8_cluster_switch_rejects_other_values(monkeypatch, path):
    """A value of SVDQUANT_OPS_CUDA_W4A8_CLUSTER other than 0 / 1 / small is an error naming the variable, on every
    W4A8 path (it is read before any launch), not a silent choice of either kernel."""
    _select_path(monkeypatch, path)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", "yes")
    x, smooth, pd = to_dev(op_args("quantize_act", act_inputs(64, 3072, 32, torch.bfloat16,
                                                              session_generator((3072, 32)))))
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_CLUSTER must be '0', '1', 'small' or unset, got 'yes'"):
        OPS.quantize_act(x, smooth, pd, "w4a8", False)


# The library's default for W4A8's first pass (kW4a8GroupMaxDefault in quantize_act.cu)
GMAX_DEFAULT = "lean"


@pytest.mark.skipif(not IS_SM90, reason="the pipelined group-max kernel runs on compute capability 9.0 only")
@pytest.mark.parametrize("R,gmax,pipelined,lean", [(32, "pipe", True, False), (64, "pipe", True, False),
                                                   (0, "pipe", True, False), (128, "pipe", False, False),
                                                   (32, "regs", False, False), (32, "lean", False, True),
                                                   (0, "lean", False, True), (64, "lean", False, False),
                                                   (32, None, GMAX_DEFAULT == "pipe", GMAX_DEFAULT == "lean")])
def test_quantize_act_w4a8_groupmax_dispatch(monkeypatch, R, gmax, pipelined, lean):
    """Which kernel runs W4A8's first pass: with SVDQUANT_OPS_CUDA_W4A8_GMAX=pipe the pipelined group-max kernel for
    R <= 64 and the register-prefetch one for R = 128; with =regs the register-prefetch one; with =lean its lean
    variant (the kernel's last template argument 1 or 2) for R <= 32 and the register-prefetch one above; unset, the
    default."""
    _select_path(monkeypatch, f"gmax-{gmax}" if gmax else "fast")
    names = _w4a8_quantize_kernels(256, 3072, R)
    assert any("quantize_tokens_fast_kernel" in n for n in names), names
    # K is split into slices here; the token kernel adds their down_act partial sums (no reduce launch)
    assert not any("down_act_split_reduce_kernel" in n for n in names), names
    assert any("quantize_w4a8_groupmax_pipe_kernel" in n for n in names) == pipelined, names
    # the fast kernel's last template argument: 0 the register-prefetch kernel, 1 / 2 its lean variant (x streamed /
    # kept in L2: 2 here, where x fits in half of L2)
    modes = [re.search(r"quantize_fast_kernel<[^>]*, (\d)>\(", n) for n in names if "quantize_fast_kernel<" in n]
    assert bool(modes) == (not pipelined), names
    assert all(m is not None and (m.group(1) != "0") == lean for m in modes), names


@needs_gpu
def test_quantize_act_w4a8_groupmax_variable_checked(monkeypatch):
    """A value of SVDQUANT_OPS_CUDA_W4A8_GMAX other than regs / pipe / lean is an error naming the variable."""
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_GMAX", "fast")
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_PORTABLE", raising=False)
    x, smooth, pd = to_dev(op_args("quantize_act", act_inputs(64, 3072, 32, torch.bfloat16, session_generator(7))))
    expected = "SVDQUANT_OPS_CUDA_W4A8_GMAX must be 'regs', 'pipe', 'lean' or unset, got 'fast'"
    with pytest.raises(RuntimeError, match=expected):
        OPS.quantize_act(x, smooth, pd, "w4a8", False)


@needs_gpu
@pytest.mark.parametrize("name,lean", [("fast", True), ("token-plain", False), ("qa-plain", False)])
def test_quantize_act_w4a8_token_lean_dispatch(monkeypatch, name, lean):
    """The token kernel with its lean loop (template argument true) runs by default, and without it (false) where
    SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=0 asks for that."""
    _select_path(monkeypatch, name)
    names = [n for n in _w4a8_quantize_kernels(256, 3072, 32) if "quantize_tokens_fast_kernel<" in n]
    assert names and all((", true>(" in n) == lean for n in names), names


@needs_gpu
@pytest.mark.parametrize("var", ["SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", "SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN"])
def test_quantize_act_w4a8_token_variables_checked(monkeypatch, var):
    """A value of the token kernel's switches other than 1 / 0 is an error naming the variable."""
    _select_path(monkeypatch, "fast")
    monkeypatch.setenv(var, "yes")
    x, smooth, pd = to_dev(op_args("quantize_act", act_inputs(64, 3072, 32, torch.bfloat16, session_generator(8))))
    with pytest.raises(RuntimeError, match=f"{var} must be '1', '0' or unset, got 'yes'"):
        OPS.quantize_act(x, smooth, pd, "w4a8", False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_act_w4a8_specials_in_every_slice(w4a8_path, dtype):
    """K = 15360 (the cluster kernel's 8 slices of 1920): NaN, Inf, huge, tiny and zero rows, and a smooth value
    outside [2^-20, 2^20], placed in the last slice and in a middle one, so that a peer's partial amax decides
    whether a token takes the exact path; the other tokens of those 16-row tiles must stay exact too."""
    g = session_generator(("specials", str(dtype)))
    M, K = 37, 15360
    x, smooth, pd = op_args("quantize_act", act_inputs(M, K, 32, torch.float32, g))
    last, mid = K - 5, 7 * 1920 // 2
    x[1, last] = float("nan")
    x[2, mid] = float("inf")
    x[3] = 0.0
    x[4] = x[4] * 1e-12
    x[4, mid] = 0.0
    x[17, last] = 3e4 if dtype == torch.float16 else 2.0**70
    x[18, mid] = float("nan")
    x[33, last] = -0.0
    if dtype == torch.bfloat16:
        smooth[K - 1] = 2.0**-30  # no fast reciprocal: every token's amax comes from the exact path
        x[:, K - 1] *= 2.0**-30
    x, smooth, pd = x.to(dtype), smooth.to(dtype), pd.to(dtype)
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "w4a8", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    finite = torch.isfinite(ref[2]).all(1)
    assert torch.equal(finite, torch.isfinite(out[2].cpu()).all(1))
    assert rel_fro(out[2][finite.to(out[2].device)], ref[2][finite]) < 1e-5


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False), ("w4a8", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_act_wide_range_bit_exact(path, precision, unsigned, dtype):
    """Magnitudes over ~80 binades, zeros, -0.0 and tiny values exercise the exact-division fallbacks."""
    g = session_generator(1234 + int(unsigned) + {"int4": 0, "nvfp4": 7, "w4a8": 11}[precision])
    x, smooth, pd = op_args("quantize_act", act_inputs(300, 1024, 32, torch.float32, g, unsigned=unsigned, wide=True))
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
        smooth = smooth.clamp(1e-4, 6e4)
    x, smooth, pd = x.to(dtype), smooth.to(dtype), pd.to(dtype)
    ref = OPS.quantize_act(x, smooth, pd, precision, unsigned)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), precision, unsigned)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")


def test_quantize_act_w4a8_unaligned_smooth(w4a8_path):
    """A smooth vector that is a view at a 2-byte offset: the fast W4A8 path's vector token kernel needs 16-byte
    aligned rows of smooth and falls back to the one-element-per-lane kernel, bit-exact either way. down_act too:
    the vector token kernel adds the first pass's K-slice partial sums (21 chunks here: several slices) itself, the
    fallback leaves them to the reduce kernel, in the same order."""
    g = session_generator(4242)
    x, smooth, pd = op_args("quantize_act", act_inputs(77, 1344, 32, torch.bfloat16, g))
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    buf = torch.empty(smooth.numel() + 1, dtype=smooth.dtype, device=DEV)
    shifted = buf[1:]
    shifted.copy_(smooth)
    assert shifted.data_ptr() % 16 != 0
    out = OPS.quantize_act(x.to(DEV), shifted, pd.to(DEV), "w4a8", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    assert rel_fro(out[2], ref[2]) < 1e-5
    aligned = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "w4a8", False)
    assert_bits_equal(aligned[2], out[2].cpu(), "down_act (vector token kernel vs reduce kernel)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_act_w4a8_row_scales_across_the_range(w4a8_path, dtype):
    """W4A8 token scales from 2^-70 to 2^70 (bf16; fp16 within its range), a zero row, an odd row count: the token
    kernel's fast rounding (scales in [2^-52, 2^52]) and its checked division (outside) give the CPU's codes."""
    g = session_generator(777 + (dtype == torch.float16))
    exps = [-70, -56, -53, -52, -20, 0, 20, 52, 53, 56, 70] if dtype == torch.bfloat16 else [-14, -8, 0, 8, 12]
    x, smooth, pd = op_args("quantize_act", act_inputs(2 * len(exps) + 1, 1024, 32, torch.float32, g))
    for i, e in enumerate(exps):
        x[2 * i: 2 * i + 2] *= 2.0**e
    x[-1] = 0
    x, smooth, pd = x.to(dtype), smooth.to(dtype), pd.to(dtype)
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "w4a8", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth_edge", ["inside", "outside"])
@pytest.mark.parametrize("smooth_offset", [0, 1])
def test_quantize_act_w4a8_unchecked_division_bounds(w4a8_path, dtype, smooth_edge, smooth_offset):
    """The W4A8 fast path divides without per-element range checks on rows whose amax lies in [2^-28, 2^33] when
    every smooth value lies in [2^-20, 2^20]; other rows are recomputed exactly. Rows at and just past both amax
    bounds, rows with tiny / subnormal / zero / huge elements, and smooth values at the bounds ("inside") or past
    them ("outside": every row takes the exact path; bf16 2^-61 has no fast reciprocal at all, so x_hat computed
    without the fallback would differ) must all give the CPU's codes and scales; also with smooth at a 2-byte offset
    (the token kernel's scalar version, fed by the same first pass)."""
    g = session_generator(4711 + (dtype == torch.float16) + 2 * (smooth_edge == "outside") + 4 * smooth_offset)
    K = 1024
    x, smooth, pd = op_args("quantize_act", act_inputs(16, K, 32, torch.float32, g))
    lo, hi = (2.0**-20, 2.0**20) if dtype == torch.bfloat16 else (2.0**-14, 2.0**15)
    smooth[5], smooth[6] = lo, hi
    x[:, 5] *= lo  # keep those columns' x_hat ordinary (fp16: as far as its range allows)
    x[:, 6] *= min(hi, 2.0**12)
    if smooth_edge == "outside":  # past the bound, and (bf16) outside [2^-60, 2^60] too; x_hat there stays ordinary
        e = -61 if dtype == torch.bfloat16 else -24
        smooth[7] = 2.0**e
        x[:, 7] *= 2.0**e
    tiny = 1e-30 if dtype == torch.bfloat16 else 6e-8
    sub = 1e-40 if dtype == torch.bfloat16 else 1e-7
    x[0, 1::7], x[0, 2::11], x[0, 3::13] = tiny, sub, -0.0  # normal row with tiny, subnormal and -0 entries
    x[1] = 0.0
    x[1, 9] = tiny  # a row of tiny values only
    targets = [2.0**-29, 2.0**-28, 2.0**33, 2.0**34, 2.0**-28 * 0.99, 2.0**33 * 1.01]
    for i, t in enumerate(targets):  # rows whose amax sits at / beside a bound (x_hat[j] = t exactly at column j)
        r, j = 2 + i, 40 + i
        if dtype == torch.float16:  # reach t with x and smooth both in fp16's range (smooth still in the bounds)
            if t > 1:
                smooth[j] = 2.0**-20
                x[:, j] *= 2.0**-20  # other rows' x_hat there stays ordinary
            else:
                smooth[j] = 2.0**15
            x[r] = x[r] * (0.0 if t < 1 else 2.0**-4)  # below 2^-28, fp16 x / smooth is 0 or the target
        else:
            x[r] = x[r] * t * 2.0**-12
        x[r, j] = smooth[j] * t
    if dtype == torch.bfloat16:
        x[9, 100] = 2.0**70  # a huge element
        x[10, 50] = 2.0**61
        smooth[60], x[11, 60] = 0.25, 2.0**127  # x_hat overflows to Inf on the CPU (scale: bf16's max); div3 gives NaN
    if w4a8_path not in ("token-plain", "qa-plain"):
        # the token kernel's lean loop takes a warp's two rows only when both are on the fast paths: each row twice,
        # so that the rows at the bounds that stay fast reach it beside a row of their own kind
        x = x.repeat_interleave(2, dim=0)
    x, smooth, pd = x.to(dtype), smooth.to(dtype), pd.to(dtype)
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    smooth_dev = smooth.to(DEV)
    if smooth_offset:
        smooth_dev = torch.empty(K + 1, dtype=dtype, device=DEV)[1:]
        smooth_dev.copy_(smooth)
        assert smooth_dev.data_ptr() % 16 != 0
    out = OPS.quantize_act(x.to(DEV), smooth_dev, pd.to(DEV), "w4a8", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    assert torch.isfinite(ref[2]).all()
    assert rel_fro(out[2], ref[2]) < 1e-5


def test_quantize_act_nan_propagates(path):
    x, smooth, pd = op_args("quantize_act", act_inputs(40, 256, 16, torch.bfloat16, session_generator(99)))
    x[3, 70] = float("nan")
    ref = OPS.quantize_act(x, smooth, pd, "int4", False)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "int4", False)
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    assert torch.isnan(out[1][3, 1].float()).item()


def test_quantize_act_leading_dims(path):
    x, smooth, pd = op_args("quantize_act", act_inputs((2, 3, 5), 128, 32, torch.bfloat16, session_generator(5)))
    ref = OPS.quantize_act(x, smooth, pd, "int4", False)
    out = OPS.quantize_act(x.to(DEV), smooth.to(DEV), pd.to(DEV), "int4", False)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
    assert_bits_equal(out[0], ref[0], "codes")


# ------------------------------------------------------------------------------------------------------------------
# quantize_act_given_amax (W4A8 with each token's amax given, as the compile pass feeds it)
# ------------------------------------------------------------------------------------------------------------------
GIVEN_AMAX_CASES = [
    # (M, K, R, dtype)
    (1, 64, 0, torch.bfloat16),
    (33, 640, 32, torch.float16),
    (130, 3072, 32, torch.bfloat16),
    (64, 128, 20, torch.bfloat16),  # R % 8 != 0: portable path
    (100, 320, 32, torch.float32),  # fp32 input: portable path
    (1200, 3072, 64, torch.bfloat16),
    (77, 1344, 16, torch.float16),
    (257, 3072, 128, torch.bfloat16),
    (4224, 256, 32, torch.bfloat16),
]
# per-row factors on the exact amax: exact, smaller (codes clamp at +-127), larger, zero, NaN, Inf, tiny and huge
# (scales outside [2^-52, 2^52]: the checked division), one ulp below
AMAX_FACTORS = [1.0, 0.5, 3.0, 0.0, float("nan"), float("inf"), 1e-30, 1e30, 1 - 2.0**-23]
# and rows given absolute amaxes whose scales sit on the edges: 2^-56 and 2^56 (checked division with a valid
# reciprocal), 2^-20 and 2^-24 (fp16: subnormal scales on the fast rounding path), 2^-52 and 2^52 (the range's ends)
AMAX_ABSOLUTE = [127 * 2.0**-56, 127 * 2.0**56, 127 * 2.0**-20, 127 * 2.0**-24, 127 * 2.0**-52, 127 * 2.0**52]


def _given_amax(x, smooth):
    amax = (x.float() / smooth.float()).abs().amax(-1, keepdim=True)
    rows = torch.arange(amax.shape[0])
    f = torch.tensor(AMAX_FACTORS)[rows % len(AMAX_FACTORS)]
    amax = torch.where(f[:, None] == 0, torch.zeros_like(amax), amax * f[:, None])
    period = len(AMAX_FACTORS) + len(AMAX_ABSOLUTE)  # rows whose index mod period >= len(AMAX_FACTORS)
    for j, a in enumerate(AMAX_ABSOLUTE):
        amax[rows % period == len(AMAX_FACTORS) + j] = a
    return amax


def _check_given_amax(x, smooth, pd, amax, smooth_dev=None):
    ref = OPS.quantize_act_given_amax(x, smooth, pd, amax)
    out = OPS.quantize_act_given_amax(x.to(DEV), smooth.to(DEV) if smooth_dev is None else smooth_dev, pd.to(DEV),
                                      amax.to(DEV))
    assert_bits_equal(out[0], ref[0], "codes")
    assert_bits_equal(out[1], ref[1], "scales")
    assert out[2].shape == ref[2].shape and out[2].dtype == torch.float32
    if pd.shape[1] > 0 and torch.isfinite(ref[2]).all():
        assert rel_fro(out[2], ref[2]) < 1e-5
    return out


@pytest.mark.parametrize("M,K,R,dtype", GIVEN_AMAX_CASES)
def test_quantize_act_given_amax_matches_cpu(path, M, K, R, dtype):
    g = session_generator(("given_amax", M, K, R, str(dtype)))
    x, smooth, pd = op_args("quantize_act", act_inputs(M, K, R, dtype, g, outliers=True))
    out = _check_given_amax(x, smooth, pd, _given_amax(x, smooth))
    period = len(AMAX_FACTORS) + len(AMAX_ABSOLUTE)
    rows = torch.arange(M)
    exact = (rows % len(AMAX_FACTORS) == 0) & (rows % period < len(AMAX_FACTORS))  # given their exact amax
    ref = OPS.quantize_act(x, smooth, pd, "w4a8", False)
    assert torch.equal(out[0].cpu()[exact], ref[0][exact])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_act_given_amax_wide_range_bit_exact(path, dtype):
    """Magnitudes over ~80 binades, zeros, -0.0, tiny values (the x / smooth fallback), huge and overflowing x_hat
    (bf16: the +-2^60 clip before the division by the scale), with exact and scaled amaxes; also smooth at a 2-byte
    offset (the fast kernel reads smooth by element)."""
    g = session_generator(("given_amax_wide", str(dtype)))
    x, smooth, pd = op_args("quantize_act", act_inputs(300, 1024, 32, torch.float32, g, wide=True))
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
        smooth = smooth.clamp(1e-4, 6e4)
    else:
        x[9, 100], x[10, 50] = 2.0**70, -(2.0**61)
        smooth[60], x[11, 60] = 0.25, 2.0**127  # x_hat overflows to Inf
    x, smooth, pd = x.to(dtype), smooth.to(dtype), pd.to(dtype)
    amax = _given_amax(x, smooth)
    _check_given_amax(x, smooth, pd, amax)
    shifted = torch.empty(smooth.numel() + 1, dtype=dtype, device=DEV)[1:]
    shifted.copy_(smooth)
    _check_given_amax(x, smooth, pd, amax, smooth_dev=shifted)


def test_quantize_act_given_amax_nan_in_x_with_a_finite_amax(path):
    """A NaN element under a finite given amax (the amax left it out): that code is 0, as int8_code(NaN) on the
    CPU, and the rest of the row is quantized normally."""
    x, smooth, pd = op_args("quantize_act", act_inputs(40, 256, 16, torch.bfloat16, session_generator(98)))
    amax = (x.float() / smooth.float()).abs().amax(-1, keepdim=True)
    x[3, 70] = float("nan")
    out = _check_given_amax(x, smooth, pd, amax)
    codes = layout.w4a8_from_stored(out[0].cpu())  # (stored in W4A8's channel order)
    assert codes[3, 70].item() == 0 and codes[3].abs().max().item() == 127


def test_quantize_act_given_amax_deterministic_and_graph_replay(path):
    x, smooth, pd, *_ = _linear_inputs(M=777, K=1024, N=64, precision="w4a8")
    amax = (x.float() / smooth.float()).abs().amax(-1, keepdim=True)
    first = OPS.quantize_act_given_amax(x, smooth, pd, amax)
    for _ in range(3):
        again = OPS.quantize_act_given_amax(x, smooth, pd, amax)
        for a, a0 in zip(again, first):
            assert torch.equal(a.view(torch.uint8), a0.view(torch.uint8))
    if ON_GPU:
        assert_cuda_graph_replays_eager(lambda inp: OPS.quantize_act_given_amax(inp, smooth, pd, amax)[0], x)


# ------------------------------------------------------------------------------------------------------------------
# gemm
# ------------------------------------------------------------------------------------------------------------------
GEMM_CASES = [
    # (M, N, K, R, precision, model dtype, out dtype, extra)
    (1, 256, 64, 0, "int4", torch.bfloat16, torch.float32, {}),
    (1, 3072, 3072, 32, "int4", torch.bfloat16, torch.bfloat16, {}),
    (7, 100, 192, 16, "int4", torch.bfloat16, torch.float32, {}),
    (33, 200, 320, 32, "int4", torch.float16, torch.float16, {}),
    (130, 384, 1024, 64, "int4", torch.bfloat16, torch.float32, {"bias": False}),
    (257, 131, 512, 32, "int4", torch.bfloat16, torch.bfloat16, {"unsigned": True}),
    (129, 193, 256, 20, "int4", torch.float32, torch.float32, {}),
    (300, 640, 640, 32, "int4", torch.bfloat16, torch.float32, {"up_dtype": torch.float32}),
    (64, 1000, 128, 64, "int4", torch.float16, torch.float32, {"unsigned": True}),
    (520, 3072, 3072, 32, "int4", torch.bfloat16, torch.float32, {}),
    # 9 x 17 = 153 tiles > 132 SMs: several tiles per CTA through the TMA-store epilogue (ragged M, N % 128 != 0)
    (1100, 2056, 1024, 32, "int4", torch.float16, torch.float16, {}),
    (3, 80, 48, 16, "nvfp4", torch.bfloat16, torch.float32, {"gscale": None}),
    (65, 257, 256, 32, "nvfp4", torch.bfloat16, torch.bfloat16, {"gscale": "tensor"}),
    (130, 384, 1040, 0, "nvfp4", torch.float16, torch.float32, {"gscale": "channel"}),
    (256, 512, 3072, 64, "nvfp4", torch.bfloat16, torch.float32, {"gscale": "channel", "bias": False}),
    (1, 256, 64, 0, "w4a8", torch.bfloat16, torch.float32, {}),
    (7, 100, 192, 16, "w4a8", torch.bfloat16, torch.float32, {}),  # K % 128 == 64: half-empty last stage
    (130, 384, 1024, 64, "w4a8", torch.bfloat16, torch.float32, {"bias": False}),
    (257, 131, 512, 32, "w4a8", torch.float16, torch.float16, {}),
    (129, 193, 256, 20, "w4a8", torch.float32, torch.float32, {}),
    (520, 3072, 3072, 32, "w4a8", torch.bfloat16, torch.float32, {}),
    (1100, 2056, 1024, 32, "w4a8", torch.float16, torch.float16, {}),  # several tiles per CTA, TMA-store epilogue
    # >= 2 tiles per CTA on 132 SMs (306, 544, 528 tiles): ragged M and N, rank 0 with the direct epilogue, and 6
    # branch stages (R = 128 in 3 bf16 parts: the whole ring)
    (2200, 2056, 1024, 32, "w4a8", torch.float16, torch.float16, {}),
    (2100, 4096, 640, 0, "w4a8", torch.bfloat16, torch.float32, {"bias": False}),
    (2048, 4200, 1024, 128, "w4a8", torch.float16, torch.bfloat16, {"up_dtype": torch.float32}),
    # 2-byte outputs with N % 8 == 0, which the register path takes: one token, K % 128 == 64 with an odd group
    # count (a zero multiplier past K), ragged token and weight-row tiles, rank 0 / not a multiple of 8, a fp32
    # proj_up, several tiles per CTA
    (1, 256, 64, 0, "w4a8", torch.bfloat16, torch.bfloat16, {}),
    (7, 104, 192, 16, "w4a8", torch.bfloat16, torch.bfloat16, {}),
    (300, 136, 1088, 20, "w4a8", torch.float16, torch.float16, {"bias": False}),
    (520, 3072, 3072, 32, "w4a8", torch.bfloat16, torch.bfloat16, {"up_dtype": torch.float32}),
    (4100, 1288, 640, 0, "w4a8", torch.bfloat16, torch.bfloat16, {}),
]


@pytest.fixture(params=["fast", "tile128", "tile256", "tile256-shfl", "regs", "portable"])
def gemm_path(request, monkeypatch):
    """The GEMM's paths: W4A8's Hopper kernel takes 128 x 128 or 128 x 256 output tiles per call ("fast": the
    library's choice), forced with SVDQUANT_OPS_CUDA_W4A8_TILE=128 / 256 ("tile128", "tile256"; "tile256-shfl": with
    the epilogue's vectors by warp shuffles, SVDQUANT_OPS_CUDA_W4A8_EPI=shfl), or reads the packed weights in
    registers (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=regs: "regs"; calls it cannot take run the prep path)."""
    return _select_path(monkeypatch, request.param)


@pytest.mark.parametrize("M,N,K,R,precision,model_dtype,out_dtype,extra", GEMM_CASES)
def test_gemm_matches_cpu(gemm_path, M, N, K, R, precision, model_dtype, out_dtype, extra):
    if gemm_path in ("tile128", "tile256", "tile256-shfl", "regs") and precision != "w4a8":
        pytest.skip("the tile width and the register path are W4A8's")
    g = session_generator((M, N, K, R, precision, str(model_dtype), str(out_dtype)))
    unsigned = extra.get("unsigned", False)
    args = op_args("gemm", gemm_inputs(M, N, K, R, precision, model_dtype, g, bias=extra.get("bias", True),
                                       global_scale=extra.get("gscale", "default"), up_dtype=extra.get("up_dtype")))
    ref = OPS.gemm(*args, precision, out_dtype, unsigned)
    out = OPS.gemm(*to_dev(args), precision, out_dtype, unsigned)
    assert_output_close(out, ref, f"gemm {M}x{N}x{K} R={R} {precision}")


def test_gemm_leading_dims(path):
    args = op_args("gemm", gemm_inputs((2, 9), 96, 128, 16, "int4", torch.bfloat16, session_generator(17)))
    ref = OPS.gemm(*args, "int4", torch.float32, False)
    out = OPS.gemm(*to_dev(args), "int4", torch.float32, False)
    assert out.shape == (2, 9, 96)
    assert_output_close(out, ref, "leading dims")


def test_linear_end_to_end_matches_cpu(path):
    M, K, N, R = 96, 512, 320, 32
    args = op_args("linear", linear_inputs(M, N, K, R, "int4", torch.bfloat16, session_generator(23)))
    ref = OPS.linear(*args, "int4", False)
    out = OPS.linear(*to_dev(args), "int4", False)
    assert_output_close(out, ref, "linear")


# ------------------------------------------------------------------------------------------------------------------
# W4A8 weights expanded ahead: expand_w4a8_weight, gemm_expanded (the GEMM kernel expands the next weight)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expand", ["pair", "warp"])
@pytest.mark.parametrize("N,K", [(1, 64), (131, 192), (3072, 3072), (1000, 1088), (9216, 3072)])
def test_expand_w4a8_weight_matches_cpu(monkeypatch, expand, N, K):
    """The expansion kernel against the CPU op, with every lane of the warp in every step (the default, =warp; N = 1
    and 131 end inside a warp) and with the slice halves exchanged by lane pairs
    (SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair)."""
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_EXPAND", expand)
    codes, mult = packed_w4a8_weight(N, K, session_generator(("expand", N, K)))
    if ON_GPU:  # (SVDQ_TEST_DEVICE=cpu checks the test against the CPU op itself)
        _poison_free_memory()
    assert_bits_equal(OPS.expand_w4a8_weight(codes.to(DEV), mult.to(DEV)), OPS.expand_w4a8_weight(codes, mult),
                      "expanded weight")


@pytest.mark.skipif(not IS_SM90, reason="the prep kernel runs on the Hopper path only")
@pytest.mark.parametrize("M,N,K", [(4100, 9000, 3072), (7, 200, 192), (300, 136, 1088), (257, 131, 512)])
def test_w4a8_prep_warp_expansion_is_bit_equal(monkeypatch, M, N, K):
    """W4A8 gemm with its weights expanded by the prep kernel (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=prep) gives the same
    bits whether the prep kernel exchanges slice halves by lane pairs or warp-uniformly (=warp runs first, on
    poisoned workspace memory; 131 x 512 ends inside a warp), the kernel that ran is the one asked for, unset the
    warp-uniform one (prep_kernel<true>); a value other than pair / warp is an error naming the
    variable."""
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    args = to_dev(op_args("gemm", gemm_inputs(M, N, K, 32, "w4a8", torch.bfloat16, session_generator(("xw", M)))))
    outs = {}
    for expand in ("warp", "pair", None):  # None: unset, the default (warp)
        outs[expand], names = _run_with_variable(monkeypatch, "SVDQUANT_OPS_CUDA_W4A8_EXPAND", expand,
                                                 lambda: OPS.gemm(*args, "w4a8", torch.bfloat16, False))
        preps = [n for n in names if "prep_kernel<" in n]
        assert preps and all(("prep_kernel<true>" in n) == (expand != "pair") for n in preps), preps
    assert torch.equal(outs["warp"].view(torch.int16), outs["pair"].view(torch.int16))
    assert torch.equal(outs[None].view(torch.int16), outs["warp"].view(torch.int16))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_EXPAND", "quad")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_EXPAND must be 'pair', 'warp' or unset, got 'quad'"):
        OPS.gemm(*args, "w4a8", torch.bfloat16, False)


# (M, N, K, R, model dtype, out dtype, next N, next K): the next weight smaller and larger than this one; tiles
# from 1 (expanded by a kernel of its own after the GEMM: fewer CTAs than half the SMs) to 2 per SM (by the GEMM)
EXPANDED_CASES = [
    (1, 256, 64, 0, torch.bfloat16, torch.float32, 64, 128),
    (7, 100, 192, 16, torch.bfloat16, torch.bfloat16, 3072, 3072),
    (520, 3072, 3072, 32, torch.bfloat16, torch.bfloat16, 3072, 12288),
    (1100, 2056, 1024, 32, torch.float16, torch.float16, 131, 192),
    (2200, 2056, 1024, 32, torch.float16, torch.float32, 9216, 3072),
    (4608, 3072, 3072, 32, torch.bfloat16, torch.bfloat16, 12288, 3072),
]


@pytest.mark.parametrize("M,N,K,R,model_dtype,out_dtype,nN,nK", EXPANDED_CASES)
def test_gemm_expanded_matches_gemm_and_cpu(monkeypatch, gemm_path, M, N, K, R, model_dtype, out_dtype, nN, nK):
    """gemm_expanded on the GPU, with the next weight expanded where the library chooses, by the GEMM kernel's idle
    warps and by a kernel of its own (SVDQUANT_OPS_CUDA_W4A8_NEXT=auto / gemm / kernel): its output equals the GPU
    gemm's bit for bit (the same kernel, fed the same int8 weight), and the CPU op's within the gemm tolerance; the
    next weight equals the CPU expansion bit for bit. (gemm_expanded takes the weight expanded, so it has no
    register path: its gemm is the prep path's, which the comparison forces.)"""
    if gemm_path == "regs":
        pytest.skip("gemm_expanded reads the weight given expanded: it has no register path")
    if gemm_path == "fast":
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    g = session_generator(("expanded", M, N, K, nN, nK))
    args = op_args("gemm", gemm_inputs(M, N, K, R, "w4a8", model_dtype, g))
    ncodes, nmult = packed_w4a8_weight(nN, nK, g)
    d = to_dev(args)
    weight = OPS.expand_w4a8_weight(d[2], d[3])
    ref_next = OPS.expand_w4a8_weight(ncodes, nmult)
    ref = OPS.gemm(*d, "w4a8", out_dtype, False)
    for where in ("auto", "gemm", "kernel"):
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_NEXT", where)
        out, nxt = OPS.gemm_expanded(*d, out_dtype, weight, ncodes.to(DEV), nmult.to(DEV))
        assert torch.equal(out, ref), f"gemm_expanded ({where}) differs from gemm"
        assert_bits_equal(nxt, ref_next, f"next weight ({where})")
    assert_output_close(out, OPS.gemm(*args, "w4a8", out_dtype, False), f"gemm_expanded {M}x{N}x{K}")
    out2, none = OPS.gemm_expanded(*d, out_dtype, weight, None, None)
    assert torch.equal(out2, out) and none.shape == (0, 0) and none.dtype == torch.int8


@pytest.mark.skipif(not IS_SM90, reason="the GEMM kernel expands the next weight on compute capability 9.0 only")
@pytest.mark.parametrize("where,M,expand_launched", [("gemm", 2048, False), ("kernel", 2048, True),
                                                     ("auto", 2048, False), ("auto", 7, True)])
def test_gemm_expanded_expands_where_asked(monkeypatch, where, M, expand_launched):
    """Which kernels a gemm_expanded call launches: with SVDQUANT_OPS_CUDA_W4A8_NEXT=gemm the GEMM kernel expands the
    next weight (no expand_w4a8_kernel), with =kernel a kernel of its own does; auto gives it to a 2048 x 3072 x 3072
    GEMM (all SMs, 6.3 MB of rows in flight, a 3072 x 3072 next weight) and not to a 7-token one (24 CTAs). The next
    codes are a strided view (copied before the launch) and still expand bit-equal."""
    g = session_generator(("where", where, M))
    d = to_dev(op_args("gemm", gemm_inputs(M, 3072, 3072, 32, "w4a8", torch.bfloat16, g)))
    wide, nmult = packed_w4a8_weight(3072, 6144, g)
    ncodes = wide[:, ::2]  # [3072, 1536] of a wider tensor: not contiguous
    nmult = nmult[:, :48].contiguous()
    weight = OPS.expand_w4a8_weight(d[2], d[3])
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_NEXT", where)
    fn = lambda: OPS.gemm_expanded(*d, torch.bfloat16, weight, ncodes.to(DEV), nmult.to(DEV))  # noqa: E731
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, nxt = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("gemm_kernel" in n for n in names)
    assert any("expand_w4a8_kernel" in n for n in names) == expand_launched, names
    assert_bits_equal(nxt, OPS.expand_w4a8_weight(ncodes.contiguous(), nmult), "next weight")


def test_weights_variable_checked(monkeypatch):
    """A value of SVDQUANT_OPS_CUDA_W4A8_WEIGHTS other than auto / prep / regs is an error naming the variable (on
    the Hopper path, which reads it)."""
    if not IS_SM90:
        pytest.skip("read on the Hopper path only")
    args = to_dev(op_args("gemm", gemm_inputs(300, 256, 256, 16, "w4a8", torch.bfloat16, session_generator("wv"))))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "registers")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_WEIGHTS must be 'auto', 'prep', 'regs' or unset, "
                                           "got 'registers'"):
        OPS.gemm(*args, "w4a8", torch.bfloat16, False)


def _poison_free_memory():
    """The caching allocator's free blocks (large and small pools) filled with 0xFF, so that a variant compared with
    another, run after it with the same allocation sizes, cannot pass by finding the other's bytes in a workspace
    it failed to write."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = [torch.full((1 << 28,), -1, dtype=torch.int8, device=DEV)]
    held += [torch.full(((1 << 20) - 4096,), -1, dtype=torch.int8, device=DEV) for _ in range(8)]
    del held


def _run_with_variable(monkeypatch, var, value, call):
    """call() with the variable set to value (None: unset), on poisoned workspace memory: (its output, the names of
    the CUDA kernels it launched)."""
    from torch.profiler import ProfilerActivity, profile

    if value is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, value)
    _poison_free_memory()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = call()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events()]


@pytest.mark.skipif(not IS_SM90, reason="the prep kernel runs on the Hopper path only")
@pytest.mark.parametrize("M,N,K", [(4100, 9000, 3072), (300, 136, 1088)])
def test_prep_units_in_flight_change_nothing(monkeypatch, M, N, K):
    """The prep kernel with 4 or 1 weight units' loads in flight per thread (SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS) writes
    the same bytes: the gemm outputs are bit-equal (prep path, both tile widths by the library's choice), and a value
    other than 4 / 1 is an error naming the variable."""
    args = to_dev(op_args("gemm", gemm_inputs(M, N, K, 32, "w4a8", torch.bfloat16, session_generator(("units", M)))))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    outs = []
    for units in ("4", "1"):
        _poison_free_memory()
        monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS", units)
        outs.append(OPS.gemm(*args, "w4a8", torch.bfloat16, False))
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS", "2")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS must be '4', '1' or unset, got '2'"):
        OPS.gemm(*args, "w4a8", torch.bfloat16, False)


@pytest.mark.skipif(not IS_SM90, reason="the prep kernel runs on the Hopper path only")
def test_prep_rows_with_nothing_to_do_change_nothing(monkeypatch):
    """The prep kernel's grid with only its rows that have work (SVDQUANT_OPS_CUDA_PREP_ROWS=used) writes what the
    full grid does: bit-equal outputs for W4A8 gemm (weight and small-operand rows), gemm_cat (its later weights
    are weight-only calls), gemm_expanded (small operands only) and INT4 / NVFP4 gemm (all three rows), at a size
    with several blocks per row and one with a single block; another value is an error naming the variable. The
    "used" grid runs first, on workspace memory poisoned beforehand: a row it wrongly skipped would leave poison in
    the operands, not the bytes of an earlier run with the same allocation sizes."""
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")

    for M, N, K in ((4100, 3000, 3072), (7, 64, 128)):
        g = session_generator(("rows", M))
        w8 = to_dev(op_args("gemm", gemm_inputs(M, N, K, 32, "w4a8", torch.bfloat16, g)))
        i4 = to_dev(op_args("gemm", gemm_inputs(M, N, K, 32, "int4", torch.bfloat16, g)))
        f4 = to_dev(op_args("gemm", gemm_inputs(M, N, K, 32, "nvfp4", torch.bfloat16, g)))
        cat = _on_dev(_cat_inputs(M, (N, 200, 72), K, 32, torch.bfloat16, {}, "rows"))
        weight = OPS.expand_w4a8_weight(w8[2], w8[3])
        runs = {}
        for rows in ("used", "all"):
            _poison_free_memory()
            monkeypatch.setenv("SVDQUANT_OPS_CUDA_PREP_ROWS", rows)
            runs[rows] = [OPS.gemm(*w8, "w4a8", torch.bfloat16, False), OPS.gemm(*i4, "int4", torch.bfloat16, False),
                          OPS.gemm(*f4, "nvfp4", torch.bfloat16, False),
                          OPS.gemm_cat(*cat, "w4a8", torch.bfloat16, False),
                          OPS.gemm_expanded(*w8, torch.bfloat16, weight, w8[2], w8[3])[0]]
        for what, a, b in zip(("w4a8", "int4", "nvfp4", "gemm_cat", "gemm_expanded"), runs["all"], runs["used"]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (what, M)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PREP_ROWS", "some")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_PREP_ROWS must be 'used', 'all' or unset, got 'some'"):
        OPS.gemm(*w8, "w4a8", torch.bfloat16, False)


def test_next_variable_checked(monkeypatch):
    """A value of SVDQUANT_OPS_CUDA_W4A8_NEXT other than auto / gemm / kernel is an error naming the variable (on
    the Hopper path, which reads it)."""
    if not IS_SM90:
        pytest.skip("read on the Hopper path only")
    args = to_dev(op_args("gemm", gemm_inputs(300, 256, 256, 16, "w4a8", torch.bfloat16, session_generator("nv"))))
    weight = OPS.expand_w4a8_weight(args[2], args[3])
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_NEXT", "always")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_NEXT must be 'auto', 'gemm', 'kernel' or unset, "
                                           "got 'always'"):
        OPS.gemm_expanded(*args, torch.bfloat16, weight, args[2], args[3])


def test_gemm_expanded_without_tokens_still_expands_the_next_weight(path):
    g = session_generator("expanded-empty")
    args = to_dev(op_args("gemm", gemm_inputs((0,), 128, 256, 16, "w4a8", torch.bfloat16, g)))
    ncodes, nmult = packed_w4a8_weight(200, 320, g)
    out, nxt = OPS.gemm_expanded(*args, torch.bfloat16, OPS.expand_w4a8_weight(args[2], args[3]), ncodes.to(DEV),
                                 nmult.to(DEV))
    assert out.shape == (0, 128)
    assert_bits_equal(nxt, OPS.expand_w4a8_weight(ncodes, nmult), "next weight")


@needs_gpu
def test_gemm_expanded_deterministic_and_graph_replay(path):
    g = session_generator("expanded-graph")
    x, smooth, pd, wc, ws, gsc, up, b = to_dev(op_args("linear", linear_inputs(777, 1000, 1024, 32, "w4a8",
                                                                               torch.bfloat16, g)))
    ncodes, nmult = (t.to(DEV) for t in packed_w4a8_weight(3072, 3072, g))
    weight = OPS.expand_w4a8_weight(wc, ws)

    def fn(inp):
        ac, asc, da = OPS.quantize_act(inp, smooth, pd, "w4a8", False)
        out, nxt = OPS.gemm_expanded(ac, asc, wc, ws, gsc, da, up, b, torch.bfloat16, weight, ncodes, nmult)
        # the output and the next weight as one tensor of 16-bit patterns, so the replay check covers both
        return torch.cat([out.view(torch.int16).flatten(), nxt.view(torch.int16).flatten()]).view(torch.bfloat16)

    first = fn(x)
    for _ in range(3):
        assert torch.equal(fn(x).view(torch.int16), first.view(torch.int16))
    assert_cuda_graph_replays_eager(fn, x)


# ------------------------------------------------------------------------------------------------------------------
# determinism, CUDA graphs, torch.compile
# ------------------------------------------------------------------------------------------------------------------
def _linear_inputs(M=1024, K=3072, N=3072, R=32, precision="int4", seed=31):
    """linear's tensor arguments on DEV (nvfp4 with a per-channel global scale)."""
    a = linear_inputs(M, N, K, R, precision, torch.bfloat16, session_generator(seed),
                      global_scale="channel" if precision != "int4" else None)
    return to_dev(op_args("linear", a))


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_deterministic(path, precision):
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(precision=precision)
    first = OPS.quantize_act(x, smooth, pd, precision, False)
    y1 = OPS.gemm(*first[:2], wc, ws, gsc, first[2], up, b, precision, torch.bfloat16, False)
    for _ in range(3):
        again = OPS.quantize_act(x, smooth, pd, precision, False)
        for a, a0 in zip(again, first):
            assert torch.equal(a.view(torch.uint8), a0.view(torch.uint8))
        y = OPS.gemm(*again[:2], wc, ws, gsc, again[2], up, b, precision, torch.bfloat16, False)
        assert torch.equal(y.view(torch.int16), y1.view(torch.int16))


@needs_gpu
@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_cuda_graph_replay_equals_eager(path, precision):
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(M=777, K=1024, N=1000, precision=precision)

    def fn(inp):
        return OPS.linear(inp, smooth, pd, wc, ws, gsc, up, b, precision, False)

    assert_cuda_graph_replays_eager(fn, x)


@needs_gpu
def test_torch_compile_reduce_overhead():
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(M=512, K=1024, N=768)

    def fn(inp):
        return ops.linear(inp, smooth, pd, wc, ws, gsc, up, b, "int4", False)

    eager = fn(x)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = compiled(x)
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), eager.view(torch.int16))


@pytest.mark.skipif(not IS_SM90, reason="the Hopper path exists on compute capability 9.0 only")
@pytest.mark.parametrize("tile", ["128", "256"])
def test_w4a8_tiles_agree_deterministic_and_replay(monkeypatch, tile):
    """W4A8's Hopper GEMM on each tile width at a FLUX.1 shape with several tiles per CTA and a ragged last column
    tile (N = 9000): within fp32 accumulation-order error of the portable kernel (bit-identical to the CPU op; the
    bound of test_fast_and_portable_paths_agree_large), the same bits on every call, and in CUDA-graph replay."""
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_PORTABLE", raising=False)
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(M=4100, K=3072, N=9000, precision="w4a8")
    codes, scales, la = OPS.quantize_act(x, smooth, pd, "w4a8", False)

    def gemm(out_dtype):
        return OPS.gemm(codes, scales, wc, ws, gsc, la, up, b, "w4a8", out_dtype, False)

    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", tile)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")  # (the tile widths are the prep path's)
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_W4A8_EPI", raising=False)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast = gemm(torch.float32)
        torch.cuda.synchronize()
    ran = {e.name for e in prof.events() if "gemm_kernel" in e.name}
    sched = 1 if tile == "256" else 0  # the shipped schedule of each width (256: kVecSmem, the default)
    assert any(f"gemm_kernel<{tile}, 2, {sched}," in n for n in ran), ran  # the width asked for, not the other
    first = gemm(torch.bfloat16)
    for _ in range(3):
        assert torch.equal(gemm(torch.bfloat16).view(torch.int16), first.view(torch.int16))
    assert_cuda_graph_replays_eager(lambda inp: OPS.linear(inp, smooth, pd, wc, ws, gsc, up, b, "w4a8", False), x)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_PORTABLE", "1")
    port = gemm(torch.float32)
    assert rel_fro(fast, port) < 1e-5  # (the 128-column kernel measured 1.09e-6 here on an H100)
    assert (fast - port).abs().max().item() <= 1e-5 * (port.abs().max().item() + 1e-30)


@pytest.mark.skipif(not IS_SM90, reason="the Hopper path exists on compute capability 9.0 only")
@pytest.mark.parametrize("M,N,K,R,bias,out_dtype", [
    (4100, 9000, 3072, 32, True, torch.bfloat16),   # several tiles per CTA (the slots rewritten per tile), ragged N
    (4608, 3072, 15360, 32, True, torch.float16),   # FLUX.1's longest K
    (300, 136, 1088, 20, False, torch.bfloat16),    # no bias (zero slots), ragged M and N
    (777, 1000, 512, 16, True, torch.float32),      # fp32 output: the direct epilogue
    (513, 1004, 256, 0, True, torch.bfloat16),      # N % 8 != 0: the direct epilogue; rank 0
])
def test_w4a8_epilogue_vectors_through_smem_are_bit_equal(monkeypatch, M, N, K, R, bias, out_dtype):
    """W4A8's 128 x 256 kernel with the tile's channel scales and bias through shared memory
    (SVDQUANT_OPS_CUDA_W4A8_EPI=smem, the kVecSmem schedule; the default) gives the same bits as with warp shuffles
    (=shfl), on both epilogues (TMA stores; fp32 or N % 8 != 0: direct) and with several tiles per CTA; smem runs
    first, on poisoned workspace memory, and is the kernel that ran (and runs with the variable unset); a value other
    than shfl / smem is an error naming the variable."""
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", "256")
    args = to_dev(op_args("gemm", gemm_inputs(M, N, K, R, "w4a8", torch.bfloat16, session_generator(("epi", M, N)),
                                              bias=bias)))
    outs = {}
    for epi in ("smem", "shfl", None):  # None: unset, the default (smem)
        outs[epi], names = _run_with_variable(monkeypatch, "SVDQUANT_OPS_CUDA_W4A8_EPI", epi,
                                              lambda: OPS.gemm(*args, "w4a8", out_dtype, False))
        ran = {n for n in names if "gemm_kernel" in n}
        sched = 0 if epi == "shfl" else 1
        assert any(f"gemm_kernel<256, 2, {sched}," in n for n in ran), ran
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    assert torch.equal(outs["smem"].view(bits), outs["shfl"].view(bits))
    assert torch.equal(outs[None].view(bits), outs["smem"].view(bits))
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_EPI", "lds")
    with pytest.raises(RuntimeError, match="SVDQUANT_OPS_CUDA_W4A8_EPI must be 'shfl', 'smem' or unset, got 'lds'"):
        OPS.gemm(*args, "w4a8", out_dtype, False)


@pytest.mark.skipif(not IS_SM90, reason="the Hopper path exists on compute capability 9.0 only")
@pytest.mark.parametrize("M,N,K", [(4100, 9000, 3072), (512, 3072, 15360)])
def test_w4a8_register_path_matches_deterministic_and_replay(monkeypatch, M, N, K):
    """W4A8's register path (rega_kernel: the packed weights expanded in registers, no weight prep) at FLUX.1 shapes
    with several tiles per CTA, a ragged last weight-row tile (N = 9000) and the longest K: it runs (one rega_kernel,
    no gemm_kernel), matches the prep path's 128 x 256 kernel within fp32 accumulation-order error before the bf16
    rounding (so within one bf16 ulp plus that), the same bits on every call, and in CUDA-graph replay."""
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_PORTABLE", raising=False)
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(M=M, K=K, N=N, precision="w4a8")
    codes, scales, la = OPS.quantize_act(x, smooth, pd, "w4a8", False)

    def gemm():
        return OPS.gemm(codes, scales, wc, ws, gsc, la, up, b, "w4a8", torch.bfloat16, False)

    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "regs")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        regs = gemm()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum("rega_kernel" in n for n in names) == 1 and not any("gemm_kernel" in n for n in names), names
    for _ in range(3):
        assert torch.equal(gemm().view(torch.int16), regs.view(torch.int16))
    assert_cuda_graph_replays_eager(lambda inp: OPS.linear(inp, smooth, pd, wc, ws, gsc, up, b, "w4a8", False), x)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", "256")
    assert_output_close(regs, gemm().cpu(), f"register path against prep, {M}x{N}x{K}")


@pytest.mark.skipif(not IS_SM90, reason="the Hopper path exists on compute capability 9.0 only")
@pytest.mark.parametrize("precision,M,K", [("int4", 2048, 3072), ("w4a8", 2048, 3072), ("w4a8", 4607, 15360)])
def test_fast_and_portable_paths_agree_large(precision, M, K):
    """FLUX.1-size layers (too slow for the CPU reference): fast vs portable GPU paths (4607 x 15360: a single
    block's proj_out input, with an odd token count)."""
    x, smooth, pd, wc, ws, gsc, up, b = _linear_inputs(M=M, K=K, N=3072, precision=precision)
    os.environ.pop("SVDQUANT_OPS_CUDA_PORTABLE", None)
    codes, scales, la = OPS.quantize_act(x, smooth, pd, precision, False)
    fast = OPS.gemm(codes, scales, wc, ws, gsc, la, up, b, precision, torch.float32, False)
    os.environ["SVDQUANT_OPS_CUDA_PORTABLE"] = "1"
    try:
        codes_p, scales_p, la_p = OPS.quantize_act(x, smooth, pd, precision, False)
        port = OPS.gemm(codes, scales, wc, ws, gsc, la, up, b, precision, torch.float32, False)
    finally:
        os.environ.pop("SVDQUANT_OPS_CUDA_PORTABLE", None)
    assert torch.equal(codes, codes_p) and torch.equal(scales.view(torch.int16), scales_p.view(torch.int16))
    assert rel_fro(la, la_p) < 1e-5
    assert rel_fro(fast, port) < 1e-5
    if precision == "w4a8":  # the two passes above; the opt-in cluster kernel too
        os.environ["SVDQUANT_OPS_CUDA_W4A8_CLUSTER"] = "1"
        try:
            codes_t, scales_t, la_t = OPS.quantize_act(x, smooth, pd, precision, False)
        finally:
            os.environ.pop("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", None)
        assert torch.equal(codes, codes_t) and torch.equal(scales.view(torch.int16), scales_t.view(torch.int16))
        assert rel_fro(la_t, la_p) < 1e-5


# ------------------------------------------------------------------------------------------------------------------
# gemm_cat: one activation against several weights
# ------------------------------------------------------------------------------------------------------------------
CAT_WEIGHT = ("codes", "scales", "global_scale", "proj_up", "bias")
CAT_CASES = [  # M, Ns, K, R, model_dtype, out_dtype, extra
    (300, (96, 200, 8), 256, 32, torch.bfloat16, torch.float32, {"biases": (False, True, False)}),
    (130, (131, 61), 512, 0, torch.float16, torch.float16, {"biases": (False, False)}),  # rank 0, ragged N
    (1100, (1000, 3000), 640, 128, torch.float16, torch.bfloat16, {}),  # 6 branch stages, several tiles per CTA
    (257, (64, 72), 192, 16, torch.bfloat16, torch.bfloat16, {"up_dtypes": (torch.bfloat16, torch.float32)}),
    (0, (64, 72), 128, 16, torch.bfloat16, torch.bfloat16, {}),
]


def _cat_inputs(M, Ns, K, R, model_dtype, extra, key):
    g = session_generator(("cat", M, Ns, K, R, str(model_dtype), key))
    biases = extra.get("biases", (True,) * len(Ns))
    ups = extra.get("up_dtypes", (None,) * len(Ns))
    a = gemm_inputs(M, Ns[0], K, R, "w4a8", model_dtype, g, bias=biases[0], up_dtype=ups[0])
    ws = [{k: a[k] for k in CAT_WEIGHT}] + [weight_inputs(N, K, R, "w4a8", model_dtype, g, bias=b, up_dtype=u)
                                            for N, b, u in zip(Ns[1:], biases[1:], ups[1:])]
    return [a["act_codes"], a["act_scales"], *([w[k] for w in ws] for k in CAT_WEIGHT[:3]), a["down_act"],
            [w["proj_up"] for w in ws], [w["bias"] for w in ws]]


def _on_dev(args):
    return [[v.to(DEV) if isinstance(v, torch.Tensor) else v for v in a] if isinstance(a, list) else
            (a.to(DEV) if isinstance(a, torch.Tensor) else a) for a in args]


def _separate(args, out_dtype):
    ac, asc, codes, scales, gsc, da, ups, bias = args
    return torch.cat([OPS.gemm(ac, asc, codes[i], scales[i], gsc[i], da, ups[i], bias[i], "w4a8", out_dtype, False)
                      for i in range(len(codes))], -1)


@pytest.mark.parametrize("M,Ns,K,R,model_dtype,out_dtype,extra", CAT_CASES)
def test_gemm_cat_matches_cpu_and_gemm(gemm_path, M, Ns, K, R, model_dtype, out_dtype, extra):
    """gemm_cat on the GPU: within gemm's tolerance of the CPU op (torch.cat of one gemm per weight, bit for bit), and
    at a forced tile width (or on the portable path) bit-equal to one CUDA gemm per weight: each column is computed
    as gemm computes it. (The library's own choice may take the other width for the whole than for a part.)"""
    args = _cat_inputs(M, Ns, K, R, model_dtype, extra, gemm_path)
    ref = OPS.gemm_cat(*args, "w4a8", out_dtype, False)
    dev = _on_dev(args)
    out = OPS.gemm_cat(*dev, "w4a8", out_dtype, False)
    assert_output_close(out, ref, f"gemm_cat {M}x{Ns}x{K} R={R}")
    if gemm_path != "fast":
        assert torch.equal(out.view(torch.uint8), _separate(dev, out_dtype).view(torch.uint8))


@pytest.mark.skipif(not IS_SM90, reason="the Hopper path exists on compute capability 9.0 only")
@pytest.mark.parametrize("tile", ["128", "256"])
def test_gemm_cat_flux_single_block_one_kernel(monkeypatch, tile):
    """A FLUX.1 single block's q/k/v (N = 9216) and proj_mlp (N = 12288) at 4608 tokens: one GEMM kernel for both
    (two prep launches), bit-equal to two gemm calls at the same tile width, deterministic, and equal in CUDA-graph
    replay."""
    monkeypatch.delenv("SVDQUANT_OPS_CUDA_PORTABLE", raising=False)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_TILE", tile)
    monkeypatch.setenv("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "prep")  # (one GEMM for both weights is the prep path's)
    dev = _on_dev(_cat_inputs(4608, (9216, 12288), 3072, 32, torch.bfloat16, {}, "flux"))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = OPS.gemm_cat(*dev, "w4a8", torch.bfloat16, False)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum("gemm_kernel<" in n for n in names) == 1 and sum("prep_kernel" in n for n in names) == 2, names
    assert torch.equal(out.view(torch.int16), _separate(dev, torch.bfloat16).view(torch.int16))
    for _ in range(2):
        assert torch.equal(OPS.gemm_cat(*dev, "w4a8", torch.bfloat16, False).view(torch.int16), out.view(torch.int16))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replay = OPS.gemm_cat(*dev, "w4a8", torch.bfloat16, False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replay.view(torch.int16), out.view(torch.int16))
