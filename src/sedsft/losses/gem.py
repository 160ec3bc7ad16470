"""GEM: Li et al., "Preserving Diversity in Supervised Fine-Tuning of Large Language
Models", ICLR 2025 (arXiv 2408.16673).

Per target token ``-sum_v q_v w_v (log p_y - log p_v)`` with ``q = sg(softmax(z / beta))``
and ``w_v = 1`` (``h = "linear"``) or ``w_v = sg(sigmoid(0.01 (z_v - z_y)))``
(``h = "logsigmoid"``). As ``log p_y - log p_v = z_y - z_v``, with ``a = q * w`` the value is
``sum_v a_v z_v - z_y sum_v a_v`` and the gradient ``a - (sum_v a_v) e_y``
(``q - e_y`` for the linear h).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sedsft.losses.base import TokenLoss, check
from sedsft.losses.engine import Chunk, ChunkResult, row_dot, subtract_onehot_

GEM_H = ("linear", "logsigmoid")


class GEMLoss(TokenLoss):
    """GEM with temperature ``beta`` > 0 and weighting ``h`` in ``GEM_H``."""

    name = "gem"

    def __init__(
        self,
        beta: float = 0.7,
        h: str = "linear",
        chunk_size: int | None = None,
        stats_top_k: int = 10,
    ):
        super().__init__(chunk_size, stats_top_k)
        check(
            isinstance(beta, (int, float)) and beta > 0, f"beta must be a number > 0, got {beta!r}"
        )
        check(h in GEM_H, f"h must be one of {list(GEM_H)}, got {h!r}")
        self.beta, self.h = float(beta), h

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(z, -1)
        logp_y = logp.gather(1, y.unsqueeze(1))
        with torch.no_grad():
            weight = torch.softmax(z / self.beta, -1)  # q
            if self.h == "logsigmoid":
                weight = weight * torch.sigmoid(0.01 * (z - z.gather(1, y.unsqueeze(1))))
        return -(weight * (logp_y - logp)).sum(-1)

    def chunk(self, c: Chunk) -> ChunkResult:
        # The engine is done with p: overwrite buf with q. (q = p^(1/beta) / sum p^(1/beta)
        # would reuse p, but a float pow costs several softmaxes on the CPU.) On the CPU the
        # softmax runs in place in buf, whose pages the engine's softmax already touched: a
        # first write into tmp costs more in page faults than the softmax itself.
        scaled = c.buf if c.buf.device.type == "cpu" else c.tmp
        torch.mul(c.z, 1.0 / self.beta, out=scaled)
        torch.softmax(scaled, dim=-1, out=c.buf)
        if self.h == "linear":
            value = row_dot(c.buf, c.z, c.tmp) - c.z_y
            if c.need_grad:
                subtract_onehot_(c.buf, c.y)
            return ChunkResult(value)
        # w = sigmoid(0.01 z - 0.01 z_y): one fused pass before the sigmoid.
        torch.add((-0.01 * c.z_y).unsqueeze(1), c.z, alpha=0.01, out=c.tmp).sigmoid_()
        c.buf.mul_(c.tmp)  # a = q * w
        mass = c.buf.sum(-1)
        value = row_dot(c.buf, c.z, c.tmp) - c.z_y * mass
        if c.need_grad:
            subtract_onehot_(c.buf, c.y, mass)
        return ChunkResult(value)
