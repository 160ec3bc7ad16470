"""Label smoothing (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016):
the worked example of "Add a loss" (docs/losses.md), one file with the value only.

Per target token ``-(1 - eps) log p_y - eps * mean_v log p_v``: cross-entropy against the
target mixed with the uniform distribution. No ``chunk``: the engine takes the gradient
of ``value`` by autograd, chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sedsft.losses.base import TokenLoss, check


class LabelSmoothingLoss(TokenLoss):
    """Args:
    eps: weight of the uniform target, in [0, 1); 0 is plain CE.
    """

    name = "label_smoothing"

    def __init__(self, eps: float = 0.1, chunk_size: int | None = None, stats_top_k: int = 10):
        super().__init__(chunk_size, stats_top_k)
        check(isinstance(eps, (int, float)) and 0 <= eps < 1, f"eps must be in [0, 1), got {eps!r}")
        self.eps = float(eps)

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(z, -1)
        logp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
        return -(1 - self.eps) * logp_y - self.eps * logp.mean(-1)
