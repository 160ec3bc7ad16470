"""The training progress bar, counting epochs from one: Lightning's shows ``Epoch 1/1`` on the
second epoch of two (the epoch index over the last index)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class EpochsFromOneRich(RichProgressBar):
    """Lightning's rich bar with ``Epoch 2/2`` on the second epoch of two."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        return f"{description:{len(self.validation_description)}}"  # no flicker next to "Validation"


class EpochsFromOneTQDM(TQDMProgressBar):
    """Lightning's tqdm bar with ``Epoch 2/2`` on the second epoch of two."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = f"/{trainer.max_epochs}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}{total}")


def progress_bar():
    """The bar Lightning would pick (rich when installed), counting epochs from one."""
    return EpochsFromOneRich() if _RICH_AVAILABLE else EpochsFromOneTQDM()
