"""One activation quantization per input (issue 14 item 1): linears that read the same tensor share λ and one
concatenated down projection (``share_inputs``), and run one ``svdquant::quantize_act`` eagerly (the ops' one-entry
cache) and compiled (the ``merge_quantize_act`` post-grad pass), with outputs bit-identical to the unshared model.

Tiny FLUX (2 double + 2 single blocks): 34 SVDQuant linears per forward (12 per double block, 5 per single block),
so 34 quantize_act calls unshared; shared, q/k/v and add_q/k/v each read one input (8 inputs per double block) and
a single block's q/k/v + proj_mlp read one (2 inputs per single block): 20.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, ops, prepare_model, quantize_model
from svdquant_ops.quantize.sharing import share_inputs
from svdquant_ops.storage import SVDQuantTensor
from svdquant_ops.storage.shared_moves import SHARED_MARK

from .builders import assert_cuda_graph_replays_eager, fresh_compile_state, flux_inputs, tiny_flux

UNSHARED, SHARED = 34, 20


_fresh = pytest.fixture(autouse=True)(fresh_compile_state)  # no Dynamo cache or cached quantization between tests


def _quantized_pair():
    model = tiny_flux()
    prepare_model(model)
    quantize_(model, SVDQuantConfig())
    unshared = copy.deepcopy(model)
    assert share_inputs(model) == 6  # 2 x (qkv, added_qkv) + 2 x single-block input
    return unshared, model


def _same(*ts) -> bool:
    # one tensor object, through nn.Parameter's detach and moves: torch.compile makes it one graph input
    return all(t is ts[0] for t in ts)


def _quantized_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor)]


def _identical_parts_are_marked(model) -> bool:
    """Every part object that several quantized weights hold carries the shared mark (without it AOTAutograd's cache
    would not be bypassed for that layout)."""
    holders: dict = {}
    for w in _quantized_weights(model):
        for name in w.__tensor_flatten__()[0]:
            t = getattr(w, name)
            holders.setdefault(id(t), []).append(t)
    shared = [ts[0] for ts in holders.values() if len(ts) > 1]
    return bool(shared) and all(getattr(t, SHARED_MARK, False) for t in shared)


def _count(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return out, names.count("svdquant::quantize_act"), names.count("svdquant::gemm")


def _against_unshared(unshared, model, inputs, mode=torch.no_grad):
    """(quantize_act calls of ``model``'s forward, whether its output equals the unshared model's bit for bit)."""
    with mode():
        ref = unshared(**inputs).sample
        out, n, _ = _count(lambda: model(**inputs).sample)
    return n, torch.equal(out, ref)


def test_groups_share_tensors():
    unshared, model = _quantized_pair()
    attn = model.transformer_blocks[0].attn
    q, k, v = (getattr(attn, n).weight for n in ("to_q", "to_k", "to_v"))
    assert _same(q.proj_down, k.proj_down, v.proj_down) and _same(q.smooth, k.smooth, v.smooth)
    assert q.rank == 32  # data-free q/k/v: one SVD of the stacked weights, one down projection
    uq, uk = unshared.transformer_blocks[0].attn.to_q.weight, unshared.transformer_blocks[0].attn.to_k.weight
    assert torch.equal(uq.proj_down, uk.proj_down) and not _same(uq.proj_down, uk.proj_down)
    assert not _same(attn.add_q_proj.weight.proj_down, q.proj_down)  # the text stream reads another tensor
    block = model.single_transformer_blocks[0]
    mlp, sq = block.proj_mlp.weight, block.attn.to_q.weight
    assert _same(mlp.proj_down, sq.proj_down) and _same(mlp.smooth, sq.smooth) and mlp.rank == 64  # [pd_qkv | pd_mlp]
    cols_mlp, cols_q = mlp.proj_up.abs().sum(0) != 0, sq.proj_up.abs().sum(0) != 0  # own columns, zeros elsewhere
    assert int(cols_mlp.sum()) == 32 and int(cols_q.sum()) == 32 and not (cols_mlp & cols_q).any()
    assert block.proj_out.weight.rank == 32  # reads another input
    assert _identical_parts_are_marked(model)
    assert share_inputs(model) == 0  # idempotent


def test_eager_one_quantization_per_input_bit_identical():
    unshared, model = _quantized_pair()
    inputs = flux_inputs()
    with torch.no_grad():
        ref, n_ref, g_ref = _count(lambda: unshared(**inputs).sample)
        out, n, g = _count(lambda: model(**inputs).sample)
        again = model(**inputs).sample
    assert (n_ref, g_ref) == (UNSHARED, UNSHARED)
    assert (n, g) == (SHARED, UNSHARED)
    assert torch.equal(out, ref) and torch.equal(again, ref)


def test_inference_mode_is_not_cached():
    # Inference tensors have no version counter: an in-place write could not be detected, so no reuse eagerly.
    unshared, model = _quantized_pair()
    assert _against_unshared(unshared, model, flux_inputs(), torch.inference_mode) == (UNSHARED, True)


def test_cache_sees_in_place_writes():
    _, model = _quantized_pair()
    attn = model.transformer_blocks[0].attn
    x = torch.randn(2, 5, attn.to_q.in_features).to(torch.bfloat16)
    with torch.no_grad():
        q1 = attn.to_q(x)
        expect = attn.to_k(x * 2)
        ops.clear_act_cache()
        attn.to_q(x)
        x.mul_(2)  # same object, new values: must not reuse the quantization of the old values
        k = attn.to_k(x)
        assert torch.equal(k, expect)
        assert torch.equal(attn.to_q(x / 2), q1)


def test_writes_the_version_counter_misses_do_not_serve_stale_codes():
    """Writes through .data (or numpy memory) do not bump the version counter: a linear called again on the same
    tensor quantizes it again (each weight takes an entry once), and an unshared linear never uses the cache."""
    unshared, model = _quantized_pair()
    for m in (unshared, model):
        attn = m.transformer_blocks[0].attn
        x = torch.randn(2, 5, attn.to_q.in_features).to(torch.bfloat16)
        with torch.no_grad():
            q1 = attn.to_q(x)
            expect = attn.to_q(x * 2)
            ops.clear_act_cache()
            assert torch.equal(attn.to_q(x), q1)
            x.data.mul_(2)
            assert torch.equal(attn.to_q(x), expect)


def test_shares_again_after_copies():
    # What loading a saved model gives: every member with its own copies of equal tensors.
    unshared, model = _quantized_pair()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and isinstance(m.weight, SVDQuantTensor):
            w = m.weight
            m.weight = torch.nn.Parameter(SVDQuantTensor(
                w.codes, w.scales, w.smooth.clone(), w.proj_down.clone(), w.proj_up, w.precision, w.act_unsigned,
                w.layout_version, w.dtype, global_scale=w.global_scale, bias_correction=w.bias_correction),
                requires_grad=False)
    assert share_inputs(model) == 6
    assert _against_unshared(unshared, model, flux_inputs()) == (SHARED, True)


def test_quantize_model_shares():
    model = tiny_flux()
    quantize_model(model)
    attn = model.transformer_blocks[1].attn
    assert _same(attn.to_q.weight.proj_down, attn.to_v.weight.proj_down)
    inputs = flux_inputs()
    with torch.no_grad():
        _, n, _ = _count(lambda: model(**inputs).sample)
    assert n == SHARED


def test_compiled_aot_merge_bit_identical():
    _, model = _quantized_pair()
    seen = []

    def fw(gm, example_inputs):
        nodes = [n for n in gm.graph.nodes if n.target is torch.ops.svdquant.quantize_act.default]
        # a part several weights hold as one object is one placeholder: the nodes to merge have identical arguments
        assert len({n.args[1] for n in nodes}) == SHARED
        seen.append((len(nodes), ops.merge_quantize_act(gm.graph)))
        gm.recompile()
        return gm

    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=fw))
    inputs = flux_inputs()
    with torch.inference_mode():
        eager = model(**inputs).sample
        compiled(**inputs)
        out, n, _ = _count(lambda: compiled(**inputs).sample)
    assert seen == [(UNSHARED, UNSHARED - SHARED)]
    assert n == SHARED and torch.equal(out, eager)


def test_compiled_inductor_pass():
    from torch._inductor import config

    unshared, model = _quantized_pair()
    inputs = flux_inputs()
    with torch.inference_mode():
        eager = model(**inputs).sample
    with config.patch(post_grad_custom_pre_pass=None, fx_graph_cache=False):
        with torch.inference_mode():
            plain = torch.compile(unshared, fullgraph=True)(**inputs).sample
        torch._dynamo.reset()
        ops.install_compile_pass()
        ops.install_compile_pass()  # idempotent: one pass
        assert getattr(config.post_grad_custom_pre_pass, "inner", None) is None
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            compiled(**inputs)
            out, n, _ = _count(lambda: compiled(**inputs).sample)
    assert n == SHARED
    assert torch.equal(out, plain)  # same graph but for the merged calls
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)  # Inductor's fused elementwise rounding


def _merging_aot(merged: list):
    """An aot_eager-like backend that runs the merge pass (bit-identical to eager) and records what it merged."""
    def fw(gm, example_inputs):
        merged.append(ops.merge_quantize_act(gm.graph))
        gm.recompile()
        return gm
    return aot_autograd(fw_compiler=fw)


@pytest.mark.parametrize("how", ["rebind", "assign"])
def test_unsharing_a_compiled_weight_recompiles(how):
    """A member given a λ of its own after compiling (its inner tensor rebound, or a new weight assigned) must not
    keep its group's merged quantization: Dynamo guards that the members' parts are one object, so the change
    recompiles, and the output is eager's bit for bit."""
    _, model = _quantized_pair()
    merged = []
    compiled = torch.compile(model, fullgraph=True, backend=_merging_aot(merged))
    inputs = flux_inputs()
    with torch.inference_mode():
        before = compiled(**inputs).sample
        v = model.transformer_blocks[0].attn.to_v  # no norm after V: its λ shows in the output
        w = v.weight
        smooth = w.smooth.clone() * 4
        if how == "rebind":
            w.smooth = smooth
        else:
            v.weight = nn.Parameter(SVDQuantTensor(
                w.codes, w.scales, smooth, w.proj_down, w.proj_up, w.precision, w.act_unsigned, w.layout_version,
                w.dtype, global_scale=w.global_scale, bias_correction=w.bias_correction), requires_grad=False)
        eager = model(**inputs).sample
        compiled(**inputs)  # recompiles (the profiler would count the tracing's calls too)
        out, n, _ = _count(lambda: compiled(**inputs).sample)
    assert not torch.equal(eager, before)
    assert torch.equal(out, eager)
    assert merged == [UNSHARED - SHARED, UNSHARED - SHARED - 1] and n == SHARED + 1  # to_v quantizes on its own


def test_views_of_one_memory_are_not_merged():
    """Parts that are views of one memory but separate objects are separate graph inputs, which a caller may rebind
    one at a time and which nothing guards together: the pass leaves their calls alone."""
    _, model = _quantized_pair()
    for w in _quantized_weights(model):
        w.smooth, w.proj_down = w.smooth.view(w.smooth.shape), w.proj_down.view(w.proj_down.shape)
    merged = []
    inputs = flux_inputs()
    compiled = torch.compile(model, fullgraph=True, backend=_merging_aot(merged))
    with torch.inference_mode():
        eager = model(**inputs).sample
        compiled(**inputs)
        out, n, _ = _count(lambda: compiled(**inputs).sample)
    assert merged == [0] and n == UNSHARED and torch.equal(out, eager)


def test_shared_weights_stay_out_of_the_aot_autograd_cache(tmp_path, monkeypatch):
    """AOTAutograd keys its cache by each weight alone, which cannot show that weights hold one part object: the
    graph compiled for the shared model (its quantize_act calls merged) must not be reused for a model with separate
    parts of the same shapes (Inductor's own cache keys the graph, where the sharing shows)."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache
    from torch._inductor import config

    _, model = _quantized_pair()
    separate = copy.deepcopy(model)
    for w in _quantized_weights(separate):
        w.smooth, w.proj_down = w.smooth.clone(), w.proj_down.clone()
    separate.transformer_blocks[0].attn.to_v.weight.smooth.mul_(4)
    with pytest.raises(BypassAOTAutogradCache):
        model.transformer_blocks[0].attn.to_q.weight._stable_hash_for_caching()
    assert isinstance(separate.transformer_blocks[0].attn.to_q.weight._stable_hash_for_caching(), str)
    inputs = flux_inputs()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ops.install_compile_pass()
    outs = {}
    for name, m, cached in (("shared", model, True), ("separate", separate, True), ("fresh", separate, False)):
        torch._dynamo.reset()
        counters.clear()
        with config.patch(fx_graph_cache=cached), functorch_config.patch(enable_autograd_cache=cached):
            with torch.inference_mode():
                outs[name] = torch.compile(m, fullgraph=True)(**inputs).sample
        if name == "shared":
            assert counters["aot_autograd"]["autograd_cache_bypass"] == 1
    assert torch.equal(outs["separate"], outs["fresh"])  # not the shared model's graph
    with torch.inference_mode():
        torch.testing.assert_close(outs["separate"], separate(**inputs).sample, rtol=2e-2, atol=2e-2)


def test_nunchaku_row_split_marks_the_parts_it_shares():
    """A Nunchaku file's fused q/k/v split into three linears holding one λ and one down projection object: marked
    like share_inputs' groups, so their graph stays out of AOTAutograd's cache too."""
    from svdquant_ops.integrations.nunchaku import split_rows

    unshared, _ = _quantized_pair()
    w = unshared.transformer_blocks[0].attn.to_q.weight
    assert not getattr(w.smooth, SHARED_MARK, False)
    parts = [p for p, _ in split_rows(w, None, [w.shape[0] // 2] * 2)]
    assert parts[0].smooth is parts[1].smooth and parts[0].proj_down is parts[1].proj_down
    assert all(p.__tensor_flatten__()[1].get("holds_shared") for p in parts)


_MOVES = [("fp16", lambda m: m.to(torch.float16))]
if torch.cuda.is_available():
    _MOVES.append(("cuda", lambda m: m.to("cuda")))


@pytest.mark.parametrize("name,move", _MOVES, ids=[n for n, _ in _MOVES])
def test_a_move_keeps_the_sharing(name, move):
    """nn.Module._apply moves each weight alone; the parts the members of a group share are moved once and stay
    shared (one quantize_act per input after the move), bit-identical to the moved unshared model."""
    unshared, model = _quantized_pair()
    move(unshared), move(model)
    dtype = torch.float16 if name == "fp16" else torch.bfloat16
    device = "cuda" if name == "cuda" else "cpu"
    inputs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
              (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in flux_inputs().items()}
    attn = model.transformer_blocks[0].attn
    assert attn.to_q.weight.proj_down.dtype == dtype and attn.to_q.weight.device.type == device
    for part in ("proj_down", "smooth"):
        assert _same(getattr(attn.to_q.weight, part), getattr(attn.to_k.weight, part))
    assert not _same(attn.to_q.weight.proj_up, attn.to_k.weight.proj_up)  # each member's own part stays its own
    assert _identical_parts_are_marked(model)
    assert share_inputs(model) == 0  # nothing left to share
    assert _against_unshared(unshared, model, inputs) == (SHARED, True)


def test_moves_map_shared_parts_to_shared_copies_only():
    """Shared in, shared out: weights that share a part get one copy of it; two moves of one weight get independent
    copies; a copy is not handed on once it or its source has been written to."""
    _, model = _quantized_pair()
    attn = model.transformer_blocks[0].attn
    q, k = attn.to_q.weight, attn.to_k.weight
    a, b = q.to(torch.float16), k.to(torch.float16)
    assert _same(a.proj_down, b.proj_down) and _same(a.smooth, b.smooth)
    assert not _same(a.codes, b.codes) and not _same(a.proj_up, b.proj_up)  # each weight's own parts
    a2 = q.to(torch.float16)  # the same weight again: an independent copy
    assert not _same(a2.proj_down, a.proj_down) and torch.equal(a2.proj_down, a.proj_down)
    a2.proj_down.mul_(2)  # the latest copy written: the next move copies again
    c = k.to(torch.float16)
    assert not _same(c.proj_down, a2.proj_down) and torch.equal(c.proj_down, q.proj_down.to(torch.float16))
    e = k.to(torch.float16)
    assert _same(e.smooth, c.smooth)
    q.smooth.data.mul_(2)  # the source written through another weight's view, unseen by version counters
    q.proj_down.data.mul_(2)
    d = k.to(torch.float16)
    assert not _same(d.smooth, c.smooth) and torch.equal(d.smooth, k.smooth.to(torch.float16))
    assert not _same(d.proj_down, c.proj_down) and torch.equal(d.proj_down, k.proj_down.to(torch.float16))


def test_a_move_under_inference_mode_keeps_the_sharing():
    """Offload hooks move weights inside the pipeline's inference_mode: the shared parts stay shared (their copies
    are made as normal tensors), the others become inference tensors as before."""
    _, model = _quantized_pair()
    with torch.inference_mode():
        model.to(torch.float16)
    attn = model.transformer_blocks[0].attn
    assert _same(attn.to_q.weight.proj_down, attn.to_k.weight.proj_down)
    assert not attn.to_q.weight.proj_down.is_inference() and attn.to_q.weight.codes.is_inference()
    assert _identical_parts_are_marked(model)
    assert share_inputs(model) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph capture)")
def test_cuda_graph_capture_bypasses_the_cache():
    """An eager call right before a capture must not let the capture reuse its quantization: the graph would then
    replay the GEMMs on the codes of the capture-time input. Replays follow new inputs, bit-identical to eager."""
    _, model = _quantized_pair()
    model.cuda()
    share_inputs(model)
    attn = model.transformer_blocks[0].attn
    x = torch.randn(2, 5, attn.to_q.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # cached: a normal tensor outside inference mode
        # its warm-up call fills the cache with the static input's quantization right before the capture
        assert_cuda_graph_replays_eager(lambda t: torch.cat([attn.to_q(t), attn.to_k(t), attn.to_v(t)], -1), x)


def _parts(model) -> dict:
    return {f"{n}.{p}": getattr(m.weight, p) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor)
            for p in m.weight.__tensor_flatten__()[0]}


def test_load_state_dict_into_a_shared_model_keeps_each_members_values():
    """An in-place load_state_dict writes each member's parts into the one tensor the group shares: a checkpoint
    whose members differ (here to_v given its own λ) must not leave the last member's values in all of them. What
    the checkpoint gives all holders alike is written in place (the group's down projection)."""
    _, src = _quantized_pair()
    v = src.transformer_blocks[0].attn.to_v.weight
    v.smooth = v.smooth * 2  # to_v's own λ; its siblings keep the group's
    expected = _parts(src)
    dst = tiny_flux(seed=1)  # another quantization of the same shapes, shared
    prepare_model(dst)
    quantize_(dst, SVDQuantConfig())
    assert share_inputs(dst) == 6
    before = dst.transformer_blocks[0].attn.to_q.weight.proj_down
    dst.load_state_dict(src.state_dict())
    got = _parts(dst)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    attn = dst.transformer_blocks[0].attn
    assert _same(attn.to_q.weight.smooth, attn.to_k.weight.smooth) and not _same(attn.to_q.weight.smooth,
                                                                               attn.to_v.weight.smooth)
    assert _same(before, attn.to_q.weight.proj_down, attn.to_k.weight.proj_down, attn.to_v.weight.proj_down)
    block = dst.single_transformer_blocks[1]
    assert _same(block.proj_mlp.weight.smooth, block.attn.to_q.weight.smooth)
    assert _identical_parts_are_marked(dst)
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(dst(**inputs).sample, src(**inputs).sample)


def test_a_shared_checkpoint_loads_in_place_under_inference_mode_and_partially():
    """The common load (another shared model of the same layout) writes every part in place, keeping the sharing and
    the objects (a captured CUDA graph reads the same memory), also under inference_mode, after which the model still
    loads outside it (state_dict() under inference_mode too); a partial load (strict=False) of two members of a group
    gives them their own copies and leaves the ranks alone, so the full checkpoint still loads."""
    _, src = _quantized_pair()
    dst = tiny_flux(seed=1)
    prepare_model(dst)
    quantize_(dst, SVDQuantConfig())
    share_inputs(dst)
    objects = {k: id(v) for k, v in _parts(dst).items()}
    with torch.inference_mode():
        dst.load_state_dict(src.state_dict())
    assert {k: id(v) for k, v in _parts(dst).items()} == objects
    assert not dst.transformer_blocks[0].attn.to_q.weight.is_inference()
    dst.load_state_dict(src.state_dict())
    assert all(torch.equal(v, _parts(src)[k]) for k, v in _parts(dst).items())
    other = tiny_flux(seed=2)
    prepare_model(other)
    quantize_(other, SVDQuantConfig())
    share_inputs(other)
    part = {k: v for k, v in other.state_dict().items() if k.startswith(("transformer_blocks.0.attn.to_q.",
                                                                         "transformer_blocks.0.attn.to_k."))}
    dst.load_state_dict(part, strict=False)
    attn = dst.transformer_blocks[0].attn
    assert {attn.to_q.weight.rank, attn.to_v.weight.rank} == {32}
    # to_v was not in the load: the shared tensors keep its values, the loaded members get their own copies
    assert not _same(attn.to_q.weight.proj_down, attn.to_v.weight.proj_down)
    assert torch.equal(attn.to_q.weight.proj_down, part["transformer_blocks.0.attn.to_q.weight"].proj_down)
    assert torch.equal(attn.to_v.weight.proj_down, src.transformer_blocks[0].attn.to_v.weight.proj_down)
    dst.load_state_dict(src.state_dict())
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(dst(**inputs).sample, src(**inputs).sample)


def test_load_state_dict_into_one_member_leaves_its_siblings_alone():
    _, model = _quantized_pair()
    attn = model.transformer_blocks[0].attn
    k_smooth = attn.to_k.weight.smooth.clone()
    sd = attn.to_q.state_dict()
    sd["weight"] = copy.deepcopy(sd["weight"])
    sd["weight"].smooth = sd["weight"].smooth * 2
    attn.to_q.load_state_dict(sd)
    assert torch.equal(attn.to_q.weight.smooth, sd["weight"].smooth)
    assert torch.equal(attn.to_k.weight.smooth, k_smooth) and _same(attn.to_k.weight.smooth, attn.to_v.weight.smooth)


def test_only_fake_weights_holding_shared_parts_refuse_pickling(tmp_path):
    """torch 2.11's AOTAutograd cache key pickles the fake weights (it has no _stable_hash_for_caching): a fake that
    holds shared parts raises the bypass inside that key's computation only; other pickles of it, and real shared
    weights, work (torch.save)."""
    import pickle

    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, model = _quantized_pair()
    q = model.transformer_blocks[0].attn.to_q.weight
    names, ctx = q.__tensor_flatten__()
    assert ctx["holds_shared"]
    with FakeTensorMode() as mode:
        parts = {n: mode.from_tensor(getattr(q, n)) for n in names}
        fake = type(q).__tensor_unflatten__(parts, ctx, q.shape, q.stride())
    import types

    from torch._functorch._aot_autograd import autograd_cache

    dumps = pickle.dumps

    def autograd_cache_key():  # run below as a function of torch's module: the frame __reduce_ex__ looks for
        return dumps(fake)

    key_fn = types.FunctionType(autograd_cache_key.__code__, vars(autograd_cache), "autograd_cache_key", None,
                                autograd_cache_key.__closure__)
    with pytest.raises(BypassAOTAutogradCache):
        key_fn()
    with torch.serialization.skip_data(materialize_fake_tensors=True):  # any other pickle of a fake works
        torch.save(fake, tmp_path / "fake.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = tiny_flux(seed=1)
    prepare_model(other)
    quantize_(other, SVDQuantConfig())
    share_inputs(other)
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(other(**inputs).sample, model(**inputs).sample)
