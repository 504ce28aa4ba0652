#!/usr/bin/env python3
"""One FLUX.1-dev transformer step (1024x1024, batch 1 by default) under bf16 eager / compiled / CUDA graphs, torchao
fp8 row-wise compiled and SVDQuant w4a8 / int4 compiled, in one run; the same benchmark as ``svdquant bench``, whose
code (``svdquant_ops/integrations/bench.py``) this wraps.

    python benchmarks/bench_flux.py [--configs a,b,...] [--size 512|1024|2048] [--batch 1] [--iters 10]
                                    [--warmup 3] [--profile] [--timeout 300] [--budget S] [--tag T] [--out DIR]

Needs the package importable (``pip install -e .``, or the repository on PYTHONPATH as ``benchmarks/gpu_run.sh``
sets it). Each configuration runs in its own process (``--timeout`` seconds at most); the table (ms per step, ratio
to bf16 compiled of the same run, weights, peak memory, compile time, graph count, and with ``--profile`` device time
by kernel category) is written after every configuration to ``<date>-<gpu>-flux-<size>px-b<batch>[-<tag>].md`` and
``.json`` in --out (default: $OUT, else benchmarks/results), each starting with the run's record (date, GPU, commit,
dirty tree, command: benchmarks/_record.py). ``--model tiny --device cpu --configs bf16-eager,w4a8-eager,int4-eager``
runs on a CPU. Why the fp8 baseline hung once and what the script does about it: benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from svdquant_ops.integrations import bench

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--one" not in argv and not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")]
    sys.exit(bench.main(argv, prog="bench_flux.py"))
