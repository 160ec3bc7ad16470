"""Input row formats, normalised to chat messages.

Supported row shapes (checked in this order):

- ``messages``: a list of ``{"role", "content"}`` dicts, roles system / user / assistant,
  any number of turns;
- ``prompt`` + ``completion``: strings, or lists of messages (TRL's conversational form);
- ``question`` + ``response``;
- ``question`` + ``answer`` (the answer is the assistant's reply).

``gold_answer`` finds the reference answer used to score generations: ``answer`` next to a
``response``, verl's ``reward_model.ground_truth``, or an explicit ``gold`` field.
Problems raise ``DataError`` naming the source, the row and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# Columns the loaders add: a row's number in its source, and the problem of a row that
# could not be stored as it was (a type clash in a JSON file); not part of any format.
ROW_FIELD = "_row"
PROBLEM_FIELD = "_problem"
INTERNAL_FIELDS = (ROW_FIELD, PROBLEM_FIELD)


class DataError(ValueError):
    """A row that cannot be used; the message names source, row and field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str):
        where = source if row is None else f"{source}: row {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field, self.problem = source, row, field, problem


def row_problem(row: Mapping[str, Any], source: str, index: int) -> str | None:
    """Why ``row`` is neither a training conversation nor a prompt (None if it is one)."""
    try:
        to_messages(row, source, index)
        return None
    except DataError as err:
        problem = err.problem if err.field is None else f"field {err.field!r}: {err.problem}"
    try:
        to_prompt(row, source, index)
        return None
    except DataError:
        return problem


def _check_recorded_problem(row: Mapping[str, Any], source: str, index: int) -> None:
    if row.get(PROBLEM_FIELD):
        raise DataError(source, index, None, row[PROBLEM_FIELD])


def _is_blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def check_messages(messages: Any, source: str, row: int, field: str = "messages") -> list[Message]:
    """Validate a list of chat messages; return plain ``{"role", "content"}`` dicts."""
    if not isinstance(messages, list | tuple):
        raise DataError(source, row, field, f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DataError(source, row, field, "is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(source, row, f"{field}[{i}]", f"expected a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(source, row, f"{field}[{i}].role", f"unknown role {role!r}; allowed: {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                source, row, f"{field}[{i}].content", f"expected a string, got {type(content).__name__}"
            )
        if role == "assistant" and _is_blank(content):
            raise DataError(source, row, f"{field}[{i}].content", "assistant content is empty")
        out.append({"role": role, "content": content})
    return out


def _as_turns(value: Any, role: str, source: str, row: int, field: str) -> list[Message]:
    if isinstance(value, str):
        if role == "assistant" and _is_blank(value):
            raise DataError(source, row, field, "assistant content is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list | tuple):
        return check_messages(value, source, row, field)
    raise DataError(source, row, field, f"expected a string or a list of messages, got {type(value).__name__}")


def to_messages(
    row: Mapping[str, Any], source: str, index: int, system_prompt: str | None = None
) -> list[Message]:
    """Turn one row of any supported shape into a conversation with >= 1 assistant turn.

    ``system_prompt`` is prepended when the conversation has no system message.
    """
    _check_recorded_problem(row, source, index)
    if row.get("messages") is not None:
        messages = check_messages(row["messages"], source, index)
    elif row.get("prompt") is not None and "completion" in row:
        messages = _as_turns(row["prompt"], "user", source, index, "prompt")
        messages += _as_turns(row["completion"], "assistant", source, index, "completion")
    elif row.get("question") is not None and ("response" in row or "answer" in row):
        field = "response" if row.get("response") is not None else "answer"
        messages = _as_turns(row["question"], "user", source, index, "question")
        messages += _as_turns(row.get(field), "assistant", source, index, field)
    else:
        present = sorted(k for k, v in row.items() if v is not None and k not in INTERNAL_FIELDS)
        raise DataError(
            source,
            index,
            None,
            f"no supported format among columns {present}; expected 'messages', "
            "'prompt'+'completion', 'question'+'response' or 'question'+'answer'",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(source, index, "messages", "has no assistant turn, so nothing to train on")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def to_prompt(
    row: Mapping[str, Any], source: str, index: int, system_prompt: str | None = None
) -> list[Message]:
    """The conversation up to (not including) the last assistant turn, for generation.

    Accepts prompt-only rows too (verl RL parquet: ``prompt`` is a list of messages).
    """
    _check_recorded_problem(row, source, index)
    if row.get("prompt") is not None and row.get("completion") is None:
        messages = _as_turns(row["prompt"], "user", source, index, "prompt")
    elif row.get("question") is not None and row.get("response") is None and row.get("answer") is None:
        messages = _as_turns(row["question"], "user", source, index, "question")
    else:
        messages = to_messages(row, source, index)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last]
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError(source, index, "prompt", "no user turn to answer")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def gold_answer(row: Mapping[str, Any]) -> str | None:
    """The reference final answer of a row, if the row carries one (a blank one counts as
    none: such a row is left out of accuracy, not scored against the empty string)."""
    reward = row.get("reward_model")
    candidates = (
        row.get("gold"),
        reward.get("ground_truth") if isinstance(reward, Mapping) else None,
        row.get("answer") if row.get("response") is not None else None,
    )
    for value in candidates:
        if value is not None:
            return None if _is_blank(str(value)) else str(value)
    return None
