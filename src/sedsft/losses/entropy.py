"""Unselective entropy bonus: the baseline SED-SFT is compared against (regularise every
token, not only those with a large exploration space).

Per target token ``-log p_y - lam * H(p)``, ``H(p) = -sum_v p_v log p_v``.
Since ``dH/dz_j = -p_j (log p_j + H)``, the gradient is
``p * (1 + lam * (log p + H)) - e_y`` with ``log p = z - lse``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sedsft.losses.base import TokenLoss, check_lam
from sedsft.losses.engine import Chunk, ChunkResult, subtract_onehot_


class EntropyLoss(TokenLoss):
    """``-log p_y - lam H(p)``.

    Args:
        lam: weight of the entropy bonus. Default 0.1: H can reach ``log V`` (~11.8 nats
            for a 128k vocabulary), so ``lam * H`` stays comparable to a ~1 nat CE instead
            of swamping it.
    """

    name = "entropy"
    extra_metrics = ("reg",)

    def __init__(self, lam: float = 0.1, chunk_size: int | None = None, stats_top_k: int = 10):
        super().__init__(chunk_size, stats_top_k)
        self.lam = check_lam(lam)

    def value(self, z: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        reg = -self.lam * entropy
        return -logp.gather(1, y.unsqueeze(1)).squeeze(1) + reg, {"reg": reg}

    def chunk(self, c: Chunk) -> ChunkResult:
        reg = -self.lam * c.entropy
        if c.need_grad and self.lam != 0.0:
            # tmp = 1 + lam * (z - lse + H), one fused pass; then buf = p * tmp.
            offset = 1.0 + self.lam * (c.entropy - c.lse)
            torch.add(offset.unsqueeze(1), c.z, alpha=self.lam, out=c.tmp)
            c.buf.mul_(c.tmp)
        if c.need_grad:
            subtract_onehot_(c.buf, c.y)
        return ChunkResult(c.ce + reg, extras={"reg": reg})
