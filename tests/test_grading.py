"""The answer checker against real gold answers of the eight benchmarks, and its time limit.

``fixtures/grading/cases.jsonl``: one line per gold row, copied verbatim from the public
evaluation files (``source``, ``row``, ``field``, ``gold_raw``, ``question``), with
hand-written completions in equivalent forms and close-but-wrong answers, each with the
verdict adjudicated by hand (``cases``: ``completion``, ``correct``, ``why``). The gold goes
through the benchmark's own gold parser, so its clean-up is tested too. A case fails on a
wrong verdict and on a check slower than the time limit.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sedsft.evaluation.benchmarks import GOLD_PARSERS, BenchmarkSpec, build_problems
from sedsft.evaluation.evaluate import score_samples
from sedsft.evaluation.sampling import Samples
from sedsft.metrics import extract_answer, grade, grading_counts, is_correct
from sedsft.metrics.answer_limits import refusal
from sedsft.metrics.answers import DEFAULT_TIMEOUT_S, clean_answer, lists_unordered
from sedsft.metrics.symbolic import answers_equal, split_top_level
from sedsft.rl.rewards import math_answer_reward

CASES = Path(__file__).parent / "fixtures" / "grading" / "cases.jsonl"
ROWS = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines()]
SLACK_S = 1.0  # pipe round trip and a loaded machine, on top of the check's own limit
HANG_ANSWERS = ["1e99999999", "10^{10^{10}}", "9^{9^{9}}", "(10^{10})!", "2^{2^{34}}"]


def _rows():
    for row in ROWS:
        yield pytest.param(row, id=f"{row['benchmark']}-{row['row']}")


@pytest.fixture(scope="module")
def warm_pool():
    """One symbolic check first, so a worker's start-up (imports) is not timed as a check."""
    assert is_correct("\\boxed{\\frac{2}{4}}", "\\sqrt{\\frac{1}{4}}")


def test_the_case_file_covers_every_benchmark():
    benchmarks = {row["benchmark"] for row in ROWS}
    assert benchmarks == {"aime24", "aime25", "amc23", "gsm8k", "math", "gaokao2023en",
                          "olympiadbench", "college_math"}  # fmt: skip
    cases = [c for row in ROWS for c in row["cases"]]
    assert len(cases) >= 300
    assert 0.3 < sum(c["correct"] for c in cases) / len(cases) < 0.7  # right and wrong alike


@pytest.mark.parametrize("row", list(_rows()))
def test_grading_cases_of_a_gold(warm_pool, row):
    """Every case of one gold row (one test per row, not per case: pytest's own overhead per
    test would cost as much as the cheap checks); all disagreements are reported at once."""
    gold = GOLD_PARSERS[row["gold_parser"]](row["gold_raw"])
    wrong, slow = [], []
    for case in row["cases"]:
        start = time.perf_counter()
        verdict = grade(case["completion"], gold, row["question"])
        seconds = time.perf_counter() - start
        if verdict.correct is not case["correct"]:
            wrong.append((verdict.answer, verdict.status, "expected", case["correct"], case["why"]))
        if seconds >= DEFAULT_TIMEOUT_S + SLACK_S:
            slow.append((verdict.answer, f"{seconds:.1f} s"))
    assert not wrong and not slow, f"gold {gold!r}: wrong verdicts {wrong}; over the limit {slow}"


# ------------------------------------------------------------------------ the parts, by hand


@pytest.mark.parametrize(
    ("raw", "cleaned", "percent"),
    [
        ("$\\sqrt{27}$.", "\\sqrt{27}", False),
        ("Yes.", "Yes", False),
        ("\\$70,000", "70,000", False),
        ("60\\%", "60", True),
        ("8 \\%", "8", True),
        ("90^\\circ", "90", False),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", False),
        ("18 \\text{ vacuum cleaners}", "18", False),
        ("\\text{Evelyn}", "Evelyn", False),
        ("(B)", "B", False),
    ],
)
def test_clean_answer(raw, cleaned, percent):
    assert clean_answer(raw) == (cleaned, percent)


def test_split_top_level_respects_brackets():
    assert split_top_level("(1,2), [3,4), \\{5,6\\}, 7") == ["(1,2)", "[3,4)", "\\{5,6\\}", "7"]
    assert split_top_level("\\left(1, 2\\right), 3") == ["\\left(1, 2\\right)", "3"]
    assert split_top_level("x=1", "=") == ["x", "1"]


@pytest.mark.parametrize(
    ("question", "unordered"),
    [
        ("Determine all values of $x$ for which ...", True),
        ("Find all pairs $(m, n)$ ...", True),
        ("Solve: $k^{2}-7 k+50=3$", True),
        ("Solve the system of equations: ...", False),
        ("Determine the values of $T(10), T(11)$ and $T(12)$.", False),
        (
            "What is the value of $a_{7}$? What is the sum of all the numbers in $\\{a_{n}\\}$?",
            False,
        ),
        (None, False),
    ],
)
def test_lists_unordered_reads_the_question(question, unordered):
    assert lists_unordered(question) is unordered


@pytest.mark.parametrize(
    ("gold", "pred", "unordered", "equal"),
    [
        ("9 x^{2}-12 x+29=0", "18x^2-24x+58=0", False, True),  # scaled equation
        ("9 x^{2}-12 x+29=0", "x^2+1=0", False, False),
        ("9 x^{2}-12 x+29=0", "1=0", False, False),
        ("\\log _{6}(216)=3", "3", False, True),  # a value: its right side
        ("\\log _{6}(216)=3", "\\log_6(216)=4", False, False),
        ("y=2 x-11", "2x-11", False, True),  # a definition: its right side
        ("2,4,3", "2,3,4", False, False),  # ordered
        ("2,4,3", "2,3,4", True, True),  # as sets, equal
        ("2,4,3", "2,3,5", True, False),
        ("1,3,5", "5,3,1", True, True),
        ("n=-6,9", "9,-6", False, True),  # the solutions of one equation: a set
        ("(-\\infty,-3)", "a<-3", False, True),
        ("\\{x|-2\\leq x < 1\\}", "[-2,1)", False, True),
        ("S(t)=\\sin (880 \\pi t)", "S(t)=\\sin(440\\pi t)", False, False),
    ],
)
def test_answers_equal_in_process(gold, pred, unordered, equal):
    # the worker's function, called directly: its rules without the process around them
    assert answers_equal(gold, pred, unordered) is equal


@pytest.mark.parametrize("answer", HANG_ANSWERS)
def test_huge_answers_are_refused_before_evaluation(answer):
    assert refusal(answer) is not None
    before = grading_counts()["refused"]
    start = time.perf_counter()
    assert grade(f"\\boxed{{{answer}}}", "18").status == "refused"
    assert time.perf_counter() - start < 0.5  # a string scan; no worker involved
    assert grading_counts()["refused"] == before + 1


@pytest.mark.parametrize(
    "answer", ["2^{10}", "e^{-x^{2}}", "\\frac{100!}{2^{50}}", "2^{2^{4}}", "(2^{3})!"]
)
def test_ordinary_powers_and_factorials_pass_the_size_guard(answer):
    assert refusal(answer) is None


def test_gold_clean_up_and_the_yes_no_hint():
    spec = BenchmarkSpec("college_math", "CollegeMATH", "pass@1", ["question"], "answer", "plain")
    rows = [{"question": "Is it?", "answer": "Yes."}, {"question": "How far?", "answer": "$\\sqrt{27}$."},
            {"question": "Which?", "answer": "$145$solution:"}]  # fmt: skip
    problems = build_problems(spec, rows, None)
    assert [p.gold for p in problems] == ["Yes", "\\sqrt{27}", "145"]
    assert problems[0].question == "Is it? (Yes or No)"  # decided on the cleaned gold
    assert GOLD_PARSERS["first"](["$(-\\infty, 0) \\cup\\{1\\}$."]) == "(-\\infty, 0) \\cup\\{1\\}"


def test_no_box_fallback_is_a_knob():
    text = "Adding them up, the answer is 18. Done."
    assert extract_answer(text) is None  # default: boxed only
    assert extract_answer(text, boxed_only=False) == "18"
    assert extract_answer("so we get 3 and then 42", boxed_only=False) == "42"  # last number
    assert grade(text, "18").status == "no_answer"
    assert is_correct(text, "18", boxed_only=False)


# --------------------------------------------------------------------------- the time limit


def test_a_check_past_its_limit_is_wrong_counted_and_the_worker_replaced(warm_pool):
    before = grading_counts()["timeouts"]
    start = time.perf_counter()
    # A limit of 0 s: the check is sent to the worker and its answer is already late, whatever
    # the machine (a warm worker answers this pair in about 1 ms, so any positive limit races it)
    verdict = grade("\\boxed{\\frac{66}{2}}", "33 + 0 x", timeout_s=0.0)
    seconds = time.perf_counter() - start  # the limit, killing the worker, starting another
    assert (verdict.correct, verdict.status) == (False, "timeout")
    assert seconds < 2.0 + SLACK_S, seconds
    assert grading_counts()["timeouts"] == before + 1
    assert grade("\\boxed{\\frac{66}{2}}", "33 + 0 x").status == "correct"  # a fresh worker


def test_hang_answers_through_the_rl_reward_and_the_eval_scorer(warm_pool):
    completions = [[{"role": "assistant", "content": f"so \\boxed{{{a}}}"}] for a in HANG_ANSWERS]
    golds = ["18"] * len(HANG_ANSWERS)
    logged: dict[str, float] = {}
    start = time.perf_counter()
    rewards = math_answer_reward(completions, golds, log_metric=logged.__setitem__)
    assert rewards == [0.0] * len(HANG_ANSWERS)
    assert logged == {"grading/timeouts": 0.0, "grading/refused": 5.0, "grading/no_answer": 0.0}
    texts = [[c[0]["content"] for c in completions] + ["so \\boxed{18}"]]
    samples = Samples(texts=texts, num_tokens=[[1] * 6], entropy=0.0)
    metrics, correct = score_samples(samples, ["18"], k=6)
    assert correct == [[False] * 5 + [True]]
    assert metrics["avg@6"] == pytest.approx(1 / 6)
    assert time.perf_counter() - start < 5.0  # no check reached SymPy


def test_checks_work_in_threads(warm_pool):
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(
            pool.map(is_correct, ["\\boxed{x^2-y^2=2}", "\\boxed{2, 3, 4}", "\\boxed{0.5}"],
                     ["\\frac{x^{2}}{2} - \\frac{y^{2}}{2} = 1", "2,4,3", "\\frac{1}{2}"])
        )  # fmt: skip
    assert results == [True, False, True]


def _grade_in_child(queue):
    queue.put(is_correct("\\boxed{x^2-y^2=2}", "\\frac{x^{2}}{2} - \\frac{y^{2}}{2} = 1"))


def test_checks_work_in_a_daemonic_process():
    # DataLoader workers are daemonic: multiprocessing (and pebble) pools cannot start there
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_grade_in_child, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=60) is True
    child.join(10)
    assert child.exitcode == 0
