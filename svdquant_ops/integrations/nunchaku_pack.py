"""Nunchaku's packed tensor layouts as index arithmetic, both ways (``../shared/docs/nunchaku-format.md``).

``unpack_*`` turns a tensor as Nunchaku's converter stores it into the canonical row-major one; ``pack_*`` is the
exact inverse (checked bit for bit against the reference converter's output in ``tests/test_nunchaku.py``). Nothing
here knows about models, our formats or kernels: only where each element sits.

SVDQuant W4A4 linears (N outputs, K inputs, R rank; N and K multiples of 128, R of 16):

* codes ``[N, K]`` (4-bit: INT4 two's complement or the e2m1 codebook index) <-> ``qweight`` int8 ``[N, K/2]``,
  MMA-tile order, eight codes per little-endian int32 word (code i in bits [4i, 4i+4));
* per-output-channel vectors and INT4 group scales ``[N, G]`` <-> ``[G, N]`` lane order ("0 1 8 9 | 2 3 10 11 | ...");
* NVFP4 micro-scales ``[N, K/16]`` <-> ``[K/16, N]``;
* low-rank factors: ``proj_down`` ``[K, R]`` (multiplies raw x) and ``proj_up`` ``[N, R]`` <-> 16 x 16 fragments.

AWQ W4A16 linears (TinyChat packing, group 64): codes ``[N, K]`` in [0, 15] <-> ``qweight`` int32 ``[N/4, K/2]``;
scales / zeros ``[N, K/64]`` <-> ``[G_padded, N]`` (plain transpose, groups padded with zeros to TinyChat's multiple
of 16 groups); AdaLN outputs interleaved over C chunks (stored row ``d*C + c`` is diffusers row ``c*D + d``).
"""

from __future__ import annotations

import torch

# (n_tile, n_pack, n_pack_size, n_lane, 1, k_tile, 1, k_pack_size, k_lane, reg_k) -> stored order
_CODE_VIEW = (8, 2, 8, 1, 1, 2, 4, 8)  # the inner sizes after n_tile (128 rows) and k_tile (64 columns)
_CODE_PERM = (0, 5, 4, 1, 3, 8, 2, 7, 6, 9)
_LANE_PERM = (0, 6, 1, 2, 4, 3, 5)  # view (N/128, 1, 8, 2, 4, 2, G)
_MICRO_PERM = (0, 5, 1, 4, 3, 2, 6)  # view (N/128, 1, 4, 4, 8, K/64, 4)
_FRAG_PERM = (1, 4, 0, 3, 2, 5)  # a 16x16 tile viewed (2, 8, 1, 2, 4, 2)
AWQ_GROUP = 64


def _inverse(perm) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _permuted_shape(shape, perm) -> tuple[int, ...]:
    return tuple(shape[p] for p in perm)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ------------------------------------------------------------------------------------------------ W4A4 codes
def _code_shape(n: int, k: int) -> tuple[int, ...]:
    return (n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (any integer dtype; INT4 values in [-8, 7] or nibbles 0..15) -> ``qweight`` int8
    ``[N, K/2]``."""
    n, k = codes.shape
    _check(n % 128 == 0 and k % 128 == 0, f"pack_codes: N ({n}) and K ({k}) must be multiples of 128")
    nib = (codes.to(torch.int32) & 0xF).reshape(_code_shape(n, k)).permute(_CODE_PERM).reshape(-1, 8)
    word = torch.zeros(nib.shape[0], dtype=torch.int32, device=codes.device)
    for i in range(8):
        word |= nib[:, i] << (4 * i)  # bit 31 set by code 7's high bit: int32 wraps as the converter's does
    return word.view(torch.int8).reshape(n, k // 2)


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` int8 ``[N, K/2]`` -> the 4-bit nibbles ``uint8 [N, K]`` (0..15; sign-extend for INT4)."""
    _check(qweight.dtype == torch.int8 and qweight.dim() == 2, f"qweight must be int8 [N, K/2], got {qweight.dtype} "
           f"{list(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check(n % 128 == 0 and k % 128 == 0, f"qweight [N, K/2] = {list(qweight.shape)}: N and K must be multiples of 128")
    word = qweight.contiguous().view(torch.int32).reshape(-1)
    nib = torch.stack([(word >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    stored = _permuted_shape(_code_shape(n, k), _CODE_PERM)
    return nib.reshape(stored).permute(_inverse(_CODE_PERM)).reshape(n, k).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ lane order
def pack_lanes(s: torch.Tensor) -> torch.Tensor:
    """Per-(channel, group) values ``[N, G]`` -> stored ``[G, N]`` (INT4 group scales; G = 1 for vectors)."""
    n, g = s.shape
    _check(n % 128 == 0, f"pack_lanes: N ({n}) must be a multiple of 128")
    return s.reshape(n // 128, 1, 8, 2, 4, 2, g).permute(_LANE_PERM).reshape(g, n)


def unpack_lanes(s: torch.Tensor) -> torch.Tensor:
    """Stored ``[G, N]`` -> ``[N, G]``."""
    g, n = s.shape
    _check(n % 128 == 0, f"lane-packed tensor [G, N] = {list(s.shape)}: N must be a multiple of 128")
    stored = _permuted_shape((n // 128, 1, 8, 2, 4, 2, g), _LANE_PERM)
    return s.reshape(stored).permute(_inverse(_LANE_PERM)).reshape(n, g)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """bias / smooth / wcscales ``[N]`` -> stored ``[N]`` (lane order)."""
    return pack_lanes(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    return unpack_lanes(v.reshape(1, -1)).reshape(-1)


# ------------------------------------------------------------------------------------------------ NVFP4 scales
def pack_micro_scales(s: torch.Tensor) -> torch.Tensor:
    """NVFP4 micro-scales ``[N, K/16]`` (fp8) -> stored ``[K/16, N]``."""
    n, g = s.shape
    _check(n % 128 == 0 and g % 4 == 0, f"pack_micro_scales: N ({n}) must be a multiple of 128 and K/16 ({g}) of 4")
    u = s.view(torch.uint8) if s.dtype == torch.float8_e4m3fn else s
    out = u.reshape(n // 128, 1, 4, 4, 8, g // 4, 4).permute(_MICRO_PERM).reshape(g, n)
    return out.view(s.dtype) if s.dtype == torch.float8_e4m3fn else out


def unpack_micro_scales(s: torch.Tensor) -> torch.Tensor:
    """Stored ``[K/16, N]`` -> ``[N, K/16]``."""
    g, n = s.shape
    _check(n % 128 == 0 and g % 4 == 0, f"NVFP4 wscales [K/16, N] = {list(s.shape)}: N must be a multiple of 128 and "
           "K of 64")
    u = s.view(torch.uint8) if s.dtype == torch.float8_e4m3fn else s
    stored = _permuted_shape((n // 128, 1, 4, 4, 8, g // 4, 4), _MICRO_PERM)
    out = u.reshape(stored).permute(_inverse(_MICRO_PERM)).reshape(n, g)
    return out.view(s.dtype) if s.dtype == torch.float8_e4m3fn else out


# ------------------------------------------------------------------------------------------------ low rank
def _pack_fragments(t: torch.Tensor) -> torch.Tensor:
    """``[A/16, B/16, 16, 16]`` tiles -> each tile in fragment order, flattened."""
    a, b = t.shape[:2]
    return t.reshape(a, b, 2, 8, 1, 2, 4, 2).permute(0, 1, *[2 + p for p in _FRAG_PERM]).reshape(-1)


def _unpack_fragments(flat: torch.Tensor, a: int, b: int) -> torch.Tensor:
    stored = (a, b, *_permuted_shape((2, 8, 1, 2, 4, 2), _FRAG_PERM))
    inv = _inverse(_FRAG_PERM)
    return flat.reshape(stored).permute(0, 1, *[2 + p for p in inv]).reshape(a, b, 16, 16)


def pack_down(proj_down: torch.Tensor) -> torch.Tensor:
    """``proj_down`` ``[K, R]`` (= (D/λ)ᵀ, multiplies raw x) -> ``lora_down`` ``[K, R]``."""
    k, r = proj_down.shape
    _check(k % 16 == 0 and r % 16 == 0, f"pack_down: K ({k}) and R ({r}) must be multiples of 16")
    tiles = proj_down.T.reshape(r // 16, 16, k // 16, 16).permute(2, 0, 1, 3)  # (K/16, R/16, 16 r, 16 k)
    return _pack_fragments(tiles).reshape(k, r)


def unpack_down(lora_down: torch.Tensor) -> torch.Tensor:
    k, r = lora_down.shape
    _check(k % 16 == 0 and r % 16 == 0, f"lora_down [K, R] = {list(lora_down.shape)}: K and R must be multiples of 16")
    tiles = _unpack_fragments(lora_down.reshape(-1), k // 16, r // 16)  # (K/16, R/16, 16 r, 16 k)
    return tiles.permute(1, 2, 0, 3).reshape(r, k).T.contiguous()


def pack_up(proj_up: torch.Tensor) -> torch.Tensor:
    """``proj_up`` ``[N, R]`` -> ``lora_up`` ``[N, R]``."""
    n, r = proj_up.shape
    _check(n % 16 == 0 and r % 16 == 0, f"pack_up: N ({n}) and R ({r}) must be multiples of 16")
    tiles = proj_up.reshape(n // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    return _pack_fragments(tiles).reshape(n, r)


def unpack_up(lora_up: torch.Tensor) -> torch.Tensor:
    n, r = lora_up.shape
    _check(n % 16 == 0 and r % 16 == 0, f"lora_up [N, R] = {list(lora_up.shape)}: N and R must be multiples of 16")
    tiles = _unpack_fragments(lora_up.reshape(-1), n // 16, r // 16)  # (N/16, R/16, 16 n, 16 r)
    return tiles.permute(0, 2, 1, 3).reshape(n, r).contiguous()


# ------------------------------------------------------------------------------------------------ AWQ W4A16
def awq_padded_groups(k: int) -> int:
    """TinyChat's number of stored scale groups for ``k`` inputs at group 64: K/64 rounded up to a multiple of 16."""
    g = k // AWQ_GROUP
    return -(-g // 16) * 16


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` (0..15) -> TinyChat ``qweight`` int32 ``[N/4, K/2]``."""
    n, k = codes.shape
    _check(n % 4 == 0 and k % 64 == 0, f"pack_awq: N ({n}) must be a multiple of 4 and K ({k}) of 64")
    w = codes.to(torch.int32).reshape(-1, 4, 8)  # 32 consecutive inputs as [4, 8]
    w16 = w[:, 0] | (w[:, 1] << 4) | (w[:, 2] << 8) | (w[:, 3] << 12)  # value j: inputs j, 8+j, 16+j, 24+j
    w16 = w16.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    return w16.to(torch.int16).view(torch.int32).reshape(n // 4, k // 2)  # int16 pairs, little-endian


def unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    """TinyChat ``qweight`` int32 ``[N/4, K/2]`` -> unsigned codes ``uint8 [N, K]``."""
    _check(qweight.dtype == torch.int32 and qweight.dim() == 2, f"AWQ qweight must be int32 [N/4, K/2], got "
           f"{qweight.dtype} {list(qweight.shape)}")
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    _check(k % 64 == 0, f"AWQ qweight [N/4, K/2] = {list(qweight.shape)}: K must be a multiple of 64")
    w16 = qweight.contiguous().view(torch.int16).to(torch.int32).reshape(n // 4, k // 64, 4, 16)
    w16 = w16.permute(0, 2, 1, 3).reshape(-1, 8)
    codes = torch.stack([(w16 >> (4 * a)) & 0xF for a in range(4)], dim=1)  # [.., 4, 8]: input 8a + j
    return codes.reshape(n, k).to(torch.uint8)


def pack_awq_groups(s: torch.Tensor) -> torch.Tensor:
    """AWQ scales or zeros ``[N, K/64]`` -> stored ``[G_padded, N]`` (zero rows past K/64)."""
    n, g = s.shape
    out = s.new_zeros(awq_padded_groups(g * AWQ_GROUP), n)
    out[:g] = s.T
    return out


def unpack_awq_groups(s: torch.Tensor, k: int) -> torch.Tensor:
    """Stored ``[G_stored, N]`` -> ``[N, K/64]``; the padding rows must be zero."""
    g = k // AWQ_GROUP
    _check(s.dim() == 2 and s.shape[0] >= g, f"AWQ scales/zeros must be [>= K/64 = {g}, N], got {list(s.shape)}")
    _check(bool((s[g:] == 0).all()), "AWQ scales/zeros: the padding groups past K/64 must be zero")
    return s[:g].T.contiguous()


def interleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """diffusers' chunked output order -> Nunchaku's AdaLN order: row ``c*D + d`` goes to ``d*C + c`` (dim 0)."""
    n = t.shape[0]
    return t.reshape(chunks, n // chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Nunchaku's AdaLN order -> diffusers' (stored row ``d*C + c`` is diffusers row ``c*D + d``)."""
    n = t.shape[0]
    return t.reshape(n // chunks, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
