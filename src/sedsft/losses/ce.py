"""Cross-entropy: the SFT baseline.

Per target token ``-log p_y`` with ``p = softmax(z)``; gradient ``p - e_y``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sedsft.losses.base import TokenLoss
from sedsft.losses.engine import Chunk, ChunkResult, subtract_onehot_


class CELoss(TokenLoss):
    """``-log p_y``."""

    name = "ce"

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(z, -1) - z.gather(1, y.unsqueeze(1)).squeeze(1)

    def chunk(self, c: Chunk) -> ChunkResult:
        if c.need_grad:
            subtract_onehot_(c.buf, c.y)
        return ChunkResult(c.ce)
