"""The routes task: toy word problems where the solution route decides success on a hard slice.

Problems and solution styles are the toy's (``toy_math.Problem``, ``toy_math.STYLES``:
``start``, then a ``first`` and a ``second`` signed change). What differs is which numbers
occur where, so that the route RL picks matters:

- **Easy** problems (the *covered range*, the only ones pretraining and SFT see): every
  number in them, given or computed (start, running total ``start + first``, answer, net
  change ``first + second``), lies in ``0 .. cap``. The tokenizer still has a token for
  every whole number up to 63, so the numbers past ``cap`` exist in the vocabulary but are
  never read or written before RL.
- **Hard** problems (RL prompts and held-out only): the first change is an increase whose
  running total lands in ``cap + 1 .. hard_max``; the start, both changes, the net change
  and the answer stay covered. A route that writes the running total (``step_by_step``,
  ``narrative``) has to write a number the model has never produced; ``net_change`` adds
  the two changes, then applies the net change to the start, both covered sums.
  ``one_equation`` writes no intermediate and is measured, not assumed.

Why the hard totals are numbers never seen, not only sums never computed: with every number
up to ``hard_max`` seen in pretraining (starts above ``cap`` that then decrease,
``Ranges(seen_above_cap=True)``), GRPO taught the dominant route the unseen sums themselves
(forced ``step_by_step`` on held-out hard problems 0.02 -> 0.32 after 240 updates, CE, three
seeds) and the rare route's share did not move, so RL's gain said nothing about exploring
routes. With the hard totals unseen, the dominant route cannot be rescued by reward within
an RL budget, and the only way up on the hard slice is the route SFT made rare.

The SFT mix makes a route that writes the running total dominant, so CE-SFT leaves the
working route rare, and RL has to find it on the hard prompts.

Splits are drawn from disjoint sets of number triples ``(start, first, second)``: a
held-out problem shares neither its text nor its numbers with any SFT, RL or calibration
problem; held-out and RL hard problems do not even share their first (unseen) sum, so RL
cannot carry a sum learnt by heart over to the held-out slice. Each split's rows are a pure
function of ``(split, n, seed, ranges, style weights)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

from sedsft.data import toy_math
from sedsft.data.toy_math import (
    GAIN_VERBS,
    STYLES,
    Problem,
    classify_style,
    make_problem,
)

DIFFICULTIES = ("easy", "hard")
SPLITS = ("pretrain", "sft", "calibration", "rl", "heldout")
"""``pretrain`` and ``sft`` share the SFT triples (easy); ``calibration`` (easy, for tau) and
``heldout`` (easy and hard) have triples of their own; ``rl`` has its own easy and hard triples."""

# share of each difficulty's triples given to each split (the rest of the easy ones go to SFT)
EASY_SHARES = {"heldout": 0.10, "calibration": 0.05, "rl": 0.15}
HARD_SHARES = {"heldout": 0.52, "rl": 0.48}  # about 200 of the 385 hard triples (default ranges) held out
# which difficulties a split draws from, in equal parts, interleaved
SPLIT_MIX = {
    "pretrain": ("easy",),
    "sft": ("easy",),
    "calibration": ("easy",),
    "rl": ("easy", "hard"),
    "heldout": ("easy", "hard"),
}
PARTITION_SEED = 20_231  # fixes which triples belong to which split; not a run's seed


@dataclass(frozen=True)
class Ranges:
    """The number ranges of the task.

    Attributes:
        cap: largest value a solution computes on an easy problem (running total, answer);
            also the largest start and answer of a hard problem.
        hard_max: largest running total of a hard problem (hard totals: ``cap+1 .. hard_max``).
        max_change: largest size of a change (changes are ``±1 .. max_change``).
        start_min: smallest start.
        seen_above_cap: whether easy problems may start above ``cap`` (up to
            ``cap + max_change``, then decrease into it), so that every number up to
            ``hard_max`` is read and copied in pretraining. Off by default: the hard running
            totals are then numbers the model never sees before RL (module docstring).
    """

    cap: int = 31
    hard_max: int = 41
    max_change: int = 10
    start_min: int = 2
    seen_above_cap: bool = False

    def __post_init__(self):
        if not 0 <= self.start_min <= self.cap < self.hard_max:
            raise ValueError(f"routes ranges: need 0 <= start_min <= cap < hard_max, got {asdict(self)}")
        if self.max_change < 1 or self.hard_max > self.cap + self.max_change:
            raise ValueError(
                f"routes ranges: need max_change >= 1 and hard_max <= cap + max_change (a hard running "
                f"total is a covered start plus one change), got {asdict(self)}"
            )
        if self.cap + self.max_change >= toy_math.WHOLE_NUMBERS:
            raise ValueError(
                f"routes ranges: starts reach cap + max_change = {self.cap + self.max_change}, past the "
                f"tiny tokenizer's whole-number tokens 0..{toy_math.WHOLE_NUMBERS - 1}; lower cap or max_change"
            )

    @property
    def start_max(self) -> int:
        """Largest start: ``cap``, or ``cap + max_change`` with ``seen_above_cap``."""
        return self.cap + self.max_change if self.seen_above_cap else self.cap


def difficulty(start: int, first: int, second: int, ranges: Ranges) -> str | None:
    """``"easy"``, ``"hard"`` or None (neither: outside the task) for one number triple."""
    middle, answer, net = start + first, start + first + second, first + second
    changes_ok = 1 <= abs(first) <= ranges.max_change and 1 <= abs(second) <= ranges.max_change
    if not changes_ok or not 0 <= answer <= ranges.cap or start < ranges.start_min:
        return None
    if 0 <= middle <= ranges.cap and start <= ranges.start_max and abs(net) <= ranges.cap:
        return "easy"
    if first > 0 and second < 0 and start <= ranges.cap and ranges.cap < middle <= ranges.hard_max:
        return "hard"
    return None


@lru_cache(maxsize=16)
def triples(ranges: Ranges) -> dict[str, tuple[tuple[int, int, int], ...]]:
    """Every number triple of each difficulty, in a fixed order."""
    out: dict[str, list[tuple[int, int, int]]] = {d: [] for d in DIFFICULTIES}
    changes = [c for c in range(-ranges.max_change, ranges.max_change + 1) if c]
    for start in range(ranges.start_min, ranges.start_max + 1):
        for first in changes:
            for second in changes:
                kind = difficulty(start, first, second, ranges)
                if kind is not None:
                    out[kind].append((start, first, second))
    return {d: tuple(v) for d, v in out.items()}


@lru_cache(maxsize=16)
def partition(ranges: Ranges) -> dict[tuple[str, str], tuple[tuple[int, int, int], ...]]:
    """The triples of each ``(split, difficulty)``: disjoint across splits (``pretrain``
    and ``sft`` share theirs), fixed by ``PARTITION_SEED``; held-out and RL hard problems
    also never share a first sum."""
    out: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {}
    pool = list(triples(ranges)["easy"])
    random.Random(f"{PARTITION_SEED}-easy").shuffle(pool)
    begin = 0
    for split, share in EASY_SHARES.items():
        stop = begin + round(share * len(pool))
        out[(split, "easy")] = tuple(pool[begin:stop])
        begin = stop
    out[("sft", "easy")] = out[("pretrain", "easy")] = tuple(pool[begin:])
    # Hard problems are split by their first sum (start, first change), not by triple: the
    # unseen sums are few (55 with the default ranges), so RL on a held-out problem's first
    # sum could teach the running-total route that sum by heart; with whole sums apart, what
    # RL can carry over to held-out hard problems is the choice of route.
    sums: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for triple in triples(ranges)["hard"]:
        sums.setdefault(triple[:2], []).append(triple)
    keys = sorted(sums)
    random.Random(f"{PARTITION_SEED}-hard").shuffle(keys)
    total = sum(len(v) for v in sums.values())
    held: list[tuple[int, int, int]] = []
    rest: list[tuple[int, int, int]] = []
    for key in keys:
        (held if len(held) < HARD_SHARES["heldout"] * total else rest).extend(sums[key])
    out[("heldout", "hard")], out[("rl", "hard")] = tuple(held), tuple(rest)
    return out


def problem_difficulty(problem: Problem, ranges: Ranges) -> str | None:
    return difficulty(problem.start, problem.first, problem.second, ranges)


def _draw(
    split: str, n: int, seed: int, style_weights: Mapping[str, float] | None, ranges: Ranges
) -> list[tuple[Problem, str, str]]:
    """``(problem, difficulty, style)`` for ``n`` problems of ``split`` (see ``generate``)."""
    if split not in SPLITS:
        raise ValueError(f"routes split {split!r}: allowed {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"routes {split}: n must be >= 0, got {n}")
    parts = partition(ranges)
    kinds = list(SPLIT_MIX[split])
    counts = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    rng = random.Random(f"routes-{split}-{seed}")
    pick_style = toy_math._style_sampler(rng, style_weights)
    drawn: dict[str, list[tuple[int, int, int]]] = {}
    for kind in kinds:
        pool = parts[(split, kind)]
        if not pool:
            raise ValueError(f"routes {split}: no {kind} triples for ranges {asdict(ranges)}")
        if split in ("heldout", "calibration"):
            if counts[kind] > len(pool):
                raise ValueError(
                    f"routes {split}: n={n} asks for {counts[kind]} {kind} problems with numbers of their "
                    f"own, but the split has {len(pool)} {kind} triples; lower n"
                )
            drawn[kind] = rng.sample(pool, counts[kind])
        else:
            drawn[kind] = [rng.choice(pool) for _ in range(counts[kind])]
    out = []
    for i in range(max(counts.values(), default=0)):
        for kind in kinds:
            if i < len(drawn[kind]):
                out.append((make_problem(rng, *drawn[kind][i]), kind, pick_style()))
    return out


def generate(
    split: str,
    n: int,
    seed: int = 0,
    style_weights: Mapping[str, float] | None = None,
    ranges: Ranges | None = None,
) -> list[dict[str, str]]:
    """``n`` rows ``{"question", "response", "answer", "style", "difficulty"}`` of ``split``.

    Easy and hard rows alternate in the order of ``SPLIT_MIX`` (a split with both is half
    each, interleaved, so any prefix is balanced). ``heldout`` and ``calibration`` draw
    triples without repetition (each of their problems has numbers of its own) and fail
    when ``n`` asks for more than there are; ``pretrain``, ``sft`` and ``rl`` draw with
    repetition (the names, items and verbs still vary). ``style_weights`` as in
    ``toy_math.generate`` (None: uniform).
    """
    return [
        {
            "question": problem.question,
            "response": STYLES[style](problem),
            "answer": str(problem.answer),
            "style": style,
            "difficulty": kind,
        }
        for problem, kind, style in _draw(split, n, seed, style_weights, ranges or Ranges())
    ]


def corpus(n: int, seed: int = 0, ranges: Ranges | None = None) -> list[str]:
    """Tokenizer texts as ``toy_math.corpus``: ``n`` pretraining problems, each followed by
    its solution in every style."""
    return [
        f"{problem.question}\n{style(problem)}"
        for problem, _, _ in _draw("pretrain", n, seed, None, ranges or Ranges())
        for style in STYLES.values()
    ]


_VERB = "buys|finds|gets|receives|gives away|loses|sells|uses"
_QUESTION_NUMBERS = re.compile(rf" has (\d+) \w+\. \w+ ({_VERB}) (\d+) and then ({_VERB}) (\d+)\.")


def question_numbers(question: str) -> tuple[int, int, int]:
    """The number triple ``(start, first, second)`` of a toy question, read from its text."""
    match = _QUESTION_NUMBERS.search(question)
    if match is None:
        raise ValueError(f"not a toy question: {question[:80]!r}")
    start, verb1, first, verb2, second = match.groups()
    sign1 = 1 if verb1 in GAIN_VERBS else -1
    sign2 = 1 if verb2 in GAIN_VERBS else -1
    return int(start), sign1 * int(first), sign2 * int(second)


def question_difficulty(question: str, ranges: Mapping[str, int] | None = None) -> str:
    """``"easy"`` or ``"hard"`` for a routes question (``"other"`` for a toy question outside
    the task), read from its numbers: how RL logs and held-out scores are split by difficulty."""
    try:
        triple = question_numbers(question)
    except ValueError:
        return "other"
    return difficulty(*triple, Ranges(**dict(ranges or {}))) or "other"


ROUTES = tuple(STYLES)
"""The routes are the toy's solution styles."""


def classify_route(text: str) -> str:
    """The route of a completion, read from how it opens (``toy_math.classify_style``)."""
    return classify_style(text)


def route_prefix(question: str, route: str) -> str:
    """The first words that commit a reply to ``route``, for forcing it: the reply is
    sampled on after the prefix. Only these words are given; the numbers that follow are
    the model's own (for ``one_equation`` the first operand is the question's start,
    copied, the only way that route opens)."""
    start, _, _ = question_numbers(question)
    name = question.split(" ", 1)[0]
    prefixes = {
        "step_by_step": "First,",
        "net_change": "The net change is",
        "narrative": f"{name} starts with",
        "one_equation": f"{start}",
    }
    if route not in prefixes:
        raise ValueError(f"unknown route {route!r}; allowed: {list(prefixes)}")
    return prefixes[route]
