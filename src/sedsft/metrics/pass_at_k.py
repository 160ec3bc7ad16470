"""pass@k (unbiased estimator) and avg@k over sampled answers.

pass@k, Chen et al. (2021), "Evaluating Large Language Models Trained on Code": with
``n`` samples for a prompt of which ``c`` are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)
           = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)     (1 when n - c < k)

the probability that at least one of ``k`` samples drawn without replacement from the
``n`` is correct. The product form avoids huge binomials. The metric is the mean over
prompts.

avg@k: the mean accuracy over the samples of each prompt, averaged over prompts (the
paper's Avg@8 with 8 samples; equal to pass@1's estimator).

Input to both: ``update(correct)`` with ``correct[i]`` the list of per-sample
correctness (bool or 0/1) for prompt ``i``. Values are in [0, 1]. DDP: the sum of
per-prompt values and the number of prompts are ``sum`` states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class _PerPromptMean(Metric):
    """Mean over prompts of a per-prompt score; subclasses define ``_score``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, correct: list[bool], index: int) -> float:
        raise NotImplementedError

    def update(self, correct: Sequence[Sequence[bool | int]]) -> None:
        """Add prompts; ``correct[i][j]`` says whether sample ``j`` of prompt ``i`` is right."""
        # Validate the whole batch before touching the state.
        scores = [self._score([bool(x) for x in row], i) for i, row in enumerate(correct)]
        self.score_sum += sum(scores)
        self.prompts += len(scores)

    def compute(self) -> torch.Tensor:
        """Mean over prompts (float32); 0.0 when no prompt was added."""
        if self.prompts == 0:
            return torch.tensor(0.0, device=self.device)
        return (self.score_sum / self.prompts).float()


class PassAtK(_PerPromptMean):
    """Mean over prompts of the unbiased pass@k estimator (Chen et al., 2021).

    Every prompt needs at least ``k`` samples; fewer raises ``ValueError``.
    """

    def __init__(self, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1, got k={k}")
        self.k = k

    def _score(self, correct: list[bool], index: int) -> float:
        n = len(correct)
        if self.k > n:
            raise ValueError(
                f"pass@{self.k} needs at least k={self.k} samples per prompt, but prompt "
                f"{index} of this update has n={n}"
            )
        return pass_at_k(n, sum(correct), self.k)


class AvgAtK(_PerPromptMean):
    """Mean over prompts of the per-prompt accuracy over its samples (avg@k)."""

    def _score(self, correct: list[bool], index: int) -> float:
        if not correct:
            raise ValueError(f"avg@k needs at least one sample per prompt; prompt {index} has none")
        return sum(correct) / len(correct)
