#!/usr/bin/env python3
"""What the W4A8 prep kernel's time per FLUX.1 step is made of, from recorded runs (CPU only, no GPU): its bytes
per step (weights expanded from 4-bit to int8, plus the small operands: the branch's bf16 parts, scales, bias) are
counted from the model's GEMM list and the library's per-call rules, and a least-squares fit of the recorded
prep_kernel ms per step (profile.top of bench_flux JSON files) gives time = fixed + bytes / bandwidth.

    python benchmarks/probes/prep_fit.py benchmarks/results/2026-12-07-h100-flux-*-11f67a6*.json

The byte model mirrors csrc/cuda/gemm.cu: W4A8 GEMMs on the register path (w4a8_regs_pay: M <= 1024 tokens and
at least half the SMs' worth of 256 x 128 tiles) launch prep for the small operands only; gemm_cat's later weights
skip the activation-side operands; proj_up is bf16 (2 branch segments: KL = 64 at rank 32). Every step launches
prep 266 times at every size and batch, so the fit's fixed term is per step (266 launches), not separable from a
per-launch cost.
"""

import json
import sys

import numpy as np

R, KL, SMS = 32, 64, 132
DOUBLE, SINGLE, TXT = 19, 38, 512


def gemms(tokens_img, tokens_txt):
    """(M, N, K, later weight of a gemm_cat) of one step: q/k/v fused, the single block's to_qkv + proj_mlp as one
    gemm_cat (the compile recipe)."""
    tokens_all = tokens_img + tokens_txt
    out = []
    for _ in range(DOUBLE):
        for m in (tokens_img, tokens_txt):
            out += [(m, 9216, 3072, False), (m, 3072, 3072, False), (m, 12288, 3072, False), (m, 3072, 12288, False)]
    for _ in range(SINGLE):
        out += [(tokens_all, 9216, 3072, False), (tokens_all, 12288, 3072, True), (tokens_all, 3072, 15360, False)]
    return out


def regs_pay(m, n):
    return m <= 1024 and 2 * (-(-m // 256) * -(-n // 128)) >= SMS


def prep_bytes(tokens_img, tokens_txt):
    weights = small = launches = 0
    for m, n, k, later in gemms(tokens_img, tokens_txt):
        launches += 1
        if not regs_pay(m, n):
            weights += n * k * (0.5 + 1 / 64 + 1)  # codes and multipliers read, int8 written
        small += n * KL * 2 + n * R * 2 + 8 * n  # proj_up's bf16 parts written, proj_up read, bias / scale
        if not later:
            small += m * KL * 2 + m * R * 4 + 4 * m  # down_act's bf16 parts written, down_act read, token scales
    return launches, weights, small


def main(paths):
    rows = []
    for path in paths:
        run = json.load(open(path))
        for row in run["rows"]:
            if not row.get("ok") or not row["config"].startswith("w4a8-compile"):
                continue
            ms = [t["ms_per_step"] for t in row.get("profile", {}).get("top", []) if "prep_kernel" in t["name"]]
            if not ms:
                continue
            img = row["tokens"]["image"] * row["batch"]
            txt = row["tokens"]["text"] * row["batch"]
            launches, w, s = prep_bytes(img, txt)
            rows.append((path.split("/")[-1], row["config"], img, txt, launches, w, s, ms[0]))
    if len(rows) < 2:
        sys.exit("need at least two w4a8 rows with a prep_kernel time")
    print("| file | config | tokens (image + text) | launches | weight GB | small GB | prep ms | GB/s over the kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for f, c, img, txt, n, w, s, ms in rows:
        print(f"| {f} | {c} | {img} + {txt} | {n} | {w / 1e9:.2f} | {s / 1e9:.3f} | {ms:.2f} | "
              f"{(w + s) / 1e9 / ms * 1e3:.0f} |")
    x = np.array([[1.0, (w + s) / 1e9] for *_, w, s, _ in rows])
    y = np.array([r[-1] for r in rows])
    (fixed, per_gb), *_ = np.linalg.lstsq(x, y, rcond=None)
    print(f"\nfit: prep ms per step = {fixed:.2f} + GB / {1 / per_gb:.2f} TB/s "
          f"(largest residual {np.abs(x @ [fixed, per_gb] - y).max():.2f} ms)")


if __name__ == "__main__":
    main(sys.argv[1:])
