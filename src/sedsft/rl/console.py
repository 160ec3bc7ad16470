"""The RL stage's terminal, read like the other stages': one line per logged update instead of
TRL's dicts of quoted numbers, a progress bar only while updates run, and a final table of
the held-out metrics before and after RL with the key to them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from sedsft.utils.console import METRIC_KEY, format_columns, format_table

log = logging.getLogger(__name__)

# The TRL scalars shown per update, in this order, under these names (all go to TensorBoard).
SHOWN = {
    "reward": "reward",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "zero_std_groups",
    "loss": "loss",
    "clip_ratio/region_mean": "clipped",
    "entropy": "entropy",
    "completions/mean_length": "length",
    "grad_norm": "grad_norm",
}
HELDOUT_SHOWN = ("pass@1", "pass@8", "pass@16", "avg@8", "distinct_4", "self_bleu", "sampled_entropy", "label_entropy")


class BarOnly(ProgressCallback):
    """TRL's progress bar without the dict it writes under the bar at every log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class UpdateLines(TrainerCallback):
    """``update 3/100: reward 0.3656, loss 0.2410, ...`` for each log of the trainer."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = [f"{name} {logs[key]:.4g}" for key, name in SHOWN.items() if isinstance(logs.get(key), int | float)]
        if shown:
            log.info("update %d/%d: %s", state.global_step, state.max_steps, ", ".join(shown))


def use_console(trainer) -> None:
    """Swap TRL's printing callbacks for :class:`UpdateLines` (and :class:`BarOnly` when the
    run shows a progress bar)."""
    trainer.remove_callback(PrinterCallback)
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    if had_bar:
        trainer.add_callback(BarOnly)
    trainer.add_callback(UpdateLines)


def final_report(metrics: Mapping[str, float], output_dir) -> str:
    """The table printed when an RL run ends: held-out metrics before and after RL side by side
    (when there was a held-out set), the last update's scalars, and the key."""
    before = {k: metrics[f"heldout_before/{k}"] for k in HELDOUT_SHOWN if f"heldout_before/{k}" in metrics}
    after = {k: metrics[f"heldout/{k}"] for k in HELDOUT_SHOWN if f"heldout/{k}" in metrics}
    parts = []
    if before or after:
        parts.append(format_columns({"before RL": before, "after RL": after}, "held-out"))
    last = {name: metrics[f"rl/{key}"] for key, name in SHOWN.items() if f"rl/{key}" in metrics}
    last["updates"] = metrics.get("global_step", float("nan"))
    last["seconds_per_update"] = metrics.get("seconds_per_step", float("nan"))
    parts.append(format_table(last, "last update"))
    parts.append(f"all metrics: {output_dir}/metrics.json; policy: {output_dir}/hf")
    parts.append(METRIC_KEY)
    return "\n".join(parts)
