"""Saving and loading quantized models: the allowlists torch / torchao / diffusers consult, and safetensors helpers.

Three allowlists (see ../shared/docs/torchao.md): ``torch.serialization.add_safe_globals`` (``torch.load`` with
``weights_only=True``, which diffusers uses for ``.bin``), ``torchao.core.config.ALLOWED_AO_MODULES`` (rebuilding
``SVDQuantConfig`` from ``config.json``) and torchao's safetensors subclass allowlists (``save_pretrained`` with
``safe_serialization=True``). ``register()`` runs once when ``svdquant_ops`` is imported with torchao present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import torchao.core.config as ao_config
    from torchao.prototype.safetensors import safetensors_utils

    from .config import SVDQuantConfig
    from .tensor import SVDQuantTensor

    torch.serialization.add_safe_globals([SVDQuantTensor, SVDQuantConfig])
    ao_config.ALLOWED_AO_MODULES.add("svdquant_ops")
    if "SVDQuantTensor" not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append("SVDQuantTensor")
    safetensors_utils.ALLOWED_CLASSES["SVDQuantTensor"] = SVDQuantTensor
    _registered = True


def save_file(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict holding SVDQuantTensors (and plain tensors) to one safetensors file."""
    from safetensors.torch import save_file as st_save
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    register()
    tensors, meta = flatten_tensor_state_dict({k: v.detach() for k, v in state_dict.items()})
    meta = {**meta, **(metadata or {}), "svdquant_ops_format": "1"}
    st_save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load what ``save_file`` wrote; every SVDQuantTensor is shape-checked on construction and value-checked."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from .tensor import SVDQuantTensor

    register()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "tensor_names" not in meta:
        raise ValueError(f"{path}: not a quantized state dict written by svdquant_ops.save_file (no tensor metadata)")
    try:
        result, leftover = unflatten_tensor_state_dict(tensors, meta)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt quantized checkpoint: {exc}") from exc
    missing = set(json.loads(meta["tensor_names"])) - set(result)
    if missing:
        raise ValueError(f"{path}: corrupt quantized checkpoint, incomplete tensors: {sorted(missing)[:5]}")
    for t in result.values():
        if isinstance(t, SVDQuantTensor):
            t.validate()
    return {**leftover, **result}
