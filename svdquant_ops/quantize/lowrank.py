"""Truncated SVD for the low-rank branch: exact (``torch.linalg.svd``) or randomized (``torch.svd_lowrank``)."""

from __future__ import annotations

import torch

SVD_METHODS = ("exact", "lowrank")
DEFAULT_SVD = "lowrank"  # every entry point (SVDQuantConfig, quantize_weight, decompose) uses this default


def truncated_svd(w: torch.Tensor, rank: int, method: str = DEFAULT_SVD, *, niter: int = 4, oversample: int = 16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``w`` [N, K] in fp32: returns (U·S [N, r], V [K, r]) so that w ≈ (U·S) Vᵀ.

    Singular values go into the left factor (as in the reference). ``lowrank`` is randomized but seeded, so the
    result is reproducible; it needs far less time than ``exact`` on large matrices.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {list(SVD_METHODS)}, got {method!r}")
    n, k = w.shape
    r = min(rank, n, k)
    wf = w.float()
    if r == 0:
        return wf.new_zeros(n, 0), wf.new_zeros(k, 0)
    if method == "lowrank" and r + oversample < min(n, k):
        with torch.random.fork_rng(devices=[wf.device] if wf.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(wf, q=r + oversample, niter=niter)
    else:
        u, s, vh = torch.linalg.svd(wf, full_matrices=False)
        v = vh.mT
    return u[:, :r] * s[:r], v[:, :r].contiguous()
