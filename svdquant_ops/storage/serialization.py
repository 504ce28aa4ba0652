"""Saving and loading quantized weights: the allowlists torch / torchao / diffusers consult, safetensors helpers,
and the key map that loads checkpoints written by svdquant_ops 0.1.0 (layout version 1).

Three allowlists (see ../shared/docs/torchao.md): ``torch.serialization.add_safe_globals`` (``torch.load`` with
``weights_only=True``, which diffusers uses for ``.bin``), ``torchao.core.config.ALLOWED_AO_MODULES`` (rebuilding
``SVDQuantConfig`` from ``config.json``) and torchao's safetensors subclass
allowlists (``save_pretrained`` with ``safe_serialization=True``). ``register()`` runs when ``svdquant_ops`` is
imported.

Checkpoint keys are ``<module>.<param>`` for plain tensors and ``<module>._weight_<field>`` for the fields of an
``SVDQuantTensor`` (``codes``, ``scales``, ``global_scale``, ``smooth``, ``proj_down``, ``proj_up``,
``bias_correction``; a ``W4A16Tensor``'s ``codes``, ``scales``, ``zeros``). Version 0.1.0 named three fields ``qweight``, ``wscales``, ``wglobal``
(``tensor.LEGACY_FIELD_NAMES``) and pickled the class as ``svdquant_ops.tensor.SVDQuantTensor``; both are mapped here
(safetensors: ``_from_saved_fields``; pickles: the safe-globals alias and ``base.check_on_unpickle``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import PackedWeight
from .tensor import LEGACY_FIELD_NAMES, SVDQuantTensor
from .weight_only import W4A16Tensor

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import sys

    import torchao.core.config as ao_config
    from torchao.prototype.safetensors import safetensors_utils

    from . import tensor as tensor_module

    # config.json of a saved diffusers model names SVDQuantConfig: torchao looks it up in allowlisted modules, and
    # the package resolves the name lazily.
    ao_config.ALLOWED_AO_MODULES.add("svdquant_ops")
    # Pickles of 0.1.0 name the class svdquant_ops.tensor.SVDQuantTensor: an alias for weights_only=True, and the
    # old module path for the full unpickler.
    sys.modules.setdefault("svdquant_ops.tensor", tensor_module)
    torch.serialization.add_safe_globals([SVDQuantTensor, (SVDQuantTensor, "svdquant_ops.tensor.SVDQuantTensor"),
                                          W4A16Tensor])
    for name in ("SVDQuantTensor", "W4A16Tensor"):
        if name not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
            safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(name)
    # torchao rebuilds each tensor as ALLOWED_CLASSES[name](**fields) (from_pretrained, load_file): SVDQuantTensor
    # goes through the key map, and both are value-checked, as a corrupt file must not load.
    safetensors_utils.ALLOWED_CLASSES["SVDQuantTensor"] = _from_saved_fields
    safetensors_utils.ALLOWED_CLASSES["W4A16Tensor"] = _w4a16_from_saved_fields
    _registered = True


def _from_saved_fields(**fields) -> SVDQuantTensor:
    """Build an SVDQuantTensor from the fields torchao read from a safetensors checkpoint (any version)."""
    return SVDQuantTensor(**{LEGACY_FIELD_NAMES.get(k, k): v for k, v in fields.items()}).validate()


def _w4a16_from_saved_fields(**fields) -> W4A16Tensor:
    return W4A16Tensor(**fields).validate()


def save_file(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict holding quantized weights (and plain tensors) to one safetensors file."""
    from safetensors.torch import save_file as st_save
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        bad = (type(state_dict).__name__ if not isinstance(state_dict, dict) else
               next(f"{k!r}: {type(v).__name__}" for k, v in state_dict.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))))
        raise TypeError(f"save_file: state_dict must be a dict of str -> torch.Tensor (model.state_dict()), got {bad}")
    bare = next((k for k, v in state_dict.items() if isinstance(v, PackedWeight) and "." not in k), None)
    if bare is not None:  # torchao's safetensors layout names a quantized tensor "<module>.<parameter>"
        raise ValueError(f"save_file: the quantized tensor {bare!r} needs a key of the form '<module>.<parameter>' "
                         "(save the state dict of the model around the layer, e.g. nn.Sequential(layer))")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"save_file: metadata must be a dict of str -> str, got {metadata!r}")
    register()
    tensors, meta = flatten_tensor_state_dict({k: v.detach() for k, v in state_dict.items()})
    meta = {**meta, **(metadata or {}), "svdquant_ops_format": "2"}  # 2: today's field names
    st_save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load what ``save_file`` wrote; every quantized weight is shape-checked on construction and value-checked."""
    from safetensors import SafetensorError, safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    register()
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path}: is a directory (expected a file written by svdquant_ops.save_file)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a file written by svdquant_ops.save_file)")
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as exc:  # its header errors (empty, truncated, not safetensors) name no file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path}: cannot read it as a safetensors file: {first}") from exc
    with f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "tensor_names" not in meta:
        raise ValueError(f"{path}: not a quantized state dict written by svdquant_ops.save_file (no tensor metadata)")
    try:
        result, leftover = unflatten_tensor_state_dict(tensors, meta)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:  # TypeError: a metadata entry missing
        raise ValueError(f"{path}: corrupt quantized checkpoint: {exc}") from exc
    missing = set(json.loads(meta["tensor_names"])) - set(result)
    if missing:
        raise ValueError(f"{path}: corrupt quantized checkpoint, incomplete tensors: {sorted(missing)[:5]}")
    return {**leftover, **result}  # every quantized weight value-checked as it was built (register)
