"""The grid's figures, drawn from its run records (``sedsft.reporting.records``).

Each ``*_figure`` function takes the grid's jobs (and their flat rows) and returns a
matplotlib ``Figure``, or raises :class:`Skip` naming the records it needs when the grid has
none of them (a toy grid has no routes report, a grid without the positions stage no mask
figure). Intervals are Student-t 95% intervals over seeds, as in the grid's summary tables:
a loss with one seed shows its value without a bar.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot): no global state, no GUI
backend, so the command, the tests and the notebook draw the same objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sedsft.reporting import records
from sedsft.reporting.records import Job

Rows = Sequence[dict[str, Any]]
DIFFICULTIES = ("overall", "easy", "hard")  # the routes report's slices
EXPLORE_SLICES = ("all", "easy", "hard")  # the exploration logging's slices
EXPLORE_METRICS = (
    ("reward", "mean reward"),
    ("any_correct", "groups with a correct sample"),
    ("all_equal", "groups with equal rewards"),
)
POSITION_KINDS = ("style", "text", "number")


class Skip(Exception):  # noqa: N818 (a figure left out is not an error)
    """A figure whose inputs the grid does not hold; the message says which."""


def _colours(order: Sequence[str]) -> dict[str, str]:
    return {loss: f"C{i}" for i, loss in enumerate(order)}


def _err(half: float) -> float:
    return 0.0 if math.isnan(half) else half


def _yerr(means: Sequence[float], halves: Sequence[float], low: float = 0.0, high: float = 1.0) -> list[list[float]]:
    """Asymmetric error bars of ``mean ± half`` cut to ``[low, high]``: a share or a pass rate
    cannot leave [0, 1], and two seeds' t-interval (t = 12.7) often would."""
    return [[min(_err(h), m - low) for m, h in zip(means, halves, strict=True)],
            [min(_err(h), high - m) for m, h in zip(means, halves, strict=True)]]  # fmt: skip


def _legend(fig: Figure, ax) -> None:
    """One legend for the figure, below its panels, from ``ax``'s labelled artists."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9)


def _losses(table: Rows) -> list[str]:
    return records.loss_order(row["loss"] for row in table)


def _figure(nrows: int, ncols: int, width: float, height: float, title: str, note: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(max(width * ncols, 8.5), height * nrows + 0.9), layout="constrained")  # room for the title and its note
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.suptitle(f"{title}\n{note}", fontsize=11)
    return fig, axes


def _seeds_note(jobs: int, seeds: Sequence[int], what: str = "bars") -> str:
    return f"{jobs} jobs, seeds {sorted(set(seeds))}; {what}: 95% t-interval over seeds, cut to the metric's range"


def _note(table: Rows, what: str = "bars") -> str:
    return _seeds_note(len(table), [row["seed"] for row in table], what)


def _jobs_note(jobs: Sequence[Job], what: str = "band") -> str:
    return _seeds_note(len(jobs), [job.seed for job in jobs], what)


# --- (a) diversity against accuracy after SFT ---


def diversity_figure(table: Rows) -> Figure:
    """Diversity against pass@1 of the SFT policy, one small point per job and the mean with
    95% intervals on both axes per loss. Held-out samples of the RL stage's first evaluation
    (before any update) when there is one, else the SFT run's own generation evaluation."""
    chosen = _diversity_source(table)
    if chosen is None:
        raise Skip("no diversity and pass@1 after SFT (rl/metrics.json heldout_before/* or sft/metrics.json gen/*)")
    accuracy, diversity, label, source = chosen
    fig, axes = _figure(1, 1, 6.4, 4.6, f"Diversity against accuracy after SFT ({source})", _note(table, "bars"))
    ax = axes[0][0]
    order = _losses(table)
    colours = _colours(order)
    for loss in order:
        xs, ys = records.values(table, diversity, loss), records.values(table, accuracy, loss)
        seeds = sorted(set(xs) & set(ys))
        ax.scatter([xs[s] for s in seeds], [ys[s] for s in seeds], color=colours[loss], alpha=0.35, s=20)
        (mx, hx, n), (my, hy, _) = records.loss_interval(table, diversity, loss), records.loss_interval(table, accuracy, loss)
        ax.errorbar(mx, my, xerr=_yerr([mx], [hx], 0.0, math.inf), yerr=_yerr([my], [hy]), color=colours[loss], marker="o",
                    markersize=8, markeredgecolor="k", capsize=3, label=f"{loss} mean (n={n})")  # fmt: skip
    ax.set_xlabel(f"{label}, after SFT")
    ax.set_ylabel("pass@1, after SFT")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    _legend(fig, ax)
    return fig


def _diversity_source(table: Rows) -> tuple[str, str, str, str] | None:
    """``(pass@1 key, diversity key, axis label, source)`` of the SFT policy's samples: the
    RL stage's held-out evaluation before its first update (same prompts and sampling as
    after RL) when the grid ran it, else the SFT run's generation evaluation; the route
    entropy where samples were classified, else distinct-4."""
    for prefix, source in (("rl/heldout_before/", "held-out, before RL"), ("sft/gen/", "SFT generation eval")):
        for key, label in (("label_entropy", "entropy of the sampled routes (toy: styles), nats"), ("distinct_4", "distinct-4")):
            if records.has(table, f"{prefix}pass@1") and records.has(table, prefix + key):
                return f"{prefix}pass@1", prefix + key, label, source
    return None


# --- (b) pass@k before and after RL ---


def pass_at_k_figure(table: Rows) -> Figure:
    """pass@k for every recorded k, SFT policy (dashed) and RL policy (solid) per loss, with
    95% intervals over seeds. Routes grids: the routes report, one panel per difficulty
    (overall, easy, hard); other grids: the RL stage's held-out evaluation."""
    if records.pass_at_k(table, "routes/sft/overall/"):
        panels = [(d, f"routes/sft/{d}/", f"routes/rl/{d}/") for d in DIFFICULTIES if records.pass_at_k(table, f"routes/sft/{d}/")]
        source = "routes report, held-out"
    elif records.pass_at_k(table, "rl/heldout_before/"):
        panels = [("held-out", "rl/heldout_before/", "rl/heldout/")]
        source = "RL stage's held-out evaluation"
    else:
        raise Skip("no pass@k (routes/metrics.json <sft|rl>/<difficulty>/pass@k or rl/metrics.json heldout*/pass@k)")
    order = _losses(table)
    colours = _colours(order)
    fig, axes = _figure(1, len(panels), 4.6, 4.0, f"pass@k before (SFT policy, dashed) and after RL (solid), {source}", _note(table))
    for ax, (name, before, after) in zip(axes[0], panels, strict=True):
        ks = records.pass_at_k(table, before)
        series = [(loss, prefix, style, when) for loss in order for prefix, style, when in ((before, "--", "SFT"), (after, "-", "RL"))]
        for index, (loss, prefix, style, when) in enumerate(series):
            points = [(k, *records.loss_interval(table, f"{prefix}pass@{k}", loss)) for k in ks]
            points = [p for p in points if p[3] > 0]
            dodge = 2 ** (0.03 * (index - (len(series) - 1) / 2))  # side by side on the log axis: bars stay apart
            if points:
                ax.errorbar([p[0] * dodge for p in points], [p[1] for p in points], yerr=_yerr([p[1] for p in points], [p[2] for p in points]),
                            color=colours[loss], linestyle=style, marker="o" if when == "RL" else "s",
                            markerfacecolor=colours[loss] if when == "RL" else "none", capsize=2, elinewidth=0.8,
                            label=f"{loss}, {when}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (samples per prompt)")
        ax.set_ylabel("pass@k")
        ax.set_title(name)
        ax.set_ylim(0, 1.02)
    _legend(fig, axes[0][0])
    return fig


# --- (c) curves over RL steps ---


def _curve(ax, jobs: Sequence[Job], tag: str, order: Sequence[str], fill_zero_with: str | None = None) -> bool:
    """Mean over seeds and 95% band of one scalar per loss on ``ax``; returns whether any was
    drawn. ``fill_zero_with``: a tag logged at every point of the curve, where ``tag``
    missing means 0 (a route no completion of the rollout batch took)."""
    colours = _colours(order)
    curves = records.scalar_curves(jobs, tag)
    if fill_zero_with is not None:
        seen = {(c["loss"], c["seed"], c["step"]) for c in curves}
        curves += [{**c, "value": 0.0} for c in records.scalar_curves(jobs, fill_zero_with) if (c["loss"], c["seed"], c["step"]) not in seen]
    drawn = False
    for loss in order:
        points = records.band(curves, loss)
        if not points:
            continue
        steps, means = [p[0] for p in points], [p[1] for p in points]
        low = [max(m - _err(h), 0.0) for _, m, h, _ in points]  # every curve here is a share or a 0/1 reward
        high = [min(m + _err(h), 1.0) for _, m, h, _ in points]
        seeds = max(p[3] for p in points)
        ax.plot(steps, means, color=colours[loss], marker=".", label=f"{loss} (n={seeds})")
        ax.fill_between(steps, low, high, color=colours[loss], alpha=0.2, linewidth=0)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates are whole numbers
    return drawn


def reward_figure(jobs: Sequence[Job]) -> Figure:
    """The RL reward (mean over each rollout batch) over GRPO updates per loss: the mean over
    seeds and its 95% band (``rl/reward`` in each job's ``rl/tensorboard``)."""
    order = records.loss_order(j.loss for j in jobs)
    fig, axes = _figure(1, 1, 6.4, 4.0, "Reward during RL per loss (mean over seeds)", _jobs_note(jobs))
    ax = axes[0][0]
    if not _curve(ax, jobs, "rl/reward", order):
        raise Skip("no RL reward curve (TensorBoard scalar rl/reward under <job>/rl/tensorboard)")
    ax.set_xlabel("GRPO update")
    ax.set_ylabel("reward (share of correct completions)")
    ax.set_ylim(-0.01, min(1.02, ax.get_ylim()[1]))  # a small reward stays readable
    _legend(fig, ax)
    return fig


def exploration_figure(jobs: Sequence[Job]) -> Figure:
    """Exploration over RL updates (``sedsft.rl.exploration``): per slice of prompts (all,
    easy, hard) the mean reward, the share of groups with at least one correct completion
    and the share with all rewards equal (no learning signal), per loss."""
    order = records.loss_order(j.loss for j in jobs)
    slices = [s for s in EXPLORE_SLICES if records.scalar_tags(jobs, f"rl/explore/{s}/reward")]
    if not slices:
        raise Skip("no exploration curves (TensorBoard rl/explore/<all|easy|hard>/* of experiment=rl_routes)")
    fig, axes = _figure(len(EXPLORE_METRICS), len(slices), 4.2, 2.8, "Exploration during RL per slice of prompts (mean over seeds)", _jobs_note(jobs))
    for col, name in enumerate(slices):
        for row, (metric, label) in enumerate(EXPLORE_METRICS):
            ax = axes[row][col]
            _curve(ax, jobs, f"rl/explore/{name}/{metric}", order)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(label)
            ax.set_title(f"{name} prompts", fontsize=10)
            ax.set_xlabel("GRPO update")
    _legend(fig, axes[0][0])
    return fig


def route_curves_figure(jobs: Sequence[Job]) -> Figure:
    """The share of each route among the rollout completions over RL updates, per slice of
    prompts and loss (``rl/explore/<slice>/route/<route>``; a route absent from a rollout
    batch counts 0 there)."""
    order = records.loss_order(j.loss for j in jobs)
    slices = [s for s in ("easy", "hard") if records.scalar_tags(jobs, f"rl/explore/{s}/route/")] or (
        ["all"] if records.scalar_tags(jobs, "rl/explore/all/route/") else []
    )
    if not slices:
        raise Skip("no route shares over RL (TensorBoard rl/explore/<slice>/route/<route> of experiment=rl_routes)")
    routes = _routes({t.rsplit("/", 1)[1] for s in slices for t in records.scalar_tags(jobs, f"rl/explore/{s}/route/")})
    fig, axes = _figure(len(slices), len(routes), 3.4, 2.8, "Route shares of rollout completions during RL (mean over seeds)", _jobs_note(jobs))
    for row, name in enumerate(slices):
        for col, route in enumerate(routes):
            ax = axes[row][col]
            _curve(ax, jobs, f"rl/explore/{name}/route/{route}", order, fill_zero_with=f"rl/explore/{name}/groups")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{route}, {name} prompts", fontsize=10)
            ax.set_xlabel("GRPO update")
            ax.set_ylabel("share of completions" if col == 0 else "")
    _legend(fig, axes[0][0])
    return fig


def _routes(found: set[str]) -> list[str]:
    """Routes in the task's order, ``other`` last."""
    from sedsft.data.toy_routes import ROUTES

    return [r for r in ROUTES if r in found] + sorted(found - set(ROUTES) - {"other"}) + (["other"] if "other" in found else [])


# --- (d) route shares before and after RL ---


def _bars(ax, table: Rows, groups: Sequence[str], order: Sequence[str], key) -> None:
    """Bars of ``key(group)`` per loss, one bar per group (the first hatched: before RL),
    with 95% intervals."""
    colours = _colours(order)
    width = 0.8 / len(groups)
    for i, loss in enumerate(order):
        for j, group in enumerate(groups):
            mean, half, n = records.loss_interval(table, key(group), loss)
            if n == 0:
                continue
            ax.bar(i + (j - (len(groups) - 1) / 2) * width, mean, width, yerr=_yerr([mean], [half]), capsize=3,
                   color=colours[loss], alpha=0.45 if j == 0 and len(groups) > 1 else 0.9,
                   hatch="//" if j == 0 and len(groups) > 1 else None, edgecolor="k", linewidth=0.5)  # fmt: skip
    ax.set_xticks(range(len(order)), order)


def route_shares_figure(table: Rows) -> Figure:
    """The share of each route among free samples of the SFT policy (hatched) and the RL
    policy (solid), per difficulty and loss, with 95% intervals (the routes report)."""
    prefix = "routes/sft/"
    found = {k.split("/route_frac/")[1] for k in records.keys_matching(table, prefix) if "/route_frac/" in k}
    if not found:
        raise Skip("no route shares (routes/metrics.json <sft|rl>/<difficulty>/route_frac/<route>: the routes stage)")
    routes = _routes(found)
    slices = [d for d in ("easy", "hard") if records.has(table, f"routes/sft/{d}/route_frac/{routes[0]}")]
    order = _losses(table)
    fig, axes = _figure(len(slices), len(routes), 2.9, 2.8, "Route shares of held-out samples: SFT policy (hatched, left) and RL policy (solid, right)", _note(table))
    for row, name in enumerate(slices):
        for col, route in enumerate(routes):
            ax = axes[row][col]
            _bars(ax, table, ["routes/sft/", "routes/rl/"], order,
                  lambda p, name=name, route=route: f"{p}{name}/route_frac/{route}")  # fmt: skip
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{route}, {name}", fontsize=10)
            ax.set_ylabel("share of samples" if col == 0 else "")
            ax.tick_params(axis="x", labelsize=8)
    return fig


# --- (e) where SED's mask falls ---


def positions_figure(table: Rows) -> Figure:
    """SED's mask rate and the model's top-1 accuracy per kind of position (style word,
    template text, number) on held-out solutions, for the base model and each loss's SFT
    model (the positions stage, tau as the report's loss fixes or calibrates it)."""
    if not records.has(table, "positions/sft/mask_rate/style"):
        raise Skip("no position report (positions/metrics.json sft/mask_rate/<kind>: the positions stage on toy data)")
    base = {}
    for row in table:  # one base per seed: the job's base model before SFT
        if "positions/base/mask_rate/style" in row:
            base.setdefault(row["seed"], {**row, "loss": "base"})
    rows = [*base.values(), *table]
    order = ["base", *_losses(table)]
    fig, axes = _figure(1, 2, 5.2, 3.6, "Where SED's mask falls: held-out solutions per kind of position", _note(table))
    for ax, metric, label in ((axes[0][0], "mask_rate", "share of positions masked"), (axes[0][1], "top1_acc", "top-1 accuracy")):
        colours = _colours(order)
        width = 0.8 / len(order)
        for i, kind in enumerate(POSITION_KINDS):
            for j, loss in enumerate(order):
                stage = "positions/base/" if loss == "base" else "positions/sft/"
                mean, half, n = records.loss_interval(rows, f"{stage}{metric}/{kind}", loss)
                if n:
                    ax.bar(i + (j - (len(order) - 1) / 2) * width, mean, width, yerr=_yerr([mean], [half]), capsize=3, color=colours[loss],
                           edgecolor="k", linewidth=0.5, label=loss if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(POSITION_KINDS)), POSITION_KINDS)
        ax.set_xlabel("kind of position")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
    _legend(fig, axes[0][0])
    return fig


# name -> (function, what it reads: "rows" or "jobs")
FIGURES = {
    "diversity_vs_accuracy": (diversity_figure, "rows"),
    "pass_at_k": (pass_at_k_figure, "rows"),
    "rl_reward": (reward_figure, "jobs"),
    "rl_exploration": (exploration_figure, "jobs"),
    "rl_route_shares": (route_curves_figure, "jobs"),
    "route_shares": (route_shares_figure, "rows"),
    "mask_positions": (positions_figure, "rows"),
}


def draw(name: str, jobs: Sequence[Job]) -> Figure:
    """The figure ``name`` of the grid's ``jobs`` (raises :class:`Skip` without its inputs)."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {list(FIGURES)}")
    function, reads = FIGURES[name]
    return function(jobs if reads == "jobs" else records.rows(jobs))
