"""The answer reward with GRPO's exploration made visible, per difficulty.

GRPO learns only from groups whose rewards differ: a group of ``num_generations``
completions of one prompt that are all wrong (or all right) has zero advantage everywhere.
How many groups hold at least one correct completion is therefore what exploration buys
(the paper's mechanism: a more diverse SFT policy finds the rare working route in more
groups). :class:`ExplorationReward` scores completions exactly as
``rewards.math_answer_reward`` and, at every rollout batch, logs through TRL's
``log_metric`` hook (``rl/explore/<difficulty>/<metric>`` in TensorBoard and
``metrics.json``):

- ``reward``: mean reward;
- ``any_correct``: fraction of groups with at least one correct completion;
- ``all_equal``: fraction of groups whose rewards are all equal (no learning signal);
- ``route/<route>``: share of completions per route, when a classifier is given;
- ``unfaithful``: share of completions whose boxed answer is right but whose steps fail the
  ``verify`` check (scored wrong), when one is given.

``<difficulty>`` is ``all`` and, when a ``difficulty`` function is given, each value it
returns for the prompts' questions (``easy`` / ``hard`` on the routes task).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from sedsft.rl.rewards import completion_text, math_answer_reward

log = logging.getLogger(__name__)


def prompt_question(prompt: Any) -> str:
    """The last user turn of a TRL prompt (a string or a list of messages)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


def exploration_stats(
    questions: Sequence[str],
    rewards: Sequence[float | None],
    texts: Sequence[str],
    num_generations: int,
    correct: float = 1.0,
    difficulty: Callable[[str], str] | None = None,
    classify: Callable[[str], str] | None = None,
    routes_known: Sequence[str] = (),
    unfaithful: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Group statistics of one rollout batch: completions come in consecutive groups of
    ``num_generations`` sharing a question (TRL's order). Groups whose questions differ, or
    that hold an unscorable (None) reward, are left out and counted in ``skipped_groups``.
    Every route in ``routes_known`` gets a share, 0 when no completion took it: a logger that
    keeps each name's last value would otherwise report a share from an older batch."""
    if not len(questions) == len(rewards) == len(texts):
        raise ValueError(f"got {len(questions)} questions, {len(rewards)} rewards, {len(texts)} texts")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    groups: dict[str, list[list[float]]] = defaultdict(list)
    routes: dict[str, Counter] = defaultdict(Counter)
    flagged: dict[str, list[bool]] = defaultdict(list)
    skipped = 0
    for begin in range(0, len(questions) - num_generations + 1, num_generations):
        span = slice(begin, begin + num_generations)
        group_rewards = list(rewards[span])
        if len(set(questions[span])) != 1 or any(r is None for r in group_rewards):
            skipped += 1
            continue
        kinds = ["all"] + ([difficulty(questions[begin])] if difficulty else [])
        for kind in kinds:
            groups[kind].append(group_rewards)
            if classify:
                routes[kind].update(classify(t) for t in texts[span])
            if unfaithful is not None:
                flagged[kind].extend(unfaithful[span])
    out: dict[str, float] = {"skipped_groups": float(skipped)}
    for kind, members in groups.items():
        flat = [r for g in members for r in g]
        out[f"{kind}/reward"] = sum(flat) / len(flat)
        out[f"{kind}/any_correct"] = sum(any(r >= correct for r in g) for g in members) / len(members)
        out[f"{kind}/all_equal"] = sum(len(set(g)) == 1 for g in members) / len(members)
        out[f"{kind}/groups"] = float(len(members))
        if unfaithful is not None:
            out[f"{kind}/unfaithful"] = sum(flagged[kind]) / len(flagged[kind])
        total = sum(routes[kind].values())
        if classify:
            for route in sorted(set(routes_known) | set(routes[kind])):
                out[f"{kind}/route/{route}"] = routes[kind][route] / total
    return out


class ExplorationReward:
    """``math_answer_reward`` that logs :func:`exploration_stats` of each rollout batch.

    Args:
        num_generations: completions per prompt (``grpo.num_generations``).
        difficulty: question -> difficulty name, e.g. ``toy_routes.question_difficulty``.
        classify: completion -> route, e.g. ``toy_routes.classify_route``.
        verify: (question, completion) -> whether its steps hold, e.g.
            ``route_steps.steps_hold``; a right answer whose steps fail is scored ``wrong``.
        correct, wrong: the reward values, as ``math_answer_reward``.
    """

    __name__ = "math_answer_reward"  # TRL names the logged reward after it: rewards/math_answer_reward/mean

    def __init__(
        self,
        num_generations: int,
        difficulty: Callable[[str], str] | None = None,
        classify: Callable[[str], str] | None = None,
        correct: float = 1.0,
        wrong: float = 0.0,
        verify: Callable[[str, str], bool] | None = None,
    ):
        if num_generations < 1:
            raise ValueError(f"reward: num_generations must be >= 1, got {num_generations}")
        self.num_generations, self.difficulty, self.classify = num_generations, difficulty, classify
        self.correct, self.wrong, self.verify = correct, wrong, verify
        self._warned = False
        self._routes_seen: set[str] = set()  # every route logged so far: logged again (0) when absent

    def __call__(
        self,
        completions: Sequence[Any],
        gold: Sequence[str | None],
        prompts: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        rewards = math_answer_reward(completions, gold, correct=self.correct, wrong=self.wrong)
        texts = [completion_text(c) for c in completions]
        questions = [prompt_question(p) for p in prompts] if prompts is not None else None
        unfaithful = None
        if self.verify is not None:
            if questions is None:
                raise ValueError("reward: checking the steps (verify=...) needs the prompts; TRL passes them as prompts=")
            unfaithful = [r is not None and r >= self.correct and not self.verify(q, t) for r, q, t in zip(rewards, questions, texts, strict=True)]
            rewards = [self.wrong if flag else r for r, flag in zip(rewards, unfaithful, strict=True)]
        if log_metric is not None and questions is not None:
            stats = exploration_stats(
                questions, rewards, texts, self.num_generations,
                correct=self.correct, difficulty=self.difficulty, classify=self.classify,
                routes_known=sorted(self._routes_seen), unfaithful=unfaithful,
            )  # fmt: skip
            self._routes_seen |= {name.rsplit("/", 1)[1] for name in stats if "/route/" in name}
            if stats["skipped_groups"] and not self._warned:
                self._warned = True
                log.warning("exploration: %d groups of this rollout batch were not whole on this process", stats["skipped_groups"])
            for name, value in stats.items():
                log_metric(f"explore/{name}", value)
        return rewards
