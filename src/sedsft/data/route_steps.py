"""Checking the steps of a reply on the routes task, not only its boxed answer.

With the boxed answer alone as the reward, GRPO taught the dominant route a shortcut on hard
problems: write a running total the model can produce (31, the largest number it has seen),
then box the right answer anyway ("First, 26 + 6 = 30. Then, 30 - 6 = 26."; CE, two seeds,
240 updates), so the hard reward rose while no route was explored. A reply counts here only
when every number it writes belongs to the problem's true solution, so a route that cannot
write a hard running total fails on hard problems whatever it boxes.

Kept apart from ``toy_routes`` on purpose: the cached bases and tokenised splits are keyed on
the source of the modules that generate them, and checking replies generates nothing.
"""

from __future__ import annotations

import re

from sedsft.data.toy_routes import question_numbers

_NUMBER = re.compile(r"\d+")


def solution_numbers(question: str) -> frozenset[int]:
    """Every number a correct solution of ``question`` may write, in any route: the start,
    the sizes of both changes, the running total, the size of the net change and the answer."""
    start, first, second = question_numbers(question)
    return frozenset({start, abs(first), abs(second), start + first, abs(first + second), start + first + second})


def steps_hold(question: str, reply: str) -> bool:
    """Whether every number ``reply`` writes is one of ``solution_numbers(question)``: a reply
    whose running total or net change is wrong fails even when its boxed answer is right."""
    allowed = solution_numbers(question)
    return all(int(n) in allowed for n in _NUMBER.findall(reply))
