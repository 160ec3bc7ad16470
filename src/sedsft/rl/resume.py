"""Resuming a GRPO run to the same result as an uninterrupted one, and stopping it cleanly.

TRL's ``GRPOTrainer`` samples one rollout batch and takes several updates from it
(``steps_per_generation``); the batch lives only in memory (``_buffered_inputs``), so a run
resumed from a checkpoint inside a batch would sample a new one and take other updates.
:class:`ExactResume` stores the buffered batch and the micro-step counter with every
checkpoint (one file per process, read back weights-only) and restores them on resume.

:class:`StopOnSIGTERM` turns SIGTERM (what a scheduler sends before it kills a job) into a
checkpoint at the end of the current update and a stop; the run then exits with status 143
and prints the command that resumes it (:func:`sedsft.utils.preemption.resume_command`).

:func:`check_resume_config` compares a resumed run's knobs with the first run's and names
every one that would change the training (``resume_mismatch: error | warn``).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

log = logging.getLogger(__name__)
ROLLOUT_FILE = "rollout_state_rank{rank}.pt"

# Knobs a resumed run may change: they decide how long it runs, where and how often it
# writes, and how fast it computes, never which rollouts or updates it takes.
RESUME_MAY_CHANGE = (
    "resume", "resume_mismatch", "policy", "paths", "hydra", "task_name", "tags", "cpu_threads", "print_verl",
    "grpo.max_steps", "grpo.num_train_epochs", "grpo.save_steps", "grpo.save_total_limit", "grpo.logging_steps",
    "grpo.logging_first_step", "grpo.report_to", "grpo.dataloader_num_workers", "grpo.log_completions",
    "heldout.every_n_steps",
)  # fmt: skip


class ExactResume:
    """Mixin for ``GRPOTrainer``: checkpoints carry the buffered rollout batch and the
    micro-step counter, and a resumed run continues from them."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)  # every process writes its own share
        state = {"step": self._step, "buffered_inputs": self._buffered_inputs}
        torch.save(state, folder / ROLLOUT_FILE.format(rank=self.accelerator.process_index))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / ROLLOUT_FILE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            log.warning("%s: no rollout state (a checkpoint of an older version): the resumed run samples a "
                        "new rollout batch and will not match an uninterrupted run", checkpoint)  # fmt: skip
            return
        state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]


class StopOnSIGTERM(TrainerCallback):
    """On SIGTERM: save a checkpoint at the end of the current update and stop training.

    The handler only sets a flag (a signal can arrive anywhere); under several processes the
    flag is reduced across them at each step so that every process stops at the same update.
    """

    def __init__(self) -> None:
        self.signalled = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.signalled
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from accelerate import PartialState

            value = torch.tensor([float(flag)], device=PartialState().device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            flag = bool(value.item())
        if flag:
            self.signalled = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def check_resume_config(cfg: DictConfig, first_config: Path) -> list[str]:
    """The knobs (dotted names) whose value differs from the resumed run's first config
    ``first_config`` (its ``.hydra/config.yaml``), leaving out :data:`RESUME_MAY_CHANGE`.

    With ``cfg.resume_mismatch == "error"`` (the default) a difference raises ``ValueError``
    naming each knob with both values; with ``"warn"`` it is logged and the run continues.
    """
    if not first_config.is_file():
        log.warning("resume: %s not found, so the knobs cannot be compared with the first run's", first_config)
        return []
    now = _flatten(OmegaConf.to_container(cfg, resolve=False))
    then = _flatten(OmegaConf.to_container(OmegaConf.load(first_config), resolve=False))
    allowed = tuple(RESUME_MAY_CHANGE)
    changed = sorted(
        key for key in set(now) | set(then)
        if now.get(key) != then.get(key) and not any(key == a or key.startswith(a + ".") for a in allowed)
    )  # fmt: skip
    if changed:
        listed = "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed)
        message = (
            f"resume: these knobs differ from the first run ({first_config}): {listed}. A resumed run "
            "takes the first run's settings: pass its overrides again, or set resume_mismatch=warn to "
            "continue with the new values anyway"
        )
        if cfg.get("resume_mismatch", "error") == "warn":
            log.warning(message)
        else:
            raise ValueError(message)
    return changed
