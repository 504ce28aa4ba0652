"""The offline SVDQuant algorithm: from 16-bit weights (and recorded inputs) to storage (``SVDQuantTensor``).

``config`` (``SVDQuantConfig``), ``handler`` (torchao's per-linear entry point), ``selection`` (the one rule for
which linears get quantized), ``structure`` (facts recorded on modules), ``calibration`` (recording inputs),
``decompose`` (data-free path, ``quantize_weight``), ``lowrank`` (truncated SVD), ``solve`` (the calibrated
algorithm for a shared-input group), ``gptq``.
"""
