"""A checkpoint when training stops on an exception (Ctrl-C, SIGTERM, a crash), to resume
from; and the non-zero exit of a pre-empted run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from sedsft.sft.callbacks.checkpoint import Checkpoints
from sedsft.utils.preemption import PREEMPTED_EXIT_CODE, resume_command

log = logging.getLogger(__name__)



class ExceptionCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when fit stops on an exception, Ctrl-C or SIGTERM
    (unless ``last.ckpt`` already holds that step), and logs the command that resumes.

    Lightning ships ``OnExceptionCheckpoint``, but its presence makes every
    ``fit(ckpt_path=None)`` resolve to ``"last"`` (an implicit resume, with a warning on
    each run); resuming here is always explicit: ``ckpt_path=<file>``.

    It also keeps every checkpoint written in the middle of a step exact (this one, and
    the ``hpc_ckpt_*.ckpt`` Lightning writes on SLURM's requeue signal): the batch in flight
    did not happen, so the data loader's state must not count it as consumed.
    """

    save_weights_only = False  # the full training state: the file resumes the run

    def __init__(self, dirpath: str, filename: str = "on_exception"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.resume_from: Path | None = None  # the checkpoint that resumes the stopped run

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        # last.ckpt written at this step holds this very state (taken on the step boundary,
        # so it is exact even inside gradient accumulation): no second copy
        self.resume_from = next(
            (path for cb in trainer.callbacks if isinstance(cb, Checkpoints) and (path := cb.holds(trainer.global_step))),
            None,
        )
        if self.resume_from is None:
            trainer.save_checkpoint(self.path, weights_only=self.save_weights_only)
            self.resume_from = self.path
        log.warning(
            "training stopped (%s) after step %d; resume with ckpt_path=%s:\n  %s",
            type(exception).__name__, trainer.global_step, self.resume_from, resume_command(self.resume_from),
        )  # fmt: skip

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        done = _batches_done(trainer)
        for loader_state in state.get("combined_loader", []):
            if "batches_consumed" in loader_state:  # a sedsft.data.collate.ResumableDataLoader
                loader_state["batches_consumed"] = done


def _batches_done(trainer: L.Trainer) -> int:
    """Batches of the current epoch that a run resumed from a checkpoint written now counts
    as done: those whose step finished (one stopped inside ``on_train_batch_end`` counts).
    Lightning resumes at the batch after the last completed one."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    if progress.ready == progress.started == progress.processed:
        return progress.processed
    return progress.completed


def preempted(trainer: L.Trainer) -> SystemExit:
    """The exit of a fit stopped by SIGTERM (what schedulers send before they kill a job):
    status ``PREEMPTED_EXIT_CODE``, after saying which checkpoint resumes it."""
    written = [cb.resume_from for cb in trainer.callbacks if isinstance(cb, ExceptionCheckpoint) and cb.resume_from]
    saver = trainer.checkpoint_callback  # its latest file: last.ckpt, or the newest when nothing is monitored
    last = getattr(saver, "last_model_path", "") or (saver.best_model_path if saver and saver.monitor is None else "")
    last = last or None
    checkpoint = written[0] if written else last
    if checkpoint is None:
        log.error("stopped by SIGTERM at step %d; no checkpoint was written (callbacks.model_checkpoint "
                  "and callbacks.on_exception_checkpoint are off); exit status %d",
                  trainer.global_step, PREEMPTED_EXIT_CODE)  # fmt: skip
    else:
        log.error("stopped by SIGTERM at step %d (pre-empted?); exit status %d; resume with:\n  %s",
                  trainer.global_step, PREEMPTED_EXIT_CODE, resume_command(checkpoint))  # fmt: skip
    return SystemExit(PREEMPTED_EXIT_CODE)
