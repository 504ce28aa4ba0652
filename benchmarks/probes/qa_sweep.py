#!/usr/bin/env python3
"""W4A8 quantize_act configurations swept in one process (diagnostics build: SVDQUANT_OPS_DIAGNOSTICS=1).

    SVDQUANT_OPS_DIAGNOSTICS=1 python benchmarks/probes/qa_sweep.py [--configs cfg:splits:keep,...] [--op given]

Each configuration sets SVDQUANT_OPS_QA_CFG / _QA_SPLITS / _QA_KEEP (cfg 0, splits 0 and keep -1 are the shipped
choices; csrc/cuda/README.md lists the others), which a diagnostics build reads on every call. Times per call at M = 4608 (CUDA graph, median): "cold" runs
4 calls on 4 different inputs in a row (x not in L2 when its call starts, ~113 MB or more in all), "hot" repeats
one input (its x partly in L2 from the previous call, as when the op that wrote x ran just before).
``--op given`` sweeps quantize_act_given_amax instead (each input's exact amax computed once beforehand; keep does
not apply to it: it streams x), e.g. ``--op given --configs 0:0:-1,0:2:-1,0:3:-1,0:4:-1,0:6:-1,2:0:-1``.
``--shapes K:R,...`` picks the shapes (default: all four FLUX ones). The last column splits the cold calls' time by
kernel: the token kernel there is the second read of an x that its own first pass has just read, as in a FLUX step
(where keep = 1 on the x the library streams, over half of L2: 113-141 MB at K = 12288 / 15360, 28 MB at K = 3072,
would let that read find the first pass's last-read lines in L2: ``gpu_run.sh qakeep``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_linear import bench_graph, kernel_times, make_layer  # noqa: E402

SHAPES = [(3072, 32), (3072, 64), (12288, 32), (15360, 32)]  # (K, R)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0:0:-1,4:0:-1,0:0:0,0:4:-1,0:3:-1,3:0:-1,3:5:-1")
    ap.add_argument("--rep-ms", type=int, default=30)
    ap.add_argument("--op", default="quantize_act", choices=["quantize_act", "given"])
    ap.add_argument("--shapes", default=",".join(f"{k}:{r}" for k, r in SHAPES), help="K:R,... (M = 4608, N = 3072)")
    args = ap.parse_args()
    assert os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") == "1", "needs a diagnostics build (SVDQUANT_OPS_DIAGNOSTICS=1)"
    import svdquant_ops.ops

    svdquant_ops.ops.load()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    print(f"op: {args.op}")
    print("| K | R | cfg:splits:keep | cold us | hot us | kernels (hot, us) | kernels (cold, us per call) |")
    print("|---|---|---|---|---|---|---|")
    for K, R in [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]:
        L = make_layer(K, 3072, R, dev, g, "w4a8")
        xs = [torch.randn(4608, K, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        amaxes = {id(x): (x.float() / L["smooth"].float()).abs().amax(-1, keepdim=True) for x in xs}
        for cfg, splits, keep in configs:
            os.environ["SVDQUANT_OPS_QA_CFG"] = str(cfg)
            os.environ["SVDQUANT_OPS_QA_SPLITS"] = str(splits)
            os.environ["SVDQUANT_OPS_QA_KEEP"] = str(keep)

            def one(x):
                if args.op == "given":
                    return torch.ops.svdquant.quantize_act_given_amax(x, L["smooth"], L["pd"], amaxes[id(x)])
                return torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "w4a8", False)

            def cold():
                for x in xs:
                    one(x)

            cold()
            torch.cuda.synchronize()
            t_cold = bench_graph(cold, args.rep_ms) * 1e3 / len(xs)
            t_hot = bench_graph(lambda: one(xs[0]), args.rep_ms) * 1e3
            ks = ", ".join(f"{n} {t:.1f}" for n, t in kernel_times(lambda: one(xs[0])))
            kc = ", ".join(f"{n} {t / len(xs):.1f}" for n, t in kernel_times(cold))
            print(f"| {K} | {R} | {cfg}:{splits}:{keep} | {t_cold:.1f} | {t_hot:.1f} | {ks} | {kc} |", flush=True)


if __name__ == "__main__":
    main()
