"""The pipeline's ``eval`` stage: ``src/eval.py`` on each policy of a job (after SFT, after RL).

The benchmarks' pass@k before and after RL is what the paper's mechanism is about (diversity
kept by SFT, turned into accuracy by RL), so each policy named in ``eval.policies`` is
evaluated with the same settings into ``<job dir>/eval/<policy>/`` (``metrics.json``,
``table.md``, per-benchmark ``samples.jsonl``), and ``<job dir>/eval/metrics.json`` keeps every
benchmark number as ``<policy>/<benchmark>/<metric>``.

Each evaluation runs in its own process: the job process still holds the GPU memory of the
stages before (the RL stage's colocated vLLM engine among it), and a second vLLM engine cannot
be started inside a process whose first one set up its distributed state. A policy whose
evaluation finished is not evaluated again; one that was interrupted continues in place
(``src/eval.py resume=``), so a relaunched job loses at most the prompts in flight.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sedsft.pipeline.stages import release_gpu_memory, stage_config

log = logging.getLogger(__name__)

EVAL_SCRIPT = Path(__file__).resolve().parents[3] / "src" / "eval.py"
POLICIES = ("sft", "rl")  # what a job's stages leave to evaluate: <job dir>/sft, <job dir>/rl
# The rendezvous of the job process's own process group (TRL's colocate mode sets them for its
# vLLM engine): the evaluation process starts its own and must not reuse that port.
RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def eval_policies(cfg: DictConfig) -> list[str]:
    """``eval.policies``, checked: each must be a stage that leaves a model, at most once."""
    policies = list(cfg.eval.get("policies") or [])
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown or len(set(policies)) != len(policies):
        raise ValueError(
            f"eval.policies={policies}: name the job's models to evaluate, each once, from {list(POLICIES)} "
            "(e.g. eval.policies=[sft,rl])"
        )
    return policies


def eval_overrides(cfg: DictConfig, job_dir: Path, policy: str) -> list[str]:
    """``src/eval.py`` overrides for one policy: the model, the job's seed, the output directory
    (resumed in place when an earlier launch left an unfinished evaluation there), then the
    stage's ``eval.overrides`` and ``eval.add``."""
    out = job_dir / "eval" / policy
    resume = [f"resume={out}"] if (out / "eval_run.json").is_file() else []
    return [
        f"ckpt={job_dir / policy}",
        f"label={policy}",
        f"seed={cfg.seed}",
        f"hydra.run.dir={out}",
        *resume,
        *cfg.eval.overrides,
        *cfg.eval.get("add", []),
    ]


def composable(overrides: list[str]) -> list[str]:
    """The overrides the compose API takes (``hydra.*`` ones only apply to a launched run)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]


def flat_metrics(summary: dict[str, Any], policy: str) -> dict[str, float]:
    """Every number of one evaluation's ``metrics.json`` as ``<policy>/<benchmark>/<metric>``
    (benchmarks), or ``<policy>/<metric>`` (an evaluation of a data= set)."""
    benchmarks = summary.get("benchmarks")
    if isinstance(benchmarks, dict):
        return {
            f"{policy}/{name}/{key}": float(value)
            for name, metrics in benchmarks.items()
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return {f"{policy}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_single_process(env: Mapping[str, str] | None = None) -> None:
    """The eval stage runs once per job: in a job of several processes (SLURM tasks, torchrun)
    every one of them would start the same evaluation into the same directory."""
    from sedsft.utils.world import launcher_world

    world = launcher_world(env)
    if world.size > 1:
        raise ValueError(
            f"the eval stage runs in a one-process job, and this job has {world}: each process would evaluate "
            "the same policies into the same directory. Run the grid without eval (stages=[sft,rl]) and evaluate "
            "afterwards in one process: the same grid relaunched into its sweep directory with stages=[eval] on "
            "one node, or python src/eval.py ckpt=<job>/rl (vllm.tensor_parallel_size=<GPUs> shards a model)"
        )


def eval_env() -> dict[str, str]:
    """The evaluation process's environment: the job's, less its process group's rendezvous."""
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}


def run_eval(cfg: DictConfig, job_dir: Path) -> dict[str, float]:
    """Evaluate each of ``eval.policies`` in its own ``src/eval.py`` process; write and return
    ``<job dir>/eval/metrics.json``."""

    metrics: dict[str, float] = {}
    for policy in eval_policies(cfg):
        if not (job_dir / policy).is_dir():
            raise FileNotFoundError(
                f"eval stage: {job_dir / policy} does not exist; run the {policy} stage first "
                f"(stages=[..., {policy}, ..., eval]) or drop it from eval.policies"
            )
        out = job_dir / "eval" / policy
        if not (out / "metrics.json").is_file():
            release_gpu_memory()
            command = [sys.executable, str(EVAL_SCRIPT), *eval_overrides(cfg, job_dir, policy)]
            log.info("eval: %s policy, in %s", policy, out)
            done = subprocess.run(command, env=eval_env(), check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"eval stage: src/eval.py on the {policy} policy exited with status {done.returncode} (its "
                    f"messages are above; its run directory is {out}). Relaunching the job continues the "
                    f"evaluation where it stopped. Command: {' '.join(command)}"
                )
        metrics.update(flat_metrics(json.loads((out / "metrics.json").read_text()), policy))
    (job_dir / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("eval: wrote %s", job_dir / "eval" / "metrics.json")
    return metrics


def check_eval_stage(cfg: DictConfig, job_dir: Path) -> None:
    """The eval stage's policies and overrides, composed when the job starts, so a typo in a
    benchmark knob stops the job before SFT rather than after RL."""

    check_single_process()
    try:
        for policy in eval_policies(cfg):
            stage_config("eval", composable(eval_overrides(cfg, job_dir, policy)))
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors have several types
        raise ValueError(f"eval stage: {err}") from None
