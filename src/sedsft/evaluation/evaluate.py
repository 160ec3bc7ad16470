"""Score sampled generations: diversity, accuracy, sampled-token entropy."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sedsft.evaluation.sampling import Samples, sample_completions
from sedsft.metrics import AvgAtK, PassAtK, answers_correct, diversity_and_accuracy


def label_diversity(
    groups: Sequence[Sequence[str]], classify: Callable[[str], str]
) -> dict[str, float]:
    """Diversity of a discrete label of each sample (e.g. the toy set's solution style):
    ``label_entropy`` (nats) of the labels pooled over all samples, and
    ``labels_per_prompt``, the mean number of distinct labels among a prompt's samples."""
    labels = [[classify(text) for text in group] for group in groups]
    counts = Counter(label for group in labels for label in group)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    per_prompt = sum(len(set(group)) for group in labels) / max(len(labels), 1)
    out = {"label_entropy": entropy, "labels_per_prompt": per_prompt}
    out.update({f"label_frac/{name}": c / total for name, c in sorted(counts.items())})
    return out


def pass_at_k_curve(num_samples: int) -> list[int]:
    """The ``k`` of a pass@k curve for ``num_samples`` samples per prompt: powers of two up
    to ``num_samples``, and ``num_samples`` itself (8 -> [1, 2, 4, 8]; 6 -> [1, 2, 4, 6])."""
    ks = [1 << i for i in range(num_samples.bit_length()) if (1 << i) <= num_samples]
    return ks if ks[-1] == num_samples else [*ks, num_samples]


def score_samples(
    samples: Samples,
    golds: Sequence[str | None],
    k: int,
    classify: Callable[[str], str] | None = None,
    correct: Sequence[Sequence[bool | None]] | None = None,
    curve: bool = False,
) -> tuple[dict[str, float], list[list[bool | None]]]:
    """Every metric of the evaluation for already-sampled completions, and per-sample
    correctness (None where the prompt has no gold answer).

    Diversity covers all prompts; pass@1, pass@k and avg@k the prompts with a gold answer
    (``curve``: pass@j at every j of ``pass_at_k_curve(k)``); ``classify`` (text -> label)
    adds ``label_diversity``. ``correct``: per-sample correctness already computed (e.g.
    while sampling), else checked here.
    """
    metrics = diversity_and_accuracy(samples.texts, None, k)
    if correct is None:
        correct = [
            answers_correct(group, [gold] * len(group)) if gold is not None else [None] * len(group)
            for group, gold in zip(samples.texts, golds, strict=True)
        ]
    correct = [list(c) for c in correct]
    scored = [c for c, gold in zip(correct, golds, strict=True) if gold is not None]
    if scored:
        ks = pass_at_k_curve(k) if curve else sorted({1, k})
        named = [(f"pass@{j}", PassAtK(j)) for j in ks] + [(f"avg@{k}", AvgAtK())]
        for name, metric in named:
            metric.update(scored)
            metrics[name] = float(metric.compute())
    if classify is not None:
        metrics.update(label_diversity(samples.texts, classify))
    metrics["sampled_entropy"] = samples.entropy
    lengths = [n for group in samples.num_tokens for n in group]
    metrics["mean_new_tokens"] = sum(lengths) / max(len(lengths), 1)
    return metrics, correct


def evaluate_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    golds: Sequence[str | None],
    num_samples: int = 8,
    classify: Callable[[str], str] | None = None,
    **sampling: Any,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample ``num_samples`` completions per prompt and score them.

    Returns the metrics and one record per sample (prompt index, sample index, prompt,
    gold, completion, correctness, length) for ``samples.jsonl``.
    """
    samples = sample_completions(model, tokenizer, prompts, num_samples=num_samples, **sampling)
    metrics, correct = score_samples(samples, golds, num_samples, classify)
    records = [
        {
            "prompt_index": i,
            "sample": j,
            "prompt": prompt[-1]["content"],
            "gold": gold,
            "completion": text,
            "correct": correct[i][j],
            "label": classify(text) if classify is not None else None,
            "new_tokens": samples.num_tokens[i][j],
        }
        for i, (prompt, gold) in enumerate(zip(prompts, golds, strict=True))
        for j, text in enumerate(samples.texts[i])
    ]
    return metrics, records
