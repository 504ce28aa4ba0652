"""svdquant_ops: SVDQuant W4A4 linear layers as torch.library ops, torch.compile-native.

Data flows quantize (offline, ``svdquant_ops.quantize``) -> storage (``SVDQuantTensor``, packed ``layout``) ->
ops (``ops``: C++/CUDA kernels in ``csrc``, fake kernels in ``meta``) -> integrations.

``SVDQuantConfig``, ``SVDQuantTensor`` and the serialization helpers need torchao (``pip install
'svdquant-ops[torchao]'``); the ops alone need only torch.
"""

from . import formats, layout
from .ops import gemm_w4a4, linear, quantize_act

__version__ = "0.1.0"

_TORCHAO_NAMES = {
    "SVDQuantConfig": "config",
    "SVDQuantTensor": "tensor",
    "DEFAULT_SKIP": "config",
    "name_modules": "config",
    "calibrate": "quantize.calibration",
    "save_file": "serialization",
    "load_file": "serialization",
}

try:  # torchao present: register the public API and the serialization allowlists at import
    from .config import DEFAULT_SKIP, SVDQuantConfig, name_modules
    from .quantize.calibration import calibrate
    from .serialization import load_file, save_file
    from .tensor import SVDQuantTensor
    from . import serialization as _serialization

    _serialization.register()
except ModuleNotFoundError as _exc:  # pragma: no cover - exercised only without torchao
    if _exc.name is None or not _exc.name.startswith("torchao"):
        raise

    def __getattr__(name):
        if name in _TORCHAO_NAMES:
            raise ImportError(f"svdquant_ops.{name} needs torchao: pip install 'svdquant-ops[torchao]'")
        raise AttributeError(f"module 'svdquant_ops' has no attribute {name!r}")


__all__ = ["formats", "layout", "quantize_act", "gemm_w4a4", "linear", "__version__", *_TORCHAO_NAMES]
