"""The DAPO-style rule scorer of the paper's RL stage, restated in the project's own code.

The paper's RL runs (verl, RL prompts with ``data_source=math_dapo``) were scored by verl's
DAPO math scorer: a rule match of the final answer, with no symbolic algebra. Its rules:

* Only the last 300 characters of a completion are read.
* ``mode="minerva"`` (verl's default, ``strict_box_verify=False``): the answer is the text
  after the last ``Answer:`` (any case) up to the end of its line; it and the gold go
  through the same string normalisation (``normalize``) and must be equal.
* ``mode="strict_box"``: the content of the last ``\\boxed{...}`` in the last 100 of those
  characters must equal the gold exactly (no normalisation).
* Score 1.0 when correct, -1.0 otherwise.
* ``after_think=True``: a completion holding both ``<think>`` and ``</think>`` is read from
  after its first ``</think>`` (nothing after it reads as no answer), before the cut above.

Which rules the paper ran: upstream verl calls the scorer in minerva mode, but the authors'
vendored verl (the release's ``verl/utils/reward_score/math_dapo.py``) forces
``strict_box_verify=True`` and reads after ``</think>``; the released RL prompts ask for no
``Answer:`` line (a bare question in one user turn), and the SFT system prompt asks for
``\boxed{}``, so minerva mode would score a correct boxed answer -1. The paper presets use
``mode="strict_box", after_think=True``.

Why restated and not imported: verl is not a dependency, and its normalisation is written
with backtracking regexes. Here every step scans the string a bounded number of times, so
the cost is linear in the answer's length whatever a completion holds; a completion is cut
to its last 300 characters before anything else, so a 100k-character completion costs what
a short one does. No SymPy, no timeout needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sedsft.rl.rewards import completion_text

TAIL_CHARS = 300  # characters of a completion the scorer reads (the longest MATH-500 answer has 159)
STRICT_TAIL_CHARS = 100  # of those, the ones strict_box mode searches for a box
INVALID = "[INVALID]"  # what an unreadable completion is normalised to
MODES = ("minerva", "strict_box")

# Plain replacements, in order (each applied to the whole string before the next).
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
# Units and filler deleted outright, in order.
REMOVED: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
# Bounded input (TAIL_CHARS) makes this one regex cheap; it finds "Answer:" lines.
ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
UNWRAP_FIRST = ("\\text{", "\\textbf{", "\\overline{")  # command{x} -> x, up to the first "}"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None (unclosed or absent)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
    return None


def _first_dollar_pair(line: str) -> str:
    # A line with two "$" keeps only what lies between the first two: "x is $5$ m" -> "$5$".
    first = line.find("$")
    second = line.find("$", first + 1) if first >= 0 else -1
    return line if second < 0 else "$" + line[first + 1 : second] + "$"


def _unwrap_first_brace(line: str, command: str) -> str:
    # Every "<command>{x}" becomes "x", x ending at the next "}" (nested braces are not matched).
    out, i = [], 0
    while True:
        start = line.find(command, i)
        if start < 0:
            break
        close = line.find("}", start + len(command))
        if close < 0:  # no "}" further on: no later occurrence can close either
            break
        out.append(line[i:start] + line[start + len(command) : close])
        i = close + 1
    out.append(line[i:])
    return "".join(out)


def _unwrap_boxed_greedy(line: str) -> str:
    # "\boxed{" up to the LAST "}" of the line becomes what lies between.
    start = line.find("\\boxed{")
    close = line.rfind("}")
    if start < 0 or close < start + len("\\boxed{"):
        return line
    return line[:start] + line[start + len("\\boxed{") : close] + line[close + 1 :]


def _normalise_line(line: str) -> str:
    line = _first_dollar_pair(line)
    for command in UNWRAP_FIRST:
        line = _unwrap_first_brace(line, command)
    return _unwrap_boxed_greedy(line)


def _brace_shorthand(text: str, command: str, arguments: int) -> str:
    # TeX shorthand: "frac12" -> "frac{1}{2}", "sqrt2" -> "sqrt{2}". The first argument is any
    # character but "{" (a newline included); the second any character but a newline.
    out, i = [], 0
    while True:
        start = text.find(command, i)
        if start < 0:
            break
        first = start + len(command)
        if first >= len(text) or text[first] == "{":
            out.append(text[i:first])
            i = first
            continue
        if arguments == 2:
            if first + 1 >= len(text) or text[first + 1] == "\n":
                out.append(text[i : first])
                i = first
                continue
            out.append(text[i:start] + command + "{" + text[first] + "}{" + text[first + 1] + "}")
            i = first + 2
        else:
            out.append(text[i:start] + command + "{" + text[first] + "}")
            i = first + 1
    out.append(text[i:])
    return "".join(out)


def normalize(answer: str) -> str:
    """The scorer's normal form of an answer: the part after the last ``=``, substitutions
    and unit words removed, ``$..$`` / ``\\text{}`` / ``\\textbf{}`` / ``\\overline{}`` /
    ``\\boxed{}`` unwrapped line by line, ``\\frac12`` / ``\\sqrt2`` braced, ``$`` dropped,
    thousands commas dropped from whole numbers."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for word in REMOVED:
        answer = answer.replace(word, "")
    # The unwrapping rules never cross a line break, so each line is handled on its own.
    answer = "\n".join(_normalise_line(line) for line in answer.split("\n"))
    answer = _brace_shorthand(answer, "frac", 2)
    answer = _brace_shorthand(answer, "sqrt", 1)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(tail: str) -> str:
    """The text after the last ``Answer:`` of ``tail`` (to the end of its line), or ``[INVALID]``."""
    found = ANSWER_LINE.findall(tail)
    return found[-1] if found else INVALID


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def after_thinking(completion: str) -> str:
    """What follows the first ``</think>`` of a completion holding both think tags (up to a
    second ``</think>``, if any, as ``str.split(...)[1]`` reads it); the completion otherwise."""
    if THINK_OPEN in completion and THINK_CLOSE in completion:
        return completion.split(THINK_CLOSE)[1]
    return completion


def score(completion: str, gold: str, mode: str = "minerva", after_think: bool = False) -> tuple[bool, str]:
    """(correct, the prediction as compared) for one completion under the DAPO rules."""
    if mode not in MODES:
        raise ValueError(f"DAPO scorer mode={mode!r}: use one of {MODES}")
    if after_think:
        completion = after_thinking(completion)
    tail = completion[-TAIL_CHARS:]
    if mode == "strict_box":
        boxed = last_boxed(tail[-STRICT_TAIL_CHARS:])
        prediction = INVALID if boxed is None else boxed
        return prediction == gold, prediction
    prediction = normalize(extract_answer(tail))
    return prediction == normalize(gold), prediction


def dapo_reward(
    completions: Sequence[Any],
    gold: Sequence[str | None],
    mode: str = "minerva",
    correct: float = 1.0,
    wrong: float = -1.0,
    after_think: bool = False,
    **_: Any,
) -> list[float | None]:
    """TRL reward function: ``correct`` / ``wrong`` (DAPO's 1 / -1) per completion by the
    DAPO rules; None where a row has no gold answer."""
    if mode not in MODES:
        raise ValueError(f"reward mode={mode!r}: the DAPO scorer knows {MODES}")
    if len(completions) != len(gold):
        raise ValueError(f"got {len(completions)} completions but {len(gold)} gold answers")
    return [
        None if answer is None else (correct if score(completion_text(c), str(answer), mode, after_think)[0] else wrong)
        for c, answer in zip(completions, gold, strict=True)
    ]


def verl_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Any = None,
    mode: str = "minerva",
    after_think: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """verl's ``custom_reward_function`` signature over the same rules; ``mode`` and
    ``after_think`` come from ``custom_reward_function.reward_kwargs``."""
    correct, prediction = score(solution_str, ground_truth, mode, after_think)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": prediction}
