"""A pipeline grid's run records, read into plain rows for tables and figures.

A grid is the sweep directory of ``python src/pipeline.py grid=...``: one directory per job
(``ce_seed3``, or ``0``, ``1``, ... in older grids), each holding ``job.json`` (the job's
loss, knobs and seed, written at its first launch), ``<stage>/metrics.json`` for every stage
that finished (``sft``, ``positions``, ``rl``, ``routes``), ``pipeline.json`` once the whole
job finished, and the RL stage's TensorBoard events under ``rl/tensorboard``.

Rows are read from the stage files rather than from ``pipeline.json``, so a grid that is still
running (or was cut) shows every stage that finished. A row is a flat dict: ``job``, ``loss``,
``seed`` and ``<stage>/<metric>`` for each stage metric, the same columns as
``sedsft.pipeline.summary.collect``, so the summary's tables apply to it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sedsft.pipeline.run import STAGES
from sedsft.pipeline.summary import interval

JOB_MARKERS = ("pipeline.json", "job.json")  # what makes a directory a pipeline job
PAPER_ORDER = ("ce", "gem", "dft", "sed_nomask", "sed", "entropy")  # the tables' row order


class NotAGridError(FileNotFoundError):
    """The directory holds no pipeline job: says what was looked for and how a grid is made."""


@dataclass(frozen=True)
class Job:
    """One job directory of a grid: its loss, seed and each finished stage's metrics."""

    path: Path
    loss: str
    seed: int
    metrics: dict[str, dict[str, Any]]  # stage -> its metrics.json

    @property
    def name(self) -> str:
        return self.path.name

    def row(self) -> dict[str, Any]:
        """The flat row: ``job``, ``loss``, ``seed`` and ``<stage>/<metric>``."""
        row: dict[str, Any] = {"job": str(self.path), "loss": self.loss, "seed": self.seed}
        for stage, values in self.metrics.items():
            row.update({f"{stage}/{key}": value for key, value in values.items()})
        return row


def read_job(path: Path) -> Job:
    """The job in ``path``: loss and seed from ``pipeline.json``, else ``job.json``; the
    metrics of every stage that wrote its ``metrics.json``."""
    source = path / "pipeline.json" if (path / "pipeline.json").is_file() else path / "job.json"
    try:
        record = json.loads(source.read_text())
        loss, seed = str(record["loss"]), int(record["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a pipeline job record ({err!r}); expected a JSON object with 'loss' and 'seed'") from None
    metrics = {}
    for stage in STAGES:
        file = path / stage / "metrics.json"
        if file.is_file():
            try:
                metrics[stage] = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: not valid JSON ({err}); rerun the job's {stage} stage or remove the file") from None
    return Job(path, loss, seed, metrics)


def read_grid(root: str | Path) -> list[Job]:
    """Every job below ``root`` (sorted by loss in the paper's order, then seed).

    Raises :class:`NotAGridError` when ``root`` is missing or holds no job directory."""
    root = Path(root)
    if not root.is_dir():
        raise NotAGridError(f"grid_dir={root}: no such directory. Point it at the sweep directory of `python src/pipeline.py grid=...`")
    dirs = sorted({p.parent for marker in JOB_MARKERS for p in root.rglob(marker)})
    if not dirs:
        raise NotAGridError(
            f"grid_dir={root} is not a pipeline grid: no job directory below it (looked for "
            f"{' or '.join('<job>/' + m for m in JOB_MARKERS)}). A grid is the sweep directory of "
            "`python src/pipeline.py grid=routes_claim` (or grid=toy_claim), e.g. logs/pipeline/multiruns/<timestamp>"
        )
    jobs = [read_job(d) for d in dirs]
    order = loss_order(j.loss for j in jobs)
    return sorted(jobs, key=lambda j: (order.index(j.loss), j.seed, j.name))


def loss_order(losses: Iterable[str], first: Sequence[str] = PAPER_ORDER) -> list[str]:
    """The distinct losses, the paper's first (in its order), the rest sorted."""
    present = set(losses)
    return [loss for loss in first if loss in present] + sorted(present - set(first))


def rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One flat row per job (``Job.row``)."""
    return [job.row() for job in jobs]


def values(table: Sequence[dict[str, Any]], key: str, loss: str) -> dict[int, float]:
    """``{seed: value}`` of one column for one loss, finite values only."""
    out = {}
    for row in table:
        value = row.get(key)
        if row["loss"] == loss and isinstance(value, (int, float)) and math.isfinite(value):
            out[int(row["seed"])] = float(value)
    return out


def loss_interval(table: Sequence[dict[str, Any]], key: str, loss: str) -> tuple[float, float, int]:
    """``(mean, 95% half width, n)`` of a column over one loss's seeds (Student t)."""
    return interval(list(values(table, key, loss).values()))


def paired_difference(table: Sequence[dict[str, Any]], key: str, loss: str, reference: str = "ce") -> tuple[float, float, int]:
    """``(mean, 95% half width, n)`` of ``loss - reference`` over the seeds both have."""
    mine, ref = values(table, key, loss), values(table, key, reference)
    return interval([mine[s] - ref[s] for s in sorted(set(mine) & set(ref))])


def has(table: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any job recorded ``key``."""
    return any(key in row for row in table)


def keys_matching(table: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    """The recorded column names that start with ``prefix`` (sorted, by number where they end in one)."""
    found = {key for row in table for key in row if key.startswith(prefix)}
    return sorted(found, key=lambda k: (int(k[len(prefix) :]) if k[len(prefix) :].isdigit() else math.inf, k))


def pass_at_k(table: Sequence[dict[str, Any]], prefix: str) -> list[int]:
    """The k of every ``<prefix>pass@k`` column recorded (e.g. ``routes/sft/hard/``)."""
    return [int(k[len(prefix) + len("pass@") :]) for k in keys_matching(table, f"{prefix}pass@")]


# --- curves over RL steps (TensorBoard) ---


def scalar_curves(jobs: Sequence[Job], tag: str, stage: str = "rl") -> list[dict[str, Any]]:
    """``{"loss", "seed", "step", "value"}`` for every logged point of one TensorBoard scalar
    (``rl/reward``, ``rl/explore/hard/any_correct``, ...) of every job's ``<stage>/tensorboard``."""
    rows_out = []
    for job in jobs:
        for step, value in read_scalars(job.path / stage / "tensorboard").get(tag, []):
            rows_out.append({"loss": job.loss, "seed": job.seed, "step": step, "value": value})
    return rows_out


def scalar_tags(jobs: Sequence[Job], prefix: str, stage: str = "rl") -> list[str]:
    """The TensorBoard scalar tags of the jobs' ``stage`` that start with ``prefix``."""
    return sorted({tag for job in jobs for tag in read_scalars(job.path / stage / "tensorboard") if tag.startswith(prefix)})


_SCALARS: dict[tuple[str, float], dict[str, list[tuple[int, float]]]] = {}


def read_scalars(events: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard events under ``events``, as ``tag -> [(step, value)]``
    (last value per step: a resumed run logs its restart step again). Empty without events;
    read once per directory state."""
    files = sorted(events.rglob("events.out.tfevents.*")) if events.is_dir() else []
    if not files:
        return {}
    stamp = (str(events), max(f.stat().st_mtime for f in files))
    if stamp not in _SCALARS:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        out: dict[str, dict[int, float]] = {}
        for file in files:
            accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                for event in accumulator.Scalars(tag):
                    out.setdefault(tag, {})[int(event.step)] = float(event.value)
        _SCALARS[stamp] = {tag: sorted(points.items()) for tag, points in out.items()}
    return _SCALARS[stamp]


def band(curves: Sequence[dict[str, Any]], loss: str) -> list[tuple[int, float, float, int]]:
    """``(step, mean, 95% half width, seeds)`` of one loss's curves at each logged step: the
    mean over seeds and its t-interval (NaN half width where one seed logged the step)."""
    by_step: dict[int, list[float]] = {}
    for point in curves:
        if point["loss"] == loss:
            by_step.setdefault(int(point["step"]), []).append(float(point["value"]))
    return [(step, *interval(by_step[step])) for step in sorted(by_step)]
