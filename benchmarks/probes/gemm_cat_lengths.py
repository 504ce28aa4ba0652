"""svdquant::gemm_cat called directly with lists of unequal length, on CPU tensors: it raised the length error under
torch 2.11 / 2.13 CPU builds and crashed (segfault) under torch 2.11+cu130 on the GPU machine. Each case runs in its
own process (a crash hides nothing else): `python benchmarks/probes/gemm_cat_lengths.py` (the op library built,
SVDQUANT_OPS_CACHE set as for gpu_run.sh). With LD_PRELOAD=/tmp/segv_backtrace.so (benchmarks/probes/segv_backtrace.c)
a crashing case prints its native stack. Reproduced nowhere but the GPU machine: not with torch 2.11.0+cu130 or
2.14.1+cu130 and the CUDA build of the library on a machine without a GPU (2026-12-06). The stack showed why: the
GPU image's compiler has no shared libstdc++, so the library carried its own static copy of the C++ runtime, whose
streams crashed at the first number formatted into the error message. Since 4b7695c the build links torch's
libstdc++ there, and all four cases raise (benchmarks/results/2026-12-06-h100-pdl-512-libstdcxx-summary.md)."""
import subprocess
import sys

import torch

CASES = ("valid", "short bias", "short global_scale", "short proj_up", "short scales", "empty", "cpu-only op table")

if len(sys.argv) == 1:
    for case in CASES:
        r = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("  ok", "  raised", "   ", "Fatal"))]
        print(f"{case}: exit {r.returncode}; " + " | ".join(lines[:2]), flush=True)
        if r.returncode < 0:  # killed by a signal: the native stack, where LD_PRELOAD=segv_backtrace.so printed one
            stack = r.stderr.split("*** native stack")[-1].splitlines()[1:40] if "*** native stack" in r.stderr else []
            print("\n".join("    " + ln for ln in stack), flush=True)
    sys.exit(0)

sys.path.insert(0, ".")
from svdquant_ops import ops  # noqa: E402
from tests.builders import gemm_inputs, generator, weight_inputs  # noqa: E402

ops.load()
gen = generator(("segv",))
a = gemm_inputs((3,), 24, 128, 16, "w4a8", torch.bfloat16, gen, bias=True)
b = weight_inputs(40, 128, 16, "w4a8", torch.bfloat16, gen, bias=True)
lists = {k: [a[k], b[k]] for k in ("codes", "scales", "global_scale", "proj_up", "bias")}
case = sys.argv[1]
if case.startswith("short "):
    lists[case[6:]] = lists[case[6:]][:1]
if case == "empty":
    lists = {k: [] for k in lists}
if case == "cpu-only op table":
    print("  ", torch._C._dispatch_dump("svdquant::gemm_cat").replace("\n", " / ")[:600], flush=True)
    sys.exit(0)
try:
    out = torch.ops.svdquant.gemm_cat(a["act_codes"], a["act_scales"], lists["codes"], lists["scales"],
                                      lists["global_scale"], a["down_act"], lists["proj_up"], lists["bias"], "w4a8",
                                      torch.bfloat16)
    print("  ok", tuple(out.shape), flush=True)
except RuntimeError as e:
    print("  raised:", str(e).splitlines()[0], flush=True)
