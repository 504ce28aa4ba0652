"""The calibrated SVDQuant algorithm for one group of linears sharing an input (``solve_group``).

For a group (weights W_i [N_i, K], sampled input rows X [S, K], per-channel absmax a [K]):

1. smoothing search: λ = a^α / b^β over the 39-point (α, β) grid, b = max_i |W_i| per input channel; each λ is
   scored by the group's output squared error with a one-shot rank-r SVD, RTN 4-bit residual and 4-bit
   activations in the loop (the reference scores with the attention / block output; we score with the linears'
   own outputs, which needs no model re-execution);
2. low-rank branch: L_k = SVD_r(Ŵ − Q_{k−1}), Q_k = Q(Ŵ − L_k), keep the best by output error, stop at the
   first increase; q/k/v of one attention share one down projection (SVD of the stacked weights);
3. residual: RTN, or GPTQ with the Hessian of the smoothed inputs and scales fixed from RTN (w4a8: the per-channel
   scale from RTN, the group multipliers chosen during GPTQ); optionally refit the branch to the GPTQ residual,
   kept only if the output error drops.

Output errors are measured exactly as the deployed layer computes: activations quantized per token with
``fake_quant_act`` (bit-identical to the kernel) and the branch applied to the raw input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..formats import ACT_SHIFT
from ..quantizers import dequantize, fake_quant_act, smooth_act
from ..storage import SVDQuantParts
from .decompose import branch_in_smoothed_space, check_weight, residual_parts
from .gptq import gptq_quantize
from .lowrank import truncated_svd

log = logging.getLogger("svdquant_ops")


def smoothing_candidates(steps: int) -> list[tuple[float, float]]:
    """(α, β) grid: (0, 0), (c, 0) and (c, 1 − c) for c = 1/steps … (steps − 1)/steps (39 points for 20)."""
    if steps <= 1:
        return [(0.0, 0.0)]
    cs = [i / steps for i in range(1, steps)]
    return [(0.0, 0.0)] + [(c, 0.0) for c in cs] + [(c, 1.0 - c) for c in cs]


def smooth_from(a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    lam = a.float().pow(alpha) / b.float().pow(beta)
    return torch.where(lam == 0, torch.ones_like(lam), lam)  # non-finite candidates are skipped by the caller


@dataclass
class Branch:
    """A set of rows (one linear, or q/k/v stacked) that shares one low-rank down projection."""

    members: list[int]  # indices into the group
    weight: torch.Tensor  # stacked fp32 [N_s, K]
    y_ref: torch.Tensor  # X Wᵀ, fp32 [S, N_s]


class _NonFinite(ValueError):
    pass


def _split_rows(t: torch.Tensor | None, sizes: list[int]):
    return [None] * len(sizes) if t is None else list(t.split(sizes, dim=0))


class GroupSolver:
    def __init__(self, weights: list[torch.Tensor], x: torch.Tensor, absmax: torch.Tensor, *, precision: str,
                 rank: int, dtype: torch.dtype, unsigned: bool, svd: str, branch_keys: list, seed: int = 0,
                 per_channel_global: bool = False, input_stats: tuple | None = None):
        self.precision, self.rank, self.dtype, self.unsigned, self.svd = precision, rank, dtype, unsigned, svd
        self.seed = seed
        self.per_channel_global = per_channel_global
        self.input_stats = input_stats  # (XᵀX, column sums, row count) over all calibration rows, or None
        self.x = x
        self.xf = x.float()
        self.absmax = absmax.float()
        self.wmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
        groups: dict = {}
        for i, key in enumerate(branch_keys):
            groups.setdefault(key if key is not None else ("solo", i), []).append(i)
        self.branches = []
        for idx in groups.values():
            w = torch.cat([weights[i].float() for i in idx])
            self.branches.append(Branch(idx, w, self.xf @ w.T))

    # ---------------------------------------------------------------- pieces
    def quantized_input(self, smooth_q: torch.Tensor) -> torch.Tensor:
        return fake_quant_act(self.x, smooth_q.to(self.dtype), self.precision, unsigned=self.unsigned)

    def factors(self, w_hat: torch.Tensor, smooth_q: torch.Tensor, target: torch.Tensor):
        us, v = truncated_svd(target, self.rank, self.svd, seed=self.seed)
        up, down = us.to(self.dtype), (v / smooth_q.unsqueeze(1)).to(self.dtype)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise _NonFinite("low-rank factors overflow the model dtype")
        return up, down

    def parts(self, br: Branch, w_hat, smooth_q, up, down, residual_codes=None) -> SVDQuantParts:
        return residual_parts(w_hat, smooth_q, up, down, self.precision, self.dtype, act_unsigned=self.unsigned,
                              per_channel_global=self.per_channel_global, residual_codes=residual_codes)

    def error(self, br: Branch, xq: torch.Tensor, p: SVDQuantParts) -> float:
        y = xq @ dequantize(p.codes, p.scales, self.precision, p.global_scale).T
        y += (self.xf @ p.proj_down.float()) @ p.proj_up.float().T
        if p.bias_correction is not None:
            y += p.bias_correction
        return float((y - br.y_ref).pow(2).sum())

    def one_shot(self, br: Branch, smooth_q: torch.Tensor, xq: torch.Tensor) -> float:
        w_hat = br.weight * smooth_q
        up, down = self.factors(w_hat, smooth_q, w_hat)
        return self.error(br, xq, self.parts(br, w_hat, smooth_q, up, down))

    # ---------------------------------------------------------------- the three steps
    def search_smooth(self, steps: int) -> tuple[torch.Tensor, list]:
        best = None
        log_rows = []
        for alpha, beta in smoothing_candidates(steps):
            smooth_q = smooth_from(self.absmax, self.wmax, alpha, beta).to(self.dtype).float()
            if not (torch.isfinite(smooth_q).all() and (smooth_q > 0).all()):
                continue  # λ does not fit the model dtype (fp16 overflow / underflow): not a candidate
            xq = self.quantized_input(smooth_q)
            try:
                err = sum(self.one_shot(br, smooth_q, xq) for br in self.branches)
            except _NonFinite:
                continue
            log_rows.append((alpha, beta, err))
            if best is None or err < best[0]:
                best = (err, smooth_q)
        return best[1], log_rows

    def refit_lowrank(self, br: Branch, smooth_q, xq, max_iters: int) -> tuple[float, SVDQuantParts, int]:
        w_hat = br.weight * smooth_q
        best_err, best_p, rounds = None, None, 0
        q_prev = torch.zeros_like(w_hat)
        for k in range(max(1, max_iters)):
            up, down = self.factors(w_hat, smooth_q, w_hat - q_prev)
            p = self.parts(br, w_hat, smooth_q, up, down)
            err = self.error(br, xq, p)
            rounds = k + 1
            if best_err is not None and err >= best_err:
                break
            best_err, best_p = err, p
            q_prev = dequantize(p.codes, p.scales, self.precision, p.global_scale)
            if self.rank == 0:
                break  # nothing to refit
        return best_err, best_p, rounds

    def smoothed_hessian(self, smooth_q: torch.Tensor) -> torch.Tensor | None:
        """X̂ᵀX̂ of the smoothed (and shifted) inputs: from all calibration rows when calibrate(hessian=True)
        accumulated XᵀX, else from the row sample, or None when the sample is too small to trust (< 2K rows)."""
        k = self.x.shape[1]
        if self.input_stats is not None:
            xtx, colsum, n = (t.to(self.x.device) if torch.is_tensor(t) else t for t in self.input_stats)
            h = xtx.float()
            if self.unsigned:  # (x + s)ᵀ(x + s) = xᵀx + s(c1ᵀ + 1cᵀ) + n s² 11ᵀ
                c = colsum.float().unsqueeze(1)
                h = h + ACT_SHIFT * (c + c.T) + n * ACT_SHIFT**2
            inv = 1.0 / smooth_q
            return h * inv.unsqueeze(1) * inv.unsqueeze(0)
        if self.x.shape[0] < 2 * k:
            return None
        x_hat = smooth_act(self.x, smooth_q.to(self.dtype), unsigned=self.unsigned)
        return x_hat.T @ x_hat

    def gptq(self, br: Branch, smooth_q, xq, p: SVDQuantParts, *, damp, block, act_order, refit: bool):
        h = self.smoothed_hessian(smooth_q)
        if h is None:
            return None
        w_hat = br.weight * smooth_q
        r = w_hat - branch_in_smoothed_space(p.proj_up, p.proj_down, smooth_q)
        codes, scales = gptq_quantize(r, h, self.precision, p.scales, p.global_scale, damp=damp, block=block,
                                      act_order=act_order)
        q = self.parts(br, w_hat, smooth_q, p.proj_up, p.proj_down, residual_codes=(codes, scales, p.global_scale))
        err = self.error(br, xq, q)
        if refit and self.rank > 0:
            # Refit the branch to what GPTQ left: L = SVD_r(Ŵ − Q(R)), codes kept.
            deq = dequantize(codes, scales, self.precision, p.global_scale)
            up, down = self.factors(w_hat, smooth_q, w_hat - deq)
            q2 = self.parts(br, w_hat, smooth_q, up, down, residual_codes=(codes, scales, p.global_scale))
            err2 = self.error(br, xq, q2)
            if err2 < err:
                return err2, q2
        return err, q


def _member_parts(br: Branch, p: SVDQuantParts, sizes: list[int]) -> list[SVDQuantParts]:
    outs = []
    gsc = p.global_scale
    per_row_global = gsc is not None and gsc.numel() > 1
    for codes, scales, up, corr, g in zip(p.codes.split(sizes), p.scales.split(sizes), p.proj_up.split(sizes),
                                          _split_rows(p.bias_correction, sizes),
                                          _split_rows(gsc, sizes) if per_row_global else [gsc] * len(sizes)):
        outs.append(SVDQuantParts(codes=codes.contiguous(), scales=scales.contiguous(),
                                  global_scale=None if g is None else g.clone(), smooth=p.smooth.clone(),
                                  proj_down=p.proj_down.clone(), proj_up=up.contiguous(), precision=p.precision,
                                  act_unsigned=p.act_unsigned,
                                  bias_correction=None if corr is None else corr.contiguous()))
    return outs


def solve_group(weights: list[torch.Tensor], x: torch.Tensor, absmax: torch.Tensor, config, *, rank: int,
                dtype: torch.dtype, unsigned: bool = False, branch_keys: list | None = None,
                input_stats: tuple | None = None, stats: dict | None = None, name: str = "group") -> list[SVDQuantParts]:
    """Calibrated SVDQuant of linears sharing one input. Returns one SVDQuantParts per weight (same order)."""
    for i, w in enumerate(weights):
        check_weight(w, f"weights[{i}]")
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"weights[{i}] has {w.shape[1]} input features but the recorded input has {x.shape[1]}")
    if absmax.shape != (x.shape[1],):
        raise ValueError(f"absmax must have shape [{x.shape[1]}], got {list(absmax.shape)}")
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(absmax).all()):
        raise ValueError("recorded activations contain NaN or Inf")
    solver = GroupSolver(weights, x, absmax, precision=config.precision, rank=rank, dtype=dtype, unsigned=unsigned,
                         svd=config.svd, branch_keys=branch_keys or [None] * len(weights), seed=config.seed,
                         per_channel_global=config.nvfp4_per_channel_scale, input_stats=input_stats)
    smooth_q, grid = solver.search_smooth(config.smooth_grid)
    xq = solver.quantized_input(smooth_q)
    results: list = [None] * len(weights)
    total_err = 0.0
    rounds = []
    for br in solver.branches:
        err, p, n_rounds = solver.refit_lowrank(br, smooth_q, xq, config.lowrank_iters)
        rounds.append(n_rounds)
        if config.gptq:
            out = solver.gptq(br, smooth_q, xq, p, damp=config.gptq_damp, block=config.gptq_block,
                              act_order=config.gptq_act_order, refit=config.refit_after_gptq)
            if out is None:
                log.warning("svdquant_ops: %s: GPTQ needs a Hessian from at least 2K = %d rows but only %d were "
                            "sampled; using RTN (pass calibrate(..., hessian=True) or a larger max_rows)", name,
                            2 * x.shape[1], x.shape[0])
            else:
                err, p = out
        total_err += err
        sizes = [weights[i].shape[0] for i in br.members]
        for i, mp in zip(br.members, _member_parts(br, p, sizes)):
            results[i] = mp
    if stats is not None:
        ref = sum(float(br.y_ref.pow(2).sum()) for br in solver.branches)
        stats.update(smooth_grid=grid, output_error=total_err, output_energy=ref, lowrank_rounds=rounds,
                     sqnr_db=10 * torch.log10(torch.tensor(ref / max(total_err, 1e-30))).item())
    return results
