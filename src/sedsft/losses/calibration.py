"""Calibration of SED's threshold ``tau`` (SED-SFT, arXiv 2602.07464, Sec. 3).

Before training, run the initial model over held-out SFT examples, collect the top-k mass
``c_k`` (sum of the k largest probabilities) at every position, sort ascending and take
``tau`` so that a fraction ``cumsum_ratio`` of positions lie at or above it; about
``1 - cumsum_ratio`` of positions then satisfy ``c_k < tau`` and are regularised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sedsft.losses.chunked import IGNORE_INDEX, default_rows, topk_logits


@torch.no_grad()
def topk_mass(
    logits: Tensor, k: int, labels: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """Top-k probability mass of ``logits`` [..., V], computed in float32 chunks.

    Returns float32 [...] or, when ``labels`` [...] is given, a 1-D tensor over the
    positions whose label is not -100 (the ``calib_positions="target"`` case).
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab)
    rows_idx = None
    if labels is not None:
        rows_idx = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).flatten()
    n = x.shape[0] if rows_idx is None else rows_idx.numel()
    step = default_rows(vocab, chunk_size)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, step):
        if rows_idx is None:
            z = x[start : start + step].float()
        else:
            z = x.index_select(0, rows_idx[start : start + step]).float()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        out[start : start + step] = torch.exp(topk_logits(z, k) - lse).sum(-1)
    return out if labels is not None else out.view(logits.shape[:-1])


def tau_from_topk_mass(values: Tensor, cumsum_ratio: float) -> float:
    """``tau`` such that a fraction ``cumsum_ratio`` of ``values`` [n] lie at or above it.

    With the values sorted ascending, ``tau = sorted[n - ceil(cumsum_ratio * n)]``: the
    ``ceil(cumsum_ratio * n)`` largest values are ``>= tau`` and at most
    ``n - ceil(cumsum_ratio * n)`` fall below it (get masked in).
    """
    if not (isinstance(cumsum_ratio, (int, float)) and 0 < cumsum_ratio <= 1):
        raise ValueError(f"cumsum_ratio must be in (0, 1], got {cumsum_ratio!r}")
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    values = values.detach().double().cpu()
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite top-k masses in [0, 1]")
    n = values.numel()
    # The epsilon keeps e.g. 0.7 * 10 = 7.000000000000001 from rounding up to 8.
    above = min(n, max(1, math.ceil(cumsum_ratio * n - 1e-9)))
    return float(torch.sort(values).values[n - above])
