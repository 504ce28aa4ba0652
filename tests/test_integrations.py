"""The ready-to-run scripts in integrations/, each run as a user would (a subprocess, the built-in tiny pipeline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "integrations"


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_flux_compile(tmp_path):
    out = _run("flux_compile.py", "--steps", "2", "--out", "img.png", cwd=tmp_path)
    assert "44 linears SVDQuant, 9 4-bit weight-only (9 AdaLN modulation), 9 kept in 16-bit" in out and "compiled" in out
    assert "fused q/k/v of 6 attention modules" in out  # the built-in pipeline's 2 double + 4 single blocks
    assert (tmp_path / "img.png").is_file()


def test_mix_torchao(tmp_path):
    out = _run("mix_torchao.py", "--steps", "2", cwd=tmp_path)
    snr = float(out.split("int8 T5: latents ")[1].split(" dB")[0])
    assert snr > 20
    assert "'ff.net.2': 'Int8Tensor'" in out and "'attn.to_q': 'SVDQuantTensor'" in out


@pytest.mark.parametrize("precision", ["int4", "w4a8"])
def test_load_saved(tmp_path, precision):
    out = _run("load_saved.py", "--steps", "2", "--precision", precision, "--dir", "q", cwd=tmp_path)
    assert "bit-identical: True" in out
    assert (tmp_path / "q" / "image.png").is_file() and (tmp_path / "q" / "model_index.json").is_file()
