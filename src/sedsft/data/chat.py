"""Chat-templated tokenisation in which only assistant tokens carry labels.

Real chat templates (Llama-3, Qwen2.5 / ChatML) have no ``{% generation %}`` markers,
so the assistant spans are found by rendering: for each assistant turn ``i``,

    render(messages[:i], add_generation_prompt=True)   ends where the reply starts,
    render(messages[:i + 1])                           ends where the reply ends,

and both must be prefixes of ``render(messages)``. The reply span therefore covers the
content and the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``), which the
model has to learn to emit. Character spans are mapped to tokens with the fast
tokenizer's offsets (a token is a target when it starts inside a span), so the result
does not depend on how BPE merges text across the span boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant replies
    truncated: bool

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class TemplateError(ValueError):
    """The chat template does not render conversations prefix-consistently."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the ``[start, end)`` character span of every assistant reply."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise TemplateError(
                "the chat template does not render conversations prefix-consistently (turn "
                f"{i}); assistant tokens cannot be located. Templates that rewrite earlier "
                "turns (e.g. dropping reasoning) need {% generation %} markers or a "
                "different model.chat_template."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], max_length: int | None = None
) -> TokenizedChat:
    """Tokenise a conversation; labels are the input ids inside assistant replies.

    Labels are *not* shifted: position ``t`` holds the id of token ``t``; the model
    step shifts once. Sequences longer than ``max_length`` are cut at the end.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template writes any BOS itself, so the tokenizer must not add another.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
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
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedChat(input_ids, labels, truncated)


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
