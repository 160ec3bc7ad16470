"""Export of the trained weights in Hugging Face format, ready for an RL framework."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from sedsft.checkpoints import loss_meta, save_hf
from sedsft.sft.strategies import full_state_dict

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """Writes ``<output_dir>/<dirname>`` with ``save_pretrained`` at the end of training.

    Args:
        dirname: sub-directory of the run directory.
        merge: with LoRA, write full weights with the adapter merged in (true) or the
            adapter alone in peft's format (false).
    """

    def __init__(self, output_dir: str, dirname: str = "hf", merge: bool = True):
        self.directory = Path(output_dir) / dirname
        self.merge = merge

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank takes part in gathering (sharded strategies), rank 0 writes.
        state_dict = full_state_dict(trainer)
        self._write(pl_module, state_dict)

    @rank_zero_only
    def _write(self, pl_module: L.LightningModule, state_dict: dict) -> None:
        save_hf(
            pl_module.model,
            pl_module.tokenizer,
            self.directory,
            meta=loss_meta(pl_module.loss_fn),
            state_dict=state_dict,
            merge=self.merge,
        )
        log.info("exported Hugging Face model to %s", self.directory)
