"""Storage: the quantized weights (``SVDQuantTensor``; the weight-only ``W4A16Tensor``), their shared moves
(``PackedWeight``), the unpacked parts the algorithm builds from, and serialization.

Nothing here runs a kernel or the offline algorithm: loading a saved model needs only this layer (and the ops
layer to run it)."""

from .base import PackedWeight
from .parts import SVDQuantParts
from .tensor import RANK_MULTIPLE, SVDQuantTensor
from .weight_only import W4A16Tensor

__all__ = ["PackedWeight", "SVDQuantParts", "SVDQuantTensor", "W4A16Tensor", "RANK_MULTIPLE"]
