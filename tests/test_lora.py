"""LoRA adapters on quantized models (issue 16): ``svdquant_ops.lora``.

An adapter on an SVDQuant linear is appended to its low-rank branch (``proj_down`` / ``proj_up`` grow by the
adapter's rank, padded to 16); on 16-bit and 4-bit weight-only linears, and where the branch would pass
``max_fused_rank``, it is an exact side branch (a forward hook). Strength changes write into the adapter's columns
in place. The core tests run on the CPU ops and, where a GPU is present, on the CUDA kernels (``device`` "cuda":
the model is quantized on the CPU and moved to the GPU, before ``load_lora`` in the exactness and sharing tests,
after it in the compile test, one adapter each way in the stacked-adapters test).

Tolerances against float64 (``_bound``): the 4-bit part of a layer's output is computed identically with and
without the adapter (same activation codes, same group products), so ``y_lora - y_base`` differs from the exact
delta ``s·a/r·(x·Aᵀ)·Bᵀ`` only by rounding: the fp32 dot products of ``down_act = x @ Aᵀ`` (length K) and of the
branch sum (R terms), at most (K + R)·u·M with u = 2^-24 and ``M = |s|·(|x|·|A|ᵀ)·|B|ᵀ``; the rounding of
``s·a/r·B`` to the model dtype, u_m·Mr with ``Mr = |s|·|x·Aᵀ|·|B|ᵀ`` (u_m = 2^-24 for fp32, 2^-8 for bf16: its
2^-9 doubled for the fp32 sums around it); one rounding of each output to the model dtype plus the fp32 additions
around it, 4·u_m·(|y_base| + |y_lora|). The side branch computes in the model dtype (``x·Dᵀ`` and the product with
``U`` each rounded once): 2·u_m·Mr more. A wrong strength, alpha, transpose or column is off by O(|delta|), which
every test checks to be at least 10x the bound.

On CUDA (csrc/cuda/README.md, "Exactness and determinism") ``_bound`` adds what the kernels do differently:

* fp32 sums in the tensor cores (``down_act`` of 16-bit x, the GEMM's branch, cuBLAS in bf16) add exact products
  with truncation, one ulp (2^-23) per term instead of half: u becomes u_c = 2^-22 (doubled again for the
  (1 + 2^-7) growth of the branch's bf16 parts and second-order terms) in the (K + R) term.
* Hopper GEMM, the branch's bf16 parts: ``down_act = hi + lo`` and, for an fp32 ``proj_up``, ``proj_up = hi + lo``
  (hi = bf16(v), lo = bf16(v - hi), each split off by at most 2^-16·|v|, |lo| <= 2^-8·|v|), multiplied as
  hi·hi + lo·hi + hi·lo: each product term off by at most 3·2^-16 of |down_act|·|proj_up|, 2^-14·Mr for the
  adapter's columns (rounded up for |down_act| and |proj_up| against Mr's exact values). The model's own columns
  are split the same way in both calls.
* Hopper GEMM, the order: the accumulator starts from the branch (at most 3R bf16 products of the model's and the
  adapter's columns, summed by the tensor cores) and the 4-bit part is added onto it (INT4: K/64 group promotions,
  one FMA each; NVFP4 and W4A8: one), so the 4-bit part's roundings are no longer shared by the two calls. Per
  call at most u_c·(3R·(Sb + Mr) + K/64·(Sb + Mr + S4)), with ``Sb = (|x|·|proj_down|)·|proj_up|ᵀ`` the model's
  own branch and ``S4 = 2·max|x/λ|·Σ_k|Q(R)|`` the 4-bit partial sums (a dequantized activation is at most its
  group's or token's amax times (1 + 2^-4) in every format); twice that for the two calls.
* cuBLAS runs the side branch with TF32 and reduced-precision (bf16) split-K reductions turned off
  (``_exact_cublas``): the side branch's terms above assume fp32 accumulation and one rounding per product.

For these layers the CUDA bound is at most 6e-3 in fp32 (CPU: 9e-4) and 0.17 in bf16 (CPU: 0.16), against
|delta| up to 4-13: the 10x check keeps its meaning (observed, tests/test_cuda_ops.py: the Hopper GEMM within 7e-7
relative of the CPU op). The exact equalities (strength 0, unload, untouched siblings) hold on CUDA as on the CPU:
the same kernels on the same values, and zero columns of ``proj_up`` add exact zeros to the tensor cores' fp32 sums
in the same order (the property share_inputs' zero columns rely on, test_sharing.py); where a rank change moves
quantize_act off its fast path (R > 64), the test says so.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torchao.quantization import quantize_

from svdquant_ops import SVDQuantConfig, W4A16Config, ops, quantize_model, share_inputs
from svdquant_ops.lora import (enable_pipeline_lora, load_lora, lora_scales, read_lora, set_adapters, set_lora_scale,
                               unload_lora)
from svdquant_ops.storage import SVDQuantTensor, W4A16Tensor

from .builders import capture_cuda_graph, fresh_compile_state, flux_inputs, tiny_flux

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # unit roundoff (bf16: 2^-9, doubled for its fp32 sums)
UC = 2.0**-22  # CUDA: an fp32 sum's error per term in the tensor cores (truncation), doubled (module docstring)

# Every core test runs on the CPU ops and on the CUDA kernels where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


_fresh = pytest.fixture(autouse=True)(fresh_compile_state)  # no Dynamo cache or cached quantization between tests


# ---------------------------------------------------------------- helpers
def _layers(dtype=torch.float32, precision="int4"):
    """An SVDQuant linear, a 4-bit weight-only linear and a 16-bit linear (random weights)."""
    torch.manual_seed(0)
    net = nn.ModuleDict(dict(svdq=nn.Linear(256, 192), w4a16=nn.Linear(256, 384), plain=nn.Linear(128, 96)))
    net = net.to(dtype).eval()
    quantize_(net.svdq, SVDQuantConfig(precision=precision))
    quantize_(net.w4a16, W4A16Config())
    assert isinstance(net.svdq.weight, SVDQuantTensor) and isinstance(net.w4a16.weight, W4A16Tensor)
    return net


def _lora(model: nn.Module, names, rank: int, seed: int, dtype=torch.float32, prefix: str = "") -> dict:
    """A diffusers-format LoRA state dict for ``names``: A ~ N(0, 1/K), B ~ N(0, 1/4), so x·Aᵀ·Bᵀ is O(|x|)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    sd = {}
    for name in names:
        n, k = mods[name].weight.shape
        sd[f"{prefix}{name}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / k**0.5).to(dtype)
        sd[f"{prefix}{name}.lora_B.weight"] = (torch.randn(n, rank, generator=g) / 2).to(dtype)
    return sd


def _delta(sd: dict, name: str, x: torch.Tensor, scale: float, alpha_scale: float = 1.0):
    """The exact delta of ``name``'s LoRA at strength ``scale`` in float64 (on the CPU), with the magnitudes its
    rounding errors scale with: ``M = |s|·(|x|·|A|ᵀ)·|B|ᵀ`` (fp32 dot products over K) and ``Mr = |s|·|x·Aᵀ|·|B|ᵀ``
    (roundings of ``x·Aᵀ`` or of ``s·B`` to the model dtype)."""
    a, b = sd[f"{name}.lora_A.weight"].double(), sd[f"{name}.lora_B.weight"].double()
    s = scale * alpha_scale
    x = x.detach().double().cpu()
    return s * (x @ a.T) @ b.T, (abs(s) * (x.abs() @ a.abs().T) @ b.abs().T, abs(s) * (x @ a.T).abs() @ b.abs().T)


def _cuda_magnitudes(layer: nn.Module, x: torch.Tensor):
    """``(Sb, S4)`` of the module docstring for an SVDQuant linear without adapters (its own branch, its 4-bit
    partial sums), float64 on the CPU; ``(0, 0)`` for other linears. ``x``: the layer's input."""
    w = layer.weight
    if not isinstance(w, SVDQuantTensor):
        return 0.0, 0.0
    assert not w.act_unsigned  # the bound on |Q(x/λ)| below is for signed activations
    x = x.detach().double().cpu()
    sb = (x.abs() @ w.proj_down.detach().double().cpu().abs()) @ w.proj_up.detach().double().cpu().abs().T
    x_hat = x / w.smooth.detach().double().cpu()
    s4 = 2 * x_hat.abs().amax(-1, keepdim=True) * w.residual().double().cpu().abs().sum(-1)
    return sb, s4


def _bound(y_base, y_lora, mags, k: int, r: int, dtype, side: bool, cuda=None):
    """The tolerance of the module docstring; ``cuda``: None on the CPU ops, else ``_cuda_magnitudes`` of the layer
    (its CUDA terms)."""
    m, mr = mags
    u, um = (2.0**-24 if cuda is None else UC), U[dtype]
    y = y_base.detach().double().cpu().abs() + y_lora.detach().double().cpu().abs()
    bound = (k + r) * u * m + um * (3 if side else 1) * mr + 4 * um * y
    if cuda is not None and not side:  # the Hopper GEMM: bf16 parts of the branch, the 4-bit part added onto it
        sb, s4 = cuda
        bound = bound + 2.0**-14 * mr + 2 * UC * (3 * r * (sb + mr) + k // 64 * (sb + mr + s4))
    return bound


def _check(y_base, y_lora, delta, mags, k, r, dtype, side, cuda=None):
    err = ((y_lora.detach().double().cpu() - y_base.detach().double().cpu()) - delta).abs()
    bound = _bound(y_base, y_lora, mags, k, r, dtype, side, cuda)
    assert (err <= bound).all(), f"max error {err.max():.3g}, ratio to bound {(err / bound).max():.3g}"
    assert delta.abs().max() > 10 * bound.max()  # the delta is far above the tolerance: a wrong one would show
    return (err / delta.abs().max()).max().item()


def _exact_cublas(request, device: str) -> None:
    """On CUDA, for the rest of the test: cuBLAS (the side branches, 16-bit linears) without TF32 and without
    reduced-precision (bf16) split-K reductions, the fp32 accumulation the side branch's bound assumes. Nothing on
    the CPU. (Set and restored by hand: pytest's monkeypatch cannot undo these computed attributes.)"""
    if device != "cuda":
        return
    mm = torch.backends.cuda.matmul
    tf32, bf16 = mm.allow_tf32, mm.allow_bf16_reduced_precision_reduction
    try:  # torch >= 2.9 also keeps whether split-K may reduce in bf16; the bool setter resets it to True
        bf16 = (bf16, mm.allow_bf16_reduced_precision_reduction_split_k)
    except AttributeError:
        pass

    def restore():
        mm.allow_tf32 = tf32
        mm.allow_bf16_reduced_precision_reduction = bf16

    request.addfinalizer(restore)
    mm.allow_tf32 = False
    mm.allow_bf16_reduced_precision_reduction = False


@contextlib.contextmanager
def _portable_kernels(monkeypatch, device: str):
    """On CUDA: the portable kernels (SVDQUANT_OPS_CUDA_PORTABLE=1, read at every call; bit-identical to the CPU op
    whatever the rank), with the eager quantize_act cache cleared on the way in and out so that no quantization
    crosses the switch. Nothing on the CPU."""
    if device != "cuda":
        yield
        return
    with monkeypatch.context() as mp:
        mp.setenv("SVDQUANT_OPS_CUDA_PORTABLE", "1")
        ops.clear_act_cache()
        try:
            yield
        finally:
            ops.clear_act_cache()


def _within_fp32_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` and ``b``: 16-bit outputs of one linear whose fp32 sums were taken in two orders. Each is within
    tests/test_cuda_ops.py's criterion of the CPU op (one ulp of the output dtype plus 1e-4·(|ref| + rms(ref))), so
    they are within twice that of each other."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    ulp = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
    tol = 2 * ulp + 2e-4 * (b.abs() + b.pow(2).mean().sqrt())
    assert ((a - b).abs() <= tol).all(), f"max difference {(a - b).abs().max():.3g}"


def _parts(model):
    """Every inner tensor of every SVDQuant weight, copied."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor):
            out[n] = [getattr(m.weight, f).clone() for f in m.weight.__tensor_flatten__()[0]]
    return out


# ---------------------------------------------------------------- exactness against float64
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "int4"), (torch.float32, "nvfp4"),
                                             (torch.bfloat16, "w4a8"), (torch.bfloat16, "int4")])
def test_output_is_quantized_output_plus_lora_delta(dtype, precision, device, request):
    _exact_cublas(request, device)
    net = _layers(dtype, precision)
    names = ["svdq", "w4a16", "plain"]
    sd = _lora(net, names, rank=8, seed=1, dtype=dtype)  # on the CPU, as a file loads: load_lora moves it
    xs = {n: torch.randn(2, 5, m.weight.shape[1]).to(dtype) for n, m in net.items()}
    cuda = {n: _cuda_magnitudes(net[n], xs[n]) if device == "cuda" else None for n in names}
    if device == "cuda":  # a LoRA loaded into a model already on the GPU
        net.cuda()
        xs = {n: x.cuda() for n, x in xs.items()}
    with torch.no_grad():
        base = {n: net[n](xs[n]) for n in names}
        counts = load_lora(net, sd, "a", scale=0.7)
        assert counts == {"fused": 1, "side": 2}
        assert net.svdq.weight.rank == 32 + 16  # rank 8 padded to 16
        for n in names:
            delta, m = _delta(sd, n, xs[n], 0.7)
            _check(base[n], net[n](xs[n]), delta, m, xs[n].shape[-1], 48, dtype, n != "svdq", cuda[n])


@pytest.mark.parametrize("device", DEVICES)
def test_two_stacked_adapters_strengths_zero_and_unload(device, request):
    """On CUDA adapter a is loaded on the CPU and moves to the GPU with the model; b is loaded on the GPU."""
    _exact_cublas(request, device)
    net = _layers()
    names = ["svdq", "w4a16", "plain"]
    sa, sb = _lora(net, names, rank=8, seed=1), _lora(net, names, rank=12, seed=2)
    xs = {n: torch.randn(7, m.weight.shape[1]) for n, m in net.items()}
    cuda = {n: _cuda_magnitudes(net[n], xs[n]) if device == "cuda" else None for n in names}
    if device == "cuda":
        net.cuda()
        xs = {n: x.cuda() for n, x in xs.items()}
    parts = _parts(net)
    with torch.no_grad():
        base = {n: net[n](xs[n]) for n in names}
        if device == "cuda":
            net.cpu()
        load_lora(net, sa, "a", scale=0.7)
        if device == "cuda":
            net.cuda()  # the fused columns, the side buffers and hooks move with it
        load_lora(net, sb, "b", scale=-1.3)
        assert net.svdq.weight.rank == 32 + 16 + 16 and lora_scales(net) == {"a": 0.7, "b": -1.3}
        for n in names:
            da, ma = _delta(sa, n, xs[n], 0.7)
            db, mb = _delta(sb, n, xs[n], -1.3)
            mags = (ma[0] + mb[0], ma[1] + mb[1])
            _check(base[n], net[n](xs[n]), da + db, mags, xs[n].shape[-1], 64, torch.float32, n != "svdq", cuda[n])
        # strength 0 writes zeros into the adapter's columns: exactly the model without it (CUDA: adding the zero
        # products of the zero columns in the tensor cores changes no fp32 sum, as for share_inputs' zero columns)
        set_lora_scale(net, "a", 0.0)
        set_lora_scale(net, "b", 0.0)
        for n in names:
            assert torch.equal(net[n](xs[n]), base[n]), n
        set_adapters(net, ["b"], [2.0])  # diffusers' selection: a stays at 0
        assert lora_scales(net) == {"a": 0.0, "b": 2.0}
        for n in names:
            db, mb = _delta(sb, n, xs[n], 2.0)
            _check(base[n], net[n](xs[n]), db, mb, xs[n].shape[-1], 64, torch.float32, n != "svdq", cuda[n])
        with_b = {n: net[n](xs[n]) for n in names}
        unload_lora(net, "a")  # b's columns move left, keeping their values
        assert net.svdq.weight.rank == 48 and lora_scales(net) == {"b": 2.0}
        for n in names:
            if device == "cpu":
                torch.testing.assert_close(net[n](xs[n]), with_b[n], rtol=0, atol=1e-5)
            else:  # cuBLAS may sum the side branch's narrower x·Dᵀ in another order: b's delta, within the bound
                db, mb = _delta(sb, n, xs[n], 2.0)
                _check(base[n], net[n](xs[n]), db, mb, xs[n].shape[-1], 48, torch.float32, n != "svdq", cuda[n])
        assert torch.equal(net.svdq(xs["svdq"]), with_b["svdq"])  # zero columns removed: same fp32 sums
        unload_lora(net)
        for n in names:
            assert torch.equal(net[n](xs[n]), base[n]), n
    assert all(torch.equal(a, b) for n in parts for a, b in zip(parts[n], _parts(net)[n]))
    assert not net.w4a16._forward_hooks and not net.plain._forward_hooks
    assert not any("lora" in k for k in net.state_dict()) and lora_scales(net) == {}


def test_rank_past_the_fast_path_becomes_a_side_branch():
    net = _layers()
    sd = _lora(net, ["svdq"], rank=40, seed=3)  # 32 + 48 > 64: quantize_act would leave its CUDA fast path
    x = torch.randn(6, 256)
    with torch.no_grad():
        base = net.svdq(x)
        assert load_lora(net, sd, "wide") == {"fused": 0, "side": 1}
        assert net.svdq.weight.rank == 32
        delta, m = _delta(sd, "svdq", x, 1.0)
        _check(base, net.svdq(x), delta, m, 256, 40, torch.float32, side=True)
        # no saved model holds a side branch: saving now would load back without it, silently
        assert set(net.state_dict()) == set(_layers().state_dict())  # accelerate's offloading reads it
        with pytest.raises(RuntimeError, match="holds LoRA adapters as side branches.*unload_lora"):
            net.save_pretrained("unused")
        unload_lora(net)
        assert "save_pretrained" not in net.__dict__
        assert load_lora(net, sd, "wide", max_fused_rank=None) == {"fused": 1, "side": 0}  # no limit: fused
        assert "save_pretrained" not in net.__dict__  # fused adapters are part of the weights
        assert net.svdq.weight.rank == 32 + 48
        _check(base, net.svdq(x), delta, m, 256, 80, torch.float32, side=False)


def test_alpha_metadata_and_kohya_scaling(tmp_path):
    net = _layers()
    sd = _lora(net, ["svdq"], rank=8, seed=4)
    path = tmp_path / "a.safetensors"  # PEFT metadata as diffusers' save_lora_weights writes it
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 32})})
    assert read_lora(net, str(path))["svdq"].scale == 4.0
    with_alpha = dict(sd, **{"svdq.alpha": torch.tensor(4.0)})
    assert read_lora(net, with_alpha)["svdq"].scale == 0.5


# ---------------------------------------------------------------- input sharing (one quantize_act per input)
def _quantized_flux():
    model = tiny_flux()
    quantize_model(model)
    return model


def _count_quantize_act(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, [e.name for e in prof.events()].count("svdquant::quantize_act")


@pytest.mark.parametrize("device", DEVICES)
def test_lora_on_to_q_leaves_shared_siblings_bit_identical(device, monkeypatch):
    """On CUDA the model moves to the GPU first (the move keeps the groups' shared parts shared), then the LoRA is
    loaded there. The single block's group grows to R = 80 > 64, which moves quantize_act to another instantiation of
    its CUDA fast kernel (rank 128, one block per SM), so with the default kernels the siblings there agree within
    fp32 rounding; with the portable kernels (the CPU op's sums) bit for bit."""
    model = _quantized_flux()
    if device == "cuda":
        model.cuda()
        assert share_inputs(model) == 0  # nothing to share again
    attn = model.transformer_blocks[0].attn
    single = model.single_transformer_blocks[0]
    x = torch.randn(1, 9, 128).to(device, torch.bfloat16)
    inputs = {k: v.to(device) for k, v in flux_inputs().items()}
    sd = _lora(model, ["transformer_blocks.0.attn.to_q"], rank=8, seed=5, dtype=torch.bfloat16)
    sd.update(_lora(model, ["single_transformer_blocks.0.attn.to_q"], rank=8, seed=6, dtype=torch.bfloat16))
    single_siblings = (("q", single.attn.to_q), ("k", single.attn.to_k), ("mlp", single.proj_mlp))
    with torch.no_grad():
        before = {n: getattr(attn, n)(x) for n in ("to_q", "to_k", "to_v")}
        with _portable_kernels(monkeypatch, device):
            before_single = {n: m(x) for n, m in single_siblings}
        if device == "cuda":
            before_single_default = {n: m(x) for n, m in single_siblings}
        ref, n_ref = _count_quantize_act(lambda: model(**inputs).sample)
        load_lora(model, sd, "q_only", max_fused_rank=None)  # the single block's [qkv | mlp] group: 64 + 16
        assert attn.to_q.weight.rank == attn.to_k.weight.rank == 48 and single.proj_mlp.weight.rank == 80
        for group in ((attn.to_q, attn.to_k, attn.to_v), (single.attn.to_q, single.attn.to_k, single.proj_mlp)):
            pd, sm = group[0].weight.proj_down, group[0].weight.smooth
            # one object each (torch.compile: one graph input, one merged quantize_act), still marked shared
            assert all(m.weight.proj_down is pd and m.weight.smooth is sm
                       and m.weight.__tensor_flatten__()[1].get("holds_shared") for m in group)
        assert torch.equal(attn.to_k(x), before["to_k"]) and torch.equal(attn.to_v(x), before["to_v"])
        assert not torch.equal(attn.to_q(x), before["to_q"])
        with _portable_kernels(monkeypatch, device):
            assert torch.equal(single.attn.to_k(x), before_single["k"]) and torch.equal(single.proj_mlp(x),
                                                                                        before_single["mlp"])
        if device == "cuda":
            _within_fp32_rounding(single.attn.to_k(x), before_single_default["k"])
            _within_fp32_rounding(single.proj_mlp(x), before_single_default["mlp"])
        out, n = _count_quantize_act(lambda: model(**inputs).sample)
        assert n == n_ref == 20  # still one quantize_act per input (test_sharing)
        assert not torch.equal(out, ref)
        unload_lora(model)
        assert attn.to_q.weight.rank == 32 and single.proj_mlp.weight.rank == 64
        assert attn.to_q.weight.proj_down is attn.to_k.weight.proj_down
        assert torch.equal(model(**inputs).sample, ref)


def test_lora_leaves_a_member_with_its_own_smooth_alone():
    """A member of a shared group given a λ of its own since (its smooth rebound: no longer one object with the
    group's) is not rebuilt with the group's λ when a LoRA goes onto a sibling: its output stays the same."""
    model = _quantized_flux()
    attn = model.transformer_blocks[0].attn
    attn.to_v.weight.smooth = attn.to_v.weight.smooth.clone() * 2
    x = torch.randn(1, 9, 128).to(torch.bfloat16)
    sd = _lora(model, ["transformer_blocks.0.attn.to_q"], rank=8, seed=5, dtype=torch.bfloat16)
    with torch.no_grad():
        before_v, before_k = attn.to_v(x), attn.to_k(x)
        load_lora(model, sd, "q_only", max_fused_rank=None)
        assert torch.equal(attn.to_v(x), before_v) and torch.equal(attn.to_k(x), before_k)
        assert attn.to_q.weight.smooth is attn.to_k.weight.smooth is not attn.to_v.weight.smooth
        unload_lora(model)
        assert torch.equal(attn.to_v(x), before_v)


def test_a_group_member_changed_after_loading_is_refused_not_rebuilt():
    """A member given its own λ after the adapter was loaded (a load_state_dict into it): rebuilding the group's
    branch from its first member would hand the others that member's λ, silently: unloading says why it cannot."""
    model = _quantized_flux()
    attn = model.transformer_blocks[0].attn
    sd = _lora(model, ["transformer_blocks.0.attn.to_q"], rank=8, seed=5, dtype=torch.bfloat16)
    load_lora(model, sd, "q_only", max_fused_rank=None)
    k_smooth = attn.to_k.weight.smooth
    attn.to_q.weight.smooth = attn.to_q.weight.smooth.clone() * 2
    with pytest.raises(RuntimeError, match="no longer share their λ / down projection.*unload_lora before"):
        unload_lora(model)
    assert attn.to_k.weight.smooth is k_smooth and torch.equal(k_smooth, torch.ones_like(k_smooth))


# Inductor on CUDA fuses the elementwise parts (norms, activations, residual adds) with fewer bf16 roundings than
# eager: the tolerance of the other compiled tiny-model tests on the GPU (test_cuda_model.py, test_cuda_nunchaku.py).
COMPILED_RTOL = COMPILED_ATOL = 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_compile_strength_changes_do_not_recompile(device):
    """CPU: aot_eager, bit-identical to eager. CUDA: the default Inductor backend, the adapter loaded on the CPU and
    moved to the GPU with the model; each strength's output equals eager within Inductor's rounding and most of it
    moves by more than that tolerance from the previous strength's (measured: 91-96 % of the elements)."""
    model = _quantized_flux()
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.attn.to_k",
             "transformer_blocks.0.norm1.linear", "x_embedder"]  # fused, fused, side (rank 64), W4A16, 16-bit
    assert load_lora(model, _lora(model, names, rank=8, seed=10, dtype=torch.bfloat16), "a") == {"fused": 2, "side": 3}
    if device == "cuda":
        model.cuda()
    cnt = CompileCounterWithBackend("aot_eager" if device == "cpu" else "inductor")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    inputs = {k: v.to(device) for k, v in flux_inputs().items()}
    with torch.inference_mode():
        first = compiled(**inputs).sample
        prev = first
        with torch._dynamo.config.patch(error_on_recompile=True):
            for scale in (0.3, 0.0, -2.0):
                set_lora_scale(model, "a", scale)
                out = compiled(**inputs).sample
                if device == "cpu":
                    assert torch.equal(out, model(**inputs).sample) and not torch.equal(out, first)
                else:
                    torch.testing.assert_close(out, model(**inputs).sample, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)
                    moved = (out.float() - prev.float()).abs() > COMPILED_ATOL + COMPILED_RTOL * prev.float().abs()
                    assert moved.float().mean() > 0.5, f"{scale}: {moved.float().mean():.2f} of the output moved"
                prev = out
        assert cnt.frame_count == 1
        unload_lora(model)
        compiled(**inputs)
    assert cnt.frame_count == 2  # the rank changed back: one recompile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph capture)")
def test_cuda_graph_replay_sees_a_strength_change():
    """On the GPU: adapters on the CUDA kernels (fused and side), and a strength change written while a CUDA graph
    holds the weights takes effect at the next replay, equal to eager at that strength (not run on CPU machines)."""
    model = _quantized_flux()
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_k",
             "transformer_blocks.0.norm1.linear"]  # fused, fused, side (rank 64), W4A16 side
    sd = _lora(model, names, rank=16, seed=11, dtype=torch.bfloat16)
    model.cuda()
    assert load_lora(model, sd, "a", scale=1.0) == {"fused": 2, "side": 2}
    inputs = {k: v.cuda() for k, v in flux_inputs().items()}
    fn = lambda: model(**inputs).sample  # noqa: E731
    with torch.no_grad():
        g, static_y = capture_cuda_graph(fn)
        outs = []
        for scale in (0.0, -1.5, 1.0):
            set_lora_scale(model, "a", scale)  # written in place: the captured graph reads the same memory
            g.replay()
            torch.cuda.synchronize()
            outs.append(static_y.clone())
            ops.clear_act_cache()
            # same kernels and inputs; cuBLAS (the side branch) may pick another algorithm under capture
            torch.testing.assert_close(outs[-1], fn(), rtol=0, atol=1e-2)
        assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


# ---------------------------------------------------------------- errors
def test_helpful_errors():
    net = _layers()
    sd = _lora(net, ["svdq"], rank=4, seed=7)
    with pytest.raises(ValueError, match=r"do not match the model.*svdq.*\[192, 256\]"):
        load_lora(net, {"svdq.lora_A.weight": torch.randn(4, 128), "svdq.lora_B.weight": torch.randn(192, 4)}, "x")
    with pytest.raises(ValueError, match=r"unknown LoRA key format.*svdq\.lokr_w1"):
        load_lora(net, dict(sd, **{"svdq.lokr_w1": torch.randn(4, 4)}), "x")
    with pytest.raises(ValueError, match=r"not in the ModuleDict.*'blocks.3.to_q'"):
        load_lora(net, {"blocks.3.to_q.lora_A.weight": torch.randn(4, 8),
                        "blocks.3.to_q.lora_B.weight": torch.randn(8, 4)}, "x")
    nan_a = dict(sd, **{"svdq.lora_A.weight": torch.full_like(sd["svdq.lora_A.weight"], float("nan"))})
    with pytest.raises(ValueError, match="svdq: lora_A contains NaN or Inf"):
        load_lora(net, nan_a, "x")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        load_lora(net, sd, "x", scale=float("inf"))
    load_lora(net, sd, "x")
    with pytest.raises(ValueError, match="set_lora_scale: scale must be a finite number.*nan"):
        set_lora_scale(net, "x", float("nan"))
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(net, sd, "x")
    with pytest.raises(KeyError, match=r"no adapter named 'y'.*\['x'\]"):
        set_lora_scale(net, "y", 1.0)
    with pytest.raises(KeyError, match="no adapter named 'y'"):
        unload_lora(net, "y")
    assert lora_scales(net) == {"x": 1.0}  # a failed load leaves nothing behind
    with pytest.raises(ValueError, match=r"svdq: lora_A \[0, 256\] and lora_B \[192, 0\] are not the factors.*r >= 1"):
        load_lora(net, {"svdq.lora_A.weight": torch.randn(0, 256), "svdq.lora_B.weight": torch.randn(192, 0)}, "z")
    with pytest.raises(TypeError, match="scale must be a finite number.*'high'"):
        load_lora(net, sd, "z", scale="high")
    with pytest.raises(ValueError, match="max_fused_rank must be None or an int >= 0.*-5"):
        load_lora(net, sd, "z", max_fused_rank=-5)
    with pytest.raises(TypeError, match="max_fused_rank must be None or an int >= 0.*'64'"):
        load_lora(net, sd, "z", max_fused_rank="64")


def test_non_finite_or_non_scalar_alphas_are_refused_naming_the_key(tmp_path):
    """A NaN or Inf alpha would make every output NaN, a tensor of several alphas has no meaning: both are refused
    at loading with the key (or the metadata entry) that holds them, whichever way the alpha comes (a ``.alpha``
    tensor, diffusers' network alphas through the model's converter, PEFT's ``lora_alpha`` / ``alpha_pattern``).
    0 (an adapter that adds nothing) and negative alphas stay legal."""
    net = _layers()
    sd = _lora(net, ["svdq"], rank=4, seed=7)
    for bad, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")):
        with pytest.raises(ValueError, match=rf"alpha 'svdq\.alpha' must be a finite number, got {shown}"):
            load_lora(net, dict(sd, **{"svdq.alpha": torch.tensor(bad)}), "x")
    with pytest.raises(ValueError, match=r"alpha 'svdq\.alpha' must be a single number.*shape \[2\]"):
        load_lora(net, dict(sd, **{"svdq.alpha": torch.tensor([1.0, 2.0])}), "x")
    with pytest.raises(ValueError, match=r"alpha 'svdq\.alpha' must be a finite number, got 'x'"):
        read_lora(net, dict(sd, **{"svdq.alpha": "x"}))
    for meta, what in (({"r": 4, "lora_alpha": float("nan")}, r"svdq: the metadata's lora_alpha .*got nan"),
                       ({"r": 4, "lora_alpha": 4, "alpha_pattern": {"svdq": float("inf")}},
                        r"svdq: the metadata's alpha_pattern\['svdq'\] .*got inf")):
        path = tmp_path / "meta.safetensors"
        save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})  # JSON's NaN / Infinity
        with pytest.raises(ValueError, match=what):
            load_lora(net, str(path), "x")
    assert lora_scales(net) == {}  # nothing was loaded
    assert read_lora(net, dict(sd, **{"svdq.alpha": torch.tensor(0.0)}))["svdq"].scale == 0.0
    assert read_lora(net, dict(sd, **{"svdq.alpha": torch.tensor([-2.0])}))["svdq"].scale == -0.5

    flux = tiny_flux()  # a FLUX transformer: the file goes through diffusers' converter (network alphas)
    pre = "transformer.transformer_blocks.0.attn.to_q"
    flux_sd = _lora(flux, ["transformer_blocks.0.attn.to_q"], rank=4, seed=8, prefix="transformer.")
    with pytest.raises(ValueError, match=rf"alpha '{pre}\.alpha' must be a finite number, got nan"):
        load_lora(flux, dict(flux_sd, **{f"{pre}.alpha": torch.tensor(float("nan"))}), "a")
    with pytest.raises(ValueError, match=rf"alpha '{pre}\.alpha' must be a single number.*shape \[2\]"):
        load_lora(flux, dict(flux_sd, **{f"{pre}.alpha": torch.tensor([1.0, 2.0])}), "a")
    assert lora_scales(flux) == {}


def test_lora_paths_local_or_hub(tmp_path, monkeypatch):
    """What load_lora treats as a local path (a missing one is FileNotFoundError) and what it leaves to diffusers
    as a hub id; '~' is expanded."""
    from svdquant_ops.integrations.lora import _looks_local

    assert not _looks_local("owner/name")
    assert all(_looks_local(p) for p in ("a/b/c", "./x", "/abs/x", "~/x", "style.safetensors", tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    net = _layers()
    save_file(_lora(net, ["svdq"], rank=4, seed=7), str(tmp_path / "mine.safetensors"))
    assert load_lora(net, "~/mine.safetensors", "x") == {"fused": 1, "side": 0}


def test_a_missing_lora_file_is_file_not_found(tmp_path, monkeypatch):
    """Through a pipeline, diffusers' lora_state_dict would take a missing path for a hub id (a download, or
    "Repo id must be in the form ..."): a path that looks local and does not exist is FileNotFoundError."""
    from svdquant_ops.integrations.pipelines import tiny_flux_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    pipe = tiny_flux_pipeline()
    for missing in (str(tmp_path / "nolora.safetensors"), tmp_path / "nolora.safetensors", "ghibli_style.safetensors",
                    "./loras/style"):
        with pytest.raises(FileNotFoundError, match="load_lora: no LoRA file at"):
            load_lora(pipe, missing, "x")
        with pytest.raises(FileNotFoundError, match="load_lora: no LoRA file at"):
            load_lora(pipe.transformer, missing, "x")


# ---------------------------------------------------------------- a tiny FLUX pipeline: files, compile, unload
def _kohya_file(transformer, path, rank=4):
    """Kohya / sd-scripts FLUX names (fused qkv, alphas) for the tiny pipeline's transformer. diffusers' converter
    hard-codes FLUX.1's single-block linear1 split ([3072, 3072, 3072, 12288]), so the tiny model's single blocks get
    linear2 (proj_out) only."""
    g = torch.Generator().manual_seed(8)
    mods = dict(transformer.named_modules())
    attn0 = mods["transformer_blocks.0.attn.to_q"].weight.shape
    shapes = {}
    for i in range(2):
        shapes[f"double_blocks_{i}_img_attn_qkv"] = (3 * attn0[0], attn0[1])
        shapes[f"double_blocks_{i}_img_attn_proj"] = tuple(mods[f"transformer_blocks.{i}.attn.to_out.0"].weight.shape)
        ff_context = mods[f"transformer_blocks.{i}.ff_context.net.0.proj"]
        shapes[f"double_blocks_{i}_txt_mlp_0"] = tuple(ff_context.weight.shape)
        shapes[f"double_blocks_{i}_img_mod_lin"] = tuple(mods[f"transformer_blocks.{i}.norm1.linear"].weight.shape)
        shapes[f"single_blocks_{i}_linear2"] = tuple(mods[f"single_transformer_blocks.{i}.proj_out"].weight.shape)
    sd = {}
    for key, (n, k) in shapes.items():
        sd[f"lora_unet_{key}.lora_down.weight"] = (torch.randn(rank, k, generator=g) / k**0.5).to(torch.bfloat16)
        sd[f"lora_unet_{key}.lora_up.weight"] = (torch.randn(n, rank, generator=g) / 4).to(torch.bfloat16)
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(sd, str(path))


def test_flux_pipeline_diffusers_and_kohya_files_compile_switch_unload(tmp_path):
    from svdquant_ops.integrations.pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    quantize_model(pipe.transformer)
    tr = pipe.transformer
    names = [n for n, m in tr.named_modules() if n.endswith(("attn.to_q", "attn.to_out.0", "ff.net.2", "norm1.linear"))]
    diffusers_sd = _lora(tr, names, rank=8, seed=9, dtype=torch.bfloat16, prefix="transformer.")
    save_file(diffusers_sd, str(tmp_path / "style.safetensors"),  # PEFT metadata as a pipeline's file has it
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 16})})
    _kohya_file(tr, tmp_path / "kohya.safetensors")
    assert read_lora(pipe, str(tmp_path / "style.safetensors"))["transformer_blocks.0.attn.to_q"].scale == 2.0
    with torch.inference_mode():  # once: T5's bf16 CPU output varies from call to call (not the transformer)
        prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox", prompt_2=None, max_sequence_length=16)

    def generate():
        with torch.inference_mode():
            return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=2, height=32,
                        width=32, generator=torch.Generator().manual_seed(0), output_type="latent").images

    base = generate()
    counts = load_lora(pipe, str(tmp_path / "style.safetensors"), "style", scale=1.0)
    # SVDQuant linears fused; the single blocks' to_q (their shared [qkv | mlp] branch is at rank 64 already) and the
    # 4-bit weight-only AdaLN linears as side branches
    assert counts == {"fused": 2 * 3, "side": 4 + 2}
    enable_pipeline_lora(pipe)  # diffusers' own method names, routed here
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="kohya")
    qkv = tr.transformer_blocks[0].attn
    # style on to_q (rank 8 -> 16 columns); Kohya's fused qkv: one A for q, k and v, appended once (16 columns)
    assert qkv.to_q.weight.rank == qkv.to_k.weight.rank == 32 + 16 + 16
    assert pipe.get_active_adapters() == ["style", "kohya"]

    cnt = CompileCounterWithBackend("aot_eager")
    tr.compile_repeated_blocks(fullgraph=True, backend=cnt)  # diffusers' regional compilation: each block type once
    both = generate()
    assert not torch.equal(both, base)
    frames = cnt.frame_count
    assert frames >= 2  # a double and a single block were compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.set_adapters(["style", "kohya"], [0.0, 0.0])
        assert torch.equal(generate(), base)  # strength 0 under compile: exactly the model without adapters
        set_lora_scale(pipe, "style", 1.0)
        set_lora_scale(pipe, "kohya", 1.0)
        assert torch.equal(generate(), both)
        set_lora_scale(pipe, "kohya", 0.5)
        half = generate()
    assert cnt.frame_count == frames  # no recompile for strength changes
    assert not torch.equal(half, both) and not torch.equal(half, base)
    with torch.compiler.set_stance("force_eager"):  # eager gives the same numbers (aot_eager is bit-identical)
        assert torch.equal(generate(), half)
        pipe.unload_lora_weights()
        assert lora_scales(pipe) == {} and torch.equal(generate(), base)
