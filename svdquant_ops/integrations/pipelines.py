"""Quantizing a diffusers pipeline's denoiser: calibration by running prompts through the pipeline (every step),
a fidelity report against the 16-bit denoiser, and the built-in default pipeline the CLI uses when no model is given.
"""

from __future__ import annotations

import json

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..quantize.config import SVDQuantConfig
from ..storage import PackedWeight
from .api import QuantizeSummary, calibrate, quantize_model

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
DENOISERS = ("transformer", "unet")


def builtin_prompts() -> list[str]:
    """128 varied captions (subjects, styles, text rendering, lighting) for calibration."""
    return read_prompts(PROMPTS_FILE)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt (one per line expected)")
    return prompts


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """The pipeline component that runs every denoising step: ``transformer`` (DiT pipelines) or ``unet``."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(f"{type(pipe).__name__} has no denoiser component (expected one of {list(DENOISERS)})")


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(getattr(m, "weight", None), PackedWeight) for m in module.modules())


def save_pipeline(pipe, directory: str | Path) -> None:
    """``pipe.save_pretrained(directory)``, then name svdquant_ops as the quantized denoiser's library in
    ``model_index.json`` (``svdquant_ops`` re-exports diffusers' model classes). Loading needs our config and tensor
    classes registered either way; this way ``DiffusionPipeline.from_pretrained`` without ``import svdquant_ops``
    fails with diffusers' own message saying to import it, instead of torchao's "Failed to find class
    SVDQuantConfig"."""
    pipe.save_pretrained(directory)
    name, denoiser = denoiser_of(pipe)
    if not is_quantized(denoiser):
        return
    index_path = Path(directory) / "model_index.json"
    index = json.loads(index_path.read_text())
    index[name] = ["svdquant_ops", type(denoiser).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The built-in default: a FLUX.1-architecture pipeline small enough for 2 CPU cores, with seeded random weights
    and no download (word-level tokenizers over the built-in prompts' words, CLIP and T5 text encoders, a 2-level
    VAE). Its transformer has FLUX.1's blocks (2 double-stream, 4 single-stream, 4 heads of 64, guidance embedding)
    at 1/12 of FLUX.1-dev's width."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for p in builtin_prompts() for w in p.lower().replace(",", " ").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()

    def tokenizer(max_length: int):
        return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                       unk_token="[UNK]", eos_token="</s>")

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                            projection_dim=64, pad_token_id=0, bos_token_id=0, eos_token_id=2))
        t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=256, d_ff=512, d_kv=64, num_layers=2,
                                     num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0, scaling_factor=1.0)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                             attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                             pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=[16, 24, 24])
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (clip, t5, vae, transformer):  # built, not loaded: in training mode, and T5's dropout would be on
        m.eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer(77), text_encoder_2=t5, tokenizer_2=tokenizer(64), transformer=transformer)
    return pipe.to(dtype)


BUILTIN_CALL = dict(height=64, width=64, max_sequence_length=64)  # what the built-in pipeline is run with


@dataclass
class Recorder:
    """Inputs and outputs of every denoiser call while active (kept on the CPU), to compare a quantized denoiser
    with the 16-bit one on exactly the inputs the pipeline produced."""

    calls: list = field(default_factory=list)

    def __call__(self, module, args, kwargs, output):
        cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        self.calls.append(([cpu(a) for a in args], {k: cpu(v) for k, v in kwargs.items()}, cpu(out)))


def run_prompts(pipe, prompts: list[str], *, steps: int, seed: int = 0, desc: str = "prompts", **call) -> None:
    """Run every prompt through the pipeline (all denoising steps, latents only: no VAE decode), with a progress
    bar."""
    from tqdm.auto import tqdm

    for i, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", dynamic_ncols=True)):
        generator = torch.Generator().manual_seed(seed + i)
        pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **call)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    err = (ref - out).pow(2).mean()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).mean() / err))


def replay_sqnr(denoiser: nn.Module, calls: list) -> float:
    """SQNR (dB) of ``denoiser`` against the recorded outputs, over all recorded calls together."""
    device = next(p.device for p in denoiser.parameters())
    dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    refs, outs = [], []
    with torch.inference_mode():
        for args, kwargs, ref in calls:
            out = denoiser(*[dev(a) for a in args], **{k: dev(v) for k, v in kwargs.items()})
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            refs.append(ref.float().flatten())
            outs.append(out.float().cpu().flatten())
    return sqnr_db(torch.cat(refs), torch.cat(outs))


@dataclass
class PipelineReport:
    summary: QuantizeSummary
    sqnr_db: float  # denoiser output vs 16-bit over every step of the evaluation prompts
    eval_calls: int
    calibration_prompts: int
    seconds: dict[str, float]

    def lines(self) -> list[str]:
        s = self.summary
        return [
            f"linears quantized (SVDQuant): {len(s.quantized)}",
            f"linears with 4-bit weights only: {len(s.weight_only)}"
            + (f" ({', '.join(sorted(set(s.weight_only.values())))})" if s.weight_only else ""),
            f"linears kept in 16-bit: {len(s.kept)} ({s.kept_reasons() or 'none'})",
            f"denoiser weights: {s.bytes_before / 2**20:.2f} MiB -> {s.bytes_after / 2**20:.2f} MiB ({s.ratio:.2f}x)",
            f"denoiser output SQNR vs 16-bit: {self.sqnr_db:.1f} dB over {self.eval_calls} denoising steps "
            "of held-out prompts",
            f"calibration: {self.calibration_prompts} prompts",
            "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
        ]

    def to_dict(self) -> dict:
        s = self.summary
        return dict(quantized=s.quantized, weight_only=s.weight_only, kept=s.kept, bytes_before=s.bytes_before, bytes_after=s.bytes_after,
                    sqnr_db=self.sqnr_db, eval_calls=self.eval_calls, calibration_prompts=self.calibration_prompts,
                    seconds=self.seconds)


def quantize_pipeline(pipe, config: SVDQuantConfig, prompts: list[str], *, steps: int, eval_prompts: int = 2,
                      max_rows: int = 4096, seed: int = 0, **call) -> PipelineReport:
    """Calibrate the pipeline's denoiser on ``prompts`` (every step), quantize it in place with ``config`` and report
    its fidelity: the 16-bit denoiser's inputs and outputs are recorded on ``eval_prompts`` held-out prompts (the
    last ones of ``prompts``, not used for calibration) and replayed through the quantized denoiser. ``max_rows``:
    rows of each linear input kept for the solver (``calibrate``)."""
    if len(prompts) < eval_prompts + 1:
        raise ValueError(f"need at least {eval_prompts + 1} prompts ({eval_prompts} held out for the report), "
                         f"got {len(prompts)}")
    _, denoiser = denoiser_of(pipe)
    if is_quantized(denoiser):
        raise ValueError("the pipeline's denoiser is already quantized")
    calib, held_out = prompts[:-eval_prompts], prompts[-eval_prompts:]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    recorder = Recorder()
    handle = denoiser.register_forward_hook(recorder, with_kwargs=True)
    try:
        with torch.inference_mode():
            run_prompts(pipe, held_out, steps=steps, seed=seed + 10_000, desc="16-bit reference", **call)
    finally:
        handle.remove()
    seconds["reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with calibrate(denoiser, max_rows=max_rows):
        with torch.no_grad():  # not inference_mode: the recorded rows are used by the solver afterwards
            run_prompts(pipe, calib, steps=steps, seed=seed, desc="calibration", **call)
    seconds["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = quantize_model(denoiser, config)
    seconds["quantization"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sqnr = replay_sqnr(denoiser, recorder.calls)
    seconds["evaluation"] = time.perf_counter() - t0
    return PipelineReport(summary, sqnr, len(recorder.calls), len(calib), seconds)
