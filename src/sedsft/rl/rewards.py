"""Reward functions for GRPO, in TRL's calling convention.

TRL calls each reward function once per generation batch with keyword arguments:
``prompts`` and ``completions`` (one per sampled completion; for chat prompts a completion
is ``[{"role": "assistant", "content": text}]``), ``completion_ids``, and every column of
the data set repeated per completion (here ``gold``); it expects one float per completion
(None = not scorable). A reward is chosen in the config by ``_target_`` (with
``_partial_: true`` for a function with knobs), so any importable function works.

``math_answer_reward`` is the project's answer checker (``sedsft.metrics.grade``: the last
``\\boxed{}`` against the gold), the same function that scores pass@k in evaluation. Every
symbolic check runs in a worker process under a hard time limit (``timeout_s``), so no
completion can stall a GRPO step however adversarial its answer (``10^{10^{10}}`` and the like
are refused before evaluation). Through TRL's ``log_metric`` each batch reports
``grading/timeouts``, ``grading/refused`` and ``grading/no_answer`` (counts per reward call,
averaged over a logging step; TensorBoard ``rl/grading/*``). ``verl_compute_score`` exposes
the checker in verl's custom-reward signature, so a verl run scores exactly as a TRL run does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sedsft.metrics import grade, is_correct
from sedsft.metrics.answers import DEFAULT_TIMEOUT_S


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or the content of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"unexpected completion {type(completion).__name__}: expected a string or a list of messages"
    )


def _question(prompt: Any) -> str | None:
    """The last user turn of a chat prompt (or the prompt text): it tells the checker
    whether a list answer is a set ("Determine all ...")."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [
            m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"
        ]
        if users and isinstance(users[-1], str):
            return users[-1]
    return None


def math_answer_reward(
    completions: Sequence[Any],
    gold: Sequence[str | None],
    correct: float = 1.0,
    wrong: float = 0.0,
    boxed_only: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prompts: Sequence[Any] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    **_: Any,
) -> list[float | None]:
    """``correct`` when the answer of a completion (its last ``\\boxed{}``; with
    ``boxed_only=False`` also the toolkit's fallbacks) equals its gold answer, ``wrong``
    otherwise (no answer, unparsable, different value, too big to evaluate, or a check past
    ``timeout_s`` seconds); None where there is no gold.

    With GRPO's per-group normalisation (``scale_rewards=group``) the advantages do not
    depend on the two values as long as ``correct > wrong``: 1 / 0 (the default, so the
    logged mean reward is the accuracy) and verl's DAPO scorer's 1 / -1 train identically.
    """
    if len(completions) != len(gold):
        raise ValueError(f"got {len(completions)} completions but {len(gold)} gold answers")
    questions = (
        [_question(p) for p in prompts]
        if prompts is not None and len(prompts) == len(gold)
        else None
    )
    rewards: list[float | None] = []
    statuses: Counter[str] = Counter()
    for i, (completion, answer) in enumerate(zip(completions, gold, strict=True)):
        if answer is None:
            rewards.append(None)
            continue
        verdict = grade(completion_text(completion), answer, questions[i] if questions else None,
                        boxed_only=boxed_only, timeout_s=timeout_s)  # fmt: skip
        statuses[verdict.status] += 1
        rewards.append(correct if verdict.correct else wrong)
    if log_metric is not None:
        for status in ("timeout", "refused", "no_answer"):
            key = "timeouts" if status == "timeout" else status
            log_metric(f"grading/{key}", float(statuses[status]))
    return rewards


def verl_compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None, **_: Any
) -> float:
    """verl's ``custom_reward_function`` signature over the same checker: 1.0 if correct,
    else 0.0 (``custom_reward_function.path=<this file> custom_reward_function.name=verl_compute_score``)."""
    return 1.0 if is_correct(solution_str, ground_truth) else 0.0
