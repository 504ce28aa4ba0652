#!/usr/bin/env python3
"""svdquant::w4a16_linear (4-bit weights, 16-bit activations) against bf16 F.linear (cuBLAS) at few tokens.

    python benchmarks/bench_w4a16.py [--out DIR] [--check] [--quick] [--replays N]

Needs the package importable (the repository on PYTHONPATH, as ``benchmarks/gpu_run.sh`` sets it) and a CUDA GPU.

Shapes: the FLUX.1 AdaLN modulation linears (K = 3072; N = 18432, 9216, 6144), K = N = 3072, and K = 4096,
N = 24576; M = 1, 2, 4, 8 tokens (the GEMV kernel) and 16 (the dequantize + cuBLAS path). bf16 activations, bf16
scales and zeros, bf16 bias on both sides.

Timing: a CUDA graph of back-to-back calls that rotate over enough copies of the weights (>= 256 MB per method) that
every call reads its weights from HBM, not from the 50 MB L2, as a model's layers do; the per-call time is the
median over replays of (replay time / calls). "GB/s" is the weight bytes read per second: codes + scales + zeros
(0.5625 bytes per weight) for w4a16, 2 bytes per weight for bf16. The ratio is bf16 time / w4a16 time, measured in
the same run (benchmarks/README.md).

--check: the CUDA op against the CPU op (csrc/cpu/w4a16.cpp) on every timed shape, fresh random inputs, with the
tolerance of tests/test_cuda_w4a16.py: |gpu - cpu| <= 2e-5 * mag (+ 2u * mag on the M > 8 path, u the unit
roundoff of bf16) + one bf16 ulp, where mag = |x| @ (|code * scale| + |zero|).T + |bias|.
--grid-sweep (diagnostics build only, SVDQUANT_OPS_DIAGNOSTICS=1): the GEMV kernel's time per forced number of blocks
per SM (SVDQUANT_OPS_W4A16_BLOCKS_PER_SM = 1, 2) next to the shipped choice, for the full-slice kernel and the
generic one (SVDQUANT_OPS_W4A16_GENERIC=1), to tune the grid and compare the two code-load patterns.
--group-ab: a FLUX.1-dev step's 77 AdaLN modulation linears at one token (19 x 2 of N = 18432, 38 of 9216, 1 of 6144,
K = 3072, bf16 bias), one w4a16_linear call each against one w4a16_linear_group call (two GEMV launches): outputs
compared bit for bit, time per step (CUDA graph of the whole set; the weights, ~1.8 GB, are read from HBM).
--out DIR writes <date>-<gpu>-w4a16.md / .json there, each starting with the run's record (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _record  # benchmarks/_record.py (this script's folder is first on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3072, 18432), (3072, 9216), (3072, 6144), (3072, 3072), (4096, 24576)]  # (K, N)
TOKENS = [1, 2, 4, 8, 16]
GEMV_MAX_M = 8
ROTATE_BYTES = 256 << 20  # weights touched between two reads of the same copy: several times the L2


def log(*a):
    print(*a, flush=True)


def make_w4a16(K, N, g):
    """codes (every byte), bf16 scales and zeros on g's device: weights code * scale + zero of O(0.01)."""
    G, dev = K // 64, g.device
    codes = torch.randint(0, 256, (N, K // 2), generator=g, device=dev, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(N, G, generator=g, device=dev) * 0.002 + 1e-4).to(torch.bfloat16)
    zeros = (-torch.rand(N, G, generator=g, device=dev) * 0.015).to(torch.bfloat16)
    return codes, scales, zeros


def w4a16_bytes(K, N):
    return N * K // 2 + 2 * N * (K // 64) * 2


def time_rotating(make_call, n_copies, replays, min_calls=32):
    """Per-call time (ms) of make_call(i) for copies i = 0 .. n_copies - 1 called in turn inside one CUDA graph:
    median over replays of replay time / calls."""
    calls = max(min_calls, n_copies)
    fns = [make_call(i % n_copies) for i in range(calls)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (one-time setup of the ops) outside the capture
        for fn in fns[:n_copies]:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def timing(dev, shapes, tokens, replays):
    rows = []
    g = torch.Generator(dev).manual_seed(1)
    for K, N in shapes:
        nb_w4, nb_bf = w4a16_bytes(K, N), 2 * N * K
        n_w4 = max(2, -(-ROTATE_BYTES // nb_w4))
        n_bf = max(2, -(-ROTATE_BYTES // nb_bf))
        w4 = [make_w4a16(K, N, g) for _ in range(n_w4)]
        wb = [(torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16) for _ in range(n_bf)]
        bias = (torch.randn(N, device=dev) * 0.1).to(torch.bfloat16)
        for M in tokens:
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            t_bf = time_rotating(lambda i: (lambda: F.linear(x, wb[i], bias)), n_bf, replays)
            t_w4 = time_rotating(lambda i: (lambda: torch.ops.svdquant.w4a16_linear(x, *w4[i], bias)), n_w4, replays)
            r = dict(K=K, N=N, M=M, path="gemv" if M <= GEMV_MAX_M else "dequant+cuBLAS", bf16_us=t_bf * 1e3,
                     w4a16_us=t_w4 * 1e3, ratio=t_bf / t_w4, w4a16_GBps=nb_w4 / (t_w4 * 1e-3) / 1e9,
                     bf16_GBps=nb_bf / (t_bf * 1e-3) / 1e9, w4a16_bytes=nb_w4, bf16_bytes=nb_bf)
            rows.append(r)
            log("timing", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
        w4 = wb = None  # free before the next shape
        torch.cuda.empty_cache()
    return rows


ADALN = [18432] * 38 + [9216] * 38 + [6144]  # FLUX.1-dev: norm1 / norm1_context, single norm, norm_out


def group_ab(dev, replays):
    ops = torch.ops.svdquant
    g = torch.Generator(dev).manual_seed(5)
    K = 3072
    ws = [make_w4a16(K, N, g) for N in ADALN]
    bias = [(torch.randn(N, device=dev) * 0.1).to(torch.bfloat16) for N in ADALN]
    x = torch.randn(1, K, device=dev).to(torch.bfloat16)
    codes, scales, zeros = ([w[i] for w in ws] for i in range(3))
    single = [ops.w4a16_linear(x, *w, b) for w, b in zip(ws, bias)]
    grouped = ops.w4a16_linear_group(x, codes, scales, zeros, bias)
    same = all(torch.equal(a, b) for a, b in zip(single, grouped))
    t = {}
    for name, fn in (("single", lambda: [ops.w4a16_linear(x, *w, b) for w, b in zip(ws, bias)]),
                     ("grouped", lambda: ops.w4a16_linear_group(x, codes, scales, zeros, bias))):
        t[name] = time_rotating(lambda i, fn=fn: fn, 1, replays, min_calls=1)
    gb = sum(w4a16_bytes(K, N) for N in ADALN) / 1e9
    log(f"group_ab {len(ADALN)} AdaLN linears, {gb:.2f} GB of weights: one call each {t['single']:.3f} ms "
        f"({gb / t['single']:.2f} TB/s), grouped {t['grouped']:.3f} ms ({gb / t['grouped']:.2f} TB/s), "
        f"{t['single'] / t['grouped']:.2f}x; bit-equal: {same}")
    if not same:
        raise SystemExit("bench_w4a16.py --group-ab: the grouped outputs differ from the single calls'")


def grid_sweep(dev, shapes, tokens, replays):
    """w4a16 GEMV time per forced SVDQUANT_OPS_W4A16_BLOCKS_PER_SM (read at every call in a diagnostics build)."""
    g = torch.Generator(dev).manual_seed(2)
    for K, N in shapes:
        nb_w4 = w4a16_bytes(K, N)
        n_w4 = max(2, -(-ROTATE_BYTES // nb_w4))
        w4 = [make_w4a16(K, N, g) for _ in range(n_w4)]
        bias = (torch.randn(N, device=dev) * 0.1).to(torch.bfloat16)
        for M in [m for m in tokens if m <= GEMV_MAX_M]:
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            row = [f"grid_sweep K={K} N={N} M={M}:"]
            for generic in ("0", "1"):  # 1: the generic kernel (8-byte code loads) instead of the full-slice one
                os.environ["SVDQUANT_OPS_W4A16_GENERIC"] = generic
                for per_sm in ("auto", "1", "2"):
                    if per_sm == "auto":
                        os.environ.pop("SVDQUANT_OPS_W4A16_BLOCKS_PER_SM", None)
                    else:
                        os.environ["SVDQUANT_OPS_W4A16_BLOCKS_PER_SM"] = per_sm
                    t = time_rotating(lambda i: (lambda: torch.ops.svdquant.w4a16_linear(x, *w4[i], bias)), n_w4,
                                      replays)
                    row.append(f"g{generic}/{per_sm} {t * 1e3:.2f} us ({nb_w4 / (t * 1e-3) / 1e9:.0f} GB/s)")
            os.environ.pop("SVDQUANT_OPS_W4A16_BLOCKS_PER_SM", None)
            os.environ.pop("SVDQUANT_OPS_W4A16_GENERIC", None)
            log(" | ".join(row))
        w4 = None
        torch.cuda.empty_cache()


def check(dev, shapes, tokens):
    """CUDA op vs CPU op on fresh inputs; returns rows with the worst error relative to the allowed one."""
    from svdquant_ops import layout

    rows = []
    g = torch.Generator().manual_seed(int(time.time()) & 0xFFFF)
    for K, N in shapes:
        codes, scales, zeros = make_w4a16(K, N, g)
        bias = (torch.randn(N, generator=g) * 0.1).to(torch.bfloat16)
        c = layout.unpack_nibbles(codes.to(dev), signed=False).reshape(N, K // 64, 64).transpose(0, 1).float()
        for M in tokens:
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            ref = torch.ops.svdquant.w4a16_linear(x, codes, scales, zeros, bias)
            out = torch.ops.svdquant.w4a16_linear(x.to(dev), codes.to(dev), scales.to(dev), zeros.to(dev),
                                                  bias.to(dev)).cpu()
            xa = x.to(dev).float().abs().reshape(M, K // 64, 64).transpose(0, 1)
            mag = ((torch.bmm(xa, c.transpose(1, 2)).permute(1, 2, 0) * scales.to(dev).float().abs()).sum(-1)
                   + xa.sum(-1).T @ zeros.to(dev).float().abs().T + bias.to(dev).float().abs()).double().cpu()
            r64 = ref.double()
            ulp = torch.exp2(torch.floor(torch.log2(r64.abs().clamp_min(1e-30))) - 7)
            u = 2.0 ** -8 if M > GEMV_MAX_M else 0.0
            allowed = (2e-5 + 2 * u) * mag + ulp
            err = (out.double() - r64).abs()
            rows.append(dict(K=K, N=N, M=M, max_err_over_allowed=(err / allowed).max().item(),
                             max_err_over_mag=(err / mag).max().item(), ok=bool((err <= allowed).all())))
            log("check", rows[-1])
    return rows


def report(meta, tim, chk):
    lines = [f"# W4A16 linear (4-bit weights, bf16 activations) on {meta['gpu']} ({meta['date']})", ""]
    lines += _record.header_md(meta)
    lines += [f"- software: {meta['sms']} SMs; CUDA {meta['cuda']}; torch {meta['torch']}",
              f"- library: {meta['library']} build (JIT, first load: {meta['build_s']:.0f} s)",
              "- timing: CUDA graph of back-to-back calls rotating over >= 256 MB of weight copies per method "
              "(weights read from HBM), median per-call time; bf16 activations, scales, zeros and bias", ""]
    if tim:
        lines += ["| K | N | M | path | bf16 F.linear (us) | w4a16_linear (us) | ratio bf16 / w4a16 | "
                  "w4a16 weight GB/s | bf16 weight GB/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tim:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['path']} | {r['bf16_us']:.1f} | {r['w4a16_us']:.1f} "
                         f"| **{r['ratio']:.2f}x** | {r['w4a16_GBps']:.0f} | {r['bf16_GBps']:.0f} |")
        lines.append("")
    if chk:
        lines += ["Correctness against the CPU op (fresh random inputs): worst |gpu - cpu| / allowed (<= 1 passes) "
                  "and / mag", "", "| K | N | M | err / allowed | err / mag | ok |", "|---|---|---|---|---|---|"]
        for r in chk:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['max_err_over_allowed']:.3f} | "
                         f"{r['max_err_over_mag']:.2e} | {r['ok']} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for <date>-<gpu>-w4a16.md/.json (default: print only)")
    ap.add_argument("--check", action="store_true", help="also compare the CUDA op with the CPU op on every shape")
    ap.add_argument("--check-only", action="store_true", help="only the comparison, no timing")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--group-ab", action="store_true", help="only a FLUX.1 step's 77 AdaLN linears, one call each "
                    "against one w4a16_linear_group call: bit-equal outputs, time per step")
    ap.add_argument("--grid-sweep", action="store_true", help="only the GEMV time per forced blocks per SM "
                    "(needs SVDQUANT_OPS_DIAGNOSTICS=1)")
    args = ap.parse_args()
    if args.grid_sweep and os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") != "1":
        raise SystemExit("bench_w4a16.py --grid-sweep: SVDQUANT_OPS_W4A16_BLOCKS_PER_SM exists only in a diagnostics "
                         "build; run with SVDQUANT_OPS_DIAGNOSTICS=1 (e.g. `bash benchmarks/gpu_run.sh w4a16grid`)")
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.device("cuda")
    rec = _record.record(torch.cuda.get_device_name(0))
    t0 = time.time()
    import svdquant_ops.ops

    svdquant_ops.ops.load()
    build_s = time.time() - t0
    prop = torch.cuda.get_device_properties(0)
    meta = dict(rec, sms=prop.multi_processor_count, cuda=torch.version.cuda, torch=torch.__version__,
                build_s=build_s,
                library="diagnostics" if os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") == "1" else "normal")
    log("meta", meta)
    shapes = SHAPES[::3] if args.quick else SHAPES
    if args.grid_sweep:
        grid_sweep(dev, shapes, TOKENS, args.replays)
        return
    if args.group_ab:
        group_ab(dev, args.replays)
        return
    chk = check(dev, shapes, TOKENS) if (args.check or args.check_only) else []
    tim = [] if args.check_only else timing(dev, shapes, TOKENS, args.replays)
    md = report(meta, tim, chk)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu_tag = "h100" if "H100" in prop.name else ("h200" if "H200" in prop.name else prop.name.replace(" ", "_"))
        stem = f"{meta['date'][:10]}-{gpu_tag}-w4a16"
        (out / f"{stem}.md").write_text(md)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, timing=tim, check=chk), indent=1, default=str))
        log(f"wrote {out / stem}.md/.json (commit {meta['commit']}, dirty: {meta['dirty']}); add its row to "
            "benchmarks/results/INDEX.md")
    if chk and not all(r["ok"] for r in chk):
        raise SystemExit("bench_w4a16.py: the CUDA op disagrees with the CPU op (see the check table)")


if __name__ == "__main__":
    main()
