"""Answers too big to evaluate, refused before SymPy (or ``Fraction``) ever sees them.

A time limit alone is not enough for these: ``10^{10^{10}}`` or ``(10^{10})!`` make SymPy
build an integer with billions of digits inside one C call, which holds the worker's memory
and CPU until it is killed, and ``Fraction("1e99999999")`` runs in the caller's own process
where no limit applies. Each of them ran for over a minute at the project's first checker
(issue 20). The checks here are string scans, cheap on any input:

- a power whose exponent is a number (or a numeric tower) above ``MAX_EXPONENT``;
- a factorial of a number above ``MAX_FACTORIAL`` (or of a power);
- a scientific-notation literal whose exponent is above ``MAX_EXPONENT``.

An exponent with an unknown in it (``e^{-x^2}``, ``2^{n}``) is left alone: SymPy keeps it
symbolic. A refused answer is graded wrong; no benchmark gold comes near these sizes.
"""

from __future__ import annotations

import math
import re

MAX_EXPONENT = 10_000  # 2^10000 has about 3,000 digits: cheap; 10^(10^10) is not
MAX_FACTORIAL = 1_000  # 1000! has 2,568 digits

_SCIENTIFIC_RE = re.compile(r"\d(?:\.\d*)?[eE][+-]?(\d+)")
_FACTORIAL_RE = re.compile(r"(\d+)\s*!")
_NUMERIC_RE = re.compile(r"[\d\s{}()^.+*]|\\cdot|\\times|\\left|\\right")


def _group(text: str, start: int) -> tuple[str, int]:
    """The exponent starting at ``text[start]``: a brace group's content, else one token."""
    if start < len(text) and text[start] == "{":
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : i], i + 1
        return text[start + 1 :], len(text)
    match = re.match(r"\s*(\d+|\\?[A-Za-z]+|.)", text[start:])
    return (match.group(1), start + match.end()) if match else ("", start)


def _log10_value(text: str) -> float | None:
    """log10 of a numeric exponent made of integers and powers (``9^{9}``, ``2^{34}``,
    ``10``); None when it holds anything else (an unknown, an operator)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return math.log10(int(text)) if int(text) > 0 else 0.0
    caret = text.find("^")
    if caret <= 0:
        return None
    base, (exponent, end) = text[:caret].strip().strip("{}()"), _group(text, caret + 1)
    if end != len(text) or not re.fullmatch(r"\d+", base):
        return None
    inner = _log10_value(exponent)
    if inner is None:
        return None
    if int(base) <= 1:
        return 0.0
    return math.inf if inner > 300 else 10**inner * math.log10(int(base))


def refusal(answer: str) -> str | None:
    """Why ``answer`` is too big to evaluate, or None when it is fine."""
    limit = math.log10(MAX_EXPONENT)
    for match in _SCIENTIFIC_RE.finditer(answer):
        if int(match.group(1)) > MAX_EXPONENT:
            return f"scientific literal with exponent {match.group(1)} > {MAX_EXPONENT}"
    for match in _FACTORIAL_RE.finditer(answer):
        if int(match.group(1)) > MAX_FACTORIAL:
            return f"factorial of {match.group(1)} > {MAX_FACTORIAL}"
    for i, ch in enumerate(answer):
        if ch == "^":
            exponent, _ = _group(answer, i + 1)
            size = _log10_value(exponent)
            if size is not None and size > limit:
                return f"power with exponent {exponent!r} > {MAX_EXPONENT}"
        elif ch == "!" and i > 0 and answer[i - 1] in ")}":
            inner = _bracketed_before(answer, i - 1)
            if inner is None:
                continue
            size = _log10_value(inner)
            if size is None and "^" in inner and not _NUMERIC_RE.sub("", inner):
                return f"factorial of a numeric expression with a power {inner!r}"
            if size is not None and size > math.log10(MAX_FACTORIAL):
                return f"factorial of {inner!r} > {MAX_FACTORIAL}"
    return None


def _bracketed_before(text: str, close: int) -> str | None:
    """Content of the bracket group that closes at ``text[close]``."""
    opening = {")": "(", "}": "{"}[text[close]]
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == text[close]:
            depth += 1
        elif text[i] == opening:
            depth -= 1
            if depth == 0:
                return text[i + 1 : close]
    return None
