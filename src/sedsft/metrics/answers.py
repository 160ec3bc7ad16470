"""Final-answer extraction and checking for math generations: one checker for evaluation
scores and for the RL reward.

Extraction. The model is prompted to "put your final answer within \\boxed{}" (SPEC, chat
format), so a prediction's answer is the content of its LAST ``\\boxed{...}`` (or
``\\fbox{...}``). With ``boxed_only=False`` a prediction without a box falls back, as
Qwen2.5-Math's toolkit does, to the text after the last "the answer is" and then to the last
number in the text. The default is ``boxed_only=True``: the prompt asks for a box, the RL
reward should pay for following it, and a fallback can pick a number from the middle of an
unfinished derivation. Evaluation tables say which was used.

Checking, cheapest first (every step after the first two needs no SymPy):

1. both sides are cleaned (``clean_answer``: ``$``, a trailing ".", ``\\!``-style spaces,
   ``\\dfrac``, degree marks, a trailing unit in ``\\text{}``, a whole answer in ``\\text{}``,
   ``(B)`` -> ``B``; a trailing ``\\%`` is noted and removed) and compared as strings
   (case-insensitively for answers made only of words: "Yes" / "yes");
2. answers too big to evaluate are refused (``answer_limits``: huge powers, factorials,
   literals) and graded wrong;
3. two plain numbers are compared as exact rationals ("3.0" == "3", "1,000" == "1000", "073"
   == "73" but not "0.73"); a percent sign on one side only may also mean "divide by 100"
   (gold "0.8" accepts "80\\%", gold "8\\%" accepts "0.08"; gold "60" accepts "60\\%" but not
   "0.6");
4. anything else goes to ``symbolic.answers_equal`` (Math-Verify plus the rules for lists,
   equations and intervals described there) in a worker process with a hard time limit
   (``sandbox``), which holds in any thread or process. A check past ``timeout_s`` is graded
   wrong and counted (``grading_counts()["timeouts"]``).

``grade`` returns the verdict with its reason (``status``); ``is_correct`` only the bool.
Neither raises on bad input: anything unreadable is wrong.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import sedsft.metrics.sandbox as sandbox
from sedsft.metrics.answer_limits import refusal

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 512  # longer answers are not compared symbolically
DEFAULT_TIMEOUT_S = 5.0  # per symbolic check; a few golds of CollegeMATH need seconds

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_FRACTION_RE = re.compile(r"([+-]?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\}|\\frac(\d)(\d))")
_DECIMAL_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_UNORDERED_RE = re.compile(
    r"\b(?:find|determine|compute|list|give|enter|what are)\b[^.?]*?\ball\b"
    r"|\bin any order\b|\ball (?:the )?(?:possible |real |integer )?(?:solutions|roots|values)\b"
    r"|^\s*solve\b(?![^.?]*\bsystem\b)",
    re.IGNORECASE,
)

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def _count(key: str) -> None:
    with _counts_lock:
        _counts[key] += 1


def grading_counts() -> dict[str, int]:
    """Checks of this process so far: ``checks``, ``symbolic`` (sent to a worker),
    ``timeouts``, ``refused`` (too big to evaluate), ``errors`` (a worker failed)."""
    with _counts_lock:
        return {k: _counts[k] for k in ("checks", "symbolic", "timeouts", "refused", "errors")}


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unclosed.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else None.

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); the
    brace-less form ``\\boxed 5`` gives ``5``. If the last box is never closed (a
    truncated generation) the result is None: an earlier box is not used instead.
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = end = matches[-1].end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    if i > end:  # "\boxed 5": the next run of non-space, non-$ characters
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


_ANSWER_IS_RE = re.compile(r"answer is[:\s]*", re.IGNORECASE)
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str, boxed_only: bool = True) -> str | None:
    """The answer of a prediction: its last box; without one, when ``boxed_only`` is False,
    the text after the last "the answer is" (to the end of its sentence), else the last
    number (the toolkit's fallbacks)."""
    boxed = extract_boxed(text)
    if boxed is not None or boxed_only or not isinstance(text, str):
        return boxed
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].strip()
        rest = re.split(r"\.\s|\.$|\n", rest, maxsplit=1)[0].strip().strip("$").strip()
        if rest:
            return rest
    numbers = _LAST_NUMBER_RE.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


_UNIT_RE = re.compile(r"^(.+?)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_WHOLE_TEXT_RE = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}$")


def clean_answer(answer: str) -> tuple[str, bool]:
    """An answer without what does not change its value, and whether it carried a percent
    sign: ``$``, ``\\$``, a trailing "." (242 CollegeMATH golds end in one), thin spaces,
    ``\\dfrac``/``\\tfrac``, degree marks, a trailing unit in ``\\text{}``, a whole answer in
    ``\\text{}``, a choice letter in parentheses, a trailing ``\\%``."""
    s = str(answer).replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[,;:! ]|~", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    previous = None
    while s != previous:
        previous = s
        s = s.strip().rstrip(".").strip()
    percent = False
    if s.endswith("\\%") or s.endswith("%"):
        s, percent = s[: -2 if s.endswith("\\%") else -1].strip(), True
    unit = _UNIT_RE.match(s)
    if unit and not re.search(r"\\(?:text|mbox|mathrm)\{", unit.group(1)):
        s = unit.group(1).strip()
    whole = _WHOLE_TEXT_RE.match(s)
    if whole:
        s = whole.group(1).strip()
    choice = re.fullmatch(r"\(([A-E])\)", s)
    if choice:
        s = choice.group(1)
    if s.endswith("\\%") or s.endswith("%"):  # "60 \text{\%}" and the like
        s, percent = s[: -2 if s.endswith("\\%") else -1].strip(), True
    return s, percent


_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z\s]*")


def _canonical(s: str) -> str:
    """Whitespace removed; lower case for answers made only of words ("Yes", "converges")."""
    s = re.sub(r"\\left|\\right", "", s)
    if _WORDS_RE.fullmatch(s):
        return " ".join(s.lower().split())
    return "".join(s.split())


def _as_number(s: str) -> Fraction | None:
    """A plain number (thousands separators allowed) or a fraction of two integers (``3/4``,
    ``\\frac{3}{4}``, ``-\\frac34``) as an exact rational, else None. Call only on answers
    ``refusal`` passed: ``Fraction`` expands exponents."""
    s = s.replace(" ", "")
    fraction = _FRACTION_RE.fullmatch(s)
    if fraction:
        sign, top, bottom = fraction.group(1) or "", *(g for g in fraction.groups()[1:] if g)
        return Fraction(int(sign + top), int(bottom)) if int(bottom) else None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _DECIMAL_RE.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(gold: Fraction, gold_percent: bool, pred: Fraction, pred_percent: bool) -> bool:
    if gold == pred:
        return True
    if gold_percent and not pred_percent:
        return gold / 100 == pred
    if pred_percent and not gold_percent:
        return pred / 100 == gold
    return False


def lists_unordered(question: str | None) -> bool:
    """Whether the question asks for a set of answers ("Determine all ...", "all solutions",
    "in any order", "Solve: <one equation>"), so that a comma list may come in any order.
    Without a question, lists keep their order."""
    return bool(question) and bool(_UNORDERED_RE.search(question))


@dataclass(frozen=True)
class Verdict:
    """One graded answer. ``status``: ``correct``, ``wrong``, ``no_answer`` (nothing to
    extract), ``no_gold``, ``refused`` (too big to evaluate), ``timeout``, ``error``."""

    correct: bool
    status: str
    answer: str | None = None


def grade(
    prediction_text: str,
    gold: str | None,
    question: str | None = None,
    *,
    boxed_only: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Verdict:
    """Grade the answer of ``prediction_text`` against ``gold`` (bare or boxed). ``question``
    (optional) decides whether a list answer is a set (``lists_unordered``). Never raises."""
    _count("checks")
    try:
        if gold is None:
            return Verdict(False, "no_gold")
        gold = str(gold)
        gold = extract_boxed(gold) if _BOX_RE.search(gold) else gold
        pred = extract_answer(prediction_text, boxed_only)
        if pred is None or gold is None:
            return Verdict(False, "no_answer" if pred is None else "no_gold", pred)
        (g, g_percent), (p, p_percent) = clean_answer(gold), clean_answer(pred)
        if not g:
            return Verdict(False, "no_gold", pred)
        if not p:
            return Verdict(False, "no_answer", pred)
        if _canonical(g) == _canonical(p):
            return Verdict(True, "correct", pred)
        if _WORDS_RE.fullmatch(g) and _WORDS_RE.fullmatch(p):  # SymPy would read words as
            return Verdict(False, "wrong", pred)  # products of commuting symbols
        if refusal(g) or refusal(p):
            _count("refused")
            return Verdict(False, "refused", pred)
        g_number, p_number = _as_number(g), _as_number(p)
        if g_number is not None and p_number is not None:
            equal = _numbers_equal(g_number, g_percent, p_number, p_percent)
            return Verdict(equal, "correct" if equal else "wrong", pred)
        if len(g) > MAX_ANSWER_CHARS or len(p) > MAX_ANSWER_CHARS:
            return Verdict(False, "wrong", pred)
        _count("symbolic")
        unordered = lists_unordered(question)
        try:
            equal = sandbox.pool().compare(g, p, unordered, timeout_s)
            if not equal and g_percent != p_percent:  # "50\%" for a gold 1/2, "0.08" for 8\%
                scaled = (g, f"\\frac{{{p}}}{{100}}") if p_percent else (f"\\frac{{{g}}}{{100}}", p)
                equal = sandbox.pool().compare(*scaled, unordered, timeout_s)
        except sandbox.CheckTimeout:
            _count("timeouts")
            log.warning("answer check over %g s, graded wrong: gold %r, answer %r",
                        timeout_s, g[:80], p[:80])  # fmt: skip
            return Verdict(False, "timeout", pred)
        return Verdict(equal, "correct" if equal else "wrong", pred)
    except sandbox.WorkerError as err:
        _count("errors")
        log.error("answer check failed, graded wrong: %s", err)
        return Verdict(False, "error")
    except Exception:  # malformed input of any kind: wrong, never a crash of the caller
        return Verdict(False, "error")


def is_correct(
    prediction_text: str,
    gold: str | None,
    question: str | None = None,
    *,
    boxed_only: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """Whether the answer of ``prediction_text`` equals ``gold`` (``grade(...).correct``)."""
    return grade(
        prediction_text, gold, question, boxed_only=boxed_only, timeout_s=timeout_s
    ).correct


def answers_correct(
    predictions: Sequence[str],
    golds: Sequence[str | None],
    question: str | None = None,
    *,
    boxed_only: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[bool]:
    """``is_correct`` pairwise (one question for all, e.g. the samples of one prompt); the
    two sequences must have the same length."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} gold answers")
    return [
        is_correct(p, g, question, boxed_only=boxed_only, timeout_s=timeout_s)
        for p, g in zip(predictions, golds, strict=True)
    ]
