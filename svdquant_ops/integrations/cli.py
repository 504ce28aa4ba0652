"""The ``svdquant`` command.

    svdquant quantize [MODEL] [--out DIR] [--precision int4|nvfp4|w4a8] [--rank 32] [--prompts FILE]
                      [--num-prompts N] [--steps N] [--device cuda] [--gptq]
    svdquant generate DIR --prompt TEXT [--out image.png] [--steps N] [--seed N] [--compile] [--device cuda]
    svdquant generate NUNCHAKU.safetensors --base MODEL --prompt TEXT [--precision w4a8] [...]

Without MODEL, ``quantize`` uses the built-in default (a small FLUX.1-architecture pipeline with seeded weights, no
download). MODEL is a hub id or a local diffusers pipeline directory. Bad input ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..formats import PRECISIONS

log = logging.getLogger("svdquant_ops")
BUILTIN = "builtin:tiny-flux"


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _at_least(low: int):
    """An argparse type: an int >= low (argparse names the flag and exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _check_image_out(out: str) -> None:
    """Before any work: the image file can be written (its folder exists, PIL knows its extension)."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a directory (expected an image file name such as image.png)")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: folder {path.parent} does not exist")
    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {out}: unknown image file extension {path.suffix or '(none)'!r} (e.g. .png, .jpg, "
                         ".webp)")


def _device(name: str | None) -> str:
    from .bench import resolve_device

    return resolve_device(name)


def _load_pipeline(model: str, dtype):
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{model}: not a diffusers pipeline directory (no model_index.json)")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"{model}: no such directory, and not a hub id of the form 'owner/name'")
    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except OSError as exc:  # huggingface_hub raises OSError subclasses for missing files and no connection
        where = "the local directory" if path.exists() else "the hub (no network here, or no such model?)"
        detail = str(exc).splitlines()[0].split(". ")[0][:200]
        raise UsageError(f"{model}: cannot load the pipeline from {where}: {detail}") from None
    except ValueError as exc:  # a weight's values checked on load (NaN, out-of-format scales): name the directory
        detail = str(exc).splitlines()[0].removeprefix("Failed to create instance of _from_saved_fields: ")
        raise UsageError(f"{model}: {detail[:300]}") from None


def _call_args(builtin: bool, args) -> dict:
    """Extra pipeline-call arguments: the built-in pipeline's size, then --height / --width."""
    from .pipelines import BUILTIN_CALL

    call = dict(BUILTIN_CALL) if builtin else {}
    call.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v})
    return call


def cmd_quantize(args) -> int:
    from .pipelines import builtin_prompts, read_prompts

    start = time.perf_counter()
    device = _device(args.device)
    builtin = args.model is None
    held_out = 1 if builtin else 2  # prompts kept out of calibration for the fidelity report
    if args.num_prompts is not None and args.num_prompts < held_out + 1:
        raise UsageError(f"--num-prompts must be at least {held_out + 1} ({held_out} held out for the report), got "
                         f"{args.num_prompts}")
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]
    elif builtin:
        prompts = prompts[:17]  # the built-in default runs in about a minute on 2 CPU cores
    name = BUILTIN if builtin else args.model
    out = Path(args.out or f"svdquant-{Path(name.split(':')[-1]).name}-{args.precision}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: directory exists and is not empty")
    created = _create_out_dir(out)
    try:
        return _quantize_into(args, out, name, builtin, held_out, prompts, device, start)
    except BaseException:
        _remove_empty(created)  # a failed or interrupted run leaves no empty directory of its own behind
        raise


def _remove_empty(dirs: list[Path]) -> None:
    """Remove those of ``dirs`` (deepest first) that exist and are empty: the ones this command created."""
    for d in dirs:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _create_out_dir(out: Path) -> list[Path]:
    """Before any work: create the output directory (the directories this call created, deepest first), so that
    a path that cannot be written fails now, not after calibration and quantization."""
    missing = []
    p = out
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out}: {p} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".svdquant-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_empty(missing)
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return missing


def _quantize_into(args, out: Path, name: str, builtin: bool, held_out: int, prompts, device, start) -> int:
    import torch

    from ..quantize.config import SVDQuantConfig
    from .pipelines import quantize_pipeline, save_pipeline, tiny_flux_pipeline

    pipe = tiny_flux_pipeline() if builtin else _load_pipeline(args.model, torch.bfloat16)
    print(f"svdquant: quantizing {name} ({args.precision}, rank {args.rank}) on {device}", flush=True)
    pipe = pipe.to(device)
    call = _call_args(builtin, args)
    config = SVDQuantConfig(precision=args.precision, rank=args.rank, gptq=args.gptq, device=device,
                            weight_only=None if args.weight_only == "none" else args.weight_only)
    # The built-in model keeps 1024 rows per input (its inputs are 256 + 64 tokens per step): the solve stays short.
    report = quantize_pipeline(pipe, config, prompts, steps=args.steps, eval_prompts=held_out,
                               max_rows=1024 if builtin else 4096, **call)
    if not report.summary.quantized:
        raise UsageError(f"{name}: nothing to quantize (no linear layer of a supported size in the denoiser)")
    t0 = time.perf_counter()
    save_pipeline(pipe, out)
    report.seconds["save"] = time.perf_counter() - t0
    report.seconds["total"] = time.perf_counter() - start
    (out / "svdquant_report.json").write_text(json.dumps({"model": name, "precision": args.precision,
                                                          "rank": args.rank, **report.to_dict()}, indent=1))
    print("\n".join(["", *report.lines(), f"written to {out}/ (load with DiffusionPipeline.from_pretrained(DIR, "
                     "torch_dtype=torch.bfloat16) after `import svdquant_ops`, or `svdquant generate`)"]))
    return 0


def cmd_generate(args) -> int:
    import torch

    from .pipelines import denoiser_of, is_quantized

    path = Path(args.dir)
    _check_image_out(args.out)
    if not path.exists():
        raise UsageError(f"{args.dir}: no such file or directory (expected a directory written by `svdquant "
                         "quantize`, or a Nunchaku .safetensors file)")
    if path.is_file() and path.suffix == ".safetensors":  # a Nunchaku checkpoint: the transformer, on a base pipeline
        return _generate(args, *_nunchaku_pipeline(args, path))
    if args.base or args.precision:
        raise UsageError("--base and --precision apply to a Nunchaku .safetensors file, not to a pipeline directory")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"{args.dir}: not a diffusers pipeline directory (no model_index.json)")
    device = _device(args.device)
    pipe = _load_pipeline(args.dir, torch.bfloat16).to(device)
    _, denoiser = denoiser_of(pipe)
    if not is_quantized(denoiser):
        raise UsageError(f"{args.dir}: its denoiser is not quantized by svdquant_ops (run `svdquant quantize` first)")
    # Saving writes each member's copy of shared λ / down projections: share them again, and merge the
    # activation quantization of linears that read one input under torch.compile too.
    from ..ops import install_compile_pass
    from ..quantize.sharing import share_inputs
    from .diffusers import prepare_model

    prepare_model(denoiser)
    share_inputs(denoiser)
    install_compile_pass()
    report = path / "svdquant_report.json"
    builtin = report.is_file() and json.loads(report.read_text()).get("model") == BUILTIN
    return _generate(args, pipe, denoiser, builtin)


def _nunchaku_pipeline(args, path: Path):
    """(pipeline, transformer, builtin) for `generate FILE.safetensors --base MODEL`: the Nunchaku transformer
    (svdquant_ops.nunchaku) in the base pipeline's place."""
    import torch

    from .nunchaku import load_nunchaku_transformer
    from .pipelines import tiny_flux_pipeline

    if not args.base:
        raise UsageError(f"{args.dir}: a Nunchaku checkpoint holds only the transformer; name the base pipeline for "
                         "the text encoders, VAE and scheduler with --base (hub id or directory, e.g. "
                         "black-forest-labs/FLUX.1-schnell)")
    device = _device(args.device)
    transformer = load_nunchaku_transformer(path, device=device, precision=args.precision)
    builtin = args.base == BUILTIN
    if builtin:
        pipe = tiny_flux_pipeline()
        pipe.transformer = transformer
    else:
        from diffusers import DiffusionPipeline

        base = Path(args.base)
        if not base.exists() and (args.base.startswith((".", "/", "~")) or args.base.count("/") != 1):
            raise UsageError(f"--base {args.base}: no such directory, and not a hub id of the form 'owner/name'")
        try:
            pipe = DiffusionPipeline.from_pretrained(args.base, transformer=transformer, torch_dtype=torch.bfloat16)
        except OSError as exc:
            detail = str(exc).splitlines()[0][:200]
            raise UsageError(f"--base {args.base}: cannot load the pipeline: {detail}") from None
    return pipe.to(device), transformer, builtin


def _generate(args, pipe, denoiser, builtin: bool) -> int:
    import torch

    if args.fuse_qkv:
        from .fusion import fuse_qkv

        print(f"svdquant: {fuse_qkv(denoiser)}")
    if args.compile:
        from .compile_recipe import compile_options, prepare_compile

        prepare_compile(denoiser)  # weights unwrapped, one GEMM launch per shared activation
        denoiser.compile(fullgraph=True, options=compile_options())
    call = _call_args(builtin, args)
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                     **call).images[0]
    image.save(args.out)
    print(f"svdquant: wrote {args.out} ({image.width}x{image.height}, {args.steps} steps, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchError, run, run_child

    if args.one:  # one configuration in this process (what the driver starts)
        return run_child(args)
    try:
        return run(args)
    except BenchError as exc:
        raise UsageError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdquant", description="SVDQuant 4-bit quantization of diffusers pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a pipeline's denoiser (calibrated on prompts) and save it")
    q.add_argument("model", nargs="?", help="hub id or local pipeline directory (default: the built-in tiny FLUX "
                                            "pipeline, seeded weights, no download)")
    q.add_argument("--out", help="output directory (default: svdquant-<model>-<precision>)")
    q.add_argument("--precision", default="int4", choices=PRECISIONS, help="int4 (default), nvfp4 or w4a8 (Hopper)")
    q.add_argument("--rank", type=_at_least(0), default=32, help="rank of the 16-bit low-rank branch (32)")
    q.add_argument("--weight-only", default="w4a16", choices=("w4a16", "none"),
                   help="AdaLN modulation linears: 4-bit weights, 16-bit activations (w4a16, default) or 16-bit (none)")
    q.add_argument("--prompts", help="calibration prompts, one per line (default: 128 built-in captions)")
    q.add_argument("--num-prompts", type=_at_least(1),
                   help="use the first N prompts, the held-out ones included (default: all; 17 for the built-in "
                        "model: 16 calibrate, 1 is held out)")
    q.add_argument("--steps", type=_at_least(1), default=4, help="denoising steps per calibration prompt (4)")
    q.add_argument("--height", type=_at_least(16), help="image height for calibration (default: the pipeline's)")
    q.add_argument("--width", type=_at_least(16), help="image width for calibration (default: the pipeline's)")
    q.add_argument("--device", help="where the pipeline and the algorithm run (default: cuda if available)")
    q.add_argument("--gptq", action="store_true", help="GPTQ for the 4-bit residual instead of round-to-nearest")
    q.set_defaults(run=cmd_quantize)
    g = sub.add_parser("generate", help="generate an image with a quantized pipeline directory")
    g.add_argument("dir", help="a directory written by `svdquant quantize`, or a Nunchaku SVDQuant .safetensors file")
    g.add_argument("--base", help="for a Nunchaku file: the base pipeline (hub id or directory; builtin:tiny-flux)")
    g.add_argument("--precision", choices=("int4", "nvfp4", "w4a8"),
                   help="for a Nunchaku file: w4a8 converts it at load time (default: the file's own, exact)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="image.png", help="image file to write (image.png)")
    g.add_argument("--steps", type=_at_least(1), default=4, help="denoising steps (4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=_at_least(16))
    g.add_argument("--width", type=_at_least(16))
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser (one graph)")
    g.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=True,
                   help="one linear for each attention's q/k/v (svdquant_ops.fuse_qkv; the same outputs bit for bit, "
                        "fewer GEMMs and a shorter host prologue; default: on)")
    g.add_argument("--device", help="default: cuda if available")
    g.set_defaults(run=cmd_generate)
    from .bench import add_arguments as bench_arguments  # the benchmark's options live beside its code

    b = sub.add_parser("bench", help="time one FLUX.1 transformer step: bf16, torchao fp8, SVDQuant w4a8 / "
                                        "int4, eager / compiled / CUDA graphs (one process per configuration)")
    bench_arguments(b)
    b.set_defaults(run=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (UsageError, FileNotFoundError) as exc:
        print(f"svdquant: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad values found while working (e.g. NaN weights): still the user's input
        print(f"svdquant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
