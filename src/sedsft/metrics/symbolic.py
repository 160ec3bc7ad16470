"""The symbolic half of answer checking: two cleaned answer strings compared with SymPy.

This module runs inside the grading worker process (``sedsft.metrics.sandbox``), never in
the caller's process: SymPy has no upper bound on the time one comparison can take, and the
worker is what a hard time limit can kill. Everything here assumes its inputs already passed
the cheap checks and the size guard of ``sedsft.metrics.answers`` (no huge powers, no huge
factorials), so it is free to evaluate.

Rules beyond plain Math-Verify (``math_verify.parse`` / ``verify``), each because Math-Verify
alone grades the case wrongly on real benchmark golds:

- **Lists**: a top-level comma list is compared item by item, in order (a tuple, "T(10),
  T(11), T(12)", "a_7 then the sum"); in any order only when the caller says the answer is a
  set (``unordered``, decided from the question), or when the gold reads ``v = a, b, ...``
  (the solutions of one equation). Math-Verify turns every comma list into a set.
- **Equations**: a gold ``lhs = rhs`` is one of three kinds. A *definition* (the left side
  a name: ``y``, ``N``, ``S(t)``, ``E(W)``, ``(x, y, z)``) is answered by its right side,
  with or without the name. A *value* (the left side has no unknowns: ``\\log_6(216) = 3``)
  is answered by its right side too. A genuine *equation* (``9x^2 - 12x + 29 = 0``, a plane,
  a circle) is answered only by an equation whose ``lhs - rhs`` is a nonzero constant multiple
  of the gold's. Math-Verify compares equations over real symbols, where ``x^2 + 1 = 0`` and
  ``1 = 0`` collapse to the same truth value as the gold's and are accepted.
- **Inequalities and set-builder sets** (``a < -3``, ``\\{x | -2 \\le x < 1\\}``) are turned
  into intervals before comparing with an interval.
- **A numeric probe** rejects two expressions with free symbols that differ at sample
  points before Math-Verify's simplification runs (``\\sin(440 \\pi t)`` against
  ``\\sin(880 \\pi t)`` ran for over a minute inside it); it never accepts on its own.
"""

from __future__ import annotations

import logging
import random
import re

import sympy
from math_verify import parse, verify

for _name in ("math_verify", "math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # the worker's stderr is the caller's

# A name on the left of "=": y, N, S(t), E(W), N(n), m_{\max}, \mathbf{y}, f^{-1}(x), y', (x, y, z)
_NAME_RE = re.compile(
    r"(?:\\(?:mathbf|mathrm|operatorname|vec)\{[A-Za-z]+\}|[A-Za-z](?:_\{?[^{}=]*\}?)?)"
    r"(?:\^\{-1\}|'+)?(?:\([A-Za-z0-9,\s]*\))?"
    r"|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\)"
)
_SET_BUILDER_RE = re.compile(r"^\\\{\s*([A-Za-z])\s*(?:\||\\mid|:)\s*(.+?)\\\}$")
_OPEN = {"(": ")", "[": "]", "{": "}"}


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` where no bracket is open; ``\\{``/``\\}`` and ``\\left``/
    ``\\right`` pairs count as brackets, and an interval's mixed ends (``(0, 1]``) balance."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if text.startswith(("\\{", "\\lbrace"), i):
                depth += 1
            elif text.startswith(("\\}", "\\rbrace"), i):
                depth -= 1
            i += 2
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _first_expr(text: str):
    """Math-Verify's SymPy reading of ``text`` (as if boxed), or None when it has none."""
    for item in parse(f"\\boxed{{{text}}}", parsing_timeout=None):
        if isinstance(item, sympy.Basic):
            return item
    return None


def _is_name(text: str) -> bool:
    return bool(_NAME_RE.fullmatch(text.replace(" ", "")))


def _plain(text: str) -> str:
    return re.sub(r"\s+|\\[,;!: ]", "", text)


def _numbers_differ(a, b) -> bool:
    """True when the two SymPy expressions evaluate to clearly different finite values at a
    few random points (the same points for both); False when unsure."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols or len(symbols) > 6:
        return False
    rng = random.Random(12345)
    differing = 0
    for _ in range(3):
        point = {s: sympy.Float(rng.uniform(0.1, 0.9), 30) for s in symbols}
        try:
            va, vb = complex(a.evalf(30, subs=point)), complex(b.evalf(30, subs=point))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return False
        if any(v != v or abs(v) == float("inf") for v in (va, vb)):  # NaN or infinite
            return False
        if abs(va - vb) > 1e-6 * max(1.0, abs(va), abs(vb)):
            differing += 1
    return differing >= 2


def _as_set(expr):
    """An inequality (or a conjunction of them) in one unknown as a SymPy set, else None."""
    if (
        isinstance(expr, sympy.Rel | sympy.And)
        and not isinstance(expr, sympy.Eq)
        and len(expr.free_symbols) == 1
    ):
        try:
            return expr.as_set()
        except (NotImplementedError, TypeError, ValueError):
            return None
    return None


def _set_builder(text: str):
    """``\\{x | -2 \\le x < 1\\}`` as a SymPy set when its condition is an inequality."""
    match = _SET_BUILDER_RE.match(text.strip())
    if not match:
        return None
    condition = _first_expr(match.group(2))
    return _as_set(condition) if condition is not None else None


def _sets_equal(a, b) -> bool:
    try:
        return bool(sympy.simplify(a.symmetric_difference(b)) == sympy.EmptySet)
    except Exception:
        return a == b


def scalar_equal(gold: str, pred: str) -> bool:
    """One gold item against one predicted item (no top-level list)."""
    if _plain(gold) == _plain(pred):
        return True
    if _top_level_equals(gold) or _top_level_equals(pred):
        return _equation_equal(gold, pred)
    gold_set, pred_set = _set_builder(gold), _set_builder(pred)
    if (gold_set is None and _SET_BUILDER_RE.match(gold.strip())) or (
        pred_set is None and _SET_BUILDER_RE.match(pred.strip())
    ):
        return False  # a set-builder set that is no interval: only the same text matches
    gold_expr, pred_expr = _first_expr(gold), _first_expr(pred)
    if gold_set is not None or pred_set is not None:
        gold_set = gold_set if gold_set is not None else gold_expr
        pred_set = pred_set if pred_set is not None else pred_expr
        if gold_set is None or pred_set is None or gold_set is pred_set:
            return False
        if not isinstance(gold_set, sympy.Set) or not isinstance(pred_set, sympy.Set):
            return False
        return _sets_equal(gold_set, pred_set)
    for interval, other in ((gold_expr, pred_expr), (pred_expr, gold_expr)):
        if isinstance(interval, sympy.Set) and not isinstance(interval, sympy.FiniteSet):
            converted = _as_set(other)
            if converted is not None:
                return _sets_equal(interval, converted)
    if (
        isinstance(gold_expr, sympy.Expr)
        and isinstance(pred_expr, sympy.Expr)
        and _numbers_differ(gold_expr, pred_expr)
    ):
        return False
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _top_level_equals(text: str) -> list[str] | None:
    """The sides of ``text`` split at top-level ``=`` (two or more), else None."""
    sides = split_top_level(text, "=")
    if len(sides) < 2 or any(not s for s in sides):
        return None
    return sides


def _equation_equal(gold: str, pred: str) -> bool:
    gold_sides, pred_sides = _top_level_equals(gold), _top_level_equals(pred)
    if gold_sides is None:  # a bare gold against "name = value"
        assert pred_sides is not None
        return _is_name(pred_sides[0]) and scalar_equal(gold, pred_sides[-1])
    gold_left, gold_right = gold_sides[0], gold_sides[-1]
    left_expr = _first_expr(gold_left)
    if _is_name(gold_left) or (left_expr is not None and not left_expr.free_symbols):
        # a definition or a value: the right side is the answer, the name may be repeated
        if pred_sides is None:
            return scalar_equal(gold_right, pred)
        same_left = _plain(pred_sides[0]) == _plain(gold_left) or (
            not _is_name(gold_left) and scalar_equal(gold_left, pred_sides[0])
        )
        return same_left and scalar_equal(gold_right, pred_sides[-1])
    if pred_sides is None or len(gold_sides) != 2 or len(pred_sides) != 2:
        return False
    expressions = [_first_expr(side) for side in (*gold_sides, *pred_sides)]
    if any(not isinstance(e, sympy.Expr) for e in expressions):
        return False
    gold_zero = sympy.nsimplify(expressions[0] - expressions[1], rational=True)
    pred_zero = sympy.nsimplify(expressions[2] - expressions[3], rational=True)
    if gold_zero == 0 or pred_zero == 0 or gold_zero.free_symbols != pred_zero.free_symbols:
        return False  # a different set of unknowns cannot be a constant multiple
    ratio = sympy.simplify(pred_zero / gold_zero)
    return bool(ratio.is_number and ratio.is_finite and ratio != 0)


def _solution_values(items: list[str]) -> list[str] | None:
    """``["x=1", "2", "3"]`` or ``["x=1", "x=2"]`` (one unknown, its values) as the values."""
    first = split_top_level(items[0], "=")
    if len(first) != 2 or not _is_name(first[0]):
        return None
    name, values = _plain(first[0]), [first[1]]
    for item in items[1:]:
        sides = split_top_level(item, "=")
        if len(sides) == 1:
            values.append(item)
        elif len(sides) == 2 and _plain(sides[0]) == name:
            values.append(sides[1])
        else:
            return None
    return values


def _strip_name(items: list[str]) -> list[str]:
    values = _solution_values(items)
    return values if values is not None else items


def _unwrap(text: str, unordered: bool) -> str:
    """A predicted list written inside one pair of brackets: ``(2, 4, 3)`` -> ``2, 4, 3``;
    ``\\{1, 2\\}`` only where order does not matter."""
    t = text.strip()
    t = re.sub(r"^\\left\s*", "", t)
    t = re.sub(r"\\right\s*(\\?[)\]}])$", r"\1", t)
    pairs = [("(", ")"), ("[", "]")] + ([("\\{", "\\}")] if unordered else [])
    for left, right in pairs:
        if t.startswith(left) and t.endswith(right):
            inner = t[len(left) : -len(right)]
            if len(split_top_level(left + inner + right)) == 1 and len(split_top_level(inner)) > 1:
                return inner
    return text


def answers_equal(gold: str, pred: str, unordered: bool = False) -> bool:
    """Whether ``pred`` answers ``gold`` (both cleaned strings); see the module docstring.

    ``unordered``: the question asks for a set of answers (all solutions, all values), so a
    comma list may come in any order.
    """
    gold_items = split_top_level(gold)
    if len(gold_items) == 1:
        return scalar_equal(gold, pred)
    values = _solution_values(gold_items)
    if values is not None:
        gold_items, unordered = values, True
    pred_items = split_top_level(pred)
    if len(pred_items) == 1:
        pred_items = split_top_level(_unwrap(pred, unordered))
    pred_items = _strip_name(pred_items) if values is not None else pred_items
    if len(pred_items) != len(gold_items):
        return False
    if not unordered:
        return all(scalar_equal(g, p) for g, p in zip(gold_items, pred_items, strict=True))
    remaining = list(pred_items)
    for g in gold_items:
        match = next((i for i, p in enumerate(remaining) if scalar_equal(g, p)), None)
        if match is None:
            return False
        remaining.pop(match)
    return True
