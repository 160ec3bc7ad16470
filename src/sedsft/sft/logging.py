"""Where every number, panel and line of an SFT run goes: one path, one naming scheme.

Keys are ``<split>/<name>`` (``train/loss``, ``val/entropy``, ``gen/pass@1``), loss terms
under ``<split>/loss_terms/<name>``; ``key`` is the only place that spells them.

- Scalars inside Lightning's loops go through ``log_metrics`` -> ``LightningModule.log``:
  Lightning reduces them (token-weighted means, DDP sync) and they reach every logger and
  ``trainer.callback_metrics``, from which the run's ``metrics.json`` is written.
- Scalars measured outside the loops (what the loss prepares before the first step) go through
  ``log_scalars`` straight to the loggers; the caller keeps them for ``metrics.json``.
- Histograms and text panels have no Lightning API: ``log_histogram`` / ``log_text`` write
  them on rank 0 to every logger that can show them (TensorBoard).
- ``log_hparams`` fills TensorBoard's HParams tab at the end of a run: the knobs that tell
  runs apart and the final metrics.

The console (one line per event, a final table) is ``sedsft.utils.console``, shared by every stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sedsft.utils.analysis import headline_metrics

LOSS_TERMS = ("ce", "reg")  # parts of the loss, logged under <split>/loss_terms/
HISTOGRAM_BINS = 64  # equal-width buckets between the smallest and largest value
SAMPLES_TEXT = "gen/samples"  # the text panel of sampled completions


def key(split: str, name: str) -> str:
    """The logged name of metric ``name`` of ``split`` (train, val, test, gen)."""
    return f"{split}/loss_terms/{name}" if name in LOSS_TERMS else f"{split}/{name}"


def histogram_key(split: str, name: str) -> str:
    """``val/entropy_hist``: histogram of a per-token statistic over an evaluation epoch."""
    return f"{split}/{name}_hist"


def logger_step(trainer: L.Trainer) -> int:
    """The step Lightning writes ``module.log`` values at (optimiser steps taken before the
    current batch), so histograms and text line up with the scalars of the same moment."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


# ------------------------------------------------------------------ scalars
def log_metrics(
    module: L.LightningModule,
    split: str,
    values: Mapping[str, Any],
    prog_bar: Iterable[str] = ("loss",),
    metric_attribute: str | None = None,
    **kwargs: Any,
) -> None:
    """``module.log`` each value under ``key(split, name)``.

    Args:
        values: name -> float, tensor or torchmetrics ``Metric`` (logged as Lightning does).
        prog_bar: names also shown in the progress bar.
        metric_attribute: for ``Metric`` values, the attribute path of their container with
            ``{name}`` in it (``means.val.{name}``), so Lightning can checkpoint and reset them.
        kwargs: passed to ``LightningModule.log`` (on_step, on_epoch, batch_size, ...).
    """
    shown = set(prog_bar)
    for name, value in values.items():
        extra = {"metric_attribute": metric_attribute.format(name=name)} if metric_attribute else {}
        module.log(key(split, name), value, prog_bar=name in shown, **extra, **kwargs)


@rank_zero_only
def log_scalars(trainer: L.Trainer, values: Mapping[str, float], step: int | None = None) -> None:
    """Scalars measured outside Lightning's loops (where ``module.log`` is not allowed),
    written to every logger at ``step`` (default: ``logger_step``)."""
    step = logger_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(values), step=step)


# ------------------------------------------------------------------ histograms and text
def _writers(trainer: L.Trainer, method: str) -> list[Any]:
    """The experiment objects of the loggers that have ``method`` (TensorBoard's writer)."""
    return [
        logger.experiment
        for logger in trainer.loggers
        if hasattr(getattr(logger, "experiment", None), method)
    ]


def histogram_bins(values: np.ndarray) -> np.ndarray | str:
    """Equal-width bucket edges over the values' range. TensorBoard's default buckets grow
    by 10% each, which would put every top-k mass above 0.91 into one bucket."""
    lo, hi = float(values.min()), float(values.max())
    return np.linspace(lo, hi, HISTOGRAM_BINS + 1) if hi > lo else "tensorflow"


@rank_zero_only
def log_histogram(
    trainer: L.Trainer, tag: str, values: torch.Tensor | np.ndarray, step: int | None = None
) -> None:
    """A histogram of ``values`` (any shape, flattened) at ``step`` (default: ``logger_step``)."""
    flat = np.asarray(
        values.detach().float().cpu() if isinstance(values, torch.Tensor) else values
    ).ravel()
    if flat.size == 0:
        return
    step = logger_step(trainer) if step is None else step
    for writer in _writers(trainer, "add_histogram"):
        writer.add_histogram(tag, flat, global_step=step, bins=histogram_bins(flat))


@rank_zero_only
def log_text(trainer: L.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """A markdown text panel at ``step`` (default: ``logger_step``)."""
    step = logger_step(trainer) if step is None else step
    for writer in _writers(trainer, "add_text"):
        writer.add_text(tag, text, global_step=step)


# ------------------------------------------------------------------ hyperparameters
def _choice(group: str) -> str | None:
    """The option chosen for a config group (``loss=sed`` -> ``sed``), when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return OmegaConf.select(HydraConfig.get(), f"runtime.choices.{group}", default=None)


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs that tell runs apart, flat (``loss/lam``): experiment, loss name and knobs,
    lr, seed, data, model and the length of training. The whole config is in the run
    directory (``config_resolved.yaml``); the HParams tab shows these as columns."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") else {}
    params: dict[str, Any] = {
        "experiment": _choice("experiment") or "none",
        "loss": loss.get("name", _choice("loss")),
        **{
            f"loss/{k}": v
            for k, v in loss.items()
            if k not in {"_target_", "name"} and not isinstance(v, dict | list)
        },
        "lr": OmegaConf.select(cfg, "optimizer.lr", default=None),
        "seed": cfg.get("seed"),
        "data": _choice("data") or OmegaConf.select(cfg, "data.train._target_", default=None),
        "data/max_length": OmegaConf.select(cfg, "data.max_length", default=None),
        "data/batch_size": OmegaConf.select(cfg, "data.batch_size", default=None),
        "model": OmegaConf.select(cfg, "model.name_or_path", default=None) or _choice("model"),
    }
    for knob in ("max_steps", "max_epochs", "accumulate_grad_batches", "precision"):
        params[f"trainer/{knob}"] = OmegaConf.select(cfg, f"trainer.{knob}", default=None)
    return {k: _hparam_value(v) for k, v in params.items()}


def _hparam_value(value: Any) -> Any:
    # TensorBoard's HParams accept numbers, strings and booleans only.
    return value if isinstance(value, bool | int | float | str) else str(value)


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The headline metrics (``sedsft.utils.analysis.headline_metrics``: the notebook's
    table) that are finite, in table order: the end-of-run table and the HParams columns.
    Every metric stays in ``metrics.json``."""
    return {
        k: float(metrics[k]) for k in headline_metrics(metrics) if math.isfinite(float(metrics[k]))
    }


@rank_zero_only
def log_hparams(
    trainer: L.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Knobs and final metrics of the run for every logger; in TensorBoard, the HParams tab.

    ``logger.log_hyperparams(params)`` stores the knobs (``hparams.yaml``, other loggers'
    own tables). TensorBoard's tab also needs the metric names: its session is written
    here, and the tab reads each metric's last value from the run's own scalar curves, so
    nothing is logged twice and no curve gains a point.
    """
    metric_names = list(summary_metrics(metrics))
    for logger in trainer.loggers:
        logger.log_hyperparams(dict(params))
        writer = getattr(logger, "experiment", None)
        if metric_names and hasattr(writer, "_get_file_writer"):
            from torch.utils.tensorboard.summary import hparams

            file_writer = writer._get_file_writer()
            for summary in hparams(dict(params), {name: 0.0 for name in metric_names}):
                file_writer.add_summary(summary)
        logger.finalize("success")  # fit closed the writers already; close what this reopened
