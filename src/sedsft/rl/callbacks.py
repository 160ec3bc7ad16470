"""Trainer callbacks of the RL stage: TensorBoard under ``rl/`` and held-out evaluation.

TRL's ``GRPOTrainer`` already computes the GRPO diagnostics (``reward``, ``reward_std``,
``frac_reward_zero_std`` = zero-variance groups, ``clip_ratio/{low,high,region}_mean``,
``entropy``, ``completions/{mean,min,max}_length``, ``completions/clipped_ratio``, ``kl``,
``grad_norm``, ``learning_rate``, ``step_time``); :class:`RLTensorBoard` writes every scalar
of each log as ``rl/<TRL key>``. :class:`HeldoutEval` samples the held-out prompts with the
project's evaluation (``sedsft.evaluation``) and writes ``rl/heldout/<metric>``: pass@1,
pass@k, avg@k, distinct-n, self-BLEU, sampled entropy, mean length (and label entropy with
a classifier), the same definitions as the SFT run's ``gen/*``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sedsft.evaluation.evaluate import score_samples
from sedsft.evaluation.sampling import SamplingSettings, iter_samples, merge_samples

log = logging.getLogger(__name__)


class RLTensorBoard(TrainerCallback):
    """Writes every numeric entry of the trainer's logs to TensorBoard as ``rl/<key>``
    (``rl/eval/<key>`` for TRL's ``eval_*`` keys), at the trainer's global step. Only the
    main process writes."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "rl/") -> None:
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            name = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else key
            self.writer.add_scalar(prefix + name, value, step)
        self.writer.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run writes a new run directory: its curves start with the first run's
        # logs (restored from the checkpoint's trainer state), so they cover every step.
        if state.is_world_process_zero and state.global_step > 0:
            for entry in state.log_history:
                self.scalars({k: v for k, v in entry.items() if k != "step"}, entry.get("step", 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.scalars(logs, state.global_step)

    def close(self) -> None:
        """Called by the run once training ended (the held-out evaluation of ``on_train_end``
        runs after this callback's own ``on_train_end`` and still writes)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class HeldoutEval(TrainerCallback):
    """Samples completions for each held-out prompt as ``sampling`` says and scores them,
    before the first update (``before``), every ``every_n_steps`` updates, and after the last.

    Under several processes each samples an equal share of the prompts inside TRL's
    generation context (ZeRO-3 parameters gathered, FSDP-1 parameters summoned), the texts
    are gathered and every process scores them; the main process writes TensorBoard.

    Attributes:
        history: ``(step, metrics)`` of every evaluation (a resumed run's include the first
            run's, stored with each checkpoint).
        before: the metrics at step 0.
        seconds: time spent evaluating, to separate it from the update time.
    """

    def __init__(
        self,
        prompts: Sequence[list[dict[str, str]]],
        golds: Sequence[str | None],
        tokenizer: Any,
        tensorboard: RLTensorBoard | None,
        sampling: SamplingSettings,
        every_n_steps: int = 0,
        classify: Callable[[str], str] | None = None,
    ):
        if every_n_steps < 0:
            raise ValueError(f"heldout: every_n_steps must be >= 0, got {every_n_steps}")
        self.prompts, self.golds = list(prompts), list(golds)
        self.tokenizer, self.tensorboard = tokenizer, tensorboard
        # seed: the base of each evaluation's own (+ 1000 x step + rank); None counts as 0
        self.sampling, self.every_n_steps, self.classify = sampling, every_n_steps, classify
        self.trainer = None  # set by the caller once the trainer exists (for its accelerator)
        self.history: list[tuple[int, dict[str, float]]] = []
        self.before: dict[str, float] | None = None
        self.seconds = 0.0
        self.stopping: Callable[[], bool] = lambda: False  # set by the run: True once pre-empted

    def evaluate(self, model, step: int) -> dict[str, float]:
        """Sample and score the held-out prompts with ``model`` (the trainer's, wrapped or not)."""
        start = time.perf_counter()
        accelerator = getattr(self.trainer, "accelerator", None)
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        # equal shares (the last prompt repeated as padding): sharded models generate in lockstep
        count = len(self.prompts)
        padded = count + (-count) % world
        indices = [min(i, count - 1) for i in range(rank, padded, world)]
        # a forked RNG: the held-out sampling (seeded per step) leaves the rollouts' RNG as it was,
        # so training does not depend on when or whether the evaluation runs
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        settings = replace(self.sampling, seed=(self.sampling.seed or 0) + step * 1000 + rank)
        with torch.random.fork_rng(devices=devices), self._generation_context(model) as unwrapped:
            shard = [
                (indices[j], samples)
                for j, samples in iter_samples(unwrapped, self.tokenizer, [self.prompts[i] for i in indices], settings)
            ]  # fmt: skip
        if world > 1:
            from accelerate.utils import gather_object

            shard = gather_object(shard)
        by_index = dict(shard)  # a padded duplicate only repeats its prompt's index
        merged = merge_samples([by_index[i] for i in range(count)])
        metrics, _ = score_samples(merged, self.golds, self.sampling.num_samples, self.classify)
        metrics["num_prompts"] = float(count)
        self.seconds += time.perf_counter() - start
        return metrics

    @contextmanager
    def _generation_context(self, model):
        """``model`` ready to generate: unwrapped by TRL's helper (ZeRO-3 parameters gathered)
        with FSDP-1 parameters summoned; the model itself when there is no trainer."""
        if self.trainer is None:
            yield model
            return
        from trl.distributed import DistributedBackend
        from trl.models import unwrap_model_for_generation

        trainer = self.trainer
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation
            ) as unwrapped,
            DistributedBackend(trainer.accelerator).summon_full_params(trainer.model_wrapped, recurse=False),
        ):
            yield unwrapped

    def _run(self, model, state) -> None:
        step = state.global_step
        if self.history and self.history[-1][0] == step:
            return
        metrics = self.evaluate(model, step)
        self.history.append((step, metrics))
        if step == 0:
            self.before = metrics
        if state.is_world_process_zero:
            if self.tensorboard is not None:
                self.tensorboard.scalars(metrics, step, prefix="rl/heldout/")
            shown = [f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("pass@", "avg@", "distinct_4", "self_bleu"))]
            log.info("held-out evaluation at update %d: %s", step, ", ".join(shown))

    # ------------------------------------------------------------------ resume
    STATE_FILE = "heldout.json"

    def on_save(self, args, state, control, **kwargs):
        """Every checkpoint carries the evaluations so far (a resumed run reports them too)."""
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            state_file = {"before": self.before, "history": [[step, m] for step, m in self.history]}
            (folder / self.STATE_FILE).write_text(json.dumps(state_file))

    def load(self, checkpoint: str | Path) -> None:
        """The evaluations stored with ``checkpoint`` (none in a checkpoint without the file)."""
        path = Path(checkpoint) / self.STATE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            self.before = stored["before"]
            self.history = [(int(step), metrics) for step, metrics in stored["history"]]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._run(model, state)
        elif state.is_world_process_zero and self.tensorboard is not None:
            for step, metrics in self.history:  # the first run's evaluations, in this run's curves
                self.tensorboard.scalars(metrics, step, prefix="rl/heldout/")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._run(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.stopping():  # a pre-empted run saves and exits; it evaluates when it ends
            self._run(model, state)
