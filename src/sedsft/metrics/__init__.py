"""Diversity and accuracy measures for sampled generations (SPEC, "Diversity measures").

- :class:`DistinctN` -- unique / total n-grams (Li et al., 2016), corpus or per prompt.
- :class:`SelfBLEU` -- BLEU of each sample against its siblings (Zhu et al., 2018).
- :class:`PassAtK`, :class:`AvgAtK` -- unbiased pass@k (Chen et al., 2021) and avg@k.
- :func:`grade`, :func:`is_correct`, :func:`answers_correct`, :func:`extract_answer` -- answer
  checking (one checker for evaluation and the RL reward; ``answers`` module docstring).

:func:`diversity_and_accuracy` computes the usual set in one call.

Where a metric has nothing to measure it is NaN, not a number that reads as a result:
self-BLEU with fewer than two samples per prompt, distinct-n with no n-gram. Each warns
once (:class:`UndefinedMetricWarning`); means over prompts leave the undefined prompts out
and count them (``skipped`` state, ``*_skipped`` keys of :func:`diversity_and_accuracy`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sedsft.metrics.answers import (
    Verdict,
    answers_correct,
    extract_answer,
    extract_boxed,
    grade,
    grading_counts,
    is_correct,
)
from sedsft.metrics.distinct import DistinctN, Tokenizer, UndefinedMetricWarning
from sedsft.metrics.pass_at_k import AvgAtK, PassAtK
from sedsft.metrics.self_bleu import SelfBLEU

__all__ = [
    "AvgAtK",
    "Verdict",
    "DistinctN",
    "PassAtK",
    "SelfBLEU",
    "UndefinedMetricWarning",
    "answers_correct",
    "diversity_and_accuracy",
    "extract_answer",
    "extract_boxed",
    "grade",
    "grading_counts",
    "is_correct",
]


def diversity_and_accuracy(
    groups: Sequence[Sequence[str]],
    golds: Sequence[str] | None,
    k: int,
    tokenizer: Tokenizer | None = None,
) -> dict[str, float]:
    """Diversity (and, with ``golds``, accuracy) of sampled generations in one call.

    Args:
        groups: ``groups[i]`` are the samples for prompt ``i`` (``k`` or more each when
            ``golds`` is given).
        golds: gold answer per prompt, or None to skip the accuracy keys.
        k: the ``k`` of pass@k and avg@k (the keys are named after it).
        tokenizer: optional tokenizer for distinct-n and self-BLEU (default: whitespace
            for distinct-n, sacrebleu "13a" for self-BLEU).

    Returns:
        ``distinct_{n}`` (corpus pooling) and ``distinct_{n}_prompt`` for n = 1..4,
        ``self_bleu`` (0..100); with golds also ``pass@1``, ``pass@{k}``, ``avg@{k}``
        (0..1). pass@1 and avg@k agree when every prompt has the same number of samples.
        A diversity value with nothing to measure is NaN (self-BLEU with one sample per
        prompt, distinct-n without an n-gram). When a per-prompt mean left prompts out
        (fewer than two samples; no n-gram) the number left out is added as
        ``self_bleu_skipped`` / ``distinct_{n}_prompt_skipped``.
    """
    out: dict[str, float] = {}
    for n in range(1, 5):
        for pooling, suffix in (("corpus", ""), ("prompt", "_prompt")):
            metric = DistinctN(n, pooling=pooling, tokenizer=tokenizer)
            metric.update(groups)
            out[f"distinct_{n}{suffix}"] = float(metric.compute())
            if metric.skipped:
                out[f"distinct_{n}{suffix}_skipped"] = float(metric.skipped)
    self_bleu = SelfBLEU(tokenizer=tokenizer)
    self_bleu.update(groups)
    out["self_bleu"] = float(self_bleu.compute())
    if self_bleu.skipped:
        out["self_bleu_skipped"] = float(self_bleu.skipped)

    if golds is not None:
        if len(golds) != len(groups):
            raise ValueError(f"got {len(groups)} groups of samples but {len(golds)} gold answers")
        correct = [
            answers_correct(group, [gold] * len(group))
            for group, gold in zip(groups, golds, strict=True)
        ]
        for name, metric in (
            ("pass@1", PassAtK(1)),
            (f"pass@{k}", PassAtK(k)),
            (f"avg@{k}", AvgAtK()),
        ):
            metric.update(correct)
            out[name] = float(metric.compute())
    return out
