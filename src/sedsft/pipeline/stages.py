"""How one stage of a pipeline job is set up: its composed config (``stage_config``) from the
stage's entry config and overrides (``stage_overrides``: the job's loss and seed, its output
directory, a resume of a killed RL stage, the user's ``<stage>.overrides`` / ``add``), the
loss's label in the summary, and giving back device memory between stages. Used by the job
(``sedsft.pipeline.run``) and by the stages that compose another stage's config (``routes``,
``evaluation``)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def stage_experiment(overrides: list[str]) -> str | None:
    """The ``experiment=`` a stage's overrides choose (the last one), else None."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("experiment=")]
    return chosen[-1] if chosen else None


def stage_config(name: str, overrides: list[str]) -> DictConfig:
    """The composed config of one stage (``train`` or ``rl``), as its main would see it."""
    return compose(config_name=name, overrides=overrides)


def loss_overrides() -> list[str]:
    """The job's loss as SFT overrides: its ``loss`` group choice and any ``loss.<knob>=``
    given to the pipeline (``python src/pipeline.py loss=sed loss.lam=0.5``)."""
    hydra_cfg = HydraConfig.get()
    knobs = [o for o in hydra_cfg.overrides.task if o.startswith("loss.")]
    return [f"loss={hydra_cfg.runtime.choices['loss']}", *knobs]


def loss_label() -> str:
    """The job's loss as the summary names it: the ``loss`` choice, with the ``loss.<knob>=``
    overrides in brackets when there are any (``sed[loss.tau=0.98]``), so a grid over a
    knob keeps its settings apart."""
    choice, *knobs = loss_overrides()
    name = choice.split("=", 1)[1]
    return f"{name}[{','.join(knobs)}]" if knobs else name


def stage_overrides(cfg: DictConfig, stage: str, job_dir: Path) -> list[str]:
    """Overrides for one stage: the job's seed (and loss for SFT), its output directory,
    and the user's ``<stage>.overrides``."""
    common = [f"seed={cfg.seed}", f"paths.output_dir={job_dir / stage}"]
    if stage == "sft":
        return [*loss_overrides(), *common, *cfg.sft.overrides, *cfg.sft.get("add", [])]
    return [f"policy={job_dir / 'sft'}", *common, *rl_resume(job_dir / stage), *cfg.rl.overrides, *cfg.rl.get("add", [])]


def rl_resume(rl_dir: Path) -> list[str]:
    """``resume=<job dir>/rl`` when an earlier launch of the job left RL checkpoints there (it was
    killed during RL): the relaunch continues from the newest one instead of from step 0."""
    from sedsft.rl.training import find_checkpoint

    try:
        find_checkpoint(rl_dir)
    except FileNotFoundError:
        return []
    return [f"resume={rl_dir}"]


def release_gpu_memory() -> None:
    """Give back to the device what the caching allocator still keeps of a finished stage, so the
    next stage (vLLM sizes its KV cache from the free memory) and the eval stage's own process
    find it free; what live objects hold stays taken. A no-op without CUDA."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
