"""A checkpoint when training stops on an exception (Ctrl-C included), to resume from."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

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
        trainer.save_checkpoint(self.path)
        log.warning("training stopped (%s); resume with ckpt_path=%s", type(exception).__name__, self.path)
