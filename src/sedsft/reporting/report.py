"""The plots command's work: a grid's summary table and figures written into one directory.

``write_report(grid_dir, out_dir)`` reads the grid (``records.read_grid``), writes
``summary.md`` (per loss: mean ± 95% t-interval over seeds and the seed count; the paired
difference of every loss to the reference loss by seed, where both ran the seed) and one
PNG per figure of ``figures.FIGURES`` whose inputs the grid holds; a figure without them is
listed with the reason instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sedsft.reporting import figures, records

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What ``write_report`` wrote: the table's markdown, the PNGs and the figures skipped."""

    markdown: str
    table: Path
    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def summary_markdown(jobs: Sequence[records.Job], reference: str = "ce") -> str:
    """The grid's tables as markdown, by ``sedsft.pipeline.summary.summary_tables`` (the same
    tables as the sweep's own ``summary.md``) on the rows of every job, finished or not."""
    import pandas as pd

    from sedsft.pipeline.summary import summary_tables

    table = records.rows(jobs)
    frame = pd.DataFrame(table)
    order = records.loss_order(frame["loss"])
    tables = summary_tables(frame, reference=reference, order=order)
    seeds = sorted({row["seed"] for row in table})
    parts = [
        f"# Grid summary: {len(table)} jobs, losses {order}, seeds {seeds}",
        "Per loss: mean ± 95% t-interval over seeds (`seeds`: how many jobs recorded the columns). "
        f"`*_vs_{reference}`: the difference to {reference} paired by seed, over the seeds both ran.",
    ]
    for name, frame_ in tables.items():
        if not frame_.empty:
            parts.append(f"## {name}: {_title(name, reference)}\n\n{frame_.to_markdown()}")
    if len(parts) == 2:
        parts.append("No stage metrics to tabulate yet (no rl/ or routes/ or positions/ metrics.json).")
    return "\n\n".join(parts) + "\n"


TITLES = {
    "after_sft": "the SFT policy on held-out prompts (the RL stage's evaluation before its first update)",
    "after_rl": "the RL policy on the same prompts, same sampling",
    "routes": "the routes report: pass@1 per difficulty and the working route's share of hard samples, SFT and RL policy",
    "positions": "where SED's mask falls: mask rate and top-1 accuracy per kind of position (the base model as a row)",
}


def _title(name: str, reference: str) -> str:
    base, _, vs = name.partition(f"_vs_{reference}")
    title = TITLES.get(base, base)
    return f"{title}; difference to {reference} paired by seed" if name.endswith(f"_vs_{reference}") else title


def write_report(
    grid_dir: str | Path,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    reference: str = "ce",
    dpi: int = 120,
) -> Report:
    """Write ``summary.md`` and ``<figure>.png`` for each figure in ``names`` (all by default)
    into ``out_dir``; raises ``records.NotAGridError`` when ``grid_dir`` holds no job."""
    jobs = records.read_grid(grid_dir)
    names = list(figures.FIGURES) if names is None else list(names)
    unknown = [n for n in names if n not in figures.FIGURES]
    if unknown:
        raise ValueError(f"figures={names}: unknown {unknown}; known: {list(figures.FIGURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = summary_markdown(jobs, reference)
    table = out / "summary.md"
    table.write_text(markdown)
    report = Report(markdown, table)
    for name in names:
        try:
            fig = figures.draw(name, jobs)
        except figures.Skip as why:
            report.skipped[name] = str(why)
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        report.written[name] = path
    return report
