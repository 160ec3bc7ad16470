"""A run validates at its last step, however training stops.

Lightning validates on its schedule (epoch ends, every ``val_check_interval`` batches)
and when a callback asks to stop early. A run cut by ``trainer.max_steps`` in the middle
of an epoch, or whose last batch falls between two scheduled validations, would end with
no ``val/*`` or ``gen/*`` metrics, the checkpoint monitor finding no ``val/loss`` and the
notebook finding no numbers. ``ValidateAtEnd`` adds that last step to the schedule; the
validation then runs inside ``fit`` where a scheduled one would (checkpointing, early
stopping and generation metrics see it as usual), and at most once, since one batch
triggers at most one validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L


def training_ends_here(trainer: L.Trainer) -> bool:
    """Whether the batch just trained is the last one of ``fit`` (asked after its step).

    True when ``max_steps`` is reached, when a stop was requested and is allowed
    (``max_time``, early stopping; ``min_epochs`` / ``min_steps`` met), or at the last
    batch of the last epoch.
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.should_stop and fit_loop._can_stop_early:
        return True
    max_epochs = fit_loop.max_epochs
    last_epoch = (
        max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs
    )
    return last_epoch and epoch_loop._num_ready_batches_reached()


class ValidateAtEnd(L.Callback):
    """Adds the last training step to Lightning's validation schedule.

    Lightning decides after every batch whether to validate
    (``_TrainingEpochLoop._should_check_val_fx``); this callback extends that decision for
    the duration of ``fit``: validate if the schedule says so, or if training ends here
    and the run has validation data. ``SFTModule.configure_callbacks`` attaches it to
    every run.
    """

    def __init__(self) -> None:
        self._scheduled: Callable[[Any], bool] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        if self._scheduled is not None:
            return
        scheduled = self._scheduled = loop._should_check_val_fx

        def should_check_val(data_fetcher: Any) -> bool:
            return scheduled(data_fetcher) or (
                trainer.enable_validation and training_ends_here(trainer)
            )

        loop._should_check_val_fx = should_check_val

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._scheduled is not None:
            del trainer.fit_loop.epoch_loop._should_check_val_fx  # back to the class's method
            self._scheduled = None
