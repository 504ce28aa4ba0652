"""Time the calibrated SVDQuant algorithm on FLUX.1-sized layer groups and project the whole FLUX.1-dev model.

One run does: calibration recording of 128 samples x 4608 tokens through the q/k/v group (timed per sample),
then the solve of every distinct FLUX.1 group shape (default config; also GPTQ and exact SVD for q/k/v), and
prints / writes a markdown table with the projection for 19 double + 38 single blocks. The report starts with the
run's record (date, device, commit, dirty tree, command: benchmarks/_record.py).

    python benchmarks/bench_quantize.py --out benchmarks/results/<date>-h200-quantize-time.md   # GPU
    python benchmarks/bench_quantize.py --small                                                # CPU smoke test

Needs the package importable (``pip install -e .``, or the repository on PYTHONPATH as ``benchmarks/gpu_run.sh``
sets it) and torchao. The algorithm uses torch ops only: ``SVDQUANT_OPS_NO_CUDA=1`` skips the CUDA op build.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn
from torchao.quantization import quantize_

import _record  # benchmarks/_record.py (this script's folder is first on sys.path)
from svdquant_ops import SVDQuantConfig, calibrate


class Group(nn.Module):
    """Linears that share one input (like q/k/v), run as the model would: same tensor into each."""

    def __init__(self, k: int, outs: list[int], names: list[str]):
        super().__init__()
        self.names = names
        for n, o in zip(names, outs):
            self.add_module(n, nn.Linear(k, o))

    def forward(self, x):
        return [getattr(self, n)(x) for n in self.names]


def make_weights(group: Group, seed: int) -> None:
    # Random weights with a decaying spectrum and a few large input columns, roughly like trained layers.
    g = torch.Generator().manual_seed(seed)
    for n in group.names:
        lin = getattr(group, n)
        o, k = lin.weight.shape
        w = torch.randn(o, k, generator=g) / k**0.5
        w += (torch.randn(o, 64, generator=g) @ torch.randn(64, k, generator=g)) / (8 * k**0.5)
        w[:, torch.randperm(k, generator=g)[:8]] *= 6
        lin.weight.data.copy_(w)


def sample_input(tokens: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=gen, device=device)
    x[:, :: max(1, k // 16)] *= 30  # a few outlier channels, as in diffusion activations
    return x.to(torch.bfloat16)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# (label, K, outputs, count in FLUX.1-dev, calibration tokens per sample)
FLUX_GROUPS = [
    ("double img q/k/v", 3072, [3072, 3072, 3072], 19, 4096),
    ("double txt q/k/v", 3072, [3072, 3072, 3072], 19, 512),
    ("double img/txt attn out", 3072, [3072], 38, 4096),
    ("double img/txt ff up", 3072, [12288], 38, 4096),
    ("double img/txt ff down", 12288, [3072], 38, 4096),
    ("single q/k/v + mlp in", 3072, [3072, 3072, 3072, 12288], 38, 4608),
    ("single proj_out", 15360, [3072], 38, 4608),
]


def run(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    rec = _record.record(gpu)
    scale = 16 if args.small else 1
    samples = 4 if args.small else args.samples
    rows = []
    lines = []

    def solve(label, k, outs, tokens, cfg, n_samples, record_calib=False):
        names = ["to_q", "to_k", "to_v", "proj_mlp"][: len(outs)] if len(outs) > 1 else ["proj"]
        k_s, outs_s = k // scale, [o // scale for o in outs]
        grp = Group(k_s, outs_s, names).to(device)
        make_weights(grp, 0)
        grp = grp.to(torch.bfloat16)
        gen = torch.Generator(device=device).manual_seed(1)
        sync()
        t0 = time.perf_counter()
        with calibrate(grp, max_rows=args.max_rows) as session:
            with torch.no_grad():
                for _ in range(n_samples):
                    grp(sample_input(tokens // (scale if args.small else 1), k_s, gen, device))
        sync()
        t_cal = time.perf_counter() - t0
        summary = session.summary()
        t0 = time.perf_counter()
        quantize_(grp, cfg)
        sync()
        t_solve = time.perf_counter() - t0
        return t_cal, t_solve, summary

    default = SVDQuantConfig(device=str(device))
    # 1) q/k/v with the full calibration volume of the issue: 128 samples x 4608 tokens
    t_cal, t_solve, summary = solve("q/k/v", 3072, [3072] * 3, 4608, default, samples)
    lines.append(f"q/k/v 3072->9216, {samples} samples x 4608 tokens recorded in {t_cal:.2f} s "
                 f"({t_cal / samples * 1e3:.1f} ms per sample, hooks + sampling), solve {t_solve:.2f} s; "
                 f"{summary}")
    for name, cfg in (("GPTQ", SVDQuantConfig(device=str(device), gptq=True)),
                      ("exact SVD", SVDQuantConfig(device=str(device), svd="exact"))):
        _, t, _ = solve("q/k/v", 3072, [3072] * 3, 4608, cfg, 2)
        lines.append(f"q/k/v solve with {name}: {t:.2f} s")
    # 2) every distinct group shape of FLUX.1-dev (solve time does not depend on the token count: bounded rows)
    total = 0.0
    total_gptq = 0.0
    per_sample_ms = t_cal / samples * 1e3
    for label, k, outs, count, tokens in FLUX_GROUPS:
        _, t, _ = solve(label, k, outs, tokens, default, 2)
        _, tg, _ = solve(label, k, outs, tokens, SVDQuantConfig(device=str(device), gptq=True), 2)
        rows.append((label, k, sum(outs), count, t, tg))
        total += count * t
        total_gptq += count * tg
    # calibration: 128 samples through the real model costs the model's forward passes; our hooks add
    # per_sample_ms per group per sample (measured above for the biggest input).
    n_groups = sum(r[3] for r in rows)
    hook_overhead = n_groups * samples * per_sample_ms / 1e3
    out = [f"# SVDQuant calibrated quantization time, {rec['date'][:10]}", ""] + _record.header_md(rec) + [
           f"- software: torch {torch.__version__}",
           f"- config: default SVDQuantConfig (int4, rank 32, 39-point smoothing grid, svd_lowrank, low-rank refit "
           f"<= 100 rounds with early stop, RTN), max_rows={args.max_rows}" + (" (SMALL smoke run: sizes / 16)"
                                                                                if args.small else ""),
           ""] + [f"- {ln}" for ln in lines] + [
           "", "| group | K | N (sum) | count in FLUX.1-dev | solve s (RTN) | solve s (GPTQ) |", "|---|---|---|---|---|---|"]
    out += [f"| {lab} | {k} | {n} | {c} | {t:.2f} | {tg:.2f} |" for lab, k, n, c, t, tg in rows]
    out += ["", f"Projected whole FLUX.1-dev (19 double + 38 single blocks, {n_groups} groups): "
            f"solve {total / 60:.1f} min (RTN) / {total_gptq / 60:.1f} min (GPTQ), plus calibration-hook "
            f"overhead {hook_overhead / 60:.1f} min over {samples} samples (the 16-bit forward passes of the "
            f"calibration run itself come on top)."]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = run(args)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
