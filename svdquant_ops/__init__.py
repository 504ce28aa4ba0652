"""svdquant_ops: SVDQuant 4-bit linear layers for PyTorch diffusion models, torch.compile-native.

Layers, each importing only the ones before it (the data flow):

1. formats and packing: ``formats``, ``layout``, ``quantizers`` (rounding rules per format)
2. storage: ``storage`` (``SVDQuantTensor``, the weight-only ``W4A16Tensor``, the ``SVDQuantParts`` the algorithm
   builds, serialization)
3. ops: ``ops`` (typed wrappers over ``torch.ops.svdquant``, built on first use from ``csrc``; fake kernels in
   ``meta``), and the ``F.linear`` dispatch of ``SVDQuantTensor``
4. the offline algorithm: ``quantize`` (``SVDQuantConfig``, the torchao handler, calibration, solver)
5. integrations: ``integrations`` (model-family rules, ``quantize_model``, ``calibrate``)

Importing the package registers the storage, its serialization allowlists and the ops' dispatch (loading and
running a saved model needs nothing more); it compiles nothing. The rest of the public API is imported on first
access.
"""

from . import formats, layout, ops
from .storage import SVDQuantTensor, W4A16Tensor
from .storage import serialization as _serialization

_serialization.register()

__version__ = "0.1.0"

_LAZY = {
    "SVDQuantConfig": "svdquant_ops.quantize.config",
    "W4A16Config": "svdquant_ops.quantize.weight_only",
    "quantize_weight": "svdquant_ops.quantize.decompose",
    "quantize_model": "svdquant_ops.integrations.api",
    "QuantizeSummary": "svdquant_ops.integrations.api",
    "calibrate": "svdquant_ops.integrations.api",
    "prepare_model": "svdquant_ops.integrations.diffusers",
    "share_inputs": "svdquant_ops.quantize.sharing",
    "fuse_qkv": "svdquant_ops.integrations.fusion",
    "unfuse_qkv": "svdquant_ops.integrations.fusion",
    "unwrap_weights": "svdquant_ops.integrations.unwrap",
    "rewrap_weights": "svdquant_ops.integrations.unwrap",
    "prepare_compile": "svdquant_ops.integrations.compile_recipe",
    "compile_options": "svdquant_ops.integrations.compile_recipe",
    "quantization_config": "svdquant_ops.integrations.diffusers",
    "save_file": "svdquant_ops.storage.serialization",
    "load_file": "svdquant_ops.storage.serialization",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    value = _diffusers_model_class(name)
    if value is not None:
        return value
    raise AttributeError(f"module 'svdquant_ops' has no attribute {name!r}")


def _diffusers_model_class(name: str):
    """diffusers' ``ModelMixin`` and its subclasses, by name. A pipeline saved by svdquant_ops names this package as
    its quantized denoiser's library in ``model_index.json`` (``["svdquant_ops", "FluxTransformer2DModel"]``):
    diffusers looks the class up here once the package is imported (without the import it stops with its own
    message, "import svdquant_ops before calling ``from_pretrained``"), and the import has registered our config and
    tensors for the loader by then."""
    if not name[:1].isupper():  # class names only: other lookups (hasattr probes) must not import diffusers
        return None
    try:
        import diffusers
    except ImportError:
        return None
    try:
        value = getattr(diffusers, name)
    except AttributeError:
        return None
    return value if isinstance(value, type) and issubclass(value, diffusers.ModelMixin) else None


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["formats", "layout", "ops", "SVDQuantTensor", "W4A16Tensor", "__version__", *_LAZY]
