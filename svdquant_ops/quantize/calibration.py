"""``record_inputs(model)``: record what the algorithm needs from real inputs, in bounded memory (the public
``svdquant_ops.calibrate`` prepares the model for its family, then runs this).

For every ``nn.Linear`` input it keeps, across all calls (every timestep, both CFG halves):

* the per-input-channel absmax over *all* rows seen (fp32, on the input's device),
* the minimum value seen (decides whether the unsigned INT4 variant is valid),
* a uniform sample of at most ``max_rows`` input rows: bottom-k sampling with seeded random keys, so the sample
  is reproducible for a fixed seed and call order and never holds more than ``max_rows`` rows,
* whether any non-finite value went by,
* with ``hessian=True``, XᵀX and the column sums over *all* rows (fp32, K² per input), so GPTQ's Hessian does
  not depend on the row sample.

Linears that receive the very same tensor object in a call (q/k/v of an attention, a FLUX single block's q/k/v
and MLP-in projection) share one record: they are quantized as a group with one λ.
"""

from __future__ import annotations

import logging
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.devices import check_device_arg
from .args import flag, integer
from .structure import describe, record_names

log = logging.getLogger("svdquant_ops")
RECORD_ATTR = "_svdquant_record"
SESSION_ATTR = "_svdquant_calibration"  # set on every linear calibrate() watched, whether it ran or not


@dataclass(eq=False)
class InputRecord:
    """Statistics of one (possibly shared) linear input; ``members[0]`` is the linear that records it."""

    members: list
    in_features: int
    max_rows: int
    storage: str
    generator: torch.Generator
    session: "CalibrationSession"
    absmax: torch.Tensor | None = None
    minimum: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    seen_rows: int = 0
    calls: int = 0
    nonfinite: bool = False
    inconsistent: bool = False
    xtx: torch.Tensor | None = None  # hessian=True: sum of xᵀx over all rows
    colsum: torch.Tensor | None = None
    solved: dict = field(default_factory=dict)  # member -> SVDQuantTensor, filled by the solver
    solved_config: object = None  # the SVDQuantConfig the group was solved with
    last_input: object = None  # weakref to the last recorded tensor
    finished: bool = False  # solved or given up
    counted: bool = False  # part of the progress bar's total

    @property
    def name(self) -> str:
        return " + ".join(describe(m) for m in self.members)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"calibrate: {self.name} got input with {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        xf = x.detach().reshape(-1, self.in_features)
        n = xf.shape[0]
        self.calls += 1
        if n == 0:
            return
        if not bool(torch.isfinite(xf).all()):
            self.nonfinite = True
        amax = xf.abs().amax(0).float()
        xmin = xf.amin().float()
        if self.session.hessian:
            x32 = xf.float()
            xtx, colsum = x32.T @ x32, x32.sum(0)
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
            self.colsum = colsum if self.colsum is None else self.colsum + colsum
        if self.absmax is None:
            self.absmax, self.minimum = amax, xmin
        else:
            self.absmax = torch.maximum(self.absmax, amax)
            self.minimum = torch.minimum(self.minimum, xmin)
        # bottom-k sampling: every row gets a random key, the max_rows smallest keys ever seen are the sample.
        keys = torch.rand(n, generator=self.generator)
        if self.keys is not None and self.keys.numel() >= self.max_rows:
            take = torch.nonzero(keys < self.keys.max()).squeeze(1)
        else:
            take = torch.arange(n)
        if take.numel():
            device = xf.device if self.storage == "auto" else torch.device(self.storage)
            new_rows = xf[take.to(xf.device)].to(device)
            rows = new_rows if self.rows is None else torch.cat([self.rows, new_rows])
            all_keys = keys[take] if self.keys is None else torch.cat([self.keys, keys[take]])
            if all_keys.numel() > self.max_rows:
                keep = torch.topk(all_keys, self.max_rows, largest=False).indices
                keep = keep.sort().values  # keep arrival order: deterministic layout
                rows, all_keys = rows[keep.to(rows.device)], all_keys[keep]
            self.rows, self.keys = rows, all_keys
        self.seen_rows += n

    def input_stats(self) -> tuple | None:
        """(XᵀX, column sums, rows) over every recorded row, when calibrate(hessian=True) collected them."""
        return None if self.xtx is None else (self.xtx, self.colsum, self.seen_rows)

    def release(self) -> None:
        self.rows = self.keys = self.xtx = self.colsum = None


def forget_calibration(module: nn.Module) -> None:
    """Detach a linear from its calibration record once the handler is done with it (quantized or skipped);
    the record's memory goes when no member needs it any more, and the progress bar stops waiting for it."""
    rec = getattr(module, RECORD_ATTR, None)
    for attr in (RECORD_ATTR, SESSION_ATTR):
        if hasattr(module, attr):
            delattr(module, attr)
    if rec is None:
        return
    rec.solved.pop(module, None)
    if not any(getattr(m, RECORD_ATTR, None) is rec for m in rec.members):
        rec.release()
        rec.solved.clear()
        rec.session.record_finished(rec)


class CalibrationSession:
    """Hooks installed by ``calibrate``; keeps the records and the progress bar of the solve that follows."""

    def __init__(self, model: nn.Module, max_rows: int, storage: str, seed: int, hessian: bool = False):
        max_rows = integer(max_rows, "calibrate: max_rows", 1)
        seed = integer(seed, "calibrate: seed")
        hessian = flag(hessian, "calibrate: hessian")
        if storage != "auto":
            torch.device(storage)  # validates the name
        self.model = model
        self.max_rows = max_rows
        self.storage = storage
        self.seed = seed
        self.hessian = hessian
        self.records: list[InputRecord] = []
        self._handles = []
        self._recent: dict[int, InputRecord] = {}
        self._bar = None
        self.solved_groups = 0

    def _hook(self, module: nn.Module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        rec = getattr(module, RECORD_ATTR, None)
        if rec is not None and rec.session is not self:
            rec = None  # stale record from an earlier calibration: start over
        if rec is None:
            shared = self._recent.get(id(x))
            if shared is not None and shared.last_input() is x and shared.in_features == module.in_features:
                shared.members.append(module)  # same tensor object as another linear's input: one group
                setattr(module, RECORD_ATTR, shared)
                return
            name = describe(module)
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            rec = InputRecord(members=[module], in_features=module.in_features, max_rows=self.max_rows,
                              storage=self.storage, generator=gen, session=self)
            setattr(module, RECORD_ATTR, rec)
            self.records.append(rec)
        elif rec.members[0] is not module:  # a follower: its input must be the leader's, every call
            if rec.last_input is None or rec.last_input() is not x:
                if not rec.inconsistent:
                    log.warning("svdquant_ops: %s did not always share its input with %s; keeping one λ for the "
                                "group anyway", describe(module), describe(rec.members[0]))
                rec.inconsistent = True
            return
        rec.add(x)
        previous = rec.last_input() if rec.last_input is not None else None
        if previous is not None:
            self._recent.pop(id(previous), None)
        rec.last_input = weakref.ref(x)
        self._recent[id(x)] = rec

    def install(self) -> None:
        record_names(self.model)  # keeps names given by prepare_model(whole model)
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                if hasattr(module, RECORD_ATTR):
                    delattr(module, RECORD_ATTR)
                setattr(module, SESSION_ATTR, self)
                self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recent.clear()
        for rec in self.records:
            rec.last_input = None

    # ------------------------------------------------------------------ progress of the solve
    def group_done(self, rec: InputRecord, config) -> None:
        """A group was solved: advance the progress bar (created on the first solve, with ETA)."""
        from tqdm.auto import tqdm

        from .selection import SVDQUANT, decide

        if self._bar is None:  # groups the handler will solve: recorded, and picked by the handler's own rule
            for r in self.records:
                r.counted = bool(r.seen_rows and not r.finished and decide(r.members[0], config).action == SVDQUANT)
            total = sum(r.counted for r in self.records)
            self._bar = tqdm(total=max(total, 1), desc="SVDQuant groups", unit="group", dynamic_ncols=True)
        rec.finished = True
        self.solved_groups += 1
        self._bar.set_postfix_str(rec.name[-60:], refresh=False)
        self._bar.update(1)
        self._maybe_close_bar()

    def record_finished(self, rec: InputRecord) -> None:
        """A record will never be solved (its layers were skipped or quantized data-free)."""
        if rec.finished:
            return
        rec.finished = True
        if self._bar is not None and rec.counted and self._bar.total > self._bar.n:
            self._bar.total -= 1
            self._bar.refresh()
            self._maybe_close_bar()

    def _maybe_close_bar(self) -> None:
        if self._bar is not None and self._bar.n >= self._bar.total:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Free every record now (sampled rows, Hessians, cached results) and detach it from the model."""
        for module in self.model.modules():
            if getattr(module, SESSION_ATTR, None) is self:
                forget_calibration(module)
        for rec in self.records:
            rec.release()
            rec.solved.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        n_lin = sum(len(r.members) for r in self.records)
        shared = sum(1 for r in self.records if len(r.members) > 1)
        rows = sum(0 if r.rows is None else r.rows.shape[0] for r in self.records)
        return (f"{len(self.records)} inputs recorded for {n_lin} linears ({shared} shared by several linears), "
                f"{rows} sampled rows held")


def check_storage(storage, who: str) -> None:
    """``storage`` of ``who`` (``record_inputs``, ``calibrate``): "auto" (each input's device), "cpu" or a CUDA
    device this machine has; otherwise an error naming ``storage``, before any forward runs."""
    if not (isinstance(storage, str) and storage == "auto"):
        check_device_arg(storage, f"{who}: storage", hint=" (use storage='auto' or 'cpu')",
                         expected="'auto' (each input's device), 'cpu', or a CUDA device ('cuda', 'cuda:0', ...)")


@contextmanager
def record_inputs(model: nn.Module, *, max_rows: int = 4096, storage: str = "auto", seed: int = 0,
                  hessian: bool = False):
    """Record calibration statistics of every linear input of ``model`` while the block runs.

    Args:
        max_rows: rows of each input kept for the algorithm (a uniform sample over all calls).
        storage: where sampled rows live: "auto" (the input's device), "cpu", or a CUDA device ("cuda:1").
        seed: seed of the row sampling (the result is reproducible for a fixed seed and call order).
        hessian: also accumulate XᵀX over all rows for GPTQ (K² fp32 per input: 36 MB at K=3072, 0.9 GB at
            K=15360); without it GPTQ uses the row sample and falls back to RTN where it has < 2K rows.

    Then ``quantize_(model, SVDQuantConfig())`` uses the records. Yields the session (``.records``,
    ``.summary()``, ``.close()`` to free the records early). Records are freed as the handler finishes each
    layer; names already given by ``prepare_model(whole_model)`` are kept when calibrating a submodule.
    """
    check_storage(storage, "record_inputs")
    session = CalibrationSession(model, max_rows, storage, seed, hessian)
    session.install()
    try:
        yield session
    finally:
        session.remove()
        log.info("svdquant_ops: calibration recorded %s", session.summary())
