"""The verl command with the same settings as a ``src/rl.py`` config, for those who
reproduce the paper's RL stage with verl (``python src/rl.py ... print_verl=true``).

verl's batch sizes are global (it divides them by the GPU count itself): with the global
numbers of a paper preset (``batch.rollout_prompts``, ``batch.prompts_per_update``) they
are passed as they are, whatever ``verl.n_gpus_per_node`` says, and a GPU count verl would
split unevenly is refused (``sedsft.utils.batches.verl_batch``). Without them the mapping is
the one documented in ``configs/grpo/paper.yaml`` for TRL's per-process sizes run on verl's
GPUs: ``data.train_batch_size = generation_batch_size / num_generations`` and
``ppo_mini_batch_size = per_device_train_batch_size x GPUs x gradient_accumulation_steps /
num_generations``. The prompts (rows without a gold answer dropped, exactly as the TRL run
sees them) are written to verl's parquet schema in the run directory with
``data_source=verl.data_source`` (``math_dapo``: what verl's own scorer routes to its DAPO
rule scorer, in minerva mode, so ``verl.use_project_reward=false`` works); with
``use_project_reward`` the reward is the run's own through ``custom_reward_function``: the
DAPO rule scorer with the run's ``mode`` / ``after_think`` (``reward_kwargs``) when the run
scores with it (the paper presets: the release's strict-box rules), else the project's checker. Settings the command
carries that the paper does not state are listed at the top of ``verl_command.sh``.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sedsft.checkpoints import hf_directory
from sedsft.rl import dapo, rewards
from sedsft.rl.data import build_train_dataset, heldout_prompts
from sedsft.utils.batches import verl_batch
from sedsft.utils.world import verl_world

log = logging.getLogger(__name__)

LOSS_AGG = {  # TRL loss_type -> verl actor.loss_agg_mode
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


VERL_WEIGHT_DECAY = 0.01  # verl's actor AdamW default, left implicit in the command when equal
# Settings of the command (or of verl's defaults it keeps) that the paper does not state.
NOT_IN_PAPER = (
    "actor_rollout_ref.actor.optim.weight_decay: verl's default 0.01 (grpo.weight_decay), not stated in the paper",
    "trainer.test_freq: this project's choice (heldout.every_n_steps); the paper names AIME-2024 as validation only",
    "trainer.val_before_train: verl's default (True), not stated in the paper",
    "trainer.save_freq: this project's choice (grpo.save_steps)",
)


class VerlMappingError(ValueError):
    """A setting that has no verl equivalent; the message names the knob."""


def batch_sizes(grpo: dict[str, Any], gpus: int) -> dict[str, int]:
    """verl's batch sizes (prompts, except the per-GPU micro-batch in sequences) from TRL's."""
    per_device = int(grpo.get("per_device_train_batch_size", 8))
    accumulation = int(grpo.get("gradient_accumulation_steps", 1))
    group = int(grpo.get("num_generations", 8))
    update = per_device * gpus * accumulation  # completions per optimizer update
    if grpo.get("generation_batch_size") is not None:
        rollout = int(grpo["generation_batch_size"])
    elif grpo.get("steps_per_generation") is not None:
        rollout = per_device * gpus * int(grpo["steps_per_generation"])
    else:
        rollout = update
    for name, value in (("an update", update), ("a rollout batch", rollout)):
        if value % group:
            raise VerlMappingError(f"completions per {name} ({value}) is not a multiple of grpo.num_generations={group}")
    if rollout % update:
        raise VerlMappingError(
            f"grpo.generation_batch_size={rollout} is not a multiple of the completions per update "
            f"({per_device} x {gpus} GPUs x {accumulation}); verl needs whole mini-batches"
        )
    return {
        "train_batch_size": rollout // group,
        "ppo_mini_batch_size": update // group,
        "ppo_micro_batch_size_per_gpu": per_device,
        "updates_per_rollout": rollout // update * int(grpo.get("num_iterations", 1)),
    }


def write_verl_parquet(prompts: list, golds: list, path: Path, data_source: str) -> Path:
    """Prompts in verl's RL schema: ``prompt`` (messages), ``reward_model.ground_truth``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {
            "data_source": [data_source] * len(prompts),
            "prompt": prompts,
            "ability": ["math"] * len(prompts),
            "reward_model": [{"style": "rule", "ground_truth": "" if g is None else str(g)} for g in golds],
            "extra_info": [{"index": i} for i in range(len(prompts))],
        }
    )
    frame.to_parquet(path)
    return path


def project_reward_overrides(cfg: DictConfig) -> list[str]:
    """verl's ``custom_reward_function`` for the run's reward: the DAPO rule scorer with the
    run's rules when its first reward function is ``sedsft.rl.dapo.dapo_reward``, else the
    project's answer checker (``sedsft.rl.rewards.verl_compute_score``)."""
    funcs = OmegaConf.select(cfg, "reward.funcs", default=None) or []
    first = OmegaConf.to_container(funcs[0], resolve=True) if len(funcs) else {}
    if first.get("_target_") == f"{dapo.__name__}.dapo_reward":
        return [
            f"custom_reward_function.path={Path(dapo.__file__).resolve()}",
            "custom_reward_function.name=verl_compute_score",
            f"++custom_reward_function.reward_kwargs.mode={first.get('mode', 'minerva')}",
            f"++custom_reward_function.reward_kwargs.after_think={bool(first.get('after_think', False))}",
        ]
    return [
        f"custom_reward_function.path={Path(rewards.__file__).resolve()}",
        "custom_reward_function.name=verl_compute_score",
    ]


def verl_overrides(cfg: DictConfig, train_file: str, val_file: str | None) -> list[str]:
    """``key=value`` overrides of ``verl.trainer.main_ppo`` for the settings of ``cfg``."""
    grpo = OmegaConf.to_container(cfg.grpo, resolve=True)
    verl = cfg.verl
    gpus = int(verl.n_gpus_per_node) * int(verl.nnodes)
    if OmegaConf.select(cfg, "batch.prompts_per_update", default=None) is not None:
        sizes = vars(verl_batch(cfg, verl_world(cfg)))  # global numbers: verl takes them as they are
        sizes["updates_per_rollout"] *= int(grpo.get("num_iterations", 1))
    else:
        sizes = batch_sizes(grpo, gpus)
    policy = hf_directory(cfg.policy)
    if policy is None:
        raise VerlMappingError(
            f"policy={cfg.policy}: verl loads a Hugging Face directory; export the checkpoint first "
            "(python src/export.py ckpt=<checkpoint> out=<dir>) or pass an SFT run directory with hf/"
        )
    loss_type = grpo.get("loss_type", "dapo")
    if loss_type not in LOSS_AGG:
        raise VerlMappingError(f"grpo.loss_type={loss_type} has no verl loss_agg_mode; use one of {sorted(LOSS_AGG)}")
    scale = grpo.get("scale_rewards", "group")
    if scale not in ("group", "none", True, False):
        raise VerlMappingError(f"grpo.scale_rewards={scale}: verl's GRPO normalises per group or not at all")
    if grpo.get("importance_sampling_level", "token") != "token":
        raise VerlMappingError("grpo.importance_sampling_level=sequence (GSPO) is not mapped; use token")
    beta = float(grpo.get("beta", 0.0))
    updates = sizes["updates_per_rollout"]
    max_steps = int(grpo.get("max_steps", -1))
    out = [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        f"algorithm.norm_adv_by_std_in_grpo={scale in ('group', True)}",
        f"data.train_files={train_file}",
        f"data.val_files={val_file or train_file}",
        "data.prompt_key=prompt",
        f"data.train_batch_size={sizes['train_batch_size']}",
        f"data.max_prompt_length={cfg.max_prompt_length or 1024}",
        f"data.max_response_length={grpo.get('max_completion_length', 256)}",
        "data.truncation=left",
        "data.filter_overlong_prompts=False",
        f"data.shuffle={bool(grpo.get('shuffle_dataset', True))}",
        f"actor_rollout_ref.model.path={policy.resolve()}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={bool(grpo.get('activation_checkpointing', grpo.get('gradient_checkpointing', True)))}",
        f"actor_rollout_ref.actor.optim.lr={grpo.get('learning_rate', 1e-6)}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={sizes['ppo_mini_batch_size']}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={sizes['ppo_micro_batch_size_per_gpu']}",
        f"actor_rollout_ref.actor.ppo_epochs={int(grpo.get('num_iterations', 1))}",
        f"actor_rollout_ref.actor.clip_ratio_low={grpo.get('epsilon', 0.2)}",
        f"actor_rollout_ref.actor.clip_ratio_high={grpo.get('epsilon_high') or grpo.get('epsilon', 0.2)}",
        f"actor_rollout_ref.actor.loss_agg_mode={LOSS_AGG[loss_type]}",
        f"actor_rollout_ref.actor.use_kl_loss={beta > 0}",
        f"actor_rollout_ref.actor.kl_loss_coef={beta}",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        f"actor_rollout_ref.actor.entropy_coeff={grpo.get('entropy_coef', 0.0)}",
        f"actor_rollout_ref.actor.grad_clip={grpo.get('max_grad_norm', 1.0)}",
        f"actor_rollout_ref.rollout.name={verl.rollout_engine}",
        f"actor_rollout_ref.rollout.n={grpo.get('num_generations', 8)}",
        f"actor_rollout_ref.rollout.temperature={grpo.get('temperature', 1.0)}",
        f"actor_rollout_ref.rollout.top_p={grpo.get('top_p', 1.0)}",
        f"actor_rollout_ref.rollout.top_k={int(grpo.get('top_k') or 0) or -1}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={sizes['ppo_micro_batch_size_per_gpu']}",
        f"actor_rollout_ref.rollout.val_kwargs.n={cfg.heldout.sampling.num_samples}",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={cfg.heldout.sampling.temperature}",
        f"actor_rollout_ref.rollout.val_kwargs.top_p={cfg.heldout.sampling.top_p}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
    ]
    if float(grpo.get("weight_decay", 0.0)) != VERL_WEIGHT_DECAY:  # verl's default otherwise
        out.append(f"actor_rollout_ref.actor.optim.weight_decay={grpo.get('weight_decay', 0.0)}")
    if grpo.get("delta") is not None:
        out.append(f"actor_rollout_ref.actor.clip_ratio_c={grpo['delta']}")
    if verl.use_project_reward:
        out += project_reward_overrides(cfg)
    out.append(f"trainer.total_epochs={int(grpo.get('num_train_epochs', 1))}")
    if max_steps > 0:
        out.append(f"trainer.total_training_steps={math.ceil(max_steps / updates)}")
    save_steps = grpo.get("save_steps")
    if grpo.get("save_strategy", "steps") == "steps" and save_steps:
        out.append(f"trainer.save_freq={max(1, round(save_steps / updates))}")
    every = cfg.heldout.every_n_steps if cfg.heldout.enabled else 0
    out += [
        f"trainer.test_freq={max(1, round(every / updates)) if every else -1}",
        f"trainer.n_gpus_per_node={verl.n_gpus_per_node}",
        f"trainer.nnodes={verl.nnodes}",
        "trainer.logger=[console,tensorboard]",
        "trainer.project_name=sedsft",
        f"trainer.experiment_name=rl_{policy.resolve().parent.name}",
        f"trainer.default_local_dir={Path(cfg.paths.output_dir).resolve() / 'verl_checkpoints'}",
    ]
    out += list(verl.extra)
    lr_schedule = grpo.get("lr_scheduler_type", "linear")
    if lr_schedule != "constant" or grpo.get("warmup_steps"):
        log.warning("grpo.lr_scheduler_type=%s / warmup_steps: the verl command keeps verl's constant lr", lr_schedule)
    return out


def verl_command(cfg: DictConfig) -> str:
    """The shell command (one override per line); writes the prompt files it names."""
    output_dir = Path(cfg.paths.output_dir)
    train_set = build_train_dataset(cfg.data)
    data_source = cfg.verl.get("data_source") or "math_dapo"
    train_file = write_verl_parquet(train_set["prompt"], train_set["gold"], output_dir / "verl" / "train.parquet", data_source)
    val_file = None
    found = heldout_prompts(cfg)
    if found is not None:
        prompts, golds, _ = found
        val_file = write_verl_parquet(prompts, golds, output_dir / "verl" / "val.parquet", data_source)
    overrides = verl_overrides(cfg, str(train_file.resolve()), str(val_file.resolve()) if val_file else None)
    return " \\\n    ".join(["python3 -m verl.trainer.main_ppo", *(shlex.quote(o) for o in overrides)])


def print_verl_command(cfg: DictConfig) -> str:
    """Print the verl command and save it as ``verl_command.sh`` in the run directory."""
    command = verl_command(cfg)
    path = Path(cfg.paths.output_dir) / "verl_command.sh"
    notes = "".join(f"#   {note}\n" for note in NOT_IN_PAPER)
    path.write_text(
        "#!/usr/bin/env bash\n# written by src/rl.py print_verl=true\n"
        f"# settings the paper does not state:\n{notes}" + command + "\n"
    )
    print(command)
    log.info("settings of this command the paper does not state:\n  %s", "\n  ".join(NOT_IN_PAPER))
    log.info("wrote %s and the prompt files in %s", path, path.parent / "verl")
    return command
