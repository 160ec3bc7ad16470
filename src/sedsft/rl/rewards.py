"""Reward functions for GRPO, in TRL's calling convention.

TRL calls each reward function once per generation batch with keyword arguments:
``prompts`` and ``completions`` (one per sampled completion; for chat prompts a completion
is ``[{"role": "assistant", "content": text}]``), ``completion_ids``, and every column of
the data set repeated per completion (here ``gold``); it expects one float per completion
(None = not scorable). A reward is chosen in the config by ``_target_`` (with
``_partial_: true`` for a function with knobs), so any importable function works.

``math_answer_reward`` is the project's answer checker (``sedsft.metrics.is_correct``: the
last ``\\boxed{}`` against the gold with math-verify), the same function that scores
pass@k in evaluation. ``verl_compute_score`` exposes it in verl's custom-reward signature,
so a verl run scores exactly as a TRL run does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sedsft.metrics import is_correct


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or the content of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unexpected completion {type(completion).__name__}: expected a string or a list of messages")


def math_answer_reward(
    completions: Sequence[Any],
    gold: Sequence[str | None],
    correct: float = 1.0,
    wrong: float = 0.0,
    **_: Any,
) -> list[float | None]:
    """``correct`` when the last ``\\boxed{}`` of a completion equals its gold answer,
    ``wrong`` otherwise (no box, unparsable, different value); None where there is no gold.

    With GRPO's per-group normalisation (``scale_rewards=group``) the advantages do not
    depend on the two values as long as ``correct > wrong``: 1 / 0 (the default, so the
    logged mean reward is the accuracy) and verl's DAPO scorer's 1 / -1 train identically.
    """
    if len(completions) != len(gold):
        raise ValueError(f"got {len(completions)} completions but {len(gold)} gold answers")
    return [
        None if answer is None else (correct if is_correct(completion_text(c), answer) else wrong)
        for c, answer in zip(completions, gold, strict=True)
    ]


def verl_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None, **_: Any
) -> float:
    """verl's ``custom_reward_function`` signature over the same checker: 1.0 if correct,
    else 0.0 (``custom_reward_function.path=<this file> custom_reward_function.name=verl_compute_score``)."""
    return 1.0 if is_correct(solution_str, ground_truth) else 0.0
