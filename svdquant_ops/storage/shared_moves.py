"""Moves that keep shared parts shared.

``nn.Module._apply`` (``model.to(...)``, ``.cuda()``, accelerate's offload hooks) moves each weight alone. Linears
that read one input hold one ``smooth`` and one ``proj_down`` tensor (``share_inputs``: one ``quantize_act`` per
input), and a plain move would give each of them its own copy. ``move_part`` maps one source tensor to one copy:
a part that an *other* weight moved a moment ago from the same memory, to the same place, is reused.

The rule is "shared in, shared out": a copy is handed to another weight only if that weight holds the same source
memory, and never back to the weight that made it (``w.to(d)`` twice in a row gives two independent copies).
A copy is reused only while its source still holds the values it was made from (compared with a snapshot kept on
the CPU: version counters do not see writes through another weight's view of the same memory) and the copy has not
been written through the tensor this memory holds (its version counter). Only parts whose source is on the CPU are
reused (the moves that matter: a model quantized or loaded on the CPU, offloading), so the check never waits for a
GPU. Members of a group sit next to each other in the module tree, so a short memory suffices: at most ``KEEP``
entries, each dropped as soon as its source memory is freed (after a model's move nothing is held). While the
sources live on (offloading keeps a CPU copy), the entries hold at most ``KEEP`` small parts (``proj_down`` is
K x R) and their snapshots. CUDA copies are reused only on the stream that made them. Inference tensors, fake and
meta tensors are never reused; under ``inference_mode`` the copy of a normal tensor is made as a normal tensor, so
that offload hooks running inside ``inference_mode`` keep the sharing too.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from contextlib import nullcontext

import torch

KEEP = 32
# A part that several weights hold as one tensor object is marked with this attribute (``mark_shared``: by
# ``share_inputs``, the Nunchaku loader's row split, LoRA's rebuild of a group, and the moves below when a second
# weight takes a copy). torch.compile makes such a part one graph input for all its holders, a
# layout that AOTAutograd's cache key cannot see (it hashes each weight alone): a weight that holds a marked part keeps
# its graph out of that cache (``PackedWeight._stable_hash_for_caching``). A copy of the tensor (``copy.deepcopy``)
# keeps the mark, which errs on the safe side.
SHARED_MARK = "_svdquant_shared"
# Set on a shared part for the duration of one load_state_dict that gives every holder of it the same values
# (``quantize.sharing``'s load hooks): ``PackedWeight``'s copy_ may then write it in place.
LOAD_IN_PLACE = "_svdquant_load_in_place"
# key -> (source storage ref, snapshot of the source, copy, copy version, id of the weight that made the copy).
# The owner is held by id, not weakref: swap_tensors (nn.Module._apply) refuses tensors with weak references. A
# reused id only refuses a reuse (a fresh copy), never grants one.
_entries: OrderedDict = OrderedDict()
_watched: set[int] = set()  # ids of source storages with a finalizer that forgets their entries
_lock = threading.Lock()


def mark_shared(t: torch.Tensor) -> torch.Tensor:
    setattr(t, SHARED_MARK, True)
    return t


def _stream(device: torch.device):  # the destination's: reused sources are on the CPU
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _forget(sid: int) -> None:
    with _lock:
        _watched.discard(sid)
        for key in [k for k in _entries if k[0] == sid]:
            del _entries[key]


def _reusable(t: torch.Tensor, device: torch.device) -> bool:
    if t.is_inference() or t.device.type != "cpu" or device.type == "meta":
        return False
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(t):
        return False
    return True


def copy_part(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None, non_blocking: bool) -> torch.Tensor:
    """``t`` on ``device``, cast to ``dtype`` unless None, always a new tensor."""
    cast = dtype is not None and t.dtype != dtype
    out = t.to(device, non_blocking=non_blocking, copy=not cast)  # the cast below copies
    return out.to(dtype) if cast else out


def move_part(owner: torch.Tensor, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
              non_blocking: bool) -> torch.Tensor:
    """``t`` (a shareable part of the weight ``owner``) on ``device``, cast to ``dtype`` unless None, as a new tensor:
    the copy another weight's move of the same memory made, while valid (module docstring)."""
    key = None
    if _reusable(t, device):
        st = t.untyped_storage()
        key = (id(st), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, device, dtype, _stream(device))
        with _lock:
            hit = _entries.get(key)
            if (hit is not None and hit[0]() is st and hit[4] != id(owner) and hit[3] == hit[2]._version
                    and torch.equal(hit[1], t)):
                _entries.move_to_end(key)
                return mark_shared(hit[2])  # a second holder
    with torch.inference_mode(False) if key is not None else nullcontext():
        out = copy_part(t, device, dtype, non_blocking)
    if key is not None:
        with _lock:
            _entries[key] = (weakref.ref(st), t.detach().clone(), out, out._version, id(owner))
            _entries.move_to_end(key)
            while len(_entries) > KEEP:
                _entries.popitem(last=False)
            watch = key[0] not in _watched
            _watched.add(key[0])
        if watch:  # forget this memory's entries (and their copies) when it is freed
            weakref.finalize(st, _forget, key[0])
    return out
