"""The ``svdquant`` command, run as a user runs it: the built-in default end to end (subprocess), the directory it
writes loaded back, ``generate``, and the error paths (one line, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdquant_ops import SVDQuantTensor
from svdquant_ops.integrations import cli
from svdquant_ops.integrations.pipelines import BUILTIN_CALL, denoiser_of, tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _svdquant(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "svdquant_ops.integrations.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """`svdquant quantize` with no model: the README's first command (minus the install)."""
    work = tmp_path_factory.mktemp("cli")
    r = _svdquant("quantize", "--precision", "w4a8", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "svdquant-tiny-flux-w4a8", r.stdout


def test_default_run_reports_what_it_did(quantized_dir):
    out, stdout = quantized_dir
    assert "linears quantized (SVDQuant): 44" in stdout
    assert "linears with 4-bit weights only: 9 (AdaLN modulation)" in stdout
    assert "linears kept in 16-bit: 9 (8 embedder, 1 final projection)" in stdout
    report = json.loads((out / "svdquant_report.json").read_text())
    assert report["model"] == cli.BUILTIN and report["precision"] == "w4a8"
    assert len(report["quantized"]) == 44 and len(report["weight_only"]) == 9
    assert report["bytes_after"] < 0.5 * report["bytes_before"]
    assert report["sqnr_db"] > 25, report["sqnr_db"]  # w4a8 on random weights: ~40 dB seen
    assert f"{report['sqnr_db']:.1f} dB" in stdout


def test_written_directory_loads_back_bit_exact(quantized_dir, tmp_path):
    """What `quantize` writes (pipe.save_pretrained after quantize_pipeline) loads back with DiffusionPipeline's own
    from_pretrained: the same 4-bit layers, and the same denoiser outputs bit for bit."""
    from diffusers import DiffusionPipeline

    from svdquant_ops import SVDQuantConfig
    from svdquant_ops.integrations.pipelines import Recorder, builtin_prompts, quantize_pipeline, run_prompts

    out, _ = quantized_dir
    loaded = DiffusionPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    quantized = {n for n, m in denoiser_of(loaded)[1].named_modules()
                 if isinstance(getattr(m, "weight", None), SVDQuantTensor)}
    assert quantized == set(json.loads((out / "svdquant_report.json").read_text())["quantized"])

    pipe = tiny_flux_pipeline()
    quantize_pipeline(pipe, SVDQuantConfig(precision="int4", rank=16, smooth_grid=2, lowrank_iters=2),
                      builtin_prompts()[:3], steps=1, eval_prompts=1, max_rows=256, **BUILTIN_CALL)
    pipe.save_pretrained(tmp_path / "q")
    again = DiffusionPipeline.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    recorder = Recorder()
    handle = pipe.transformer.register_forward_hook(recorder, with_kwargs=True)
    with torch.inference_mode():
        run_prompts(pipe, ["a red fox"], steps=2, **BUILTIN_CALL)
    handle.remove()
    with torch.inference_mode():
        for args, kwargs, ref in recorder.calls:
            assert torch.equal(again.transformer(*args, **kwargs)[0], ref)


def test_loading_without_the_import_names_the_import(quantized_dir):
    """The written model_index.json names svdquant_ops as the denoiser's library: in a fresh process without
    `import svdquant_ops`, diffusers refuses with a message that says to import it; with the import it loads."""
    out, _ = quantized_dir
    code = ("import sys, torch\nfrom diffusers import DiffusionPipeline\n"
            "if sys.argv[2] == '1':\n    import svdquant_ops\n"
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)\n"
            "print(type(p.transformer.transformer_blocks[0].norm1.linear.weight).__name__)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare = subprocess.run([sys.executable, "-c", code, str(out), "0"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert bare.returncode != 0 and "import svdquant_ops before calling `from_pretrained`" in bare.stderr
    imported = subprocess.run([sys.executable, "-c", code, str(out), "1"], capture_output=True, text=True, env=env,
                              timeout=600)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().endswith("W4A16Tensor")


def test_generate_writes_an_image(quantized_dir, tmp_path):
    from PIL import Image

    out, _ = quantized_dir
    r = _svdquant("generate", str(out), "--prompt", "a red fox in the snow", "--out", str(tmp_path / "fox.png"),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    image = Image.open(tmp_path / "fox.png")
    assert image.size == (BUILTIN_CALL["width"], BUILTIN_CALL["height"])


def test_generate_with_fused_qkv_gives_the_same_image(quantized_dir, tmp_path):
    from PIL import Image

    out, _ = quantized_dir
    images = []
    for extra in (["--no-fuse-qkv"], []):  # fused by default
        path = tmp_path / f"fox{len(extra)}.png"
        r = _svdquant("generate", str(out), "--prompt", "a red fox", "--steps", "2", "--out", str(path), *extra,
                      cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("svdquant: fused q/k/v of" in r.stdout) == (not extra), r.stdout
        images.append(Image.open(path).tobytes())
    assert images[0] == images[1]


def test_generate_compiled_matches_eager(quantized_dir, tmp_path):
    """--compile applies the compile recipe (prepare_compile: weights unwrapped, gemm_cat pass) and torch.compile;
    the image stays the eager one up to the compiled kernels' rounding (seen: at most 6 / 255 per channel, ~1 on
    average, against a pixel standard deviation of ~39)."""
    import numpy as np
    from PIL import Image

    out, _ = quantized_dir
    images = []
    for extra in ([], ["--compile"]):
        path = tmp_path / f"fox{len(extra)}.png"
        r = _svdquant("generate", str(out), "--prompt", "a red fox", "--steps", "2", "--out", str(path), *extra,
                      cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        images.append(np.asarray(Image.open(path)).astype(np.int32))
    diff = np.abs(images[0] - images[1])
    assert images[0].std() > 10 and diff.max() <= 24 and diff.mean() < 3, (diff.max(), diff.mean())


def _fails(capsys, argv, message):
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("svdquant")]  # not other libraries' logs
    assert len(err) == 1 and err[0].startswith("svdquant: error: ") and message in err[0], err


def test_error_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(capsys, ["quantize", str(tmp_path / "missing")], "no such directory, and not a hub id")
    _fails(capsys, ["quantize", str(tmp_path)], "not a diffusers pipeline directory (no model_index.json)")
    _fails(capsys, ["quantize", "nobody/no-such-model", "--out", str(tmp_path / "o")],
           "cannot load the pipeline from the hub")
    _fails(capsys, ["quantize", "--prompts", str(tmp_path / "none.txt")], "prompts file")
    _fails(capsys, ["quantize", "--num-prompts", "1"], "--num-prompts must be at least 2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fails(capsys, ["quantize", "--out", str(tmp_path / "full")], "directory exists and is not empty")
    # an --out that cannot be created fails before the pipeline is loaded (not after minutes of calibration)
    _fails(capsys, ["quantize", "--out", str(tmp_path / "full" / "x" / "sub")], f"{tmp_path / 'full' / 'x'} is a file")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        _fails(capsys, ["quantize", "--out", str(tmp_path / "ro" / "o")], "cannot write there")
    _fails(capsys, ["quantize", "--out", "/proc/svdquant-out"], "cannot write there")
    # a run that fails after --out was created leaves nothing behind
    _fails(capsys, ["quantize", "nobody/no-such-model", "--out", str(tmp_path / "new" / "o")],
           "cannot load the pipeline from the hub")
    assert not (tmp_path / "new").exists()
    _fails(capsys, ["generate", str(tmp_path), "--prompt", "x"], "not a diffusers pipeline directory")
    _fails(capsys, ["generate", str(tmp_path / "missing.safetensors"), "--base", "builtin:tiny-flux", "--prompt", "x"],
           "missing.safetensors: no such file or directory")
    plain = tmp_path / "plain"
    tiny_flux_pipeline().save_pretrained(plain)
    capsys.readouterr()  # the save's progress bars
    _fails(capsys, ["generate", str(plain), "--prompt", "x"], "its denoiser is not quantized by svdquant_ops")
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--precision", "int8"])
    assert exc.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    for argv, message in ((["quantize", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
                          (["generate", str(plain), "--prompt", "x", "--steps", "0"], "argument --steps: must be at"),
                          (["generate", str(plain), "--prompt", "x", "--height", "8"], "argument --height: must be"),
                          (["quantize", "--rank", "x"], "argument --rank: expected an integer, got 'x'")):
        with pytest.raises(SystemExit) as exc:  # before the scheduler divides by it
            cli.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    _fails(capsys, ["quantize", "--out", str(tmp_path / "file.txt")], "exists and is not a directory")
    _fails(capsys, ["bench", "--model", "tiny", "--configs", "bf16-eager", "--out", str(tmp_path / "file.txt")],
           "--out " + str(tmp_path / "file.txt") + ": exists and is not a directory")
    # the image's --out is checked before the pipeline loads (a bad name must not cost a whole generation)
    _fails(capsys, ["generate", str(plain), "--prompt", "x", "--out", str(tmp_path / "nope" / "x.png")],
           "folder " + str(tmp_path / "nope") + " does not exist")
    _fails(capsys, ["generate", str(plain), "--prompt", "x", "--out", str(tmp_path / "x.jpgx")],
           "unknown image file extension '.jpgx'")
    _fails(capsys, ["generate", str(plain), "--prompt", "x", "--out", str(tmp_path)], "is a directory")
    if not torch.cuda.is_available():
        _fails(capsys, ["quantize", "--device", "cuda"], "no CUDA GPU is available")


def _copy_of(quantized_dir, dest: Path) -> tuple[Path, Path]:
    """A copy of the quantized directory at ``dest`` and its transformer's weights file, to damage."""
    import shutil

    shutil.copytree(quantized_dir[0], dest)
    return dest, dest / "transformer" / "diffusion_pytorch_model.safetensors"


def test_generate_with_a_corrupt_weights_file_is_one_line(quantized_dir, tmp_path, capsys, monkeypatch):
    """A truncated safetensors file in a quantized directory: one line naming the directory, exit code 2."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad, weights = _copy_of(quantized_dir, tmp_path / "bad")
    weights.write_bytes(weights.read_bytes()[:4096])
    _fails(capsys, ["generate", str(bad), "--prompt", "x", "--out", str(tmp_path / "x.png")],
           f"{bad}: cannot load the pipeline from the local directory")
    assert not (tmp_path / "x.png").exists()


def test_generate_with_nan_weights_names_the_directory(quantized_dir, tmp_path, capsys, monkeypatch):
    """A quantized weight's values are checked on load: NaN in one λ is one line naming the directory and the part."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad, weights = _copy_of(quantized_dir, tmp_path / "nan")
    with safe_open(weights, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if "smooth" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata=meta)
    _fails(capsys, ["generate", str(bad), "--prompt", "x", "--out", str(tmp_path / "x.png")],
           f"{bad}: SVDQuantTensor: smooth contains NaN or Inf")


def test_console_script_is_declared():
    assert 'svdquant = "svdquant_ops.integrations.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_text_encoder_weight_only_int8_composes_on_cpu():
    """One call puts torchao's weight-only int8 on the T5 text encoder while the transformer uses SVDQuant."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from svdquant_ops import quantize_model
    from svdquant_ops.integrations.pipelines import run_prompts

    pipe = tiny_flux_pipeline()
    quantize_model(pipe.transformer, precision="w4a8", rank=8, smooth_grid=2, lowrank_iters=2)
    quantize_(pipe.text_encoder_2, Int8WeightOnlyConfig())
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    with torch.inference_mode():
        run_prompts(pipe, ["a red fox"], steps=2, **BUILTIN_CALL)


def test_builtin_pipeline_is_built_for_inference():
    """Its components are constructed, not loaded, so they start in training mode: T5's dropout made calibration and
    the reported SQNR change from run to run. Two encodings of one prompt must be identical."""
    pipe = tiny_flux_pipeline()
    assert not any(m.training for c in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.transformer)
                   for m in c.modules())
    with torch.inference_mode():
        a = pipe.encode_prompt("a red fox in the snow", prompt_2=None, max_sequence_length=64)[0]
        b = pipe.encode_prompt("a red fox in the snow", prompt_2=None, max_sequence_length=64)[0]
    assert torch.equal(a, b)
