"""Checks of the composed config that run before anything is built.

A bad number otherwise surfaces late and far from its knob: ``trainer.accumulate_grad_batches=0``
as a ``ZeroDivisionError`` inside Lightning after the data is tokenised and the model loaded,
``optimizer.lr=abc`` as a bare ``TypeError`` from torch. Here every numeric knob a user
sets on the command line is checked by name, all problems are reported at once, and the
effective global batch is stated before training starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from sedsft.data.sources import local_file_problem
from sedsft.utils.knobs import check_knob, cuda_count, device_count, is_number

log = logging.getLogger(__name__)


# key: (type, lowest allowed, highest allowed, None allowed, what the knob is / example)
# Bounds are inclusive unless written as ("open", value).
NUMERIC_KNOBS: dict[str, tuple[type, Any, Any, bool, str]] = {
    "trainer.accumulate_grad_batches": (int, 1, None, False, "micro-batches per optimiser step, e.g. 1"),
    "trainer.max_steps": (int, -1, None, False, "optimiser steps, -1 = by epochs"),
    "trainer.max_epochs": (int, -1, None, True, "epochs, e.g. 2"),
    "trainer.num_nodes": (int, 1, None, False, "nodes, e.g. 1"),
    "trainer.log_every_n_steps": (int, 1, None, False, "e.g. 10"),
    "trainer.gradient_clip_val": (float, 0, None, True, "global gradient norm, e.g. 1.0, or null"),
    "data.batch_size": (int, 1, None, False, "sequences per micro-batch and device, e.g. 4"),
    "data.eval_batch_size": (int, 1, None, False, "e.g. 8"),
    "optimizer.lr": (float, ("open", 0), None, False, "peak learning rate, e.g. 2e-5"),
    "optimizer.weight_decay": (float, 0, None, False, "e.g. 0.0"),
    "optimizer.eps": (float, ("open", 0), None, False, "e.g. 1e-8"),
    "scheduler.warmup_ratio": (float, 0, ("open", 1), False, "fraction of steps, e.g. 0.03"),
    "scheduler.min_lr_ratio": (float, 0, 1, False, "fraction of the peak lr, e.g. 0.0"),
}


def validate_config(cfg: DictConfig) -> None:
    """Raise one ``ValueError`` naming every out-of-range or non-numeric knob; then log the
    effective global batch (and warn when CPU "devices" multiply it)."""
    problems = [p for key, spec in NUMERIC_KNOBS.items() if (p := check_knob(cfg, key, *spec))]
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None)
    if betas is not None and not (
        len(betas) == 2 and all(is_number(b, float) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"optimizer.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    problems += _data_file_problems(cfg)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    _describe_global_batch(cfg)


def _data_file_problems(cfg: DictConfig) -> list[str]:
    """Local data files that cannot be read (missing, a directory, an unsupported type),
    found before the tokenizer or any weight is loaded. Named by the knob the user sets:
    ``data.path`` under ``data=local``."""
    problems = []
    for split in ("train", "val"):
        node = OmegaConf.select(cfg, f"data.{split}", default=None)
        if not isinstance(node, DictConfig) or not str(node.get("_target_", "")).endswith(".LocalFileSource"):
            continue
        raw = OmegaConf.to_container(node, resolve=False).get("path")
        key = "data.path" if isinstance(raw, str) and raw.replace(" ", "") == "${data.path}" else f"data.{split}.path"
        try:
            path = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
        except MissingMandatoryValue:
            path = None
        if path is None:
            problems.append(f"{key} is not set: give the data file, e.g. {key}=my_sft.jsonl")
        elif (problem := local_file_problem(str(path))) is not None:
            problems.append(f"{key}={path}: {problem}")
    return problems


@rank_zero_only
def _describe_global_batch(cfg: DictConfig) -> None:
    batch = OmegaConf.select(cfg, "data.batch_size", default=None)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    devices = device_count(cfg)
    if batch is None or devices is None:
        return
    log.info(
        "global batch: %d sequences per optimiser step (data.batch_size=%d x trainer.accumulate_grad_batches=%d"
        " x %d device(s) x trainer.num_nodes=%d)",
        batch * accumulate * devices * nodes, batch, accumulate, devices, nodes,
    )  # fmt: skip
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if devices > 1 and (accelerator == "cpu" or (accelerator == "auto" and not cuda_count())):
        cores = os.cpu_count() or 1
        log.warning(
            "trainer.devices=%s on the CPU starts %d training processes (DDP over gloo) sharing %d core(s): "
            "each optimiser step takes %d x the batch%s. For one process: trainer.devices=1",
            OmegaConf.select(cfg, "trainer.devices"), devices, cores, devices,
            f", and more processes than cores ({devices} > {cores}) only slow each other down" if devices > cores else "",
        )  # fmt: skip
