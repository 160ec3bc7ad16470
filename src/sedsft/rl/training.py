"""The RL run behind ``src/rl.py``: GRPO with TRL's ``GRPOTrainer`` on a policy from any
SFT checkpoint, in a run directory shaped like an SFT run's.

``logs/rl/runs/<timestamp>/``: ``.hydra/`` (resolved config), ``tensorboard/`` (``rl/*``),
``checkpoints/checkpoint-<step>/`` (model, optimizer, scheduler, RNG and trainer state:
``resume=<run dir>`` continues from the newest), ``hf/`` (``save_pretrained`` of the
trained policy, loadable by ``AutoModelForCausalLM.from_pretrained``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from trl import GRPOConfig, GRPOTrainer

from sedsft.checkpoints import hf_directory, read_meta, save_hf
from sedsft.evaluation.sampling import SamplingSettings
from sedsft.model_paths import load_model_from
from sedsft.rl.callbacks import HeldoutEval, RLTensorBoard
from sedsft.rl.checks import validate_rl_config, warn_long_prompts
from sedsft.rl.console import final_report, use_console
from sedsft.rl.data import build_train_dataset, heldout_prompts
from sedsft.rl.resume import ExactResume, StopOnSIGTERM, check_resume_config
from sedsft.utils import console
from sedsft.utils.batches import announce, apply_rl_batch
from sedsft.utils.preemption import PREEMPTED_EXIT_CODE, resume_command
from sedsft.utils.threads import set_cpu_threads
from sedsft.utils.world import export_slurm_process_group, rl_world

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class SedsftGRPOTrainer(ExactResume, GRPOTrainer):
    """``GRPOTrainer`` with verl's left truncation of prompts to ``max_prompt_length`` tokens
    (TRL 1.16 has no prompt limit): the chat-templated prompt ids keep their last tokens.
    The fraction of prompts cut is logged as ``prompts/truncated_frac``. Checkpoints carry
    the rollout batch in flight, so a resume continues it exactly (``ExactResume``)."""

    def __init__(self, *args: Any, max_prompt_length: int | None = None, **kwargs: Any):
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or null, got {max_prompt_length}")
        self.max_prompt_length = max_prompt_length
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        limit = self.max_prompt_length
        if limit is not None and prompt_ids:
            cut = sum(len(ids) > limit for ids in prompt_ids)
            prompt_ids = [list(ids[-limit:]) for ids in prompt_ids]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["prompts/truncated_frac"].append(cut / len(prompt_ids))
        return prompt_ids, images, multimodal_fields


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``resume`` names: a ``checkpoint-<step>`` directory, or the newest one
    under a run directory's ``checkpoints/`` (or under the directory itself)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = [p for p in folder.glob("checkpoint-*") if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()] if folder.is_dir() else []
        if found:
            return max(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))
    raise FileNotFoundError(
        f"resume={path}: no checkpoint-<step> directory with trainer_state.json there or in its checkpoints/; "
        "pass an RL run directory or one of its checkpoints/checkpoint-<step>"
    )


def grpo_config(cfg: DictConfig, output_dir: Path) -> GRPOConfig:
    """``trl.GRPOConfig`` from ``cfg.grpo`` (TRL's field names) with the run's checkpoint dir."""
    fields = OmegaConf.to_container(cfg.grpo, resolve=True)
    if "output_dir" in fields:
        raise ValueError("grpo.output_dir is set by src/rl.py (the run's checkpoints/); set hydra.run.dir to move the run")
    try:
        return GRPOConfig(output_dir=str(output_dir / "checkpoints"), **fields)
    except TypeError as err:
        raise TypeError(f"grpo: {err}; the keys of grpo.* must be trl.GRPOConfig fields") from None
    except ValueError as err:
        raise ValueError(f"grpo: {err}") from None


def shared_output_dir(output_dir: str) -> Path:
    """The main process's run directory on every process: with ``accelerate launch`` each
    process composes its own Hydra config and the timestamps may differ by a second."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = [output_dir]
        broadcast_object_list(holder, from_process=0)
        if holder[0] != output_dir:
            log.info("process %d writes into the main process's run directory %s", state.process_index, holder[0])
        output_dir = holder[0]
    return Path(output_dir)


def export_policy(trainer: GRPOTrainer, tokenizer: Any, directory: Path, meta: dict) -> None:
    """The trained policy as a Hugging Face directory (``sedsft.checkpoints.save_hf``),
    its state gathered from every process first under FSDP / ZeRO-3."""
    accelerator = trainer.accelerator
    state_dict = None
    if accelerator.num_processes > 1:
        full = accelerator.get_state_dict(trainer.model_wrapped)  # collective: every process calls it
        # save_hf takes a LightningModule-style state (keys under "model.")
        state_dict = {f"model.{k}": v for k, v in (full or {}).items()}
    if accelerator.is_main_process:
        save_hf(accelerator.unwrap_model(trainer.model), tokenizer, directory, meta=meta, state_dict=state_dict)
    accelerator.wait_for_everyone()


@dataclass(frozen=True)
class Policy:
    """The policy an RL run starts from."""

    path: str  # what is loaded: the SFT policy, or a resumed run's checkpoint-<step>
    origin: str | None  # the SFT policy the export's sedsft.json names
    knob: str  # the knob a bad path is reported under: policy | resume


def train(cfg: DictConfig) -> dict[str, float]:
    """GRPO from ``cfg.policy``: resolve the policy, build the held-out evaluation and the
    trainer, run, export; returns the metrics written to ``metrics.json``."""
    output_dir, resume = start_run(cfg)
    policy = resolve_policy(cfg, resume)
    announce(apply_rl_batch(cfg, rl_world()))  # grpo accumulation / rollout size from batch.* and the process count
    args = grpo_config(cfg, output_dir)
    model, tokenizer = load_model_from(policy.path, policy.knob, dtype=cfg.get("policy_dtype", "auto"))
    log.info("policy %s: %s, %.1fM parameters", policy.path, type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    train_set, reward_funcs = rl_task(cfg, model, tokenizer, args)
    tensorboard, stop = RLTensorBoard(output_dir / "tensorboard"), StopOnSIGTERM()
    heldout = build_heldout(cfg, tokenizer, tensorboard, stop, resume)
    trainer = build_trainer(cfg, model, tokenizer, args, train_set, reward_funcs, [tensorboard, stop], heldout)

    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        tensorboard.close()
    wall = time.perf_counter() - start
    if stop.signalled:
        raise preempted(output_dir / "checkpoints" / f"checkpoint-{stop.stopped_at}", stop.stopped_at)
    export_policy(trainer, tokenizer, output_dir / "hf", export_meta(policy.origin, trainer.state.global_step))
    metrics = run_metrics(trainer, heldout, result.metrics, wall, resume)
    if trainer.accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(final_report(metrics, output_dir), flush=True)
    return metrics


def start_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The process set up for the run (knobs checked by name before anything is loaded or
    written, console, CPU threads, the SLURM process group); its run directory and the
    checkpoint ``resume`` names (None: a fresh run)."""
    validate_rl_config(cfg)
    console.configure_console()
    set_cpu_threads(cfg.get("cpu_threads", "auto"), on_cpu=not torch.cuda.is_available())
    export_slurm_process_group()  # SLURM tasks (submitit) form one process group for accelerate
    output_dir = shared_output_dir(cfg.paths.output_dir)
    console.announce_run_directory(output_dir)
    return output_dir, find_checkpoint(cfg.resume) if cfg.get("resume") else None


def resolve_policy(cfg: DictConfig, resume: Path | None) -> Policy:
    """``policy``, or with ``resume`` alone the checkpoint itself (a Hugging Face directory)
    and the first run's policy as its origin. A resumed run trains with the first run's
    knobs: they are checked here, before anything is loaded."""
    first_config = resume.parent.parent / ".hydra" / "config.yaml" if resume else None  # the resumed run's own
    if resume is not None:
        check_resume_config(cfg, first_config)
    if not OmegaConf.is_missing(cfg, "policy"):
        return Policy(path=cfg.policy, origin=cfg.policy, knob="policy")
    if resume is None:
        raise ValueError("policy=??? : pass the SFT policy (run dir, HF dir, .ckpt) or resume=<RL run dir>")
    origin = OmegaConf.load(first_config).get("policy") if first_config.is_file() else str(resume)
    return Policy(path=str(resume), origin=origin, knob="resume")


def rl_task(cfg: DictConfig, model: Any, tokenizer: Any, args: GRPOConfig) -> tuple[Any, list]:
    """The RL prompts (with a warning when some overrun the context) and reward functions."""
    train_set = build_train_dataset(cfg.data)
    log.info("RL prompts: %d (%s)", len(train_set), cfg.data.train.get("_target_"))
    warn_long_prompts(train_set["prompt"], tokenizer, cfg.get("max_prompt_length"), args.max_completion_length,
                      getattr(model.config, "max_position_embeddings", None))  # fmt: skip
    reward_funcs = [hydra.utils.instantiate(spec) for spec in cfg.reward.funcs]
    if not reward_funcs:
        raise ValueError("reward.funcs is empty: GRPO needs at least one reward function")
    return train_set, reward_funcs


def build_trainer(
    cfg: DictConfig,
    model: Any,
    tokenizer: Any,
    args: GRPOConfig,
    train_set: Any,
    reward_funcs: list,
    callbacks: list,
    heldout: HeldoutEval | None,
) -> SedsftGRPOTrainer:
    """The GRPO trainer with the run's callbacks (the held-out evaluation last, given the
    trainer for its accelerator) and the console's one line per update."""
    trainer = SedsftGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=callbacks + ([heldout] if heldout is not None else []),
        max_prompt_length=cfg.get("max_prompt_length"),
    )
    if heldout is not None:
        heldout.trainer = trainer
    use_console(trainer)
    return trainer


def build_heldout(
    cfg: DictConfig, tokenizer: Any, tensorboard: RLTensorBoard, stop: StopOnSIGTERM, resume: Path | None
) -> HeldoutEval | None:
    """The held-out evaluation of ``cfg.heldout`` (None: disabled, or no held-out prompts),
    with a resumed run's earlier evaluations loaded."""
    if not cfg.heldout.enabled:
        return None
    found = heldout_prompts(cfg)
    if found is None:
        log.warning("no held-out prompts (data.val is null and heldout.path unset): rl/heldout/* is not logged")
        return None
    prompts, golds, name = found
    classifier = cfg.heldout.get("sample_classifier")
    sampling = SamplingSettings.from_config(cfg.heldout.sampling, where="heldout.sampling", seed=cfg.seed)
    heldout = HeldoutEval(prompts, golds, tokenizer, tensorboard, sampling, every_n_steps=cfg.heldout.every_n_steps,
                          classify=hydra.utils.get_method(classifier) if classifier else None)  # fmt: skip
    heldout.stopping = lambda: stop.signalled
    if resume is not None:
        heldout.load(resume)  # the first run's evaluations (step 0 included)
    log.info("held-out evaluation: %d prompts of %s x %d samples", len(prompts), name, sampling.num_samples)
    return heldout


def export_meta(origin: str | None, steps: int) -> dict[str, Any]:
    """``sedsft.json`` of the exported policy: the SFT policy's own record, and this stage's."""
    origin_hf = hf_directory(origin) if origin and Path(str(origin)).exists() else None
    return {
        **(read_meta(origin_hf) if origin_hf else {}),
        "stage": "rl",
        "algorithm": "grpo",
        "policy": str(origin),
        "rl_steps": steps,
    }


def run_metrics(
    trainer: GRPOTrainer, heldout: HeldoutEval | None, train_metrics: dict, wall: float, resume: Path | None
) -> dict[str, float]:
    """``metrics.json``: held-out metrics before (``heldout_before/*``) and after
    (``heldout/*``), the last logged value of every TRL scalar (``rl/*``), and timing
    (``seconds_per_step`` leaves the held-out sampling out)."""
    state = trainer.state
    first_step = find_step(resume) if resume else 0
    steps = state.global_step - first_step
    heldout_seconds = heldout.seconds if heldout else 0.0
    out: dict[str, float] = {
        "global_step": float(state.global_step),
        "steps_this_run": float(steps),
        "wall_seconds": wall,
        "heldout_seconds": heldout_seconds,
        "seconds_per_step": (wall - heldout_seconds) / steps if steps else float("nan"),
    }
    for entry in state.log_history:
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "epoch"):
                out[f"rl/{key}"] = float(value)
    for key, value in train_metrics.items():  # the trainer's summary, when the history lacks it
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.setdefault(f"rl/{key}", float(value))
    if heldout is not None:
        if heldout.before is not None:
            out.update({f"heldout_before/{k}": v for k, v in heldout.before.items()})
        if heldout.history:
            out.update({f"heldout/{k}": v for k, v in heldout.history[-1][1].items()})
    return out


def preempted(checkpoint: Path, step: int | None) -> SystemExit:
    """The exit of a run stopped by SIGTERM: status 143, after the command that resumes it."""
    log.error("stopped by SIGTERM at step %s (pre-empted?); checkpoint %s; exit status %d; resume with:\n  %s",
              step, checkpoint, PREEMPTED_EXIT_CODE, resume_command(checkpoint, knob="resume", script="src/rl.py"))  # fmt: skip
    return SystemExit(PREEMPTED_EXIT_CODE)


def find_step(checkpoint: Path) -> int:
    match = CHECKPOINT_RE.match(Path(checkpoint).name)
    return int(match.group(1)) if match else 0
