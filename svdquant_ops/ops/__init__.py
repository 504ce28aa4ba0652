"""Typed Python entry points to the ``torch.ops.svdquant`` ops (see csrc/ops.cpp for the schemas).

precision: "int4", "nvfp4" or "w4a8" (formats.py).

quantize_act(x, smooth, proj_down, precision, act_unsigned=False) -> (codes, scales, lora_act)
    codes uint8 [..., K/2] (layout.py), scales [..., K/group], lora_act = x @ proj_down in fp32 [..., R].
    w4a8: codes int8 [..., K] (one per byte, not packed), scales [..., 1] in x's dtype (one per token).
gemm_w4a4(act_codes, act_scales, wgt_codes, wgt_scales, wgt_global_scale, lora_act, proj_up, bias,
          precision, out_dtype, act_unsigned=False) -> y [..., N]
    w4a8: wgt_scales uint8 multipliers [N, K/64] in [1, 18], wgt_global_scale fp32 [N] (required), K <= 131072.
linear(x, smooth, proj_down, wgt_codes, wgt_scales, wgt_global_scale, proj_up, bias, precision,
       act_unsigned=False) -> y [..., N] in x's dtype
"""

from __future__ import annotations

import torch

from . import _library

_library.load()
from . import meta as _meta  # noqa: E402,F401  (registers the fake kernels)

quantize_act = torch.ops.svdquant.quantize_act.default
gemm_w4a4 = torch.ops.svdquant.gemm_w4a4.default
linear = torch.ops.svdquant.linear.default
