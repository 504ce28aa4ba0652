#!/usr/bin/env python3
"""SVDQuant linear on the GPU (INT4 W4A4, NVFP4, W4A8): correctness and speed against bf16 cuBLAS and torchao fp8.

    python benchmarks/bench_linear.py [--out DIR] [--quick] [--no-torchao]

Needs the package importable (``pip install -e .``, or the repository on PYTHONPATH as ``benchmarks/gpu_run.sh``
sets it) and a CUDA GPU.

1. Builds / loads the op library (JIT, ``svdquant_ops.ops.load()``) and reports the build time.
2. Correctness on FLUX.1 layer shapes (M = 128 tokens so the scalar CPU reference stays quick): the CUDA ops
   against the CPU ops on fresh random inputs: codes/scales bit-exact, down_act and output errors; the Hopper
   path against the portable path at M = 4608; determinism of repeated runs.
3. Speed: the full SVDQuant linear (quantize_act + gemm, rank 32 and rank 0, INT4, bf16 activations) and the
   baselines, bf16 F.linear (cuBLAS) and torchao Float8DynamicActivationFloat8WeightConfig(PerRow) including its
   activation quantization, on the FLUX.1 shapes at M = 1024, 4608, 9216; the W4A8 precision (rank 32 and 0) in a
   second table of the same run. Each callable is captured in a CUDA
   graph and timed by median of replays (triton.testing.do_bench_cudagraph), which is what
   torch.compile(mode="reduce-overhead") runs; eager timings (launch overhead included) are listed as well.
   Effective TFLOP/s = 2*M*N*K / time. Ratios are to bf16 cuBLAS measured in the same run.
Writes <date>-<gpu>-linear.md (and .json) into --out (default: $OUT, else benchmarks/results) and prints it. Both
start with the run's record (date, GPU, commit, dirty tree, command: benchmarks/_record.py); add a row for the new
file to benchmarks/results/INDEX.md.

Diagnostic modes: --gemm-only with schedules other than "promote" (SVDQUANT_OPS_GEMM_SCHEDULE / _EPILOGUE),
--overlap (W4A8's overlapped-epilogue, ping-pong and promote-cvt schedules against the shipped one), --wprep,
--tile-overhead
(epilogue variants) and --quantize-only with SVDQUANT_OPS_QA_CFG / _QA_SPLITS set use switches that exist only in a
diagnostics build of the library: run them with SVDQUANT_OPS_DIAGNOSTICS=1 in the environment (a separate build and
cache entry; ``gpu_run.sh gemm`` / ``tiles`` / ``overlap`` do this). Recorded tables come from the normal build.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _record  # benchmarks/_record.py (this script's folder is first on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]  # (K, N)
TOKENS = [1024, 4608, 9216]
RANK = 32


def kernel_times(fn, iters: int = 20) -> list[tuple[str, float]]:
    """Mean device time per call of each kernel ``fn`` launches (torch.profiler), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.replace("(anonymous namespace)::", "").replace("void ", "").split("<")[0].split("(")[0]
            name = name.split("::")[-1][:48]
            per[name] = per.get(name, 0.0) + e.device_time_total / iters
    return list(per.items())


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------
def make_layer(K, N, R, dev, g, precision="int4", dtype=torch.bfloat16):
    gs = 16 if precision == "nvfp4" else 64
    G = K // gs
    wc = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    if precision == "w4a8":  # codes in [-7, 7], multipliers in [1, 18], fp32 per-channel scales
        w = torch.randint(-7, 8, (N, K), generator=g, dtype=torch.int32) & 0xF
        wc = (w[:, 0::2] | (w[:, 1::2] << 4)).to(torch.uint8)
        ws = torch.randint(1, 19, (N, G), generator=g, dtype=torch.int32).to(torch.uint8)
        gsc = torch.rand(N, generator=g) * 2e-4 + 1e-5
    elif precision == "int4":
        ws = (torch.rand(N, G, generator=g) * 0.004 + 1e-4).to(dtype)
        gsc = None
    else:
        ws = (torch.rand(N, G, generator=g) * 2 + 0.05).to(torch.float8_e4m3fn)
        gsc = torch.rand(N, generator=g) * 0.01 + 1e-3
    smooth = (torch.rand(K, generator=g) * 2 + 0.25).to(dtype)
    pd = (torch.randn(K, R, generator=g) / math.sqrt(K)).to(dtype)
    up = (torch.randn(N, R, generator=g) * 0.02).to(dtype)
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype)
    out = dict(smooth=smooth, pd=pd, wc=wc, ws=ws, gsc=gsc, up=up, bias=bias)
    return {k: (v.to(dev) if v is not None else None) for k, v in out.items()}


def svdq_linear(x, L, precision="int4"):
    return torch.ops.svdquant.linear(x, L["smooth"], L["pd"], L["wc"], L["ws"], L["gsc"], L["up"], L["bias"],
                                     precision, False)


def rel_fro(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_ulp_diff(a, b):
    """Largest |a - b| in units of (one ulp of b's 16-bit dtype at |b| + 1e-4 * rms(b)): <= 1 means the outputs
    differ by at most the final rounding of fp32 results that agree to fp32 accuracy."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[b.dtype]
    a, b = a.double().cpu(), b.double().cpu()
    ulp = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - (bits - 1))
    return ((a - b).abs() / (ulp + 1e-4 * b.pow(2).mean().sqrt())).max().item()


# ------------------------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------------------------
def correctness(dev, quick):
    ops = torch.ops.svdquant
    rows = []
    g = torch.Generator().manual_seed(int(time.time()) & 0xFFFF)
    shapes = SHAPES[:2] if quick else SHAPES
    for precision in ("int4", "nvfp4", "w4a8"):
        for K, N in (shapes if precision != "nvfp4" else shapes[:2]):
            M = 128
            L = make_layer(K, N, RANK, "cpu", g, precision)
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            t0 = time.time()
            ref_q = ops.quantize_act(x, L["smooth"], L["pd"], precision, False)
            ref32 = ops.gemm(ref_q[0], ref_q[1], L["wc"], L["ws"], L["gsc"], ref_q[2], L["up"], L["bias"],
                             precision, torch.float32, False)
            ref16 = ref32.to(torch.bfloat16)
            t_cpu = time.time() - t0
            Ld = {k: (v.to(dev) if v is not None else None) for k, v in L.items()}
            q = ops.quantize_act(x.to(dev), Ld["smooth"], Ld["pd"], precision, False)
            codes_ok = torch.equal(q[0].cpu(), ref_q[0])
            scales_ok = torch.equal(q[1].cpu().view(torch.uint8), ref_q[1].view(torch.uint8))
            la_err = rel_fro(q[2], ref_q[2])
            # gemm on the CPU reference's own codes: isolates the GEMM
            args = [t.to(dev) if t is not None else None for t in
                    (ref_q[0], ref_q[1], L["wc"], L["ws"], L["gsc"], ref_q[2], L["up"], L["bias"])]
            y32 = ops.gemm(*args, precision, torch.float32, False)
            y16 = ops.gemm(*args, precision, torch.bfloat16, False)
            os.environ["SVDQUANT_OPS_CUDA_PORTABLE"] = "1"
            yp = ops.gemm(*args, precision, torch.float32, False)
            os.environ.pop("SVDQUANT_OPS_CUDA_PORTABLE")
            rows.append(dict(precision=precision, K=K, N=N, M=M, codes_bit_exact=codes_ok, scales_bit_exact=scales_ok,
                             down_act_rel_err=la_err, out_fp32_rel_err=rel_fro(y32, ref32),
                             out_fp32_max_abs_err=(y32.cpu() - ref32).abs().max().item(),
                             out_bf16_max_ulp=max_ulp_diff(y16, ref16),
                             portable_fp32_rel_err=rel_fro(yp, ref32),
                             portable_bit_exact=torch.equal(yp.cpu(), ref32), cpu_ref_s=t_cpu))
            log("correctness", rows[-1])
    # Hopper vs portable at full size, and determinism
    big = []
    for precision in ("int4", "nvfp4", "w4a8"):
        K, N, M = 3072, 3072, 4608
        L = make_layer(K, N, RANK, dev, g, precision)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        q = ops.quantize_act(x, L["smooth"], L["pd"], precision, False)
        y = ops.gemm(*q[:2], L["wc"], L["ws"], L["gsc"], q[2], L["up"], L["bias"], precision, torch.float32,
                     False)
        os.environ["SVDQUANT_OPS_CUDA_PORTABLE"] = "1"
        qp = ops.quantize_act(x, L["smooth"], L["pd"], precision, False)
        yp = ops.gemm(*q[:2], L["wc"], L["ws"], L["gsc"], q[2], L["up"], L["bias"], precision, torch.float32,
                      False)
        os.environ.pop("SVDQUANT_OPS_CUDA_PORTABLE")
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(q[:2], qp[:2]))
        det = all(torch.equal(svdq_linear(x, L, precision).view(torch.int16), svdq_linear(x, L, precision)
                              .view(torch.int16)) for _ in range(3))
        big.append(dict(precision=precision, M=M, K=K, N=N, quantize_codes_scales_equal_portable=same,
                        down_act_rel_err_vs_portable=rel_fro(q[2], qp[2]), out_rel_err_vs_portable=rel_fro(y, yp),
                        deterministic_3_runs=det))
        log("hopper-vs-portable", big[-1])
    return rows, big


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------
def bench_graph(fn, rep_ms):
    import triton.testing as tt

    return tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


# The quantized inputs of a FLUX.1-dev step at 1024x1024, batch 1, with q/k/v fused (M, K, R, calls per step): the
# single blocks' shared q/k/v/mlp input and proj_out input (38 each), the double blocks' image-stream inputs (q/k/v,
# to_out, ff in: 3 x 19) and ff out (19), the same for the text stream at 512 tokens.
FLUX_STEP_INPUTS = [(4608, 3072, 32, 38), (4608, 15360, 32, 38), (4096, 3072, 32, 57), (4096, 12288, 32, 19),
                    (512, 3072, 32, 57), (512, 12288, 32, 19)]


def env_ab(dev, rep_ms, tag, var, a, b, exact_down_act):
    """W4A8 quantize_act on a FLUX.1 step's inputs with environment variable `var` at value a, then b ("" = unset),
    same inputs and process: codes and scales must be equal bit for bit, down_act too where `exact_down_act`, else
    within fp32 summation-order differences; per-call (CUDA graph) and per-step times, and each kernel's time."""
    g = torch.Generator().manual_seed(5)
    tot = {a: 0.0, b: 0.0}
    small = {a: 0.0, b: 0.0}  # the text stream's 512-token calls (issue 14's small-M item)
    worst = 0.0
    name = {v: v or "unset" for v in (a, b)}
    for M, K, R, calls in FLUX_STEP_INPUTS:
        L = make_layer(K, 3072, R, dev, g, "w4a8")
        x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
        fn = lambda: torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "w4a8", False)
        us, outs = {}, {}
        for v in (a, b):
            if v:
                os.environ[var] = v
            else:
                os.environ.pop(var, None)
            outs[v] = fn()
            us[v] = bench_graph(fn, rep_ms) * 1e3
            log(f"  {name[v]} kernels:", ", ".join(f"{n[:60]} {t:.1f} us" for n, t in kernel_times(fn)))
            tot[v] += us[v] * calls / 1e3
            small[v] += us[v] * calls / 1e3 if M <= 1024 else 0.0
        os.environ.pop(var, None)
        same = torch.equal(outs[a][0], outs[b][0]) and torch.equal(outs[a][1], outs[b][1])
        d = (outs[b][2] - outs[a][2]).norm().item() / max(outs[a][2].norm().item(), 1e-30)
        if exact_down_act:
            same = same and torch.equal(outs[a][2], outs[b][2])
        worst = max(worst, d)
        # the op reads x twice (both passes) and writes int8 codes: 5 bytes per element
        log(f"{tag} M={M} K={K} R={R}: {name[a]} {us[a]:.1f} us, {name[b]} {us[b]:.1f} us ({us[a] / us[b]:.2f}x); "
            f"{name[b]} moves {M * K * 5 / us[b] / 1e6:.2f} TB/s; codes and scales equal: {same}; down_act rel. diff "
            f"{d:.1e}")
        if not same:
            raise SystemExit(f"{tag}: {var}={name[a]} and {name[b]} gave different outputs")
    log(f"{tag} per FLUX step (quantize_act only): {name[a]} {tot[a]:.2f} ms, {name[b]} {tot[b]:.2f} ms "
        f"(the 512-token calls: {small[a]:.2f} / {small[b]:.2f} ms); worst down_act rel. diff {worst:.1e}")


def qa_step(dev, rep_ms, save: str | None, compare: str | None):
    """W4A8 quantize_act on a FLUX.1 step's inputs (FLUX_STEP_INPUTS, fixed seeds): per-call (CUDA graph) times, the
    per-step total and its split by kernel. For an A/B across library versions (run once per version, in the same
    device call: gpu_run.sh qastep with QA_BASELINE_TREE), `save` writes each shape's codes and scales and `compare`
    reads a saved file: how many codes differ and by how much, how many scales differ."""
    g = torch.Generator().manual_seed(5)
    total, by_kernel, saved, cmp = 0.0, {}, {}, None
    if compare:
        cmp = torch.load(compare)
    for M, K, R, calls in FLUX_STEP_INPUTS:
        L = make_layer(K, 3072, R, dev, g, "w4a8")
        x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
        fn = lambda: torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "w4a8", False)  # noqa: E731
        codes, scales, _ = fn()
        us = bench_graph(fn, rep_ms) * 1e3
        total += us * calls / 1e3
        kt = kernel_times(fn)
        for n, t in kt:
            by_kernel[n] = by_kernel.get(n, 0.0) + t * calls / 1e3
        note = ""
        key = f"{M}x{K}"
        saved[key] = (codes.cpu(), scales.cpu())
        if cmp is not None and key in cmp:
            c0, s0 = cmp[key]
            d = (codes.cpu().int() - c0.int()).abs()
            note = (f"; against {compare}: {int((d > 0).sum())} of {d.numel()} codes differ (max {int(d.max())}), "
                    f"{int((scales.cpu() != s0).sum())} of {s0.numel()} scales")
        log(f"qa_step M={M} K={K} R={R}: {us:.1f} us x {calls} ({', '.join(f'{n[:40]} {t:.1f}' for n, t in kt)})"
            f"{note}")
    log(f"qa_step per FLUX step (W4A8 quantize_act only): {total:.2f} ms; by kernel: "
        + ", ".join(f"{n[:48]} {t:.2f} ms" for n, t in by_kernel.items()))
    if save:
        torch.save(saved, save)


def cluster_ab(dev, rep_ms):
    """W4A8's two passes against the one-pass cluster kernel (SVDQUANT_OPS_CUDA_W4A8_CLUSTER unset / 1; Hopper):
    codes and scales equal bit for bit, down_act within summation order. The cluster kernel lost 1.7-2.8x at
    M >= 4096 (2026-12-05); at M = 512, where the two passes are launch- and latency-bound (10-19 us against a
    1.4-5.6 us byte floor on an H100), one kernel might win: the case for a small-M rule."""
    env_ab(dev, rep_ms, "cluster_ab", "SVDQUANT_OPS_CUDA_W4A8_CLUSTER", "", "1", exact_down_act=False)


# A FLUX.1 double block's image / text linear pairs (K, N): the same shape, different inputs and weights, no
# dependency between them (fused to_qkv / add_qkv, to_out / to_add_out, ff / ff_context in and out)
DOUBLE_BLOCK_PAIRS = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)]
# SMs set aside for parallel_linears' side stream (SVDQUANT_OPS_CUDA_PARALLEL_SMS) in pair_ab's rows
PAIR_SMS = (8, 16, 24)


def pair_ab(dev, rep_ms, img_tokens=4096, txt_tokens=512, blocks=19):
    """Issue 14 item 4's second lever, measured before it is built: a double block's image linear (M = 4096) and
    its text twin (M = 512) one after the other against the text one on a second CUDA stream (forked from and
    joined to the first, so the pair is one CUDA-graph-capturable unit), W4A8 and bf16. The text linear's marginal
    cost (pair - image alone) against bf16's text linear says whether running the streams side by side hides the
    small-M loss; outputs of both orders must be equal bit for bit (the same kernels, only overlapped). The same
    pair through svdquant::parallel_linears (its side stream forked and joined in C++, what the compile pass calls)
    is timed beside them, also with S SMs set aside for the side stream (SVDQUANT_OPS_CUDA_PARALLEL_SMS = PAIR_SMS:
    the image GEMM on SMs - S CTAs, the text GEMM on S), whose outputs must be the same bits too."""
    g = torch.Generator().manual_seed(11)
    side = torch.cuda.Stream()

    def overlapped(first, second):
        def run():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            a = first()
            with torch.cuda.stream(side):
                b = second()
            main.wait_stream(side)
            return a, b
        return run

    tot = {}
    for K, N in DOUBLE_BLOCK_PAIRS:
        Vi, Vt = (make_layer(K, N, RANK, dev, g, "w4a8") for _ in range(2))
        Wi, Wt = ((torch.randn(N, K, generator=g) / math.sqrt(K)).to(dev, torch.bfloat16) for _ in range(2))
        xi = torch.randn(img_tokens, K, generator=g).to(dev, torch.bfloat16)
        xt = torch.randn(txt_tokens, K, generator=g).to(dev, torch.bfloat16)
        fns = {"w4a8_img": lambda: svdq_linear(xi, Vi, "w4a8"), "w4a8_txt": lambda: svdq_linear(xt, Vt, "w4a8"),
               "bf16_img": lambda: F.linear(xi, Wi, Vi["bias"]), "bf16_txt": lambda: F.linear(xt, Wt, Vt["bias"])}
        for p in ("w4a8", "bf16"):
            i, t = fns[p + "_img"], fns[p + "_txt"]
            fns[p + "_seq"] = lambda i=i, t=t: (i(), t())
            fns[p + "_pair"] = overlapped(i, t)
        # the library's op (its own side stream, forked and joined in C++), as the compile pass calls it
        fns["w4a8_op"] = lambda: torch.ops.svdquant.parallel_linears(
            [xi, xt], *([Vi[k], Vt[k]] for k in ("smooth", "pd", "wc", "ws", "gsc", "up", "bias")), "w4a8", False)
        # the op with programmatic dependent launch on (off by default): each next kernel's blocks then wait
        # resident on their SMs, which the side stream could otherwise take
        fns["w4a8_op_pdl"] = fns["w4a8_op"]
        # the op with S SMs set aside for the side stream (SVDQUANT_OPS_CUDA_PARALLEL_SMS; 0, no cap, the default)
        for sms in PAIR_SMS:
            fns[f"w4a8_op_sms{sms}"] = fns["w4a8_op"]
        us, outs = {}, []
        with torch.inference_mode():
            for name, f in fns.items():
                sms = name.split("_sms")[1] if "_sms" in name else ""
                with env_var("SVDQUANT_OPS_CUDA_PDL", "1" if name.endswith("_pdl") else "0"), \
                        env_var("SVDQUANT_OPS_CUDA_PARALLEL_SMS", sms):
                    f()
                    torch.cuda.synchronize()
                    us[name] = bench_graph(f, rep_ms) * 1e3
                    if name.startswith("w4a8_op"):
                        outs.append(f())
                tot[name] = tot.get(name, 0.0) + us[name] * blocks / 1e3
            seq, pair = fns["w4a8_seq"](), fns["w4a8_pair"]()
            torch.cuda.synchronize()
        same = all(torch.equal(a, b) and all(torch.equal(a, o[j]) for o in outs)
                   for j, (a, b) in enumerate(zip(seq, pair)))
        log(f"pair_ab K={K} N={N}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items())
            + f"; w4a8 text marginal: sequential {us['w4a8_seq'] - us['w4a8_img']:.1f} us, overlapped "
            f"{us['w4a8_pair'] - us['w4a8_img']:.1f} us (parallel_linears {us['w4a8_op'] - us['w4a8_img']:.1f} us), "
            f"against bf16's text linear {us['bf16_txt']:.1f} us "
            f"(bf16 overlapped marginal {us['bf16_pair'] - us['bf16_img']:.1f}); outputs equal: {same}")
        if not same:
            raise SystemExit("pair_ab: the overlapped pair's outputs differ from the sequential ones")
    log(f"pair_ab per FLUX step ({blocks} double blocks, these four pairs): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in tot.items())
        + f"; the text stream's w4a8 marginal sequential {tot['w4a8_seq'] - tot['w4a8_img']:.2f} ms, overlapped "
        f"{tot['w4a8_pair'] - tot['w4a8_img']:.2f} ms (parallel_linears {tot['w4a8_op'] - tot['w4a8_img']:.2f} ms), "
        f"bf16 text alone {tot['bf16_txt']:.2f} ms; parallel_linears with S SMs set aside for the text linear: "
        + ", ".join(f"S = {sms} {tot[f'w4a8_op_sms{sms}'] - tot['w4a8_img']:.2f} ms" for sms in PAIR_SMS))


def gmax_ab(dev, rep_ms):
    """The pipelined group-max kernel against the register-prefetch one (SVDQUANT_OPS_CUDA_W4A8_GMAX)."""
    env_ab(dev, rep_ms, "gmax_ab", "SVDQUANT_OPS_CUDA_W4A8_GMAX", "regs", "pipe", exact_down_act=False)


def token_ab(dev, rep_ms):
    """W4A8's token kernel over all of K in one block per 8 rows against K split where M is small
    (SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=0 / 1): all outputs equal bit for bit."""
    env_ab(dev, rep_ms, "token_ab", "SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", "0", "1", exact_down_act=True)


# A FLUX.1-dev step's W4A8 GEMMs with q/k/v fused, in a plausible graph order, each with the weight it expands
# ahead (install_compile_pass(expand_ahead=True)) and its calls per step: (name, M, N, K, calls). The next weight of
# each is the following entry's (of the group, cyclically: the last of a block expands the next block's first).
FLUX_DOUBLE = [("img qkv", 4096, 9216, 3072), ("txt qkv", 512, 9216, 3072), ("img out", 4096, 3072, 3072),
               ("txt out", 512, 3072, 3072), ("img ff in", 4096, 12288, 3072), ("img ff out", 4096, 3072, 12288),
               ("txt ff in", 512, 12288, 3072), ("txt ff out", 512, 3072, 12288)]
FLUX_SINGLE = [("single qkv", 4608, 9216, 3072), ("single mlp", 4608, 12288, 3072), ("single out", 4608, 3072, 15360)]


def ahead_ab(dev, rep_ms):
    """gemm_expanded on a FLUX.1 step's GEMM sequence: each GEMM alone (its weight given expanded), the next weight
    expanded by a kernel of its own after it (SVDQUANT_OPS_CUDA_W4A8_NEXT=kernel), by the GEMM kernel's idle warps
    (=gemm), and as the library chooses (auto); against gemm with its own prep. Outputs and next weights compared bit
    for bit; per-call (CUDA graph) and per-step times."""
    ops = torch.ops.svdquant
    g = torch.Generator().manual_seed(7)
    modes = ("kernel", "gemm", "auto")
    tot = {k: 0.0 for k in ("prep", "alone", *modes)}
    bad = 0
    for seq, calls in ((FLUX_DOUBLE, 19), (FLUX_SINGLE, 38)):
        layers = [make_layer(K, N, 32, dev, g, "w4a8") for _, _, N, K in seq]
        for i, (name, M, N, K) in enumerate(seq):
            L, nxt = layers[i], layers[(i + 1) % len(seq)]
            ac = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int32).to(dev, torch.int8)
            asc = (torch.rand(M, 1, generator=g) * 0.02 + 1e-3).to(dev, torch.bfloat16)
            da = torch.randn(M, 32, generator=g).to(dev)
            w = ops.expand_w4a8_weight(L["wc"], L["ws"])
            args = (ac, asc, L["wc"], L["ws"], L["gsc"], da, L["up"], L["bias"])
            us, outs = {}, {}
            fn_prep = lambda: ops.gemm(*args, "w4a8", torch.bfloat16, False)  # noqa: E731
            fn_alone = lambda: ops.gemm_expanded(*args, torch.bfloat16, w, None, None)  # noqa: E731
            fn_next = lambda: ops.gemm_expanded(*args, torch.bfloat16, w, nxt["wc"], nxt["ws"])  # noqa: E731
            us["prep"], us["alone"] = bench_graph(fn_prep, rep_ms) * 1e3, bench_graph(fn_alone, rep_ms) * 1e3
            ref = fn_prep()
            ref_next = ops.expand_w4a8_weight(nxt["wc"], nxt["ws"])
            for m in modes:
                os.environ["SVDQUANT_OPS_CUDA_W4A8_NEXT"] = m
                outs[m] = fn_next()
                us[m] = bench_graph(fn_next, rep_ms) * 1e3
            os.environ.pop("SVDQUANT_OPS_CUDA_W4A8_NEXT", None)
            same = all(torch.equal(o[0], ref) and torch.equal(o[1], ref_next) for o in outs.values())
            bad += not same
            for k in tot:
                tot[k] += us[k] * calls / 1e3
            nN, nK = nxt["wc"].shape[0], nxt["wc"].shape[1] * 2
            log(f"ahead_ab {name} M={M} N={N} K={K}, next {nN}x{nK}: gemm with prep {us['prep']:.1f} us; "
                f"gemm_expanded alone {us['alone']:.1f}, + next by a kernel {us['kernel']:.1f}, by the GEMM "
                f"{us['gemm']:.1f} (in-GEMM extra {us['gemm'] - us['alone']:.1f} against "
                f"{us['kernel'] - us['alone']:.1f}), auto {us['auto']:.1f}; equal: {same}")
    log("ahead_ab per FLUX step (W4A8 GEMMs): " + ", ".join(f"{k} {v:.2f} ms" for k, v in tot.items()))
    if bad:
        raise SystemExit(f"ahead_ab: {bad} GEMMs gave different outputs or next weights")


# The W4A8 weights a FLUX.1 step at 1024x1024 expands with the prep kernel (N, K, calls per step): every GEMM of
# more than 1024 tokens, and the text stream's two narrow ones (to_add_out, ff_context out: their register-path
# tiles cover less than half the SMs); the text stream's q/k/v and ff in run on the register path, without.
FLUX_PREP_WEIGHTS = [(9216, 3072, 57), (3072, 3072, 38), (12288, 3072, 57), (3072, 12288, 38), (3072, 15360, 38)]


def expand_bw(dev, rep_ms):
    """How close W4A8's weight expansion streams to the memory's copy bandwidth: per FLUX.1 weight shape,
    expand_w4a8_weight (the prep kernel's arithmetic and store order, in a kernel of its own: codes and multipliers
    read, int8 written, 1.52 bytes per weight) with the slice halves exchanged by lane pairs and warp-uniformly (the
    default since 2026-12-07; SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair / warp: equal bytes checked), against a device-to-device copy
    of the int8 weight (2 bytes per weight), each in a CUDA graph; GB/s of each, and ms per step at each and at the
    copy's bandwidth. The prep kernel inside a FLUX step moves the same bytes (profile.top's prep_kernel;
    benchmarks/probes/prep_fit.py): if the kernel of its own reaches the copy's bandwidth and prep does not, the cost
    is prep's launch structure, not the expansion."""
    ops = torch.ops.svdquant
    g = torch.Generator().manual_seed(11)
    ways = ("pair", "warp")
    step = {**{w: 0.0 for w in ways}, "at copy speed": 0.0}
    bad = 0
    for N, K, calls in FLUX_PREP_WEIGHTS:
        layer = make_layer(K, N, 32, dev, g, "w4a8")
        wc, ws = layer["wc"], layer["ws"]
        outs, us = {}, {}
        for w in ways:
            with env_var("SVDQUANT_OPS_CUDA_W4A8_EXPAND", w):
                outs[w] = ops.expand_w4a8_weight(wc, ws)
                us[w] = bench_graph(lambda: ops.expand_w4a8_weight(wc, ws), rep_ms) * 1e3
        same = torch.equal(outs["pair"], outs["warp"])
        bad += not same
        dense = outs["pair"]
        dst = torch.empty_like(dense)
        ex_bytes = wc.numel() + ws.numel() + dense.numel()
        us_cp = bench_graph(lambda: dst.copy_(dense), rep_ms) * 1e3
        bw_cp = 2 * dense.numel() / us_cp / 1e3  # GB/s
        for w in ways:
            step[w] += us[w] * calls / 1e3
        step["at copy speed"] += ex_bytes / bw_cp / 1e6 * calls
        log(f"expand_bw N={N} K={K} ({calls} per step): " +
            ", ".join(f"{w} {us[w]:.1f} us, {ex_bytes / us[w] / 1e3:.0f} GB/s" for w in ways) +
            f"; copy {us_cp:.1f} us, {bw_cp:.0f} GB/s; equal: {same}")
    log("expand_bw per FLUX step (1024x1024, the weights prep expands): " +
        ", ".join(f"{k} {v:.2f} ms" for k, v in step.items()))
    if bad:
        raise SystemExit(f"expand_bw: {bad} shapes expanded differently with pair and warp")


@contextlib.contextmanager
def env_var(name, value):
    """The op library's run-time switch `name` set to `value` meanwhile (read at every call), then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def narrow_w4a8_tiles():
    """Every W4A8 GEMM on 128 x 128 tiles meanwhile (SVDQUANT_OPS_CUDA_W4A8_TILE=128): the diagnostics schedules exist
    for that width only, so the shipped schedule they are compared with, and the tile-overhead fit's rounds, must use
    it too."""
    return env_var("SVDQUANT_OPS_CUDA_W4A8_TILE", "128")


def w4a8_gemm_call(M, N, K, R, up_dt, out_dt, dev, g):
    """A W4A8 gemm call on random operands (int8 activation codes, per-token scales, down_act, a make_layer weight
    with its proj_up in ``up_dt``), as a closure of no arguments."""
    L = make_layer(K, N, R, dev, g, "w4a8")
    L["up"] = L["up"].to(up_dt)
    ac = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int32).to(dev, torch.int8)
    asc = (torch.rand(M, 1, generator=g) * 0.02 + 1e-3).to(dev, torch.bfloat16)
    da = torch.randn(M, R, generator=g).to(dev)
    return lambda: torch.ops.svdquant.gemm(ac, asc, L["wc"], L["ws"], L["gsc"], da, L["up"], L["bias"], "w4a8",
                                           out_dt, False)


def schedule_ab(dev, rep_ms, sched):
    """W4A8 gemm (prep included) on a FLUX.1 step's GEMMs (q/k/v fused) under the shipped schedule against the
    diagnostics build's SVDQUANT_OPS_GEMM_SCHEDULE=``sched``, alternating within each shape: outputs compared bit for
    bit (the in-flight / magic-conversion schedules compute the same sums), the kernel that ran checked, per-call
    (CUDA graph) and per-step times."""
    g = torch.Generator().manual_seed(8)
    compared = {**OTHER_SCHEDULES, **PAIR_SCHEDULES, **RING_SCHEDULES}
    exact = compared[sched][1] if sched in compared else None  # None: wrong results by design
    tot = {"promote": 0.0, sched: 0.0}
    bad = 0
    # edge cases for the compared schedules (not in the per-step total): one and two main-loop stages, a single row
    # tile with a ragged end, one of 40 rows (multicast: the second CTA's 64-row half lies wholly past M), rank 128
    # with an fp16 up projection (six branch stages)
    edges = [("edge K=128", 4608, 3072, 128, 32, torch.bfloat16), ("edge K=256", 4608, 3072, 256, 32, torch.bfloat16),
             ("edge M=77", 77, 256, 320, 32, torch.bfloat16), ("edge M=40", 40, 256, 320, 32, torch.bfloat16),
             ("edge R=128", 1000, 3072, 3072, 128, torch.float16)]
    seqs = [([(n, M, N, K, 32, torch.bfloat16) for n, M, N, K in FLUX_DOUBLE], 19),
            ([(n, M, N, K, 32, torch.bfloat16) for n, M, N, K in FLUX_SINGLE], 38)]
    if exact is not None:
        seqs.append((edges, 0))
    for seq, calls in seqs:
        for name, M, N, K, R, up_dt in seq:
            fn = w4a8_gemm_call(M, N, K, R, up_dt, torch.bfloat16, dev, g)
            us, outs, names = {k: [] for k in tot}, {}, {}
            for rep in range(2):  # A, B, A, B: drift between the two shows as a spread
                for k in tot:
                    os.environ["SVDQUANT_OPS_GEMM_SCHEDULE"] = k
                    if rep == 0:
                        outs[k] = fn() if exact is None else first_output(fn, (M, N), torch.bfloat16, dev,
                                                                           f"{k} {name}")
                        names[k] = gemm_kernel_names(fn)
                    us[k].append(bench_graph(fn, rep_ms) * 1e3)
            os.environ.pop("SVDQUANT_OPS_GEMM_SCHEDULE", None)
            idx = {"promote": 0, sched: compared[sched][0] if exact is not None else TIMING_SCHEDULES[sched]}
            assert all(any(f"2, {idx[k]}, true>" in n for n in names[k]) for k in tot), f"not as asked: {names}"
            if exact is None:
                same = True  # (not compared)
            elif exact:
                same = torch.equal(outs["promote"], outs[sched])
            else:
                same = schedule_close(outs["promote"], outs[sched])[0]
            bad += not same
            med = {k: sum(v) / len(v) for k, v in us.items()}
            for k in tot:
                tot[k] += med[k] * calls / 1e3
            log(f"schedule_ab {name} M={M} N={N} K={K}: promote {med['promote']:.1f} us "
                f"({'/'.join(f'{x:.1f}' for x in us['promote'])}), {sched} {med[sched]:.1f} us "
                f"({'/'.join(f'{x:.1f}' for x in us[sched])}), {med['promote'] / med[sched]:.3f}x; "
                + ("outputs not compared (wrong by design)" if exact is None
                   else f"{'bit-equal' if exact else 'close'}: {same}"))
    log(f"schedule_ab per FLUX step (W4A8 GEMMs with prep): promote {tot['promote']:.2f} ms, {sched} "
        f"{tot[sched]:.2f} ms ({tot['promote'] / tot[sched]:.3f}x)")
    if bad:
        raise SystemExit(f"schedule_ab: {bad} GEMMs differ between promote and {sched}")


def tile_ab(dev, rep_ms):
    """W4A8 gemm (prep included) on a FLUX.1 step's GEMMs (q/k/v fused) and edge cases with every call on 128 x 128
    tiles, on 128 x 256 tiles, and as the library chooses (SVDQUANT_OPS_CUDA_W4A8_TILE=128 / 256 / auto), alternating
    within each shape: the 256-wide outputs within fp32 rounding of the 128-wide ones (the branch is added in another
    order), auto's equal to the one it chose, the kernels that ran checked; per-call (CUDA graph) and per-step
    times, and the step as if each GEMM took its faster width."""
    g = torch.Generator().manual_seed(9)
    widths = ("128", "256", "auto")
    tot = {k: 0.0 for k in (*widths, "best")}
    bad = 0
    # edge cases (not in the per-step total): one and two main-loop stages, ragged M and N (N % 256 != 0, a last
    # column tile half past N), fp32 output (direct epilogue), rank 0, rank 128 with an fp16 up projection (six
    # branch stages), fp16 output
    edges = [("edge K=128", 4608, 3072, 128, 32, torch.bfloat16, torch.bfloat16),
             ("edge K=256", 4608, 3072, 256, 32, torch.bfloat16, torch.bfloat16),
             ("edge ragged", 1100, 2056, 1024, 32, torch.bfloat16, torch.bfloat16),
             ("edge N=200", 300, 200, 640, 32, torch.bfloat16, torch.float32),
             ("edge R=0", 2100, 4096, 640, 0, torch.bfloat16, torch.bfloat16),
             ("edge R=128", 2048, 4200, 1024, 128, torch.float16, torch.float16)]
    seqs = [([(n, M, N, K, 32, torch.bfloat16, torch.bfloat16) for n, M, N, K in FLUX_DOUBLE], 19),
            ([(n, M, N, K, 32, torch.bfloat16, torch.bfloat16) for n, M, N, K in FLUX_SINGLE], 38), (edges, 0)]
    for seq, calls in seqs:
        for name, M, N, K, R, up_dt, out_dt in seq:
            fn = w4a8_gemm_call(M, N, K, R, up_dt, out_dt, dev, g)
            us, outs, names = {k: [] for k in widths}, {}, {}
            for rep in range(2):  # A, B, C, A, B, C: drift shows as a spread
                for k in widths:
                    os.environ["SVDQUANT_OPS_CUDA_W4A8_TILE"] = k
                    if rep == 0:
                        outs[k] = first_output(fn, (M, N), out_dt, dev, f"tile {k} {name}")
                        names[k] = gemm_kernel_names(fn)
                    us[k].append(bench_graph(fn, rep_ms) * 1e3)
            os.environ.pop("SVDQUANT_OPS_CUDA_W4A8_TILE", None)
            assert all(any(f"gemm_kernel<{k}, 2, " in n for n in names[k]) for k in ("128", "256")), names
            chose = "256" if any("gemm_kernel<256, 2, " in n for n in names["auto"]) else "128"
            close, scaled = schedule_close(outs["128"], outs["256"])
            same = close and torch.equal(outs["auto"], outs[chose])
            bad += not same
            med = {k: sum(v) / len(v) for k, v in us.items()}
            for k in widths:
                tot[k] += med[k] * calls / 1e3
            tot["best"] += min(med["128"], med["256"]) * calls / 1e3
            log(f"tile_ab {name} M={M} N={N} K={K} R={R}: 128 {med['128']:.1f} us "
                f"({'/'.join(f'{x:.1f}' for x in us['128'])}), 256 {med['256']:.1f} us "
                f"({'/'.join(f'{x:.1f}' for x in us['256'])}), {med['128'] / med['256']:.3f}x; auto chose {chose} "
                f"({med['auto']:.1f} us); 256 vs 128 within fp32 rounding: {close} (max {scaled:.2e} of |ref| + rms), "
                f"auto equal to its choice: {torch.equal(outs['auto'], outs[chose])}")
    log(f"tile_ab per FLUX step (W4A8 GEMMs with prep): 128 {tot['128']:.2f} ms, 256 {tot['256']:.2f} ms, auto "
        f"{tot['auto']:.2f} ms ({tot['128'] / tot['auto']:.3f}x of 128), each at its faster width {tot['best']:.2f} ms")
    if bad:
        raise SystemExit(f"tile_ab: {bad} GEMMs differ beyond fp32 rounding between the widths")


def all_kernel_names(fn) -> list[str]:
    """Names of every CUDA kernel one call of ``fn`` launches, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def weights_ab(dev, rep_ms):
    """W4A8 gemm on the GEMMs of a FLUX.1 step (q/k/v fused) at 1024x1024 (image 4096 / text 512 / single-block 4608
    tokens) and 512x512 (1024 / 512 / 1536), with the weights expanded by the prep kernel on every call (prep, the
    library's tile width) against the packed weights expanded in the GEMM's registers (regs: rega_kernel, no weight
    prep), SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=prep / regs, alternating within each shape: outputs within fp32 rounding
    of each other (16-bit outputs: one ulp more), the kernels that ran checked, per-call (CUDA graph) and per-step
    times, and the step if each GEMM took the faster path; then the largest token count below which regs won every
    shape."""
    g = torch.Generator().manual_seed(10)
    ways = ("prep", "regs")
    bad = 0
    wins: dict[int, list[bool]] = {}
    for size, (m_img, m_txt, m_single) in (("1024", (4096, 512, 4608)), ("512", (1024, 512, 1536))):
        tot = {k: 0.0 for k in (*ways, "best")}
        seqs = [([(n, m_img if n.startswith("img") else m_txt, N, K) for n, _, N, K in FLUX_DOUBLE], 19),
                ([(n, m_single, N, K) for n, _, N, K in FLUX_SINGLE], 38)]
        for seq, calls in seqs:
            for name, M, N, K in seq:
                fn = w4a8_gemm_call(M, N, K, 32, torch.bfloat16, torch.bfloat16, dev, g)
                us, outs, names = {k: [] for k in ways}, {}, {}
                for rep in range(2):  # A, B, A, B: drift shows as a spread
                    for k in ways:
                        os.environ["SVDQUANT_OPS_CUDA_W4A8_WEIGHTS"] = k
                        if rep == 0:
                            outs[k] = first_output(fn, (M, N), torch.bfloat16, dev, f"{k} {name}")
                            names[k] = all_kernel_names(fn)
                        us[k].append(bench_graph(fn, rep_ms) * 1e3)
                os.environ.pop("SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", None)
                ran_ok = (any("rega_kernel" in n for n in names["regs"])
                          and not any("gemm_kernel" in n for n in names["regs"])
                          and any("gemm_kernel" in n for n in names["prep"]))
                close, scaled = schedule_close(outs["prep"], outs["regs"])
                bad += not (close and ran_ok)
                med = {k: sum(v) / len(v) for k, v in us.items()}
                for k in ways:
                    tot[k] += med[k] * calls / 1e3
                tot["best"] += min(med.values()) * calls / 1e3
                wins.setdefault(M, []).append(med["regs"] < med["prep"])
                log(f"weights_ab {size} {name} M={M} N={N} K={K}: prep {med['prep']:.1f} us "
                    f"({'/'.join(f'{x:.1f}' for x in us['prep'])}), regs {med['regs']:.1f} us "
                    f"({'/'.join(f'{x:.1f}' for x in us['regs'])}), prep/regs {med['prep'] / med['regs']:.3f}x; "
                    f"within fp32 rounding: {close} (max {scaled:.2e} of |ref| + rms); kernels as asked: {ran_ok}")
        log(f"weights_ab per FLUX step at {size}x{size} (W4A8 GEMMs): prep {tot['prep']:.2f} ms, regs "
            f"{tot['regs']:.2f} ms, each GEMM on its faster path {tot['best']:.2f} ms")
    below = [M for M in sorted(wins) if all(all(wins[m]) for m in sorted(wins) if m <= M)]
    log(f"weights_ab: regs faster on every shape at M <= {below[-1] if below else 'none'} "
        f"(per M: {', '.join(f'{M}: {sum(w)}/{len(w)}' for M, w in sorted(wins.items()))})")
    if bad:
        raise SystemExit(f"weights_ab: {bad} GEMMs differ beyond fp32 rounding or ran other kernels")


def bench_eager(fn, rep_ms):
    import triton.testing as tt

    return tt.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def make_fp8_linear(K, N, dev, W, bias):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    lin = torch.nn.Linear(K, N, bias=True, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(bias)
    lin.requires_grad_(False)
    quantize_(lin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return lin


def timing(dev, quick, use_torchao, rep_ms, tokens=None):
    results = []
    g = torch.Generator().manual_seed(1)
    tokens = tokens or ([4608] if quick else TOKENS)
    for K, N in SHAPES:
        L32 = make_layer(K, N, RANK, dev, g)
        L0 = dict(L32, pd=L32["pd"][:, :0].contiguous(), up=L32["up"][:, :0].contiguous())
        V32 = make_layer(K, N, RANK, dev, g, "w4a8")
        V0 = dict(V32, pd=V32["pd"][:, :0].contiguous(), up=V32["up"][:, :0].contiguous())
        W = (torch.randn(N, K, device=dev) / math.sqrt(K)).to(torch.bfloat16)
        fp8 = None
        if use_torchao:
            try:
                fp8 = make_fp8_linear(K, N, dev, W, L32["bias"])
            except Exception as exc:  # noqa: BLE001
                log("torchao fp8 unavailable:", repr(exc))
        for M in tokens:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            flops = 2.0 * M * N * K
            q = torch.ops.svdquant.quantize_act(x, L32["smooth"], L32["pd"], "int4", False)
            qv = torch.ops.svdquant.quantize_act(x, V32["smooth"], V32["pd"], "w4a8", False)
            fns = {
                "bf16": lambda: F.linear(x, W, L32["bias"]),
                "svdq_r32": lambda: svdq_linear(x, L32),
                "svdq_r0": lambda: svdq_linear(x, L0),
                "quantize_r32": lambda: torch.ops.svdquant.quantize_act(x, L32["smooth"], L32["pd"], "int4", False),
                "gemm_r32": lambda: torch.ops.svdquant.gemm(q[0], q[1], L32["wc"], L32["ws"], None, q[2],
                                                            L32["up"], L32["bias"], "int4", torch.bfloat16,
                                                            False),
                "w4a8_r32": lambda: svdq_linear(x, V32, "w4a8"),
                "w4a8_r0": lambda: svdq_linear(x, V0, "w4a8"),
                "quantize_w4a8_r32": lambda: torch.ops.svdquant.quantize_act(x, V32["smooth"], V32["pd"], "w4a8",
                                                                             False),
                "gemm_w4a8_r32": lambda: torch.ops.svdquant.gemm(qv[0], qv[1], V32["wc"], V32["ws"], V32["gsc"],
                                                                 qv[2], V32["up"], V32["bias"], "w4a8",
                                                                 torch.bfloat16, False),
            }
            if fp8 is not None:
                fns["fp8_torchao"] = lambda: fp8(x)
            r = dict(K=K, N=N, M=M)
            with torch.inference_mode():
                for name, fn in fns.items():
                    fn()
                    torch.cuda.synchronize()
                    r[name + "_ms"] = bench_graph(fn, rep_ms)
                for name in ("bf16", "svdq_r32", "w4a8_r32"):
                    r[name + "_eager_ms"] = bench_eager(fns[name], rep_ms)
            for name in list(r):
                if name.endswith("_ms") and not name.startswith(("quantize", "gemm")) and "eager" not in name:
                    r[name.replace("_ms", "_tflops")] = flops / (r[name] * 1e-3) / 1e12
            results.append(r)
            log("timing", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        del L32, L0, V32, V0, W, fp8
        torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def report(meta, corr, big, tim):
    lines = [f"# SVDQuant linear on {meta['gpu']} ({meta['date']})", ""]
    lines += _record.header_md(meta)
    lines += [f"- software: {meta['sms']} SMs; CUDA {meta['cuda']}; torch {meta['torch']}; triton {meta['triton']}; "
              f"torchao {meta['torchao']}",
              f"- library: {meta['library']} build (JIT, first load: {meta['build_s']:.0f} s)", ""]
    if corr:
        lines += ["## Correctness against the CPU reference (fresh random inputs, M = 128, bf16 activations, rank 32)",
                  "",
                  "| precision | K x N | codes bit-exact | scales bit-exact | down_act rel err | out fp32 rel err | "
                  "out fp32 max abs err | out bf16 max diff (ulp + 1e-4 rms) | portable fp32 rel err | portable bit-exact |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in corr:
            lines.append(f"| {r['precision']} | {r['K']} x {r['N']} | {r['codes_bit_exact']} | {r['scales_bit_exact']}"
                         f" | {r['down_act_rel_err']:.2e} | {r['out_fp32_rel_err']:.2e} | {r['out_fp32_max_abs_err']:.2e}"
                         f" | {r['out_bf16_max_ulp']:.2f} | {r['portable_fp32_rel_err']:.2e} | {r['portable_bit_exact']} |")
        lines += ["", "Hopper path vs portable path at M = 4608, K = N = 3072 (GPU only):", "",
                  "| precision | quantize codes+scales equal | down_act rel err | out rel err | deterministic (3 runs) |",
                  "|---|---|---|---|---|"]
        for r in big:
            lines.append(f"| {r['precision']} | {r['quantize_codes_scales_equal_portable']} | "
                         f"{r['down_act_rel_err_vs_portable']:.2e} | {r['out_rel_err_vs_portable']:.2e} | "
                         f"{r['deterministic_3_runs']} |")
        lines.append("")
    if tim:
        lines += ["## Speed: effective TFLOP/s = 2MNK / time (CUDA-graph replay, median); ratio to bf16 cuBLAS", "",
                  "| K x N | M | bf16 | fp8 torchao (ratio) | SVDQ INT4 r32 (ratio) | SVDQ INT4 r0 (ratio) | "
                  "branch cost r32/r0 | quantize_act us | gemm us | eager bf16 / SVDQ r32 us |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tim:
            b = r["bf16_tflops"]
            fp8 = f"{r['fp8_torchao_tflops']:.0f} ({r['fp8_torchao_tflops'] / b:.2f}x)" if "fp8_torchao_tflops" in r else "n/a"
            lines.append(
                f"| {r['K']} x {r['N']} | {r['M']} | {b:.0f} | {fp8} | {r['svdq_r32_tflops']:.0f} "
                f"({r['svdq_r32_tflops'] / b:.2f}x) | {r['svdq_r0_tflops']:.0f} ({r['svdq_r0_tflops'] / b:.2f}x) | "
                f"{(r['svdq_r32_ms'] / r['svdq_r0_ms'] - 1) * 100:+.1f}% | {r['quantize_r32_ms'] * 1e3:.1f} | "
                f"{r['gemm_r32_ms'] * 1e3:.1f} | {r['bf16_eager_ms'] * 1e3:.1f} / {r['svdq_r32_eager_ms'] * 1e3:.1f} |")
        lines.append("")
        lines += ["### W4A8 (INT4 weights with two-level scales, INT8 per-token activations; Hopper format, same run)", "",
                  "| K x N | M | bf16 | SVDQ W4A8 r32 (ratio) | SVDQ W4A8 r0 (ratio) | branch cost r32/r0 | "
                  "quantize_act us | gemm us | eager SVDQ W4A8 r32 us |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tim:
            b = r["bf16_tflops"]
            lines.append(
                f"| {r['K']} x {r['N']} | {r['M']} | {b:.0f} | {r['w4a8_r32_tflops']:.0f} ({r['w4a8_r32_tflops'] / b:.2f}x)"
                f" | {r['w4a8_r0_tflops']:.0f} ({r['w4a8_r0_tflops'] / b:.2f}x) | "
                f"{(r['w4a8_r32_ms'] / r['w4a8_r0_ms'] - 1) * 100:+.1f}% | {r['quantize_w4a8_r32_ms'] * 1e3:.1f} | "
                f"{r['gemm_w4a8_r32_ms'] * 1e3:.1f} | {r['w4a8_r32_eager_ms'] * 1e3:.1f} |")
        lines.append("")
    return "\n".join(lines)


def kernel_us(fn, name_part, reps=20):
    """Mean device time (us) of the CUDA kernels whose name contains name_part, per call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    t = sum(e.device_time_total for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and name_part in e.name)
    return t / reps


def tile_overhead(dev, precisions):
    """Where a 128 x 128 output tile's time goes: kernel time = rounds x (fixed + stages x per_stage), where rounds =
    ceil(tiles / SMs) (persistent grid) and stages = K / 128. Fitted over K at M = 4608, N = 3072 (864 tiles, 7
    rounds on 132 SMs), for R = 0 / 32 and each epilogue (SVDQUANT_OPS_GEMM_EPILOGUE: tma, direct, none = no stores,
    a diagnostic); for W4A8 also SVDQUANT_OPS_GEMM_SCHEDULE=halffeed (each main-loop stage loads only the weight
    tile: if the per-stage cost drops toward 512 cycles, the operand feed limits the main loop), halffeed-act (only
    the activation tile: the same bytes, so the same drop if the bytes count and not the operand) and ring4 / ring5 /
    ring7 (rings of 4 / 5 / 7 stages, 7 with the direct epilogue only: if the per-stage cost falls as the ring
    deepens, the loop waits on load latency; if it stays, on the feed's throughput)."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    M, N = 4608, 3072
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rounds = math.ceil(math.ceil(M / 128) * math.ceil(N / 128) / sms)
    Ks = [1536, 3072, 6144, 12288]
    runs = [(p, R, e, "promote") for p in precisions for R in (0, 32) for e in ("tma", "direct", "none")]
    runs += [("w4a8", 32, e, "halffeed") for e in ("tma", "none") if "w4a8" in precisions]
    runs += [("w4a8", 32, "tma", "halffeed-act")] if "w4a8" in precisions else []
    runs += [("w4a8", 32, e, r) for r, e in (("ring4", "tma"), ("ring5", "tma"), ("ring7", "direct"))
             if "w4a8" in precisions]
    for prec, R, epi, sched in runs:
        os.environ["SVDQUANT_OPS_GEMM_EPILOGUE"] = epi
        os.environ["SVDQUANT_OPS_GEMM_SCHEDULE"] = sched
        ts = []
        for K in Ks:
            L = make_layer(K, N, R, dev, g, prec)
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            q = torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], prec, False)
            fn = lambda: torch.ops.svdquant.gemm(q[0], q[1], L["wc"], L["ws"], L["gsc"], q[2], L["up"],  # noqa: E731
                                                 L["bias"], prec, torch.bfloat16, False)
            ts.append(kernel_us(fn, "gemm_kernel"))
        per_tile = np.array(ts) / rounds
        b, a = np.polyfit(np.array(Ks) / 128, per_tile, 1)
        log(f"tile_overhead {prec} R={R} epilogue={epi}{'' if sched == 'promote' else ' schedule=' + sched}: gemm "
            "kernel us " + " / ".join(f"K={K} {t:.1f}" for K, t in zip(Ks, ts)) +
            f" -> per tile: fixed {a:.2f} us + {b * 1e3:.0f} ns per 128-channel stage ({rounds} rounds of {sms} tiles)")
    os.environ.pop("SVDQUANT_OPS_GEMM_EPILOGUE", None)
    os.environ.pop("SVDQUANT_OPS_GEMM_SCHEDULE", None)


def smoke(dev, one=False):
    """Small cases of each kernel against the CPU reference; prints errors and never raises on a mismatch."""
    ops = torch.ops.svdquant
    g = torch.Generator().manual_seed(7)
    cases = (("int4", 200, 640, 320, 32), ("int4", 1, 128, 72, 0), ("nvfp4", 70, 256, 200, 16))
    for portable in ((False,) if one else (False, True)):
        if portable:
            os.environ["SVDQUANT_OPS_CUDA_PORTABLE"] = "1"
        for precision, M, K, N, R in (cases[1:2] if one else cases):
            L = make_layer(K, N, R, "cpu", g, precision)
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            rq = ops.quantize_act(x, L["smooth"], L["pd"], precision, False)
            ry = ops.gemm(rq[0], rq[1], L["wc"], L["ws"], L["gsc"], rq[2], L["up"], L["bias"], precision,
                          torch.float32, False)
            Ld = {k: (v.to(dev) if v is not None else None) for k, v in L.items()}
            q = ops.quantize_act(x.to(dev), Ld["smooth"], Ld["pd"], precision, False)
            y = ops.gemm(*[t.to(dev) if t is not None else None for t in
                           (rq[0], rq[1], L["wc"], L["ws"], L["gsc"], rq[2], L["up"], L["bias"])],
                         precision, torch.float32, False)
            torch.cuda.synchronize()
            log(f"smoke portable={portable} {precision} M={M} K={K} N={N} R={R}: codes mismatches "
                f"{(q[0].cpu() != rq[0]).sum().item()}, scales mismatches "
                f"{(q[1].cpu().view(torch.uint8) != rq[1].view(torch.uint8)).sum().item()}, down_act rel "
                f"{rel_fro(q[2], rq[2]) if R else 0:.2e}, out rel {rel_fro(y, ry):.2e}")
    os.environ.pop("SVDQUANT_OPS_CUDA_PORTABLE", None)


def w4a8_gemm_cases(quick=False):
    """(M, K, N, R, dtype) of the W4A8 gemm variant comparisons: FLUX shapes at M = 4608 (image + text) and 512 (text
    stream), then edges: N not a multiple of the 128-wide tile, K with an odd number of 64-groups (the last stage's
    second group past K), few rows, fp16 output, rank 0."""
    cases = [(4608, K, N, 32, torch.bfloat16) for K, N in SHAPES]
    cases += [(512, 3072, 3072, 32, torch.bfloat16), (512, 3072, 12288, 32, torch.bfloat16)]
    cases += [(77, 320, 200, 32, torch.bfloat16), (300, 1088, 4100, 16, torch.float16), (4608, 3072, 3072, 0, torch.bfloat16)]
    return [cases[0], cases[4]] if quick else cases  # quick: the square FLUX shape and the longest K


def w4a8_gemm_fn(M, K, N, R, dt, dev, g, saturate=False):
    """One W4A8 gemm call (quantize_act done once) on fresh random inputs, output in ``dt`` (fp32 output: bf16
    inputs), as a callable. ``saturate``: every weight +7 x 18 and tokens 0-35 all ones, so that those rows' integer
    dot products pass 2^22 (K = 3072: ~1.5e7) and the others stay small; rows 32-35 and 36-39 share a warp."""
    xdt = torch.bfloat16 if dt == torch.float32 else dt
    L = make_layer(K, N, R, dev, g, "w4a8", xdt)
    x = torch.randn(M, K, device=dev, dtype=xdt)
    if saturate:
        L["wc"].fill_(0x77)
        L["ws"].fill_(18)
        x[:36] = 1.0
    q = torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "w4a8", False)
    return lambda: torch.ops.svdquant.gemm(q[0], q[1], L["wc"], L["ws"], L["gsc"], q[2], L["up"], L["bias"], "w4a8",
                                           dt, False)


def first_output(fn, shape, dt, dev, label):
    """``fn()``'s output, computed into a block just filled with NaN (the caching allocator hands back the block freed
    last), so that elements a kernel does not store show up; asserts that a second call gives the same bits."""
    junk = torch.full(shape, float("nan"), device=dev, dtype=dt)
    del junk
    out = fn().clone()
    assert torch.equal(out, fn()), f"{label}: two calls differ ({shape})"
    return out


def gemm_kernel_names(fn) -> set[str]:
    """Full names (template arguments included) of the GEMM kernels one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "gemm_kernel" in e.name}


# W4A8 schedules of the diagnostics build compared with the shipped one (promote: both consumer warpgroups on each
# tile): the template index of each in gemm_kernel<BN, kind, schedule, store> (W4A8 is kind 2), and whether its
# outputs must be bit-equal to promote's
OTHER_SCHEDULES = {"overlap": (3, True), "overlap3": (4, True), "pingpong": (5, False), "promote-cvt": (6, True),
                   "inflight": (7, True)}
# Diagnostics that compute wrong results by design, timed only (--schedule-ab, --tile-overhead): halffeed loads only the
# weight tile per main-loop stage (half the operand feed), so its speed tells whether the feed limits the main loop;
# halffeed-act loads only the activation tile (the same bytes: if it is as fast, the bytes count, not the operand)
TIMING_SCHEDULES = {"halffeed": 8, "halffeed-act": 13}
# Compared with promote by --schedule-ab only (bit-equal), as they need an even number of column tiles (the other calls
# run promote): multicast runs 2-CTA clusters whose two tiles share rows, each CTA loading half of the activation tile
# for both
PAIR_SCHEDULES = {"multicast": (9, True)}
# The shipped schedule with a ring of 4 / 5 / 7 stages instead of 6 (bit-equal; ring7 leaves no room for the epilogue
# buffer, so it stores directly from registers): whether the main loop waits on load latency or on the feed's
# throughput (--schedule-ab, --tile-overhead)
RING_SCHEDULES = {"ring4": (10, True), "ring5": (11, True), "ring7": (12, True)}


def schedule_close(ref: torch.Tensor, out: torch.Tensor) -> tuple[bool, float]:
    """Whether ``out`` (a schedule that adds the same terms in another order) matches ``ref`` within fp32 rounding,
    and the largest difference in units of (|ref| + rms): fp32 outputs within 1e-5 of that, 16-bit outputs within one
    unit in their last place more (the rule of tests/test_cuda_ops.py against the CPU op, 10x tighter)."""
    r, g = ref.double(), out.double()
    rms = r.pow(2).mean().sqrt().item() if r.numel() else 0.0
    scaled = ((g - r).abs() / (r.abs() + rms + 1e-30)).max().item() if r.numel() else 0.0
    tol = 1e-5 * (r.abs() + rms)
    if ref.dtype != torch.float32:
        bits = 8 if ref.dtype == torch.bfloat16 else 11
        tol = tol + 1.0001 * torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(1e-30))) - (bits - 1))
    return bool(((g - r).abs() <= tol).all()), scaled


def overlap_compare(dev, rep_ms, quick=False):
    """W4A8 gemm under the shipped schedule (both consumer warpgroups on each tile) against
    SVDQUANT_OPS_GEMM_SCHEDULE=overlap / overlap3 (each tile's epilogue under the next tile's first MMAs, 2 / 3 stages
    of MMAs in flight; bias through the direct and the TMA-store epilogues): the same sums and the same final fma, so
    the outputs must be bit-equal; =pingpong (a consumer warpgroup per tile, its conversion, branch and stores under
    the other's main loop): the branch added onto the scaled main-loop sums by the tensor cores, so within fp32
    rounding (schedule_close); and =promote-cvt (the shipped schedule with the int32 sums converted by a magic-number
    add): bit-equal. Times of the gemm op (prep included). Extra cases: 1 and 2 main-loop stages (K = 128 / 256: the
    epilogue after the loop), 2 branch stages (R = 64), 6 (R = 128, fp16: the ping-pong's early release), fp32 output
    (the direct epilogue) and saturated rows (dot products past 2^22: promote-cvt's I2F fallback), the last two also
    in --quick. Outputs land on NaN-filled memory (first_output), so a tile a schedule does not store shows as a
    difference; the profiler confirms which kernel ran."""
    g = torch.Generator().manual_seed(12)
    bad = 0
    extra = [(4608, 3072, 3072, 32, torch.float32), (4608, 3072, 3072, 32, "saturate")]
    if not quick:
        extra += [(4608, 128, 3072, 32, torch.bfloat16), (4608, 256, 3072, 32, torch.bfloat16),
                  (4608, 3072, 3072, 64, torch.bfloat16), (1000, 3072, 3072, 128, torch.float16)]
    cases = w4a8_gemm_cases(quick) + extra
    scheds = ["promote", *OTHER_SCHEDULES]
    index = {"promote": 0, **{k: v[0] for k, v in OTHER_SCHEDULES.items()}}
    for M, K, N, R, dt in cases:
        saturate = dt == "saturate"
        dt = torch.bfloat16 if saturate else dt
        fn = w4a8_gemm_fn(M, K, N, R, dt, dev, g, saturate)
        res, ms, names = {}, {}, {}
        for sched in scheds:
            os.environ["SVDQUANT_OPS_GEMM_SCHEDULE"] = sched
            res[sched] = first_output(fn, (M, N), dt, dev, f"{sched} K={K}")
            names[sched] = gemm_kernel_names(fn)
            ms[sched] = bench_graph(fn, rep_ms)
        os.environ.pop("SVDQUANT_OPS_GEMM_SCHEDULE", None)
        ran = all(any(f"2, {index[sched]}, true>" in n for n in names[sched]) for sched in scheds)
        assert ran, f"a schedule did not run as asked: {names}"
        verdicts = []
        for sched, (_, exact) in OTHER_SCHEDULES.items():
            finite = bool(torch.isfinite(res[sched]).all())
            if exact:
                ok = torch.equal(res["promote"], res[sched])
                diff = (res["promote"].float() - res[sched].float()).abs().max().item()
                verdict = "bit-equal" if ok else f"DIFFER (max |d| {diff:.3g})"
            else:
                ok, scaled = schedule_close(res["promote"], res[sched])
                verdict = f"{'close' if ok else 'NOT CLOSE'} (max |d| / (|ref| + rms) {scaled:.2e})"
            bad += (not ok) or (not finite)
            verdicts.append(f"{sched} {verdict}{'' if finite else ' NON-FINITE'}")
        times = ", ".join(f"{k} {ms[k] * 1e3:.1f} us ({ms['promote'] / ms[k]:.3f}x)" for k in OTHER_SCHEDULES)
        what = f"{str(dt)[6:]}{' saturated' if saturate else ''}"
        log(f"overlap M={M} K={K} N={N} R={R} {what}: {', '.join(verdicts)} | promote "
            f"{ms['promote'] * 1e3:.1f} us, {times}")
    log(f"overlap: {bad} of {len(OTHER_SCHEDULES) * len(cases)} (case, schedule) pairs differ")
    if bad:
        sys.exit(1)


def wprep_compare(dev, rep_ms, quick=False):
    """W4A8 gemm, weights expanded by prep vs inside the GEMM kernel: the int32 main loop and the epilogue are the
    same, so the outputs must be bit-equal; times of the gemm op (prep included) and of its kernels."""
    g = torch.Generator().manual_seed(11)
    cases = w4a8_gemm_cases(quick)
    bad = 0
    for M, K, N, R, dt in cases:
        fn = w4a8_gemm_fn(M, K, N, R, dt, dev, g)
        res, ms, ks = {}, {}, {}
        for mode in ("prep", "kernel"):
            os.environ["SVDQUANT_OPS_GEMM_WPREP"] = mode
            res[mode] = first_output(fn, (M, N), dt, dev, f"{mode} K={K}")
            ms[mode] = bench_graph(fn, rep_ms)
            ks[mode] = kernel_times(fn)
        for mode in ("kernel-nomult", "kernel-noexpand", "kernel-nostore", "kernel-noarith"):  # wrong results: where the expander's time goes
            os.environ["SVDQUANT_OPS_GEMM_WPREP"] = mode
            fn()
            ms[mode] = bench_graph(fn, rep_ms)
        os.environ.pop("SVDQUANT_OPS_GEMM_WPREP", None)
        same = torch.equal(res["prep"], res["kernel"])
        finite = bool(torch.isfinite(res["kernel"]).all())
        bad += (not same) or (not finite)
        diff = (res["prep"].float() - res["kernel"].float()).abs().max().item()
        log(f"wprep M={M} K={K} N={N} R={R} {str(dt)[6:]}: {'bit-equal' if same else f'DIFFER (max |d| {diff:.3g})'}"
            f"{'' if finite else ' NON-FINITE'} | prep {ms['prep'] * 1e3:.1f} us, kernel {ms['kernel'] * 1e3:.1f} us "
            f"({ms['prep'] / ms['kernel']:.2f}x), kernel-nomult {ms['kernel-nomult'] * 1e3:.1f} us, kernel-noexpand "
            f"{ms['kernel-noexpand'] * 1e3:.1f} us, kernel-nostore {ms['kernel-nostore'] * 1e3:.1f} us, kernel-noarith "
            f"{ms['kernel-noarith'] * 1e3:.1f} us | kernels: prep path " + ", ".join(f"{n} {us:.1f}" for n, us in ks["prep"])
            + "; kernel path " + ", ".join(f"{n} {us:.1f}" for n, us in ks["kernel"]))
    log(f"wprep: {bad} of {len(cases)} cases differ")
    if bad:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="only the quick smoke check")
    ap.add_argument("--smoke-one", action="store_true", help="only one tiny INT4 case (for compute-sanitizer)")
    ap.add_argument("--qa-step", action="store_true", help="only W4A8 quantize_act on a FLUX.1 step's inputs: per-call "
                    "and per-step times by kernel (--qa-save / --qa-compare: codes across library versions)")
    ap.add_argument("--qa-save", default=None, help="--qa-step: save each shape's codes and scales to this file")
    ap.add_argument("--qa-compare", default=None, help="--qa-step: compare the codes with a --qa-save file")
    ap.add_argument("--quantize-only", action="store_true", help="only time quantize_act at M=4608 "
                    "(or --tokens), all K; W4A8 also the given-amax op and Inductor's amax")
    ap.add_argument("--gmax-ab", action="store_true", help="only W4A8's quantize_act on a FLUX.1 step's input shapes "
                    "with the pipelined group-max kernel against the register-prefetch one "
                    "(SVDQUANT_OPS_CUDA_W4A8_GMAX=pipe / regs): outputs compared, per-call and per-step times")
    ap.add_argument("--cluster-ab", action="store_true", help="only W4A8's quantize_act on a FLUX.1 step's input "
                    "shapes with the two passes against the one-pass cluster kernel (SVDQUANT_OPS_CUDA_W4A8_CLUSTER="
                    "unset / 1, Hopper): outputs compared, per-call and per-step times, the 512-token calls apart")
    ap.add_argument("--pair-ab", action="store_true", help="only a FLUX.1 double block's image / text linear pairs "
                    "(W4A8 and bf16), one after the other against the text linear on a second CUDA stream: the text "
                    "linear's marginal cost, outputs compared")
    ap.add_argument("--token-ab", action="store_true", help="only W4A8's quantize_act on a FLUX.1 step's input "
                    "shapes with the token kernel's K split where M is small off and on "
                    "(SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=0 / 1): outputs compared, per-call and per-step times")
    ap.add_argument("--ahead-ab", action="store_true", help="only W4A8's gemm_expanded on a FLUX.1 step's GEMM "
                    "sequence: the next weight expanded by a kernel of its own, by the GEMM's idle warps, or as the "
                    "library chooses (SVDQUANT_OPS_CUDA_W4A8_NEXT), against gemm with its prep; per-call and per-step "
                    "times")
    ap.add_argument("--expand-bw", action="store_true", help="only W4A8's weight expansion (expand_w4a8_weight) on "
                    "the weights a FLUX.1 step's prep expands, against a device-to-device copy: bandwidth per shape "
                    "and per step")
    ap.add_argument("--weights-ab", action="store_true", help="only W4A8's gemm on a FLUX.1 step's GEMMs at 1024x1024 "
                    "and 512x512 with the weights expanded by the prep kernel against the packed weights expanded in "
                    "registers (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=prep / regs): outputs compared, per-call and per-step "
                    "times")
    ap.add_argument("--tile-ab", action="store_true", help="only W4A8's gemm on a FLUX.1 step's GEMMs (and edge "
                    "cases) on 128 x 128 against 128 x 256 tiles and the library's choice (SVDQUANT_OPS_CUDA_W4A8_TILE="
                    "128 / 256 / auto): outputs compared, per-call and per-step times")
    ap.add_argument("--schedule-ab", metavar="SCHEDULE",
                    choices=sorted({*OTHER_SCHEDULES, *TIMING_SCHEDULES, *PAIR_SCHEDULES, *RING_SCHEDULES}),
                    help="only W4A8's gemm on a FLUX.1 step's GEMMs (and edge cases) under the shipped schedule "
                    "against SVDQUANT_OPS_GEMM_SCHEDULE=SCHEDULE (e.g. inflight, multicast, ring5; ring7 stores directly, "
                    "so its times include the direct epilogue; halffeed: times only): "
                    "outputs compared, per-call and per-step times (needs SVDQUANT_OPS_DIAGNOSTICS=1)")
    ap.add_argument("--gemm-only", action="store_true", help="only time gemm at M=4608 per --schedules "
                    "(needs SVDQUANT_OPS_DIAGNOSTICS=1 unless --schedules is just promote)")
    ap.add_argument("--tile-overhead", action="store_true", help="only the sm90 GEMM kernel's time (no prep) at "
                    "M=4608, N=3072 over K, R and epilogue, fit as per-tile fixed cost + per-stage cost "
                    "(needs SVDQUANT_OPS_DIAGNOSTICS=1)")
    ap.add_argument("--tile-w4a8-only", action="store_true", help="--tile-overhead: W4A8 only (its schedules and "
                    "ring depths), not INT4")
    ap.add_argument("--wprep", action="store_true", help="only W4A8's gemm with the weights expanded by the prep "
                    "kernel against expanded inside the GEMM (SVDQUANT_OPS_GEMM_WPREP=kernel): bit-equal outputs, "
                    "times (needs SVDQUANT_OPS_DIAGNOSTICS=1)")
    ap.add_argument("--overlap", action="store_true", help="only W4A8's gemm under the shipped schedule against "
                    "SVDQUANT_OPS_GEMM_SCHEDULE=overlap / overlap3 (epilogue under the next tile's MMAs) and "
                    "promote-cvt (magic-number int32 -> fp32): bit-equal outputs; pingpong (whole tiles per "
                    "warpgroup): within fp32 rounding; times (needs SVDQUANT_OPS_DIAGNOSTICS=1)")
    ap.add_argument("--breakdown", action="store_true", help="only per-kernel device times of the linear (profiler)")
    ap.add_argument("--profile", action="store_true", help="only run the FLUX 3072x3072 M=4608 linear a few times "
                    "(for ncu)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
                    help="folder for <date>-<gpu>-linear.md/.json (default: $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=None,
                    help="the timing table's token counts M, comma-separated (default 1024,4608,9216; --quick: 4608), "
                    "e.g. 512 for FLUX.1's text stream at batch 1 (issue 14's small-M item) or 2048 at batch 4; the "
                    "file name then ends in -m<M>_...")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--precision", default="int4", choices=["int4", "nvfp4", "w4a8"],
                    help="--quantize-only / --breakdown: the precision to run")
    ap.add_argument("--schedules", default="promote,skeleton",
                    help="--gemm-only: comma-separated SVDQUANT_OPS_GEMM_SCHEDULE values to time, each optionally "
                    "with +direct (register -> global epilogue); all but plain promote are diagnostics")
    args = ap.parse_args()
    diagnostics = os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") == "1"
    needs = []
    if args.gemm_only and any(v.strip() != "promote" for v in args.schedules.split(",")):
        needs.append(f"--gemm-only --schedules {args.schedules} (SVDQUANT_OPS_GEMM_SCHEDULE / _EPILOGUE)")
    if args.wprep:
        needs.append("--wprep (SVDQUANT_OPS_GEMM_WPREP)")
    if args.overlap:
        needs.append(f"--overlap (SVDQUANT_OPS_GEMM_SCHEDULE={' / '.join(OTHER_SCHEDULES)})")
    if args.schedule_ab:
        needs.append(f"--schedule-ab (SVDQUANT_OPS_GEMM_SCHEDULE={args.schedule_ab})")
    if args.tile_overhead:
        needs.append("--tile-overhead (SVDQUANT_OPS_GEMM_EPILOGUE=direct|none)")
    if args.tile_w4a8_only and not args.tile_overhead:
        raise SystemExit("--tile-w4a8-only: only with --tile-overhead")
    qa_knobs = [k for k in ("SVDQUANT_OPS_QA_CFG", "SVDQUANT_OPS_QA_SPLITS") if os.environ.get(k)]
    if qa_knobs:
        needs.append(" / ".join(qa_knobs) + " (quantize_act configurations)")
    if needs and not diagnostics:
        sys.exit("bench_linear.py: " + "; ".join(needs) + ": these switches exist only in a diagnostics build of "
                 "the op library. Run with SVDQUANT_OPS_DIAGNOSTICS=1 in the environment (it is read when the library is built and "
                 "keys its own build cache), e.g. `bash benchmarks/gpu_run.sh gemm` or `... tiles`.")
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.device("cuda")
    rec = _record.record(torch.cuda.get_device_name(0))
    t0 = time.time()
    import svdquant_ops.ops

    svdquant_ops.ops.load()  # JIT build (or the cached build) of the op library; registers torch.ops.svdquant
    build_s = time.time() - t0
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "n/a"
    try:
        import torchao
        aov = torchao.__version__
    except Exception:  # noqa: BLE001
        aov = "n/a"
    prop = torch.cuda.get_device_properties(0)
    meta = dict(rec, sms=prop.multi_processor_count, cuda=torch.version.cuda, torch=torch.__version__, triton=tv,
                torchao=aov, build_s=build_s, library="diagnostics" if diagnostics else "normal")
    log("meta", meta)
    if diagnostics and not (needs or args.smoke or args.smoke_one or args.profile):
        log("warning: SVDQUANT_OPS_DIAGNOSTICS=1: timing the diagnostics build, not the shipped one (recorded in the "
            "result's header)")
    if args.gmax_ab:
        gmax_ab(dev, args.rep_ms)
        return
    if args.ahead_ab:
        ahead_ab(dev, args.rep_ms)
        return
    if args.schedule_ab:
        with narrow_w4a8_tiles():
            schedule_ab(dev, args.rep_ms, args.schedule_ab)
        return
    if args.weights_ab:
        weights_ab(dev, args.rep_ms)
        return
    if args.expand_bw:
        expand_bw(dev, args.rep_ms)
        return
    if args.tile_ab:
        tile_ab(dev, args.rep_ms)
        return
    if args.token_ab:
        token_ab(dev, args.rep_ms)
        return
    if args.cluster_ab:
        cluster_ab(dev, args.rep_ms)
        return
    if args.pair_ab:
        pair_ab(dev, args.rep_ms)
        return
    if args.qa_step:
        qa_step(dev, args.rep_ms, args.qa_save, args.qa_compare)
        return
    if args.quantize_only:
        g = torch.Generator().manual_seed(3)
        # distinct K of SHAPES at rank 32; K = 3072 at rank 64 (a FLUX single block's shared q/k/v/mlp input) and 128
        # (that input with rank-16 LoRAs fused)
        # (--tokens: other token counts, e.g. 512 for the text stream, where the given-amax op's one pass might pay)
        for M, (K, R) in itertools.product(args.tokens or [4608],
                                           [(3072, 32), (12288, 32), (15360, 32), (3072, 64), (3072, 128)]):
            L = make_layer(K, 3072, R, dev, g, args.precision)
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            fn = lambda: torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], args.precision, False)
            fn()
            ms = bench_graph(fn, args.rep_ms)
            log(f"quantize_only {args.precision} K={K} M={M} R={R}: {ms * 1e3:.1f} us, {M * K * 2 / ms / 1e9:.2f} TB/s of x "
                f"(SVDQUANT_OPS_QA_CFG={os.environ.get('SVDQUANT_OPS_QA_CFG', '0')}, "
                f"SVDQUANT_OPS_QA_SPLITS={os.environ.get('SVDQUANT_OPS_QA_SPLITS', 'auto')})")
            log("  kernels:", ", ".join(f"{n} {us:.1f} us" for n, us in kernel_times(fn)))
            if args.precision == "w4a8":  # the compiled path: amax from Inductor, then one pass of the op
                sm = L["smooth"]
                amax = (x.float() / sm.float()).abs().amax(-1, keepdim=True)  # eager ATen: IEEE, the exact amax
                fg = lambda: torch.ops.svdquant.quantize_act_given_amax(x, sm, L["pd"], amax)
                same = torch.equal(fg()[0], fn()[0])
                ms_g = bench_graph(fg, args.rep_ms)
                amax_of = torch.compile(lambda x, s: (x.float() / s.float()).abs().amax(-1, keepdim=True))
                fa = lambda: amax_of(x, sm)
                fa()
                ms_a = bench_graph(fa, args.rep_ms)
                log(f"  given_amax K={K} M={M} R={R}: {ms_g * 1e3:.1f} us ({ms_g / ms:.2f}x of quantize_act; codes equal "
                    f"to quantize_act's: {same}); Inductor's amax as its own kernel (unfused): {ms_a * 1e3:.1f} us")
                log("  kernels:", ", ".join(f"{n} {us:.1f} us" for n, us in kernel_times(fg)))
        return
    if args.gemm_only:
        # gemm alone (prep included) at M = 4608 under each SVDQUANT_OPS_GEMM_SCHEDULE (read per call), next to
        # bf16 cuBLAS; "skeleton*" are diagnostics without the promotion (wrong results, feed speed only).
        g = torch.Generator().manual_seed(3)
        shapes = SHAPES if not args.quick else [(3072, 3072), (3072, 12288)]
        for K, N in shapes:
            L = make_layer(K, N, RANK, dev, g)
            x = torch.randn(4608, K, device=dev, dtype=torch.bfloat16)
            W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
            q = torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "int4", False)
            ms_bf16 = bench_graph(lambda: F.linear(x, W), args.rep_ms)
            row = [f"gemm_only K={K} N={N} M=4608: bf16 {ms_bf16 * 1e3:.1f} us"]
            for variant in args.schedules.split(","):
                # "<schedule>[+direct]": +direct forces the register -> global epilogue
                sched, _, epi = variant.partition("+")
                os.environ["SVDQUANT_OPS_GEMM_SCHEDULE"] = sched
                os.environ["SVDQUANT_OPS_GEMM_EPILOGUE"] = epi or "tma"
                fn = lambda: torch.ops.svdquant.gemm(q[0], q[1], L["wc"], L["ws"], None, q[2], L["up"],
                                                     L["bias"], "int4", torch.bfloat16, False)
                fn()
                ms = bench_graph(fn, args.rep_ms)
                row.append(f"{variant} {ms * 1e3:.1f} us ({2 * 4608 * N * K / ms / 1e9:.0f} TF)")
            os.environ.pop("SVDQUANT_OPS_GEMM_SCHEDULE", None)
            os.environ.pop("SVDQUANT_OPS_GEMM_EPILOGUE", None)
            log(" | ".join(row))
        return
    if args.tile_overhead:
        with narrow_w4a8_tiles():
            tile_overhead(dev, ["w4a8"] if args.tile_w4a8_only else ["w4a8", "int4"])
        return
    if args.wprep:
        wprep_compare(dev, args.rep_ms, args.quick)
        return
    if args.overlap:
        with narrow_w4a8_tiles():
            overlap_compare(dev, args.rep_ms, args.quick)
        return
    if args.breakdown:
        # per-kernel device time of the full linear (rank 32 vs rank 0) from torch.profiler, at M = 4608
        from torch.profiler import ProfilerActivity, profile

        g = torch.Generator().manual_seed(3)
        shapes = SHAPES if not args.quick else [(3072, 3072)]
        for K, N in shapes:
            x = torch.randn(4608, K, device=dev, dtype=torch.bfloat16)
            for R in (32, 0):
                L = make_layer(K, N, R, dev, g, args.precision)
                for _ in range(3):
                    svdq_linear(x, L, args.precision)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        svdq_linear(x, L, args.precision)
                    torch.cuda.synchronize()
                per = {}
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        per[e.name] = per.get(e.name, 0.0) + e.device_time_total / 20
                total = sum(per.values())
                parts = ", ".join(f"{k.split('(')[0][-40:]} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
                log(f"breakdown {args.precision} K={K} N={N} M=4608 R={R}: total {total:.1f} us: {parts}")
        return
    if args.profile:
        g = torch.Generator().manual_seed(3)
        L = make_layer(3072, 3072, RANK, dev, g)
        x = torch.randn(4608, 3072, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            svdq_linear(x, L)
        torch.cuda.synchronize()
        return
    if args.smoke or args.smoke_one:
        smoke(dev, one=args.smoke_one)
        return
    corr, big = correctness(dev, args.quick) if not args.no_correctness else ([], [])
    tim = timing(dev, args.quick, not args.no_torchao, args.rep_ms, args.tokens) if not args.no_timing else []
    md = report(meta, corr, big, tim)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tag = "h100" if "H100" in prop.name else ("h200" if "H200" in prop.name else prop.name.replace(" ", "_"))
    stem = f"{meta['date'][:10]}-{gpu_tag}-linear" + (f"-m{'_'.join(map(str, args.tokens))}" if args.tokens else "")
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, correctness=corr, hopper_vs_portable=big,
                                                      timing=tim), indent=1, default=str))
    print(md)
    log(f"wrote {out / stem}.md/.json (commit {meta['commit']}, dirty: {meta['dirty']}); add its row to "
        "benchmarks/results/INDEX.md")


if __name__ == "__main__":
    main()
