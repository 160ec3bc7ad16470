"""What every token loss shares: the output record, knob checks, and the two entry points
(``forward`` on logits, ``fused`` on hidden states + LM head) that hand the per-chunk math
of a subclass to the chunked engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sedsft.losses.engine import Chunk, ChunkResult, fused_loss, logits_loss


@dataclass
class LossOutput:
    """Result of a token loss over one batch.

    ``loss`` / ``loss_sum``: differentiable scalars, mean and sum over target tokens (the
    mean is 0 when there are none). ``metrics``: detached scalar means over target tokens.
    ``token_stats``: detached [n] tensors over target tokens, only on request.
    """

    loss: Tensor
    loss_sum: Tensor
    num_tokens: int
    metrics: dict[str, Tensor]
    token_stats: dict[str, Tensor] | None = None


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``; messages state the allowed values."""
    if not ok:
        raise ValueError(message)


def check_positive_int(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    allowed = "an int >= 1" + (" or None" if allow_none else "")
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be {allowed}, got {value!r}",
    )


def check_lam(value: float) -> float:
    check(
        isinstance(value, (int, float)) and value >= 0, f"lam must be a number >= 0, got {value!r}"
    )
    return float(value)


class TokenLoss(nn.Module):
    """Base class: a subclass implements ``chunk`` (value and gradient for a chunk of target
    rows) and may list extra per-token metrics in ``extra_metrics``.

    Args:
        chunk_size: rows per chunk; ``None`` picks ``max(1, 2**24 // V)`` (64 MiB per
            float32 chunk buffer).
        stats_top_k: k of the ``topk_mass`` token statistic (SED uses its own ``top_k``).
    """

    name: ClassVar[str] = ""
    extra_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, chunk_size: int | None = None, stats_top_k: int = 10):
        super().__init__()
        check_positive_int("chunk_size", chunk_size, allow_none=True)
        check_positive_int("stats_top_k", stats_top_k)
        self.chunk_size = chunk_size
        self.stats_top_k = stats_top_k

    # -- hooks for subclasses -------------------------------------------------------------
    @property
    def needs_top_k(self) -> int | None:
        """k of the top-k mass the loss math itself needs (``Chunk.topk_mass``), or None."""
        return None

    @property
    def stats_top_k_effective(self) -> int:
        return self.needs_top_k or self.stats_top_k

    def chunk(self, c: Chunk) -> ChunkResult:
        """Per-token loss [C] and, when ``c.need_grad``, its gradient left in ``c.buf``."""
        raise NotImplementedError

    def _before_call(self) -> None:
        """Checks that the loss can run (SED: ``tau`` known)."""

    # -- entry points -----------------------------------------------------------------------
    def forward(
        self, logits: Tensor, labels: Tensor, return_token_stats: bool = False
    ) -> LossOutput:
        """``logits`` [..., V] (any float dtype), ``labels`` [...] int64 already aligned with
        the logits (no shift here), -100 = ignored."""
        _check_labels(logits.shape[:-1], labels)
        self._before_call()
        loss_sum, result = logits_loss(self, logits, labels.long(), return_token_stats)
        return self._output(loss_sum, result)

    def fused(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None = None,
        return_token_stats: bool = False,
    ) -> LossOutput:
        """Same loss on ``logits = hidden @ weight.T + bias`` without ever holding the
        ``N x V`` logits: ``hidden`` [..., D], ``weight`` [V, D], ``bias`` [V] or None."""
        _check_labels(hidden.shape[:-1], labels)
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                f"got {tuple(weight.shape)}"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        self._before_call()
        loss_sum, result = fused_loss(self, hidden, weight, bias, labels.long(), return_token_stats)
        return self._output(loss_sum, result)

    def _output(self, loss_sum: Tensor, result) -> LossOutput:
        n = result.num_tokens
        denom = max(n, 1)
        metrics = {name: (value / denom).detach() for name, value in result.metric_sums.items()}
        return LossOutput(loss_sum / denom, loss_sum, n, metrics, result.token_stats)


def _check_labels(lead_shape: torch.Size, labels: Tensor) -> None:
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)} (labels are used as given: shift them before the call)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
