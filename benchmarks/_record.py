"""What every recorded benchmark result states about itself: date, GPU, commit, dirty tree, command.

Imported by the benchmark scripts as a sibling module (``python benchmarks/<script>.py`` puts this folder first on
``sys.path``). The commit comes from git when the working tree has its ``.git``; the device machine receives a copy
of the working tree without ``.git``, so there the caller passes what git said on its own machine:

    SVDQUANT_COMMIT=$(git rev-parse HEAD)                                    # full hash
    SVDQUANT_DIRTY=$(test -z "$(git status --porcelain)" && echo 0 || echo 1)

(``benchmarks/gpu_run.sh`` passes both through.) Without either, the record says "unknown" rather than guessing.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Environment variables that change what a benchmark measures; recorded when set.
_ENV_KNOBS = ("SVDQUANT_OPS_DIAGNOSTICS", "SVDQUANT_OPS_CUDA_PORTABLE", "SVDQUANT_OPS_GEMM_SCHEDULE",
              "SVDQUANT_OPS_GEMM_EPILOGUE", "SVDQUANT_OPS_QA_SPLITS", "SVDQUANT_OPS_QA_CFG", "SVDQUANT_OPS_NO_CUDA",
              "SVDQUANT_OPS_CUDA_ARCH", "SVDQUANT_OPS_W4A16_BLOCKS_PER_SM", "SVDQUANT_OPS_W4A16_GENERIC",
              "SVDQUANT_OPS_CUDA_W4A8_CLUSTER", "SVDQUANT_OPS_CUDA_W4A8_TILE", "SVDQUANT_OPS_CUDA_W4A8_GMAX",
              "SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT", "SVDQUANT_OPS_CUDA_W4A8_NEXT", "SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN",
              "SVDQUANT_OPS_CUDA_W4A8_EXPAND", "SVDQUANT_OPS_CUDA_W4A8_EPI", "SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS",
              "SVDQUANT_OPS_CUDA_W4A8_WEIGHTS", "SVDQUANT_OPS_CUDA_PREP_ROWS", "SVDQUANT_OPS_CUDA_PDL")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _parse_dirty(value: str) -> bool | str:
    v = value.strip().lower()
    if v in ("0", "false", "no", "clean"):
        return False
    if v in ("1", "true", "yes", "dirty"):
        return True
    return value.strip() or "unknown"


def source_state() -> dict:
    """commit (full hash or "unknown"), dirty (True / False / "unknown"; with git also dirty_count and up to 50
    dirty_paths from ``git status --porcelain``), and source: where they came from."""
    # The caller's word first: the device machine's copy of the tree can carry a stale .git (seen: it reported an
    # older commit than the tree it ran), so a commit passed in SVDQUANT_COMMIT wins over asking git.
    env_commit = os.environ.get("SVDQUANT_COMMIT", "").strip()
    env_dirty = os.environ.get("SVDQUANT_DIRTY")
    if env_commit:
        return dict(commit=env_commit, dirty=_parse_dirty(env_dirty) if env_dirty is not None else "unknown",
                    source="env SVDQUANT_COMMIT, SVDQUANT_DIRTY (passed by the caller)")
    head = _git("rev-parse", "HEAD")
    if head is not None and (root := _git("rev-parse", "--show-toplevel")) is not None \
            and Path(root.strip()).resolve() == ROOT:
        status = _git("status", "--porcelain")
        paths = [ln[3:] for ln in status.splitlines() if ln.strip()] if status is not None else []
        return dict(commit=head.strip(), dirty=bool(paths) if status is not None else "unknown",
                    dirty_count=len(paths), dirty_paths=paths[:50], source="git")
    return dict(commit="unknown", dirty="unknown", source="nowhere: no .git here and SVDQUANT_COMMIT unset")


def record(gpu: str | None = None) -> dict:
    """The provenance block of one result: call once at the start of the run (before writing any output)."""
    if gpu is None:
        try:
            import torch

            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
        except Exception:  # noqa: BLE001
            gpu = "unknown"
    argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
    try:
        argv[0] = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        pass
    rec = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), gpu=gpu,
               **source_state(), command="python " + shlex.join(argv), host=platform.node())
    if os.environ.get("SVDQUANT_RUN_COMMAND"):  # set by gpu_run.sh
        rec["run_command"] = os.environ["SVDQUANT_RUN_COMMAND"]
    knobs = {k: os.environ[k] for k in _ENV_KNOBS if os.environ.get(k)}
    if knobs:
        rec["env"] = knobs
    return rec


def header_md(rec: dict) -> list[str]:
    """The record as markdown bullet lines (placed right under a result file's title)."""
    dirty = rec["dirty"]
    dirty_s = {True: "yes", False: "no"}.get(dirty, str(dirty)) if isinstance(dirty, bool) else str(dirty)
    if dirty is True and rec.get("dirty_paths"):
        more = rec.get("dirty_count", len(rec["dirty_paths"])) - 8
        dirty_s += " (" + ", ".join(rec["dirty_paths"][:8]) + (f", and {more} more" if more > 0 else "") + ")"
    lines = [f"- date: {rec['date']}", f"- {'device' if str(rec['gpu']).startswith('cpu') else 'GPU'}: {rec['gpu']}",
             f"- commit: {rec['commit']} (from {rec['source']})", f"- tree dirty: {dirty_s}",
             f"- command: `{rec['command']}`" + (f" (via `{rec['run_command']}`)" if rec.get("run_command") else "")]
    if rec.get("env"):
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in rec["env"].items()))
    return lines
