"""Export of the trained weights in Hugging Face format, ready for an RL framework."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
MODEL_PREFIX = "model."


def save_hf(module, directory: str | Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` of ``module.model`` (weights from ``state_dict`` when given, e.g.
    a gathered FSDP state) and of ``module.tokenizer`` with its chat template."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        state_dict = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    module.model.save_pretrained(directory, state_dict=state_dict)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(directory)
    tau = getattr(module.loss_fn, "tau", None)
    meta = {"loss": type(module.loss_fn).__name__, "tau": None if tau is None else float(tau)}
    (directory / "sedsft.json").write_text(json.dumps(meta, indent=2))
    return directory


class HFExport(L.Callback):
    """Writes ``<output_dir>/<dirname>`` with ``save_pretrained`` at the end of training.

    Args:
        dirname: sub-directory of the run directory.
    """

    def __init__(self, output_dir: str, dirname: str = "hf"):
        self.directory = Path(output_dir) / dirname

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank takes part in gathering (sharded strategies), rank 0 writes.
        state_dict = trainer.strategy.lightning_module_state_dict()
        self._write(pl_module, state_dict)

    @rank_zero_only
    def _write(self, pl_module: L.LightningModule, state_dict: dict) -> None:
        save_hf(pl_module, self.directory, state_dict)
        log.info("exported Hugging Face model to %s", self.directory)
