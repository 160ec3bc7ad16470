"""Assistant-only labels on chat templates of real shapes (no generation markers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CHATML_GENERATION_TEMPLATE, with_template
from sedsft.data.chat import IGNORE_INDEX, TemplateError, render_labels, tokenize_chat
from sedsft.data.datamodule import SFTDataModule
from sedsft.data.formats import DataError
from sedsft.data.sources import LocalFileSource

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
    # Drops earlier assistant turns: the render of a prefix is no prefix of the full render.
    rewriting = (
        "{%- for message in messages %}{%- if message['role'] != 'assistant' or loop.last %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = with_template(base_tokenizer, rewriting)
    with pytest.raises(DataError) as caught:
        tokenize_chat(tok, MULTI, source="train.jsonl", row=4)
    assert isinstance(caught.value, TemplateError) and caught.value.cause == "rewrite"
    assert str(caught.value).startswith("train.jsonl: row 4: the chat template rewrites earlier turns: ")
    assert "assistant turn 1" in str(caught.value) and "model.chat_template" in str(caught.value)


# ChatML that cuts each reply up to </think> and keeps a plain generation prompt (the first
# DeepSeek-R1 distill release did this): prefix-consistent, but the reasoning is never rendered.
CUTTING_THINK = (
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_cuts_reasoning_is_rejected_even_when_prefix_consistent(base_tokenizer):
    tok = with_template(base_tokenizer, CUTTING_THINK)
    plain = tokenize_chat(tok, MULTI)  # without reasoning the template is fine
    assert target_runs(tok, plain) == [m["content"] + "<|im_end|>\n" for m in MULTI if m["role"] == "assistant"]
    thinking = [MULTI[0], {"role": "assistant", "content": "<think>5 and 3 more</think>5 + 3 = 8"}]
    with pytest.raises(TemplateError) as caught:
        tokenize_chat(tok, thinking, source="s.jsonl", row=0)
    assert caught.value.cause == "reasoning"
    assert "strips reasoning" in str(caught.value) and "'<think>5 and 3 more</think>5 + 3 = 8'" in str(caught.value)


def test_template_that_drops_the_system_prompt_is_rejected(base_tokenizer):
    no_system = (
        "{%- for message in messages %}{%- if message['role'] != 'system' %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = with_template(base_tokenizer, no_system)
    with pytest.raises(TemplateError) as caught:
        tokenize_chat(tok, SINGLE, source="s.jsonl", row=2)
    assert caught.value.cause == "system_moved"
    assert "does not appear in the rendered text" in str(caught.value) and "data.system_prompt" in str(caught.value)


@pytest.mark.parametrize("fixture", ["chatml_tokenizer", "llama3_tokenizer"])
def test_opening_assistant_turn_labels_only_the_greeting(request, fixture):
    """A greeting before the first user turn: the template's preamble (Qwen's default system
    message, Llama's BOS and date header) stays unlabelled."""
    tok = request.getfixturevalue(fixture)
    greeting = {"role": "assistant", "content": "Hello! Ask me a sum."}
    chat = tokenize_chat(tok, [greeting, *MULTI])
    end = "<|im_end|>\n" if fixture == "chatml_tokenizer" else "<|eot_id|>"
    replies = [greeting["content"]] + [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert target_runs(tok, chat) == [r + end for r in replies]
    assert chat.labels[0] == IGNORE_INDEX
    assert "[[Hello!" in render_labels(tok, chat)


def test_datamodule_skips_rows_the_template_rejects_naming_file_and_row(base_tokenizer, tmp_path):
    """Gemma-2's template raises on a system message: with data.system_prompt set, every row
    is rejected, and the error names the file, the row, the cause and the knob."""
    gemma = (Path(__file__).parent / "fixtures" / "chat_templates" / "gemma2_it.jinja").read_text()
    tok = with_template(base_tokenizer, gemma, bos="<|begin_of_text|>")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": MULTI}) + "\n" for _ in range(3)))
    datamodule = SFTDataModule(tok, LocalFileSource(str(path)), val_size=0, system_prompt="Be brief.", max_length=256)
    with pytest.raises(DataError) as caught:
        datamodule.setup("fit")
    message = str(caught.value)
    assert "empty after filtering" in message
    assert f"{path}: row 0: the chat template has no system role: it raises 'System role not supported'" in message
    assert "unset data.system_prompt" in message
    ok = SFTDataModule(tok, LocalFileSource(str(path)), val_size=0, max_length=256)
    ok.setup("fit")
    assert len(ok.splits["train"].dataset) == 3
