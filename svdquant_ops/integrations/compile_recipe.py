"""``prepare_compile(model)``: the library's compile recipe for a quantized model, one call before ``torch.compile``,
and ``compile_options(mode)``: the Inductor options the recipe compiles with.

What ``svdquant generate --compile``, ``integrations/flux_compile.py`` and the benchmark's recipe rows
(``benchmarks/README.md``) apply, so that a Python user gets the same speed from the same call:

- the quantized weights unwrapped into plain parameters (``unwrap_weights``): a compiled call flattens no tensor
  subclass, which cut the host's time before a step's first kernel (an H100 FLUX.1-dev w4a8 step: 116.3 -> 112.6
  ms under reduce-overhead, ``benchmarks/results/2026-12-06-h100-unwrap-summary.md``);
- Inductor's post-grad passes installed with the W4A8 GEMMs that read one quantized activation put into one launch
  (``install_compile_pass(cat_gemms=True)``: a FLUX.1 single block's to_qkv and proj_mlp as one ``gemm_cat``;
  112.5 -> 110.1 ms, ``benchmarks/results/2026-12-06-h100-gemm-cat-summary.md``). The passes are a process-wide
  Inductor setting, as ``quantize_model``'s own.

Call it after quantizing, after ``fuse_qkv`` (which must see wrapped weights) and after moving the model to its
device. ``rewrap_weights(model)`` undoes the unwrapping (before loading weights, LoRA, fusing or a dtype change).

``torch.compile(model, fullgraph=True, options=compile_options(mode))`` then compiles without Inductor's size /
stride assert on every graph input and custom-op output: the generated code runs them before the step's first
kernel (a FLUX.1-dev w4a8 graph has 1613 inputs), and Dynamo's guards already check each input's sizes and strides.
On an H100: 110.6 -> 109.6 ms per step from idle, the first kernel 0.9 ms earlier, the same 103.9-104.0 ms with the
host ahead (``benchmarks/results/2026-12-07-h100-twentyfirst-summary.md``). CUDA-graph replays run no asserts, so
it matters without ``mode="reduce-overhead"``. It is an option of that one compile, not a process-wide setting.
"""

from __future__ import annotations

from torch import nn

from ..ops import install_compile_pass
from .unwrap import unwrap_weights


def prepare_compile(model: nn.Module) -> int:
    """Apply the compile recipe to ``model`` in place (module docstring); returns how many quantized weights were
    unwrapped (0 if there were none, or all were unwrapped already)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_compile: model must be a torch.nn.Module, got {type(model).__name__}")
    unwrapped = unwrap_weights(model)
    install_compile_pass(cat_gemms=True)
    return unwrapped


# torch.compile's modes (torch._inductor.list_mode_options), "default" being no option at all
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(mode: str | None = None) -> dict:
    """The ``options`` of ``torch.compile`` for a model prepared by ``prepare_compile``: ``mode``'s Inductor options
    (torch.compile takes a mode or options, not both) with the size asserts off (module docstring)."""
    if mode not in _MODES:
        raise ValueError(f"compile_options: mode must be one of {', '.join(repr(m) for m in _MODES)}, got {mode!r}")
    import torch._inductor

    return {**(torch._inductor.list_mode_options(mode) if mode else {}), "size_asserts": False}
