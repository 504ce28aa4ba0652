"""The devices the ops run on (CPU, and CUDA GPUs), and the one check of a user's device argument against them, so
that every entry point (the loaders, calibration, ``SVDQuantConfig.device``, the command's ``--device``) fails at the
call, naming its argument, instead of in torch mid-way ("Torch not compiled with CUDA enabled")."""

from __future__ import annotations

import torch

EXPECTED = "'cpu', 'cuda' or 'cuda:N'"


def check_device_arg(value, arg: str, *, expected: str = EXPECTED, hint: str = "") -> torch.device:
    """``value`` (a ``str`` or ``torch.device``) as a CPU or CUDA device this machine has. Otherwise a ``TypeError``
    (not a device name) or ``ValueError`` whose message starts with ``arg`` (e.g. ``"device"``, ``"--device"``) and
    says what is expected (``expected``); ``hint`` is appended where no GPU is available."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device)):
        raise TypeError(f"{arg}={value!r} is not a device name (a str or torch.device); expected {expected}")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{arg}={value!r} is not a device; expected {expected}") from None
    if dev.type == "meta":
        raise ValueError(f"{arg}={value!r}: the meta device holds no weights; expected {expected}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{arg}={value!r}: the ops run on CPU and CUDA devices only; expected {expected}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg}={value!r}: no CUDA GPU is available on this machine{hint}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{arg}={value!r}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    return dev
