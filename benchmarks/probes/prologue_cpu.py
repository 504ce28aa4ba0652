"""Where the host time of a compiled quantized FLUX step goes, and which torch.compile settings cut it safely (CPU).

The model is diffusers' ``FluxTransformer2DModel`` with FLUX.1-dev's depth (19 double + 38 single blocks, so as many
quantized weights and inner tensors as the real model) but tiny widths (2 heads x 64, text width 128, pooled 64) and
very few tokens (16 image + 8 text), seeded random bf16 weights. On the CPU its kernels then cost little and a call's
time is mostly host work: Dynamo's guards, AOTAutograd's runtime wrappers (unwrapping the tensor-subclass weights into
their inner tensors), and the Python of Inductor's generated code.

Per configuration, in its own process (``--config NAME``), it measures under ``torch.inference_mode()`` after warm-up:

* ``ms/call``: median wall time of one compiled call (``--iters`` calls, default 30);
* ``guard ms``: median time of evaluating the compiled frame's guards alone (``guard_manager.check`` on the call's
  frame locals), and the number of guard managers / leaf guards in the tree;
* ``fn ms``: median time inside Dynamo's compiled function (``__compiled_fn_N``: AOTAutograd's runtime wrappers plus
  Inductor's ``call``), timed by wrapping the global the transformed bytecode calls; ``rest`` = call - guard - fn
  (Dynamo's bytecode gathering the graph inputs from the module tree, ``OptimizedModule`` / hooks);
* a cProfile of one call (``--profile``), summarized as time in Inductor's generated ``call`` versus the rest of the
  compiled function (AOTAutograd: ``unwrap_tensor_subclasses`` / ``__tensor_flatten__`` and friends);
* graphs and recompiles (``torch._dynamo.utils.counters``), cache entries on the frame.

With ``--safety`` it then checks that the compiled model does not reuse stale weights: it changes one quantized
layer's weight in several ways (a new same-shape weight assigned to the module; one inner tensor of the weight rebound;
an inner tensor written in place; a new weight of another rank; inner tensors rebound to another rank; a plain bf16
weight in place of the quantized one) and compares the compiled output after each change with eager's (new weights)
and with eager's before the change (stale weights).

Configurations (``--list``): ``bf16`` (the float model), ``w4a8`` (``quantize_model(precision="w4a8", rank=32,
weight_only="w4a16")``, as bench.py), and w4a8 variants ``w4a8-tags`` (``use_recursive_dict_tags_for_guards``),
``w4a8-skipnn`` (``guard_filter_fn=skip_guard_on_all_nn_modules_unsafe``, unsafe: a bound), ``w4a8-freezing``
(Inductor freezing), ``w4a8-nosizeasserts`` (Inductor's ``size_asserts`` off), ``w4a8-fused`` (``fuse_qkv``: each
attention's q/k/v as one linear, 152 fewer quantized weights), ``w4a8-fused-unwrapped`` (then
``unwrap_weights``, the compile recipe), ``w4a8-fused-unwrapped-cat`` (that with ``install_compile_pass(cat_gemms=True)``),
and the same for bf16 where it matters.

Run (CPU, ~2-4 min per configuration, Inductor's cache makes the w4a8 variants after the first faster):

    .venv/bin/python benchmarks/probes/prologue_cpu.py                 # all configurations, one table
    .venv/bin/python benchmarks/probes/prologue_cpu.py --safety        # plus the stale-weight checks
    .venv/bin/python benchmarks/probes/prologue_cpu.py --configs w4a8,w4a8-tags --safety
    .venv/bin/python benchmarks/probes/prologue_cpu.py --config w4a8 --profile   # one configuration, JSON out
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

MODEL = dict(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=64,
             num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
             axes_dims_rope=[8, 28, 28])
IMG_TOKENS, TXT_TOKENS = 16, 8
RANK = 32

# name: (weights, dynamo config, inductor config, guard filter)
CONFIGS = {
    "bf16": ("bf16", {}, {}, None),
    "bf16-tags": ("bf16", {"use_recursive_dict_tags_for_guards": True}, {}, None),
    "bf16-skipnn": ("bf16", {}, {}, "skip_guard_on_all_nn_modules_unsafe"),
    "w4a8": ("w4a8", {}, {}, None),
    "w4a8-tags": ("w4a8", {"use_recursive_dict_tags_for_guards": True}, {}, None),
    "w4a8-skipnn": ("w4a8", {}, {}, "skip_guard_on_all_nn_modules_unsafe"),
    "w4a8-freezing": ("w4a8", {}, {"freezing": True}, None),
    # Inductor's per-input size / stride asserts off (Dynamo's guards already check every inner tensor's strides:
    # a same-shape inner tensor with other strides recompiles with or without them, HISTORY.md)
    "w4a8-nosizeasserts": ("w4a8", {}, {"size_asserts": False}, None),
    # torchao's unwrap_tensor_subclass: each quantized weight becomes a parametrization over its plain parts, so
    # the compiled graph's inputs are plain tensors (no subclass flattening or metadata guard per call)
    "w4a8-unwrap": ("w4a8", {}, {}, None),
    # q/k/v (and the added q/k/v) of each attention as one linear (svdquant_ops.fuse_qkv): 152 fewer quantized
    # weights to unwrap and guard, 152 fewer GEMM calls
    "w4a8-fused": ("w4a8", {}, {}, None),
    # fused, then each quantized weight held as its plain parts by svdquant_ops.unwrap_weights (shared parts one
    # parameter), as the compile recipes do
    "w4a8-fused-unwrapped": ("w4a8", {}, {}, None),
    # that, with each single block's to_qkv and proj_mlp as one gemm_cat call (install_compile_pass(cat_gemms=True))
    "w4a8-fused-unwrapped-cat": ("w4a8", {}, {}, None),
}
DEFAULT = ["bf16", "bf16-tags", "bf16-skipnn", "w4a8", "w4a8-tags", "w4a8-skipnn", "w4a8-freezing"]


# ----------------------------------------------------------------------------------------------------------------
# model and inputs
# ----------------------------------------------------------------------------------------------------------------
def build(weights: str, seed: int = 0, cache: str | None = None):
    """The model, quantized for ``weights`` == "w4a8". Quantizing 57 blocks takes minutes on 2 CPU cores, so the
    quantized module is pickled to ``cache`` (a scratch path) and reused by the next configuration's process."""
    import torch
    from diffusers import FluxTransformer2DModel

    from svdquant_ops.ops import install_compile_pass

    if weights == "w4a8" and cache and os.path.exists(cache):
        from svdquant_ops import share_inputs

        m, info = torch.load(cache, weights_only=False)
        # what quantize_model does besides the weights: one λ / down projection object per input group (a pickle
        # may keep them as views of one memory, which torch.compile treats as separate inputs) and Inductor's pass
        share_inputs(m)
        install_compile_pass()
        return m, info
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**MODEL).to(torch.bfloat16).eval().requires_grad_(False)
    info = {}
    if weights == "w4a8":
        from svdquant_ops import quantize_model

        s = quantize_model(m, precision="w4a8", rank=RANK, weight_only="w4a16")
        info = {"quantized": len(s.quantized), "weight_only": len(s.weight_only), "kept": len(s.kept)}
        if cache:
            torch.save((m, info), cache)
    return m, info


def make_inputs(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    side = int(IMG_TOKENS ** 0.5)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return dict(hidden_states=torch.randn(1, IMG_TOKENS, MODEL["in_channels"], generator=g).to(bf),
                encoder_hidden_states=torch.randn(1, TXT_TOKENS, MODEL["joint_attention_dim"], generator=g).to(bf),
                pooled_projections=torch.randn(1, MODEL["pooled_projection_dim"], generator=g).to(bf),
                timestep=torch.full((1,), 0.5, dtype=bf),
                img_ids=torch.stack([torch.zeros_like(rows), rows, cols], 1).to(bf),
                txt_ids=torch.zeros(TXT_TOKENS, 3, dtype=bf), return_dict=False)


def count_tensors(model) -> dict:
    """Parameters and buffers, and the plain tensors Dynamo / AOTAutograd see once subclasses are flattened."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    n_sub = n_plain = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if is_traceable_wrapper_subclass(t):
            n_sub += 1
            n_plain += len(t.__tensor_flatten__()[0])
        else:
            n_plain += 1
    return {"subclass_weights": n_sub, "plain_tensors": n_plain}


# ----------------------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------------------
def frame_code(model):
    return type(model).forward.__code__


def cache_entries(model):
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return _debug_get_cache_entry_list(frame_code(model))


def frame_locals(model, inputs) -> dict:
    sig = inspect.signature(type(model).forward, follow_wrapped=False)  # diffusers wraps forward(self, *a, **kw)
    bound = sig.bind(model, **inputs)
    bound.apply_defaults()
    f = type(model).forward
    cells = dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ())))
    return {**dict(bound.arguments), **cells}  # the frame's locals as the guards read them: arguments and free vars


def guard_stats(entry) -> dict:
    """Guard managers and leaf guards in the entry's guard tree."""
    root = entry.guard_manager.root
    managers = leaves = 0
    stack = [root]
    while stack:
        node = stack.pop()
        managers += 1
        leaves += len(node.get_leaf_guards())
        if hasattr(node, "get_key_value_managers"):  # DictGuardManager
            for k, v in node.get_key_value_managers().values():
                stack.extend(x for x in (k, v) if x is not None)
        stack.extend(node.get_child_managers())
    return {"guard_managers": managers, "leaf_guards": leaves}


def wrap_compiled_fns(model, times: list):
    """Replace each ``__compiled_fn_N`` global the transformed bytecode calls with a timing wrapper."""
    g = type(model).forward.__globals__
    for e in cache_entries(model):
        for name in e.code.co_names:
            if name.startswith("__compiled_fn") and name in g and not getattr(g[name], "_probe", False):
                fn = g[name]

                def timed(*args, __fn=fn, **kwargs):
                    t0 = time.perf_counter()
                    try:
                        return __fn(*args, **kwargs)
                    finally:
                        times.append(time.perf_counter() - t0)

                timed._probe = True
                g[name] = timed


def profile_one(step) -> dict:
    """cProfile of one call: where the compiled function's time goes, by function and by bucket."""
    pr = cProfile.Profile()
    pr.enable()
    step()
    pr.disable()
    st = pstats.Stats(pr)
    total = st.total_tt
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        rows.append((file, line, fn, nc, tt, ct))

    def cum(pred):
        return max((ct for f, l, fn, nc, tt, ct in rows if pred(f, fn)), default=0.0)

    def tot(pred):
        return sum(tt for f, l, fn, nc, tt, ct in rows if pred(f, fn))

    inductor_call = sum(ct for f, l, fn, nc, tt, ct in rows
                        if fn == "call" and ("torchinductor" in f or "/tmp/" in f))
    buckets = {
        "profiled_total_ms": total * 1e3,
        "compiled_fn_cum_ms": cum(lambda f, fn: fn == "timed" or fn.startswith("__compiled_fn")) * 1e3,
        "inductor_call_cum_ms": inductor_call * 1e3,
        # AOTAutograd's subclass unwrapping: torch 2.13 runs it through a generated function (inner_fn, "file"
        # subclass_codegen.py:codegen(subclass_wrapper)), older versions through subclass_utils.py
        "unwrap_subclasses_cum_ms": cum(lambda f, fn: "subclass_codegen" in f or "subclass_utils" in f) * 1e3,
        "tensor_flatten_tot_ms": tot(lambda f, fn: fn == "__tensor_flatten__") * 1e3,
        "tensor_flatten_calls": sum(nc for f, l, fn, nc, tt, ct in rows if fn == "__tensor_flatten__"),
        "functorch_tot_ms": tot(lambda f, fn: "_functorch" in f) * 1e3,
        "dynamo_tot_ms": tot(lambda f, fn: "_dynamo" in f) * 1e3,
    }
    top = sorted(rows, key=lambda r: -r[4])[:15]
    buckets["top_tottime"] = [f"{tt * 1e3:7.2f} ms {nc:6d}x {os.path.basename(f)}:{l} {fn}"
                              for f, l, fn, nc, tt, ct in top]
    return buckets


# ----------------------------------------------------------------------------------------------------------------
# safety: does the compiled model follow a weight change?
# ----------------------------------------------------------------------------------------------------------------
def _quantized_like(lin, rank: int, seed: int):
    """A new SVDQuant w4a8 weight for a linear of ``lin``'s shape, from a seeded random 16-bit weight."""
    import torch
    import torch.nn as nn
    from torchao.quantization import quantize_

    from svdquant_ops.quantize.config import SVDQuantConfig

    torch.manual_seed(seed)
    new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None).to(torch.bfloat16)
    with torch.no_grad():
        new.weight.mul_(3.0)  # a clearly different layer
    seq = nn.Sequential(new)
    with torch.no_grad():
        quantize_(seq, SVDQuantConfig(precision="w4a8", rank=rank, skip=[]))
    return seq[0].weight


def safety(model, fn, inputs) -> list[dict]:
    import torch
    import torch.nn as nn

    from svdquant_ops.storage.tensor import SVDQuantTensor

    # one attention output projection of a double block: its weight shares no inner tensor with another linear
    name = "transformer_blocks.7.attn.to_out.0"
    lin = model.get_submodule(name)
    if not isinstance(lin.weight, SVDQuantTensor):
        return [{"change": "skipped", "why": f"{name} is not an SVDQuantTensor (model not quantized)"}]

    def param(t):
        return nn.Parameter(t, requires_grad=False)

    def recompiles():
        from torch._dynamo.utils import counters
        return len(cache_entries(model)), int(counters["stats"].get("unique_graphs", 0))

    changes = []

    def assign_same():
        lin.weight = param(_quantized_like(lin, RANK, 101))

    def rebind_inner_same():
        w = _quantized_like(lin, RANK, 102)
        lin.weight.codes = w.codes  # one inner tensor rebound, same shape and dtype

    def inplace_inner():
        with torch.no_grad():
            lin.weight.proj_up.mul_(-2.0)

    def assign_other_rank():
        lin.weight = param(_quantized_like(lin, 2 * RANK, 103))

    def rebind_inner_other_rank():
        w = _quantized_like(lin, 3 * RANK, 104)
        lin.weight.proj_down, lin.weight.proj_up = w.proj_down, w.proj_up  # metadata change no module dict sees

    def assign_plain():
        torch.manual_seed(105)
        lin.weight = param(torch.randn(lin.out_features, lin.in_features, dtype=torch.bfloat16) * 0.2)

    # Each recompile costs ~2 min here, so the list stops at the one metadata change that no module dict sees.
    changes = [("module.weight = new same-shape w4a8 weight", assign_same),
               ("weight.codes = new tensor (same shape)", rebind_inner_same),
               ("weight.proj_up.mul_(-2) in place", inplace_inner),
               ("weight.proj_down/proj_up = rank-96 tensors", rebind_inner_other_rank)]
    if os.environ.get("PROLOGUE_ALL_CHANGES"):
        changes += [("module.weight = w4a8 weight of rank 64", assign_other_rank),
                    ("module.weight = plain bf16 weight", assign_plain)]
    def run(f):
        with torch.inference_mode():
            return f(**inputs)[0].float()

    def norm(t):
        return t.norm().item()

    out = []
    for what, change in changes:
        before = run(model)
        change()  # outside inference_mode, as a user swapping weights between calls would
        eager = run(model)
        n0, g0 = recompiles()
        try:
            comp, err = run(fn), None
        except Exception as e:  # a stale compiled graph fed tensors of another shape
            comp, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        n1, g1 = recompiles()
        row = {"change": what, "recompiled": n1 > n0 or g1 > g0, "effect": norm(eager - before)}
        if comp is None:
            row.update(verdict="ERROR", error=err)
        else:  # relative to the change's own effect: ~0 means it follows eager, ~1 that it ignored the change
            d_new, d_old = norm(comp - eager) / row["effect"], norm(comp - before) / row["effect"]
            row.update(d_vs_eager=d_new, d_vs_stale=d_old,
                       verdict="ok" if d_new < 0.3 else ("STALE" if d_old < 0.3 else "WRONG"))
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# one configuration, in this process
# ----------------------------------------------------------------------------------------------------------------
def run_config(name: str, iters: int, warmup: int, do_profile: bool, do_safety: bool, cache: str | None) -> dict:
    import torch
    import torch._dynamo
    import torch._inductor.config as ic
    from torch._dynamo.utils import counters

    # One thread: with OpenMP's two threads on this 2-core machine every Inductor kernel paid a parallel-region
    # barrier of milliseconds (calls of 0.6-1.7 s); host overhead is what is measured here, not kernel speed.
    torch.set_num_threads(1)
    weights, dyn_cfg, ind_cfg, guard_filter = CONFIGS[name]
    for k, v in dyn_cfg.items():
        setattr(torch._dynamo.config, k, v)
    for k, v in ind_cfg.items():
        setattr(ic, k, v)
    torch._logging.set_logs(recompiles=True)

    res = {"config": name, "weights": weights, "dynamo": dyn_cfg, "inductor": ind_cfg, "guard_filter": guard_filter}
    model, info = build(weights, cache=cache)
    if name.endswith("-unwrap"):
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)
    if name.endswith("-fused") or "-fused-unwrapped" in name:
        from svdquant_ops import fuse_qkv

        res["fused_attention"] = len(fuse_qkv(model).fused)
    if "-unwrapped" in name:
        from svdquant_ops import unwrap_weights

        res["unwrapped"] = unwrap_weights(model)
    if name.endswith("-cat"):
        from svdquant_ops.ops import install_compile_pass

        install_compile_pass(cat_gemms=True)
    res.update(info)
    res.update(count_tensors(model))
    inputs = make_inputs()
    options = {}
    if guard_filter:
        options["guard_filter_fn"] = getattr(torch.compiler, guard_filter)
    fn = torch.compile(model, fullgraph=True, options=options)

    def step():
        return fn(**inputs)[0]

    with torch.inference_mode():
        t0 = time.perf_counter()
        step()
        res["first_call_s"] = time.perf_counter() - t0
        print(f"{name}: first call {res['first_call_s']:.1f} s", file=sys.stderr, flush=True)
        for _ in range(max(0, warmup - 1)):
            step()
        ms = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            ms.append((time.perf_counter() - t0) * 1e3)
        res["ms_call"] = statistics.median(ms)
        res["ms_call_min"] = min(ms)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        names = [e.name for e in prof.events()]
        res["op_calls"] = {k: names.count(f"svdquant::{k}") for k in ("quantize_act", "gemm", "gemm_cat")}

        entries = cache_entries(model)
        res["cache_entries"] = len(entries)
        if entries:
            res.update(guard_stats(entries[0]))
            f_locals = frame_locals(model, inputs)
            gm = entries[0].guard_manager
            if not gm.check(f_locals):
                raise RuntimeError(f"the guards reject the call's own locals: {gm.check_verbose(f_locals)}")
            gt = []
            for _ in range(iters):
                t0 = time.perf_counter()
                gm.check(f_locals)
                gt.append((time.perf_counter() - t0) * 1e3)
            res["ms_guard"] = statistics.median(gt)

        fn_times = []
        wrap_compiled_fns(model, fn_times)
        wall = []
        for _ in range(iters):
            n = len(fn_times)
            t0 = time.perf_counter()
            step()
            wall.append((time.perf_counter() - t0) * 1e3)
            if len(fn_times) == n:
                raise RuntimeError("the compiled function was not called (the wrapper missed it)")
        res["ms_call_wrapped"] = statistics.median(wall)
        res["ms_fn"] = statistics.median(fn_times[-iters:]) * 1e3
        if do_profile:
            res["profile"] = profile_one(step)

    res["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    res["recompiles"] = int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0
    res["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if do_safety:
        res["safety"] = safety(model, fn, inputs)
        res["unique_graphs_after_safety"] = int(counters["stats"].get("unique_graphs", 0))
    return res


# ----------------------------------------------------------------------------------------------------------------
# driver: one subprocess per configuration, one table
# ----------------------------------------------------------------------------------------------------------------
def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    lines = ["| config | weights (sub/plain) | ms/call | guard ms | fn ms (AOT+Inductor) | rest ms | "
             "Inductor call ms | unwrap ms | guards (mgrs/leaves) | graphs | entries | 1st call s | "
             "quantize_act / gemm / gemm_cat per call |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | ERROR: {r['error'][:150]} |" + " |" * 11)
            continue
        p = r.get("profile", {})
        rest = r["ms_call_wrapped"] - r.get("ms_guard", 0) - r["ms_fn"]
        lines.append(
            f"| {r['config']} | {r['subclass_weights']}/{r['plain_tensors']} | {r['ms_call']:.1f} | "
            f"{fmt(r.get('ms_guard'), '.2f')} | {r['ms_fn']:.1f} | {rest:.1f} | "
            f"{fmt(p.get('inductor_call_cum_ms'))} | {fmt(p.get('unwrap_subclasses_cum_ms'))} | "
            f"{r.get('guard_managers', '-')}/{r.get('leaf_guards', '-')} | {r['unique_graphs']} | "
            f"{r['cache_entries']} | {r['first_call_s']:.0f} | "
            f"{' / '.join(str(v) for v in r.get('op_calls', {}).values()) or '-'} |")
    return "\n".join(lines)


def safety_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "safety" not in r:
            continue
        lines += [f"\n{r['config']}:", "| change | recompiled | verdict | |compiled-eager| / |effect| | "
                  "|compiled-stale| / |effect| | |effect| (L2 of eager's change) |", "|---|---|---|---|---|---|"]
        for s in r["safety"]:
            if "effect" not in s:
                lines.append(f"| {s['change']} | - | {s.get('why', '')} | | | |")
                continue
            v = s["verdict"] + (f" ({s['error']})" if s.get("error") else "")
            lines.append(f"| {s['change']} | {s['recompiled']} | {v} | {fmt(s.get('d_vs_eager'), '.3g')} | "
                         f"{fmt(s.get('d_vs_stale'), '.3g')} | {s['effect']:.3g} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="run one configuration in this process and print its JSON")
    ap.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated list (driver mode)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one call (driver mode: always on)")
    ap.add_argument("--safety", action="store_true", help="stale-weight checks after timing")
    ap.add_argument("--json", help="driver mode: also write all results here")
    ap.add_argument("--cache", default="/tmp/prologue_cpu_w4a8.pt",
                    help="pickled quantized model, reused across processes ('' to always quantize)")
    args = ap.parse_args()
    if args.list:
        for k, v in CONFIGS.items():
            print(k, v)
        return
    if args.config:
        res = run_config(args.config, args.iters, args.warmup, args.profile, args.safety, args.cache or None)
        print("RESULT " + json.dumps(res))
        return
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--config", name, "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--profile", "--cache", args.cache] + (["--safety"] if args.safety else [])
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            res = {"config": name, "error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
            sys.stderr.write(p.stderr[-3000:])
        else:
            res = json.loads(line[len("RESULT "):])
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        results.append(res)
    print(table(results))
    print(safety_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
