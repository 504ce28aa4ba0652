"""One W4A8 GEMM (or torchao's fp8 row-wise GEMM) at a FLUX.1 shape, run a few times for Nsight Compute.

Why: the `halffeed` diagnostic (main-loop stages that load only the weight tile) runs the W4A8 main loop at ~287 ns
per 128-channel stage against ~410 for the shipped one (H100, 2026-12-06), while a 2-CTA TMA multicast of the
activation tile (25 % fewer L2 reads) gains nothing. So the feed limits the loop, but not through L2 requests. ncu
tells which part of the feed: DRAM bytes (L2 misses from the tile order), L2 throughput, or shared-memory fill.

Usage on the GPU machine (the schedule comes from SVDQUANT_OPS_GEMM_SCHEDULE, diagnostics build):
  ncu --clock-control none -k regex:'gemm_kernel|nvjet|sm90_xmma' --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis python3 benchmarks/probes/gemm_ncu.py --shape 4608,3072,15360 [--fp8]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_linear import make_fp8_linear, make_layer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4608,3072,15360", help="M,N,K")
    ap.add_argument("--fp8", action="store_true", help="torchao fp8 row-wise (cuBLAS) instead of SVDQuant W4A8")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    M, N, K = (int(v) for v in args.shape.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("gemm_ncu.py needs a CUDA GPU")
    sched = os.environ.get("SVDQUANT_OPS_GEMM_SCHEDULE", "promote")
    if sched != "promote" and os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") != "1":
        raise SystemExit(f"SVDQUANT_OPS_GEMM_SCHEDULE={sched} needs the diagnostics build: set "
                         "SVDQUANT_OPS_DIAGNOSTICS=1 (a normal build runs the shipped schedule)")
    import svdquant_ops.ops

    svdquant_ops.ops.load()  # the op library (JIT or cached build): registers torch.ops.svdquant

    dev = "cuda"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
    if args.fp8:
        W = (torch.randn(N, K, generator=g) / K**0.5).to(dev, torch.bfloat16)
        lin = make_fp8_linear(K, N, dev, W, torch.zeros(N, device=dev, dtype=torch.bfloat16))
        fn = lambda: lin(x)  # noqa: E731
    else:
        L = make_layer(K, N, 32, dev, g, "w4a8")
        q = torch.ops.svdquant.quantize_act(x, L["smooth"], L["pd"], "w4a8", False)
        fn = lambda: torch.ops.svdquant.gemm(q[0], q[1], L["wc"], L["ws"], L["gsc"], q[2], L["up"],  # noqa: E731
                                             L["bias"], "w4a8", torch.bfloat16, False)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"gemm_ncu: {'fp8' if args.fp8 else 'w4a8'} M={M} N={N} K={K}, {args.calls} calls")


if __name__ == "__main__":
    main()
