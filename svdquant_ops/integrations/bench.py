"""One FLUX.1 transformer step under each configuration, side by side (``svdquant bench``,
``benchmarks/bench_flux.py``): bf16 eager and compiled, torchao fp8 row-wise compiled, SVDQuant w4a8 and int4
(eager, compiled, and compiled with ``mode="reduce-overhead"``, i.e. CUDA graphs). Extra rows, not in the default
set: ``w4a8-*-lora16`` (the w4a8 model with a seeded random rank-16 LoRA on FLUX's usual LoRA targets, ``load_lora``'s
defaults; the row records how many linears got it fused and as a side branch) and ``nunchaku-{int4|w4a8}-*`` (the
bf16 model written as a Nunchaku INT4 file by ``write_nunchaku_flux`` and loaded back with
``load_nunchaku_transformer``, exact or converted to w4a8; the row records the file's size, the write and load times
and the output SQNR of one eager step against the bf16 model and, for w4a8, against the exact int4 model).

The model is FLUX.1-dev's architecture (diffusers' default ``FluxTransformer2DModel()`` config, 11.9 B parameters)
with seeded random weights in bf16, built directly on the device; ``--model tiny`` is a four-block model for CPU
runs. One step is one transformer forward at ``--size`` pixels (``(size / 16)^2`` image tokens, 512 text tokens),
batch ``--batch``.

Each configuration runs in its own process (``--one NAME``, which prints one ``BENCH_RESULT {json}`` line), so a
22 GiB bf16 model and its quantized copy never share a GPU, a crash or hang costs one row (``--timeout``), and no
configuration inherits another's global settings (torchao's quantizers flip Inductor globals). The driver assembles
the rows into a markdown table and a JSON file with the run's record (date, GPU, commit, command:
``benchmarks/_record.py`` when the source tree is present) and writes both after every row.

Per configuration: ms per step (median of ``--iters`` after ``--warmup`` calls, CUDA events around each step, under
``torch.inference_mode()``; each step starts on an idle GPU, so the host's per-step prologue counts), on CUDA also
back to back (``--iters`` steps without synchronizing, as a denoising loop runs them) and with a head start (each
step after a 60 ms spin kernel, so the host's prologue runs while the GPU is busy: from idle minus this is the
prologue's cost), the ratio to bf16 compiled of the same run, the host's time to enqueue a step, weight bytes
(quantized weights by their
parts), peak allocated memory during the timed steps, the first call's time (compilation), Dynamo's graph and frame
counts (one graph, no recompiles expected), the time to quantize, for compiled rows the output against one eager
step of the same model (``vs_eager``: SQNR and the largest difference; the bf16 row's value is bf16 rounding's) and,
with ``--profile``, device time per step by kernel category (``categorize``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
TEXT_TOKENS = 512  # FLUX.1-dev's T5 sequence length
RANK = 32
NUNCHAKU_TMP_PREFIX = "svdq-bench-nunchaku-"  # + the child's pid: the driver removes what a killed child left


class BenchError(ValueError):
    """A request the benchmark cannot run as asked (reported in one line, exit code 2)."""


# ------------------------------------------------------------------------------------------------------------------
# configurations and models
# ------------------------------------------------------------------------------------------------------------------
# Config fields that set one of the op library's CUDA run-time switches in the row's process (None: the library's
# default, whatever the caller's environment says): the one place that maps a field to its variable
SWITCHES = {
    "gmax": "SVDQUANT_OPS_CUDA_W4A8_GMAX",
    "w4a8_tile": "SVDQUANT_OPS_CUDA_W4A8_TILE",
    "pdl": "SVDQUANT_OPS_CUDA_PDL",
    "w4a8_weights": "SVDQUANT_OPS_CUDA_W4A8_WEIGHTS",
    "prep_units": "SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS",
    "prep_rows": "SVDQUANT_OPS_CUDA_PREP_ROWS",
    "w4a8_expand": "SVDQUANT_OPS_CUDA_W4A8_EXPAND",
    "w4a8_epi": "SVDQUANT_OPS_CUDA_W4A8_EPI",
    "token_lean": "SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN",
    "w4a8_cluster": "SVDQUANT_OPS_CUDA_W4A8_CLUSTER",
}


@dataclass(frozen=True)
class Config:
    name: str
    weights: str  # "bf16", "fp8", "w4a8", "int4"
    compile: bool
    mode: str | None = None  # torch.compile mode
    torchao_inductor: bool = False  # fp8: let torchao set its "recommended" Inductor globals (the 2026-12-04 hang)
    dict_tag_guards: bool = False  # Dynamo's experimental recursive dict-tag guards (a shorter host prologue)
    lora_rank: int = 0  # > 0: a seeded random LoRA of this rank on FLUX's usual targets, loaded after quantizing
    lora_shared_a: bool = False  # one LoRA A per block input (q/k/v[/mlp]), as diffusers converts Kohya / BFL files
    lora_max_fused_rank: int | None = None  # load_lora's max_fused_rank (None: its default)
    nunchaku: bool = False  # weights from a Nunchaku INT4 file written from the bf16 model ("int4": the exact
    #                         import, "w4a8": converted at load time)
    amax_split: bool = False  # install_compile_pass(amax_split=True): W4A8's amax by Inductor, x read once
    gemm_schedule: str | None = None  # a diagnostics-build W4A8 GEMM schedule (SVDQUANT_OPS_GEMM_SCHEDULE), e.g.
    #                                   "overlap": the child loads the diagnostics build of the op library
    fuse_qkv: bool = False  # each attention's q/k/v (and added q/k/v) as one linear (fusion.fuse_qkv): before
    #                         quantizing for bf16 / fp8, after for SVDQuant (which fuses quantized weights exactly)
    gmax: str | None = None  # W4A8's first quantize_act pass by the pipelined ("pipe"), the register-prefetch
    #                          ("regs") kernel or its lean variant ("lean": the same arithmetic, fewer instructions)
    #                          (SVDQUANT_OPS_CUDA_W4A8_GMAX in the child); None: the library's default
    expand_ahead: bool | None = None  # install_compile_pass(expand_ahead=...): each W4A8 GEMM expands the next one's
    #                                   weight (True) or its own (False); None: the library's default
    group_w4a16: bool | None = None  # install_compile_pass(group_w4a16=...): the weight-only linears of one input as
    #                                  one grouped call (True) or one call each (False); None: the library's default
    w4a8_tile: str | None = None  # W4A8's GEMM tile width on Hopper, "128" or "256" (SVDQUANT_OPS_CUDA_W4A8_TILE in
    #                               the child); None: the library's per-call choice
    unwrap: bool = False  # quantized weights held as plain parts before compiling (svdquant_ops.unwrap_weights;
    #                       torchao's unwrap_tensor_subclass for fp8): no subclass flattened on each call
    cat_gemms: bool | None = None  # install_compile_pass(cat_gemms=...): the W4A8 GEMMs of one quantized activation
    #                                (a single block's q/k/v and proj_mlp) as one gemm_cat call; None: the default
    pdl: str | None = None  # programmatic dependent launch of the op library's kernels, "1" or "0"
    #                         (SVDQUANT_OPS_CUDA_PDL in the child); None: the library's default
    inductor_pdl: bool = False  # Inductor's Triton kernels with programmatic dependent launch too
    #                             (torch._inductor.config.triton.enable_pdl: TORCHINDUCTOR_ENABLE_PDL=1 in the child)
    w4a8_weights: str | None = None  # how W4A8's Hopper GEMM reads its weights, "prep" (expanded per call) or "regs"
    #                                  (packed codes expanded in registers; SVDQUANT_OPS_CUDA_W4A8_WEIGHTS in the
    #                                  child); None: the library's per-call choice
    pack: bool = True  # unwrap_weights(pack=...): each weight's own parts of one dtype as one flat parameter
    prep_units: str | None = None  # W4A8 weight units in flight per prep thread, "4" or "1"
    #                                (SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS in the child); None: the library's default
    token_lean: str | None = None  # W4A8's token kernel with its lean loop, "1", or not, "0"
    #                                (SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN in the child); None: the library's default
    w4a8_expand: str | None = None  # how W4A8's weight expansion exchanges slice halves, by lane "pair" or
    #                                 warp-uniformly, "warp" (SVDQUANT_OPS_CUDA_W4A8_EXPAND in the child); None: the
    #                                 library's default
    w4a8_epi: str | None = None  # how W4A8's GEMM on 128 x 256 tiles hands each thread the tile's channel scales and
    #                              bias, by warp shuffles, "shfl", or through shared memory, "smem"
    #                              (SVDQUANT_OPS_CUDA_W4A8_EPI in the child); None: the library's default
    prep_rows: str | None = None  # the prep kernel's grid rows, "all" or only those with work, "used"
    #                               (SVDQUANT_OPS_CUDA_PREP_ROWS in the child); None: the library's default
    w4a8_cluster: str | None = None  # W4A8's quantize_act by the one-pass cluster kernel for calls of at most 1024
    #                                  tokens, "small", or every call, "1" (SVDQUANT_OPS_CUDA_W4A8_CLUSTER in the
    #                                  child); None: the library's default (the two passes)
    parallel_linears: bool | None = None  # install_compile_pass(parallel_linears=...): a double block's image and
    #                                       text linears of one shape as one parallel_linears call, the text one on a
    #                                       side stream (True), or one after the other (False); None: the default
    size_asserts: bool | None = None  # Inductor's size / stride assert on each graph input and custom-op output;
    #                                   None: the library's compile recipe (compile_options: off) where the row
    #                                   applies it (SVDQuant weights unwrapped), Inductor's default (on) elsewhere

    @property
    def recipe(self) -> bool:
        """The row compiles a model prepared as ``prepare_compile`` does (SVDQuant weights unwrapped)."""
        return self.compile and self.unwrap and self.weights not in ("bf16", "fp8")

    @property
    def asserts(self) -> bool:
        """Whether the compiled graph keeps Inductor's size asserts (``size_asserts``' None resolved)."""
        return self.size_asserts if self.size_asserts is not None else not self.recipe

    @property
    def cuda_only(self) -> bool:
        return (self.mode == "reduce-overhead" or self.weights == "fp8" or self.gemm_schedule is not None
                or self.inductor_pdl or any(getattr(self, field) is not None for field in SWITCHES))

    @property
    def label(self) -> str:
        what = {"bf16": "bf16", "fp8": "torchao fp8 row-wise", "w4a8": "SVDQuant w4a8", "int4": "SVDQuant int4"}
        if self.nunchaku:
            what = {"int4": "Nunchaku INT4 file, exact int4,", "w4a8": "Nunchaku INT4 file, converted to w4a8,"}
        how = "compiled" if self.compile else "eager"
        if self.mode:
            how += f', mode="{self.mode}"'
        if self.torchao_inductor:
            how += ", torchao's Inductor settings (coordinate descent tuning)"
        if self.dict_tag_guards:
            how += ", recursive dict-tag guards"
        if self.amax_split:
            how += ", per-token amax by Inductor (amax_split)"
        if self.gemm_schedule:
            how += f", GEMM schedule {self.gemm_schedule} (diagnostics build)"
        if self.fuse_qkv:
            how += ", q/k/v fused (fuse_qkv)"
        if self.gmax:
            how += {"pipe": ", first quantize_act pass by the pipelined kernel",
                    "regs": ", first quantize_act pass by the register-prefetch kernel",
                    "lean": ", first quantize_act pass by the register-prefetch kernel's lean variant"}[self.gmax]
        if self.w4a8_tile:
            how += f", every W4A8 GEMM on 128 x {self.w4a8_tile} tiles"
        if self.expand_ahead is not None:
            how += (", each GEMM expanding the next one's weight (expand_ahead)" if self.expand_ahead
                    else ", each GEMM expanding its own weight (no expand_ahead)")
        if self.unwrap:
            how += (", weights unwrapped (torchao's unwrap_tensor_subclass)" if self.weights == "fp8"
                    else ", weights unwrapped (unwrap_weights)" if self.pack
                    else ", weights unwrapped with every part a parameter of its own (unwrap_weights(pack=False))")
        if self.cat_gemms is not None:
            how += (", the GEMMs of one activation as one gemm_cat call (cat_gemms)" if self.cat_gemms
                    else ", one call per GEMM (no cat_gemms)")
        if self.parallel_linears is not None:
            how += (", the double blocks' image and text linears side by side on two streams (parallel_linears)"
                    if self.parallel_linears else ", the image and text linears one after the other")
        if self.pdl is not None:
            how += ", kernels launched programmatically dependent (PDL)" if self.pdl == "1" else ", plain launches"
        if self.inductor_pdl:
            how += ", Inductor's kernels launched programmatically dependent (TORCHINDUCTOR_ENABLE_PDL=1)"
        if self.w4a8_weights:
            how += {"prep": ", every W4A8 GEMM on weights expanded by a prep kernel",
                    "regs": ", every W4A8 GEMM on packed weights expanded in registers (no prep)"}[self.w4a8_weights]
        if self.prep_units:
            how += f", W4A8 prep with {self.prep_units} weight unit(s) in flight per thread"
        if self.token_lean:
            how += {"1": ", W4A8 token kernel with its lean loop",
                    "0": ", W4A8 token kernel without its lean loop"}[self.token_lean]
        if self.w4a8_expand:
            how += {"pair": ", W4A8 weight expansion exchanging slice halves by lane pairs",
                    "warp": ", W4A8 weight expansion warp-uniform (full-warp shuffles)"}[self.w4a8_expand]
        if self.w4a8_epi:
            how += {"shfl": ", W4A8 128 x 256 GEMM epilogue vectors by warp shuffles",
                    "smem": ", W4A8 128 x 256 GEMM epilogue vectors through shared memory"}[self.w4a8_epi]
        if self.w4a8_cluster:
            how += {"small": ", W4A8 quantize_act by the one-pass cluster kernel at <= 1024 tokens",
                    "1": ", W4A8 quantize_act by the one-pass cluster kernel"}[self.w4a8_cluster]
        if self.prep_rows:
            how += {"all": ", the prep kernel's grid with all three rows",
                    "used": ", the prep kernel's grid with only its rows that have work"}[self.prep_rows]
        if self.recipe and self.asserts:
            how += ", Inductor's size asserts on (not the recipe's compile_options)"
        elif self.compile and not self.asserts:
            how += ", Inductor's size asserts off (compile_options)"
        if self.group_w4a16 is not None:
            how += (", the AdaLN w4a16 linears as one grouped call (group_w4a16)" if self.group_w4a16
                    else ", one call per w4a16 linear (no group_w4a16)")
        if self.lora_rank:
            how += f" + rank-{self.lora_rank} LoRA"
            if self.lora_shared_a:
                how += " (one A per block input, as fused-qkv Kohya / BFL files)"
            if self.lora_max_fused_rank:
                how += f", fused up to rank {self.lora_max_fused_rank}"
        return f"{what[self.weights]} {how}"


def _configs() -> dict[str, Config]:
    out = {"bf16-eager": Config("bf16-eager", "bf16", False)}
    for w in ("bf16", "fp8", "w4a8", "int4"):
        out[f"{w}-compile"] = Config(f"{w}-compile", w, True)
        out[f"{w}-compile-ro"] = Config(f"{w}-compile-ro", w, True, "reduce-overhead")
    for w in ("w4a8", "int4"):
        out[f"{w}-eager"] = Config(f"{w}-eager", w, False)
    # Diagnostic, not in the default set: torchao's default set_inductor_config=True (what hung on 2026-12-04).
    out["fp8-compile-coordesc"] = Config("fp8-compile-coordesc", "fp8", True, torchao_inductor=True)
    # Diagnostic: torch._dynamo.config.use_recursive_dict_tags_for_guards (HISTORY.md, 2026-12-04 night: on the CPU
    # the guards on the ~3400 inner tensors cost ~3 ms per call and these tags do not shorten them).
    for w in ("bf16", "fp8", "w4a8"):
        out[f"{w}-compile-tags"] = Config(f"{w}-compile-tags", w, True, dict_tag_guards=True)
    # Extra, not in the default set: a rank-16 LoRA on the w4a8 model (load_lora's defaults: fused into the SVDQuant
    # branch up to rank 64, a side branch past it and on 16-bit / weight-only linears). "-fusedqkv": one A per block
    # input (q/k/v, and a single block's MLP-in), as diffusers converts Kohya / BFL files with a fused qkv.
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        out[f"w4a8-compile{sfx}-lora16"] = Config(f"w4a8-compile{sfx}-lora16", "w4a8", True, mode, lora_rank=16)
    out["w4a8-compile-lora16-fusedqkv"] = Config("w4a8-compile-lora16-fusedqkv", "w4a8", True, lora_rank=16,
                                                 lora_shared_a=True)
    out["w4a8-eager-lora16"] = Config("w4a8-eager-lora16", "w4a8", False, lora_rank=16)
    # Extra: W4A8's per-token amax computed by Inductor inside the kernel producing x, quantize_act_given_amax
    # reading x once (install_compile_pass(amax_split=True); off by default: a net loss on the H200, HISTORY.md)
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        out[f"w4a8-compile{sfx}-split"] = Config(f"w4a8-compile{sfx}-split", "w4a8", True, mode, amax_split=True)
    # Diagnostic: another W4A8 GEMM schedule, from the diagnostics build: each tile's epilogue under the next tile's
    # first MMAs (overlap / overlap3: 2 / 3 stages of MMAs in flight; bit-equal), a consumer warpgroup per tile
    # (pingpong: within fp32 rounding), ping-pong only where it won on the H200 (pingpong-auto), or the shipped one
    # with its int32 -> fp32 conversion by a magic-number add (promote-cvt; bit-equal); bench_linear.py --overlap
    # checks them against the shipped schedule.
    for sched in ("overlap", "overlap3", "pingpong", "pingpong-auto", "promote-cvt", "inflight"):
        for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
            name = f"w4a8-compile{sfx}-{sched}"
            out[name] = Config(name, "w4a8", True, mode, gemm_schedule=sched)
    # ... and with q/k/v fused, beside the shipped w4a8-compile[-ro]-fused: the main loop with one stage of MMAs in
    # flight (inflight), 2-CTA clusters sharing each activation tile by TMA multicast (multicast); both bit-equal
    for sched in ("inflight", "multicast"):
        for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
            name = f"w4a8-compile{sfx}-fused-{sched}"
            out[name] = Config(name, "w4a8", True, mode, gemm_schedule=sched, fuse_qkv=True)
    # Extra: q/k/v of each attention as one linear (fuse_qkv), for every weight format, so that the fused rows
    # compare with each other as the plain rows do
    for w in ("bf16", "fp8", "w4a8", "int4"):
        for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
            name = f"{w}-compile{sfx}-fused"
            out[name] = Config(name, w, True, mode, fuse_qkv=True)
    # Diagnostic: W4A8's first quantize_act pass by each kernel named (pipelined, register-prefetch), so that one
    # run compares both whatever the library's default
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k in ("pipe", "regs"):
            name = f"w4a8-compile{sfx}-fused-gmax{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, gmax=k)
    # Diagnostic: every W4A8 GEMM on 128 x 128 or 128 x 256 output tiles, whatever the library's per-call choice,
    # so that one run compares both with it
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k in ("128", "256"):
            name = f"w4a8-compile{sfx}-fused-tile{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, w4a8_tile=k)
    # Extra: the W4A8 weights expanded by the GEMM before (install_compile_pass(expand_ahead=True)) or by a prep
    # kernel of each GEMM's own (False), whatever the library's default, so that one run compares both
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, on in (("ahead", True), ("noahead", False)):
            name = f"w4a8-compile{sfx}-fused-{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, expand_ahead=on)
    # Extra: the weight-only linears that read one input (FLUX.1's AdaLN modulation) as one grouped call
    # (install_compile_pass(group_w4a16=True)) or one call each (False), whatever the library's default
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, on in (("grouped", True), ("ungrouped", False)):
            name = f"w4a8-compile{sfx}-fused-{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, group_w4a16=on)
    # Extra: the quantized weights held as their plain parts before compiling, so that a compiled
    # call flattens no tensor subclass: ours with svdquant_ops.unwrap_weights, torchao's fp8 with its own
    # unwrap_tensor_subclass (the same comparison for both; fp8 unfused, as its baseline row). int4's is its
    # compile recipe (gemm_cat takes W4A8 GEMMs only).
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for w in ("w4a8", "int4"):
            out[f"{w}-compile{sfx}-fused-unwrap"] = Config(f"{w}-compile{sfx}-fused-unwrap", w, True, mode,
                                                           fuse_qkv=True, unwrap=True)
        out[f"fp8-compile{sfx}-unwrap"] = Config(f"fp8-compile{sfx}-unwrap", "fp8", True, mode, unwrap=True)
    # Extra: the library's compile recipe (fused, unwrapped) with the W4A8 GEMMs of one activation as one gemm_cat
    # call (install_compile_pass(cat_gemms=True)) or one call each (False), whatever the library's default
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, on in (("cat", True), ("nocat", False)):
            name = f"w4a8-compile{sfx}-fused-unwrap-{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=on)
    # Extra: that recipe with each double block's image and text linears of one shape as one parallel_linears call
    # (install_compile_pass(parallel_linears=True): the text stream's 512-token calls on a side stream, in the SMs
    # the image stream's kernels leave idle) or one after the other (False), whatever the library's default
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, on in (("parallel", True), ("serial", False)):
            name = f"w4a8-compile{sfx}-fused-unwrap-cat-{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True,
                               parallel_linears=on)
    # Extra: that recipe with the op library's kernels launched programmatically dependent on Hopper (each launched
    # while the one before still runs, waiting on it in the kernel; SVDQUANT_OPS_CUDA_PDL=1) or plainly (=0),
    # whatever the library's default
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, on in (("pdl", "1"), ("nopdl", "0")):
            name = f"w4a8-compile{sfx}-fused-unwrap-cat-{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True, pdl=on)
    # ... and with Inductor's Triton kernels launched the same way (TORCHINDUCTOR_ENABLE_PDL=1), beside bf16 and fp8
    # with Inductor's PDL, so that the three compare under one setting (cuBLAS keeps its own launches)
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        name = f"w4a8-compile{sfx}-fused-unwrap-cat-pdl-ipdl"
        out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True, pdl="1",
                           inductor_pdl=True)
        for w in ("bf16", "fp8"):
            out[f"{w}-compile{sfx}-ipdl"] = Config(f"{w}-compile{sfx}-ipdl", w, True, mode, inductor_pdl=True)
    # Extra: that recipe with one of the op library's run-time switches set (SVDQUANT_OPS_CUDA_... in the row's
    # process), whatever the library's default, one row per value: (row name prefix, Config field, values)
    switch_rows = (
        # every W4A8 GEMM reading its weights expanded by a prep kernel on each call ("prep") or as packed codes
        # expanded in the GEMM's registers ("regs"), whatever the library's per-call choice
        ("", "w4a8_weights", ("prep", "regs")),
        # the prep kernel keeping 4 or 1 weight units' loads in flight per thread (the same bytes; 1 is the loop
        # before the nineteenth session)
        ("prep", "prep_units", ("4", "1")),
        # the prep kernel's grid of all three rows (activation codes, weights, small operands), W4A8's activation row
        # returning at once, or only the rows with work (the same bytes, fewer blocks per launch)
        ("rows", "prep_rows", ("all", "used")),
        # W4A8's weight expansion (prep) exchanging slice halves by lane pairs or warp-uniformly
        # (SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair / warp: the same bytes)
        ("expand", "w4a8_expand", ("pair", "warp")),
        # W4A8's 128 x 256 GEMM handing each thread the tile's channel scales and bias by warp shuffles or through
        # shared memory (SVDQUANT_OPS_CUDA_W4A8_EPI=shfl / smem: the same bytes)
        ("epi", "w4a8_epi", ("shfl", "smem")),
        # W4A8's quantize_act in one pass by the cluster kernel for the calls of at most 1024 tokens, the batch's
        # tokens counted (at 1024x1024, batch 1: the text stream's 512, where the two passes are bound by launch and
        # latency) or for every call
        # (SVDQUANT_OPS_CUDA_W4A8_CLUSTER=small / 1: the same codes and scales, down_act summed in another order)
        ("cluster", "w4a8_cluster", ("small", "1")),
    )
    for prefix, field, values in switch_rows:
        for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
            for k in values:
                name = f"w4a8-compile{sfx}-fused-unwrap-cat-{prefix}{k}"
                out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True,
                                   **{field: k})
    # Extra: that recipe with both W4A8 quantize_act passes without or with their lean variants (the default)
    # (SVDQUANT_OPS_CUDA_W4A8_GMAX=regs / lean and SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=0 / 1: the same bytes; the
    # profile times each pass's kernel), whatever the library's defaults
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        for k, gmax, tok in (("regs", "regs", "0"), ("lean", "lean", "1")):
            name = f"w4a8-compile{sfx}-fused-unwrap-cat-qa{k}"
            out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True, gmax=gmax,
                               token_lean=tok)
    # Extra: that recipe with each weight part a graph input of its own (unwrap_weights(pack=False), the layout
    # before the twentieth session): the A/B of the host's time before the step's first kernel
    for sfx, mode in (("", None), ("-ro", "reduce-overhead")):
        name = f"w4a8-compile{sfx}-fused-unwrap-cat-nopack"
        out[name] = Config(name, "w4a8", True, mode, fuse_qkv=True, unwrap=True, cat_gemms=True, pack=False)
    # Extra: that recipe compiled with Inductor's size / stride asserts, which the generated code runs on every graph
    # input before the first kernel (the recipe's compile_options turns them off: Dynamo's guards already check the
    # inputs' sizes and strides): the A/B of their share of the host's prologue (CUDA-graph replays run none)
    name = "w4a8-compile-fused-unwrap-cat-asserts"
    out[name] = Config(name, "w4a8", True, fuse_qkv=True, unwrap=True, cat_gemms=True, size_asserts=True)
    # Diagnostic: every adapter fused up to rank 128 (quantize_act's fast kernel at R = 128 runs one block per SM)
    out["w4a8-compile-lora16-fuse128"] = Config("w4a8-compile-lora16-fuse128", "w4a8", True, lora_rank=16,
                                                lora_max_fused_rank=128)
    # Extra: the model written as a Nunchaku INT4 file (write_nunchaku_flux) and loaded back with
    # load_nunchaku_transformer, exact (int4) or converted to w4a8; the rows record the output error (SQNR).
    for w in ("int4", "w4a8"):
        out[f"nunchaku-{w}-compile"] = Config(f"nunchaku-{w}-compile", w, True, nunchaku=True)
        out[f"nunchaku-{w}-compile-ro"] = Config(f"nunchaku-{w}-compile-ro", w, True, "reduce-overhead",
                                                 nunchaku=True)
        out[f"nunchaku-{w}-eager"] = Config(f"nunchaku-{w}-eager", w, False, nunchaku=True)
    return out


CONFIGS = _configs()
# The default set in the order it runs: the baseline and the compiled configurations first, so that a run cut short
# by --budget still has the rows that matter most (the table lists rows in CONFIGS' order whatever the run order).
# SVDQuant's rows are the library's compile recipe (`svdquant generate --compile`, integrations/flux_compile.py):
# fuse_qkv, unwrap_weights, and for W4A8 install_compile_pass(cat_gemms=True).
DEFAULT_CUDA = ["bf16-compile", "fp8-compile", "w4a8-compile-fused-unwrap-cat", "int4-compile-fused-unwrap",
                "bf16-eager", "bf16-compile-ro", "fp8-compile-ro", "w4a8-compile-ro-fused-unwrap-cat",
                "int4-compile-ro-fused-unwrap"]
DEFAULT_CPU = ["bf16-eager", "w4a8-eager", "int4-eager"]
BASELINE = "bf16-compile"

# diffusers' FluxTransformer2DModel() defaults are FLUX.1-dev's transformer (without the guidance embedder).
MODELS = {
    "flux-dev": {},
    "tiny": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
                 axes_dims_rope=[8, 28, 28]),  # tests/builders.FLUX_TINY
}
CATEGORIES = ("linear_svdquant", "linear_dense", "act_quant", "attention", "other")
CATEGORY_TITLES = {"linear_svdquant": "linear: SVDQuant GEMM (+ weight prep, w4a16)",
                   "linear_dense": "linear: cuBLAS / CUTLASS / Triton GEMM", "act_quant": "activation quantization "
                   "(svdquant quantize_act)", "attention": "attention", "other": "other (Inductor-fused and the rest)"}


# ------------------------------------------------------------------------------------------------------------------
# kernel categories
# ------------------------------------------------------------------------------------------------------------------
_ATTENTION = ("flash", "fmha", "attention", "sdpa", "attn")
_DENSE_SUBSTRINGS = ("gemm", "gemv", "nvjet", "cublas", "cutlass", "xmma", "splitkreduce", "f8f8bf16", "s16816")
_DENSE_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_mm", "aten::_int_mm", "aten::mv", "aten::addmv"}


def categorize(name: str) -> str:
    """The category of a profiled kernel (CUDA kernel name) or operator (CPU profile: op name):

    * ``linear_svdquant``: this package's GEMM kernels (``svdquant::`` gemm / prep / linear / weight expansion kernels
      and ops, anything named w4a16);
    * ``act_quant``: its activation quantization (``quantize_act``, ``quantize_*_kernel``, ``down_act_*``), and
      torchao's ``quantize_fp8_row`` kernel where torchao takes its mslk path;
    * ``attention``: flash / memory-efficient / cuDNN SDPA kernels and the SDPA ops;
    * ``linear_dense``: cuBLAS(Lt) / CUTLASS GEMMs (bf16 and torch._scaled_mm fp8), Inductor's Triton GEMM templates
      (``triton_tem_``) and the ATen matmul ops;
    * ``other``: everything else, Inductor's generated elementwise / reduction kernels included. torchao's fp8
      activation quantization is plain ATen ops that Inductor fuses into those kernels, so for fp8 it lands here.
    """
    low = name.lower()
    if low.startswith("triton_"):  # Inductor's kernels: names list the fused ATen ops, attention's input copies too
        if low.startswith("triton_tem_"):
            return "attention" if "attention" in low else "linear_dense"
        return "other"
    if "w4a16" in low:
        return "linear_svdquant"
    if "quantize_fp8" in low:  # torchao's mslk path (triton quantize_fp8_row), when mslk is installed
        return "act_quant"
    if "svdquant" in low or "quantize_act" in low:
        if "quantize" in low or "down_act" in low:
            return "act_quant"
        if any(s in low for s in ("gemm", "prep", "linear", "expand")):
            return "linear_svdquant"
        return "other"
    if any(s in low for s in _ATTENTION):
        return "attention"
    if low in _DENSE_OPS or any(s in low for s in _DENSE_SUBSTRINGS):
        return "linear_dense"
    return "other"


# ------------------------------------------------------------------------------------------------------------------
# one configuration, in this process
# ------------------------------------------------------------------------------------------------------------------
def build_model(model: str, device, seed: int = 0):
    """The transformer with seeded random weights, created in bf16 directly on ``device`` (no CPU copy): parameters
    get PyTorch's default initialization (uniform, scaled by fan-in) from the device's generator."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            m = FluxTransformer2DModel(**MODELS[model])
    finally:
        torch.set_default_dtype(previous)
    return m.eval().requires_grad_(False)


def make_inputs(model: str, size: int, batch: int, text_tokens: int, device, seed: int = 0) -> dict:
    """One step's inputs as FluxPipeline passes them: packed latents [B, (size/16)^2, C], T5 states, pooled CLIP
    states, timestep, and the image / text position ids."""
    import torch

    cfg = {"in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, **MODELS[model]}
    side = size // 16
    g = torch.Generator(device=device).manual_seed(seed)
    bf = dict(device=device, dtype=torch.bfloat16)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    rows = torch.arange(side, device=device).repeat_interleave(side)
    cols = torch.arange(side, device=device).repeat(side)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], 1).to(**bf)
    return dict(hidden_states=randn(batch, side * side, cfg["in_channels"]),
                encoder_hidden_states=randn(batch, text_tokens, cfg["joint_attention_dim"]),
                pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
                timestep=torch.full((batch,), 0.5, **bf), img_ids=img_ids,
                txt_ids=torch.zeros(text_tokens, 3, **bf), return_dict=False)


def weight_bytes(module) -> int:
    """Bytes of all parameters and buffers, as the quantization summary counts them (``api.model_nbytes``)."""
    from .api import model_nbytes

    return model_nbytes(module)


_INDUCTOR_KEYS = ("max_autotune", "max_autotune_gemm", "max_autotune_pointwise", "coordinate_descent_tuning",
                  "coordinate_descent_check_all_directions", "freezing", "triton.unique_kernel_names")


def compiled(model, cfg: Config):
    """``model`` as the row runs it: itself (eager) or ``torch.compile(model, fullgraph=True, ...)`` with the row's
    mode, through the library's ``compile_options`` where the size asserts are off (``Config.asserts``)."""
    import torch

    if not cfg.compile:
        return model
    if cfg.asserts:
        return torch.compile(model, fullgraph=True, mode=cfg.mode)
    from .compile_recipe import compile_options

    return torch.compile(model, fullgraph=True, options=compile_options(cfg.mode))


def inductor_settings() -> dict:
    import torch._inductor.config as ic

    out = {}
    for key in _INDUCTOR_KEYS:
        obj = ic
        for part in key.split("."):
            obj = getattr(obj, part, None)
        out[key] = obj
    return out


def quantize(model, cfg: Config, rank: int, weight_only: str | None) -> dict:
    """Quantize ``model`` in place for ``cfg``; returns what was done. Inductor's global settings are saved before
    and restored after (torchao's fp8 handler sets coordinate-descent tuning process-wide unless
    ``set_inductor_config=False``), except for the diagnostic ``fp8-compile-coordesc``."""
    import torch
    import torch._inductor.config as ic

    from .fusion import fuse_qkv

    fused = {}
    if cfg.fuse_qkv and cfg.weights in ("bf16", "fp8"):  # a 16-bit model: fused as diffusers would, then quantized
        n = len(fuse_qkv(model).fused)
        fused = {"fused_attention": n, "summary": f"q/k/v fused in {n} attention modules"}
    if cfg.weights == "bf16":
        return fused
    saved = ic.save_config()
    if cfg.weights == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                   set_inductor_config=cfg.torchao_inductor))
        n = _fp8_linears(model)
        info = {"summary": f"{n} linears fp8 (torchao Float8Tensor, PerRow)", "fp8_kernels": _fp8_kernel_path()}
    else:
        from .api import quantize_model

        s = quantize_model(model, precision=cfg.weights, rank=rank, weight_only=weight_only)
        info = {"summary": f"{len(s.quantized)} SVDQuant, {len(s.weight_only)} w4a16, {len(s.kept)} kept",
                "quantized": len(s.quantized), "weight_only": len(s.weight_only), "kept": len(s.kept)}
        if cfg.fuse_qkv:  # the quantized weights, stacked exactly
            n = len(fuse_qkv(model).fused)
            fused = {"fused_attention": n, "summary": f"q/k/v fused in {n} attention modules"}
    if fused:
        fused["summary"] = f"{info['summary']}; {fused['summary']}"
    info.update(fused)
    if not cfg.torchao_inductor:
        ic.load_config(saved)
    if (cfg.amax_split or cfg.expand_ahead is not None or cfg.group_w4a16 is not None or cfg.cat_gemms is not None
            or cfg.parallel_linears is not None):
        from ..ops import install_compile_pass

        install_compile_pass(amax_split=True if cfg.amax_split else None, expand_ahead=cfg.expand_ahead,
                             group_w4a16=cfg.group_w4a16, cat_gemms=cfg.cat_gemms,
                             parallel_linears=cfg.parallel_linears)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return info


def _fp8_linears(model) -> int:
    """Modules whose weight is a torchao Float8Tensor."""
    return sum(1 for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Float8Tensor")


def unwrap(model, cfg: Config) -> int:
    """Hold ``model``'s quantized weights as plain parts (``Config.unwrap``); returns how many weights."""
    if cfg.weights == "fp8":
        from torchao.utils import unwrap_tensor_subclass

        before = _fp8_linears(model)
        unwrap_tensor_subclass(model)
        return before
    from .unwrap import unwrap_weights

    return unwrap_weights(model, pack=cfg.pack)


def _fp8_kernel_path() -> str:
    try:
        from torchao.utils import _is_mslk_available

        mslk = _is_mslk_available()
    except Exception:  # noqa: BLE001
        mslk = False
    return ("mslk (triton quantize_fp8_row + f8f8bf16_rowwise)" if mslk else
            "torch._scaled_mm, activation quantization in ATen ops (fused by Inductor)")


# FLUX LoRA targets (diffusers module names inside each block), as LoRA trainers and files for FLUX.1 cover them,
# and which of them read one input (a shared A in fused-qkv files: diffusers copies a Kohya / BFL qkv's A to all three)
LORA_TARGETS = {
    "transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2"),
    "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"),
}
_LORA_INPUTS = {"attn.to_q": "x", "attn.to_k": "x", "attn.to_v": "x", "proj_mlp": "x", "attn.add_q_proj": "ctx",
                "attn.add_k_proj": "ctx", "attn.add_v_proj": "ctx"}
LORA_B_STD = 0.01  # B ~ N(0, 0.01²): a visible but small change of the output (a trained B is small too)


def random_lora(model, rank: int, device, seed: int = 0, shared_a: bool = False) -> dict:
    """A seeded random LoRA for a FLUX transformer in diffusers / PEFT keys (``<module>.lora_A.weight`` [r, K],
    ``<module>.lora_B.weight`` [N, r]) on every ``LORA_TARGETS`` linear: A ~ N(0, 1/K), B ~ N(0, LORA_B_STD²), bf16,
    made on ``device``. ``shared_a``: one A per block input (q/k/v, and a single block's MLP-in projection)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for prefix, targets in LORA_TARGETS.items():
        for i, block in enumerate(getattr(model, prefix)):
            a_of_input: dict = {}
            for t in targets:
                mod = block.get_submodule(t)
                k, n = mod.in_features, mod.out_features
                key = _LORA_INPUTS.get(t) if shared_a else None
                a = a_of_input.get(key)
                if a is None:
                    a = (torch.randn(rank, k, generator=g, device=device) / math.sqrt(k)).to(torch.bfloat16)
                    if key is not None:
                        a_of_input[key] = a
                b = (torch.randn(n, rank, generator=g, device=device) * LORA_B_STD).to(torch.bfloat16)
                out[f"{prefix}.{i}.{t}.lora_A.weight"] = a
                out[f"{prefix}.{i}.{t}.lora_B.weight"] = b
    return out


def add_lora(model, cfg: Config, device, seed: int, sync) -> dict:
    """Load ``random_lora`` into the (quantized) model with ``load_lora``'s defaults; what it did, for the row."""
    from .lora import load_lora

    t0 = time.perf_counter()
    sd = random_lora(model, cfg.lora_rank, device, seed + 2, cfg.lora_shared_a)
    params = sum(t.numel() for t in {id(t): t for t in sd.values()}.values())  # a shared A counts once
    before = weight_bytes(model)
    kw = {} if cfg.lora_max_fused_rank is None else {"max_fused_rank": cfg.lora_max_fused_rank}
    counts = load_lora(model, sd, "bench", scale=1.0, **kw)
    sync()
    return {"lora": dict(rank=cfg.lora_rank, shared_a=cfg.lora_shared_a, targets=len(sd) // 2, params=params,
                         fused=counts["fused"], side=counts["side"], load_s=time.perf_counter() - t0,
                         bytes_added=weight_bytes(model) - before)}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_nunchaku(model, path: Path, rank: int, seed: int, sync) -> dict:
    """Write the bf16 model as a Nunchaku INT4 file (``write_nunchaku_flux``); its size and the time it took."""
    from .nunchaku_write import write_nunchaku_flux

    t0 = time.perf_counter()
    write_nunchaku_flux(path, model, "int4", seed=seed, rank=rank)
    sync()
    return {"nunchaku_write_s": time.perf_counter() - t0, "nunchaku_file_bytes": path.stat().st_size,
            "nunchaku_rank": rank}


def load_nunchaku(path: Path, cfg: Config, device, inputs: dict, ref, sync):
    """(model, what was measured): ``load_nunchaku_transformer`` exact (int4) or converted (w4a8), and the SQNR of
    one eager step's output against the bf16 model's ``ref``; for w4a8 also against the exact int4 model's output
    (loaded from the same file, run once, freed before the timed steps)."""
    import torch

    from ..storage import SVDQuantTensor, W4A16Tensor
    from .nunchaku import load_nunchaku_transformer
    from .pipelines import sqnr_db

    t0 = time.perf_counter()
    m = load_nunchaku_transformer(path, device=device, precision=None if cfg.weights == "int4" else "w4a8")
    sync()
    info = {"nunchaku_load_s": time.perf_counter() - t0}
    weights = [getattr(mod, "weight", None) for mod in m.modules()]
    n_svdq = sum(isinstance(w, SVDQuantTensor) for w in weights)
    n_w4a16 = sum(isinstance(w, W4A16Tensor) for w in weights)
    info.update(summary=f"{n_svdq} SVDQuant, {n_w4a16} w4a16 (Nunchaku file)", quantized=n_svdq,
                weight_only=n_w4a16)
    with torch.inference_mode():
        out = m(**inputs)[0]
    info["output_sqnr_vs_bf16_db"] = sqnr_db(ref, out)
    if cfg.weights == "w4a8":
        t0 = time.perf_counter()
        exact = load_nunchaku_transformer(path, device=device)
        sync()
        info["nunchaku_int4_load_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            out4 = exact(**inputs)[0]
        del exact
        _free()
        info["output_sqnr_vs_int4_db"] = sqnr_db(out4, out)
        info["output_sqnr_int4_vs_bf16_db"] = sqnr_db(ref, out4)
    return m, info


HEAD_START_MS = 60  # the spin before a head-start step: longer than any configuration's host prologue (fp8: ~20 ms)
HEAD_START_CYCLES = int(HEAD_START_MS * 1e-3 * 2e9)  # torch.cuda._sleep counts cycles: >= 60 ms at <= 2 GHz (Hopper
#                                                  boosts to 1.98)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as one line for a row of the table: its type and the first line of its message."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:limit]}"


def vs_eager(model, inputs: dict, out) -> dict:
    """A compiled row's last output against one eager step of the same model on the same inputs: SQNR (dB; None
    where they are equal) and the largest difference, with the eager output's largest magnitude for scale. Issue
    14's check at the model's size: the quantized step compiled equals it eagerly within bf16 rounding, for which the
    bf16 row's own value (Inductor's fusions reorder bf16 arithmetic) is the yardstick. A failure is recorded, not
    raised: the timing stands without it."""
    import torch

    from .pipelines import sqnr_db

    try:
        got = out.detach().float().clone()  # (under reduce-overhead, a CUDA graph's output: copied before the call)
        ref = model(**inputs)[0].float()
        diff = float((got - ref).abs().max())
        sq = sqnr_db(ref, got)
    except Exception as exc:  # noqa: BLE001
        return dict(vs_eager_error=_one_line(exc))
    return dict(vs_eager_sqnr_db=None if math.isinf(sq) else sq, vs_eager_max_abs=diff,
                vs_eager_ref_max_abs=float(ref.abs().max()), vs_eager_equal=diff == 0.0)


def _profile(step, device, steps: int) -> dict:
    """Device time per step by category (CUDA: kernels; CPU: operators' self time), and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    per: dict[str, float] = {}
    kernels = []
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name] = per.get(e.name, 0.0) + e.device_time_total
                kernels.append((e.time_range.start, e.time_range.end, e.name))
    else:
        for e in prof.key_averages():
            if not e.key.startswith("ProfilerStep"):
                per[e.key] = per.get(e.key, 0.0) + e.self_cpu_time_total
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for name, us in per.items():
        cats[categorize(name)] += us / 1e3 / steps
    top = sorted(per.items(), key=lambda kv: -kv[1])[:15]
    out = {"steps": steps, "source": "CUDA kernels" if cuda else "CPU operators (self time)",
           "ms_per_step": cats, "total_ms_per_step": sum(cats.values()),
           "top": [{"name": n[:200], "category": categorize(n), "ms_per_step": us / 1e3 / steps} for n, us in top]}
    if kernels:
        out.update(_idle(kernels, steps))
        by_cat: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
        for _, _, name in kernels:
            by_cat[categorize(name)] += 1 / steps
        out["kernels_per_step_by_category"] = by_cat
    try:
        out["ops_per_step"] = _op_counts(step, steps, cuda)
    except Exception as exc:  # noqa: BLE001  (the device times stand without it)
        out["ops_per_step_error"] = _one_line(exc)
    return out


def _op_counts(step, steps: int, cuda: bool) -> dict:
    """This package's operator calls per step (``svdquant::*``, as the dispatcher sees them, eager or compiled:
    what a step actually runs, e.g. one ``quantize_act`` per shared input under compile; a CUDA-graph replay
    dispatches none). An op called inside another (eagerly, ``svdquant::linear`` runs ``quantize_act`` and ``gemm``)
    is counted under "<op> (in <caller>)"."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()

    def caller(e) -> str | None:  # the nearest svdquant op around e, if any
        p = e.cpu_parent
        while p is not None and not p.name.startswith("svdquant::"):
            p = p.cpu_parent
        return None if p is None else p.name

    counts: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("svdquant::"):
            outer = caller(e)
            key = e.name if outer is None else f"{e.name} (in {outer})"
            counts[key] = counts.get(key, 0) + 1 / steps
    return dict(sorted(counts.items()))


# The profiler's names for the phases of a compiled call before its first kernel, in order (torch 2.11 / 2.13)
_PHASES = (("guards", "TorchDynamo Cache Lookup"), ("pregraph", "Pregraph bytecode"),
           ("aot_wrapper", "AOTDispatcher Runtime Wrapper Prologue"), ("inductor_call", "## Call CompiledFxGraph"))
_STEP_MARK = "svdquant_bench_step"


def _prologue(step, sync, cuda: bool, steps: int) -> dict:
    """The host's prologue of a synchronized step, phase by phase (torch.profiler, CPU and CUDA activity, ``steps``
    steps, medians): ms from the step's call to the start of Dynamo's cache lookup (guards), to the end of it, to
    the pre-graph bytecode (gathering the graph inputs), to AOTAutograd's runtime wrapper, to Inductor's compiled
    call (then its size asserts) and to the first kernel: its start on the GPU (CUDA), else the first operator
    inside the compiled call (CPU). A phase the step does not have (eager, CUDA-graph replays) is None. The
    profiler records each operator, which slows the host after the first one, not the phases before it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            sync()
            with record_function(_STEP_MARK):
                step()
            sync()
    return _prologue_phases(prof.events(), cuda)


def _prologue_phases(events, cuda: bool) -> dict:
    """``_prologue``'s medians from the profiler's events. The step mark has a CPU event and, with CUDA activity, a
    GPU-side annotation of the same name spanning the step's kernels: only the CPU one starts a step, and only
    kernels, copies and sets (not annotations) count as the first kernel."""
    import torch

    cpu, gpu_type = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = sorted(events, key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in events if e.name == _STEP_MARK and e.device_type == cpu]
    phase_names = {name for _, name in _PHASES} | {_STEP_MARK, "Torch-Compiled Region"}
    rows: dict[str, list] = {}
    for i, t0 in enumerate(starts):
        t1 = starts[i + 1] if i + 1 < len(starts) else float("inf")
        window = [e for e in events if t0 <= e.time_range.start < t1]
        got: dict[str, float] = {}
        for key, name in _PHASES:
            e = next((e for e in window if e.device_type == cpu and e.name.startswith(name)), None)
            if e is not None:
                got[f"to_{key}_ms"] = (e.time_range.start - t0) / 1e3
                if key == "guards":
                    got["to_guards_end_ms"] = (e.time_range.end - t0) / 1e3
        if cuda:
            gpu = [e.time_range.start for e in window if e.device_type == gpu_type
                   and not any(e.name.startswith(n) for n in phase_names)]
        else:
            after = t0 + got.get("to_inductor_call_ms", 0.0) * 1e3
            gpu = [e.time_range.start for e in window if e.time_range.start > after
                   and e.device_type == cpu and not any(e.name.startswith(n) for n in phase_names)]
        if gpu:
            got["to_first_kernel_ms"] = (min(gpu) - t0) / 1e3
        for k, v in got.items():
            rows.setdefault(k, []).append(v)
    keys = ["to_guards_ms", "to_guards_end_ms"] + [f"to_{k}_ms" for k, _ in _PHASES[1:]] + ["to_first_kernel_ms"]
    return {"steps": len(starts), **{k: statistics.median(rows[k]) if k in rows else None for k in keys}}


def _host_profile(step, sync, steps: int) -> dict:
    """Where the host's time to run a step goes (cProfile over ``steps`` steps, each synchronized after its call
    returns, so the GPU's work is not in it): the Python functions and builtins with the most own time, per step.
    A synchronized step's prologue (the host work before its first kernel: guards, unwrapping the weights, input
    checks; under CUDA graphs everything before the replay) is part of these; cProfile roughly doubles Python's
    time, so the ranks count, not the absolute numbers."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        step()
        prof.disable()
        sync()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]
    return {"steps": steps, "ms_per_step": sum(v[2] for v in stats.values()) * 1e3 / steps,
            "top_self": [{"function": name[:160], "file": "" if file == "~" else f"{'/'.join(Path(file).parts[-2:])}:"
                          f"{line}", "calls_per_step": v[1] / steps, "self_ms_per_step": v[2] * 1e3 / steps,
                          "cumulative_ms_per_step": v[3] * 1e3 / steps} for (file, line, name), v in rows]}


def _idle(kernels: list, steps: int) -> dict:
    """Where the GPU waits between kernels: the kernels per step, the span from the first kernel's start to the last
    one's end, and the idle time before each kernel (its start minus the latest end so far), summed per step by the
    name of the kernel that waited (top 10)."""
    kernels.sort()
    idle: dict[str, list] = {}
    last_end = kernels[0][1]
    for start, end, name in kernels[1:]:
        gap = start - last_end
        if gap > 0:
            slot = idle.setdefault(name, [0.0, 0])
            slot[0] += gap
            slot[1] += 1
        last_end = max(last_end, end)
    top = sorted(idle.items(), key=lambda kv: -kv[1][0])[:10]
    return {"kernels_per_step": len(kernels) / steps,
            "span_ms_per_step": (last_end - kernels[0][0]) / 1e3 / steps,
            "idle_ms_per_step": sum(v[0] for v in idle.values()) / 1e3 / steps,
            "idle_top": [{"before": n[:200], "category": categorize(n), "ms_per_step": v[0] / 1e3 / steps,
                          "gaps_per_step": v[1] / steps} for n, v in top]}


def run_one(name: str, *, model: str = "flux-dev", size: int = 1024, batch: int = 1, iters: int = 10,
            warmup: int = 3, profile: bool = False, profile_steps: int = 3, device: str = "cuda",
            text_tokens: int = TEXT_TOKENS, rank: int = RANK, weight_only: str | None = "w4a16",
            seed: int = 0, on_timed=None) -> dict:
    """Measure one configuration in this process (the driver runs each in a fresh one). ``on_timed(result)`` is
    called once the timed steps are done, before profiling (the child saves its result there, so that a profiler
    failure cannot lose the timing)."""
    import torch
    from torch._dynamo.utils import counters

    import svdquant_ops.ops

    cfg = CONFIGS[name]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cfg.compile and not cfg.mode and warmup < 1:
        warmup = 1  # the first call compiles
    if cfg.mode == "reduce-overhead":
        warmup = max(warmup, 3)  # compile (and warm up), record the CUDA graphs, first replay
    res: dict = dict(config=name, label=cfg.label, ok=False, model=model, size=size, batch=batch, iters=iters,
                     warmup=warmup, device=str(dev))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cfg.weights in ("w4a8", "int4"):  # build / load the op library up front (not counted as quantization)
        t0 = time.perf_counter()
        svdquant_ops.ops.load()
        res["ops_load_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    counters.clear()

    t0 = time.perf_counter()
    m = build_model(model, dev, seed)
    sync()
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in m.parameters())
    res["bf16_weight_bytes"] = weight_bytes(m)
    inputs = make_inputs(model, size, batch, text_tokens, dev, seed + 1)
    res["tokens"] = dict(image=inputs["hidden_states"].shape[1], text=text_tokens)

    if cfg.nunchaku:  # bf16 model -> Nunchaku INT4 file -> loaded model; the file is deleted before the timed steps
        with tempfile.TemporaryDirectory(prefix=f"{NUNCHAKU_TMP_PREFIX}{os.getpid()}-") as tmp:
            path = Path(tmp) / f"svdq-int4_r{rank}-bench-{model}.safetensors"
            with torch.inference_mode():
                ref = m(**inputs)[0]  # the bf16 model's eager step: the reference of the output error
            res.update(write_nunchaku(m, path, rank, seed, sync))
            del m
            _free()
            m, info = load_nunchaku(path, cfg, dev, inputs, ref, sync)
            res.update(info)
            del ref
        res["quantize_s"] = None  # the load time is nunchaku_load_s
    else:
        t0 = time.perf_counter()
        res.update(quantize(m, cfg, rank, weight_only))
        sync()
        res["quantize_s"] = time.perf_counter() - t0 if cfg.weights != "bf16" else None
    if cfg.lora_rank:
        res.update(add_lora(m, cfg, dev, seed, sync))
    res["weight_bytes"] = weight_bytes(m)
    if cfg.unwrap:  # after the weight count (the plain parts are the same memory)
        res["unwrapped"] = unwrap(m, cfg)
    if cuda:
        res["resident_bytes"] = torch.cuda.memory_allocated()
        res["peak_quantize_bytes"] = torch.cuda.max_memory_allocated()
    res["inductor"] = inductor_settings()

    if cfg.compile:
        torch._logging.set_logs(recompiles=True)  # a recompile prints its reason (the guard that failed)
    if cfg.dict_tag_guards:  # this process only (one configuration per process)
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    fn = compiled(m, cfg)
    ro = cfg.mode == "reduce-overhead"

    def step():
        if ro:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(**inputs)[0]

    with torch.inference_mode():
        warm_s = []
        for _ in range(warmup):
            t0 = time.perf_counter()
            step()
            sync()
            warm_s.append(time.perf_counter() - t0)
        res["first_call_s"] = warm_s[0] if warm_s else None
        res["warmup_s"] = warm_s
        if cuda:
            res["peak_warmup_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms, wall, host = [], [], []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = step()
                end.record()
                host.append((time.perf_counter() - t0) * 1e3)  # the CPU's time to enqueue the step
                torch.cuda.synchronize()
                ms.append(start.elapsed_time(end))
            else:
                out = step()
                ms.append((time.perf_counter() - t0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            # Back to back, as in a denoising loop: the host prepares step i + 1 while the GPU runs step i, so a
            # per-step host prologue (guards, unwrapping the weights) is hidden unless the host is the bottleneck.
            sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                out = step()
            end.record()
            torch.cuda.synchronize()
            res["ms_pipelined"] = start.elapsed_time(end) / iters
            # One step with a head start: the GPU kept busy by a spin kernel (HEAD_START_MS) while the host runs the
            # step's prologue (guards, gathering the graph inputs, Inductor's asserts; under CUDA graphs everything
            # before the replay), the events after the spin. The step's GPU time alone, so from idle minus this is
            # what the host's work before the first kernel costs a synchronized step (host or GPU: which one).
            head = []
            for _ in range(iters):
                sync()
                torch.cuda._sleep(HEAD_START_CYCLES)
                start.record()
                out = step()
                end.record()
                torch.cuda.synchronize()
                head.append(start.elapsed_time(end))
            res["ms_head_start"] = statistics.median(head)
        res["output_finite"] = bool(torch.isfinite(out).all())
        res["output_shape"] = list(out.shape)
        res["peak_step_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        res["ms_all"] = ms
        res["ms_median"] = statistics.median(ms)
        res["ms_min"] = min(ms)
        res["wall_ms_median"] = statistics.median(wall)
        # Close to ms_median: the step is bound by the host (Python, dispatch, launches), not by the GPU.
        res["host_ms_median"] = statistics.median(host) if host else None
        # Each Dynamo compilation of a frame (the first and every recompile) produces one graph; with
        # fullgraph=True there are no partial graphs, so graphs - 1 is the number of recompiles.
        res["graphs"] = int(counters["stats"]["unique_graphs"])
        res["recompiles"] = max(res["graphs"] - 1, 0) if cfg.compile else None
        res["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        res["graph_breaks"] = int(sum(counters["graph_break"].values()))
        res["ok"] = True
        if on_timed is not None:
            on_timed(res)
        if cfg.compile:  # after the timing is saved (a crash here costs only this check); no step ran since `out`
            res.update(vs_eager(m, inputs, out))
            if on_timed is not None:
                on_timed(res)
        del out
        if profile:
            try:
                res["profile"] = _profile(step, dev, profile_steps)
                res["profile"]["host"] = _host_profile(step, sync, profile_steps)
                res["profile"]["prologue"] = _prologue(step, sync, cuda, profile_steps)
            except Exception as exc:  # noqa: BLE001  (the timing stands without it)
                res["profile_error"] = _one_line(exc)
    return res


# ------------------------------------------------------------------------------------------------------------------
# the driver: one process per configuration
# ------------------------------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> str:
    """``--device``: default cuda when available, else cpu; a clear one-line error (BenchError, a ValueError) for
    a bad name, a missing GPU or another device type. The ``svdquant`` command uses it for every subcommand."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    from ..ops.devices import check_device_arg

    try:
        return str(check_device_arg(name, "--device", hint=" (use --device cpu)"))
    except (TypeError, ValueError) as exc:
        raise BenchError(str(exc)) from None


def validate(args) -> tuple[list[str], str]:
    """(configuration names, device) for ``args``, or BenchError with one line saying what is wrong."""
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        if names == ["all"]:
            names = list(DEFAULT_CUDA)
    else:
        names = list(DEFAULT_CUDA if cuda else DEFAULT_CPU)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise BenchError(f"--configs: unknown configuration {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if len(set(names)) != len(names):
        raise BenchError(f"--configs: a configuration is listed twice: {args.configs}")
    if not cuda:
        need = [n for n in names if CONFIGS[n].cuda_only]
        if need:
            raise BenchError(f"{', '.join(need)} need{'s' if len(need) == 1 else ''} a CUDA GPU (fp8 tensor cores / "
                             f"CUDA graphs / Hopper GEMM schedules) and this run is on {device}; on the CPU use "
                             f"--model tiny --configs {','.join(DEFAULT_CPU)}")
        if args.model != "tiny":
            raise BenchError(f"--model {args.model} needs a CUDA GPU (22 GiB of bf16 weights); on the CPU use "
                             "--model tiny")
    if getattr(args, "out", None) and Path(args.out).exists() and not Path(args.out).is_dir():
        raise BenchError(f"--out {args.out}: exists and is not a directory (the results folder)")
    if args.size <= 0 or args.size % 16:
        raise BenchError(f"--size must be a positive multiple of 16 (pixels; 16 per image token), got {args.size}")
    for flag, value, low in (("--batch", args.batch, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                             ("--text-tokens", args.text_tokens, 1), ("--rank", args.rank, 0)):
        if value < low:
            raise BenchError(f"{flag} must be at least {low}, got {value}")
    nunchaku = [n for n in names if CONFIGS[n].nunchaku]
    if nunchaku and (args.rank <= 0 or args.rank % 16):
        raise BenchError(f"{', '.join(nunchaku)}: --rank must be a positive multiple of 16 for a Nunchaku file "
                         f"(its packing of the low-rank factors), got {args.rank}")
    return names, device


def _child_args(args, name: str, device: str, result_file: str) -> list[str]:
    a = ["--one", name, "--result-file", result_file, "--model", args.model, "--size", str(args.size), "--batch",
         str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup), "--device", device,
         "--text-tokens", str(args.text_tokens), "--rank", str(args.rank), "--weight-only", args.weight_only,
         "--seed", str(args.seed), "--profile-steps", str(args.profile_steps)]
    return a + (["--profile"] if args.profile else ["--no-profile"])


def _child_env(name: str, environ: dict) -> dict:
    """The environment of configuration ``name``'s process: ``environ`` with the package on PYTHONPATH and the op
    library's run-time switches the row sets; a row that leaves one at None gets the library's default, whatever
    ``environ`` says."""
    import svdquant_ops

    root = str(Path(svdquant_ops.__file__).resolve().parents[1])
    env = dict(environ, PYTHONPATH=root + os.pathsep + environ.get("PYTHONPATH", ""))
    for field, var in SWITCHES.items():
        value = getattr(CONFIGS[name], field)
        if value:
            env[var] = value
        else:
            env.pop(var, None)
    if CONFIGS[name].inductor_pdl:  # read when Inductor's config module is imported
        env["TORCHINDUCTOR_ENABLE_PDL"] = "1"
    else:
        env.pop("TORCHINDUCTOR_ENABLE_PDL", None)
    if CONFIGS[name].gemm_schedule:  # read by the op library at load time (which build) and at every GEMM call
        env.update(SVDQUANT_OPS_DIAGNOSTICS="1", SVDQUANT_OPS_GEMM_SCHEDULE=CONFIGS[name].gemm_schedule)
    return env


def _run_child(args, name: str, device: str, timeout: float) -> dict:
    """Run one configuration in a fresh process (its own process group, killed whole on timeout)."""
    env = _child_env(name, dict(os.environ))
    fd, result_file = tempfile.mkstemp(prefix=f"svdq-bench-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "svdquant_ops.integrations.bench", *_child_args(args, name, device, result_file)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException as exc:  # timeout, or Ctrl-C: end the child and whatever it started (compile workers)
        _kill_group(proc)
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        rc = None
    elapsed = time.perf_counter() - t0
    try:
        res = json.loads(Path(result_file).read_text() or "null")
    except (OSError, ValueError):  # killed while writing it
        res = None
    finally:
        Path(result_file).unlink(missing_ok=True)
    _kill_group(proc)  # whatever the child left running (compile workers), if anything
    for left in Path(tempfile.gettempdir()).glob(f"{NUNCHAKU_TMP_PREFIX}{proc.pid}-*"):  # a Nunchaku file (GBs)
        shutil.rmtree(left, ignore_errors=True)  # of a child killed before its own clean-up ran
    if res is not None and res.get("ok"):
        if rc != 0:  # timed, then died or hung (in the profiler, or on the way out): the timing stands
            what = f"timed out after {timeout:g} s" if rc is None else f"process exited with code {rc}"
            if CONFIGS[name].compile and not any(k.startswith("vs_eager") for k in res):
                res["vs_eager_error"] = what + " during the eager check"
            elif args.profile and "profile" not in res and "profile_error" not in res:
                res["profile_error"] = what + " while profiling"
            else:
                res["exit_note"] = what + " after saving its result"
    elif rc is None:
        res = dict(res or {}, config=name, ok=False, error=f"timed out after {timeout:g} s", timed_out=True)
    elif res is None:
        res = dict(config=name, ok=False, error=f"process exited with code {rc} without a result")
    res["process_s"] = elapsed
    res.setdefault("label", CONFIGS[name].label)
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child's process group (it leads its own session: only what it started): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGKILL:
            return


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("torchao", "diffusers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "n/a"
    return out


def _record_module():
    """benchmarks/_record.py of the source tree this package lives in, or None (an installed wheel has none)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_record.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_svdquant_bench_record", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fallback_record(gpu: str) -> dict:
    commit = os.environ.get("SVDQUANT_COMMIT", "").strip()
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=gpu, commit=commit or "unknown",
                dirty=os.environ.get("SVDQUANT_DIRTY", "unknown"),
                source="env SVDQUANT_COMMIT" if commit else "nowhere: no source tree and SVDQUANT_COMMIT unset",
                command="python " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), host=platform.node())


def _fallback_header(rec: dict) -> list[str]:
    return [f"- date: {rec['date']}", f"- {'device' if str(rec['gpu']).startswith('cpu') else 'GPU'}: {rec['gpu']}",
            f"- commit: {rec['commit']} (from {rec['source']})",
            f"- tree dirty: {rec['dirty']}", f"- command: `{rec['command']}`"]


def _gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _gpu_tag(gpu: str) -> str:
    for tag in ("H200", "H100", "B200", "A100", "L40S"):
        if tag in gpu:
            return tag.lower()
    return "cpu" if gpu.startswith("cpu") else "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _fmt(x, spec=".1f", none="-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(meta: dict, rows: list[dict], header_md) -> str:
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
    base = next((r for r in rows if r["config"] == BASELINE and r.get("ok")), None)
    lines = [f"# FLUX.1 transformer step on {meta['gpu']} ({meta['date']})", ""]
    lines += header_md(meta)
    v = meta["versions"]
    each = "each from an idle GPU" if meta["device"].startswith("cuda") else "each timed alone"
    lines += [f"- software: torch {v['torch']} (CUDA {v['cuda']}), torchao {v['torchao']}, diffusers "
              f"{v['diffusers']}, triton {v['triton']}, Python {v['python']}",
              f"- model: {meta['model_desc']}",
              f"- step: one transformer forward at {meta['size']}x{meta['size']} ({meta['image_tokens']} image + "
              f"{meta['text_tokens']} text tokens), batch {meta['batch']}; ms/step = median of {meta['iters']} steps "
              f"after {meta['warmup']} warm-up calls (reduce-overhead: at least 3), {each} (back to back: "
              f"{meta['iters']} steps without synchronizing, as a denoising loop), "
              f"{'CUDA events' if meta['device'].startswith('cuda') else 'perf_counter'}, under "
              "torch.inference_mode(); one process per configuration "
              f"(timeout {meta['timeout']:g} s" + (f", {meta['budget']:g} s for the run)" if meta.get("budget")
                                                     else ")"),
              f"- SVDQuant: quantize_model(precision=..., rank={meta['rank']}, weight_only={meta['weight_only']!r}), "
              "data-free, the model family's default rules; fp8: torchao quantize_(model, "
              "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)) on every "
              "linear; compiled: torch.compile(model, fullgraph=True[, mode=...]), Inductor's default settings; rows "
              "with SVDQuant weights unwrapped: the library's compile recipe, options=compile_options(mode) (its "
              "size asserts off)", ""]
    lines += ["| configuration | ms / step | speed vs bf16 compiled | weights | peak memory (timed steps) | first call "
              "(compile) s | graphs / recompiles | quantize s | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['config']} | - | - | {_fmt_bytes(r.get('weight_bytes'))} | - | - | - | "
                         f"{_fmt(r.get('quantize_s'))} | **{r.get('error', 'failed')}** |")
            continue
        ratio = f"{base['ms_median'] / r['ms_median']:.2f}x" if base else "-"
        graphs = f"{r['graphs']} / {r['recompiles']}" if r.get("recompiles") is not None else "-"
        notes = [r[k] for k in ("summary",) if r.get(k)]
        if r.get("unwrapped"):
            notes.append(f"{r['unwrapped']} weights unwrapped")
        if not r.get("output_finite", True):
            notes.append("output not finite")
        if r.get("cudagraph_skips"):
            notes.append(f"CUDA graphs skipped ({r['cudagraph_skips']})")
        if r.get("graph_breaks"):
            notes.append(f"{r['graph_breaks']} graph breaks")
        if r.get("profile_error"):
            notes.append(f"profile: {r['profile_error']}")
        if r.get("exit_note"):
            notes.append(r["exit_note"])
        if r.get("host_ms_median") is not None:
            notes.append(f"host enqueues a step in {r['host_ms_median']:.1f} ms")
        if r.get("ms_head_start") is not None:
            notes.append(f"with a {HEAD_START_MS:g} ms head start {r['ms_head_start']:.1f} ms/step (host prologue "
                         f"{r['ms_median'] - r['ms_head_start']:.1f} ms)")
        if r.get("ms_pipelined") is not None:
            vs = f", {base['ms_pipelined'] / r['ms_pipelined']:.2f}x" if base and base.get("ms_pipelined") else ""
            notes.append(f"back to back {r['ms_pipelined']:.1f} ms/step{vs}")
        if r.get("lora"):
            lo = r["lora"]
            notes.append(f"rank-{lo['rank']} LoRA on {lo['targets']} linears: {lo['fused']} fused, {lo['side']} "
                         "side branches")
        if r.get("output_sqnr_vs_bf16_db") is not None:
            sq = f"output SQNR vs bf16 {_fmt(r['output_sqnr_vs_bf16_db'])} dB"
            if r.get("output_sqnr_vs_int4_db") is not None:
                sq += f", vs exact int4 {_fmt(r['output_sqnr_vs_int4_db'])} dB"
            notes.append(sq)
        lines.append(f"| {r['config']} | {r['ms_median']:.1f} | {ratio} | {_fmt_bytes(r['weight_bytes'])} | "
                     f"{_fmt_bytes(r.get('peak_step_bytes'))} | {_fmt(r.get('first_call_s'))} | {graphs} | "
                     f"{_fmt(r.get('quantize_s'), '.2f')} | {'; '.join(notes)} |")
    if not base:
        lines += ["", f"(no {BASELINE} row in this run: no ratios)"]
    by_name = {r["config"]: r for r in rows if r.get("ok")}

    def versus(name: str, r: dict) -> str:  # speed of r against the row `name` of this run
        other = by_name.get(name)
        return f"{other['ms_median'] / r['ms_median']:.2f}x ({name})" if other else f"- (no {name} row)"

    lora = [r for r in rows if r.get("ok") and r.get("lora")]
    if lora:
        lines += ["", "## LoRA rows", "", "A seeded random LoRA (diffusers / PEFT keys, A ~ N(0, 1/K), B ~ N(0, "
                  f"{LORA_B_STD:g}²), bf16) on every linear FLUX LoRAs target (double blocks: attention q/k/v/out, "
                  "context q/k/v/out, both MLPs; single blocks: q/k/v, proj_mlp, proj_out), loaded after quantizing "
                  "with `load_lora(model, sd, \"bench\", scale=1.0)` (defaults: fused into the SVDQuant branch up to "
                  "rank 64, a side branch past it). Speed relative to the same configuration without the LoRA "
                  "(> 1: faster).", "",
                  "| configuration | LoRA | linears fused / side branch | parameters | weight bytes added | load s | "
                  "ms / step | vs without LoRA |", "|---|---|---|---|---|---|---|---|"]
        for r in lora:
            lo = r["lora"]
            what = f"rank {lo['rank']}" + (", one A per block input" if lo.get("shared_a") else "")
            lines.append(f"| {r['config']} | {what} | {lo['fused']} / {lo['side']} | {lo['params'] / 1e6:.2f} M | "
                         f"{_fmt_bytes(lo['bytes_added'])} | {lo['load_s']:.2f} | {r['ms_median']:.1f} | "
                         f"{versus(r['config'].split('-lora')[0], r)} |")
    nun = [r for r in rows if r.get("ok") and r.get("nunchaku_file_bytes") is not None]
    if nun:
        lines += ["", "## Nunchaku INT4 file rows", "", "The bf16 model written as a Nunchaku v1 INT4 file "
                  "(`write_nunchaku_flux`: data-free SVDQuant in Nunchaku's conventions, rank "
                  f"{nun[0].get('nunchaku_rank')}, λ random in [0.5, 2)) to a temporary file, the bf16 model freed, "
                  "the file loaded with `load_nunchaku_transformer(path, precision=None | \"w4a8\")` and deleted. "
                  "Output SQNR (10·log10(Σ ref² / Σ (out − ref)²)) of one eager step on the benchmark inputs; "
                  "speed relative to quantize_model's row of the same precision (> 1: faster).", "",
                  "| configuration | file | written in s | loaded in s | ms / step | vs quantize_model | SQNR vs bf16 "
                  "dB | SQNR vs exact int4 dB | exact int4 vs bf16 dB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in nun:
            int4_vs_bf16 = r.get("output_sqnr_int4_vs_bf16_db")
            if int4_vs_bf16 is None and r["config"].startswith("nunchaku-int4"):
                int4_vs_bf16 = r.get("output_sqnr_vs_bf16_db")
            lines.append(f"| {r['config']} | {_fmt_bytes(r['nunchaku_file_bytes'])} | "
                         f"{_fmt(r.get('nunchaku_write_s'))} | {_fmt(r.get('nunchaku_load_s'))} | "
                         f"{r['ms_median']:.1f} | {versus(r['config'].removeprefix('nunchaku-'), r)} | "
                         f"{_fmt(r.get('output_sqnr_vs_bf16_db'))} | {_fmt(r.get('output_sqnr_vs_int4_db'))} | "
                         f"{_fmt(int4_vs_bf16)} |")
    eager = [r for r in rows if r.get("ok") and ("vs_eager_max_abs" in r or "vs_eager_error" in r)]
    if eager:
        lines += ["", "## Compiled step against the eager step", "", "Each compiled row's output against one eager step "
                  "of the same model on the same inputs (SQNR = 10·log10(Σ eager² / Σ (compiled − eager)²)); the bf16 "
                  "row's value is what Inductor's reordering of bf16 arithmetic alone gives.", "",
                  "| configuration | SQNR dB | max abs difference | max abs eager output |", "|---|---|---|---|"]
        for r in eager:
            if "vs_eager_error" in r:
                lines.append(f"| {r['config']} | - | - | **{r['vs_eager_error']}** |")
                continue
            sq = "equal" if r["vs_eager_equal"] else _fmt(r["vs_eager_sqnr_db"])
            lines.append(f"| {r['config']} | {sq} | {r['vs_eager_max_abs']:.3g} | {r['vs_eager_ref_max_abs']:.3g} |")
    fp8 = next((r.get("fp8_kernels") for r in rows if r.get("fp8_kernels")), None)
    if fp8:
        lines += ["", f"fp8 kernels: {fp8}."]
    prof = [r for r in rows if r.get("ok") and r.get("profile")]
    if prof:
        src = prof[0]["profile"]
        lines += ["", f"## Device time per step ({src['source']}, torch.profiler over {src['steps']} steps, ms)", "",
                  "| configuration | " + " | ".join(CATEGORY_TITLES[c] for c in CATEGORIES) + " | total |",
                  "|---" * (len(CATEGORIES) + 2) + "|"]
        for r in prof:
            p = r["profile"]
            lines.append(f"| {r['config']} | " + " | ".join(f"{p['ms_per_step'][c]:.1f}" for c in CATEGORIES)
                         + f" | {p['total_ms_per_step']:.1f} |")
        lines += ["", "fp8's activation quantization is ATen ops that Inductor fuses with their neighbours: it is in "
                  "'other'. The top kernels of each configuration are in the JSON file (profile.top)."]
        idle = [r for r in prof if r["profile"].get("kernels_per_step")]
        if idle:
            lines += ["", "GPU idle between kernels (profiled steps; the kernels that waited longest are in "
                      "profile.idle_top):", "", "| configuration | kernels / step | first start to last end, ms / step "
                      "| idle, ms / step |", "|---|---|---|---|"]
            lines += [f"| {r['config']} | {r['profile']['kernels_per_step']:.0f} | "
                      f"{r['profile']['span_ms_per_step']:.1f} | {r['profile']['idle_ms_per_step']:.1f} |"
                      for r in idle]
        calls = [r for r in prof if "ops_per_step" in r["profile"]]
        if calls:
            lines += ["", "Calls per step: this package's operators as the dispatcher saw them (a CUDA-graph replay "
                      "dispatches none) and, on a GPU, kernels by category (profile.ops_per_step, "
                      "profile.kernels_per_step_by_category):", "",
                      "| configuration | svdquant ops per step | kernels per step by category |", "|---|---|---|"]
            for r in calls:
                p = r["profile"]
                ops_ = ", ".join(f"{k.removeprefix('svdquant::')} {v:g}" for k, v in p["ops_per_step"].items()) or "-"
                kc = p.get("kernels_per_step_by_category")
                kern = ", ".join(f"{c} {kc[c]:g}" for c in CATEGORIES if kc[c]) if kc else "-"
                lines.append(f"| {r['config']} | {ops_} | {kern} |")
        host = [r for r in prof if r["profile"].get("host")]
        if host:
            lines += ["", "Host time of a step by function (cProfile, each step synchronized after its call; "
                      "cProfile slows Python about 2x: compare ranks, not ms; all 25 in profile.host.top_self):", "",
                      "| configuration | host ms / step under cProfile | top 5 by own time (ms / step) |",
                      "|---|---|---|"]
            for r in host:
                h = r["profile"]["host"]
                top = "; ".join(f"{t['function']} {t['self_ms_per_step']:.1f}" for t in h["top_self"][:5])
                lines.append(f"| {r['config']} | {h['ms_per_step']:.1f} | {top} |")
        pro = [r for r in prof if r["profile"].get("prologue")]
        if pro:
            cols = [("to_guards_ms", "guards start"), ("to_guards_end_ms", "guards end"),
                    ("to_pregraph_ms", "graph inputs gathered from"), ("to_aot_wrapper_ms", "AOTAutograd wrapper"),
                    ("to_inductor_call_ms", "Inductor's call"), ("to_first_kernel_ms", "first kernel")]
            lines += ["", "Host prologue of a synchronized step: ms from the call to each phase's start (torch.profiler, "
                      "CPU and CUDA activity, median of the profiled steps; first kernel: its start on the GPU, on a CPU "
                      "the first operator; - : no such phase):", "", "| configuration | " + " | ".join(c for _, c in cols) + " |",
                      "|---|" + "---|" * len(cols)]
            for r in pro:
                g = r["profile"]["prologue"]
                lines.append(f"| {r['config']} | " + " | ".join("-" if g.get(k) is None else f"{g[k]:.2f}"
                                                               for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """The driver: validate, run each configuration in its own process, write and print the table."""
    names, device = validate(args)
    mod = _record_module()
    gpu = _gpu_name(device)
    meta = dict(mod.record(gpu) if mod else _fallback_record(gpu))
    header_md = mod.header_md if mod else _fallback_header
    if args.model == "flux-dev":
        arch, n_params = "diffusers' default FluxTransformer2DModel() config", "11.9 B parameters"
    else:
        arch = "FluxTransformer2DModel(" + ", ".join(f"{k}={v}" for k, v in MODELS[args.model].items()) + ")"
        n_params = "tiny: 2 double + 2 single blocks, width 128"
    meta.update(versions=_versions(), device=device, model=args.model, size=args.size, batch=args.batch,
                iters=args.iters, warmup=args.warmup, text_tokens=args.text_tokens, rank=args.rank,
                weight_only=None if args.weight_only == "none" else args.weight_only, timeout=args.timeout,
                budget=args.budget,
                image_tokens=(args.size // 16) ** 2, configs=names,
                model_desc=f"FLUX.1-dev architecture ({arch}, {n_params}), seeded random weights, bf16, built on "
                           "the device")
    out = Path(args.out) if args.out else None
    stem = f"{meta['date'][:10]}-{_gpu_tag(gpu)}-flux{'-tiny' if args.model == 'tiny' else ''}-{args.size}px-" \
           f"b{args.batch}{'-' + args.tag if args.tag else ''}"
    print(f"svdquant bench: {len(names)} configurations on {gpu}: {', '.join(names)}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        left = args.budget - (time.perf_counter() - start) if args.budget else None
        if left is not None and left < 30:
            rows.append(dict(config=name, label=CONFIGS[name].label, ok=False,
                             error=f"skipped: time budget of {args.budget:.0f} s used up"))
            continue
        timeout = min(args.timeout, round(left - 10)) if left is not None else args.timeout
        print(f"--- {name} (timeout {timeout:.0f} s)", flush=True)
        r = _run_child(args, name, device, timeout)
        rows.append(r)
        print(f"--- {name}: " + (f"{r['ms_median']:.2f} ms/step, first call {_fmt(r.get('first_call_s'))} s, "
                                 f"{r['process_s']:.0f} s in all" if r.get("ok") else r.get("error", "failed")),
              flush=True)
        md = report(meta, rows, header_md)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.md").write_text(md)
            (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    md = report(meta, rows, header_md)
    print(md)
    if out is not None:
        print(f"wrote {out / stem}.md/.json (commit {meta['commit']}, dirty: {meta['dirty']})")
    return 0 if all(r.get("ok") for r in rows) else 1


def run_child(args) -> int:
    """``--one NAME``: measure one configuration, print one BENCH_RESULT line, write it to --result-file."""

    def save(res: dict) -> None:
        if args.result_file:
            Path(args.result_file).write_text(json.dumps(res, default=str))

    try:
        _, device = validate(args)
        res = run_one(args.one, model=args.model, size=args.size, batch=args.batch, iters=args.iters,
                      warmup=args.warmup, profile=args.profile, profile_steps=args.profile_steps, device=device,
                      text_tokens=args.text_tokens, rank=args.rank,
                      weight_only=None if args.weight_only == "none" else args.weight_only, seed=args.seed,
                      on_timed=save)
    except Exception as exc:  # noqa: BLE001  (the row says what failed; the driver goes on)
        import traceback

        traceback.print_exc()
        res = dict(config=args.one, ok=False, error=_one_line(exc, 300))
    save(res)
    print(RESULT_PREFIX + json.dumps(res, default=str), flush=True)
    return 0 if res.get("ok") else 1


# ------------------------------------------------------------------------------------------------------------------
# command line (shared by `svdquant bench` and benchmarks/bench_flux.py)
# ------------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--configs", help="comma-separated configurations (default on a GPU: " + ",".join(DEFAULT_CUDA)
                   + "; on the CPU: " + ",".join(DEFAULT_CPU) + "); also: " + ", ".join(
                       n for n in CONFIGS if n not in DEFAULT_CUDA))
    p.add_argument("--model", default="flux-dev", choices=list(MODELS),
                   help="flux-dev (FLUX.1-dev architecture, default) or tiny (four blocks, for CPU runs)")
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (1024: 4096 image tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first, the compiling call included")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                   help="device time per step by kernel category (torch.profiler over --profile-steps steps)")
    p.add_argument("--profile-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="folder for <date>-<gpu>-flux-<size>px-b<batch>.md/.json (default: print only)")
    p.add_argument("--tag", help="suffix of the output files' names (several runs into one folder)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration's process (300)")
    p.add_argument("--budget", type=float, help="seconds for the whole run: later configurations get what is left "
                   "and are skipped (recorded) when it is spent")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="T5 tokens per sample (512)")
    p.add_argument("--rank", type=int, default=RANK, help="SVDQuant low-rank branch (32)")
    p.add_argument("--weight-only", default="w4a16", choices=("w4a16", "none"),
                   help="SVDQuant configurations: AdaLN modulation linears in w4a16 (default) or kept 16-bit")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # child mode: one configuration
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "bench") -> int:
    p = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    if args.one:
        return run_child(args)
    try:
        return run(args)
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    if "--one" in sys.argv:  # a child: its result is saved; skip the interpreter's teardown (it can hang)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
