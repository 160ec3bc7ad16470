"""The DAPO-style scorer (sedsft.rl.dapo): the published rules on hand cases, the
normalisation against the rules restated as regexes, and linear time on long inputs."""

from __future__ import annotations

import random
import re
import time

import pytest

from sedsft.rl.dapo import dapo_reward, last_boxed, normalize, score, verl_compute_score


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("So the total is 42409 dollars.\nAnswer: 42409", "42409", True),
        ("Answer: $\\boxed{5}$", "5", True),  # boxed inside the Answer line is unwrapped
        ("The answer is \\boxed{5}.", "5", False),  # minerva mode reads "Answer:" lines only
        ("Answer: 10000", "10,000", True),  # thousands commas dropped from whole numbers
        ("Answer: 5 dollars", "5", True),  # unit words removed
        ("Answer: x = 3", "3", True),  # the part after the last "="
        ("Answer: \\frac12", "\\frac{1}{2}", True),  # TeX shorthand braced
        ("Answer: 3\\sqrt2", "3\\sqrt{2}", True),
        ("Answer: 0.5", "\\frac{1}{2}", False),  # no algebra: different strings are different
        ("Answer: 90^\\circ", "90", True),
        ("Answer: \\text{B}", "B", True),
        ("answer: 7\nANSWER : 8", "8", True),  # the last Answer line, any case
        ("Answer: 5" + "x" * 300, "5", False),  # only the last 300 characters are read
        ("", "5", False),
    ],
)
def test_minerva_mode_hand_cases(completion, gold, correct):
    assert score(completion, gold)[0] is correct


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("so \\boxed{5}", "5", True),
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),  # nested braces kept
        ("so \\boxed{ 5}", "5", False),  # no normalisation in strict mode
        ("\\boxed{5}" + " " * 100, "5", False),  # the box must be in the last 100 characters
        ("\\boxed{4} then \\boxed{5}", "5", True),  # the last box
        ("\\boxed{5", "5", False),  # unclosed
    ],
)
def test_strict_box_mode_hand_cases(completion, gold, correct):
    assert score(completion, gold, mode="strict_box")[0] is correct


# The release's rules (its vendored verl forces strict_box and reads after </think>): what the
# paper presets score with. A completion as the released RL prompts get it: a bare question,
# answered in a box as the SFT system prompt taught.
THINKING = "<think>\nTry 3: no. Then \\boxed{4}?\n</think>\n"
RELEASE = {"mode": "strict_box", "after_think": True}


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        (THINKING + "The total is \\boxed{5}.", "5", True),
        (THINKING + "The total is \\boxed{5}.", "4", False),  # the box inside the thinking is not read
        ("<think>\nso \\boxed{5}\n</think>", "5", False),  # nothing after </think>: no answer
        ("reasoning without an opening tag </think> so \\boxed{5}", "5", True),  # one tag only: read whole
        ("<think>a</think> so \\boxed{4} </think> \\boxed{5}", "4", True),  # up to a second </think>
        (THINKING + "\\boxed{5}" + " " * 100, "5", False),  # still the last 100 characters only
        ("The answer is \\boxed{5.0}.", "5", False),  # equal as written: no normalisation
    ],
)
def test_release_rules_hand_cases(completion, gold, correct):
    assert score(completion, gold, **RELEASE)[0] is correct


def test_release_rules_score_boxed_answers_that_minerva_mode_fails():
    """Why the paper presets do not use verl's default mode: the released RL prompts ask for
    no "Answer:" line, so a correct boxed answer is -1 in minerva mode and 1 in the release's."""
    completion = THINKING + "Each of the 5 rows holds 8 seats, so there are \\boxed{40} seats."
    assert dapo_reward([completion], ["40"]) == [-1.0]  # minerva mode
    assert dapo_reward([completion], ["40"], **RELEASE) == [1.0]
    assert verl_compute_score("math_dapo", completion, "40", **RELEASE) == {"score": 1.0, "acc": True, "pred": "40"}


def test_rewards_are_plus_and_minus_one_and_none_without_gold():
    completions = [[{"role": "assistant", "content": "Answer: 4"}], "Answer: 5", "Answer: 6"]
    assert dapo_reward(completions, ["4", "4", None]) == [1.0, -1.0, None]
    assert dapo_reward(["x \\boxed{4}"], ["4"], mode="strict_box") == [1.0]
    assert verl_compute_score("math_dapo", "Answer: 4", "4") == {"score": 1.0, "acc": True, "pred": "4"}
    with pytest.raises(ValueError, match="mode='boxed'"):
        dapo_reward(["x"], ["4"], mode="boxed")
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        dapo_reward(["x", "y"], ["4"])


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{x^{2}} c") == "x^{2}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None


# The normalisation written as the published regexes (the rules, restated here for comparison).
def _reference_normalize(answer: str) -> str:
    from sedsft.rl.dapo import REMOVED, SUBSTITUTIONS

    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for word in REMOVED:
        answer = answer.replace(word, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def test_normalize_equals_the_regex_rules_on_random_strings():
    pieces = ["$", "{", "}", "\\text{", "\\textbf{", "\\overline{", "\\boxed{", "frac", "sqrt", "\n", " ",
              "1", "2", ",", "=", "x", "a ", "dollars", "^\\circ", "\\!", ".", "(", "b"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert normalize(text) == _reference_normalize(text), repr(text)


ADVERSARIAL = {  # about 100k characters each: long runs of what each rule scans for
    "answer_then_spaces": "Answer:" + " " * 100_000,
    "dollars": "$" * 100_000,
    "open_text": "\\text{" * 17_000,
    "frac": "frac" * 25_000,
    "open_boxed": "\\boxed{" * 15_000,
    "answer_then_braces": "Answer: " + "{" * 100_000,
    "answer_then_words": "Answer: 5 " + "a " * 50_000,
}


@pytest.mark.parametrize("adversarial", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_linear_time_on_100k_character_inputs(adversarial):
    start = time.perf_counter()
    for mode in ("minerva", "strict_box"):
        score(adversarial, "5", mode=mode)
    normalize(adversarial)  # a gold of that length, unsliced
    assert time.perf_counter() - start < 1.0
