"""svdquant_ops: SVDQuant W4A4 linear layers as torch.library ops, torch.compile-native.

Data flows quantize (offline, ``svdquant_ops.quantize``) -> storage (the packed layout, ``layout``) ->
ops (``ops``: C++/CUDA kernels in ``csrc``, fake kernels in ``meta``) -> integrations.
"""

from . import formats, layout
from .ops import gemm_w4a4, linear, quantize_act

__version__ = "0.1.0"

__all__ = ["formats", "layout", "quantize_act", "gemm_w4a4", "linear", "__version__"]
