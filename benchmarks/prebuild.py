"""Build the GPU machine's op library on this machine (no GPU needed) and pack it as the build cache a device call
unpacks (benchmarks/gpu_run.sh: .gpucache/svdq_cache.tgz), so that a call after a CUDA source change does not spend
its first ~70-100 s compiling.

The library's cache entry is keyed by the sources, torch's version and CUDA version, the architecture, the flags, the
libstdc++ link flags and Python's version (svdquant_ops/ops/build.py). This script computes the GPU machine's key
(defaults: what its builds recorded, see --ld) and compiles the same sources with the same flags against the same
torch build, which must be the interpreter's: run it with a Python whose torch is the device's (2.11.0+cu130, the
PyPI wheel with its CUDA 13 packages), with nvcc 13 on PATH. The library does not include Python's headers, so the
interpreter's minor version need not match the device's; --py names the device's for the key.

It links this machine's shared libstdc++ (gcc 12 here: GLIBCXX up to 3.4.30), where the device's build links its
newer one explicitly (/opt/gcc has no shared libstdc++); the device's libstdc++ (6.0.33) has every symbol the older one
does, so the library loads there; --ld only names the device's entry. The nvcc version is not part of the key (nor of
the device's): use nvcc 13.0, the device's, so the kernels are the same.

Check after a build: the device loads the entry without compiling ("build_s" of a few seconds in gpu_run.log), and
`cuobjdump -sass` of the two libraries agree where a device-built one exists.

Usage (the venv once: python3 -m venv /tmp/v211 && /tmp/v211/bin/pip install torch==2.11.0 ninja numpy safetensors
tqdm, then /tmp/v211/bin/pip install --no-deps .whl/torchao-*.whl (the package imports torchao before it loads the
library); torch must report 2.11.0+cu130; ~3 GB with its CUDA packages):
  CUDA_HOME=/usr/local/cuda PATH=/tmp/v211/bin:$PATH /tmp/v211/bin/python benchmarks/prebuild.py [--diagnostics]
(--diagnostics after the normal build: the benchmarks' diagnostics build joins it in the same tarball.)
Do not edit svdquant_ops/csrc while it runs: the key is computed from the sources before they are compiled.
"""

from __future__ import annotations

import argparse
import io
import os
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


def check_loads(so: Path) -> None:
    """Load the library into this torch (the device's build: the same symbols) and run one op on the CPU: a library
    that links or registers wrongly fails here, not in a device call."""
    torch.ops.load_library(str(so))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    smooth = (torch.rand(128, generator=g) + 0.5).to(torch.bfloat16)
    pd = torch.randn(128, 16, generator=g).to(torch.bfloat16)
    codes, scales, down = torch.ops.svdquant.quantize_act(x, smooth, pd, "w4a8", False)
    if codes.shape != (3, 128) or scales.shape != (3, 1) or down.shape != (3, 16) or not torch.isfinite(down).all():
        sys.exit(f"prebuild: {so} loads but its quantize_act gave {codes.shape} / {scales.shape} / {down.shape}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".gpucache" / "svdq_cache.tgz"), help="the tarball to write")
    ap.add_argument("--arch", default="9.0a", help="CUDA architecture (default 9.0a: Hopper with wgmma)")
    ap.add_argument("--py", default="3.12", help="the device's Python major.minor, for the key")
    ap.add_argument("--ld", default=DEVICE_LD, help="the device build's libstdc++ link flag ('' for none)")
    ap.add_argument("--diagnostics", action="store_true", help="the diagnostics build (SVDQUANT_OPS_DIAGNOSTICS=1: "
                    "the benchmarks' switches; its own cache entry), added to --out beside the entries already there")
    ap.add_argument("--verbose", action="store_true", help="the compiler's full output")
    args = ap.parse_args()
    if torch.version.cuda is None:
        sys.exit(f"prebuild: this torch ({torch.__version__}) is a CPU build; run with the device's CUDA torch "
                 "(e.g. a venv with torch==2.11.0 from PyPI)")
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        sys.exit("prebuild: no CUDA toolkit (nvcc) found; put nvcc on PATH or set CUDA_HOME")
    if args.diagnostics:  # read by build._defines (flags and key) and, as in build.load, the entry's name
        os.environ["SVDQUANT_OPS_DIAGNOSTICS"] = "1"
    major, minor = (int(v) for v in args.py.split("."))
    target = {"torch": torch.__version__, "cuda": torch.version.cuda, "ld": [args.ld] if args.ld else [],
              "py": (major, minor)}
    sources = build._sources(args.arch)
    name = build._entry_name(sources, args.arch, target)
    with tempfile.TemporaryDirectory() as tmp:
        build_dir = Path(tmp) / name
        build_dir.mkdir()
        t0 = time.time()
        build._compile(sources, build_dir, args.arch, args.verbose)
        so = build_dir / f"{build._NAME}.so"
        if not so.exists():
            sys.exit(f"prebuild: the build left no {so.name}")
        check_loads(so)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # the library alone: a cache entry that has it is loaded as is. The diagnostics build joins the normal one
        # (gpu_run.sh unpacks every entry; each process loads the one its key names); a normal build replaces all.
        keep = []
        if args.diagnostics and out.exists():
            with tarfile.open(out) as old:
                keep = [(m, old.extractfile(m).read()) for m in old.getmembers()
                        if m.isfile() and "-diagnostics-" not in m.name]
        with tarfile.open(out, "w:gz") as tar:
            for member, data in keep:
                tar.addfile(member, io.BytesIO(data))
            tar.add(so, arcname=f"{name}/{so.name}")
    print(f"prebuild: {name} for torch {target['torch']} (CUDA {target['cuda']}), sm_{args.arch.replace('.', '')}, "
          f"Python {args.py}, built in {time.time() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
