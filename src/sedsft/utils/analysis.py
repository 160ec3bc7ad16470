"""Collect the runs of a Hydra multirun for tables and plots (used by notebooks/).

A run directory holds ``metrics.json`` (written by ``train``) and ``.hydra/config.yaml``;
TensorBoard events (with validation histograms) sit under ``tensorboard/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

CHOICE_COLUMNS = ("experiment", "loss", "model", "data")  # Hydra group choices of the run
CONFIG_COLUMNS = {  # column -> dotted config key
    "seed": "seed",
    "lam": "loss.lam",
    "top_k": "loss.top_k",
    "beta": "loss.beta",
}
# The headline numbers of a run, in table order ({k}: the largest k of the logged pass@k):
# the notebook's table and the table a training run prints at its end.
ACCURACY = ("gen/pass@1", "gen/pass@{k}", "gen/avg@{k}")
DIVERSITY = (
    "gen/distinct_2",
    "gen/distinct_4",
    "gen/self_bleu",
    "gen/sampled_entropy",
    "gen/label_entropy",
    "gen/labels_per_prompt",
    "gen/label_frac/step_by_step",
)
TRAINING = ("val/loss", "val/entropy", "val/top1_acc", "val/mask_frac", "calibration/tau", "test/loss")


def samples_per_prompt(names: Iterable[str]) -> int | None:
    """The k of ``gen/pass@k`` (the largest logged), or None when no run sampled."""
    ks = [int(m.group(1)) for name in names if (m := re.fullmatch(r"gen/pass@(\d+)", name))]
    return max(ks) if ks else None


def headline_metrics(names: Iterable[str], groups: Sequence[Sequence[str]] = (ACCURACY, DIVERSITY, TRAINING)) -> list[str]:
    """The headline metrics among ``names``, in table order; those not logged (no
    generation eval, CE's mask_frac, a run stopped before validating) are left out."""
    names = set(names)
    k = samples_per_prompt(names)
    wanted = [m.format(k=k) for group in groups for m in group if k is not None or "{k}" not in m]
    return list(dict.fromkeys(m for m in wanted if m in names))


def run_dirs(root: str | Path) -> list[Path]:
    """Every directory below ``root`` (itself included) that holds a ``metrics.json``."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / ".hydra" / "config.yaml").exists())


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run: its config columns (loss, seed, knobs) and every metric."""
    rows = []
    for run in run_dirs(root):
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        row = {"run": str(run.relative_to(root)) if run != Path(root) else "."}
        hydra_file = run / ".hydra" / "hydra.yaml"
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices if hydra_file.exists() else {}
        for column in CHOICE_COLUMNS:
            row[column] = choices.get(column)
        if row["loss"] is None:
            row["loss"] = OmegaConf.select(cfg, "loss.name", default=None)
        for column, key in CONFIG_COLUMNS.items():
            row[column] = OmegaConf.select(cfg, key, default=None)
        row.update(json.loads((run / "metrics.json").read_text()))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no run with metrics.json and .hydra/config.yaml under {root}")
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, metrics: Sequence[str], by: str | Sequence[str] = "loss") -> pd.DataFrame:
    """``mean ± std`` over seeds of each metric, one row per group, plus the run count.

    The std is the sample standard deviation (ddof=1); with one run it is shown as 0. A
    metric a group does not log (``mask_frac`` of CE) is shown as ``-``.
    """
    present = [m for m in metrics if m in df.columns]
    grouped = df.groupby(by, sort=True)
    out = pd.DataFrame(index=grouped.size().index)
    out["runs"] = grouped.size()
    for metric in present:
        mean, std = grouped[metric].mean(), grouped[metric].std(ddof=1).fillna(0.0)
        out[metric] = [
            "-" if np.isnan(m) else f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std, strict=True)
        ]
    return out


def mean_std(df: pd.DataFrame, metric: str, by: str = "loss") -> pd.DataFrame:
    """Numeric mean and std of one metric per group (for plots)."""
    grouped = df.groupby(by)[metric]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0)})


def read_histograms(run: str | Path, tag: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(step, bucket right edges, counts)`` of a TensorBoard histogram tag, per step."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    out = []
    for events in sorted(Path(run).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={HISTOGRAMS: 0})
        accumulator.Reload()
        if tag not in accumulator.Tags().get("histograms", []):
            continue
        for event in accumulator.Histograms(tag):
            value = event.histogram_value
            out.append((event.step, np.asarray(value.bucket_limit), np.asarray(value.bucket)))
    return sorted(out, key=lambda item: item[0])
