"""The ops: typed Python entry points to ``torch.ops.svdquant`` (schemas in ``csrc/ops.cpp``), and the dispatch
that makes ``F.linear(x, weight)`` run them for an ``SVDQuantTensor`` or ``W4A16Tensor`` weight.

The C++/CUDA library is built and loaded on first use of an op (``build.py``), not on import; ``load()`` does it
ahead of time. Fake kernels (``svdquant_ops/meta``) are registered with it, so the ops trace under torch.compile.

precision: "int4", "nvfp4" or "w4a8" (formats.py). Weight operands are named as the ``SVDQuantTensor`` fields.

quantize_act(x, smooth, proj_down, precision, act_unsigned=False) -> (act_codes, act_scales, down_act)
    act_codes uint8 [..., K/2] (layout.py), act_scales [..., K/group], down_act = x @ proj_down in fp32 [..., R].
    w4a8: act_codes int8 [..., K] (one per byte, not packed, channels in W4A8's order: layout.w4a8_channel_order),
    act_scales [..., 1] in x's dtype (one per token).
quantize_act_given_amax(x, smooth, proj_down, amax) -> (act_codes, act_scales, down_act)
    W4A8's quantize_act with each token's amax of |x / smooth| given (fp32 [..., 1], >= 0 or NaN: the CPU op checks
    it; the CUDA op reads no values on the host, and a negative amax gives a negative scale) instead of
    computed, so the op reads x once; equal to quantize_act(..., "w4a8") for the exact amax, and a smaller amax
    clamps codes to +-127. The compile pass (install_compile_pass(amax_split=True)) rewrites W4A8 quantize_act
    nodes into it, with the amax as ATen ops that Inductor fuses into the kernel producing x.
gemm(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision, out_dtype,
     act_unsigned=False) -> y [..., N]
    Q(x)·Q(R)ᵀ + down_act·proj_upᵀ + bias. w4a8: scales are uint8 multipliers [N, K/64] in [1, 18], global_scale
    the fp32 per-channel scale [N] (required), K <= 131072.
gemm_cat(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, precision, out_dtype,
         act_unsigned=False) -> y [..., N_0 + N_1 + ...]
    torch.cat([gemm(act_codes, act_scales, codes[i], scales[i], global_scale[i], down_act, proj_up[i], bias[i], ...)
    for every i], -1) (lists of equal length; global_scale and bias entries may be None): bit for bit on the CPU. On
    Hopper the W4A8 weights are expanded side by side and one GEMM kernel covers all their tiles, each column
    computed as gemm computes it at the tile width chosen for the whole (the compile pass ``cat_w4a8_gemms`` gives it
    the GEMMs that read one quantize_act).
expand_w4a8_weight(codes, scales) -> weight int8 [N, K]
    W4A8's weight as the integers code * multiplier that the Hopper kernel multiplies (it is what gemm expands on
    every call where it does not read the packed codes directly), channels in W4A8's order like act_codes'.
gemm_expanded(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias, out_dtype, weight,
              next_codes=None, next_scales=None) -> (y, next_weight)
    gemm(..., "w4a8") with the weight's expansion given (``weight``, equal to expand_w4a8_weight(codes, scales); the
    CPU op checks it), and the expansion of the next weight returned (int8 [0, 0] when next_codes is None). The CUDA
    kernel writes it with warps its GEMM leaves idle, so no GEMM of a compiled model waits for its own expansion
    (the compile pass ``expand_w4a8_ahead`` chains the calls).
linear(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias, precision, act_unsigned=False)
    -> y [..., N] in x's dtype: quantize_act then gemm (CompositeImplicitAutograd, so tracing sees both).
w4a16_linear(x, codes, scales, zeros, bias=None) -> y [..., N] in x's dtype
    The weight-only format (formats.py "w4a16"): x @ (code * scale + zero)ᵀ + bias, fp32 accumulation. codes uint8
    [N, K/2] (unsigned nibbles, layout.py), scales and zeros [N, K/64] in one float dtype.
w4a16_linear_group(x, codes, scales, zeros, bias) -> [y_0, y_1, ...]
    w4a16_linear(x, codes[i], scales[i], zeros[i], bias[i]) for every i, bit for bit (lists of equal length; bias
    entries may be None). On the GPU one GEMV launch streams all the weights (up to 48 per launch) where x has at
    most 8 tokens and every weight has a multiple of 16 rows; other calls run one w4a16_linear each.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from ..storage import SVDQuantTensor, W4A16Tensor
from ..storage.base import alias
from ..storage.shared_moves import SHARED_MARK
from . import build

__all__ = ["load", "quantize_act", "quantize_act_given_amax", "gemm", "gemm_cat", "expand_w4a8_weight",
           "gemm_expanded", "linear", "parallel_linears", "quantized_linear", "w4a16_linear", "w4a16_linear_group",
           "weight_only_linear", "clear_act_cache", "merge_quantize_act", "split_w4a8_amax", "cat_w4a8_gemms",
           "expand_w4a8_ahead", "group_w4a16", "parallelize_linears", "install_compile_pass"]


def load(verbose: bool = False):
    """Build (first time only) and load the op library and register the fake kernels; returns the library path."""
    path = build.load(verbose=verbose)
    from .. import meta  # noqa: F401  (registers the fake kernels; needs the schemas loaded above)

    return path


# torch.compile calls this at trace time, eagerly, and folds the result: a first op call inside a compiled region
# still builds the library outside the graph.
@torch.compiler.assume_constant_result
def _ready() -> bool:
    load()
    return True


def quantize_act(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, precision: str,
                 act_unsigned: bool = False):
    _ready()
    return torch.ops.svdquant.quantize_act.default(x, smooth, proj_down, precision, act_unsigned)


def quantize_act_given_amax(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, amax: torch.Tensor):
    _ready()
    return torch.ops.svdquant.quantize_act_given_amax.default(x, smooth, proj_down, amax)


def gemm(act_codes: torch.Tensor, act_scales: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
         global_scale: torch.Tensor | None, down_act: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None,
         precision: str, out_dtype: torch.dtype, act_unsigned: bool = False) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.gemm.default(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up,
                                           bias, precision, out_dtype, act_unsigned)


def gemm_cat(act_codes: torch.Tensor, act_scales: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor],
             global_scale: list[torch.Tensor | None], down_act: torch.Tensor, proj_up: list[torch.Tensor],
             bias: list[torch.Tensor | None], precision: str, out_dtype: torch.dtype,
             act_unsigned: bool = False) -> torch.Tensor:
    # (the op checks this too; a segfault was seen on the GPU machine's torch 2.11 with lists of unequal length)
    lengths = [len(x) for x in (codes, scales, global_scale, proj_up, bias)]
    if not codes or len(set(lengths)) != 1:
        raise ValueError("svdquant::gemm_cat: codes, scales, global_scale, proj_up and bias must have one entry per "
                         f"weight and at least one, got {', '.join(map(str, lengths))}")
    _ready()
    return torch.ops.svdquant.gemm_cat.default(act_codes, act_scales, codes, scales, global_scale, down_act, proj_up,
                                               bias, precision, out_dtype, act_unsigned)


def expand_w4a8_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.expand_w4a8_weight.default(codes, scales)


def gemm_expanded(act_codes: torch.Tensor, act_scales: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  global_scale: torch.Tensor, down_act: torch.Tensor, proj_up: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, weight: torch.Tensor,
                  next_codes: torch.Tensor | None = None,
                  next_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _ready()
    return torch.ops.svdquant.gemm_expanded.default(act_codes, act_scales, codes, scales, global_scale, down_act,
                                                    proj_up, bias, out_dtype, weight, next_codes, next_scales)


def linear(x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, codes: torch.Tensor,
           scales: torch.Tensor, global_scale: torch.Tensor | None, proj_up: torch.Tensor, bias: torch.Tensor | None,
           precision: str, act_unsigned: bool = False) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.linear.default(x, smooth, proj_down, codes, scales, global_scale, proj_up, bias,
                                             precision, act_unsigned)


def parallel_linears(x: list[torch.Tensor], smooth: list[torch.Tensor], proj_down: list[torch.Tensor],
                     codes: list[torch.Tensor], scales: list[torch.Tensor], global_scale: list[torch.Tensor | None],
                     proj_up: list[torch.Tensor], bias: list[torch.Tensor | None], precision: str,
                     act_unsigned: bool = False) -> list[torch.Tensor]:
    """``[linear(x[i], smooth[i], ...) for i]``, bit for bit; on the GPU each linear after the first on a side
    stream of its own (``parallelize_linears``)."""
    lengths = [len(v) for v in (x, smooth, proj_down, codes, scales, global_scale, proj_up, bias)]
    if not x or len(set(lengths)) != 1:  # (checked before the op: see gemm_cat)
        raise ValueError("svdquant::parallel_linears: x, smooth, proj_down, codes, scales, global_scale, proj_up and "
                         f"bias must have one entry per linear and at least one, got {', '.join(map(str, lengths))}")
    _ready()
    return torch.ops.svdquant.parallel_linears.default(x, smooth, proj_down, codes, scales, global_scale, proj_up,
                                                       bias, precision, act_unsigned)


def w4a16_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    _ready()
    return torch.ops.svdquant.w4a16_linear.default(x, codes, scales, zeros, bias)


def w4a16_linear_group(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor],
                       zeros: list[torch.Tensor], bias: list[torch.Tensor | None]) -> list[torch.Tensor]:
    _ready()
    return torch.ops.svdquant.w4a16_linear_group.default(x, codes, scales, zeros, bias)


# ------------------------------------------------------------------------------------------------------------------
# One activation quantization per input, eagerly: a one-entry cache of the last quantize_act.
#
# Linears that read the same tensor and hold the very same ``smooth`` and ``proj_down`` tensors (``share_inputs``)
# need one quantize_act. The cache keeps the last call's key and outputs; a call with the same key reuses them and
# runs only the GEMM. The key is the input *object* (held by a weak reference and compared with ``is``, so a freed
# tensor whose id or memory is reused never matches) with its version counter and data pointer (an in-place write
# bumps the version); smooth and proj_down by data pointer, shape, stride, dtype, device and version (not by object:
# eagerly, views of one memory hold the same values too; the entry holds them, so their memory cannot be freed and
# reused by another tensor while the entry lives), precision and act_unsigned. Inference tensors
# have no version counter: an in-place write under ``torch.inference_mode`` leaves no trace, and a hit would then
# be a silent wrong result, so calls whose input, smooth or proj_down is an inference tensor are never cached (the
# compiled path merges the calls in the graph instead; eager callers get the reuse under ``torch.no_grad``). Only
# plain ``torch.Tensor`` inputs outside tracing and outside CUDA graph capture are cached (no fake, functional or
# other subclass tensors). Writes the version counter cannot see (through ``.data``, or numpy memory shared with the
# tensor) are why the cache serves only what it is for: weights whose λ is shared (marked, ``storage.shared_moves``),
# each of them once per entry, so a linear called again on the same tensor quantizes it again; only a sibling called
# on it after such a write, within one forward, could see the earlier quantization.
# ------------------------------------------------------------------------------------------------------------------
_cache = threading.local()


def clear_act_cache() -> None:
    """Drop the cached activation quantization (it is replaced by the next input anyway)."""
    _cache.entry = None


def _key(t: torch.Tensor, hold: bool):
    # plain tensors only (parameters: the parts of weights unwrapped for compile, integrations.unwrap)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_inference():
        return None
    return (t if hold else weakref.ref(t), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t.device)


def _matches(saved, t: torch.Tensor, hold: bool) -> bool:
    ref, version, ptr, shape, stride, dtype, device = saved
    if not hold and ref() is not t:
        return False
    return (t._version == version and t.data_ptr() == ptr and tuple(t.shape) == shape
            and tuple(t.stride()) == stride and t.dtype == dtype and t.device == device)


def _cached_quantize_act(x, weight):
    """quantize_act through the one-entry cache, or None when these arguments cannot be cached."""
    smooth, proj_down, precision, act_unsigned = weight.smooth, weight.proj_down, weight.precision, weight.act_unsigned
    if not getattr(smooth, SHARED_MARK, False):  # no other linear can reuse this quantization
        return None
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        # A hit during a CUDA graph capture would leave quantize_act out of the graph (replays would reuse codes of
        # the capture-time input), and an entry made during one would hold memory of that graph's pool.
        return None
    args, hold = (x, smooth, proj_down), (False, True, True)
    keys = [_key(t, h) for t, h in zip(args, hold)]
    if any(k is None for k in keys):
        return None
    # which weights used the entry, by their codes' memory: a weight unwrapped for compile (integrations.unwrap) is a
    # new wrapper at each read, over parts that may be new views too (packed parts), so object ids can be reused
    who = (weight.codes.data_ptr(), weight.codes.device)
    entry = getattr(_cache, "entry", None)
    if (entry is not None and entry[1] == precision and entry[2] == act_unsigned and who not in entry[4]
            and all(_matches(k, t, h) for k, t, h in zip(entry[0], args, hold))):
        entry[4].add(who)
        return entry[3]
    _cache.entry = None  # free the old entry before quantizing the new input
    out = quantize_act(x, smooth, proj_down, precision, act_unsigned)
    _cache.entry = (keys, precision, act_unsigned, out, {who})
    return out


def quantized_linear(x: torch.Tensor, weight: SVDQuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a quantized weight: ``svdquant::quantize_act`` (reused from the previous
    call when it read the same input with the same λ and down projection, eagerly) then ``svdquant::gemm``."""
    if x.dtype != weight.dtype:
        raise TypeError(f"SVDQuant linear: input dtype {x.dtype} does not match the quantized weight's dtype "
                        f"{weight.dtype}; cast the input or the model")
    if x.dim() and x.shape[-1] != weight.shape[1]:  # else the op would name λ's shape, not the layer's
        raise ValueError(f"SVDQuant linear: input has {x.shape[-1]} features (its last dimension), the quantized "
                         f"weight expects in_features={weight.shape[1]}")
    if weight.bias_correction is not None:
        bias = weight.bias_correction if bias is None else bias.float() + weight.bias_correction
    act = _cached_quantize_act(x, weight)
    if act is None:
        return linear(x, weight.smooth, weight.proj_down, weight.codes, weight.scales, weight.global_scale,
                      weight.proj_up, bias, weight.precision, weight.act_unsigned)
    act_codes, act_scales, down_act = act
    return gemm(act_codes, act_scales, weight.codes, weight.scales, weight.global_scale, down_act, weight.proj_up,
                bias, weight.precision, x.dtype, weight.act_unsigned)


# ------------------------------------------------------------------------------------------------------------------
# One activation quantization per input, compiled: a post-grad FX pass.
#
# The linears of an input group hold the very same smooth and proj_down objects (share_inputs), which torch.compile
# makes one graph input each: their quantize_act nodes then have identical arguments. Inductor does not CSE custom
# ops in inference graphs, so the pass merges them. It merges nothing else: parts that are separate objects, even
# views of one memory, are separate inputs that a caller may rebind one at a time. Dynamo guards the identity ("a.smooth
# is b.smooth"), so unsharing a weight recompiles, and the graph itself shows the sharing to Inductor's cache.
# ------------------------------------------------------------------------------------------------------------------
def _hoist_view(node, first: torch.fx.Node, order: dict) -> bool:
    """Whether ``node`` (a weight part's node, or a constant) can be read before ``first``: it is defined there, or it
    is a chain of views of nodes that are, which is then moved there (a weight unwrapped for compile with its parts
    packed reads each part as a view of one flat graph input, traced where the weight is read: just before its own
    call). ``order`` (node -> position) is updated for the moved nodes."""
    if not isinstance(node, torch.fx.Node):
        return True
    aten = torch.ops.aten
    views = (aten.slice.Tensor, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.alias.default, aten.as_strided.default)
    chain: list = []

    def visit(n) -> bool:
        if order[n] < order[first] or n in chain:
            return True
        if n.op != "call_function" or n.target not in views or not all(visit(a) for a in n.all_input_nodes):
            return False
        chain.append(n)  # after its inputs
        return True

    if not visit(node):
        return False
    for i, n in enumerate(chain):  # between the node before `first` and `first`, in dependency order
        first.prepend(n)
        order[n] = order[first] - 1 + (i + 1) / (len(chain) + 1)
    return True


def merge_quantize_act(graph: torch.fx.Graph) -> int:
    """Merge the ``svdquant.quantize_act`` nodes of ``graph`` that have identical arguments, in place; returns how
    many were removed."""
    try:
        target = torch.ops.svdquant.quantize_act.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    seen: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        args = list(node.args) + [node.kwargs.get(k) for k in ("precision", "act_unsigned") if k in node.kwargs]
        if not all(isinstance(a, torch.fx.Node) for a in args[:3]):
            continue
        if len(args) < 5:
            args.append(False)  # act_unsigned defaults to False
        first = seen.setdefault(tuple(args), node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------------------------
# W4A8's per-token amax, compiled: out of the op and into Inductor's kernels.
#
# quantize_act("w4a8") reads x twice: once for each token's amax of |x / smooth| (its scale), once for the codes.
# As ATen ops in the graph the amax is a row reduction that Inductor fuses into the kernel that already writes x
# (the norm and modulation before q/k/v, the GELU before a down projection), and quantize_act_given_amax then reads
# x once. Inductor's fp32 division may differ from IEEE by an ulp on the GPU, so a compiled scale can differ from
# eager's in its last bit (codes then clamp at +-127 instead of reaching 127.5); the CPU's division is exact.
# ------------------------------------------------------------------------------------------------------------------
def _fake_call(graph: torch.fx.Graph, fn, *args) -> torch.fx.Node:
    """A new node ``fn(*args)`` with its fake value (Inductor's lowering reads ``meta["val"]``); call it under the
    graph's fake mode."""
    node = graph.call_function(fn, args)
    node.meta["val"] = fn(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args])
    return node


def split_w4a8_amax(graph: torch.fx.Graph) -> int:
    """Rewrite each ``svdquant.quantize_act(x, smooth, proj_down, "w4a8")`` node of ``graph`` into
    ``amax = (x.float() / smooth.float()).abs().amax(-1, keepdim=True)`` and ``quantize_act_given_amax(x, smooth,
    proj_down, amax)``, in place; returns how many were rewritten."""
    try:
        target = torch.ops.svdquant.quantize_act.default
        given = torch.ops.svdquant.quantize_act_given_amax.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    from torch._guards import detect_fake_mode

    aten, prims = torch.ops.aten, torch.ops.prims
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        precision = node.args[3] if len(node.args) > 3 else node.kwargs.get("precision")
        if precision != "w4a8":
            continue
        x, smooth, proj_down = node.args[:3]
        vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in (x, smooth)]
        fake_mode = detect_fake_mode(vals) if all(isinstance(v, torch.Tensor) for v in vals) else None
        if fake_mode is None:
            continue
        with graph.inserting_before(node), fake_mode:
            xf = _fake_call(graph, prims.convert_element_type.default, x, torch.float32)
            sf = _fake_call(graph, prims.convert_element_type.default, smooth, torch.float32)
            ratio = _fake_call(graph, aten.abs.default, _fake_call(graph, aten.div.Tensor, xf, sf))
            amax = _fake_call(graph, aten.amax.default, ratio, [vals[0].dim() - 1], True)
            new = graph.call_function(given, (x, smooth, proj_down, amax))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


# ------------------------------------------------------------------------------------------------------------------
# W4A8's weights expanded ahead, compiled: each GEMM expands the next one's weight.
#
# The Hopper kernel multiplies int8 weights code * multiplier. gemm expands them from the 4-bit codes on every call,
# in a prep kernel of its own: ~1.5 bytes of DRAM traffic per weight (read 0.5, write 1) that nothing else overlaps,
# ~3.5 ms of a FLUX.1 step on an H200. Keeping the expansion would cost 1 byte per weight of memory (the 0.30x target
# of bf16 forbids it). In a compiled graph the order of the GEMMs is known, so the pass lets each one's kernel expand
# the next one's weight with warps its pipeline leaves idle, while its tensor cores work: gemm_expanded. The first
# GEMM's weight gets an expand_w4a8_weight node. Bit-equal (the same integer products); one expanded weight beyond
# gemm's own workspace is alive at a time.
# ------------------------------------------------------------------------------------------------------------------
# Off: break-even on an H100 FLUX.1 step (linear kernels -0.3 ms, all kernels +0.5 ms; benchmarks/HISTORY.md,
# 2026-12-06); install_compile_pass(expand_ahead=True) turns it on.
EXPAND_AHEAD_DEFAULT = False
_GEMM_ARGS = ("act_codes", "act_scales", "codes", "scales", "global_scale", "down_act", "proj_up", "bias",
              "precision", "out_dtype", "act_unsigned")


def _gemm_args(node: torch.fx.Node) -> dict:
    """A gemm node's arguments by name (act_unsigned defaulted). Read when used: a rewrite before may have replaced
    an argument (replace_all_uses_with)."""
    a = dict(zip(_GEMM_ARGS, node.args))
    a.update(node.kwargs)
    a.setdefault("act_unsigned", False)
    return a


def _device_of(node) -> torch.device | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else None


def expand_w4a8_ahead(graph: torch.fx.Graph) -> int:
    """Rewrite the W4A8 ``svdquant.gemm`` nodes of ``graph``, in graph order, into ``gemm_expanded`` nodes that each
    take their weight's expansion from the previous one and expand the next one's, in place; returns how many were
    rewritten. A chain restarts (with an ``expand_w4a8_weight`` node) where the next weight's codes are computed
    after the current GEMM or live on another device."""
    try:
        target = torch.ops.svdquant.gemm.default
        expand = torch.ops.svdquant.expand_w4a8_weight.default
        expanded = torch.ops.svdquant.gemm_expanded.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    import operator

    from torch._guards import detect_fake_mode

    order = {n: i for i, n in enumerate(graph.nodes)}
    calls = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not target:
            continue
        a = _gemm_args(node)
        if a.get("precision") != "w4a8" or a.get("act_unsigned", False):
            continue
        if not all(isinstance(a[k], torch.fx.Node) for k in ("act_codes", "codes", "scales")):
            continue
        calls.append(node)
    vals = [_gemm_args(n)["act_codes"].meta.get("val") for n in calls]
    fake_mode = detect_fake_mode(vals) if vals and all(isinstance(v, torch.Tensor) for v in vals) else None
    if fake_mode is None:
        return 0
    weight = None  # the expansion of the current call's weight, made by the call before it
    for i, node in enumerate(calls):
        a = _gemm_args(node)
        nxt = _gemm_args(calls[i + 1]) if i + 1 < len(calls) else None
        # the next weight's codes must exist when this call runs, on its device
        if nxt is not None and not (_hoist_view(nxt["codes"], node, order) and _hoist_view(nxt["scales"], node, order)
                                    and _device_of(nxt["codes"]) == _device_of(a["act_codes"])):
            nxt = None
        with graph.inserting_before(node), fake_mode:
            if weight is None:
                weight = _fake_call(graph, expand, a["codes"], a["scales"])
            new = _fake_call(graph, expanded, a["act_codes"], a["act_scales"], a["codes"], a["scales"],
                             a["global_scale"], a["down_act"], a["proj_up"], a.get("bias"), a["out_dtype"], weight,
                             None if nxt is None else nxt["codes"], None if nxt is None else nxt["scales"])
            out = _fake_call(graph, operator.getitem, new, 0)
            weight = None if nxt is None else _fake_call(graph, operator.getitem, new, 1)
        for k, v in node.meta.items():
            out.meta.setdefault(k, v)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return len(calls)


# ------------------------------------------------------------------------------------------------------------------
# W4A8 GEMMs of one quantized activation, compiled: one gemm_cat call.
#
# A FLUX.1 single block's q/k/v (fused: N = 9216) and proj_mlp (N = 12288) read one quantize_act. Each GEMM is a
# persistent launch whose last round of tiles leaves SMs idle: at M = 4608 on 128 x 256 tiles, 1296 and 1728 tiles
# over 132 SMs are 10 and 14 rounds, 3024 together 23. The pass gives such GEMMs to one gemm_cat node (same
# activation, low-rank input, output dtype; placed where the first was) and each former output becomes a column
# slice of its result. Each column is computed as gemm computes it at the tile width chosen for the whole: bit-equal
# on the CPU, and on Hopper wherever that width is the one gemm would choose for the part (else within fp32
# rounding, as the two widths differ). Memory: the workspace holds all the weights' expanded rows at once, and the
# slices keep the whole result alive until the last is read.
# ------------------------------------------------------------------------------------------------------------------
CAT_W4A8_DEFAULT = False
_OWN_META = ("val", "tensor_meta", "eager_input_vals", "original_aten")  # what a slice node must not inherit


def _output_of(node: torch.fx.Node):
    """(producer, index) for an output of a multi-output node: merge_quantize_act leaves each merged call's own
    getitem nodes in place, so equal outputs can be distinct nodes."""
    import operator

    if node.op == "call_function" and node.target is operator.getitem:
        return node.args
    return node


def cat_w4a8_gemms(graph: torch.fx.Graph) -> int:
    """Replace the W4A8 ``svdquant.gemm`` nodes of ``graph`` that read the same activation codes, scales and low-rank
    input (with one output dtype) by one ``gemm_cat`` node per such group and column slices of its output, in place;
    returns how many gemm nodes were replaced. A call joins its group only if its weight parts exist before the
    group's first call."""
    try:
        target = torch.ops.svdquant.gemm.default
        cat = torch.ops.svdquant.gemm_cat.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    from torch._guards import detect_fake_mode

    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not target:
            continue
        a = _gemm_args(node)
        if a.get("precision") != "w4a8" or not all(isinstance(a[k], torch.fx.Node) for k in
                                                   ("act_codes", "act_scales", "down_act", "codes", "scales")):
            continue
        key = (*(_output_of(a[k]) for k in ("act_codes", "act_scales", "down_act")), a["out_dtype"],
               a["act_unsigned"])
        groups.setdefault(key, []).append(node)
    weight_args = ("codes", "scales", "global_scale", "proj_up", "bias")
    done = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = members[0]
        members = [(n, _gemm_args(n)) for n in members]
        # (a graph output stays a gemm of its own: as a column slice of the shared result it would leave the graph
        # non-contiguous and keep the whole result alive)
        members = [(n, a) for n, a in members
                   if all(_hoist_view(a.get(k), first, order) for k in weight_args)
                   and not any(u.op == "output" for u in n.users)]
        if len(members) < 2:
            continue
        a0 = members[0][1]
        vals = [a0["act_codes"].meta.get("val")] + [a["codes"].meta.get("val") for _, a in members]
        fake_mode = detect_fake_mode(vals) if all(isinstance(v, torch.Tensor) for v in vals) else None
        if fake_mode is None:
            continue
        lists = [[a.get(k) for _, a in members] for k in weight_args]

        def val(v):
            return v.meta["val"] if isinstance(v, torch.fx.Node) else v

        args = (a0["act_codes"], a0["act_scales"], lists[0], lists[1], lists[2], a0["down_act"], lists[3], lists[4],
                "w4a8", a0["out_dtype"], a0["act_unsigned"])
        with graph.inserting_before(first), fake_mode:
            new = graph.call_function(cat, args)
            new.meta["val"] = cat(*[[val(v) for v in x] if isinstance(x, list) else val(x) for x in args])
            outs, start = [], 0
            for node, _ in members:
                n = node.meta["val"].shape[-1]
                out = _fake_call(graph, torch.ops.aten.slice.Tensor, new, -1, start, start + n)
                outs.append(out)
                start += n
        for (node, _), out in zip(members, outs):
            for k, v in node.meta.items():
                if k not in _OWN_META:
                    out.meta.setdefault(k, v)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        done += len(members)
    return done


# ------------------------------------------------------------------------------------------------------------------
# Independent linears side by side, compiled: one parallel_linears call per pair.
#
# A FLUX.1 double block sends its image stream (4096 tokens at 1024x1024) and its text stream (512 tokens) through
# linears of the same shapes (fused to_qkv / add_qkv, to_out / to_add_out, ff / ff_context in and out) that do not
# depend on each other. The text stream's are short launches bound by latency: 0.60x-1.04x of bf16 on an H100
# (issue 14, item 4). On a stream of their own (parallel_linears) they can run in the SMs that the image stream's
# kernels leave idle. The pass finds whole linears, quantize_act -> gemm with the quantize_act read by that gemm
# alone, and pairs, in graph order, two of one K, N, precision and dtype of which neither reaches the other. The
# pair becomes one parallel_linears node (the linear with more tokens first: it stays on the caller's stream) placed
# right after the last of their inputs; the nodes before that point which read the first linear's output move to
# after it. Bit-equal: the same kernels run. Linears whose quantize_act the amax split rewrote (given-amax) stay as
# they are, and paired linears leave expand_w4a8_ahead's chain (it runs after this pass).
# ------------------------------------------------------------------------------------------------------------------
# On by default: on an H100 the text stream's marginal cost fell 4.21 -> 3.08 ms per FLUX.1 step (bench_linear
# --pair-ab), and the w4a8 recipe's step from idle 107.0 -> 106.5 and 107.5 -> 105.8 ms compiled, 105.0 -> 103.3 under
# reduce-overhead (three same-run pairs, 36.8 dB against eager either way; benchmarks/HISTORY.md, twenty-ninth
# session).
# install_compile_pass(parallel_linears=False) turns it off.
PARALLEL_LINEARS_DEFAULT = True
_PAIR_WINDOW = 4  # how many later linears of the same shape a linear may pair with (the nearest independent one)


def _whole_linear(gemm_node: torch.fx.Node, quantize) -> dict | None:
    """The arguments of the linear that ``gemm_node`` ends (its quantize_act node as "q", linear's arguments by
    name, its (K, N, ...) pairing key as "key" and its token count as "rows"), or None when it is not one whole
    linear: its activation from a quantize_act that nothing else reads, linear's output dtype (x's)."""
    import operator

    a = _gemm_args(gemm_node)
    srcs = [_output_of(a[k]) if isinstance(a[k], torch.fx.Node) else None
            for k in ("act_codes", "act_scales", "down_act")]
    if not isinstance(srcs[0], tuple):
        return None
    q = srcs[0][0]
    if any(src != (q, i) for i, src in enumerate(srcs)) or q.op != "call_function" or q.target is not quantize:
        return None
    if any(u.target is not operator.getitem or any(v is not gemm_node for v in u.users) for u in q.users):
        return None
    qa = dict(zip(("x", "smooth", "proj_down", "precision", "act_unsigned"), q.args))
    qa.update(q.kwargs)
    qa.setdefault("act_unsigned", False)
    if qa["precision"] != a["precision"] or qa["act_unsigned"] != a["act_unsigned"]:
        return None
    parts = dict(x=qa["x"], smooth=qa["smooth"], proj_down=qa["proj_down"], codes=a["codes"], scales=a["scales"],
                 global_scale=a.get("global_scale"), proj_up=a["proj_up"], bias=a.get("bias"))
    if not all(isinstance(v, torch.fx.Node) or (v is None and k in ("global_scale", "bias")) for k, v in parts.items()):
        return None
    x, out = parts["x"].meta.get("val"), gemm_node.meta.get("val")
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)) or x.dtype != a["out_dtype"]:
        return None
    K = x.shape[-1]
    rows = x.numel() // K if isinstance(x.numel(), int) and isinstance(K, int) else None
    key = (K, out.shape[-1], a["precision"], a["act_unsigned"], x.dtype, x.device)
    return dict(parts, q=q, gemm=gemm_node, key=key, rows=rows, precision=a["precision"],
                act_unsigned=a["act_unsigned"])


def _reaches(node: torch.fx.Node, target: torch.fx.Node, order: dict) -> bool:
    """Whether ``target`` reads ``node``'s value, directly or through other nodes (a search that stops at
    ``target``'s position)."""
    return target in _descendants(node, order[target] + 1, order)


def _descendants(node: torch.fx.Node, limit: int, order: dict) -> set:
    """The nodes before position ``limit`` that read ``node``'s value, directly or through other nodes."""
    seen: set = set()
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n in seen or order[n] >= limit:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def parallelize_linears(graph: torch.fx.Graph) -> int:
    """Give pairs of independent whole linears of one shape in ``graph`` (quantize_act -> gemm) to one
    ``parallel_linears`` node each, in place; returns how many pairs were made."""
    try:
        quantize = torch.ops.svdquant.quantize_act.default
        target = torch.ops.svdquant.gemm.default
        parallel = torch.ops.svdquant.parallel_linears.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    import operator

    from torch._guards import detect_fake_mode

    names = ("x", "smooth", "proj_down", "codes", "scales", "global_scale", "proj_up", "bias")
    keys = {}  # gemm node -> its linear's pairing key
    fake_mode = None
    for n in graph.nodes:
        lin = _whole_linear(n, quantize) if n.op == "call_function" and n.target is target else None
        if lin is not None:
            keys[n] = lin["key"]
            fake_mode = fake_mode or detect_fake_mode([lin["x"].meta["val"]])
    if len(keys) < 2 or fake_mode is None:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    pairs = 0
    for g in list(keys):
        if g not in keys:  # paired already (erased)
            continue
        later = sorted((h for h in keys if h is not g and keys[h] == keys[g] and order[h] > order[g]),
                       key=order.__getitem__)
        h = next((h for h in later[:_PAIR_WINDOW] if not _reaches(g, h, order)), None)
        if h is None:
            continue
        # each linear's operands read now: an earlier pair may have replaced one (a gemm output another reads)
        a, b = _whole_linear(g, quantize), _whole_linear(h, quantize)
        if a is None or b is None:
            continue
        inputs = [lin[k] for lin in (a, b) for k in names if lin[k] is not None]
        last = max(inputs, key=order.__getitem__)
        moved = sorted(_descendants(a["gemm"], order[last], order), key=order.__getitem__)
        first, second = (b, a) if a["rows"] is not None and b["rows"] is not None and b["rows"] > a["rows"] else (a, b)
        args = (*([first[k], second[k]] for k in names), a["precision"], a["act_unsigned"])
        with graph.inserting_before(last.next), fake_mode:
            new = graph.call_function(parallel, args)
            new.meta["val"] = parallel(*[[v.meta["val"] if v is not None else None for v in x]
                                         if isinstance(x, list) else x for x in args])
            outs = []
            for i in range(2):
                out = graph.call_function(operator.getitem, (new, i))
                out.meta["val"] = new.meta["val"][i]
                outs.append(out)
        cursor = outs[-1]
        for n in moved:  # after the pair, in their order
            cursor.append(n)
            cursor = n
        for lin, out in zip((first, second), outs):
            for k, v in lin["gemm"].meta.items():
                if k not in _OWN_META:
                    out.meta.setdefault(k, v)
            lin["gemm"].replace_all_uses_with(out)
            graph.erase_node(lin["gemm"])
            for u in list(lin["q"].users):
                graph.erase_node(u)
            graph.erase_node(lin["q"])
        del keys[g], keys[h]
        order = {n: i for i, n in enumerate(graph.nodes)}
        pairs += 1
    return pairs


# ------------------------------------------------------------------------------------------------------------------
# Weight-only linears that read one input, compiled: one w4a16_linear_group call.
#
# FLUX.1's 77 AdaLN modulation linears (w4a16, one token at batch 1) all read silu(temb), each through its module's
# own SiLU, which the graph keeps as separate nodes (Inductor does not CSE them here). Each GEMV streams 7-28 MB of
# weights at 1.5-2 TB/s (a launch too short to reach the bandwidth): ~1.1-1.3 ms per step; grouped, 0.93 ms on an
# H100. The pass finds inputs computed the same way from the same nodes (value numbering of the pure ops) and gives
# the calls of each such input to one w4a16_linear_group, placed where the first of them was. Bit-equal: the
# grouped kernel sums every row as the single one does.
# ------------------------------------------------------------------------------------------------------------------
# On by default: on an H100 the 77 calls took 1.137 ms one by one and 0.932 grouped (same run, bit-equal), and in a
# FLUX.1-dev step under reduce-overhead the GEMV kernels 1.27 -> 0.96 ms with 107 kernels fewer per step (two
# runs; the step itself moved within noise) (benchmarks/HISTORY.md, 2026-12-06).
# install_compile_pass(group_w4a16=False) turns it off.
GROUP_W4A16_DEFAULT = True


def _pure(target) -> bool:
    """An ATen / prims op that writes none of its arguments and draws no random numbers: equal arguments, equal
    result. (Other libraries' custom ops may have effects their schemas do not declare.)"""
    return (isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims")
            and not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags)


def _value_numbers(graph: torch.fx.Graph) -> dict:
    """Each node's first equivalent in graph order: the same pure op of equivalent arguments (itself otherwise)."""
    canon: dict = {}
    table: dict = {}

    def norm(a):
        if isinstance(a, torch.fx.Node):
            return canon[a]
        if isinstance(a, (list, tuple)):
            return tuple(norm(b) for b in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return (type(a), repr(a))  # not ==: 0.0 == -0.0 and 1 == 1.0 == True are different arguments

    for node in graph.nodes:
        canon[node] = node
        # (factories, with no node among their arguments, stay distinct: two empty buffers are not one value)
        if node.op != "call_function" or not _pure(node.target) or not node.all_input_nodes:
            continue
        sig = (node.target, norm(node.args), norm(node.kwargs))
        try:
            canon[node] = table.setdefault(sig, node)
        except TypeError:  # an unhashable constant argument: keep the node as it is
            pass
    return canon


def _erase_unused(graph: torch.fx.Graph, nodes) -> None:
    """Erase ``nodes`` and then their inputs while they are pure and nothing reads them."""
    todo, erased = list(nodes), set()
    while todo:
        n = todo.pop()
        if n in erased or n.users or n.op != "call_function" or not _pure(n.target):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        todo.extend(inputs)


def group_w4a16(graph: torch.fx.Graph) -> int:
    """Replace the ``svdquant.w4a16_linear`` nodes of ``graph`` whose inputs are equal (the same node, or the same
    pure ops of the same nodes) by one ``w4a16_linear_group`` node per input, in place; returns how many calls were
    grouped. A call joins its input's group only if its weights exist before the group's first call."""
    try:
        target = torch.ops.svdquant.w4a16_linear.default
        grouped = torch.ops.svdquant.w4a16_linear_group.default
    except (AttributeError, RuntimeError):  # the op library is not loaded: no such nodes
        return 0
    import operator

    from torch._guards import detect_fake_mode

    names = ("x", "codes", "scales", "zeros", "bias")
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is target]
    if len(calls) < 2:
        return 0

    def call_args(node):
        a = dict(zip(names, node.args))
        a.update(node.kwargs)
        a.setdefault("bias", None)
        return a

    canon = _value_numbers(graph)
    by_input: dict = {}
    for node in calls:
        a = call_args(node)
        if not all(isinstance(a[k], torch.fx.Node) for k in names[:4]) or not (
                a["bias"] is None or isinstance(a["bias"], torch.fx.Node)):
            continue
        by_input.setdefault(canon[a["x"]], []).append(node)
    replaced: dict = {}  # erased call -> the getitem that took its place (an argument of a later group may be one)
    dropped = []  # the members' own inputs, erased at the end if nothing reads them any more

    def args_of(node):  # read when used, through the replacements so far
        return {k: replaced.get(v, v) for k, v in call_args(node).items()}

    done = 0
    for members in by_input.values():
        if len(members) < 2:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = members[0]
        x = args_of(first)["x"]  # the first call's own input: live, and before the first call
        members = [(n, args_of(n)) for n in members]
        members = [(n, a) for n, a in members if all(_hoist_view(a[k], first, order) for k in names[1:])]
        if len(members) < 2:
            continue
        vals = [x.meta.get("val")] + [a["codes"].meta.get("val") for _, a in members]
        fake_mode = detect_fake_mode(vals) if all(isinstance(v, torch.Tensor) for v in vals) else None
        if fake_mode is None:
            continue
        lists = [[a[k] for _, a in members] for k in names[1:]]
        with graph.inserting_before(first), fake_mode:
            new = graph.call_function(grouped, (x, *lists))
            new.meta["val"] = grouped(x.meta["val"], *[[v.meta["val"] if v is not None else None for v in lst]
                                                        for lst in lists])
            outs = []
            for i in range(len(members)):
                out = graph.call_function(operator.getitem, (new, i))
                out.meta["val"] = new.meta["val"][i]
                outs.append(out)
        for (node, a), out in zip(members, outs):
            for k, v in node.meta.items():
                out.meta.setdefault(k, v)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            replaced[node] = out
            if a["x"] is not x:
                dropped.append(a["x"])
        done += len(members)
    _erase_unused(graph, dropped)
    return done


def _make_pass(inner, amax_split: bool, expand_ahead: bool, group: bool, cat_gemms: bool, parallel: bool):
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class MergeQuantizeAct(CustomGraphPass):
        def __init__(self, inner, amax_split, expand_ahead, group_w4a16, cat_gemms, parallel_linears):
            self.inner = inner
            self.amax_split = amax_split
            self.expand_ahead = expand_ahead
            self.group_w4a16 = group_w4a16
            self.cat_gemms = cat_gemms
            self.parallel_linears = parallel_linears

        def __call__(self, graph: torch.fx.Graph) -> None:
            if self.inner is not None:
                self.inner(graph)
            merge_quantize_act(graph)
            if self.amax_split:
                split_w4a8_amax(graph)
            if self.cat_gemms:
                cat_w4a8_gemms(graph)
            if self.parallel_linears:  # (before expand_ahead, which rewrites the gemm nodes it looks for)
                parallelize_linears(graph)
            if self.expand_ahead:
                expand_w4a8_ahead(graph)
            if self.group_w4a16:
                group_w4a16(graph)

        def uuid(self):
            inner = None
            if self.inner is not None:
                inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
                if inner is None:
                    return None  # an uncacheable inner pass: no cache key
            return (get_hash_for_files((__file__,)), inner, self.amax_split, self.expand_ahead, self.group_w4a16,
                    self.cat_gemms, self.parallel_linears)

    return MergeQuantizeAct(inner, amax_split, expand_ahead, group, cat_gemms, parallel)


def install_compile_pass(amax_split: bool | None = None, expand_ahead: bool | None = None,
                         group_w4a16: bool | None = None, cat_gemms: bool | None = None,
                         parallel_linears: bool | None = None) -> None:
    """Make Inductor run ``merge_quantize_act`` after grad (``torch._inductor.config.post_grad_custom_pre_pass``),
    chained after a pass already installed there. Idempotent.

    amax_split: also run ``split_w4a8_amax`` (W4A8's per-token amax computed by Inductor, the op reading x once);
    None keeps the installed pass's setting (False for a new one), so ``quantize_model`` (which calls this) does not
    undo an earlier ``install_compile_pass(amax_split=True)``. Off by default: on an H200 FLUX.1-dev step it saved
    2.0 ms of quantize_act but cost 4.5 ms in Inductor's kernels, whose pointwise producers (GELU) became row
    reductions (benchmarks/HISTORY.md, 2026-12-05).
    expand_ahead: also run ``expand_w4a8_ahead`` (each W4A8 GEMM expands the next one's weight); None keeps the
    installed pass's setting (``EXPAND_AHEAD_DEFAULT`` for a new one).
    group_w4a16: also run ``group_w4a16`` (the weight-only linears of one input as one call); None keeps the
    installed pass's setting (``GROUP_W4A16_DEFAULT`` for a new one).
    cat_gemms: also run ``cat_w4a8_gemms`` (the W4A8 GEMMs of one quantized activation as one ``gemm_cat`` call);
    None keeps the installed pass's setting (``CAT_W4A8_DEFAULT`` for a new one).
    parallel_linears: also run ``parallelize_linears`` (pairs of independent same-shape linears as one
    ``parallel_linears`` call, the second on a side stream on the GPU); None keeps the installed pass's setting
    (``PARALLEL_LINEARS_DEFAULT`` for a new one)."""
    from torch._inductor import config

    current = config.post_grad_custom_pre_pass
    if getattr(current, "_svdquant_merge", False):
        if amax_split is not None:
            current.amax_split = amax_split
        if expand_ahead is not None:
            current.expand_ahead = expand_ahead
        if group_w4a16 is not None:
            current.group_w4a16 = group_w4a16
        if cat_gemms is not None:
            current.cat_gemms = cat_gemms
        if parallel_linears is not None:
            current.parallel_linears = parallel_linears
        return
    p = _make_pass(current, bool(amax_split), EXPAND_AHEAD_DEFAULT if expand_ahead is None else bool(expand_ahead),
                   GROUP_W4A16_DEFAULT if group_w4a16 is None else bool(group_w4a16),
                   CAT_W4A8_DEFAULT if cat_gemms is None else bool(cat_gemms),
                   PARALLEL_LINEARS_DEFAULT if parallel_linears is None else bool(parallel_linears))
    p._svdquant_merge = True
    config.post_grad_custom_pre_pass = p


def weight_only_linear(x: torch.Tensor, weight: W4A16Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 4-bit weight-only weight: one ``svdquant::w4a16_linear`` call."""
    if x.dtype != weight.dtype:
        raise TypeError(f"W4A16 linear: input dtype {x.dtype} does not match the quantized weight's dtype "
                        f"{weight.dtype}; cast the input or the model")
    if x.dim() and x.shape[-1] != weight.shape[1]:
        raise ValueError(f"W4A16 linear: input has {x.shape[-1]} features (its last dimension), the quantized "
                         f"weight expects in_features={weight.shape[1]}")
    return w4a16_linear(x, weight.codes, weight.scales, weight.zeros, bias)


class _StraightThrough(torch.autograd.Function):
    """A quantized linear whose input or bias needs a gradient (a LoRA trained on a quantized base, guidance by
    gradients): the forward is the quantized layer, the backward that of the dequantized weight (straight-through
    past the activation quantization, the usual estimator). The weight itself is frozen: its codes have no
    gradient."""

    @staticmethod
    def forward(x, weight, bias, forward_fn):
        return forward_fn(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight = inputs[1]
        # a wrapper of its own (a part rebound on the module's weight before backward does not reach it) and its
        # parts saved, so that one written in place before backward raises autograd's usual error
        ctx.weight = alias(weight)
        ctx.save_for_backward(*weight._data_tensors())

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # the version check
        grad_x = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


def _dispatch(forward_fn, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _StraightThrough.apply(x, w, bias, forward_fn)
    return forward_fn(x, w, bias)


@W4A16Tensor.implements(torch.ops.aten.linear.default)
@W4A16Tensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    return _dispatch(weight_only_linear, args, kwargs)


@SVDQuantTensor.implements(torch.ops.aten.linear.default)
@SVDQuantTensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    return _dispatch(quantized_linear, args, kwargs)
