"""The packed memory layout of 4-bit codes and their scales (layout version 1).

Everything that packs or unpacks codes goes through this module, so a later kernel can introduce a new layout
by bumping ``LAYOUT_VERSION`` and adding a converter here without breaking saved models.

Layout version 1 (activations and weights alike):

* codes: ``uint8 [..., K/2]``; logical element ``2j`` of a row sits in the low nibble of byte ``j`` and element
  ``2j + 1`` in the high nibble. A nibble holds a two's-complement int4 (signed INT4), a uint4 (unsigned
  INT4 activations) or an e2m1 bit pattern (NVFP4).
* scales: ``[..., K/group]`` row-major, one per (row, group); model dtype for INT4, ``float8_e4m3fn`` for NVFP4.
* NVFP4 weights add ``global_scale``: fp32 ``[1]`` (per tensor) or ``[N]`` (per output channel).
* W4A8 weights use the INT4 packing with ``uint8`` multipliers as scales and an fp32 ``[N]`` ``global_scale``;
  W4A8 *activations* are not packed: ``int8 [..., K]`` codes, one per byte, and scales ``[..., 1]``. Their
  channels (and those of ``expand_w4a8_weight``'s int8 weights, the other operand of the same dot products) are in
  W4A8's channel order: within each 32-channel slice the 16 even channels, then the 16 odd ones
  (``w4a8_channel_order``). These are intermediates of one forward pass, never stored in a checkpoint.
* activation rows are tokens (any leading shape); weight rows are output channels ``[N, K/2]``.
"""

from __future__ import annotations

import torch

from .formats import E2M1_VALUES

LAYOUT_VERSION = 1
SUPPORTED_LAYOUT_VERSIONS = (1,)


def check_layout_version(version: int) -> int:
    if version not in SUPPORTED_LAYOUT_VERSIONS:
        raise ValueError(
            f"layout_version must be one of {list(SUPPORTED_LAYOUT_VERSIONS)}, got {version!r}; "
            "this model was saved by a newer svdquant_ops, upgrade the package to load it"
        )
    return version


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` integer codes (each in 4 bits: [-8, 7] or [0, 15]) -> ``uint8 [..., K/2]``."""
    if codes.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"codes.shape[-1] must be even to pack two codes per byte, got {codes.shape[-1]}")
    nib = codes.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """``uint8 [..., K/2]`` -> ``int8 [..., K]``; ``signed`` sign-extends two's-complement nibbles."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    out = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    if signed:
        out = torch.where(out >= 8, out - 16, out)
    return out.to(torch.int8)


def w4a8_channel_order(K: int) -> torch.Tensor:
    """Where each of K input channels sits in W4A8's int8 codes: ``int64 [K]``, a permutation of ``range(K)``.

    Channel ``k`` is stored at ``(k & ~31) | (k & 1) << 4 | (k >> 1) & 15``: per 32-channel slice the even channels,
    then the odd ones. Against the packed 4-bit weight (byte ``b`` of a slice holds channels ``2b`` and ``2b + 1``)
    position ``b`` is the low nibble of byte ``b`` and ``16 + b`` its high nibble, the order in which wgmma's 8-bit
    register fragment takes a k32 step, so the Hopper GEMM expands a 32-bit word of packed codes into that fragment
    with a few integer instructions. ``codes[..., w4a8_channel_order(K)]`` gives the channels in natural order.
    """
    if K <= 0 or K % 32:
        raise ValueError(f"K must be a positive multiple of 32 for W4A8's channel order, got {K}")
    k = torch.arange(K)
    return (k & ~31) | ((k & 1) << 4) | ((k >> 1) & 15)


def w4a8_from_stored(codes: torch.Tensor) -> torch.Tensor:
    """W4A8 int8 codes ``[..., K]`` in stored order (quantize_act, expand_w4a8_weight) -> natural channel order."""
    return codes[..., w4a8_channel_order(codes.shape[-1]).to(codes.device)]


def w4a8_to_stored(codes: torch.Tensor) -> torch.Tensor:
    """W4A8 int8 codes ``[..., K]`` in natural channel order -> the stored order the ops exchange."""
    out = torch.empty_like(codes)
    out[..., w4a8_channel_order(codes.shape[-1]).to(codes.device)] = codes
    return out


_E2M1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)


def e2m1_decode(nibbles: torch.Tensor) -> torch.Tensor:
    """e2m1 bit patterns (any integer dtype, values 0..15) -> float32 values."""
    return _E2M1.to(nibbles.device)[nibbles.long() & 0xF]
