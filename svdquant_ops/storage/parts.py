"""SVDQuantParts: the unpacked parts of one quantized linear, as the offline algorithm produces them.

``SVDQuantTensor.from_parts`` packs them into the storage layout. The field names are the storage's (and so the
checkpoint keys' and the ops' argument names): ``codes``, ``scales``, ``global_scale``, ``smooth``, ``proj_down``,
``proj_up``, ``bias_correction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVDQuantParts:
    """Everything a quantized linear needs, unpacked. Shapes: N outputs, K inputs, R rank."""

    codes: torch.Tensor  # [N, K] int8 (INT4 / W4A8 values) or uint8 (e2m1 patterns)
    scales: torch.Tensor  # [N, K/g] model dtype (INT4), float8_e4m3fn (NVFP4) or uint8 multipliers (W4A8)
    global_scale: torch.Tensor | None  # NVFP4: fp32 [1] or [N]; W4A8: fp32 per-channel scale [N]; INT4: None
    smooth: torch.Tensor  # [K] model dtype: λ
    proj_down: torch.Tensor  # [K, R] model dtype, multiplies the raw input: (D / λ)ᵀ
    proj_up: torch.Tensor  # [N, R] model dtype: U (singular values included)
    precision: str
    act_unsigned: bool = False
    bias_correction: torch.Tensor | None = None  # fp32 [N], unsigned inputs only
