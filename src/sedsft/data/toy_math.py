"""Toy arithmetic word problems: the embedded default data set.

Every problem is a short story with two operations on one quantity ("Mia has 12
pencils. She buys 7 more and gives away 5. ..."). Each can be solved in several
*styles* that are all correct and all end in ``\\boxed{N}``, so diversity of
generations means something: a model that always answers in one style has
collapsed onto one mode even if it is always right.

Generation is a pure function of ``(n, seed, style_weights)``: the same call gives
the same rows on every machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Nia", "Kai", "Ada")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "cards", "shells")
GAIN_VERBS = ("buys", "finds", "gets", "receives")
LOSS_VERBS = ("gives away", "loses", "sells", "uses")
WHOLE_NUMBERS = 64
"""Numbers 0 .. WHOLE_NUMBERS - 1 are one token each in the embedded tokenizer
(``sedsft.models.tiny`` adds their number line to its corpus); the toy tasks stay below it."""


@dataclass(frozen=True)
class Problem:
    """One word problem: ``start`` items, then ``first`` and ``second`` changes (signed)."""

    name: str
    item: str
    start: int
    first: int
    second: int
    first_verb: str
    second_verb: str

    @property
    def middle(self) -> int:
        return self.start + self.first

    @property
    def answer(self) -> int:
        return self.start + self.first + self.second

    @property
    def question(self) -> str:
        return (
            f"{self.name} has {self.start} {self.item}. "
            f"{self.name} {self.first_verb} {abs(self.first)} and then "
            f"{self.second_verb} {abs(self.second)}. "
            f"How many {self.item} does {self.name} have now?"
        )


def _op(x: int) -> str:
    return "+" if x >= 0 else "-"


def _step_by_step(p: Problem) -> str:
    return (
        f"First, {p.start} {_op(p.first)} {abs(p.first)} = {p.middle}. "
        f"Then, {p.middle} {_op(p.second)} {abs(p.second)} = {p.answer}. "
        f"The answer is \\boxed{{{p.answer}}}."
    )


def _one_equation(p: Problem) -> str:
    return (
        f"{p.start} {_op(p.first)} {abs(p.first)} {_op(p.second)} {abs(p.second)} = {p.answer}, "
        f"so \\boxed{{{p.answer}}}."
    )


def _narrative(p: Problem) -> str:
    return (
        f"{p.name} starts with {p.start} {p.item}. After that there are {p.middle}. "
        f"In the end {p.name} has {p.answer} {p.item}. \\boxed{{{p.answer}}}"
    )


def _net_change(p: Problem) -> str:
    net = p.first + p.second
    return (
        f"The net change is {p.first:+d} and {p.second:+d}, which is {net:+d}. "
        f"{p.start} {_op(net)} {abs(net)} = {p.answer}. Final answer: \\boxed{{{p.answer}}}"
    )


STYLES: Mapping[str, Callable[[Problem], str]] = {
    "step_by_step": _step_by_step,
    "one_equation": _one_equation,
    "narrative": _narrative,
    "net_change": _net_change,
}
"""Solution styles, all correct; the key names the style in the generated rows."""


def sample_problem(rng: random.Random) -> Problem:
    """Draw one problem whose running count never goes negative. Numbers stay small
    (start 2-20, changes 1-9) so that the embedded 0.9M-parameter model can learn the arithmetic
    on a CPU and accuracy means something next to diversity."""
    start = rng.randint(2, 20)
    first = rng.randint(1, 9) * rng.choice((1, -1))
    if start + first < 0:
        first = -first
    second = rng.randint(1, 9) * rng.choice((1, -1))
    if start + first + second < 0:
        second = -second
    return make_problem(rng, start, first, second)


def make_problem(rng: random.Random, start: int, first: int, second: int) -> Problem:
    """A problem with these numbers and a random name, item and verbs (gain or loss by sign)."""
    return Problem(
        name=rng.choice(NAMES),
        item=rng.choice(ITEMS),
        start=start,
        first=first,
        second=second,
        first_verb=rng.choice(GAIN_VERBS if first >= 0 else LOSS_VERBS),
        second_verb=rng.choice(GAIN_VERBS if second >= 0 else LOSS_VERBS),
    )


def _style_sampler(
    rng: random.Random, style_weights: Mapping[str, float] | None
) -> Callable[[], str]:
    weights = dict(style_weights) if style_weights else {name: 1.0 for name in STYLES}
    unknown = sorted(set(weights) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown toy_math styles {unknown}; allowed: {sorted(STYLES)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"style_weights must be >= 0 with a positive sum, got {weights}")
    names = list(weights)
    probs = [weights[n] for n in names]
    return lambda: rng.choices(names, probs)[0]


def generate(
    n: int,
    seed: int = 0,
    style_weights: Mapping[str, float] | None = None,
) -> list[dict[str, str]]:
    """Return ``n`` rows ``{"question", "response", "answer", "style"}``.

    Args:
        n: number of rows.
        seed: the rows are a pure function of ``(n, seed, style_weights)``.
        style_weights: relative frequency of each style in ``STYLES``; ``None`` means
            uniform. A skewed mix (e.g. ``{"step_by_step": 1}``) is what drives mode
            collapse under CE in the toy lab.
    """
    rng = random.Random(seed)
    pick_style = _style_sampler(rng, style_weights)
    rows = []
    for _ in range(n):
        problem = sample_problem(rng)
        style = pick_style()
        rows.append(
            {
                "question": problem.question,
                "response": STYLES[style](problem),
                "answer": str(problem.answer),
                "style": style,
            }
        )
    return rows


def corpus(n: int, seed: int = 0) -> list[str]:
    """Plain texts for tokenizer training: ``n`` questions, each followed by its
    solution in every style. A solution starts on a new line as in the chat template,
    so the words that open a reply ("First", "The") are learnt as they appear there."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        problem = sample_problem(rng)
        texts.extend(f"{problem.question}\n{style(problem)}" for style in STYLES.values())
    return texts


_ONE_EQUATION = re.compile(r"^\d+ [+-] \d+ [+-] \d+ =")


def classify_style(text: str) -> str:
    """Which solution style a completion uses, read from how it opens ("other" if none).

    In the toy lab this is the most direct view of mode collapse: a collapsed model
    answers every prompt in one style.
    """
    text = text.strip()
    if text.startswith("First,"):
        return "step_by_step"
    if text.startswith("The net change"):
        return "net_change"
    if _ONE_EQUATION.match(text):
        return "one_equation"
    if " starts with " in text.split(".")[0]:
        return "narrative"
    return "other"


POSITION_KINDS = ("style", "number", "text")
"""What fixes each token of a toy solution (``position_kinds``): the three kinds of position
whose SED mask rates tell where the mask falls."""


def position_kinds(
    response: str, offsets: Sequence[tuple[int, int]], start: int = 0
) -> list[str | None]:
    """Label each token of a toy solution by what decides it, for mask-rate analyses.

    Given the question, a toy solution has exactly one free choice: its style, made at
    its first token ("First", "The", the name, or the first operand). From there the
    style's template fixes every word, and the problem fixes every number (operands are
    copied, results computed), so those positions have one right continuation each.
    SED's mask should fall on the free position and leave the numbers alone.

    Args:
        response: one toy solution (the output of a ``STYLES`` function).
        offsets: ``(begin, end)`` character span of each token in the tokenised text,
            e.g. a fast tokenizer's ``return_offsets_mapping`` on a whole chat.
        start: where ``response`` begins in that text.

    Returns:
        One entry per token: ``"style"`` for the first token of the response (even when
        it is the first operand, as in ``one_equation``), ``"number"`` for a token that
        writes digits, ``"text"`` for the template's other words and punctuation, and
        None for tokens that do not start inside the response (prompt, end-of-turn
        marker, padding, empty spans).
    """
    end = start + len(response)
    kinds: list[str | None] = []
    seen_first = False
    for begin, stop in offsets:
        if stop <= begin or not start <= begin < end:
            kinds.append(None)
        elif not seen_first:
            seen_first = True
            kinds.append("style")
        elif any(ch.isdigit() for ch in response[begin - start : stop - start]):
            kinds.append("number")
        else:
            kinds.append("text")
    return kinds
