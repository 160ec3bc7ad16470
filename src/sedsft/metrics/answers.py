"""Final-answer extraction and checking for math generations.

The model is prompted to "put your final answer within \\boxed{}" (SPEC, chat format),
so a prediction's answer is the content of its LAST ``\\boxed{...}`` (or ``\\fbox{...}``).
It is judged against the gold answer with Math-Verify (Hugging Face), which parses
both to SymPy and compares them symbolically and numerically; when that says no (or
cannot parse), two strict fallbacks may still accept the pair:

1. both are plain numbers and equal as exact rationals ("3.0" == "3",
   "1,000" == "1000"; a comma only counts as a thousands separator, so "1,2" != "12");
2. the two strings are identical once whitespace and surrounding ``$`` are removed.

Math-Verify's timeouts use ``signal.alarm``, which only works in the main thread; they
are disabled here so checking works in data-loader workers, callbacks and thread pools.
Instead, answers longer than ``MAX_ANSWER_CHARS`` skip the symbolic comparison.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from fractions import Fraction

from math_verify import parse, verify

MAX_ANSWER_CHARS = 512  # longer answers skip SymPy (no timeout protects it)


def _not_the_disabled_timeout_warning(record: logging.LogRecord) -> bool:
    # Math-Verify warns on every call that its timeout is off; here that is deliberate (above).
    return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_not_the_disabled_timeout_warning)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


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


def _as_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").replace("\\!", "").replace(" ", "")
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(s: str) -> str:
    return "".join(s.strip().strip("$").split())


def _math_verify_equal(gold: str, pred: str) -> bool:
    if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
        return False
    # Boxing both makes Math-Verify parse the whole answer as LaTeX ("5^{12}", not "5").
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def is_correct(prediction_text: str, gold: str) -> bool:
    """Whether the last boxed answer of ``prediction_text`` equals ``gold``.

    A prediction without a box is wrong. ``gold`` may be bare ("42") or boxed. Never
    raises: any failure counts as wrong.
    """
    try:
        pred = extract_boxed(prediction_text)
        if pred is None:
            return False
        gold = str(gold)
        gold = extract_boxed(gold) if _BOX_RE.search(gold) else gold
        if gold is None:
            return False
        pred, gold = pred.strip(), gold.strip()
        if not pred or not gold:
            return False
        if _math_verify_equal(gold, pred):
            return True
        gold_num, pred_num = _as_number(gold), _as_number(pred)
        if gold_num is not None and pred_num is not None:
            return gold_num == pred_num
        return _normalise(gold) == _normalise(pred)
    except Exception:
        return False


def answers_correct(predictions: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """``is_correct`` pairwise; the two sequences must have the same length."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} gold answers")
    return [is_correct(p, g) for p, g in zip(predictions, golds, strict=True)]
