"""Mean predictive entropy of the next-token distribution, in nats.

    H(p) = -sum_v p_v log p_v,   p = softmax(z)

averaged over the positions selected by a mask. Used teacher-forced (the target
positions of an SFT batch) and during sampling (the per-step ``scores`` or ``logits``
that ``generate`` returns, at the positions that were actually sampled). It measures
how wide the policy stays, the quantity SED-SFT protects (SPEC: "token entropy").

Entropies are computed in float32 whatever the logits' dtype, in chunks of positions so
that a [positions, vocabulary] float32 copy never has to exist at once. Entries with
``z_v = -inf`` (vocabulary masked by top-k / top-p warpers) count as ``p_v = 0`` and
add nothing; note that ``generate``'s ``scores`` are the warped logits the sample was
drawn from, its ``logits`` (``output_logits=True``) are the raw model ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

DEFAULT_CHUNK = 1024  # positions per float32 softmax chunk


def predictive_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dim.

    Args:
        logits: [..., V] in any floating dtype.
        chunk_size: rows processed at once.

    Returns:
        [...] float32 entropies (no gradient is tracked beyond what autograd allows).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        p = logp.exp()
        # p * logp is 0 * -inf = nan where a logit is -inf; such terms are 0.
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        out[start : start + chunk_size] = -plogp.sum(dim=-1)
    return out.reshape(logits.shape[:-1])


class TokenEntropy(Metric):
    """Mean predictive entropy (nats) over the masked positions seen.

    ``update(logits [..., V], mask [...] | None)`` adds ``H`` at the positions where
    ``mask`` is true (all positions when ``mask`` is None); ``update_from_values`` adds
    precomputed entropies. ``compute()`` is the mean over all positions added, 0.0 if
    none. DDP: sum and count are ``sum`` states.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, chunk_size: int = DEFAULT_CHUNK, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_size = chunk_size
        self.add_state(
            "entropy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        entropies: torch.Tensor | None = None,
    ) -> None:
        """Add entropies of ``logits`` [..., V] at positions where ``mask`` [...] is true,
        or precomputed per-position ``entropies`` (any shape, flattened)."""
        if (logits is None) == (entropies is None):
            raise ValueError("pass exactly one of logits or entropies")
        if logits is not None:
            logits = logits.detach()
            if mask is not None:
                if mask.shape != logits.shape[:-1]:
                    raise ValueError(
                        f"mask shape {tuple(mask.shape)} must equal the logits shape without "
                        f"the vocabulary dim, {tuple(logits.shape[:-1])}"
                    )
                logits = logits[mask.to(device=logits.device, dtype=torch.bool)]
            entropies = predictive_entropy(logits, self.chunk_size)
        entropies = entropies.detach().reshape(-1)
        self.entropy_sum += entropies.to(device=self.entropy_sum.device, dtype=torch.float64).sum()
        self.count += entropies.numel()

    def update_from_values(self, entropies: torch.Tensor) -> None:
        """Add precomputed per-position entropies (any shape, flattened)."""
        # Goes through ``update`` so torchmetrics' bookkeeping (cache, update count) runs.
        self.update(entropies=entropies)

    def compute(self) -> torch.Tensor:
        """Mean entropy in nats (float32); 0.0 when no position was added."""
        if self.count == 0:
            return torch.tensor(0.0, device=self.device)
        return (self.entropy_sum / self.count).float()
