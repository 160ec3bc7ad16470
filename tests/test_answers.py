"""Answer extraction and checking, on hand-made cases and real RL data rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from sedsft.metrics import answers_correct, extract_boxed, is_correct

_FULL = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_dapo_rl_2069.parquet"
# The real verl RL file when it sits next to the checkout, else its first rows (committed).
RL_PARQUET = _FULL if _FULL.exists() else Path(__file__).parent / "fixtures" / "math_dapo_rl_sample.parquet"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last one wins
        ("\\fbox{7}", "7"),
        ("\\boxed {x^{2}}", "x^{2}"),  # space before the brace
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),  # unpaired escaped brace
        ("$\\boxed 5$", "5"),  # brace-less form
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{1} and then \\boxed{2", None),  # last box unclosed (truncated): None
        ("\\boxedfoo{3}", None),  # another macro
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("The answer is \\boxed{42}.", "42", True),
        ("\\boxed{41}", "42", False),
        ("42", "42", False),  # no box: wrong
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\boxed{1,000}", "1000", True),  # thousands separator
        ("\\boxed{1,2}", "12", False),  # a list, not a thousands separator
        ("\\boxed{3.0}", "3", True),
        ("\\boxed{5^{12}}", "244140625", True),
        ("\\boxed{10\\frac{1}{12}}", "10\\frac{1}{12}", True),
        ("\\boxed{(-1,0]}", "(-1,0]", True),
        ("\\boxed{(0,1]}", "(-1,0]", False),
        ("\\boxed{\\text{Tuesday}}", "Tuesday", True),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{3}", "\\boxed{3}", True),  # boxed gold is unwrapped
        ("\\boxed{}", "3", False),
        ("\\boxed{3}", "", False),
    ],
)
def test_is_correct_hand_made(prediction, gold, expected):
    assert is_correct(prediction, gold) is expected


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        (None, "1"),
        ("\\boxed{1}", None),
        (12, "12"),
        ("\\boxed{" + "{" * 500 + "}" * 500 + "}", "1"),
        ("\\boxed{\\frac{}{}}", "1"),
        ("\\boxed{" + "9" * 2000 + "}", "1"),  # over MAX_ANSWER_CHARS
        ("\\boxed{\\sqrt{-}}^", "\\sqrt{2}"),
        ("\\boxed{1/0}", "1"),
    ],
)
def test_is_correct_never_raises(prediction, gold):
    assert is_correct(prediction, gold) is False


def test_is_correct_in_worker_threads():
    # Math-Verify's signal-based timeouts would fail outside the main thread.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(is_correct, ["\\boxed{\\frac{2}{4}}", "\\boxed{3}"], ["0.5", "4"]))
    assert results == [True, False]


def test_answers_correct():
    assert answers_correct(["\\boxed{1}", "\\boxed{2}", "none"], ["1", "3", "1"]) == [
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        answers_correct(["a", "b"], ["a"])


def test_real_rl_rows():
    import pandas as pd

    df = pd.read_parquet(RL_PARQUET).head(20)
    for _, row in df.iterrows():
        assert row["prompt"][0]["role"] == "user"
        gold = row["reward_model"]["ground_truth"]
        right = f"Let me work it out step by step ... so the answer is \\boxed{{{gold}}}."
        assert is_correct(right, gold), gold
        try:
            different = str(Fraction(gold) + 1)
        except ValueError:  # not a plain number (e.g. 10\frac{1}{12})
            different = "987654321"
        wrong = f"... so the answer is \\boxed{{{different}}}."
        assert not is_correct(wrong, gold), (gold, different)
