"""Checks of the RL stage's config and prompts, by knob name, before anything slow.

``GRPOConfig`` accepts numbers TRL never looks at again until the first step: a negative
``grpo.learning_rate`` surfaces as torch's ``Invalid learning rate: -1`` with no knob named, a
negative ``grpo.epsilon`` trains silently with a clip range that flags most tokens as clipped.
As for SFT (``sedsft.sft.checks``), every numeric knob is checked here before the policy is
loaded, all problems in one ``ValueError``. Prompts longer than ``max_prompt_length`` or than
the model's context are named in a warning at start-up, as evaluation does for its prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sedsft.utils.batches import rl_batch_problems
from sedsft.utils.knobs import check_knob, is_number
from sedsft.utils.world import launcher_world

log = logging.getLogger(__name__)

# key: (type, lowest allowed, highest allowed, None allowed, what the knob is / example);
# bounds as sedsft.utils.knobs.check_knob reads them (inclusive unless ("open", value)).
RL_KNOBS: dict[str, tuple[type, Any, Any, bool, str]] = {
    "grpo.learning_rate": (float, ("open", 0), None, False, "AdamW lr, e.g. 1e-6"),
    "grpo.epsilon": (float, ("open", 0), None, False, "lower clip of the ratio, 1 - epsilon, e.g. 0.2"),
    "grpo.epsilon_high": (float, ("open", 0), None, True, "upper clip of the ratio, 1 + epsilon_high, e.g. 0.28"),
    "grpo.delta": (float, ("open", 1), None, True, "dual-clip cap of the ratio for negative advantages, e.g. 3.0, or null"),
    "grpo.beta": (float, 0, None, False, "KL coefficient, 0 = no reference model"),
    "grpo.num_generations": (int, 2, None, True, "completions per prompt, e.g. 8"),
    "grpo.generation_batch_size": (int, 1, None, True, "completions per rollout batch, e.g. 2048"),
    "grpo.per_device_train_batch_size": (int, 1, None, False, "completions per micro-step, e.g. 4"),
    "grpo.gradient_accumulation_steps": (int, 1, None, True, "micro-steps per update, e.g. 8, or null = from batch.*"),
    "grpo.num_iterations": (int, 1, None, False, "passes over each rollout batch, e.g. 1"),
    "grpo.max_steps": (int, -1, None, False, "optimizer updates, -1 = by epochs"),
    "grpo.num_train_epochs": (float, ("open", 0), None, False, "epochs over the RL prompts, e.g. 10"),
    "grpo.max_completion_length": (int, 1, None, False, "response tokens, e.g. 3072"),
    "grpo.temperature": (float, ("open", 0), None, False, "rollout temperature, e.g. 1.0"),
    "grpo.top_p": (float, ("open", 0), 1, False, "rollout nucleus threshold, e.g. 1.0"),
    "grpo.top_k": (int, 0, None, True, "0 = off"),
    "grpo.weight_decay": (float, 0, None, False, "e.g. 0.01"),
    "grpo.adam_beta1": (float, 0, ("open", 1), False, "e.g. 0.9"),
    "grpo.adam_beta2": (float, 0, ("open", 1), False, "e.g. 0.999"),
    "grpo.adam_epsilon": (float, ("open", 0), None, False, "e.g. 1e-8"),
    "grpo.max_grad_norm": (float, 0, None, True, "global gradient norm, e.g. 1.0"),
    "grpo.warmup_steps": (float, 0, None, False, "warm-up updates, e.g. 0"),
    "grpo.logging_steps": (float, ("open", 0), None, False, "updates between logs, e.g. 1"),
    "grpo.save_steps": (float, ("open", 0), None, False, "updates between checkpoints, e.g. 64"),
    "max_prompt_length": (int, 1, None, True, "prompt tokens kept, e.g. 1024, or null"),
    "heldout.num_prompts": (int, 1, None, True, "held-out prompts, e.g. 64, or null = all"),
    "heldout.every_n_steps": (int, 0, None, False, "updates between held-out passes, 0 = start and end only"),
    "heldout.sampling.num_samples": (int, 1, None, False, "completions per held-out prompt, e.g. 8"),
    "heldout.sampling.max_new_tokens": (int, 1, None, False, "e.g. 3072"),
    "heldout.sampling.temperature": (float, ("open", 0), None, False, "e.g. 1.0"),
    "heldout.sampling.top_p": (float, ("open", 0), 1, False, "e.g. 1.0"),
    "heldout.sampling.batch_size": (int, 1, None, False, "prompts per generate call, e.g. 16"),
    "heldout.sampling.max_batch_tokens": (int, 1, None, True, "e.g. 65536, or null"),
}


def validate_rl_config(cfg: DictConfig) -> None:
    """Raise one ``ValueError`` naming every out-of-range or non-numeric RL knob."""
    problems = [p for key, spec in RL_KNOBS.items() if (p := check_knob(cfg, key, *spec))]
    low, high = (OmegaConf.select(cfg, f"grpo.{k}", default=None) for k in ("epsilon", "epsilon_high"))
    if is_number(low, float) and is_number(high, float) and low > 0 and 0 < high < low:
        problems.append(
            f"grpo.epsilon_high={high} must be >= grpo.epsilon={low} (the clip range is [1 - epsilon, 1 + epsilon_high]; "
            "null = epsilon)"
        )
    if not problems:  # the global batches against the processes the launcher started (before any stage runs)
        problems += rl_batch_problems(cfg, launcher_world())
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def warn_long_prompts(
    prompts: Sequence[list[dict]],
    tokenizer: Any,
    max_prompt_length: int | None,
    max_completion_length: int,
    context: int | None,
) -> None:
    """Warn when RL prompts (chat-templated, as GRPO renders them) are cut by
    ``max_prompt_length`` (their first tokens are dropped) or when the longest prompt kept
    plus ``grpo.max_completion_length`` overruns the model's ``context`` positions."""
    if not prompts:
        return
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    longest = max(lengths)
    limit = max_prompt_length if max_prompt_length is not None else math.inf
    cut = sum(n > limit for n in lengths)
    if cut:
        log.warning(
            "%d of %d RL prompts are longer than max_prompt_length=%d tokens (the longest: %d) and lose their "
            "first tokens (cut from the left, as verl's truncation=left); raise max_prompt_length or shorten them",
            cut, len(lengths), max_prompt_length, longest,
        )  # fmt: skip
    kept = min(longest, limit)
    if context and kept + max_completion_length > context:
        log.warning(
            "RL prompts of up to %d tokens + grpo.max_completion_length=%d overrun the model's context of %d "
            "positions; rollouts past it are unreliable (set max_prompt_length<=%d, lower grpo.max_completion_length, "
            "or use a longer-context model)",
            kept, max_completion_length, context, max(context - max_completion_length, 1),
        )  # fmt: skip
