"""Shared by the integration scripts: command-line options and loading the pipeline (a hub id or the built-in one)."""

from __future__ import annotations

import argparse

import torch

from svdquant_ops.integrations.pipelines import BUILTIN_CALL, tiny_flux_pipeline


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="hub id or local pipeline directory (default: the built-in tiny FLUX pipeline)")
    p.add_argument("--precision", default="w4a8" if torch.cuda.is_available() else "int4",
                   choices=["int4", "nvfp4", "w4a8"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompt", default="a red fox sitting in fresh snow at dawn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load(args):
    """(pipeline on args.device, extra pipeline-call arguments)."""
    if args.model is None:
        return tiny_flux_pipeline().to(args.device), dict(BUILTIN_CALL)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device), {}


def generate(pipe, args, call, **extra):
    with torch.inference_mode():
        return pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                    **call, **extra).images
