"""Nunchaku's SVDQuant checkpoints (FLUX.1 ``svdq-{int4|fp4}_r32-*.safetensors``) as our tensors:

    from svdquant_ops.nunchaku import load_nunchaku_transformer
    transformer = load_nunchaku_transformer("svdq-int4_r32-flux.1-schnell.safetensors", device="cuda")

``load_nunchaku_transformer(path, device="cpu", precision=None)`` builds the diffusers transformer of a whole file
(``precision="w4a8"`` converts to the Hopper format at load time); ``unpack_linear(tensors, precision)`` imports one
packed linear. The implementation and what maps how: ``svdquant_ops/integrations/nunchaku.py``.
``write_nunchaku_flux(path, model, "int4")`` writes a 16-bit FLUX transformer as such a file (a data-free SVDQuant in
Nunchaku's conventions, for tests and benchmarks; ``svdquant_ops/integrations/nunchaku_write.py``).
"""

from .integrations.nunchaku import (NunchakuFormatError, SplitInputLinear, load_nunchaku_transformer,
                                    unpack_linear)
from .integrations.nunchaku_write import write_nunchaku_flux

__all__ = ["load_nunchaku_transformer", "unpack_linear", "NunchakuFormatError", "SplitInputLinear",
           "write_nunchaku_flux"]
