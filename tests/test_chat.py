"""Assistant-only labels on chat templates of real shapes (no generation markers)."""

from __future__ import annotations

import pytest

from conftest import CHATML_GENERATION_TEMPLATE, with_template
from sedsft.data.chat import IGNORE_INDEX, TemplateError, tokenize_chat

SINGLE = [
    {"role": "system", "content": "Please reason step by step."},
    {"role": "user", "content": "Mia has 12 apples. She buys 7 more. How many now?"},
    {"role": "assistant", "content": "First, 12 + 7 = 19. The answer is \\boxed{19}."},
]
MULTI = [
    {"role": "user", "content": "Tom has 5 coins. He finds 3. How many?"},
    {"role": "assistant", "content": "5 + 3 = 8, so \\boxed{8}."},
    {"role": "user", "content": "And if he then loses 2?"},
    {"role": "assistant", "content": "8 - 2 = 6. \\boxed{6}"},
]


def target_runs(tokenizer, chat) -> list[str]:
    """Decoded text of each maximal run of labelled tokens, and check labels == ids there."""
    runs, current = [], []
    for token_id, label in zip(chat.input_ids, chat.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chatml_labels_cover_exactly_replies_and_end_of_turn(chatml_tokenizer, messages):
    chat = tokenize_chat(chatml_tokenizer, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert target_runs(chatml_tokenizer, chat) == [r + "<|im_end|>\n" for r in replies]
    assert not chat.truncated


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_llama3_labels_cover_exactly_replies_and_eot(llama3_tokenizer, messages):
    chat = tokenize_chat(llama3_tokenizer, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert target_runs(llama3_tokenizer, chat) == [r + "<|eot_id|>" for r in replies]
    # the template's BOS is there once, and unlabelled
    assert chat.input_ids.count(llama3_tokenizer.bos_token_id) == 1
    assert chat.labels[0] == IGNORE_INDEX


def test_prompt_tokens_never_labelled(llama3_tokenizer):
    chat = tokenize_chat(llama3_tokenizer, MULTI)
    text_of_targets = "".join(target_runs(llama3_tokenizer, chat))
    for message in MULTI:
        if message["role"] == "user":
            assert message["content"] not in text_of_targets


def test_truncation_keeps_prefix_and_labels_aligned(chatml_tokenizer):
    full = tokenize_chat(chatml_tokenizer, MULTI)
    cut = tokenize_chat(chatml_tokenizer, MULTI, max_length=len(full.input_ids) - 5)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.labels == full.labels[: len(cut.labels)]
    assert 0 < cut.num_targets < full.num_targets


def test_truncation_can_leave_no_target(chatml_tokenizer):
    long_prompt = [{"role": "user", "content": "apples " * 200}, {"role": "assistant", "content": "\\boxed{1}"}]
    assert tokenize_chat(chatml_tokenizer, long_prompt, max_length=64).num_targets == 0


def test_matches_transformers_generation_mask(base_tokenizer):
    """Where a template has {% generation %} markers, HF's own mask must agree with ours."""
    tok = with_template(base_tokenizer, CHATML_GENERATION_TEMPLATE)
    ours = tokenize_chat(tok, MULTI)
    theirs = tok.apply_chat_template(MULTI, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours.input_ids == list(theirs["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in ours.labels] == list(theirs["assistant_masks"])


def test_template_that_rewrites_history_is_rejected(base_tokenizer):
    # Drops earlier assistant turns (as reasoning templates drop <think> blocks):
    # the render of a prefix is no prefix of the full render.
    rewriting = (
        "{%- for message in messages %}{%- if message['role'] != 'assistant' or loop.last %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = with_template(base_tokenizer, rewriting)
    with pytest.raises(TemplateError, match="prefix-consistently"):
        tokenize_chat(tok, MULTI)
