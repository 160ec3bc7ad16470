"""Chat-templated tokenisation in which only assistant tokens carry labels.

Real chat templates (Llama-3, Qwen2.5 / ChatML, Phi-3, ...) have no ``{% generation %}``
markers, so the assistant spans are found by rendering. For each assistant turn ``i``:

    render(messages[:i], add_generation_prompt=True)   ends where the reply starts,
    render(messages[:i + 1])                           ends where the reply ends,

and both must be prefixes of ``render(messages)``. The generation prompt is what the model
sees at inference, so a template whose prompt is not the start of its own training text
(a think block opened in the prompt but cut from the reply, a system prompt that moves) is
rejected instead of trained on a context the model never gets.

Rules (whatever the turn order and the template):

- Only assistant content and its end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``,
  ``<|end|>``, ``</s>``) carry labels. Everything the template writes around a reply
  (BOS, a default system message, the "Cutting Knowledge Date" header, role headers) does
  not, also when the conversation opens with an assistant turn: there the reply starts
  where two renders of that turn with different contents first differ.
- A closing suffix that the template writes after the last turn when
  ``add_generation_prompt=False`` (Phi-3 appends ``eos_token``) is not part of any reply:
  it stays in ``input_ids`` (the text is exactly the template's) but is never labelled, so
  the last reply is labelled like every earlier one, through its own end-of-turn marker,
  which is the token generation stops at. The suffix is found as the part of
  ``render(messages[:-1])`` that is not a prefix of the full render, on token boundaries.
- A conversation the template cannot render prefix-consistently raises
  :class:`TemplateError`, a row-level :class:`~sedsft.data.formats.DataError` naming the
  source, the row, the cause and what to do (see :data:`CAUSES`).

Character spans are mapped to tokens with the fast tokenizer's offsets (a token is a target
when it starts inside a span), so the result does not depend on how BPE merges text across
the span boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sedsft import IGNORE_INDEX
from sedsft.data.formats import DataError

MAX_SUFFIX_TOKENS = 16  # a closing suffix is a token or two; longer ones are not searched

# Why a template cannot label a conversation (TemplateError.cause), and what to do.
_TEMPLATE = "choose another template via model.chat_template"
_DROP_SYSTEM = (
    "drop the system prompt (unset data.system_prompt, or remove the row's system message)"
)
CAUSES = {
    "no_system_role": "the chat template has no system role",
    "system_moved": "the chat template moves or drops the system prompt",
    "reasoning": "the chat template strips reasoning from assistant replies",
    "rejected": "the chat template rejects this conversation",
    "rewrite": "the chat template rewrites earlier turns",
}


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant replies
    truncated: bool
    answer_cut: bool = False  # the cut removed the final answer: the last reply's last \boxed{...}, or its end

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class TemplateError(DataError):
    """The chat template cannot label this conversation; ``cause`` is a key of :data:`CAUSES`."""

    def __init__(self, source: str, row: int | None, cause: str, detail: str):
        super().__init__(source, row, None, f"{CAUSES[cause]}: {detail}")
        self.cause = cause


class _Mismatch(Exception):
    """A render that should be a prefix of the full render is not (internal)."""

    def __init__(self, turn: int, renders: Sequence[str]):
        super().__init__(turn)
        self.turn, self.renders = turn, list(renders)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _squash(text: str) -> str:
    """``text`` without whitespace: templates trim or re-space content, never re-word it."""
    return "".join(text.split())


def _closing_suffix(text: str, probe: str, starts: Sequence[int]) -> str:
    """What the template appends after the last turn: the shortest ``text[s:]`` (``s`` a
    token start) such that ``probe`` is ``text[:e] + text[s:]`` for some ``e``.

    ``probe`` is the render of all messages but the last, so without a closing suffix it
    is a plain prefix of ``text`` (suffix ``""``). Raises ``_Mismatch`` when no short
    suffix explains ``probe``.
    """
    if text.startswith(probe):
        return ""
    for s in sorted((s for s in starts if s < len(text)), reverse=True)[:MAX_SUFFIX_TOKENS]:
        suffix = text[s:]
        if probe.endswith(suffix) and text.startswith(probe[: len(probe) - len(suffix)]):
            return suffix
    raise _Mismatch(-1, [probe])


def _reply_start(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], i: int) -> str:
    """The text before assistant turn ``i``'s content: the generation prompt after the
    earlier turns; for an opening assistant turn (no prompt to render), the common prefix
    of two renders of that turn with different contents."""
    if i:
        return _render(tokenizer, messages[:i], generation_prompt=True)
    a = _render(tokenizer, [{**messages[0], "content": "a"}], generation_prompt=False)
    b = _render(tokenizer, [{**messages[0], "content": "b"}], generation_prompt=False)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _locate(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]
) -> tuple[str, list[tuple[int, int]], dict]:
    """Rendered text, ``[start, end)`` character span of every assistant reply, and the
    text's encoding (ids and offsets). Raises ``_Mismatch`` or ``jinja2.TemplateError``."""
    text = _render(tokenizer, messages, generation_prompt=False)
    # The template writes any BOS itself, so the tokenizer must not add another.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, end in encoding["offset_mapping"] if end > start]
    suffix = ""
    if len(messages) > 1:
        suffix = _closing_suffix(
            text, _render(tokenizer, messages[:-1], generation_prompt=False), starts
        )
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _reply_start(tokenizer, messages, i)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if suffix and through.endswith(suffix) and text.startswith(through[: -len(suffix)]):
            end = len(through) - len(suffix)
        elif text.startswith(through):
            end = len(through)
        else:
            raise _Mismatch(i, [before, through])
        if not text.startswith(before) or end <= len(before):
            raise _Mismatch(i, [before, through])
        spans.append((len(before), end))
    return text, spans, encoding


def _without_system(messages: Sequence[dict]) -> list[dict]:
    return [m for m in messages if m["role"] != "system"]


def _has_reasoning(texts: Sequence[str]) -> bool:
    return any("<think>" in t or "</think>" in t for t in texts)


def _diagnose_render_error(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    err: Exception,
    source: str,
    row: int | None,
) -> TemplateError:
    if any(m["role"] == "system" for m in messages):
        try:
            _render(tokenizer, _without_system(messages), generation_prompt=False)
        except jinja2.TemplateError:
            pass
        else:
            return TemplateError(
                source,
                row,
                "no_system_role",
                f"it raises {str(err)!r} on a system message; {_DROP_SYSTEM}, or {_TEMPLATE}",
            )
    return TemplateError(
        source, row, "rejected",
        f"it raises {str(err)!r}; fix the row's turns (many templates want a user turn first and "
        f"user/assistant alternating), or {_TEMPLATE}",
    )  # fmt: skip


def _diagnose_mismatch(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    mismatch: _Mismatch,
    source: str,
    row: int | None,
) -> TemplateError:
    turn = "the last turn" if mismatch.turn < 0 else f"assistant turn {mismatch.turn}"
    if any(m["role"] == "system" for m in messages):
        try:
            _locate(tokenizer, _without_system(messages))
        except (_Mismatch, jinja2.TemplateError):
            pass
        else:
            return TemplateError(
                source, row, "system_moved",
                f"the render changes at {turn} when the system message is there and not without it "
                "(Mistral v0.3 puts the system prompt into the last user turn only, and only while that "
                "turn ends the conversation), so replies would be trained in a context the model is not "
                f"given at inference; {_DROP_SYSTEM}, or {_TEMPLATE}",
            )  # fmt: skip
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if _has_reasoning([*mismatch.renders, *contents]):
        return TemplateError(
            source, row, "reasoning",
            f"what it renders for a reply differs from its own generation prompt or from the reply's "
            f"later rendering ({turn}; DeepSeek-R1 distills cut everything up to </think> and open the "
            "generation prompt with <think>; Qwen3 drops earlier turns' <think> blocks), so the rendered "
            f"replies are not what the model generates; {_TEMPLATE} that renders replies verbatim, or "
            "for Qwen3 keep to single-turn rows",
        )  # fmt: skip
    return TemplateError(
        source, row, "rewrite",
        f"the render up to {turn} is not a prefix of the whole conversation's render, so its assistant "
        f"tokens cannot be located; {_TEMPLATE} (a prefix-consistent one, or one with "
        "{% generation %} markers)",
    )  # fmt: skip


def _check_contents(
    messages: Sequence[dict],
    text: str,
    spans: Sequence[tuple[int, int]],
    source: str,
    row: int | None,
) -> None:
    """Every reply must be rendered inside its span and every system prompt somewhere:
    a template that silently drops text would otherwise train on something else."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    for (start, end), content in zip(spans, replies, strict=True):
        if _squash(content) not in _squash(text[start:end]):
            cause = "reasoning" if _has_reasoning([content]) else "rewrite"
            raise TemplateError(
                source, row, cause,
                f"the reply {content[:40]!r}... is not rendered as written (rendered: "
                f"{text[start:end][:40]!r}...); {_TEMPLATE} that renders replies verbatim",
            )  # fmt: skip
    squashed = _squash(text)
    for m in messages:
        if m["role"] == "system" and _squash(m["content"]) not in squashed:
            raise TemplateError(
                source,
                row,
                "system_moved",
                f"the system prompt does not appear in the rendered text; {_DROP_SYSTEM}, or {_TEMPLATE}",
            )


def _locate_checked(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], source: str, row: int | None
) -> tuple[str, list[tuple[int, int]], dict]:
    try:
        text, spans, encoding = _locate(tokenizer, messages)
    except jinja2.TemplateError as err:
        raise _diagnose_render_error(tokenizer, messages, err, source, row) from err
    except _Mismatch as mismatch:
        raise _diagnose_mismatch(tokenizer, messages, mismatch, source, row) from None
    _check_contents(messages, text, spans, source, row)
    return text, spans, encoding


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    source: str = "<chat>",
    row: int | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the ``[start, end)`` character span of every assistant reply
    (content and end-of-turn marker). Raises :class:`TemplateError` naming ``source`` and
    ``row``."""
    text, spans, _ = _locate_checked(tokenizer, messages, source, row)
    return text, spans


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    max_length: int | None = None,
    source: str = "<chat>",
    row: int | None = None,
) -> TokenizedChat:
    """Tokenise a conversation; labels are the input ids inside assistant replies.

    Labels are *not* shifted: position ``t`` holds the id of token ``t``; the model
    step shifts once. Sequences longer than ``max_length`` are cut at the end.
    ``source`` and ``row`` name the conversation in a :class:`TemplateError`.
    """
    text, spans, encoding = _locate_checked(tokenizer, messages, source, row)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for t, (start, _end) in enumerate(encoding["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is not None and span[0] <= start < span[1]:
            labels[t] = input_ids[t]
    truncated = max_length is not None and len(input_ids) > max_length
    answer_cut = False
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        kept_chars = encoding["offset_mapping"][max_length - 1][1]
        answer_cut = bool(spans) and kept_chars < final_answer_end(text, spans[-1])
    return TokenizedChat(input_ids, labels, truncated, answer_cut)


def final_answer_end(text: str, span: tuple[int, int]) -> int:
    """Where the final answer of the reply at ``span`` of ``text`` ends: after the closing
    brace of its last ``\\boxed{...}``; the reply's end when it boxes nothing (or never
    closes the box). A cut before this point takes the answer away from the target."""
    start = text.rfind("\\boxed{", span[0], span[1])
    if start < 0:
        return span[1]
    depth = 0
    for i in range(start + len("\\boxed"), span[1]):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return span[1]


def render_labels(tokenizer: PreTrainedTokenizerBase, chat: TokenizedChat) -> str:
    """Human check of the masking: trained text in ``[[...]]``, ignored text plain."""
    pieces, current, trained = [], [], False
    for token_id, label in zip(chat.input_ids, chat.labels, strict=True):
        is_target = label != IGNORE_INDEX
        if is_target != trained and current:
            decoded = tokenizer.decode(current)
            pieces.append(f"[[{decoded}]]" if trained else decoded)
            current = []
        trained = is_target
        current.append(token_id)
    if current:
        decoded = tokenizer.decode(current)
        pieces.append(f"[[{decoded}]]" if trained else decoded)
    return "".join(pieces)
