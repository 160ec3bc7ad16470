"""``checkpoints/last.ckpt`` for resuming, written often enough that a killed job loses
minutes, and the best checkpoint by a monitored metric, never two copies of one state.

Lightning's ``ModelCheckpoint`` alone does not give both: with a monitor its step- and
time-triggered saves wait for the monitored metric (so nothing is written before the first
validation, i.e. a killed job loses the whole first epoch), ``save_last=True`` writes
``last.ckpt`` as a second full copy next to the best file even when both hold the same step,
and ``save_last="link"`` points ``last.ckpt`` at the newest *top-k* file, which with a
monitor can be an older step than the latest (resuming from it would go back in time).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` for the best file (``monitor``, at validation), plus ``last.ckpt``:

    - written at every validation, at the end of every epoch and of training, every
      ``every_minutes`` of training and every ``every_n_train_steps`` optimiser steps, always
      on an optimiser-step boundary (never between accumulated micro-batches), so resuming
      from it repeats no step and skips no batch;
    - a symbolic link to the best file when that was written at the same step (no second
      copy); the next write replaces the link by a file, the best file stays as it is.

    With ``monitor=None`` there is no best file, only ``last.ckpt``.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "best_step_{step:06d}",
        monitor: str | None = "val/loss",
        mode: str = "min",
        every_minutes: float | None = 15.0,
        every_n_train_steps: int | None = None,
        **kwargs,
    ):
        if every_minutes is not None and every_minutes < 0:
            raise ValueError(f"callbacks.model_checkpoint.every_minutes={every_minutes} must be >= 0 or null")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"callbacks.model_checkpoint.every_n_train_steps={every_n_train_steps} must be >= 1 or null")
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs["save_top_k"] = kwargs.get("save_top_k", 1) if monitor is not None else 0
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=False, **kwargs)
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self.every_n_steps = every_n_train_steps
        self.last_path = Path(dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        self._last_step = -1  # global step held by last.ckpt
        self._last_is_link = False
        self._last_time = time.monotonic()
        self._step_at_batch_start = 0

    # -- triggers ------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time = time.monotonic()
        self._last_step = trainer.global_step  # a resumed run does not rewrite the state it loaded

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_at_batch_start:
            return  # inside gradient accumulation: no step boundary here
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_seconds is not None:
            # rank 0's clock decides, so that every rank joins the (collective) save
            due = trainer.strategy.broadcast(due or time.monotonic() - self._last_time >= self.every_seconds)
        if due:
            self._save_last(trainer, linked_to=None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best_before = self.best_model_path
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._save_last(trainer, linked_to=self.best_model_path if self.best_model_path != best_before else None)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best_before = self.best_model_path
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last(trainer, linked_to=self.best_model_path if self.best_model_path != best_before else None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last(trainer, linked_to=None)

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run writes into a run directory of its own (they are never reused), so
        the stored ``dirpath`` always differs: Lightning's handling stays (only
        ``best_model_path`` is carried over; no file of the earlier run is ever removed),
        without its warning on every resume."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)

    def holds(self, step: int) -> Path | None:
        """``last.ckpt`` if it holds the state after optimiser step ``step``."""
        return self.last_path if self._last_step == step and self.last_path.exists() else None

    # -- writing -------------------------------------------------------------------
    def _save_last(self, trainer: L.Trainer, linked_to: str | None) -> None:
        """Write ``last.ckpt``, or link it to ``linked_to`` (the best file, just written at
        this step), unless it already holds this step (as a link when it can be one)."""
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.global_step == self._last_step and (self._last_is_link or not linked_to):
            return
        # set before saving: this callback's state (last_model_path) is part of the checkpoint
        self.last_model_path = str(self.last_path)
        if trainer.is_global_zero and (linked_to or self.last_path.is_symlink()):
            # a link is replaced, never written through (it points at the best file); a
            # file is overwritten in place by Lightning's atomic save, so that a kill
            # during the save still leaves the previous last.ckpt
            _remove(self.last_path)
            if linked_to:
                os.symlink(os.path.relpath(linked_to, self.last_path.parent), self.last_path)
        trainer.strategy.barrier("sedsft_last_checkpoint")
        if not linked_to:
            trainer.save_checkpoint(self.last_path, weights_only=self.save_weights_only)
        self._last_step, self._last_is_link = trainer.global_step, bool(linked_to)
        self._last_time = time.monotonic()
        log.debug("last.ckpt at step %d%s", trainer.global_step, f" -> {linked_to}" if linked_to else "")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():  # a sharded (FSDP / DeepSpeed) checkpoint
        shutil.rmtree(path)
