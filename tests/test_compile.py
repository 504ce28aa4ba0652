"""torch.compile(fullgraph=True) on quantized models: one frame, no recompiles, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, prepare_model

from .builders import flux_inputs, tiny_flux


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("precision", ["int4", "nvfp4", "w4a8"])
def test_mlp_fullgraph_one_frame_no_recompile(mlp, precision):
    quantize_(mlp, SVDQuantConfig(precision=precision))
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(mlp, fullgraph=True, backend=cnt)
    x, x2 = torch.randn(2, 5, 256).to(torch.bfloat16)
    with torch.inference_mode():
        eager = mlp(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out1 = compiled(x)
            out2 = compiled(x2)
    assert cnt.frame_count == 1
    assert out2.shape == (5, 128)
    # The svdquant ops are opaque to Inductor and run the same kernels; only the fused GELU between the two
    # quantized layers may round differently from eager (bf16 ulp level).
    torch.testing.assert_close(out1, eager, rtol=2e-2, atol=2e-2)


def test_aot_eager_is_bit_identical(mlp):
    quantize_(mlp, SVDQuantConfig())
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, fullgraph=True, backend=cnt)
    x = torch.randn(3, 4, 256).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(compiled(x), mlp(x))
    assert cnt.frame_count == 1


def test_dynamic_token_count_single_graph(mlp):
    quantize_(mlp, SVDQuantConfig())
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, fullgraph=True, dynamic=True, backend=cnt)
    xs = [torch.randn(m, 256).to(torch.bfloat16) for m in (7, 3, 11)]
    with torch.inference_mode():
        compiled(xs[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for x in xs[1:]:
                assert torch.equal(compiled(x), mlp(x))
    assert cnt.frame_count == 1


def test_tiny_flux_fullgraph_one_frame():
    model = tiny_flux()
    prepare_model(model)
    quantize_(model, SVDQuantConfig())
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    inputs, inputs2 = flux_inputs(), flux_inputs(seed=1)
    with torch.inference_mode():
        eager = model(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**inputs).sample
            compiled(**inputs2)
    assert cnt.frame_count == 1
    assert torch.equal(out, eager)


def test_cache_key_of_a_quantized_weight_is_its_metadata(mlp):
    """AOTAutograd's cache key for our weights (_stable_hash_for_caching): equal for same-shaped weights of one
    format whatever their values, different when the shape or the format differs (else a cached graph compiled for
    one would be reused for the other)."""
    import copy

    other, w8 = copy.deepcopy(mlp), copy.deepcopy(mlp)
    with torch.no_grad():
        other.fc1.weight.mul_(2)
    quantize_(w8, SVDQuantConfig(precision="w4a8"))
    quantize_(mlp, SVDQuantConfig(precision="int4"))
    quantize_(other, SVDQuantConfig(precision="int4"))
    a, b = mlp.fc1.weight, other.fc1.weight
    assert not torch.equal(a.scales, b.scales)  # other values...
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()  # ...same key
    keys = {a._stable_hash_for_caching(), mlp.fc2.weight._stable_hash_for_caching(),
            w8.fc1.weight._stable_hash_for_caching()}
    assert len(keys) == 3


@pytest.mark.parametrize("precision", ["int4", "w4a8", "w4a16"])
def test_input_gradient_is_the_dequantized_weights_eager_and_compiled(precision):
    # A LoRA trained on a quantized base needs gradients through the frozen quantized linears: the forward stays
    # the quantized layer, the backward is that of the dequantized weight (straight-through).
    from svdquant_ops.quantize.weight_only import W4A16Config
    from svdquant_ops.storage import SVDQuantTensor, W4A16Tensor

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128).float()
    quantize_(lin, W4A16Config() if precision == "w4a16" else SVDQuantConfig(precision=precision, skip=[]))
    lin.bias.requires_grad_(True)
    w = lin.weight
    assert isinstance(w, W4A16Tensor if precision == "w4a16" else SVDQuantTensor)
    x, g = torch.randn(2, 3, 256), torch.randn(2, 3, 128)
    with torch.no_grad():
        forward = lin(x)

    def grads(module):
        xr = x.clone().requires_grad_()
        lin.bias.grad = None
        out = module(xr)
        (out * g).sum().backward()
        return out.detach(), xr.grad, lin.bias.grad

    out, grad_x, grad_b = grads(lin)
    assert torch.equal(out, forward)  # the quantized layer, not the dequantized one
    torch.testing.assert_close(grad_x, g @ w.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
    cnt = CompileCounterWithBackend("aot_eager")
    out_c, grad_x_c, grad_b_c = grads(torch.compile(lin, fullgraph=True, backend=cnt))
    assert cnt.frame_count == 1
    assert torch.equal(out_c, out) and torch.equal(grad_x_c, grad_x) and torch.equal(grad_b_c, grad_b)
    # an unbatched input, as plain nn.Linear takes it
    x1 = x[0, 0].clone().requires_grad_()
    lin.bias.grad = None
    (lin(x1) * g[0, 0]).sum().backward()
    torch.testing.assert_close(x1.grad, g[0, 0] @ w.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    assert torch.equal(lin.bias.grad, g[0, 0])
    # a part written in place between forward and backward: autograd's error, not a gradient of the new weight
    y = lin(x.clone().requires_grad_())
    with torch.no_grad():
        w.scales.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
