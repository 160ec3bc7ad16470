"""A checkpoint when training stops on an exception (Ctrl-C included), to resume from."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from sedsft.data.collate import ResumableDataLoader

log = logging.getLogger(__name__)


class ExceptionCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when fit stops on an exception or Ctrl-C.

    Lightning ships ``OnExceptionCheckpoint``, but its presence makes every
    ``fit(ckpt_path=None)`` resolve to ``"last"`` (an implicit resume, with a warning on
    each run); resuming here is always explicit: ``ckpt_path=<file>``.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception"):
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        # The exception may come while a batch is in flight: its step did not happen, and
        # Lightning resumes at the batch after the last completed one, so the loader must
        # not count the in-flight batch as consumed (else the resumed run would skip it).
        done = _batches_done(trainer)
        loader = trainer.fit_loop._combined_loader
        for dataloader in loader.flattened if loader is not None else []:
            if isinstance(dataloader, ResumableDataLoader):
                dataloader.set_consumed(done)
        trainer.save_checkpoint(self.path)
        log.warning("training stopped (%s); resume with ckpt_path=%s", type(exception).__name__, self.path)


def _batches_done(trainer: L.Trainer) -> int:
    """Batches of the current epoch that a run resumed from a checkpoint written now counts
    as done: those whose step finished (one stopped inside ``on_train_batch_end`` counts)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    if progress.ready == progress.started == progress.processed:
        return progress.processed
    return progress.completed
