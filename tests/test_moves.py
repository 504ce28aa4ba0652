"""Device and dtype moves of quantized weights and modules, in grad mode, no_grad and inference_mode (under
inference_mode the aten.to overloads reach the subclass undecomposed). Moves to "meta" stand in for a device
change on this CPU-only machine; the GPU moves are in test_cuda_model.py."""

from __future__ import annotations

import copy

import pytest
import torch

from svdquant_ops import SVDQuantTensor, W4A16Tensor, quantize_weight

MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture(scope="module", params=["int4", "nvfp4", "w4a8", "w4a16"])
def layer(request):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    w = lin.weight.detach()
    q = W4A16Tensor.from_float(w) if request.param == "w4a16" else quantize_weight(w, request.param, 16)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    return lin


MODULE_MOVES = {
    "to(meta)": (lambda m: m.to("meta"), "meta", torch.bfloat16),
    "to(device, dtype)": (lambda m: m.to("meta", torch.float16), "meta", torch.float16),
    "to(dtype)": (lambda m: m.to(torch.float16), "cpu", torch.float16),
    "half()": (lambda m: m.half(), "cpu", torch.float16),
    "float()": (lambda m: m.float(), "cpu", torch.float32),
    "to(meta, non_blocking)": (lambda m: m.to("meta", non_blocking=True), "meta", torch.bfloat16),
    "to(cpu, non_blocking)": (lambda m: m.to("cpu", non_blocking=True), "cpu", torch.bfloat16),
    "cpu()": (lambda m: m.cpu(), "cpu", torch.bfloat16),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("move", sorted(MODULE_MOVES))
def test_module_moves(layer, mode, move):
    fn, device, dtype = MODULE_MOVES[move]
    m = copy.deepcopy(layer)
    with MODES[mode]():
        out = fn(m)
    w = out.weight
    assert type(w) is type(layer.weight) and w.device.type == device and w.dtype == dtype
    assert all(t.device.type == device for t in w._data_tensors())
    assert all(getattr(w, name).dtype == dtype for name in w.dtype_fields)  # SVDQuant: λ and the low-rank factors
    assert w.codes.dtype == torch.uint8 and w.scales.dtype == layer.weight.scales.dtype  # scales keep their dtype
    if device == "cpu":  # codes and scales stay bit-exact through a dtype change
        assert torch.equal(w.codes, layer.weight.codes) and torch.equal(w.scales, layer.weight.scales)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tensor_to_overloads(layer, mode):
    w = layer.weight
    with MODES[mode]():
        by_other = w.to(torch.zeros(1, dtype=torch.float16))
        by_dtype = w.to(torch.float32)
        by_device = w.to("meta")
        alias = w.to("cpu")
        forced = w.to("cpu", copy=True)
    assert by_other.dtype == torch.float16 and by_dtype.dtype == torch.float32 and by_device.device.type == "meta"
    assert alias.codes is w.codes  # nothing to do: an alias of the same parts, as aten.to returns
    assert forced.codes is not w.codes and torch.equal(forced.codes, w.codes)
    positional = w.to("cpu", w.dtype, False, True)  # non_blocking, copy given positionally
    assert positional.codes is not w.codes
    x = torch.randn(2, 128)
    with MODES[mode]():
        moved = x.to(w)  # the weight as the reference of a plain tensor's move
    assert type(moved) is torch.Tensor and moved.dtype == w.dtype


def test_bad_dtype_is_a_clear_error(layer):
    with pytest.raises(TypeError, match="can only be cast to"):
        layer.weight.to(torch.int8)


def test_accelerate_sequential_offload_rebuilds_the_parameter():
    """accelerate's cpu_offload (what enable_sequential_cpu_offload uses) moves weights to "meta" and back by
    calling type(param)(value, requires_grad=...): the quantized weight must survive that, outputs unchanged."""
    from accelerate import cpu_offload

    from svdquant_ops import quantize_model

    from .builders import flux_inputs, tiny_flux

    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=8)
    inputs = flux_inputs()
    with torch.inference_mode():
        ref = model(**inputs).sample
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.transformer_blocks[0].attn.to_q.weight.device.type == "meta"
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, ref)
    with pytest.raises(ValueError, match="requires_grad=True"):
        SVDQuantTensor(model.transformer_blocks[0].attn.to_k.weight, requires_grad=True)


def test_to_empty_then_load_state_dict_reproduces_the_model():
    """A model built on the meta device, then ``to_empty`` and a state-dict load (accelerate's and many loaders'
    path): every part is allocated with its dtype, and the load gives back the outputs bit for bit."""
    from svdquant_ops import quantize_model

    from .builders import flux_inputs, tiny_flux

    model = tiny_flux()
    quantize_model(model, precision="w4a8", rank=8)
    empty = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    w, src = empty.transformer_blocks[0].attn.to_q.weight, model.transformer_blocks[0].attn.to_q.weight
    assert type(w) is SVDQuantTensor and w.device.type == "cpu" and w.precision == "w4a8"
    assert [getattr(w, n).dtype for n in w.tensor_data_names] == [getattr(src, n).dtype for n in w.tensor_data_names]
    empty.load_state_dict(model.state_dict())
    inputs = flux_inputs()
    with torch.inference_mode():
        assert torch.equal(empty(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("mode", MODES)
def test_share_memory_shares_every_part(mode):
    """``module.share_memory()`` (before handing a model to worker processes) moves every part into shared memory
    and keeps the outputs; it crashed the interpreter when torch read the wrapper's (absent) storage."""
    from svdquant_ops import quantize_model

    from .builders import flux_inputs, tiny_flux

    model = tiny_flux()
    quantize_model(model, precision="int4", rank=8)
    inputs = flux_inputs()
    with torch.inference_mode():
        ref = model(**inputs).sample
    with MODES[mode]():
        model.share_memory()
    weights = [p for p in model.parameters() if isinstance(p, (SVDQuantTensor, W4A16Tensor))]
    assert weights and all(p.is_shared() for p in weights)
    assert all(getattr(p, n).is_shared() for p in weights for n in p.tensor_data_names)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, ref)


def test_cpu_of_a_cpu_weight_is_a_new_wrapper(layer):
    """diffusers' group offloading keeps weight.cpu() as the CPU copy and later swaps the parameter itself: the
    copy must be a distinct object (sharing the parts), or it would move to the GPU with the parameter."""
    w = layer.weight
    for alias in (w.cpu(), w.to("cpu")):
        assert alias is not w and alias.codes is w.codes


def test_a_cast_that_overflows_or_zeroes_lambda_is_refused():
    """A calibrated λ can span more than float16 holds: the move says so instead of a model that fails (CPU) or
    computes Inf (GPU kernels skip value checks) at its next forward."""
    from svdquant_ops import quantize_weight

    w = torch.randn(64, 128).to(torch.bfloat16)
    smooth = torch.ones(128)
    smooth[0], smooth[1] = 1e-19, 4000.0
    with pytest.raises(ValueError, match="converting to torch.float16 overflows smooth or flushes it to 0"):
        quantize_weight(w, smooth=smooth).to(torch.float16)
    assert quantize_weight(w).to(torch.float16).dtype == torch.float16

