"""Storage: the quantized weight (``SVDQuantTensor``), the unpacked parts it is built from, and serialization.

Nothing here runs a kernel or the offline algorithm: loading a saved model needs only this layer (and the ops
layer to run it)."""

from .parts import SVDQuantParts
from .tensor import RANK_MULTIPLE, SVDQuantTensor

__all__ = ["SVDQuantParts", "SVDQuantTensor", "RANK_MULTIPLE"]
