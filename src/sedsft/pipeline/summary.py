"""Tables across the jobs of a pipeline grid: mean and 95% interval per loss, and paired
differences to a reference loss (CE) by seed.

The interval is Student's t over seeds (``mean ± t_{0.975, n-1} * sd / sqrt(n)``); the
paired difference of loss L to CE pairs the two runs that share a seed, which removes the
seed's own effect (data order, sampling) from the comparison.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from scipy import stats

log = logging.getLogger(__name__)

# (stage, metric in that stage's metrics.json, column name in the tables)
DEFAULT_METRICS: tuple[tuple[str, str, str], ...] = (
    ("rl", "heldout_before/pass@1", "pass@1"),
    ("rl", "heldout_before/pass@8", "pass@8"),
    ("rl", "heldout_before/distinct_4", "distinct_4"),
    ("rl", "heldout_before/self_bleu", "self_bleu"),
    ("rl", "heldout_before/label_entropy", "style_entropy"),
    ("rl", "heldout/pass@1", "pass@1"),
    ("rl", "heldout/pass@8", "pass@8"),
    ("rl", "heldout/distinct_4", "distinct_4"),
    ("rl", "heldout/self_bleu", "self_bleu"),
    ("rl", "heldout/label_entropy", "style_entropy"),
)


# Columns of the position table (the ``positions`` stage, toy data): SED's mask rate and the
# model's top-1 accuracy per kind of position, tau calibrated on the base as SED does.
POSITION_METRICS: tuple[tuple[str, str], ...] = (
    ("mask_rate/style", "mask style"),
    ("mask_rate/text", "mask text"),
    ("mask_rate/number", "mask number"),
    ("top1_acc/style", "top1 style"),
    ("top1_acc/text", "top1 text"),
    ("top1_acc/number", "top1 number"),
    ("p_target/number", "p(number)"),
)


# Columns of the routes table (the ``routes`` stage, routes task): held-out pass@1 per
# difficulty and the share of the working route on hard prompts, before (sft/) and after (rl/) RL.
ROUTES_METRICS: tuple[tuple[str, str], ...] = (
    ("sft/hard/pass@1", "hard pass@1 SFT"),
    ("rl/hard/pass@1", "hard pass@1 RL"),
    ("sft/overall/pass@1", "pass@1 SFT"),
    ("rl/overall/pass@1", "pass@1 RL"),
    ("sft/easy/pass@1", "easy pass@1 SFT"),
    ("rl/easy/pass@1", "easy pass@1 RL"),
    ("sft/hard/pass@16", "hard pass@16 SFT"),
    ("rl/hard/pass@16", "hard pass@16 RL"),
    ("sft/hard/route_frac/net_change", "hard net_change SFT"),
    ("rl/hard/route_frac/net_change", "hard net_change RL"),
)


def eval_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """Columns of the benchmarks table (the ``eval`` stage: ``eval/<policy>/<benchmark>/<metric>``):
    per benchmark, pass@1 and pass@k at the largest k sampled, after SFT and after RL, named
    ``<benchmark> pass@<k> SFT|RL``."""
    found: dict[str, dict[int, set[str]]] = {}
    for column in df.columns:
        parts = column.split("/")
        if len(parts) == 4 and parts[0] == "eval" and parts[1] in ("sft", "rl") and parts[3].startswith("pass@"):
            k = parts[3][len("pass@"):]
            if k.isdigit():
                found.setdefault(parts[2], {}).setdefault(int(k), set()).add(parts[1])
    chosen = []
    for benchmark, ks in found.items():
        for k in sorted({1, max(ks)} & set(ks)):
            chosen += [(f"eval/{p}/{benchmark}/pass@{k}", f"{benchmark} pass@{k} {p.upper()}") for p in ("sft", "rl") if p in ks[k]]
    return chosen


def collect(root: str | Path) -> pd.DataFrame:
    """One row per finished job below ``root``: loss, seed and every stage metric as
    ``<stage>/<key>`` columns."""
    rows = []
    for path in sorted(Path(root).rglob("pipeline.json")):
        record = json.loads(path.read_text())
        row: dict[str, Any] = {"job": str(path.parent), "loss": record["loss"], "seed": record["seed"]}
        for stage, metrics in record["metrics"].items():
            row.update({f"{stage}/{k}": v for k, v in metrics.items()})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no pipeline.json below {root}: has any job finished?")
    return pd.DataFrame(rows)


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half width, n)`` of a Student-t interval over the finite ``values``; the
    half width is NaN with fewer than two values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return float(x.mean()), half, n


def per_loss(df: pd.DataFrame, columns: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """``mean``, ``half`` and ``n`` of each column per loss (a long table)."""
    rows = []
    for loss, group in df.groupby("loss", sort=False):
        for column in columns:
            if column in group:
                mean, half, n = interval(group[column].tolist(), level)
                rows.append({"loss": loss, "metric": column, "mean": mean, "half": half, "n": n})
    return pd.DataFrame(rows)


def paired(df: pd.DataFrame, columns: Sequence[str], reference: str = "ce", level: float = 0.95) -> pd.DataFrame:
    """``loss - reference`` per seed for each column: mean, half width and seed count."""
    ref = df[df["loss"] == reference].set_index("seed")
    rows = []
    for loss, group in df[df["loss"] != reference].groupby("loss", sort=False):
        group = group.set_index("seed")
        seeds = sorted(set(group.index) & set(ref.index))
        for column in columns:
            if column in group and column in ref:
                diffs = [float(group.at[s, column]) - float(ref.at[s, column]) for s in seeds]
                mean, half, n = interval(diffs, level)
                rows.append({"loss": loss, "metric": column, "mean": mean, "half": half, "n": n})
    return pd.DataFrame(rows)


def _cell(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def wide(long: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """The long table as one row per loss and one ``mean ± half`` column per metric."""
    if long.empty:
        return pd.DataFrame()
    cells = long.assign(cell=[_cell(m, h) for m, h in zip(long["mean"], long["half"], strict=True)])
    table = cells.pivot(index="loss", columns="metric", values="cell")
    counts = long.groupby("loss")["n"].max()
    table.insert(0, "seeds", counts)
    if order:
        table = table.reindex([o for o in order if o in table.index] + [i for i in table.index if i not in order])
    columns = ["seeds"] + [c for c in dict.fromkeys(long["metric"]) if c in table.columns]
    return table[columns]


def position_frame(df: pd.DataFrame) -> pd.DataFrame | None:
    """The position statistics as one row per SFT job plus one ``loss="base"`` row per seed
    (the model before SFT), columns named as in ``POSITION_METRICS``; None without them."""
    sft = {f"positions/sft/{key}": label for key, label in POSITION_METRICS}
    if not any(column in df for column in sft):
        return None
    base = {f"positions/base/{key}": label for key, label in POSITION_METRICS}
    tuned = df.rename(columns=sft)[["loss", "seed", *[c for c in sft.values() if c in df.rename(columns=sft)]]]
    before = df.drop_duplicates("seed").rename(columns=base).assign(loss="base")
    before = before[["loss", "seed", *[c for c in base.values() if c in before]]]
    return pd.concat([before, tuned], ignore_index=True)


def summary_tables(
    df: pd.DataFrame,
    metrics: Sequence[tuple[str, str, str]] = DEFAULT_METRICS,
    reference: str = "ce",
    order: Sequence[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Tables ``after_sft``, ``after_rl`` (mean ± 95% interval per loss), ``positions`` (mask
    rate and accuracy per kind of position, the base model as row ``base``), ``routes`` (the
    routes task's report, when the grid ran that stage), ``benchmarks`` (the eval stage's) and ``*_vs_ref`` (paired differences
    to ``reference`` by seed)."""
    out: dict[str, pd.DataFrame] = {}

    def add(name: str, columns: Sequence[tuple[str, str]]) -> None:
        """Table ``name`` of ``columns`` (record column, label) and its paired differences."""
        renamed = df.rename(columns=dict(columns))
        labels = [label for _, label in columns]
        out[name] = wide(per_loss(renamed, labels), order)
        if reference in set(df["loss"]):
            out[f"{name}_vs_{reference}"] = wide(paired(renamed, labels, reference), order)

    for name, prefix in (("after_sft", "heldout_before/"), ("after_rl", "heldout/")):
        add(name, [(f"{stage}/{key}", label) for stage, key, label in metrics if key.startswith(prefix)])
    routes = [(f"routes/{key}", label) for key, label in ROUTES_METRICS if f"routes/{key}" in df.columns]
    if routes:
        add("routes", routes)
    benchmarks = eval_columns(df)
    if benchmarks:
        add("benchmarks", benchmarks)
    positions = position_frame(df)
    if positions is not None:
        labels = [label for _, label in POSITION_METRICS]
        out["positions"] = wide(per_loss(positions, labels), ["base", *(order or [])])
        if reference in set(df["loss"]):
            out[f"positions_vs_{reference}"] = wide(
                paired(positions[positions["loss"] != "base"], labels, reference), order
            )
    return out


def write_summary(root: str | Path, reference: str = "ce", order: Sequence[str] | None = None) -> str:
    """Write ``summary.md`` and ``summary.json`` into ``root``; returns the markdown."""
    root = Path(root)
    df = collect(root)
    tables = summary_tables(df, reference=reference, order=order)
    parts = [f"# Pipeline grid: {len(df)} jobs, losses {sorted(set(df['loss']))}, seeds {sorted(set(df['seed']))}"]
    titles = {
        "after_sft": "After SFT (held-out, mean ± 95% t-interval over seeds)",
        "after_rl": "After RL",
        f"after_sft_vs_{reference}": f"After SFT, paired difference to {reference} by seed",
        f"after_rl_vs_{reference}": f"After RL, paired difference to {reference} by seed",
        "positions": "Where the mask falls: SED's mask rate (tau calibrated on the base) and top-1 accuracy per position kind, held-out solutions",
        f"positions_vs_{reference}": f"Positions, paired difference to {reference} by seed",
        "routes": "Routes task: held-out pass@1 per difficulty and the working route's share of hard samples, SFT and RL policy",
        f"routes_vs_{reference}": f"Routes task, paired difference to {reference} by seed",
        "benchmarks": "Benchmarks (eval stage): pass@1 and pass@k at the largest k, SFT and RL policy",
        f"benchmarks_vs_{reference}": f"Benchmarks, paired difference to {reference} by seed",
    }
    for name, table in tables.items():
        if not table.empty:
            parts.append(f"## {titles[name]}\n\n{table.to_markdown()}")
    text = "\n\n".join(parts) + "\n"
    (root / "summary.md").write_text(text)
    (root / "summary.json").write_text(df.to_json(orient="records", indent=2))
    return text


class SummaryCallback(Callback):
    """Hydra callback: writes the grid's summary into the sweep directory when a multirun
    ends (on the submitting machine, after every launcher job has returned)."""

    def __init__(self, reference: str = "ce", order: Sequence[str] | None = None):
        self.reference, self.order = reference, list(order) if order else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            text = write_summary(root, self.reference, self.order)
        except FileNotFoundError as err:
            log.warning("no summary: %s", err)
            return
        print(text)
        log.info("wrote %s", root / "summary.md")
