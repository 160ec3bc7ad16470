"""Calibration of SED's threshold ``tau`` (SED-SFT, arXiv 2602.07464, Sec. 3): the one
place where it is defined and run.

Before training, the initial model runs over held-out SFT examples; the top-k mass
``c_k`` (sum of the k largest probabilities) is collected at every target position (or at
every non-padding position, as the authors' release does), sorted ascending, and ``tau``
is taken so that a fraction ``cumsum_ratio`` of positions lie at or above it: about
``1 - cumsum_ratio`` of positions then satisfy ``c_k < tau`` and are regularised.

The masses come from the same loss engine (and the same fused hidden-state path) as
training: a ``step(batch, labels=..., loss_fn=probe)`` callable runs the model and returns
the engine's token statistics, so calibration never materialises ``T x V`` logits either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from sedsft.losses.engine import IGNORE_INDEX, default_rows, topk_logits

CALIB_POSITIONS = ("target", "all")


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


def position_labels(batch: dict[str, Tensor], positions: str) -> Tensor:
    """Labels [B, T] that select the calibration positions: the batch's own (assistant
    targets) for ``"target"``, every non-padding token for ``"all"``."""
    if positions not in CALIB_POSITIONS:
        raise ValueError(f"loss.calib_positions={positions!r}; allowed: {list(CALIB_POSITIONS)}")
    if positions == "target":
        return batch["labels"]
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)


Step = Callable[..., object]  # step(batch, labels=..., loss_fn=...) -> LossOutput


@torch.no_grad()
def collect_topk_mass(step: Step, batches: Iterable[dict], k: int, positions: str) -> Tensor:
    """Top-``k`` mass at the chosen positions of ``batches`` (1-D float32, on CPU).

    ``step`` is the training forward (``SFTModule.model_step``); a cross-entropy probe
    whose token statistic is the top-``k`` mass rides on it.
    """
    from sedsft.losses.ce import CELoss  # a loss module: no import cycle at load time

    probe = CELoss(stats_top_k=k)
    values = []
    for batch in batches:
        out = step(batch, token_stats=True, labels=position_labels(batch, positions), loss_fn=probe)
        values.append(out.token_stats["topk_mass"].float().cpu())
    return torch.cat(values) if values else torch.empty(0)


def calibrate_tau(
    loss, batches: Iterable[dict], step: Step, broadcast: Callable[[Tensor], Tensor] | None = None
) -> tuple[float, float]:
    """Calibrate ``loss.tau`` (an ``SEDLoss``) in place; returns ``(tau, mask_rate)``.

    ``broadcast`` makes every rank take rank 0's value (all ranks must run the forward:
    FSDP needs them all). The mask rate is measured with the loss's own ``top_k`` on the
    calibration positions: it differs from ``1 - cumsum_ratio`` when calibration uses
    another k, as the release does (preset ``loss=sed_release``).
    """
    batches = list(batches)
    masses = collect_topk_mass(step, batches, loss.calibration_top_k, loss.calib_positions)
    tau = loss.calibrate(masses)
    if broadcast is not None:
        tau = float(broadcast(torch.tensor(tau)))
        loss.set_tau(tau)
    if loss.calibration_top_k != loss.top_k:
        masses = collect_topk_mass(step, batches, loss.top_k, loss.calib_positions)
    mask_rate = float((masses < tau).float().mean()) if masses.numel() else 0.0
    return tau, mask_rate
