"""Probe: W4A8 quantize_act reading x once (a thread-block cluster along K, quantize_cluster_probe.cu) against the
library's CUDA quantize_act (two passes over x), on the GPU machine (`bash benchmarks/gpu_run.sh clusterprobe`).

1. Exactness against the library's CPU op (the specification): codes and scales bit-exact, down_act relative error
   (fp32 sums in another order), on FLUX shapes plus a token count that is not a multiple of 16 and rows holding
   zeros, NaN and Inf.
2. Time per call (CUDA events, median of 5 x 20 launches) of both, on the 6 shapes of one FLUX.1-dev step at
   1024x1024 (228 calls: 57 x (4096, 3072), 19 x (4096, 12288), 57 x (512, 3072), 19 x (512, 12288),
   38 x (4608, 3072), 38 x (4608, 15360)), and the per-step sums. Prediction (HISTORY.md, 2026-12-05): ~18-20 us
   against ~36 us at (4608, 3072), ~12 -> ~7 ms per step. Slices: K = 3072 in 4 CTAs of 768 channels,
   12288 and 15360 in 8 CTAs of 1536 / 1920.
Measured (H100, 2026-12-05, --library-only): the library's cluster kernel 30.1 ms per step against its two passes'
14.8 (results/2026-12-05-h100-quantize-act-w4a8-cluster.md); the cluster kernel is now opt-in
(SVDQUANT_OPS_CUDA_W4A8_CLUSTER=1, which this script sets for the "library, cluster" column).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

STEP = [((4096, 3072), 57), ((4096, 12288), 19), ((512, 3072), 57), ((512, 12288), 19), ((4608, 3072), 38),
        ((4608, 15360), 38)]
R = 32


def build():
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    here = Path(__file__).resolve().parent
    return load(name="quantize_cluster_probe", sources=[str(here / "quantize_cluster_probe.cu")],
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-std=c++17"], verbose=False)


def inputs(M: int, K: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g) * torch.exp(torch.randn(M, 1, device="cuda", generator=g))
    x[:, :: max(1, K // 37)] *= 20  # outlier channels
    smooth = (torch.rand(K, device="cuda", generator=g) * 3 + 0.25).to(torch.bfloat16)
    pd = (torch.randn(K, R, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
    return x.to(torch.bfloat16), smooth, pd


def scales_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal where the reference is a number, NaN at the same places (the GPU's bf16 NaN is 0x7FFF, the CPU's
    0x7FC0), as tests/test_cuda_ops.py's assert_bits_equal."""
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


def check(ext, M: int, K: int, seed: int, specials: bool = False) -> dict:
    # the CPU op (the reference) is torch.ops.svdquant.quantize_act, registered by main()'s svdquant_ops.ops.load()

    x, smooth, pd = inputs(M, K, seed)
    if specials:
        x[0] = 0  # scale 0: codes 0
        x[1, 5] = float("nan")
        x[2, 7] = float("inf")
    codes, scales, down = ext.quantize_w4a8_cluster(x, smooth, pd.t().contiguous())
    rc, rs, rd = torch.ops.svdquant.quantize_act(x.cpu(), smooth.cpu(), pd.cpu(), "w4a8")
    codes, scales, down = codes.cpu(), scales.cpu(), down.cpu()
    finite = torch.isfinite(rd).all(1)
    err = ((down[finite] - rd[finite]).norm() / rd[finite].norm()).item()
    return {"M": M, "K": K, "codes_equal": torch.equal(codes, rc.reshape(M, K)),
            "code_mismatches": int((codes != rc.reshape(M, K)).sum()),
            "scales_equal": scales_equal(scales.flatten(), rs.flatten()),
            "down_rel_err": err, "down_nonfinite_rows_agree": torch.equal(~finite, ~torch.isfinite(down).all(1))}


def time_us(fn, reps: int = 20, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(out)


def main() -> int:
    import svdquant_ops.ops

    svdquant_ops.ops.load()  # the op library loads on first use of an op's Python entry point, not on import
    # --library-only: the library's two paths alone (no probe build, ~60 s less; tests/test_cuda_ops.py checks the
    # library's exactness)
    library_only = "--library-only" in sys.argv[1:]
    ext = None if library_only else build()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if library_only:
        return time_step(ext)
    print("\n## Exactness against the library's CPU op\n")
    print("| M | K | CTAs per cluster | codes bit-exact (mismatches) | scales bit-exact | down_act rel err | "
          "non-finite rows agree |\n|---|---|---|---|---|---|---|")
    ok = True
    for (M, K), specials in [((4608, 3072), False), ((4600, 3072), True), ((512, 12288), False),
                             ((4608, 15360), True), ((40, 6144), False)]:
        r = check(ext, M, K, seed=M + K, specials=specials)
        ok &= r["codes_equal"] and r["scales_equal"] and r["down_rel_err"] < 1e-5 and r["down_nonfinite_rows_agree"]
        print(f"| {M} | {K} | {ext.cluster_size(K)} | {r['codes_equal']} ({r['code_mismatches']}) | "
              f"{r['scales_equal']} | {r['down_rel_err']:.2e} | {r['down_nonfinite_rows_agree']} |")
    time_step(ext)
    print("exactness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def time_step(ext) -> int:
    """Times both library paths (and the probe's kernel, when built) on one FLUX step's shapes."""
    print("\n## Time per call (us, CUDA events) and per FLUX.1-dev step (ms)\n")
    print("The library's op on both of its Hopper paths (SVDQUANT_OPS_CUDA_W4A8_CLUSTER, read at every call), and "
          "this probe's kernel (proj_down transposed, IEEE divisions).\n")
    print("| M | K | calls per step | library, 2 passes | library, cluster | probe, cluster | library cluster / "
          "2 passes | library cluster GB/s (x read + codes written) |\n|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for (M, K), n in STEP:
        x, smooth, pd = inputs(M, K, 1)
        pd_t = pd.t().contiguous()
        os.environ.pop("SVDQUANT_OPS_CUDA_W4A8_CLUSTER", None)  # the two passes, whatever the caller exported
        two = time_us(lambda: torch.ops.svdquant.quantize_act(x, smooth, pd, "w4a8"))
        os.environ["SVDQUANT_OPS_CUDA_W4A8_CLUSTER"] = "1"
        lib = time_us(lambda: torch.ops.svdquant.quantize_act(x, smooth, pd, "w4a8"))
        del os.environ["SVDQUANT_OPS_CUDA_W4A8_CLUSTER"]
        new = time_us(lambda: ext.quantize_w4a8_cluster(x, smooth, pd_t)) if ext is not None else float("nan")
        for i, t in enumerate((two, lib, new)):
            totals[i] += n * t / 1e3
        print(f"| {M} | {K} | {n} | {two:.1f} | {lib:.1f} | {new:.1f} | {two / lib:.2f}x | "
              f"{3 * M * K / lib / 1e3:.0f} |")
    print(f"\nper step: library 2 passes {totals[0]:.2f} ms, library cluster {totals[1]:.2f} ms, "
          f"probe cluster {totals[2]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
