"""Just-in-time build and load of the C++/CUDA op library (``svdquant_ops/csrc``).

The library is compiled on first use of an op (not on import) once per (source contents, torch version, the CUDA
version torch was built for, GPU architecture, build flags, Python version, and the libstdc++ linked where the
compiler has no shared one: ``_libstdcxx_ldflags``) with ``torch.utils.cpp_extension`` + ninja into a per-user
cache, under a file lock, then loaded with ``torch.ops.load_library``, which registers the ``torch.ops.svdquant``
ops. Later processes find the cached build and load it without compiling.

Environment (read when the library is built and loaded, never by the kernels at run time):
  SVDQUANT_OPS_CACHE          cache root (default: $XDG_CACHE_HOME/svdquant_ops or ~/.cache/svdquant_ops)
  SVDQUANT_OPS_NO_CUDA=1      build the CPU part only even where CUDA is available
  SVDQUANT_OPS_CUDA_ARCH      e.g. "9.0a" to override the architecture detected from the GPU
  SVDQUANT_OPS_DIAGNOSTICS=1  also compile the diagnostic kernels benchmarks use (a separate cached build;
                              csrc/cuda/README.md lists them); never needed to run a model
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_NAME = "svdquant_ops_C"


def _diagnostics() -> bool:
    return os.environ.get("SVDQUANT_OPS_DIAGNOSTICS") == "1"


def _defines() -> list[str]:
    return ["-DSVDQUANT_OPS_DIAGNOSTICS=1"] if _diagnostics() else []


def _cxx_flags() -> list[str]:
    return ["-O3", "-fopenmp", *_defines()]


_loaded_path: Path | None = None


def _libstdcxx_ldflags() -> list[str]:
    """Where the compiler can link libstdc++ only statically (a toolchain built without the shared library, as on
    some GPU images: ``/opt/gcc``), the library would carry its own copy of the C++ runtime beside torch's, and that
    copy's streams are not set up: the first number formatted into an error message in the library crashed the
    process (a segfault in ``ostream::_M_insert`` under ``check_gemm_cat``, 2026-12-06). Link the shared libstdc++
    this process already uses (torch's) instead: given before the compiler's own ``-lstdc++``, it settles every
    symbol it defines (a symbol only a newer libstdc++ has would still come from the compiler's static archive).
    Empty where the compiler finds a shared libstdc++ itself, cannot be run (cpp_extension then reports it), or no
    libstdc++ is loaded."""
    if not sys.platform.startswith("linux"):
        return []
    import shlex
    import subprocess

    from torch.utils.cpp_extension import get_cxx_compiler

    try:  # CXX may carry a launcher or flags ("ccache g++"), as ninja's command line allows
        probe = subprocess.run([*shlex.split(get_cxx_compiler()), "-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
    # GCC prints the full path of the library it would link, or the bare name when it has none.
    if probe.returncode != 0 or probe.stdout.strip() != "libstdc++.so":
        return []
    try:
        with open("/proc/self/maps") as maps:  # "address perms offset dev inode path"; the path may hold spaces
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "/libstdc++.so" in line}
    except OSError:
        paths = set()
    # One libstdc++ is mapped in practice (two would be the very mix this avoids); a replaced file shows as
    # "<path> (deleted)".
    return sorted(p for p in paths if os.path.isfile(p))[:1]


def _cache_root() -> Path:
    env = os.environ.get("SVDQUANT_OPS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "svdquant_ops"


def _cuda_arch() -> str | None:
    """The architecture to compile CUDA sources for, or None for a CPU-only build."""
    if os.environ.get("SVDQUANT_OPS_NO_CUDA") == "1" or torch.version.cuda is None:
        return None
    if not torch.cuda.is_available():
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        print("svdquant_ops: CUDA is available but no CUDA toolkit (nvcc) was found; building the CPU ops only",
              file=sys.stderr)
        return None
    env = os.environ.get("SVDQUANT_OPS_CUDA_ARCH")
    if env:
        return env
    major, minor = torch.cuda.get_device_capability()
    # sm_90a unlocks wgmma / setmaxnreg on Hopper; other GPUs get their plain architecture.
    return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def _sources(cuda_arch: str | None) -> list[Path]:
    srcs = sorted(_CSRC.glob("*.cpp")) + sorted(_CSRC.glob("cpu/*.cpp"))
    if cuda_arch is not None:
        srcs += sorted(_CSRC.glob("cuda/*.cu")) + sorted(_CSRC.glob("cuda/*.cpp"))
    return srcs


def _build_key(sources: list[Path], cuda_arch: str | None, target: dict | None = None) -> str:
    """The cache entry's key. target: another machine's torch version, CUDA version, libstdc++ link flags and Python
    (major, minor) as {"torch", "cuda", "ld", "py"} (benchmarks/prebuild.py builds the GPU machine's entry on a
    machine without a GPU); None: this process's."""
    t = target or {"torch": torch.__version__, "cuda": torch.version.cuda, "ld": _libstdcxx_ldflags(),
                   "py": tuple(sys.version_info[:2])}
    h = hashlib.sha256()
    headers = sorted(_CSRC.rglob("*.h")) + sorted(_CSRC.rglob("*.cuh"))
    for path in sources + headers:
        h.update(str(path.relative_to(_CSRC)).encode())
        h.update(path.read_bytes())
    nvcc = _nvcc_flags(cuda_arch) if cuda_arch else []
    h.update(f"torch={t['torch']};cuda={t['cuda']};arch={cuda_arch};flags={_cxx_flags()};nvcc={nvcc}".encode())
    if t["ld"]:  # only where it applies, so that other machines' cached builds stay valid
        h.update(f"ld={list(t['ld'])}".encode())
    h.update(f"py={tuple(t['py'])}".encode())
    return h.hexdigest()[:16]


def _entry_name(sources: list[Path], cuda_arch: str | None, target: dict | None = None) -> str:
    """The cache entry's directory name: the diagnostics build apart, then the key (target: see _build_key)."""
    tag = "-diagnostics" if _diagnostics() else ""
    return f"{_NAME}{tag}-{_build_key(sources, cuda_arch, target)}"


def _nvcc_flags(cuda_arch: str) -> list[str]:
    num = cuda_arch.replace(".", "")
    return ["-O3", f"-gencode=arch=compute_{num},code=sm_{num}", "--expt-relaxed-constexpr",
            "-lineinfo", "-Xptxas=-warn-spills", *_defines()]


def library_path() -> Path | None:
    """Path of the loaded op library, or None before ``load()``."""
    return _loaded_path


def load(verbose: bool = False) -> Path:
    """Build (if needed) and load the op library; returns the path of the shared object."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    cuda_arch = _cuda_arch()
    sources = _sources(cuda_arch)
    build_dir = _cache_root() / _entry_name(sources, cuda_arch)
    so = build_dir / f"{_NAME}.so"
    if not so.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first imports (pytest-xdist) build once
            if not so.exists():
                _compile(sources, build_dir, cuda_arch, verbose)
    torch.ops.load_library(str(so))
    _loaded_path = so
    return so


def _compile(sources: list[Path], build_dir: Path, cuda_arch: str | None, verbose: bool) -> None:
    from torch.utils import cpp_extension

    what = f"CPU + CUDA sm_{cuda_arch.replace('.', '')}" if cuda_arch else "CPU"
    print(f"svdquant_ops: compiling the {what} op library once into {build_dir} (about a minute)...",
          file=sys.stderr, flush=True)
    kwargs = {}
    saved_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda_arch is not None:
        kwargs["extra_cuda_cflags"] = _nvcc_flags(cuda_arch)
        # cpp_extension adds its own -gencode flags from this variable (torch 2.11 builds with these, not with the
        # -gencode in extra_cuda_cflags); keep the "a" so that Hopper code is sm_90a (wgmma, setmaxnreg).
        # Set only for this build and restored afterwards: the user's environment is not ours to change.
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch
    try:
        cpp_extension.load(
            name=_NAME,
            sources=[str(s) for s in sources],
            extra_cflags=_cxx_flags(),
            extra_ldflags=["-fopenmp", *_libstdcxx_ldflags()],
            extra_include_paths=[str(_CSRC)],
            build_directory=str(build_dir),
            with_cuda=cuda_arch is not None,
            is_python_module=False,
            verbose=verbose,
            **kwargs,
        )
    except Exception as exc:  # keep the compiler log reachable, say where it is
        raise RuntimeError(
            f"svdquant_ops: building the op library failed. Build directory: {build_dir}. Rerun with "
            f"svdquant_ops.ops.load(verbose=True) for the full compiler output. End of the log:\n"
            f"{str(exc)[-3000:]}"
        ) from exc
    finally:
        if saved_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch_list
