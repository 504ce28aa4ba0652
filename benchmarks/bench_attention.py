#!/usr/bin/env python3
"""8-bit attention candidates against bf16 SDPA at the FLUX.1 attention shapes (issue 14, item 6; Hopper).

    python benchmarks/bench_attention.py [--out DIR] [--seqs 1536,4608,16896]
                                         [--cases randn,rmsnorm,rmsnorm@2] [--replays N] [--rows N]
                                         [--compile-check]

Needs a CUDA GPU (the fp8 candidates need sm_90); not the op library. benchmarks/fp8-attention.md says how to carry
the candidates to an offline GPU machine.

Shapes: batch 1, 24 heads, head dim 128, bf16, sequence S = text 512 + image 1024 / 4096 / 16384 tokens
(512 / 1024 / 2048 px); q, k, v laid out (B, S, H, D) as diffusers' FLUX processor holds them. Cases:
  randn    q, k, v ~ N(0, 1) (rms 1 per element, what FLUX's RMSNorm gives q and k; diffuse attention)
  rmsnorm  each of q, k, v a linear-layer-like output (per-channel scales, 4 channels per head 8x larger, a per-head
           offset shared by all tokens); q and k then RMS-normalized per head vector (rms 1), as FLUX's norm_q /
           norm_k without their learned weights; v not normalized
  rmsnorm@G  the same with q and k multiplied by G after the norm (standing in for the learned norm weights):
           G = 2 makes the attention sharp (~20 effective keys per query instead of ~2000)
Methods (each skipped with a one-line reason when its package is missing or the call fails):
  sdpa-bf16          F.scaled_dot_product_attention, default backend choice: the baseline (the model's attention)
  sdpa-bf16-cudnn    the same forced to SDPBackend.CUDNN_ATTENTION; sdpa-bf16-flash: to FLASH_ATTENTION
  fa3-bf16           FlashAttention-3 (module flash_attn_interface, package flash-attn-3) in bf16
  fa3-fp8            e4m3 q, k, v with per-head scales (amax, scale, cast as torch ops compiled by Inductor, as in
                     a compiled model; timed) + FA3's fp8 forward
  fa3-fp8-kernel     the same with the inputs quantized once beforehand: the kernel alone
  sage               sageattention.sageattn (SageAttention2 on sm_90: int8 q, k per thread group, k mean-smoothed,
                     fp8 P and V, fp32 two-level accumulation; its quantization kernels are timed)
  sage-per-warp      sageattn_qk_int8_pv_fp8_cuda_sm90 with qk_quant_gran="per_warp"
  cudnn-fp8          cuDNN's fp8 SDPA through the cudnn-frontend Python graph API: per-tensor scales (quantized as
                     for fa3-fp8), P scaled by 256, bf16 output; cudnn-fp8-kernel: the kernel alone;
  cudnn-fp8-o8       the same with an e4m3 output in v's scale, cast back to bf16 (timed; Hopper's cuDNN 9.19 has
                     no plan with a bf16 output); cudnn-fp8-o8-kernel: the kernel and the cast alone
  ref-fp8qkv         q, k, v rounded to e4m3 per head, then bf16 SDPA: the cost of rounding the inputs alone
  emul-fp8qkvp       fp32 emulation of an fp8 kernel: ref-fp8qkv's inputs and P rounded to e4m3 after scaling by
                     256 (as FA3's Max_offset = 8); what an exact fp8 kernel's error would be
  emul-int8qk-fp8pv  fp32 emulation of SageAttention2's format: int8 q per 16 rows and k per 128 rows of each head
                     (k mean-smoothed), V e4m3 per channel, P e4m3 scaled by 448
The ref- and emul- rows are not timed.

Errors: on --rows query rows spread evenly over the sequence (all heads, all keys): relative Frobenius error and
SQNR (-20 log10 of it) against the bf16 SDPA output, and SQNR against an fp32 reference (fp32 math from the same bf16
inputs, TF32 off); all in fp32.
Timing: the call (quantization included unless -kernel) captured back-to-back in one CUDA graph after warm-up; the
median over --replays replays of (replay time / calls). A call that cannot be captured is timed eagerly between
CUDA events over the same number of back-to-back calls ("eager" in the table). "FLUX step" = 57 x (sdpa-bf16 time
- this time): ms per transformer step if all 57 attention calls of a step at that resolution used this method.
--compile-check: each method's call (quantization included) under torch.compile(fullgraph=True), plain and with
mode="reduce-overhead" (CUDA graphs), at the middle sequence length: works or the first line of the error, and the
compiled output's SQNR against the eager one.
--out DIR writes <date>-<gpu>-attention.md / .json there, each starting with the run's record (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import _record  # benchmarks/_record.py (this script's folder is first on sys.path)

B, H, D = 1, 24, 128
SEQS = [512 + 1024, 512 + 4096, 512 + 16384]
CALLS_PER_STEP = 57  # FLUX.1: 19 double + 38 single blocks, one attention each
E4M3_MAX = 448.0
P_SCALE_FA3 = 256.0  # FA3 scales P by 2^Max_offset (8 for fp8) before the e4m3 cast
P_SCALE_SAGE = 448.0


def log(*a):
    print(*a, flush=True)


class Skip(Exception):
    """A method that cannot run here; the message is the one-line reason."""


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# ---------------------------------------------------------------------------------------------------------- inputs
def make_inputs(case: str, S: int, seed: int, dev, heads: int = H):
    """q, k, v (1, S, heads, D) bf16 contiguous for one case (module docstring)."""
    case, _, gain = case.partition("@")
    qk_gain = float(gain) if gain else 1.0
    g = torch.Generator(dev).manual_seed(seed)
    shape = (B, S, heads, D)
    if case == "randn":
        q, k, v = (torch.randn(shape, generator=g, device=dev) for _ in range(3))
    elif case == "rmsnorm":
        def proj():
            scale = torch.exp(0.5 * torch.randn(heads, D, generator=g, device=dev))
            big = torch.randint(0, D, (heads, 4), generator=g, device=dev)
            scale = scale * torch.ones_like(scale).scatter_(1, big, 8.0)
            offset = 0.5 * torch.randn(heads, D, generator=g, device=dev)
            return torch.randn(shape, generator=g, device=dev) * scale + offset

        def rms_norm(x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * qk_gain

        q, k, v = rms_norm(proj()), rms_norm(proj()), proj()
    else:
        raise ValueError(f"unknown case {case!r} (randn, rmsnorm, rmsnorm@G)")
    return [t.to(torch.bfloat16).contiguous() for t in (q, k, v)]


# ------------------------------------------------------------------------------------------ quantization (torch ops)
def quant_e4m3(x: torch.Tensor, per_head: bool = True):
    """x (B, S, H, D) -> (e4m3 codes, same layout; descale float32 (B, H) per head, or (1, 1, 1, 1) per tensor)."""
    if per_head:
        amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)  # (B, H)
        scale = (E4M3_MAX / amax)[:, None, :, None]
        descale = (amax / E4M3_MAX).contiguous()
    else:
        amax = x.abs().amax().float().clamp_min(1e-12)
        scale = E4M3_MAX / amax
        descale = (amax / E4M3_MAX).reshape(1, 1, 1, 1)
    x8 = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, descale


_QUANT: dict = {}
QUANT_MODE = {"mode": "inductor"}  # becomes "eager (...)" if Inductor cannot compile the quantization


def _quant_qkv_eager(q, k, v, per_head):
    return [t for x in (q, k, v) for t in quant_e4m3(x, per_head)]


def quant_qkv(q, k, v, per_head: bool = True):
    """[q8, q_descale, k8, k_descale, v8, v_descale]: quant_e4m3 of each, compiled by Inductor (one fused reduction
    and one fused cast per tensor, what a compiled model would run) unless that fails."""
    if QUANT_MODE["mode"] == "inductor":
        if per_head not in _QUANT:
            _QUANT[per_head] = torch.compile(_quant_qkv_eager, fullgraph=True, dynamic=False)
        try:
            return _QUANT[per_head](q, k, v, per_head)
        except Exception as e:  # noqa: BLE001
            QUANT_MODE["mode"] = f"eager (Inductor failed: {first_line(e)})"
            log("quantization:", QUANT_MODE["mode"])
    return _quant_qkv_eager(q, k, v, per_head)


def dequant_e4m3(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return x8.float() * (descale[:, None, :, None] if descale.dim() == 2 else descale)


def round_p(p: torch.Tensor, scale: float) -> torch.Tensor:
    return (p * scale).to(torch.float8_e4m3fn).float() / scale


def quant_int8_groups(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Round x (B, S, H, D) fp32 to int8 levels with one scale per `rows` consecutive tokens of each head (fp32 out)."""
    Bx, S, Hx, Dx = x.shape
    pad = (-S) % rows
    xp = F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(Bx, (S + pad) // rows, rows, Hx, Dx)
    s = xp.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-12) / 127.0
    return (torch.round(xp / s).clamp(-127, 127) * s).reshape(Bx, S + pad, Hx, Dx)[:, :S]


def attention_rows(q, k, v, rows, sm_scale, p_scale=None):
    """fp32 attention of the query rows `rows` (all keys): q, k, v (B, S, H, D) fp32 -> (B, len(rows), H, D).
    p_scale: round P = exp(s - rowmax) to e4m3 after multiplying by p_scale (the row sum stays exact, as in FA3)."""
    qr = q[:, rows].permute(0, 2, 1, 3)
    s = torch.matmul(qr, k.permute(0, 2, 3, 1)) * sm_scale  # (B, H, n, S)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    if p_scale is not None:
        p = round_p(p, p_scale)
    return (torch.matmul(p, v.permute(0, 2, 1, 3)) / denom).permute(0, 2, 1, 3)


def emulate(kind, q, k, v, rows, sm_scale):
    """The fp32 emulations of the module docstring (q, k, v bf16 (B, S, H, D)); kind None = the fp32 reference."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if kind is None:
        return attention_rows(qf, kf, vf, rows, sm_scale)
    if kind == "fp8qkvp":
        qd, kd, vd = (dequant_e4m3(*quant_e4m3(t)) for t in (q, k, v))
        return attention_rows(qd, kd, vd, rows, sm_scale, p_scale=P_SCALE_FA3)
    if kind == "int8qk-fp8pv":
        qd = quant_int8_groups(qf, 16)
        kd = quant_int8_groups(kf - kf.mean(dim=1, keepdim=True), 128)
        vs = vf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX  # per (head, channel)
        vd = (vf / vs).to(torch.float8_e4m3fn).float() * vs
        return attention_rows(qd, kd, vd, rows, sm_scale, p_scale=P_SCALE_SAGE)
    raise ValueError(kind)


def errors(out_rows: torch.Tensor, bf16_rows: torch.Tensor, ref_rows: torch.Tensor) -> dict:
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def db(e):
        return -20 * math.log10(e) if e > 0 else float("inf")

    e_bf, e_ref = rel(out_rows, bf16_rows), rel(out_rows, ref_rows)
    return dict(rel_err_vs_bf16=e_bf, sqnr_vs_bf16_db=db(e_bf), sqnr_vs_fp32_db=db(e_ref))


# ----------------------------------------------------------------------------------------------------- candidates
# Each builder takes q, k, v (B, S, H, D) bf16 and the softmax scale and returns f(q, k, v) -> (B, S, H, D) output, or
# raises Skip. kernel-only builders quantize the given inputs once and ignore f's arguments.
def _sdpa(backend_name):
    def build(q, k, v, sm_scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name) if backend_name else None

        def f(q, k, v):
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if backend is None:
                return F.scaled_dot_product_attention(*args, scale=sm_scale).transpose(1, 2)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*args, scale=sm_scale).transpose(1, 2)
        return f
    return build


def _import_fa3():
    if torch.cuda.get_device_capability()[0] != 9:
        raise Skip("FA3 needs sm_90")
    for name in ("flash_attn_interface", "flash_attn_3.flash_attn_interface"):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            err = e
    raise Skip(f"flash_attn_interface not importable ({first_line(err)}); package flash-attn-3, hopper/ build")


def _fa3(fp8: bool, kernel_only: bool = False):
    def build(q, k, v, sm_scale):
        fa3 = _import_fa3()

        def call(q, k, v, **kw):
            out = fa3.flash_attn_func(q, k, v, softmax_scale=sm_scale, causal=False, **kw)
            return out[0] if isinstance(out, tuple) else out

        if not fp8:
            return call
        if kernel_only:
            (q8, dq), (k8, dk), (v8, dv) = (quant_e4m3(t) for t in (q, k, v))
            return lambda *_: call(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)

        def f(q, k, v):
            q8, dq, k8, dk, v8, dv = quant_qkv(q, k, v)
            return call(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
        return f
    return build


def _sage(per_warp: bool):
    def build(q, k, v, sm_scale):
        try:
            import sageattention as sa
        except ImportError as e:
            raise Skip(f"sageattention not importable ({first_line(e)}); v2 is a source build (thu-ml/SageAttention)")
        if per_warp:
            if not hasattr(sa, "sageattn_qk_int8_pv_fp8_cuda_sm90"):
                raise Skip(f"sageattention {_version('sageattention')} has no sm90 kernel (v1 on PyPI is Triton only)")
            return lambda q, k, v: sa.sageattn_qk_int8_pv_fp8_cuda_sm90(
                q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=sm_scale, qk_quant_gran="per_warp")
        return lambda q, k, v: sa.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=sm_scale)
    return build


def _cudnn_fp8(kernel_only: bool = False, out_fp8: bool = False):
    """cuDNN fp8 SDPA forward (cudnn-frontend graph API), dims (B, H, S, D) over (B, S, H, D) memory, bf16 output;
    out_fp8: e4m3 output in v's scale (scale_o = 1 / v's descale: O is a convex combination of v's rows, so it fits),
    cast back to bf16 by a torch op after the call (cuDNN 9.19 builds no Hopper plan with a bf16 output)."""
    def build(q, k, v, sm_scale):
        if torch.cuda.get_device_capability()[0] < 9:
            raise Skip("cuDNN fp8 SDPA needs sm_90+")
        try:
            import cudnn
        except ImportError as e:
            raise Skip(f"cudnn (nvidia-cudnn-frontend) not importable ({first_line(e)})")
        Bq, S, Hq, Dq = q.shape
        dim, stride = (Bq, Hq, S, Dq), (S * Hq * Dq, Dq, Hq * Dq, 1)
        dt, f32 = cudnn.data_type, cudnn.data_type.FLOAT

        def graph(no_stats):
            g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=f32, compute_data_type=f32)
            Q, K, V = (g.tensor(name=n, dim=dim, stride=stride, data_type=dt.FP8_E4M3) for n in "qkv")
            sc = {n: g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
                  for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
            o, _stats, amax_s, amax_o = g.sdpa_fp8(q=Q, k=K, v=V, **sc, **no_stats, attn_scale=sm_scale)
            o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(dt.FP8_E4M3 if out_fp8 else dt.BFLOAT16)
            for t in (amax_s, amax_o):
                t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            return g, Q, K, V, sc, o, amax_s, amax_o

        err = None
        for no_stats in (dict(generate_stats=False), dict(is_inference=True)):  # newer / older frontend spelling
            try:
                g, Q, K, V, sc, o, amax_s, amax_o = graph(no_stats)
                break
            except Exception as e:  # noqa: BLE001 (unsupported graph, old cuDNN, API change)
                err = err or e
        else:
            raise Skip(f"cuDNN fp8 graph not built: {first_line(err)} (cuDNN {torch.backends.cudnn.version()}, "
                       f"frontend {_version('nvidia-cudnn-frontend')})")
        handle = cudnn.create_handle()
        out = torch.empty(q.shape, dtype=torch.float8_e4m3fn if out_fp8 else q.dtype, device=q.device)
        ws = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=q.device)
        one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        fixed = {sc["descale_s"]: one / P_SCALE_FA3, sc["scale_s"]: one * P_SCALE_FA3,
                 amax_s: torch.zeros_like(one), amax_o: torch.zeros_like(one)}
        scale_o = torch.empty_like(one)

        def run(q8, k8, v8, dq, dk, dv):
            cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
            if out_fp8:
                torch.reciprocal(dv, out=scale_o)
            else:
                scale_o.fill_(1.0)
            g.execute({Q: q8, K: k8, V: v8, sc["descale_q"]: dq, sc["descale_k"]: dk, sc["descale_v"]: dv, o: out,
                       sc["scale_o"]: scale_o, **fixed}, ws, handle=handle)
            return (out.float() * dv).to(q.dtype) if out_fp8 else out

        if kernel_only:
            (q8, dq), (k8, dk), (v8, dv) = (quant_e4m3(t, per_head=False) for t in (q, k, v))
            return lambda *_: run(q8, k8, v8, dq, dk, dv)

        def f(q, k, v):
            q8, dq, k8, dk, v8, dv = quant_qkv(q, k, v, per_head=False)
            return run(q8, k8, v8, dq, dk, dv)
        return f
    return build


def _ref_fp8qkv(q, k, v, sm_scale):
    sdpa = _sdpa(None)(q, k, v, sm_scale)
    return lambda q, k, v: sdpa(*(dequant_e4m3(*quant_e4m3(t)).to(torch.bfloat16) for t in (q, k, v)))


# name, builder, timed, compile-checked (emul- rows are computed separately)
METHODS = [
    ("sdpa-bf16", _sdpa(None), True, True),
    ("sdpa-bf16-cudnn", _sdpa("CUDNN_ATTENTION"), True, False),
    ("sdpa-bf16-flash", _sdpa("FLASH_ATTENTION"), True, False),
    ("fa3-bf16", _fa3(False), True, True),
    ("fa3-fp8", _fa3(True), True, True),
    ("fa3-fp8-kernel", _fa3(True, kernel_only=True), True, False),
    ("sage", _sage(False), True, True),
    ("sage-per-warp", _sage(True), True, True),
    ("cudnn-fp8", _cudnn_fp8(), True, True),
    ("cudnn-fp8-kernel", _cudnn_fp8(kernel_only=True), True, False),
    ("cudnn-fp8-o8", _cudnn_fp8(out_fp8=True), True, True),
    ("cudnn-fp8-o8-kernel", _cudnn_fp8(kernel_only=True, out_fp8=True), True, False),
    ("ref-fp8qkv", _ref_fp8qkv, False, False),
]
EMULATIONS = [("emul-fp8qkvp", "fp8qkvp"), ("emul-int8qk-fp8pv", "int8qk-fp8pv")]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------- timing
def time_call(fn, calls: int, replays: int) -> tuple[float, str]:
    """Median ms per call of fn(): a CUDA graph of `calls` back-to-back calls, replayed; eager events if the capture
    fails."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (autotuning, plan caches, lazy loads) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, mode = graph.replay, "graph"
        run()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (not capturable: time it eagerly)
        log(f"  CUDA graph capture failed, timing eagerly: {first_line(e)}")
        torch.cuda.synchronize()
        graph = None

        def run():
            for _ in range(calls):
                fn()
        mode = "eager"
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times), mode


def default_kernel(fn) -> str:
    """Name of the longest kernel one call of fn launches (which backend the default SDPA picked)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        return max(evs, key=lambda e: e.device_time_total).key[:120] if evs else "?"
    except Exception as e:  # noqa: BLE001 (informational only)
        return f"? ({first_line(e)})"


# ------------------------------------------------------------------------------------------------------------ run
def run_case(case, S, args, dev, skipped, gone, meta):
    """The rows of one (case, S). A method that raised Skip is in `gone` (not tried again); a call that failed is
    reported in `skipped` under its (case, S)."""
    sm_scale = D ** -0.5
    q, k, v = make_inputs(case, S, seed=1000 + S, dev=dev)
    rows = torch.linspace(0, S - 1, min(args.rows, S), device=dev).round().long().unique()
    ref = emulate(None, q, k, v, rows, sm_scale)
    flops = 4.0 * B * H * S * S * D
    calls = max(2, min(20, round(3e-3 / (flops / 600e12))))  # ~3 ms per replay at 600 TFLOP/s
    rows_out, t_base, bf16_rows = [], None, None
    for name, build, timed, _ in METHODS:
        if name in gone:
            continue
        try:
            f = build(q, k, v, sm_scale)
            out = f(q, k, v)[:, rows].clone()
            torch.cuda.synchronize()
        except Skip as e:
            gone.add(name)
            skipped[name] = str(e)
            log(f"skip {name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            if bf16_rows is None:  # the baseline must run
                raise
            skipped[f"{name} ({case}, S = {S})"] = first_line(e)
            log(f"failed {name} ({case}, S = {S}): {first_line(e)}")
            continue
        if bf16_rows is None:  # the first method is the baseline
            bf16_rows = out
            meta.setdefault("sdpa_default_kernel", {})[str(S)] = default_kernel(lambda: f(q, k, v))
        r = dict(case=case, S=S, method=name, **errors(out, bf16_rows, ref))
        if timed:
            try:
                ms, mode = time_call(lambda: f(q, k, v), calls, args.replays)
            except Exception as e:  # noqa: BLE001 (keep its error row)
                if t_base is None:
                    raise
                skipped[f"{name} timing ({case}, S = {S})"] = first_line(e)
                ms = None
            if ms is not None:
                t_base = ms if t_base is None else t_base
                r.update(ms=ms, timing=mode, tflops=flops / (ms * 1e-3) / 1e12, speedup=t_base / ms,
                         flux_step_saved_ms=CALLS_PER_STEP * (t_base - ms))
        rows_out.append(r)
        log("row", {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()})
        f = None  # free its buffers before the next method
        torch.cuda.empty_cache()
    for name, kind in EMULATIONS:
        r = dict(case=case, S=S, method=name, **errors(emulate(kind, q, k, v, rows, sm_scale), bf16_rows, ref))
        rows_out.append(r)
        log("row", {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()})
    return rows_out


def compile_check(S, dev, gone):
    """Each method under torch.compile(fullgraph=True), plain and with CUDA graphs (reduce-overhead)."""
    sm_scale = D ** -0.5
    q, k, v = make_inputs("randn", S, seed=7, dev=dev)
    res = []
    saved, QUANT_MODE["mode"] = QUANT_MODE["mode"], "eager"  # plain ATen quantization inside the compiled region
    for name, build, _, check in METHODS:
        if not check or name in gone:
            continue
        try:
            f = build(q, k, v, sm_scale)
            eager = f(q, k, v).float().clone()
        except Exception as e:  # noqa: BLE001
            res.append(dict(method=name, fullgraph=f"not run: {first_line(e)}", reduce_overhead="-"))
            continue
        r = dict(method=name)
        for key, mode in (("fullgraph", None), ("reduce_overhead", "reduce-overhead")):
            torch._dynamo.reset()
            try:
                cf = torch.compile(f, fullgraph=True, mode=mode)
                for _ in range(3):  # reduce-overhead records the CUDA graph on a later call
                    out = cf(q, k, v).float().clone()
                torch.cuda.synchronize()
                e = ((out - eager).norm() / eager.norm()).item()
                r[key] = "ok, SQNR vs eager " + (f"{-20 * math.log10(e):.1f} dB" if e > 0 else "inf (identical)")
            except Exception as e:  # noqa: BLE001
                r[key] = "fails: " + first_line(e)
        res.append(r)
        log("compile", r)
    torch._dynamo.reset()
    QUANT_MODE["mode"] = saved
    return res


def _f(x, fmt):
    return "-" if x is None else ("inf" if x == float("inf") else format(x, fmt))


def report(meta, rows, skipped, comp):
    lines = [f"# 8-bit attention vs bf16 SDPA at FLUX.1 shapes on {meta['gpu']} ({meta['date']})", ""]
    lines += _record.header_md(meta)
    lines += [f"- software: torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; "
              + ", ".join(f"{k} {v}" for k, v in meta["packages"].items() if v),
              f"- default SDPA kernel by S: {meta.get('sdpa_default_kernel', {})}",
              f"- fp8 quantization of the fa3-fp8 / cudnn-fp8 rows: {meta.get('quantization')}",
              f"- shapes: batch 1, {H} heads, head dim {D}, bf16, (B, S, H, D) layout; errors on {meta['rows']} "
              "query rows spread over the sequence; timing: CUDA-graph replay median per call (eager where noted), "
              f"{meta['replays']} replays; FLUX step = {CALLS_PER_STEP} x (sdpa-bf16 - this) ms", ""]
    lines += ["| case | S | method | ms / call | timing | TFLOP/s | vs sdpa-bf16 | FLUX step saved (ms) | "
              "rel err vs bf16 | SQNR vs bf16 (dB) | SQNR vs fp32 (dB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r["method"] == "sdpa-bf16"
        lines.append(
            f"| {r['case']} | {r['S']} | {r['method']} | {_f(r.get('ms'), '.3f')} | {r.get('timing', '-')} | "
            f"{_f(r.get('tflops'), '.0f')} | {_f(r.get('speedup'), '.2f')}{'x' if 'speedup' in r else ''} | "
            f"{_f(r.get('flux_step_saved_ms'), '+.1f')} | {'-' if base else _f(r['rel_err_vs_bf16'], '.2e')} | "
            f"{'-' if base else _f(r['sqnr_vs_bf16_db'], '.1f')} | {_f(r['sqnr_vs_fp32_db'], '.1f')} |")
    lines.append("")
    if skipped:
        lines += ["Not run:", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    if comp:
        lines += [f"torch.compile(fullgraph=True) at S = {meta['compile_S']}:", "",
                  "| method | fullgraph | fullgraph + reduce-overhead (CUDA graphs) |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['fullgraph']} | {r['reduce_overhead']} |" for r in comp] + [""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for <date>-<gpu>-attention.md/.json (default: print only)")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)), help="sequence lengths (text 512 + image tokens)")
    ap.add_argument("--cases", default="randn,rmsnorm,rmsnorm@2", help="input cases: randn, rmsnorm, rmsnorm@G")
    ap.add_argument("--replays", type=int, default=30, help="CUDA-graph replays per method (median; >= 20)")
    ap.add_argument("--rows", type=int, default=1024, help="query rows the errors are computed on")
    ap.add_argument("--compile-check", action="store_true", help="also torch.compile(fullgraph=True) each method")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py: needs a CUDA GPU (the fp8 candidates need Hopper, sm_90); "
                         "torch.cuda.is_available() is False here")
    if args.replays < 20:
        raise SystemExit("bench_attention.py: --replays must be >= 20")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference and emulations in true fp32
    torch.backends.cudnn.allow_tf32 = False
    meta = dict(_record.record(torch.cuda.get_device_name(0)), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), rows=args.rows, replays=args.replays,
                packages={p: _version(p) for p in ("flash-attn-3", "flash_attn_3", "sageattention",
                                                   "nvidia-cudnn-frontend", "triton")})
    log("meta", meta)
    seqs = [int(s) for s in args.seqs.split(",")]
    skipped: dict[str, str] = {}
    gone: set[str] = set()
    rows = []
    with torch.inference_mode():
        for case in args.cases.split(","):
            for S in seqs:
                rows += run_case(case, S, args, dev, skipped, gone, meta)
    meta["quantization"] = QUANT_MODE["mode"]
    comp = []
    if args.compile_check:
        meta["compile_S"] = seqs[len(seqs) // 2]
        comp = compile_check(meta["compile_S"], dev, gone)
    md = report(meta, rows, skipped, comp)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(0)
        gpu_tag = "h100" if "H100" in name else ("h200" if "H200" in name else name.replace(" ", "_"))
        stem = f"{meta['date'][:10]}-{gpu_tag}-attention"
        (out / f"{stem}.md").write_text(md)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows, skipped=skipped, compile=comp),
                                                     indent=1, default=str))
        log(f"wrote {out / stem}.md/.json (commit {meta['commit']}, dirty: {meta['dirty']}); add its row to "
            "benchmarks/results/INDEX.md")


if __name__ == "__main__":
    main()
