"""The tables and files an evaluation run ends with.

A benchmark run: ``<run>/<name>/metrics.json`` per benchmark, ``<run>/metrics.json`` with
every number of the printed tables (Table 1's layout, diversity, pass@k curves) and
``<run>/table.md`` the tables. A ``data=`` run: one flat ``<run>/metrics.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sedsft.evaluation.benchmarks import BenchmarkSpec
from sedsft.evaluation.eval_sets import EvalSet
from sedsft.evaluation.evaluate import pass_at_k_curve
from sedsft.evaluation.records import GradingSettings
from sedsft.utils import console


def write_set_metrics(directory: Path, eval_set: EvalSet, metrics: dict[str, float]) -> None:
    """A benchmark's own ``metrics.json``, written as soon as it is scored."""
    if eval_set.spec is not None:
        (directory / "metrics.json").write_text(
            to_json({**dict(sorted(metrics.items())), "source": eval_set.spec.source})
        )


def report_data_set(
    output_dir: Path, ckpt: str, eval_set: EvalSet, metrics: dict[str, float]
) -> dict[str, float]:
    """The flat ``metrics.json`` of a ``data=`` run, and its table on the console."""
    (output_dir / "metrics.json").write_text(to_json(dict(sorted(metrics.items()))))
    count, k = int(metrics["num_prompts"]), eval_set.settings.num_samples
    title = f"{ckpt}: {count} prompts x {k} samples"
    print(f"\n{console.format_table(dict(sorted(metrics.items())), title)}", flush=True)
    print(
        f"all metrics: {output_dir / 'metrics.json'}; samples: {output_dir / 'samples.jsonl'}\n{console.METRIC_KEY}"
    )
    return metrics


def report_benchmarks(
    output_dir: Path,
    run: dict[str, Any],
    specs: Sequence[BenchmarkSpec],
    results: dict[str, dict[str, float]],
    grading: GradingSettings,
) -> dict[str, Any]:
    """``metrics.json`` and ``table.md`` of a benchmark run, and the tables on the console.
    ``run``: ``ckpt``, ``label`` and ``backend``, as the summary names them."""
    text, numbers = results_tables(run["label"], specs, results, grading)
    summary = {
        **run,
        "grading": asdict(grading),
        **numbers,
        "benchmarks": {s.name: {**results[s.name], "source": s.source} for s in specs},
    }
    (output_dir / "metrics.json").write_text(to_json(summary))
    (output_dir / "table.md").write_text(text + "\n")
    print(f"\n{text}\n", flush=True)
    print(
        f"all metrics: {output_dir / 'metrics.json'}; table: {output_dir / 'table.md'}\n{console.METRIC_KEY}"
    )
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_value(spec: BenchmarkSpec, metrics: dict[str, float]) -> tuple[str, float | None]:
    """The metric the paper reports for ``spec`` (its ``avg@k`` with k = the samples drawn,
    or ``pass@1``) and its value in percent (None: no gold answers)."""
    kind = spec.metric.split("@")[0]
    key = f"avg@{int(metrics['num_samples'])}" if kind == "avg" else spec.metric
    value = metrics.get(key)
    return key, None if value is None else 100.0 * value


def estimator(key: str, metrics: dict[str, float]) -> str:
    """The name of a table column's estimator, as a reader needs it: ``Avg@8 (T=1)``,
    ``greedy pass@1``, ``pass@1 (1 sample, T=1)``, ``pass@1 (mean of 8 samples, T=1)`` (the
    unbiased estimator over n samples)."""
    n, temperature = int(metrics["num_samples"]), metrics.get("temperature")
    at = "" if temperature is None else f", T={temperature:g}"
    if key.startswith("avg@"):
        return f"Avg@{n}" + (f" (T={temperature:g})" if temperature is not None else "")
    if key == "pass@1" and temperature == 0:
        return "greedy pass@1"
    if key == "pass@1":
        return f"pass@1 ({'1 sample' if n == 1 else f'mean of {n} samples'}{at})"
    return key


def results_tables(
    label: str,
    specs: Sequence[BenchmarkSpec],
    results: dict[str, dict[str, float]],
    grading: GradingSettings | None = None,
) -> tuple[str, dict]:
    """Markdown tables (Table 1's layout; diversity; pass@k curves) and the numbers of the
    first, for ``metrics.json``."""
    table, columns = {}, {}
    for spec in specs:
        key, value = table_value(spec, results[spec.name])
        table[spec.name], columns[spec.name] = value, {"title": spec.title, "metric": key}
    present = [v for v in table.values() if v is not None]
    table["average"] = sum(present) / len(present) if present else None
    by_metric: dict[str, list[str]] = {}
    for spec in specs:
        name = estimator(columns[spec.name]["metric"], results[spec.name])
        columns[spec.name]["estimator"] = name
        by_metric.setdefault(name, []).append(spec.title)
    head = [
        "Model",
        *(spec.title for spec in specs),
        f"Avg. ({len(present)})" if len(present) != len(specs) else "Avg.",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
        "| "
        + " | ".join([label, *(_fmt(table[s.name]) for s in specs), _fmt(table["average"])])
        + " |",
        "",
        "Accuracy in %; "
        + "; ".join(f"{metric}: {', '.join(titles)}" for metric, titles in by_metric.items())
        + "; Avg. is the mean over the columns.",
        *_grading_notes(specs, results, grading),
        "",
        "| Benchmark | problems | samples | distinct-1 | distinct-2 | distinct-3 | distinct-4 | self-BLEU | entropy | new tokens |",
        "|---|" + "---:|" * 9,
    ]
    for spec in specs:
        m = results[spec.name]
        entropy = next((v for k, v in m.items() if k.startswith("sampled_entropy")), None)
        self_bleu = m["self_bleu"] if m["num_samples"] > 1 else None
        cells = [spec.title, f"{int(m['num_prompts'])}", f"{int(m['num_samples'])}",
                 *(_fmt(m[f"distinct_{n}"], 4) for n in range(1, 5)), _fmt(self_bleu), _fmt(entropy, 4),
                 _fmt(m["mean_new_tokens"], 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    curves = [
        s for s in specs if results[s.name]["num_samples"] > 1 and "pass@1" in results[s.name]
    ]
    if curves:
        ks = sorted(
            {k for s in curves for k in pass_at_k_curve(int(results[s.name]["num_samples"]))}
        )
        lines += [
            "",
            "| pass@k (%) | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for spec in curves:
            m = results[spec.name]
            lines.append(
                "| "
                + " | ".join(
                    [
                        spec.title,
                        *(_fmt(100 * m[f"pass@{k}"]) if f"pass@{k}" in m else "" for k in ks),
                    ]
                )
                + " |"
            )
    return "\n".join(lines), {"table": table, "columns": columns}


def _grading_notes(
    specs: Sequence[BenchmarkSpec],
    results: dict[str, dict[str, float]],
    grading: GradingSettings | None,
) -> list[str]:
    """How answers were graded, problems left out of a column for want of a readable gold,
    and checks that ran past the time limit (graded wrong)."""
    notes = [grading.describe()] if grading is not None else []
    unscored = [
        f"{s.title} {int(m['num_prompts'] - m['num_scored'])} of {int(m['num_prompts'])}"
        for s in specs
        if "num_scored" in (m := results[s.name]) and m["num_scored"] < m["num_prompts"]
    ]
    if unscored:
        notes.append(
            "Problems without a readable gold answer, left out of the column: "
            + "; ".join(unscored)
            + "."
        )
    for key, what in (("timeouts", "past the time limit"), ("refused", "too big to evaluate")):
        counts = [f"{s.title} {int(results[s.name][f'grading/{key}'])}" for s in specs
                  if results[s.name].get(f"grading/{key}")]  # fmt: skip
        if counts:
            notes.append(f"Answers {what} (graded wrong): " + "; ".join(counts) + ".")
    return notes


def to_json(obj: Any) -> str:
    """JSON with undefined values (NaN, e.g. self-BLEU of one sample per prompt) as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False)
