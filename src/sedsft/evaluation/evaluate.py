"""Score sampled generations: diversity, accuracy, sampled-token entropy; for an eval run's
records (``score_records``) and for samples drawn in memory (``score_samples``, the
training callbacks')."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from sedsft.evaluation.eval_sets import EvalSet
from sedsft.evaluation.sampling import Samples, pooled_entropy
from sedsft.metrics import (
    AvgAtK,
    PassAtK,
    UndefinedMetricWarning,
    answers_correct,
    diversity_and_accuracy,
)

GRADING_STATUSES = {"timeout": "timeouts", "refused": "refused", "no_answer": "no_answer"}


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


def score_records(
    records: Sequence[dict],
    eval_set: EvalSet,
    entropy_key: str | None,
    classify: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """Every metric of one eval set from its ``samples.jsonl`` records (``score_samples``),
    with the set's size and sampling, and the count of each grading failure."""
    k = eval_set.settings.num_samples
    groups = [records[i : i + k] for i in range(0, len(records), k)]
    sums = [[r.get("entropy_sum") for r in g] for g in groups]
    counts = [[r.get("entropy_count") or 0 for r in g] for g in groups]
    entropy = pooled_entropy(sums, counts)
    samples = Samples(
        texts=[[r["completion"] for r in g] for g in groups],
        num_tokens=[[r["new_tokens"] for r in g] for g in groups],
        entropy=entropy or 0.0,
        entropy_sums=sums,
        entropy_counts=counts,
    )
    golds = [p.gold for p in eval_set.problems]
    correct = [[r["correct"] for r in g] for g in groups]
    with warnings.catch_warnings():
        if k == 1:  # one sample per prompt (pass@1 benchmarks): self-BLEU is undefined by design
            warnings.filterwarnings("ignore", "self-BLEU is undefined", UndefinedMetricWarning)
        metrics, _ = score_samples(samples, golds, k, classify, correct=correct, curve=True)
    metrics.pop("sampled_entropy")
    if entropy_key is not None and entropy is not None:  # the backend's own name for it
        metrics[entropy_key] = entropy
    metrics["num_prompts"] = float(len(groups))
    metrics["num_samples"] = float(k)
    metrics["num_scored"] = float(sum(gold is not None for gold in golds))
    metrics["temperature"] = float(eval_set.settings.temperature)
    statuses = [r.get("grading") for r in records]
    for status, key in GRADING_STATUSES.items():
        metrics[f"grading/{key}"] = float(statuses.count(status))
    return metrics
