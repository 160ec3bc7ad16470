"""The toy data set: determinism, correctness of every style, the style classifier."""

from __future__ import annotations

import math
import re

import pytest

from sedsft.data import toy_math
from sedsft.evaluation.evaluate import label_diversity
from sedsft.metrics import is_correct


def test_generation_is_deterministic_and_seeded():
    assert toy_math.generate(50, seed=3) == toy_math.generate(50, seed=3)
    assert toy_math.generate(50, seed=3) != toy_math.generate(50, seed=4)


def test_every_style_is_correct_and_recognised():
    rng = __import__("random").Random(0)
    for _ in range(40):
        problem = toy_math.sample_problem(rng)
        assert problem.middle >= 0 and problem.answer >= 0
        for name, style in toy_math.STYLES.items():
            text = style(problem)
            assert is_correct(text, str(problem.answer)), text
            assert toy_math.classify_style(text) == name
            # the arithmetic written in the solution is right
            for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
                if text.count("=") == 1 and name == "one_equation":
                    continue
                assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), text


def test_style_weights_shape_the_mix():
    rows = toy_math.generate(400, seed=0, style_weights={"step_by_step": 1.0})
    assert {r["style"] for r in rows} == {"step_by_step"}
    with pytest.raises(ValueError, match="unknown toy_math styles"):
        toy_math.generate(3, style_weights={"poetry": 1.0})


def test_label_diversity_hand_computed():
    groups = [["First, 1 + 2 = 3.", "First, 2 + 2 = 4."], ["The net change is +1", "1 + 2 - 1 = 2, so"]]
    out = label_diversity(groups, toy_math.classify_style)
    # labels: step_by_step x2, net_change, one_equation -> p = (1/2, 1/4, 1/4)
    assert out["label_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert out["labels_per_prompt"] == pytest.approx((1 + 2) / 2)
    assert out["label_frac/step_by_step"] == pytest.approx(0.5)
