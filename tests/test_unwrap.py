"""``unwrap_weights``: quantized weights held as plain parts, so a compiled call flattens no tensor subclass.

Tiny FLUX (2 double + 2 single blocks), w4a8 with a rank-16 branch and 4-bit weight-only AdaLN linears, q/k/v fused:
22 SVDQuant GEMMs and 20 quantize_act calls per forward (``test_fusion``). Unwrapped and compiled it must run the
same calls (a single block's fused q/k/v and proj_mlp still share one quantize_act: their λ and down projection stay
one graph input) and give the same output as the compiled wrapped model.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import svdquant_ops
from svdquant_ops import SVDQuantTensor, W4A16Tensor, quantize_model
from svdquant_ops.integrations.fusion import fuse_qkv
from svdquant_ops.integrations.lora import load_lora, set_lora_scale, unload_lora
from svdquant_ops.integrations.unwrap import rewrap_weights, unwrap_weights

from .builders import count_calls, flux_inputs, fresh_compile_state, tiny_flux

FUSED_GEMMS, QUANTIZE_ACTS = 22, 20

_fresh = pytest.fixture(autouse=True)(fresh_compile_state)


def _model():
    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=16, weight_only="w4a16")
    fuse_qkv(model)
    return model


def _n_weights(model):
    return sum(isinstance(p, (SVDQuantTensor, W4A16Tensor)) for p in model.parameters())


def test_unwrapped_holds_plain_parts_and_keeps_shared_parts_one_object():
    model = _model()
    n = _n_weights(model)
    assert unwrap_weights(model) == n > 0
    assert _n_weights(model) == 0 and all(type(p) is torch.nn.Parameter for p in model.parameters())
    block = model.single_transformer_blocks[0]
    qkv, mlp = block.attn.to_qkv.weight, block.proj_mlp.weight  # rebuilt at each read
    assert isinstance(qkv, SVDQuantTensor) and qkv.smooth is mlp.smooth and qkv.proj_down is mlp.proj_down
    assert unwrap_weights(model) == 0  # nothing left to unwrap


def test_compiled_unwrapped_equals_compiled_wrapped_with_the_same_calls():
    from torch._dynamo.utils import counters

    model = _model()
    unwrapped = copy.deepcopy(model)
    unwrap_weights(unwrapped)
    inputs = flux_inputs()
    with torch.no_grad():  # the eager quantize_act cache needs version counters: not under inference_mode
        eager, n_e, g_e = count_calls(lambda: unwrapped(**inputs).sample)
        assert torch.equal(eager, model(**inputs).sample) and (n_e, g_e) == (QUANTIZE_ACTS, FUSED_GEMMS)
    with torch.inference_mode():
        ref = torch.compile(model, fullgraph=True)(**inputs).sample
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(unwrapped, fullgraph=True)
        compiled(**inputs)
        out, n, g = count_calls(lambda: compiled(**inputs).sample)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert (n, g) == (QUANTIZE_ACTS, FUSED_GEMMS)
    assert torch.equal(out, ref)


def test_state_dict_layout_and_rewrap_round_trip(tmp_path):
    model = _model()
    ref, n = model.state_dict(), _n_weights(model)
    unwrap_weights(model)
    sd = model.state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert type(sd[k]) is type(v), k
        for f in (v.__tensor_flatten__()[0] if hasattr(v, "__tensor_flatten__") else [None]):
            a, b = (getattr(sd[k], f), getattr(v, f)) if f else (sd[k], v)
            assert torch.equal(a, b), (k, f)
    model.save_pretrained(tmp_path)  # what from_pretrained reads
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    inputs = flux_inputs()
    with torch.inference_mode():
        out = model(**inputs).sample
        assert torch.equal(loaded(**inputs).sample, out)
    assert rewrap_weights(model) == n and _n_weights(model) == n
    block = model.single_transformer_blocks[0]
    assert isinstance(block.attn.to_qkv.weight, SVDQuantTensor)
    assert block.attn.to_qkv.weight.smooth is block.proj_mlp.weight.smooth
    assert "weight" in dict(block.proj_mlp.named_parameters(recurse=False))
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, out)


def test_same_dtype_cast_moves_only_and_rewrap_restores_the_layout():
    model = _model()
    ref_order = [n for n, _ in model.named_parameters()]
    inputs = flux_inputs()
    with torch.inference_mode():
        ref = model(**inputs).sample
    unwrap_weights(model)
    qkv = model.single_transformer_blocks[0].attn.to_qkv
    with torch.inference_mode():  # as pipe.to("cuda", torch.bfloat16) inside inference_mode
        model.to("cpu", torch.bfloat16)
    w = qkv.weight
    assert w.scales.dtype == torch.float32 or w.scales.dtype == _model_scales_dtype()
    assert not w.smooth.is_inference() and w.smooth is model.single_transformer_blocks[0].proj_mlp.weight.smooth
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, ref)
    rewrap_weights(model)
    assert [n for n, _ in model.named_parameters()] == ref_order


def _model_scales_dtype():
    return _model().single_transformer_blocks[0].attn.to_qkv.weight.scales.dtype


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_stay_unwrapped_with_shared_parts(how):
    model = _model()
    unwrap_weights(model)
    other = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert svdquant_ops.integrations.unwrap.is_unwrapped(other) and _n_weights(other) == 0
    block = other.single_transformer_blocks[0]
    assert block.attn.to_qkv.weight.smooth is block.proj_mlp.weight.smooth
    assert block.attn.to_qkv.weight.smooth is not model.single_transformer_blocks[0].attn.to_qkv.weight.smooth
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(other(**inputs).sample, model(**inputs).sample)
    with torch.no_grad():  # the marks on shared parts survive the copy: the eager cache still reuses
        assert count_calls(lambda: other(**inputs).sample)[1] == QUANTIZE_ACTS


def test_refusals_name_the_way_out():
    model = _model()
    unwrap_weights(model)
    for sd, strict in ((model.state_dict(), True), ({}, False)):  # any load, with or without quantized keys
        with pytest.raises(RuntimeError, match="rewrap_weights"):
            model.load_state_dict(sd, strict=strict)
    lin = model.single_transformer_blocks[0].proj_mlp
    with pytest.raises(TypeError, match="cannot assign.*rewrap_weights"):
        lin.weight = lin.weight  # (a Parameter assigned there stops in torch: "attribute 'weight' already exists")

    for fn in (lambda: load_lora(model, {}, "a"), lambda: unload_lora(model),
               lambda: svdquant_ops.fuse_qkv(model), lambda: svdquant_ops.unfuse_qkv(model)):
        with pytest.raises(RuntimeError, match="unwrapped for torch.compile.*rewrap_weights"):
            fn()
    wrapped = _model().to(torch.float16)
    with pytest.raises(TypeError, match=r"cannot convert its parts from torch.bfloat16 to torch.float16.*rewrap"):
        model.to(torch.float16)
    rewrap_weights(model)  # the way out: the quantized parts were left as they were
    model.to(torch.float16)
    inputs = flux_inputs(dtype=torch.float16)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, wrapped(**inputs).sample)
    unwrap_weights(model)
    with pytest.raises(TypeError, match="nn.Module"):
        unwrap_weights(object())
    assert svdquant_ops.unwrap_weights is unwrap_weights and svdquant_ops.rewrap_weights is rewrap_weights



def test_weight_getters_hold_their_values_as_code_constants():
    """Each unwrapped linear's weight property is generated code with the weight's class, attributes and shape as
    constants, not default arguments or closure cells: torch 2.11's Dynamo guards those entry by entry for every
    module (~40 guards per linear; the guard check 5x bf16's on a FLUX.1-dev-depth model), a code object once."""
    from svdquant_ops.integrations import unwrap

    model = _model()
    unwrap_weights(model)
    getters = {type(m).__dict__["weight"].fget for m in model.modules() if hasattr(type(m), unwrap._SPECS)}
    assert len(getters) > 3
    for get in getters:
        assert get.__defaults__ is None and get.__closure__ is None, get
        assert get.__code__.co_filename.startswith("<svdquant_ops unwrapped")
    for value in (None, True, 3, -0.5, float("inf"), float("nan"), "w4a8", torch.bfloat16, (1, (2, 3)), [4],
                  {"dtype": torch.float16, "rank": 16}, ()):
        src = unwrap._literal(value)
        back = eval(src, vars(unwrap))
        assert type(back) is type(value) and (back == value or value != value), (value, src)
    for value in (object(), {1: 2}, torch.device("cpu"), (object(),)):
        assert unwrap._literal(value) is None


def test_weights_named_alike_after_normalization_stay_apart():
    """Two weights whose names Python source would normalize to one identifier (NFKC: a fullwidth "ｗ" is "w")
    each rebuild from their own parts."""
    from svdquant_ops.integrations import unwrap

    model = _model()
    src = model.single_transformer_blocks[0]
    holder = torch.nn.Module()
    holder.register_parameter("w", torch.nn.Parameter(src.attn.to_qkv.weight, requires_grad=False))
    holder.register_parameter("\uff57", torch.nn.Parameter(src.proj_out.weight, requires_grad=False))
    want = {n: getattr(holder, n).dequantize() for n in ("w", "\uff57")}
    unwrap_weights(holder)
    assert hasattr(type(holder), unwrap._SPECS)
    for n, w in want.items():
        assert torch.equal(getattr(holder, n).dequantize(), w), n


def test_a_weight_attribute_without_a_literal_takes_the_default_argument_getter():
    from svdquant_ops.integrations import unwrap

    model = _model()
    lin = model.single_transformer_blocks[0].proj_mlp
    spec = unwrap._Spec(lin.weight)
    spec.sources = tuple((f"weight_part_{n}", None, 0, ()) for n in spec.names)
    spec.meta = {**spec.meta, "extra": object()}  # no literal: the getter keeps it as a default argument
    get = unwrap._getter(spec)
    assert get.__defaults__ is not None
    holder = torch.nn.Module()
    for n in spec.names:
        holder.register_parameter(f"weight_part_{n}", torch.nn.Parameter(getattr(lin.weight, n), requires_grad=False))
    assert torch.equal(get(holder).dequantize(), lin.weight.dequantize())


def test_parts_cast_to_another_dtype_are_refused_on_read():
    model = _model()
    unwrap_weights(model)
    lin = model.single_transformer_blocks[0].proj_out
    flat = lin.weight_parts_bfloat16
    with torch.no_grad():
        flat.data = flat.data.to(torch.float16)
    with pytest.raises(TypeError, match=r"parts changed dtype \(smooth torch.bfloat16 -> torch.float16.*rewrap_weights"):
        lin.weight


def _own_parts_to_meta(qkv, names=None):
    """A single block's to_qkv with its own parts (``names``, default all but the two it shares with proj_mlp) as
    meta parameters: the state diffusers' leaf-level group offloading with streams leaves (this linear's group
    prefetched, the shared parts moved back to the CPU by the previous linear's offload), with meta for the GPU. (The
    CPU cannot move a parameter's data to meta in place, so the read's move itself is tested in test_cuda_unwrap.)"""
    shared = ("weight_part_smooth", "weight_part_proj_down")
    for name in names or [n for n in list(qkv._parameters) if n.startswith("weight_part") and n not in shared]:
        qkv._parameters[name] = torch.nn.Parameter(qkv._parameters[name].to("meta"), requires_grad=False)


def test_a_weight_whose_own_parts_disagree_is_an_error():
    model = _model()
    unwrap_weights(model)
    block = model.single_transformer_blocks[0]
    assert block.attn.to_qkv.weight_part_smooth is block.proj_mlp.weight_part_smooth
    _own_parts_to_meta(block.attn.to_qkv, ["weight_parts_uint8"])  # codes and scales, packed
    with pytest.raises(RuntimeError, match=r"different devices \(codes meta, scales meta, smooth cpu.*proj_up cpu"
                                           r".*as a whole"):
        block.attn.to_qkv.weight
    assert block.proj_mlp.weight.smooth.device.type == "cpu"  # the linear beside it is untouched


def test_a_shared_part_on_another_device_under_compile_is_an_error(monkeypatch):
    """Eagerly the read would move the shared parts to the weight's own device (test_cuda_unwrap); while compiling
    it must not mutate parameters, so it names the ways out."""
    model = _model()
    unwrap_weights(model)
    qkv = model.single_transformer_blocks[0].attn.to_qkv
    _own_parts_to_meta(qkv)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=r"different devices.*cannot be compiled.*block_level.*use_stream=False"):
        qkv.weight


def test_rewrap_keeps_the_order_of_several_weights_in_one_module():
    model = _model()
    block = model.single_transformer_blocks[0]
    holder = torch.nn.Module()
    holder.a = torch.nn.Parameter(block.proj_mlp.weight, requires_grad=False)
    holder.b = torch.nn.Parameter(block.proj_out.weight, requires_grad=False)
    holder.c = torch.nn.Parameter(torch.zeros(1))
    # a (proj_mlp) keeps the λ and down projection it shares with to_qkv as parameters of their own; each weight's
    # other parts of one dtype are packed into one flat parameter, a part alone in its dtype stays its own
    assert unwrap_weights(holder) == 2 and list(dict(holder.named_parameters())) == [
        "c", "a_parts_uint8", "a_part_smooth", "a_part_proj_down", "a_part_proj_up", "a_part_global_scale",
        "b_parts_uint8", "b_parts_bfloat16", "b_part_global_scale"]
    assert rewrap_weights(holder) == 2 and list(dict(holder.named_parameters())) == ["a", "b", "c"]
    assert holder.a.smooth.data_ptr() == block.proj_mlp.weight.smooth.data_ptr()  # the same memory


def test_prepare_compile_is_the_recipe():
    """prepare_compile unwraps every quantized weight and turns the gemm_cat pass on: the compiled tiny FLUX runs one
    gemm_cat per single block, in one graph, with the output of the same model compiled wrapped without the pass."""
    from torch._dynamo.utils import counters

    from svdquant_ops import ops

    model = _model()
    wrapped = copy.deepcopy(model)
    n = _n_weights(model)
    inputs = flux_inputs()
    try:
        with torch.no_grad():
            ops.install_compile_pass(cat_gemms=False)
            ref = torch.compile(wrapped, fullgraph=True)(**inputs).sample
            torch._dynamo.reset()
            counters.clear()
            assert svdquant_ops.prepare_compile(model) == n > 0
            assert _n_weights(model) == 0
            compiled = torch.compile(model, fullgraph=True)
            compiled(**inputs)
            out, cats = count_calls(lambda: compiled(**inputs).sample, ("gemm_cat",))
        assert svdquant_ops.prepare_compile(model) == 0  # nothing left to unwrap
    finally:
        ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    assert cats == len(model.single_transformer_blocks)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="prepare_compile: model must be a torch.nn.Module, got dict"):
        svdquant_ops.prepare_compile({})


def test_packed_parts_are_fewer_graph_inputs_with_the_same_calls_and_output():
    """unwrap_weights packs the parts a weight holds alone into one flat parameter per dtype (each part 256-byte
    aligned in it): fewer graph inputs, the same weights, the same compiled calls (the passes that need every weight
    of a group before its first call still group them) and the same output bit for bit; rewrap gives each part its
    own memory again."""
    from svdquant_ops import ops

    model = _model()
    plain, n_weights = copy.deepcopy(model), _n_weights(model)
    unwrap_weights(model)
    unwrap_weights(plain, pack=False)
    ff, ada = "transformer_blocks.0.ff.net.2", "transformer_blocks.0.norm1.linear"
    mods = dict(model.named_modules())
    assert list(dict(mods[ff].named_parameters(recurse=False))) == [
        "bias", "weight_parts_uint8", "weight_parts_bfloat16", "weight_part_global_scale"]
    assert list(dict(mods[ada].named_parameters(recurse=False))) == [
        "bias", "weight_parts_bfloat16", "weight_part_codes"]
    assert len(list(model.parameters())) < len(list(plain.parameters()))
    plain_mods = dict(plain.named_modules())
    for name in (ff, ada, "single_transformer_blocks.0.attn.to_qkv"):
        w, ref = mods[name].weight, plain_mods[name].weight
        for f in w.__tensor_flatten__()[0]:
            part = getattr(w, f)
            assert torch.equal(part, getattr(ref, f)), (name, f)
            assert part.storage_offset() * part.element_size() % 256 == 0, (name, f)
    inputs = flux_inputs()
    calls = ("quantize_act", "gemm", "gemm_cat", "w4a16_linear_group")
    try:
        ops.install_compile_pass(cat_gemms=True)
        with torch.inference_mode():
            runs = []
            for m in (model, plain):
                torch._dynamo.reset()
                compiled = torch.compile(m, fullgraph=True)
                compiled(**inputs)
                runs.append(count_calls(lambda: compiled(**inputs).sample, calls))
    finally:
        ops.install_compile_pass(cat_gemms=ops.CAT_W4A8_DEFAULT)
    (out, *n), (ref_out, *ref_n) = runs
    assert n == ref_n and n[2] == len(model.single_transformer_blocks) and n[3] >= 1, (n, ref_n)
    assert torch.equal(out, ref_out)
    # a write into a part through the weight lands in the packed parameter (set_lora_scale writes this way)
    up = mods[ff].weight.proj_up
    before = up.clone()
    with torch.no_grad():
        up.mul_(2)
    assert torch.equal(mods[ff].weight.proj_up, before * 2)
    with torch.no_grad():
        mods[ff].weight.proj_up.copy_(before)
    assert rewrap_weights(model) == n_weights
    for name in (ff, ada):
        w = mods[name].weight
        for f in w.__tensor_flatten__()[0]:
            part = getattr(w, f)
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size(), (name, f)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, plain(**inputs).sample)


def test_lora_strength_changes_after_unwrapping_with_packed_parts():
    """load_lora, then the compile recipe's unwrapping, then set_lora_scale (strength changes without recompiling):
    with packed parts a linear's own λ and down projection are new views at each read, and the LoRA group check must
    still see them as the group's (it compared objects). Also under inference_mode: the packed parameters are normal
    tensors, so the in-place writes outside it work. Outputs equal the wrapped model's at each strength."""
    from .test_lora import _lora

    model = _model()
    names = ["transformer_blocks.0.attn.to_qkv", "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.proj_mlp"]
    load_lora(model, _lora(model, names, rank=4, seed=3, dtype=torch.bfloat16), "a", scale=0.5)
    wrapped = copy.deepcopy(model)
    with torch.inference_mode():  # as a pipeline's setup may run
        unwrap_weights(model)
    assert not any(p.is_inference() for p in model.parameters())
    assert any(n.endswith("weight_parts_bfloat16") for n, _ in
               model.transformer_blocks[1].ff.net[2].named_parameters(recurse=False))
    inputs = flux_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # exact: the eager ops, traced once
    with torch.inference_mode():
        compiled(**inputs)
    for scale in (0.3, -1.0):
        set_lora_scale(model, "a", scale)
        set_lora_scale(wrapped, "a", scale)
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**inputs).sample  # the graph reads the packed parameters' memory: it sees the write
            assert torch.equal(out, wrapped(**inputs).sample) and torch.equal(model(**inputs).sample, out), scale
    with torch.inference_mode():
        assert rewrap_weights(model) > 0
    assert not any(getattr(p, f).is_inference() for p in model.parameters() if hasattr(p, "__tensor_flatten__")
                   for f in p.__tensor_flatten__()[0])
