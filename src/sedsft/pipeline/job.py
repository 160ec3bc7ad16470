"""A pipeline job directory belongs to one (loss, knobs, seed).

A relaunch into an existing job directory skips every stage whose ``metrics.json`` is there,
so a launch with another loss, knob or seed would label the old stages' results with the new
settings in ``pipeline.json`` (a "sed, seed 3" record around CE's model). The first launch
writes the job's settings to ``<job dir>/job.json``; a later launch must match them, or it is
refused before any stage runs, naming each setting that differs, unless no stage left a
result there yet (a launch stopped by a bad knob may be corrected in place). Job directories
written before ``job.json`` existed are checked against their ``pipeline.json`` (loss and seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
# pipeline keys that say how or what to run, not what the job is
NOT_IDENTITY = ("stages", "paths", "hydra", "task_name", "loss", "seed")


def job_identity(cfg: DictConfig, loss: str) -> dict[str, Any]:
    """What makes a job: its loss as the summary names it (with ``loss.<knob>=`` overrides),
    its seed, and every other setting of the pipeline config (``sft.overrides``,
    ``rl.overrides``, ``positions.top_k``, ...), resolved, by dotted name."""
    rest = {}
    for key in cfg:
        if key not in NOT_IDENTITY:
            value = cfg[key]
            rest.update(_dotted(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value))
    return {"loss": loss, "seed": int(cfg.seed), **rest}


def _dotted(key: str, value: Any) -> dict[str, Any]:
    """``{"rl": {"overrides": [...]}}`` as ``{"rl.overrides": [...]}``: a difference is named
    by the knob a user would pass."""
    if isinstance(value, dict) and value:
        return {k: v for name, inner in value.items() for k, v in _dotted(f"{key}.{name}", inner).items()}
    return {key: value}


def claim_job_dir(job_dir: Path, identity: dict[str, Any]) -> None:
    """Record ``identity`` in ``job_dir`` on a first launch; on a relaunch, raise ``ValueError``
    naming every setting that differs from the one the directory belongs to."""
    file = job_dir / JOB_FILE
    recorded, source = None, file
    if file.is_file():
        recorded = json.loads(file.read_text())
    elif (job_dir / "pipeline.json").is_file():  # a job written before job.json
        source = job_dir / "pipeline.json"
        old = json.loads(source.read_text())
        recorded = {"loss": old.get("loss"), "seed": old.get("seed")}
    if recorded is not None and recorded != identity and not holds_results(job_dir):
        log.info("%s: no stage left results under %s (e.g. a launch stopped by a bad knob); it is now %s seed %s",
                 job_dir, recorded, identity["loss"], identity["seed"])  # fmt: skip
        recorded = None
    if recorded is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(identity, indent=2, sort_keys=True))
        return
    differ = [key for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
    differ = [key for key in differ if key in recorded]  # an older job.json lacks keys added since
    if differ:
        listed = "; ".join(f"{key}: this job is {_show(recorded.get(key))}, the launch asks for {_show(identity.get(key))}" for key in differ)
        raise ValueError(
            f"{job_dir} holds the job {recorded.get('loss')} seed {recorded.get('seed')} ({source.name}); {listed}. "
            "A job directory belongs to one (loss, knobs, seed) and its finished stages are not run again: launch "
            "into another hydra.run.dir (hydra.sweep.dir with -m), or relaunch with this job's settings"
        )


def holds_results(job_dir: Path) -> bool:
    """Whether a stage left anything a relaunch would keep: a ``metrics.json`` or a checkpoint."""
    return any(job_dir.glob("*/metrics.json")) or any(job_dir.glob("*/checkpoints/*"))


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
