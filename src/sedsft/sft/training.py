"""The training run behind ``src/train.py``: instantiate from the config, fit, test."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sedsft.sft import logging as runlog
from sedsft.sft.callbacks.exception_checkpoint import preempted
from sedsft.sft.callbacks.progress import progress_bar
from sedsft.sft.checks import validate_config
from sedsft.sft.module import SFTModule
from sedsft.utils import console
from sedsft.utils.batches import announce, apply_sft_batch
from sedsft.utils.threads import set_cpu_threads
from sedsft.utils.world import lightning_world

log = logging.getLogger(__name__)

# Keys of a data config that describe the data set for other parts of the run (the
# generation callback reads data.sample_classifier; data=local's sources read data.path);
# they are not DataModule arguments.
DATA_DESCRIPTION_KEYS = ("sample_classifier", "path")


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Objects of every ``_target_`` entry of a group like ``callbacks`` or ``logger``."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data, model, loss, callbacks, loggers and trainer from ``cfg``."""
    lm = hydra.utils.instantiate(cfg.model)
    tokenizer = lm.load_tokenizer()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)  # resolved against the whole config
    for name in DATA_DESCRIPTION_KEYS:
        data_cfg.pop(name, None)
    datamodule = hydra.utils.instantiate(data_cfg, tokenizer=tokenizer)
    module = SFTModule(
        lm=lm,
        loss=hydra.utils.instantiate(cfg.loss),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        tokenizer=tokenizer,
        **cfg.get("module", {}),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_list(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(progress_bar())  # epochs counted from one (Lightning's reads "Epoch 1/1" on epoch 2 of 2)
    loggers = instantiate_list(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "tokenizer": tokenizer}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


@rank_zero_only
def _announce_run_directory(cfg: DictConfig, output_dir: Path) -> None:
    """The run directory on its own line, first thing; the resolved config inside it
    (``.hydra/config.yaml`` keeps ``${...}`` interpolations, this is what the run used)."""
    console.announce_run_directory(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and optionally test) as configured; returns the final scalar metrics.

    Metrics are also written to ``<paths.output_dir>/metrics.json`` for sweeps and notebooks,
    the resolved config to ``<paths.output_dir>/config_resolved.yaml``; the console shows the
    run directory first and a table of the final metrics last.
    """
    console.configure_console()
    output_dir = Path(cfg.paths.output_dir)
    batch = apply_sft_batch(cfg, lambda: lightning_world(cfg))  # accumulation from batch.sequences_per_step and the world size
    _announce_run_directory(cfg, output_dir)
    announce(batch)
    validate_config(cfg)  # numeric knobs and data files, before anything is built; logs the global batch
    on_cpu = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")) == "cpu" or not torch.cuda.is_available()
    set_cpu_threads(cfg.get("cpu_threads", "auto"), on_cpu=on_cpu)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    objects = build(cfg)
    datamodule, module, trainer = objects["datamodule"], objects["module"], objects["trainer"]
    # Tokenise and validate every row before any weight is loaded or step is taken.
    datamodule.setup("fit")
    skipped = {runlog.key("data", f"skipped_{k}"): float(v) for k, v in datamodule.skip_counts().items()}
    skipped.update({runlog.key("data", f"cut_{k}"): float(v) for k, v in datamodule.cut_counts().items()})  # rows cut at data.max_length
    runlog.log_scalars(trainer, skipped, step=0)
    if cfg.get("train", True):
        try:
            # weights_only: a checkpoint given to resume from holds tensors and plain data only
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        except SIGTERMException:  # Lightning exits 0 here: a pre-empted run is not a success
            raise preempted(trainer) from None
    metrics = _scalars(trainer.callback_metrics)
    metrics.update(module.run_metrics)
    metrics.update(skipped)
    if cfg.get("test", False):
        # After fitting: the best checkpoint when validation chose one, else the weights
        # as they are. Without fitting: the given checkpoint.
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        checkpoint = (best or None) if cfg.get("train", True) else cfg.get("ckpt_path")
        trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
        metrics.update(_scalars(trainer.callback_metrics))
    runlog.log_hparams(trainer, runlog.run_hparams(cfg), metrics)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        summary = runlog.summary_metrics(metrics)
        print(console.format_table(summary, f"final metrics (all in {output_dir / 'metrics.json'})"), flush=True)
        print(console.METRIC_KEY, flush=True)
    return metrics
