"""Dynamic Fine-Tuning (DFT): Wu et al., "On the Generalization of SFT: A Reinforcement
Learning Perspective with Reward Rectification", 2025 (arXiv 2508.05629).

Per target token ``-sg(p_y) * log p_y`` (``sg`` = stop-gradient): CE re-weighted by the
model's own target probability. Gradient ``p_y * (p - e_y)``, i.e. CE's times a per-row
factor, which the engine applies for free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sedsft.losses.base import TokenLoss
from sedsft.losses.engine import Chunk, ChunkResult, subtract_onehot_


class DFTLoss(TokenLoss):
    """``-sg(p_y) log p_y``."""

    name = "dft"

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        logp_y = torch.log_softmax(z, -1).gather(1, y.unsqueeze(1)).squeeze(1)
        return -logp_y.detach().exp() * logp_y

    def chunk(self, c: Chunk) -> ChunkResult:
        p_y = c.p_y
        if c.need_grad:
            subtract_onehot_(c.buf, c.y)
        return ChunkResult(p_y * c.ce, row_scale=p_y)
