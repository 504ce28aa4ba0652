"""Importing Nunchaku's SVDQuant checkpoints (``svdq-{int4|fp4}_r32-*.safetensors``) into our tensors, and writing
them (the packer; ``nunchaku_write.write_nunchaku_flux`` writes a whole 16-bit FLUX transformer with it, for
tests and benchmarks). Layout and semantics: ``../shared/docs/nunchaku-format.md``; index arithmetic:
``nunchaku_pack.py``.

``unpack_linear(tensors, precision)`` turns one packed W4A4 linear into an ``SVDQuantTensor`` and its bias;
``load_nunchaku_transformer(path)`` builds the diffusers ``FluxTransformer2DModel`` of a whole file. What maps how:

* Codes, group scales, λ, both low-rank factors and the bias are moved, not recomputed: the import is exact. INT4
  codes are Nunchaku's [-8, 7]; every INT4 path of ours reads a code as a sign-extended nibble (CPU and portable
  CUDA kernels; the Hopper path maps -8 to the fp8 value -8, which is exact), so -8 needs no special case. W4A8
  cannot hold it (code x multiplier must fit in [-126, 126]): ``precision="w4a8"`` re-quantizes (below).
* GELU-fed fc2 layers (INT4): Nunchaku quantizes ``(gelu + 0.171875) / λ`` as unsigned codes, as our
  ``act_unsigned=True`` does, and its stored bias already subtracts ``0.171875 · Q(R)·(1/λ)``. We keep our format's
  split: the linear's ``bias`` is the 16-bit layer's true bias (rounded to the model dtype) and the tensor's fp32
  ``bias_correction`` is the rest, ``stored − bias``, so that ``bias + bias_correction`` is the stored bias exactly
  and ``F.linear(x, weight, bias)`` computes Nunchaku's layer.
* Fused q/k/v (``qkv_proj``, ``qkv_proj_context``): split exactly into ``to_q / to_k / to_v`` (``add_*_proj``),
  each holding its rows of the codes, scales and up projection and the very same λ and down projection tensors,
  so diffusers' module tree is unchanged and one ``quantize_act`` serves all three (``share_inputs``).
* A single block's ``proj_out`` reads ``[attention 3072 | GELU(MLP) 12288]``; Nunchaku stores it as ``out_proj``
  (signed activations) plus ``mlp_fc2`` (unsigned activations in INT4) with separate λ, low-rank branches and
  NVFP4 channel scales. One of our tensors has one ``act_unsigned`` flag and one global scale, so for the exact
  precisions ``proj_out`` becomes a ``SplitInputLinear`` holding the two linears (outputs summed, as Nunchaku does).
  With ``precision="w4a8"`` it is one linear over all inputs (per-token INT8 activations have no unsigned
  variant; λ concatenated, low-rank branches side by side, biases summed).
* AdaLN (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``): AWQ W4A16 maps onto ``W4A16Tensor`` exactly
  (codes, scales, zeros; outputs de-interleaved from Nunchaku's chunk order); the +1 the converter folded into the
  scale chunks' bias is taken back (one rounding of those bias entries to the model dtype).
* ``precision="w4a8"``: each imported weight's 4-bit residual ``Q(R)`` (exact, in smoothed coordinates) is
  re-quantized with our W4A8 rule (per-channel scale times per-group integer multiplier, codes [-7, 7]); λ, the
  low-rank branch and the true bias are kept. This is an approximation of the INT4 model (measured in the tests).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..formats import ACT_SHIFT, INT4, NVFP4, W4A8
from ..layout import LAYOUT_VERSION, pack_nibbles, unpack_nibbles
from ..ops.devices import check_device_arg
from ..quantizers import dequantize, quantize_w4a8_weight
from ..storage import SVDQuantParts, SVDQuantTensor, W4A16Tensor
from ..storage.shared_moves import mark_shared
from . import nunchaku_pack as P

log = logging.getLogger("svdquant_ops")

MODEL_CLASSES = ("NunchakuFluxTransformer2dModel", "NunchakuFluxTransformer2DModel",
                 "NunchakuFluxTransformer2DModelV2", "FluxTransformer2DModel")
# Nunchaku's dtype names -> our precisions (weight dtype, group size)
_WEIGHT_DTYPES = {"int4": (INT4, 64), "fp4_e2m1_all": (NVFP4, 16)}
_PRECISION_ALIASES = {"int4": INT4, "nvfp4": NVFP4, "fp4": NVFP4, "fp4_e2m1_all": NVFP4}
SVDQ_KEYS = ("qweight", "wscales", "wcscales", "wtscale", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
AWQ_KEYS = ("qweight", "wscales", "wzeros", "bias")
# What a whole file must hold per layer (the converter writes all of these; Nunchaku's V2 loader loads strictly, only
# the NVFP4 wcscales / wtscale may be absent). The one bias a file may leave out: a single block's out_proj (the
# converter puts proj_out's bias on mlp_fc2 only).
SVDQ_FILE_KEYS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
_CODE_MAX = {INT4: 8.0, NVFP4: 6.0}  # the largest code magnitude: INT4 -8, e2m1 6
# FluxTransformer2DModel's integer config fields (out_channels may also be null) and the least value each takes
_CONFIG_INTS = {"patch_size": 1, "in_channels": 1, "out_channels": 1, "num_layers": 0, "num_single_layers": 0,
                "attention_head_dim": 1, "num_attention_heads": 1, "joint_attention_dim": 1,
                "pooled_projection_dim": 1}
ADALN_SCALE_CHUNKS = {6: (1, 4), 3: (1,)}  # AdaLayerNormZero: shift, scale, gate x 2; Single: shift, scale, gate

# Nunchaku v1 layer names -> diffusers module names, per block kind. "qkv" entries are split three ways.
_DOUBLE = {
    "qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_proj_context": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj",
    "mlp_context_fc2": "ff_context.net.2",
}
_DOUBLE_UNSIGNED = ("mlp_fc2", "mlp_context_fc2")
_DOUBLE_ADALN = {"norm1.linear": 6, "norm1_context.linear": 6}
_DOUBLE_RENAMES = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
                   "norm_added_k": "attn.norm_added_k"}
_SINGLE = {"qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"), "mlp_fc1": "proj_mlp"}
_SINGLE_ADALN = {"norm.linear": 3}
_SINGLE_RENAMES = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}


class NunchakuFormatError(ValueError):
    """The file is not a Nunchaku checkpoint this importer can read (the message says what is wrong)."""


# ------------------------------------------------------------------------------------------------ one linear
def _check_layer(name: str, tensors: dict, required, allowed, keys: str, what: str) -> None:
    """One layer's packed tensors: every required key present, no unknown key, no NaN / Inf."""
    missing = [k for k in required if k not in tensors]
    if missing:
        raise NunchakuFormatError(f"{name}: missing {keys} {missing} (have {sorted(tensors)})")
    unknown = sorted(set(tensors) - set(allowed))
    if unknown:
        raise NunchakuFormatError(f"{name}: unknown keys {unknown} for {what}")
    for k, t in tensors.items():
        _finite(f"{name}.{k}", t)


def _finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.is_floating_point() and t.numel() and not torch.isfinite(t.float()).all():
        raise NunchakuFormatError(f"{name} contains NaN or Inf (corrupt checkpoint?)")


def _check_dequantized_range(name: str, key: str, bound: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``bound``: the largest magnitude each output row's codes can dequantize to (fp32). A value past the model
    dtype's range is an inf weight (corrupt scales); anything finite is left alone (no principled smaller bound)."""
    top = float(bound.max()) if bound.numel() else 0.0
    limit = torch.finfo(dtype).max
    if not top <= limit:  # also NaN / inf from an fp32 overflow of the product
        raise NunchakuFormatError(f"{name}.{key}: scales out of range: the dequantized weight ({what}) reaches "
                                  f"{top:.3g}, past the largest {str(dtype).removeprefix('torch.')} value "
                                  f"{limit:.3g} (corrupt checkpoint?)")


def _canonical_precision(precision: str) -> str:
    p = _PRECISION_ALIASES.get(precision)
    if p is None:
        raise ValueError(f"precision must be 'int4' or 'nvfp4' (Nunchaku's 'fp4'), got {precision!r}")
    return p


def unpack_canonical(tensors: dict, precision: str, *, name: str = "linear") -> dict:
    """One packed W4A4 linear's keys (``qweight``, ``wscales``, ...; no prefix) -> its canonical tensors, named as
    the reference fixture names them: ``codes`` int8 [N, K] (INT4) or ``codebook_index`` uint8 [N, K] (NVFP4),
    ``wscales`` [N, K/64] (INT4) or ``micro_scales`` fp8 [N, K/16] + ``channel_scales`` [N] and ``tensor_scale``
    (NVFP4, when present), ``smooth`` [K], ``bias`` [N] (as stored: GELU shift compensated), ``proj_down_raw_x``
    [K, R], ``proj_up`` [N, R]. Padded sizes are kept."""
    precision = _canonical_precision(precision)
    _check_layer(name, tensors, ("qweight", "wscales", "smooth", "lora_down", "lora_up"), SVDQ_KEYS,
                 "packed keys", "an SVDQuant W4A4 linear")
    nib = P.unpack_codes(tensors["qweight"])
    n, k = nib.shape
    out = {}
    if precision == INT4:
        out["codes"] = torch.where(nib >= 8, nib.to(torch.int16) - 16, nib.to(torch.int16)).to(torch.int8)
        ws = tensors["wscales"]
        if ws.dtype not in (torch.bfloat16, torch.float16, torch.float32) or tuple(ws.shape) != (k // 64, n):
            raise NunchakuFormatError(f"{name}.wscales: INT4 group scales must be a float [K/64, N] = "
                                      f"[{k // 64}, {n}], got {ws.dtype} {list(ws.shape)}")
        out["wscales"] = P.unpack_lanes(ws)
    else:
        out["codebook_index"] = nib
        ws = tensors["wscales"]
        if ws.dtype != torch.float8_e4m3fn or tuple(ws.shape) != (k // 16, n):
            raise NunchakuFormatError(f"{name}.wscales: NVFP4 micro-scales must be float8_e4m3fn [K/16, N] = "
                                      f"[{k // 16}, {n}], got {ws.dtype} {list(ws.shape)}")
        out["micro_scales"] = P.unpack_micro_scales(ws)
        if tensors.get("wcscales") is not None:
            out["channel_scales"] = P.unpack_vector(_vector(name, "wcscales", tensors["wcscales"], n))
        if tensors.get("wtscale") is not None:
            out["tensor_scale"] = tensors["wtscale"].reshape(-1)[:1]
    out["smooth"] = P.unpack_vector(_vector(name, "smooth", tensors["smooth"], k))
    if tensors.get("bias") is not None:
        out["bias"] = P.unpack_vector(_vector(name, "bias", tensors["bias"], n))
    down, up = tensors["lora_down"], tensors["lora_up"]
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != k or up.shape[0] != n or down.shape[1] != up.shape[1]:
        raise NunchakuFormatError(f"{name}: lora_down must be [K, R] = [{k}, R] and lora_up [N, R] = [{n}, R] with one "
                                  f"R, got {list(down.shape)} and {list(up.shape)}")
    out["proj_down_raw_x"] = P.unpack_down(down)
    out["proj_up"] = P.unpack_up(up)
    return out


def _vector(name: str, key: str, t: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(t.shape) != (size,):
        raise NunchakuFormatError(f"{name}.{key}: expected shape [{size}], got {list(t.shape)}")
    return t


def pack_canonical(canonical: dict, precision: str) -> dict:
    """The exact inverse of ``unpack_canonical`` (Nunchaku's converter output, bit for bit; an NVFP4 -0 code is
    written as +0, as the converter does). ``smooth_orig`` defaults to ``smooth``."""
    precision = _canonical_precision(precision)
    out = {}
    if precision == INT4:
        out["qweight"] = P.pack_codes(canonical["codes"])
        out["wscales"] = P.pack_lanes(canonical["wscales"])
    else:
        idx = canonical["codebook_index"].to(torch.uint8)
        out["qweight"] = P.pack_codes(torch.where(idx == 8, torch.zeros_like(idx), idx))
        out["wscales"] = P.pack_micro_scales(canonical["micro_scales"])
        if canonical.get("channel_scales") is not None:
            out["wcscales"] = P.pack_vector(canonical["channel_scales"])
        if canonical.get("tensor_scale") is not None:
            out["wtscale"] = canonical["tensor_scale"].reshape(())
    if canonical.get("bias") is not None:
        out["bias"] = P.pack_vector(canonical["bias"])
    out["smooth"] = P.pack_vector(canonical["smooth"])
    out["smooth_orig"] = P.pack_vector(canonical.get("smooth_orig", canonical["smooth"]))
    out["lora_down"] = P.pack_down(canonical["proj_down_raw_x"])
    out["lora_up"] = P.pack_up(canonical["proj_up"])
    return {k: v.contiguous() for k, v in out.items()}


def unpack_linear(tensors: dict, precision: str, *, act_unsigned: bool = False, out_features: int | None = None,
                  in_features: int | None = None, name: str = "linear") -> tuple[SVDQuantTensor, torch.Tensor | None]:
    """One packed Nunchaku W4A4 linear (its keys without the prefix: ``qweight``, ``wscales``, ``smooth``,
    ``lora_down``, ``lora_up``, optional ``bias``, ``smooth_orig``, NVFP4 ``wcscales`` / ``wtscale``) -> our
    ``SVDQuantTensor`` and the bias to pass with it: ``F.linear(x, weight, bias)`` computes Nunchaku's layer.

    ``precision``: ``"int4"`` or ``"nvfp4"`` (``"fp4"``). ``act_unsigned=True`` for the GELU-fed fc2 layers of an
    INT4 file (their 4-bit path sees ``gelu + 0.171875``). ``out_features`` / ``in_features`` drop Nunchaku's
    padding to multiples of 128. Exact: codes, scales, λ, both factors and the effective bias are moved bit for bit.
    """
    precision = _canonical_precision(precision)
    if act_unsigned and precision != INT4:
        raise ValueError("act_unsigned is only defined for INT4 (Nunchaku's NVFP4 activations are always signed)")
    c = unpack_canonical(tensors, precision, name=name)
    codes = c["codes"] if precision == INT4 else c["codebook_index"]
    n_pad, k_pad = codes.shape
    n, k = out_features or n_pad, in_features or k_pad
    if n > n_pad or k > k_pad:
        raise NunchakuFormatError(f"{name}: packed weight is [{n_pad}, {k_pad}], smaller than the model's [{n}, {k}]")
    g = 64 if precision == INT4 else 16
    if k % g:
        raise NunchakuFormatError(f"{name}: in_features {k} is not a multiple of the group size {g}")
    dtype = c["smooth"].dtype
    codes = codes[:n, :k].contiguous()
    scales = (c["wscales"] if precision == INT4 else c["micro_scales"])[:n, : k // g].contiguous()
    smooth = c["smooth"][:k].contiguous()
    down, up = c["proj_down_raw_x"][:k].contiguous(), c["proj_up"][:n].contiguous()
    stored_bias = c["bias"][:n].contiguous() if "bias" in c else None
    global_scale = None
    if precision == NVFP4:
        gs = c["channel_scales"][:n].float() if "channel_scales" in c else None
        ts = c["tensor_scale"].float().to(codes.device) if "tensor_scale" in c else None
        if gs is None:
            global_scale = ts if ts is not None else torch.ones(1, device=codes.device)
        else:
            global_scale = gs * ts if ts is not None else gs
        global_scale = global_scale.contiguous()
    bound = scales.float().abs().amax(1) * _CODE_MAX[precision]
    if global_scale is not None:
        bound = bound * global_scale.abs()
    _check_dequantized_range(name, "wscales", bound, dtype,
                             "code x scale" if precision == INT4 else "code x micro-scale x channel / tensor scale")
    bias, correction = stored_bias, None
    if act_unsigned:
        bias, correction = _split_unsigned_bias(codes, scales, smooth, stored_bias, dtype)
    parts = SVDQuantParts(codes=codes, scales=scales, global_scale=global_scale, smooth=smooth, proj_down=down,
                          proj_up=up, precision=precision, act_unsigned=act_unsigned, bias_correction=correction)
    weight = SVDQuantTensor.from_parts(parts, dtype)
    try:
        weight.validate()
    except ValueError as exc:
        raise NunchakuFormatError(f"{name}: {exc}") from None
    return weight, bias


def _split_unsigned_bias(codes, scales, smooth, stored_bias, dtype):
    """(bias, bias_correction) of a GELU-fed INT4 layer: the true bias ``stored + 0.171875 · Q(R)·(1/λ)`` rounded to
    the model dtype, and the fp32 remainder so that ``bias + bias_correction == stored`` exactly (our format's
    ``bias_correction`` is ``−Q(R)·(shift/λ)`` up to that rounding)."""
    n = codes.shape[0]
    stored = stored_bias.float() if stored_bias is not None else torch.zeros(n, device=codes.device)
    shift_comp = dequantize(codes, scales, INT4) @ (ACT_SHIFT / smooth.float())  # Q(R)·(shift/λ), fp32 [N]
    bias = (stored + shift_comp).to(dtype)
    correction = stored - bias.float()
    exact = (bias.float() + correction) == stored
    if not bool(exact.all()):  # a remainder not representable in fp32 (exponents far apart): keep the stored value
        bias = torch.where(exact, bias, stored.to(dtype))
        correction = torch.where(exact, correction, torch.zeros_like(correction))
    return bias, correction.contiguous()


def true_bias(weight: SVDQuantTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias of the 16-bit layer an imported weight approximates, fp32: ``bias`` plus, for a GELU-fed INT4
    layer, the part of ``bias_correction`` that is not the shift compensation."""
    if weight.bias_correction is None:
        return None if bias is None else bias.float()
    shift_comp = weight.residual() @ (ACT_SHIFT / weight.smooth.float())
    total = weight.bias_correction + (0 if bias is None else bias.float())
    return total + shift_comp if weight.act_unsigned else total


# ------------------------------------------------------------------------------------------------ AdaLN (AWQ W4A16)
def unpack_awq_linear(tensors: dict, chunks: int, *, name: str = "linear", dtype: torch.dtype | None = None
                      ) -> tuple[W4A16Tensor, torch.Tensor | None]:
    """One AWQ W4A16 AdaLN linear (``qweight`` int32 [N/4, K/2], ``wscales`` / ``wzeros`` [K/64 (padded), N],
    ``bias`` [N]) -> our ``W4A16Tensor`` (exact: same codes, scales and zeros) and the diffusers-order bias (rows
    de-interleaved from Nunchaku's ``chunks`` order; the +1 folded into the scale chunks taken back)."""
    _check_layer(name, tensors, ("qweight", "wscales", "wzeros"), AWQ_KEYS, "AWQ keys", "an AWQ W4A16 linear")
    codes = P.unpack_awq(tensors["qweight"])
    n, k = codes.shape
    if n % chunks:
        raise NunchakuFormatError(f"{name}: {n} outputs do not split into {chunks} AdaLN chunks")
    try:
        scales = P.unpack_awq_groups(tensors["wscales"], k)
        zeros = P.unpack_awq_groups(tensors["wzeros"], k)
    except ValueError as exc:
        raise NunchakuFormatError(f"{name}: {exc}") from None
    if scales.shape[0] != n or zeros.shape[0] != n:
        raise NunchakuFormatError(f"{name}: wscales / wzeros have {scales.shape[0]} / {zeros.shape[0]} columns, "
                                  f"qweight {n} outputs")
    dtype = dtype or scales.dtype
    bound = (15 * scales.float().abs() + zeros.float().abs()).amax(1)
    _check_dequantized_range(name, "wscales", bound, dtype, "code x scale + zero")
    codes, scales, zeros = (P.deinterleave_rows(t, chunks).contiguous() for t in (codes, scales, zeros))
    weight = W4A16Tensor(pack_nibbles(codes).contiguous(), scales.to(dtype), zeros.to(dtype), LAYOUT_VERSION, dtype)
    try:
        weight.validate()
    except ValueError as exc:
        raise NunchakuFormatError(f"{name}: {exc}") from None
    bias = tensors.get("bias")
    if bias is not None:
        b = P.deinterleave_rows(bias, chunks).float().reshape(chunks, -1)
        for c in ADALN_SCALE_CHUNKS[chunks]:
            b[c] -= 1.0
        bias = b.reshape(-1).to(dtype)
    return weight, bias


def pack_awq_linear(weight: W4A16Tensor, bias: torch.Tensor | None, chunks: int) -> dict:
    """The inverse of ``unpack_awq_linear``: our weight-only AdaLN linear -> Nunchaku's keys."""
    codes = unpack_nibbles(weight.codes, signed=False)
    out = {
        "qweight": P.pack_awq(P.interleave_rows(codes, chunks)),
        "wscales": P.pack_awq_groups(P.interleave_rows(weight.scales, chunks)),
        "wzeros": P.pack_awq_groups(P.interleave_rows(weight.zeros, chunks)),
    }
    if bias is not None:
        b = bias.float().reshape(chunks, -1).clone()
        for c in ADALN_SCALE_CHUNKS[chunks]:
            b[c] += 1.0
        out["bias"] = P.interleave_rows(b.reshape(-1).to(bias.dtype), chunks)
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ reshaping weights
def split_rows(weight: SVDQuantTensor, bias: torch.Tensor | None, sizes) -> list[tuple[SVDQuantTensor, object]]:
    """Split a fused linear's outputs (q;k;v): each part keeps its rows of the codes, scales, up projection, channel
    scales and bias correction, and the very same λ and down projection tensors (one ``quantize_act`` for all)."""
    out, start = [], 0
    if len(sizes) > 1:  # one object held by several weights: storage.shared_moves
        mark_shared(weight.smooth), mark_shared(weight.proj_down)
    for size in sizes:
        rows = slice(start, start + size)
        gs = weight.global_scale
        if gs is not None and gs.numel() > 1:
            gs = gs[rows].contiguous()
        bc = None if weight.bias_correction is None else weight.bias_correction[rows].contiguous()
        part = SVDQuantTensor(weight.codes[rows].contiguous(), weight.scales[rows].contiguous(), weight.smooth,
                              weight.proj_down, weight.proj_up[rows].contiguous(), weight.precision,
                              weight.act_unsigned, weight.layout_version, weight.dtype, global_scale=gs,
                              bias_correction=bc)
        out.append((part, None if bias is None else bias[rows].contiguous()))
        start += size
    if start != weight.shape[0]:
        raise ValueError(f"split_rows: sizes {list(sizes)} do not add up to {weight.shape[0]} outputs")
    return out


def to_w4a8(parts: list[tuple[SVDQuantTensor, torch.Tensor | None]]) -> tuple[SVDQuantTensor, torch.Tensor | None]:
    """Re-express imported weight(s) in our W4A8 format. Several parts are concatenated along the inputs (a single
    block's ``out_proj`` | ``mlp_fc2`` -> ``proj_out``): λ concatenated, low-rank branches side by side (down
    projection block-diagonal, up projections concatenated: exact), biases summed.

    Each part's 4-bit residual ``Q(R)`` (exact, in smoothed coordinates) is re-quantized with the W4A8 rule (per-row
    scale rowmax/126, per-group multiplier in [1, 18], codes [-7, 7]; formats.py); λ, the branch and the true bias
    (without the GELU-shift compensation, which W4A8 does not need) are kept. Codes of -8 cannot be carried over
    (code x multiplier must fit int8), which is why this is a re-quantization and not a copy."""
    ws = [w for w, _ in parts]
    dtype, device = ws[0].dtype, ws[0].device
    residual = torch.cat([w.residual() for w in ws], dim=1)
    smooth = torch.cat([w.smooth for w in ws])
    ranks = [w.rank for w in ws]
    down = torch.zeros(sum(w.shape[1] for w in ws), sum(ranks), dtype=dtype, device=device)
    row = col = 0
    for w in ws:
        down[row:row + w.shape[1], col:col + w.rank] = w.proj_down
        row, col = row + w.shape[1], col + w.rank
    up = torch.cat([w.proj_up for w in ws], dim=1)
    biases = [true_bias(w, b) for w, b in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = sum(b for b in biases if b is not None).to(dtype)
    codes, mult, scale = quantize_w4a8_weight(residual)
    weight = SVDQuantTensor.from_parts(SVDQuantParts(codes=codes, scales=mult, global_scale=scale, smooth=smooth,
                                                     proj_down=down, proj_up=up, precision=W4A8), dtype)
    return weight, bias


class SplitInputLinear(nn.Module):
    """A linear whose inputs come in two parts quantized differently: ``out_proj(x[..., :split]) +
    mlp_fc2(x[..., split:])``. Nunchaku's form of a FLUX single block's ``proj_out`` (attention output, signed; GELU
    output, unsigned in INT4), kept as two linears so that the import is exact. Sum in the model dtype."""

    def __init__(self, split: int, in_features: int, out_features: int, *, bias_first: bool, bias_second: bool,
                 device=None, dtype=None):
        super().__init__()
        self.split, self.in_features, self.out_features = split, in_features, out_features
        self.out_proj = nn.Linear(split, out_features, bias=bias_first, device=device, dtype=dtype)
        self.mlp_fc2 = nn.Linear(in_features - split, out_features, bias=bias_second, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(x[..., : self.split]) + self.mlp_fc2(x[..., self.split:])

    def lora_parts(self) -> list[tuple[str, slice]]:
        """Which child linear reads which input columns (``svdquant_ops.lora`` splits a LoRA's A along them)."""
        return [("out_proj", slice(0, self.split)), ("mlp_fc2", slice(self.split, self.in_features))]

    def extra_repr(self) -> str:
        return f"split={self.split}, in_features={self.in_features}, out_features={self.out_features}"


# ------------------------------------------------------------------------------------------------ the whole file
def parse_quantization_config(raw: str | dict) -> tuple[str, int]:
    """(precision, rank) of a Nunchaku ``quantization_config``; anything this importer does not know is an error."""
    try:
        q = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError as exc:
        raise NunchakuFormatError(f"quantization_config is not JSON: {exc}") from None
    method = q.get("method", "svdquant")
    w, a, rank = q.get("weight") or {}, q.get("activation") or {}, q.get("rank")
    known = _WEIGHT_DTYPES.get(w.get("dtype"))
    problems = []
    if method != "svdquant":
        problems.append(f"method {method!r} (expected 'svdquant')")
    if known is None:
        problems.append(f"weight dtype {w.get('dtype')!r} (expected 'int4' or 'fp4_e2m1_all')")
    else:
        if w.get("group_size", known[1]) != known[1]:
            problems.append(f"weight group_size {w.get('group_size')!r} (expected {known[1]})")
        if a and a.get("dtype", w.get("dtype")) != w.get("dtype"):
            problems.append(f"activation dtype {a.get('dtype')!r} (expected {w.get('dtype')!r})")
        if a and a.get("group_size", known[1]) != known[1]:
            problems.append(f"activation group_size {a.get('group_size')!r} (expected {known[1]})")
        allowed = {INT4: (None,), NVFP4: ("fp8_e4m3_nan", None)}[known[0]]
        for what, d in (("weight", w), ("activation", a)):
            sd = d.get("scale_dtype")
            sds = sd if isinstance(sd, (list, tuple)) else [sd]
            if any(s not in allowed for s in sds):
                problems.append(f"{what} scale_dtype {sd!r}")
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"rank {rank!r} (expected a positive integer)")
    if problems:
        raise NunchakuFormatError("quantization_config not supported by this importer: " + "; ".join(problems)
                                  + f" (got {json.dumps(q)})")
    return known[0], rank


def read_nunchaku_metadata(path: str | Path) -> dict:
    """The metadata of a Nunchaku safetensors file, after checking that the file is one (its header only: no tensor
    is read, so what is wrong with the metadata is said before gigabytes are loaded)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; expected a Nunchaku .safetensors file "
                                "(svdq-{int4|fp4}_r{rank}-*.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except SafetensorError as exc:  # a file that is not safetensors, or a truncated one
        raise NunchakuFormatError(f"{path}: not a safetensors file ({exc})") from None
    missing = [k for k in ("config", "quantization_config") if k not in meta]
    if missing or not any(k.endswith(".qweight") for k in keys):
        what = f"no {' / '.join(missing)} metadata" if missing else "no packed .qweight tensors"
        raise NunchakuFormatError(f"{path}: not a Nunchaku SVDQuant checkpoint ({what}); expected a single-file "
                                  "svdq-{int4|fp4}_r{rank}-*.safetensors with 'config', 'model_class' and "
                                  "'quantization_config' metadata")
    return meta


def read_nunchaku_tensors(path: str | Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a file ``read_nunchaku_metadata`` accepted, on ``device`` (checked by the caller)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:  # truncated after its header
        raise NunchakuFormatError(f"{path}: not a safetensors file ({exc})") from None


def _check_config(path: Path, config) -> None:
    """The embedded diffusers config: a JSON object whose integer fields are integers (diffusers would pass a string
    on to torch, which fails far from the cause)."""
    if not isinstance(config, dict):
        raise NunchakuFormatError(f"{path}: the 'config' metadata is a JSON {type(config).__name__}, expected an "
                                  "object (the diffusers model config)")
    problems = []
    for key, least in _CONFIG_INTS.items():
        v = config.get(key)
        if key not in config or key == "out_channels" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            kind = "a positive integer" if least else "an integer >= 0"
            problems.append(f"{key} {v!r} ({type(v).__name__}; expected {kind}"
                            f"{' or null' if key == 'out_channels' else ''})")
    axes = config.get("axes_dims_rope")
    if "axes_dims_rope" in config and (not isinstance(axes, list) or not axes or any(
            isinstance(a, bool) or not isinstance(a, int) or a <= 0 for a in axes)):
        problems.append(f"axes_dims_rope {axes!r} (expected a list of positive integers)")
    if "guidance_embeds" in config and not isinstance(config["guidance_embeds"], bool):
        problems.append(f"guidance_embeds {config['guidance_embeds']!r} (expected true or false)")
    if problems:
        raise NunchakuFormatError(f"{path}: the 'config' metadata has invalid fields: {'; '.join(problems)}")


def _group(tensors: dict, prefix: str, keys) -> dict:
    return {k: tensors.pop(f"{prefix}.{k}") for k in keys if f"{prefix}.{k}" in tensors}


def load_nunchaku_transformer(path: str | Path, device="cpu", precision: str | None = None, *,
                              share: bool = True) -> nn.Module:
    """Build the diffusers transformer of a Nunchaku SVDQuant file (FLUX.1: ``FluxTransformer2DModel`` from the
    embedded ``config``, on the meta device, so no 16-bit copy of the quantized weights is ever made), with
    ``SVDQuantTensor`` weights on its W4A4 linears, ``W4A16Tensor`` weights on its AdaLN linears and the stored
    16-bit tensors elsewhere, all on ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``, a ``torch.device``; any other
    value, or a GPU this machine lacks, is a ``ValueError`` naming ``device=``).

    ``precision``: None (or the file's own, ``"int4"`` / ``"nvfp4"``): the exact import. ``"w4a8"``: re-express
    the weights in our W4A8 format at load time (INT8 activations; the fast format on Hopper; an approximation of
    the file's model, see ``to_w4a8``). The file's fused q/k/v become three linears holding one λ and one down
    projection object either way (``split_rows``). ``share`` (default) also gives the other linears that read one
    input one λ and one down projection (``share_inputs``) and installs the compile pass that merges their
    activation quantization.
    """
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    device = check_device_arg(device, "device")  # before the file: a bad device is not the file's fault
    meta = read_nunchaku_metadata(path)
    model_class = meta.get("model_class") or json.loads(meta.get("comfy_config") or "{}").get("model_class")
    if model_class not in MODEL_CLASSES:
        raise NunchakuFormatError(f"{path}: model_class {model_class!r} is not supported (this importer reads FLUX.1 "
                                  f"transformers: {', '.join(MODEL_CLASSES[:1])})")
    native, rank = parse_quantization_config(meta["quantization_config"])
    target = native if precision in (None, native) else precision
    if target not in (native, W4A8):
        raise ValueError(f"precision must be None, {native!r} (this file's) or 'w4a8', got {precision!r}")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise NunchakuFormatError(f"{path}: the 'config' metadata is not JSON: {exc}") from None
    _check_config(path, config)
    tensors = read_nunchaku_tensors(path, device)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".smooth")), torch.bfloat16)
    dim = model.inner_dim
    state = {}

    def require(prefix: str, packed: dict, required, what: str):
        missing = [f"{prefix}.{k}" for k in required if k not in packed]
        if missing:
            raise NunchakuFormatError(f"{path}: {what} {prefix} is missing {', '.join(missing)} (damaged file? a "
                                      f"Nunchaku file holds {', '.join(required)} for this layer)")

    def svdq(prefix: str, n: int, k: int, unsigned: bool = False, needs_bias: bool = True):
        packed = _group(tensors, prefix, SVDQ_KEYS)
        if not packed:
            raise NunchakuFormatError(f"{path}: missing quantized layer {prefix} (keys {prefix}.qweight, ...)")
        require(prefix, packed, [key for key in SVDQ_FILE_KEYS if needs_bias or key != "bias"], "quantized layer")
        r = packed.get("lora_down", torch.empty(0, 0)).shape[-1]
        if r != -(-rank // 16) * 16:
            raise NunchakuFormatError(f"{path}: {prefix} has rank {r} but quantization_config says rank {rank}")
        q = packed["qweight"]
        if q.dim() != 2 or q.shape[0] < n or q.shape[1] * 2 < k or q.shape[0] - n >= 128 or q.shape[1] * 2 - k >= 128:
            raise NunchakuFormatError(f"{path}: {prefix}.qweight has shape {list(q.shape)}, which does not match "
                                      f"[{n}, {k // 2}] (padded to 128) from the embedded config")
        return unpack_linear(packed, native, act_unsigned=unsigned and native == INT4, out_features=n,
                             in_features=k, name=prefix)

    def put(name: str, weight, bias):
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias

    def put_linear(name: str, weight, bias):
        if target == W4A8:
            weight, bias = to_w4a8([(weight, bias)])
        put(name, weight, bias)

    def adaln(prefix: str, module: str, chunks: int):
        packed = _group(tensors, prefix, AWQ_KEYS)
        if not packed:
            raise NunchakuFormatError(f"{path}: missing AdaLN layer {prefix} (keys {prefix}.qweight, ...)")
        require(prefix, packed, AWQ_KEYS, "AdaLN layer")
        weight, bias = unpack_awq_linear(packed, chunks, name=prefix, dtype=dtype)
        if tuple(weight.shape) != (chunks * dim, dim):
            raise NunchakuFormatError(f"{path}: {prefix} is {list(weight.shape)}, the config needs "
                                      f"[{chunks * dim}, {dim}]")
        put(module, weight, bias)

    def renames(block: str, table: dict):
        for old, new in table.items():
            for key in [k for k in tensors if k.startswith(f"{block}.{old}.")]:
                state[f"{block}.{new}.{key[len(block) + len(old) + 2:]}"] = tensors.pop(key)

    mlp = int(dim * 4.0)
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        for old, new in _DOUBLE.items():
            n, k = {"qkv_proj": (3 * dim, dim), "qkv_proj_context": (3 * dim, dim), "mlp_fc1": (mlp, dim),
                    "mlp_context_fc1": (mlp, dim), "mlp_fc2": (dim, mlp), "mlp_context_fc2": (dim, mlp)}.get(
                        old, (dim, dim))
            weight, bias = svdq(f"{b}.{old}", n, k, unsigned=old in _DOUBLE_UNSIGNED)
            if isinstance(new, tuple):
                for name, (w, bb) in zip(new, split_rows(weight, bias, (dim,) * 3)):
                    put_linear(f"{b}.{name}", w, bb)
            else:
                put_linear(f"{b}.{new}", weight, bias)
        for old, chunks in _DOUBLE_ADALN.items():
            adaln(f"{b}.{old}", f"{b}.{old}", chunks)
        renames(b, _DOUBLE_RENAMES)
    for i, block in enumerate(model.single_transformer_blocks):
        b = f"single_transformer_blocks.{i}"
        smlp = block.mlp_hidden_dim
        for old, new in _SINGLE.items():
            n = 3 * dim if old == "qkv_proj" else smlp
            weight, bias = svdq(f"{b}.{old}", n, dim)
            if isinstance(new, tuple):
                for name, (w, bb) in zip(new, split_rows(weight, bias, (dim,) * 3)):
                    put_linear(f"{b}.{name}", w, bb)
            else:
                put_linear(f"{b}.{new}", weight, bias)
        attn = svdq(f"{b}.out_proj", dim, dim, needs_bias=False)  # the converter puts proj_out's bias on mlp_fc2
        ffn = svdq(f"{b}.mlp_fc2", dim, smlp, unsigned=True)
        if target == W4A8:
            put(f"{b}.proj_out", *to_w4a8([attn, ffn]))
        else:
            block.proj_out = SplitInputLinear(dim, dim + smlp, dim, bias_first=attn[1] is not None,
                                              bias_second=ffn[1] is not None, device="meta")
            put(f"{b}.proj_out.out_proj", *attn)
            put(f"{b}.proj_out.mlp_fc2", *ffn)
        for old, chunks in _SINGLE_ADALN.items():
            adaln(f"{b}.{old}", f"{b}.{old}", chunks)
        renames(b, _SINGLE_RENAMES)

    leftovers = sorted(k for k in tensors if any(k.endswith("." + s) for s in ("qweight", "wscales", "lora_down")))
    if leftovers:
        raise NunchakuFormatError(f"{path}: quantized layers the embedded config has no place for (more blocks in the "
                                  f"file than in the config?): {leftovers[:5]}")
    for key, t in tensors.items():
        _finite(f"{path}: {key}", t)
        state[key] = t if not t.is_floating_point() else t.to(dtype)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise NunchakuFormatError(f"{path}: the file does not match the embedded config's model: missing "
                                  f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                                  f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    params = dict(model.named_parameters())
    for key, t in state.items():
        ref = params.get(key)
        if ref is not None and tuple(ref.shape) != tuple(t.shape):
            raise NunchakuFormatError(f"{path}: {key} has shape {list(t.shape)}, the embedded config needs "
                                      f"{list(ref.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        raise NunchakuFormatError(f"{path}: no tensors for {still_meta[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.save_pretrained = _cannot_save_pretrained  # an instance attribute: pipe.save_pretrained calls it too
    if share:
        from ..ops import install_compile_pass
        from ..quantize.sharing import share_inputs
        from .diffusers import prepare_model

        prepare_model(model)
        share_inputs(model)
        install_compile_pass()
    log.info("svdquant_ops: loaded %s (%s%s, rank %d) as %s", path.name, native,
             f" -> {target}" if target != native else "", rank, type(model).__name__)
    return model


def _cannot_save_pretrained(*args, **kwargs):
    # diffusers' from_pretrained builds the stock module tree, which has one proj_out per single block, not the two
    # linears (SplitInputLinear) this import holds: a re-saved model would load with proj_out uninitialized.
    raise NotImplementedError(
        "svdquant_ops: a transformer imported from a Nunchaku file cannot be saved with save_pretrained (diffusers "
        "would load it back without its single blocks' proj_out, which Nunchaku splits into out_proj and mlp_fc2); "
        "keep the Nunchaku file as its saved form, or save its state dict with svdquant_ops.save_file and load that "
        "into a model from load_nunchaku_transformer")


# ------------------------------------------------------------------------------------------------ writing a file
def save_nunchaku_file(path: str | Path, tensors: dict[str, torch.Tensor], *, config: dict, precision: str,
                       rank: int, model_class: str = "NunchakuFluxTransformer2dModel") -> None:
    """Write packed tensors (``pack_canonical`` / ``pack_awq_linear`` outputs under their v1 layer names, plus the
    16-bit tensors) as a Nunchaku single-file checkpoint with its metadata."""
    from safetensors.torch import save_file

    precision = _canonical_precision(precision)
    dt, g = ("int4", 64) if precision == INT4 else ("fp4_e2m1_all", 16)
    sd = None if precision == INT4 else "fp8_e4m3_nan"
    qcfg = {"method": "svdquant", "weight": {"dtype": dt, "scale_dtype": sd if sd is None else [None, sd],
                                             "group_size": g},
            "activation": {"dtype": dt, "scale_dtype": sd, "group_size": g}, "rank": rank}
    meta = {"config": json.dumps(config), "model_class": model_class, "quantization_config": json.dumps(qcfg),
            "comfy_config": json.dumps({"model_class": "Flux", "model_config": {}})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
