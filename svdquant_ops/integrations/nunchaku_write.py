"""Writing a 16-bit FLUX.1 transformer as a Nunchaku v1 single-file checkpoint (``svdq-{int4|fp4}_r32-*``), with a
data-free SVDQuant in Nunchaku's conventions: ``write_nunchaku_flux``. For tests and benchmarks (files of any size,
without Nunchaku's calibrated converter); the packing is ``nunchaku.pack_canonical`` / ``pack_awq_linear``, which
the tests check bit for bit against the reference converter's output.

What it writes, per block (``nunchaku.load_nunchaku_transformer`` maps it back):

* the W4A4 linears under Nunchaku's v1 names (fused ``qkv_proj`` / ``qkv_proj_context``, ``out_proj``,
  ``out_proj_context``, ``mlp_fc1`` / ``mlp_fc2`` and the ``_context`` ones; single blocks: ``qkv_proj``,
  ``mlp_fc1``, and ``proj_out`` as ``out_proj`` + ``mlp_fc2``), each the data-free SVDQuant of its 16-bit weight:
  smoothing factors λ random in [0.5, 2) from ``seed`` (all ones for the attention output projections, whose λ
  Nunchaku folds into v; one λ for a single block's q/k/v and MLP-in projection, which read one input), a rank-R SVD
  of the smoothed weight (``torch.svd_lowrank``), the residual round-to-nearest with INT4 codes over all of
  [-8, 7] (group-64 scale ``max(max / 7, -min / 8)``) or NVFP4; GELU-fed fc2 layers (INT4) unsigned, their stored
  bias with the 0.171875 shift compensated;
* the AdaLN linears as AWQ W4A16 (our ``W4A16Tensor.from_float``, chunks in Nunchaku's order, +1 on the scale
  chunks' bias);
* everything else (embedders, norms, the final projection) as stored 16-bit tensors.

Works on the model's device (CPU or CUDA), one layer at a time: the 16-bit weights are read, not copied (a fused
q/k/v is one concatenation), each layer's packed tensors move to the CPU as soon as they are made (the
safetensors file is written from CPU tensors), and nothing of a layer stays on the device after it. The model is
left unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..formats import ACT_SHIFT, INT4
from ..quantizers import nvfp4_global_scale, quantize_nvfp4
from ..storage import W4A16Tensor
from .nunchaku import _canonical_precision, pack_awq_linear, pack_canonical, save_nunchaku_file

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Seed the default generator of ``device`` only (the CPU's, or that CUDA device's) inside a fork of the RNG
    state: the caller's global RNG state is the same afterwards."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def nvfp4_canonical(r: torch.Tensor) -> dict:
    """NVFP4 canonical tensors of a residual ``r`` [N, K] (per-channel global scale in bf16, fp8 micro-scales)."""
    channel = nvfp4_global_scale(r, per_channel=True).to(torch.bfloat16)
    codes, micro = quantize_nvfp4(r, channel.float())
    return {"codebook_index": codes, "micro_scales": micro, "channel_scales": channel}


def svdq_canonical(w: torch.Tensor, b: torch.Tensor | None, smooth: torch.Tensor, precision: str, unsigned: bool,
                   rank: int = 32, seed: int = 0) -> dict:
    """Data-free SVDQuant of one 16-bit layer (weight [N, K], bias [N] or None, λ [K]) in Nunchaku's conventions, as
    canonical tensors (``nunchaku.unpack_canonical``'s names): INT4 codes over all of [-8, 7] (scale
    max(max/7, -min/8) per group of 64), the stored bias with the GELU shift compensated (``unsigned``).
    ``torch.svd_lowrank`` draws from the default generator of the weight's device, seeded with ``seed`` here (the
    caller's RNG state is restored)."""
    lam = smooth.float()
    w_hat = w.float() * lam
    with _seeded(w.device, seed):
        u, s, v = torch.svd_lowrank(w_hat, q=rank + 8, niter=2)
    up = (u[:, :rank] * s[:rank]).to(torch.bfloat16)
    down = (v[:, :rank] / lam[:, None]).to(torch.bfloat16)  # [K, R], multiplies raw x
    del u, s, v
    r = w_hat - up.float() @ (down.float() * lam[:, None]).T
    del w_hat
    c = {"smooth": smooth, "proj_down_raw_x": down.contiguous(), "proj_up": up.contiguous()}
    if precision == INT4:
        g = r.reshape(r.shape[0], -1, 64)
        scale = torch.maximum(g.amax(-1) / 7, -g.amin(-1) / 8).clamp(min=1e-8).to(torch.bfloat16)
        codes = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8).reshape(r.shape)
        c.update(codes=codes, wscales=scale)
    else:
        c.update(nvfp4_canonical(r))
    del r
    bias = b.float() if b is not None else None
    if unsigned:
        deq = c["codes"].float() * c["wscales"].float().repeat_interleave(64, 1)
        bias = (bias if bias is not None else 0) - deq @ (ACT_SHIFT / lam)
        del deq
    if bias is not None:
        c["bias"] = bias.to(torch.bfloat16)
    return c


def _cpu(tensors: dict) -> dict:
    return {k: v.to("cpu") for k, v in tensors.items()}


@torch.no_grad()
def write_nunchaku_flux(path: str | Path, model: nn.Module, precision: str, *, seed: int = 0, rank: int = 32,
                        keep_canonical: bool = False) -> dict | None:
    """Write ``model`` (a 16-bit diffusers ``FluxTransformer2DModel``, on the CPU or a GPU) to ``path`` as a
    Nunchaku v1 single-file checkpoint: a data-free SVDQuant of it in Nunchaku's conventions (module docstring),
    ``precision`` ``"int4"`` or ``"nvfp4"`` (``"fp4"``), low-rank branch ``rank`` (a multiple of 16), smoothing
    factors random in [0.5, 2) from ``seed`` (a CPU generator: the same λ on every device). For tests and benchmarks:
    ``load_nunchaku_transformer(path)`` reads it back; it approximates ``model`` (output SQNR a few tens of dB).

    ``keep_canonical=True`` returns the canonical tensors of every quantized layer by its Nunchaku name (value:
    ``(canonical dict, unsigned)``, on the model's device; a test's view of what was packed); otherwise None and
    nothing is kept. The model is not modified."""
    precision = _canonical_precision(precision)
    if rank <= 0 or rank % 16:
        raise ValueError(f"write_nunchaku_flux: rank must be a positive multiple of 16 (Nunchaku's packing of the "
                         f"low-rank factors), got {rank}")
    sd = dict(model.state_dict())  # references to the model's tensors (popped as written), no copies
    dim = model.inner_dim
    device = next(iter(sd.values())).device
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    canon: dict = {}

    def lam(k):
        return (0.5 + 1.5 * torch.rand(k, generator=g)).to(torch.bfloat16).to(device)

    def ones(k):
        return torch.ones(k, dtype=torch.bfloat16, device=device)  # λ folded into v

    def take(names):
        ws = [sd.pop(f"{n}.weight") for n in names]
        bs = [sd.pop(f"{n}.bias") for n in names] if f"{names[0]}.bias" in sd else None
        return (torch.cat(ws) if len(ws) > 1 else ws[0],
                None if bs is None else (torch.cat(bs) if len(bs) > 1 else bs[0]))

    def svdq(name, w, b, smooth, unsigned=False):
        unsigned = unsigned and precision == INT4
        c = svdq_canonical(w, b, smooth, precision, unsigned, rank=rank, seed=seed)
        if keep_canonical:
            canon[name] = (c, unsigned)
        out.update({f"{name}.{k}": v for k, v in _cpu(pack_canonical(c, precision)).items()})

    def adaln(name, chunks):
        w = W4A16Tensor.from_float(sd.pop(f"{name}.weight"))
        packed = pack_awq_linear(w, sd.pop(f"{name}.bias"), chunks)
        out.update({f"{name}.{k}": v for k, v in _cpu(packed).items()})

    def rename(block, old, new):
        for key in [k for k in sd if k.startswith(f"{block}.{new}.")]:
            out[f"{block}.{old}.{key[len(block) + len(new) + 2:]}"] = sd.pop(key).to("cpu")

    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        svdq(f"{b}.qkv_proj", *take([f"{b}.{n}" for n in _QKV]), lam(dim))
        svdq(f"{b}.qkv_proj_context", *take([f"{b}.attn.add_{n}_proj" for n in "qkv"]), lam(dim))
        svdq(f"{b}.out_proj", *take([f"{b}.attn.to_out.0"]), ones(dim))
        svdq(f"{b}.out_proj_context", *take([f"{b}.attn.to_add_out"]), ones(dim))
        for s, ff in (("", "ff"), ("_context", "ff_context")):
            svdq(f"{b}.mlp{s}_fc1", *take([f"{b}.{ff}.net.0.proj"]), lam(dim))
            svdq(f"{b}.mlp{s}_fc2", *take([f"{b}.{ff}.net.2"]), lam(4 * dim), unsigned=True)
        adaln(f"{b}.norm1.linear", 6)
        adaln(f"{b}.norm1_context.linear", 6)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            rename(b, n, f"attn.{n}")
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        shared = lam(dim)  # q/k/v and the MLP-in projection read one input
        svdq(f"{b}.qkv_proj", *take([f"{b}.{n}" for n in _QKV]), shared)
        svdq(f"{b}.mlp_fc1", *take([f"{b}.proj_mlp"]), shared)
        w, bias = take([f"{b}.proj_out"])
        svdq(f"{b}.out_proj", w[:, :dim], None, ones(dim))
        svdq(f"{b}.mlp_fc2", w[:, dim:], bias, lam(4 * dim), unsigned=True)
        adaln(f"{b}.norm.linear", 3)
        for n in ("norm_q", "norm_k"):
            rename(b, n, f"attn.{n}")
    out.update(_cpu(sd))  # embedders, final norm and projection: 16-bit
    sd.clear()
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    save_nunchaku_file(path, out, config={"_class_name": "FluxTransformer2DModel", **config}, precision=precision,
                       rank=rank)
    return canon if keep_canonical else None
