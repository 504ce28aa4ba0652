"""Build the GPU machine's op library on this machine (no GPU needed) and pack it as the build cache a device call
unpacks (benchmarks/gpu_run.sh: .gpucache/svdq_cache.tgz), so that a call after a CUDA source change does not spend
its first ~70-100 s compiling.

The library's cache entry is keyed by the sources, torch's version and CUDA version, the architecture, the flags, the
libstdc++ link flags and Python's version (svdquant_ops/ops/build.py). This script computes the GPU machine's key
(defaults: what its builds recorded, see --ld) and compiles the same sources with the same flags against the same
torch build, which must be the interpreter's: run it with a Python whose torch is the device's (2.11.0+cu130, the
PyPI wheel with its CUDA 13 packages), with nvcc 13 on PATH. The library does not include Python's headers, so the
interpreter's minor version need not match the device's; --py names the device's for the key.

Check after a build: the device loads the entry without compiling ("build_s" of a few seconds in gpu_run.log), and
`cuobjdump -sass` of the two libraries agree where a device-built one exists.

Usage (the venv once: python3 -m venv /tmp/v211 && /tmp/v211/bin/pip install torch==2.11.0 ninja, which must report
torch 2.11.0+cu130; ~3 GB with its CUDA packages):
  CUDA_HOME=/usr/local/cuda PATH=/tmp/v211/bin:$PATH /tmp/v211/bin/python benchmarks/prebuild.py
Do not edit svdquant_ops/csrc while it runs: the key is computed from the sources before they are compiled.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from svdquant_ops.ops import build  # noqa: E402

# What the GPU machine's builds recorded (the build.ninja of its cache entries, 2026-12-07): /opt/gcc has no shared
# libstdc++, so the build links this one (build._libstdcxx_ldflags), and the key includes it.
DEVICE_LD = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".gpucache" / "svdq_cache.tgz"), help="the tarball to write")
    ap.add_argument("--arch", default="9.0a", help="CUDA architecture (default 9.0a: Hopper with wgmma)")
    ap.add_argument("--py", default="3.12", help="the device's Python major.minor, for the key")
    ap.add_argument("--ld", default=DEVICE_LD, help="the device build's libstdc++ link flag ('' for none)")
    ap.add_argument("--verbose", action="store_true", help="the compiler's full output")
    args = ap.parse_args()
    if torch.version.cuda is None:
        sys.exit(f"prebuild: this torch ({torch.__version__}) is a CPU build; run with the device's CUDA torch "
                 "(e.g. a venv with torch==2.11.0 from PyPI)")
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        sys.exit("prebuild: no CUDA toolkit (nvcc) found; put nvcc on PATH or set CUDA_HOME")
    major, minor = (int(v) for v in args.py.split("."))
    target = {"torch": torch.__version__, "cuda": torch.version.cuda, "ld": [args.ld] if args.ld else [],
              "py": (major, minor)}
    sources = build._sources(args.arch)
    name = f"{build._NAME}-{build._build_key(sources, args.arch, target)}"
    with tempfile.TemporaryDirectory() as tmp:
        build_dir = Path(tmp) / name
        build_dir.mkdir()
        t0 = time.time()
        build._compile(sources, build_dir, args.arch, args.verbose)
        so = build_dir / f"{build._NAME}.so"
        if not so.exists():
            sys.exit(f"prebuild: the build left no {so.name}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:gz") as tar:  # the library alone: a cache entry that has it is loaded as is
            tar.add(so, arcname=f"{name}/{so.name}")
    print(f"prebuild: {name} for torch {target['torch']} (CUDA {target['cuda']}), sm_{args.arch.replace('.', '')}, "
          f"Python {args.py}, built in {time.time() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
