"""Assistant-only labels under the real chat templates of seven model families.

The templates are the published texts (``tests/fixtures/chat_templates``, provenance in its
README), rendered by transformers as for the real models; the tokenizer is a byte-level BPE
trained here with each family's special tokens, so nothing comes from the hub. For every
template and conversation shape the whole tokenised text is compared with the expected
render in which the labelled runs are marked ``[[...]]``: that pins the labelled text
exactly and shows that the prompt parts (BOS, default system messages, date headers, role
headers, Phi-3's closing EOS) are unlabelled. Where a template cannot be used, the row-level
``DataError`` and its message are checked instead.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sedsft.data.chat import IGNORE_INDEX, TemplateError, render_labels, tokenize_chat
from sedsft.data.formats import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIALS = json.loads((FIXTURES / "special_tokens.json").read_text())
TEMPLATES = sorted(SPECIALS)

SYSTEM = {"role": "system", "content": "Please reason step by step."}
U1 = {"role": "user", "content": "Mia has 12 apples. She buys 7 more. How many now?"}
A1 = {"role": "assistant", "content": "12 + 7 = 19. The answer is \\boxed{19}."}
U2 = {"role": "user", "content": "And if she eats 4?"}
A2 = {"role": "assistant", "content": "19 - 4 = 15. \\boxed{15}"}
U3 = {"role": "user", "content": "Double it."}
A3 = {"role": "assistant", "content": "2 * 15 = 30."}
GREETING = {"role": "assistant", "content": "Hi! Ask me any sum."}
CONVERSATIONS = {
    "single": [U1, A1],
    "system_single": [SYSTEM, U1, A1],
    "three_turn": [U1, A1, U2, A2, U3, A3],
    "assistant_first": [GREETING, U1, A1],
    # three_turn cut to the tokens of render([U1, A1]): the first reply, whole
    "truncated": [U1, A1, U2, A2, U3, A3],
}


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    """One byte-level BPE knowing every family's special tokens (trained in well under a second)."""
    specials = set()
    for spec in SPECIALS.values():
        specials.update(t for t in (spec["bos_token"], spec["eos_token"]) if t)
        specials.update(spec["additional_special_tokens"] + spec.get("added_tokens", []))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in (SYSTEM, U1, A1, U2, A2, U3, A3, GREETING)] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=sorted(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizers(backend) -> dict[str, PreTrainedTokenizerFast]:
    out = {}
    for name, spec in SPECIALS.items():
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(backend.to_str()),
            bos_token=spec["bos_token"],
            eos_token=spec["eos_token"],
            additional_special_tokens=spec["additional_special_tokens"],
            clean_up_tokenization_spaces=False,
        )
        tok.chat_template = (FIXTURES / f"{name}.jinja").read_text()
        out[name] = tok
    return out


def label(tok: PreTrainedTokenizerFast, case: str):
    messages = CONVERSATIONS[case]
    max_length = None
    if case == "truncated":
        first_reply = tok.apply_chat_template(messages[:2], tokenize=False)
        max_length = len(tok(first_reply, add_special_tokens=False)["input_ids"])
    return tokenize_chat(tok, messages, max_length, source="chats.jsonl", row=7)


# Llama-3.2's system header carries today's date (strftime_now), rendered at test time.
TODAY = "{today}"
LLAMA_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: " + TODAY + "\n\n"
)
LLAMA_U1 = "<|start_header_id|>user<|end_header_id|>\n\nMia has 12 apples. She buys 7 more. How many now?<|eot_id|>"
LLAMA_A = "<|start_header_id|>assistant<|end_header_id|>\n\n"
QWEN_DEFAULT = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
CHATML_U1 = "<|im_start|>user\nMia has 12 apples. She buys 7 more. How many now?<|im_end|>\n<|im_start|>assistant\n"
CHATML_U2 = "<|im_start|>user\nAnd if she eats 4?<|im_end|>\n<|im_start|>assistant\n"
CHATML_U3 = "<|im_start|>user\nDouble it.<|im_end|>\n<|im_start|>assistant\n"
GEMMA_U1 = "<bos><start_of_turn>user\nMia has 12 apples. She buys 7 more. How many now?<end_of_turn>\n<start_of_turn>model\n"
PHI_U1 = "<|user|>\nMia has 12 apples. She buys 7 more. How many now?<|end|>\n<|assistant|>\n"
MISTRAL_U1 = "<s>[INST] Mia has 12 apples. She buys 7 more. How many now?[/INST]"

# The tokenised text with labelled runs in [[...]]; written out by hand from the templates.
EXPECTED = {
    ("llama3.2_instruct", "single"): (
        LLAMA_HEAD
        + "<|eot_id|>"
        + LLAMA_U1
        + LLAMA_A
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|eot_id|>]]"
    ),
    ("llama3.2_instruct", "system_single"): (
        LLAMA_HEAD
        + "Please reason step by step.<|eot_id|>"
        + LLAMA_U1
        + LLAMA_A
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|eot_id|>]]"
    ),
    ("llama3.2_instruct", "three_turn"): (
        LLAMA_HEAD
        + "<|eot_id|>"
        + LLAMA_U1
        + LLAMA_A
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|eot_id|>]]"
        + "<|start_header_id|>user<|end_header_id|>\n\nAnd if she eats 4?<|eot_id|>"
        + LLAMA_A
        + "[[19 - 4 = 15. \\boxed{15}<|eot_id|>]]"
        + "<|start_header_id|>user<|end_header_id|>\n\nDouble it.<|eot_id|>"
        + LLAMA_A
        + "[[2 * 15 = 30.<|eot_id|>]]"
    ),
    # The bug of issue 10: the BOS and the date header were labelled with the greeting.
    ("llama3.2_instruct", "assistant_first"): (
        LLAMA_HEAD
        + "<|eot_id|>"
        + LLAMA_A
        + "[[Hi! Ask me any sum.<|eot_id|>]]"
        + LLAMA_U1
        + LLAMA_A
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|eot_id|>]]"
    ),
    ("llama3.2_instruct", "truncated"): (
        LLAMA_HEAD
        + "<|eot_id|>"
        + LLAMA_U1
        + LLAMA_A
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|eot_id|>]]"
    ),
    ("qwen2.5_instruct", "single"): (
        QWEN_DEFAULT + CHATML_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    ("qwen2.5_instruct", "system_single"): (
        "<|im_start|>system\nPlease reason step by step.<|im_end|>\n"
        + CHATML_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    ("qwen2.5_instruct", "three_turn"): (
        QWEN_DEFAULT
        + CHATML_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
        + CHATML_U2
        + "[[19 - 4 = 15. \\boxed{15}<|im_end|>\n]]"
        + CHATML_U3
        + "[[2 * 15 = 30.<|im_end|>\n]]"
    ),
    # The bug of issue 10: the default system message was labelled with the greeting.
    ("qwen2.5_instruct", "assistant_first"): (
        QWEN_DEFAULT
        + "<|im_start|>assistant\n[[Hi! Ask me any sum.<|im_end|>\n]]"
        + CHATML_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    ("qwen2.5_instruct", "truncated"): (
        QWEN_DEFAULT + CHATML_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    # Qwen3 writes an empty think block into the reply that ends the conversation.
    ("qwen3", "single"): (
        CHATML_U1 + "[[<think>\n\n</think>\n\n12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    ("qwen3", "system_single"): (
        "<|im_start|>system\nPlease reason step by step.<|im_end|>\n"
        + CHATML_U1
        + "[[<think>\n\n</think>\n\n12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    ("qwen3", "assistant_first"): (
        "<|im_start|>assistant\n[[Hi! Ask me any sum.<|im_end|>\n]]"
        + CHATML_U1
        + "[[<think>\n\n</think>\n\n12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>\n]]"
    ),
    # Mistral's reply is " " + content: the space is the reply's first character.
    ("mistral_v0.3_instruct", "single"): (
        MISTRAL_U1 + "[[ 12 + 7 = 19. The answer is \\boxed{19}.</s>]]"
    ),
    ("mistral_v0.3_instruct", "three_turn"): (
        MISTRAL_U1
        + "[[ 12 + 7 = 19. The answer is \\boxed{19}.</s>]]"
        + "[INST] And if she eats 4?[/INST][[ 19 - 4 = 15. \\boxed{15}</s>]]"
        + "[INST] Double it.[/INST][[ 2 * 15 = 30.</s>]]"
    ),
    ("mistral_v0.3_instruct", "truncated"): (
        MISTRAL_U1 + "[[ 12 + 7 = 19. The answer is \\boxed{19}.</s>]]"
    ),
    ("gemma2_it", "single"): (
        GEMMA_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<end_of_turn>\n]]"
    ),
    ("gemma2_it", "three_turn"): (
        GEMMA_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<end_of_turn>\n]]"
        + "<start_of_turn>user\nAnd if she eats 4?<end_of_turn>\n<start_of_turn>model\n"
        + "[[19 - 4 = 15. \\boxed{15}<end_of_turn>\n]]"
        + "<start_of_turn>user\nDouble it.<end_of_turn>\n<start_of_turn>model\n"
        + "[[2 * 15 = 30.<end_of_turn>\n]]"
    ),
    ("gemma2_it", "truncated"): (
        GEMMA_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<end_of_turn>\n]]"
    ),
    # Phi-3 closes the conversation with eos_token: in the input, never labelled.
    ("phi3_mini_instruct", "single"): (
        PHI_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<|end|>\n]]<|endoftext|>"
    ),
    ("phi3_mini_instruct", "system_single"): (
        "<|system|>\nPlease reason step by step.<|end|>\n"
        + PHI_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|end|>\n]]<|endoftext|>"
    ),
    ("phi3_mini_instruct", "three_turn"): (
        PHI_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|end|>\n]]"
        + "<|user|>\nAnd if she eats 4?<|end|>\n<|assistant|>\n[[19 - 4 = 15. \\boxed{15}<|end|>\n]]"
        + "<|user|>\nDouble it.<|end|>\n<|assistant|>\n[[2 * 15 = 30.<|end|>\n]]<|endoftext|>"
    ),
    ("phi3_mini_instruct", "assistant_first"): (
        "<|assistant|>\n[[Hi! Ask me any sum.<|end|>\n]]"
        + PHI_U1
        + "[[12 + 7 = 19. The answer is \\boxed{19}.<|end|>\n]]<|endoftext|>"
    ),
    # render([U1, A1]) ends with <|endoftext|>, one token more than the reply: <|user|> follows.
    ("phi3_mini_instruct", "truncated"): (
        PHI_U1 + "[[12 + 7 = 19. The answer is \\boxed{19}.<|end|>\n]]<|user|>"
    ),
}

# (cause, phrases the message must contain) where a template cannot label the conversation.
ALTERNATE = "must alternate user/assistant/user/assistant/..."
REASONING = ("reasoning", ["strips reasoning", "</think>", "model.chat_template"])
REJECTED = {
    ("qwen3", "three_turn"): (
        "reasoning",
        ["strips reasoning", "assistant turn 1", "Qwen3 drops earlier turns"],
    ),
    ("qwen3", "truncated"): ("reasoning", ["strips reasoning", "assistant turn 1"]),
    ("mistral_v0.3_instruct", "system_single"): (
        "system_moved",
        [
            "moves or drops the system prompt",
            "last user turn",
            "data.system_prompt",
            "model.chat_template",
        ],
    ),
    ("mistral_v0.3_instruct", "assistant_first"): (
        "rejected",
        ["rejects this conversation", ALTERNATE],
    ),
    ("gemma2_it", "system_single"): (
        "no_system_role",
        [
            "has no system role",
            "System role not supported",
            "data.system_prompt",
            "model.chat_template",
        ],
    ),
    ("gemma2_it", "assistant_first"): (
        "rejected",
        ["rejects this conversation", ALTERNATE, "model.chat_template"],
    ),
    **{("deepseek_r1_distill_qwen", case): REASONING for case in CONVERSATIONS},
}


def test_every_template_and_conversation_is_covered():
    pairs = {(name, case) for name in TEMPLATES for case in CONVERSATIONS}
    assert pairs == set(EXPECTED) | set(REJECTED)
    assert not set(EXPECTED) & set(REJECTED)


@pytest.mark.parametrize(("name", "case"), sorted(EXPECTED))
def test_labels_cover_exactly_replies_and_their_end_of_turn(tokenizers, name, case):
    tok = tokenizers[name]
    chat = label(tok, case)
    expected = EXPECTED[name, case].replace(TODAY, datetime.now().strftime("%d %b %Y"))
    assert render_labels(tok, chat) == expected
    assert all(
        lab in (IGNORE_INDEX, tid) for lab, tid in zip(chat.labels, chat.input_ids, strict=True)
    )
    # nothing of the prompt is labelled: each user / system text lies outside the [[...]] runs
    trained = "".join(part.split("]]")[0] for part in expected.split("[[")[1:])
    for message in CONVERSATIONS[case]:
        if message["role"] != "assistant":
            assert message["content"] not in trained
    full = label(tok, "three_turn") if case == "truncated" else chat
    assert chat.truncated == (case == "truncated")
    assert chat.input_ids == full.input_ids[: len(chat.input_ids)]


@pytest.mark.parametrize(("name", "case"), sorted(REJECTED))
def test_unusable_templates_raise_a_row_error_naming_the_cause(tokenizers, name, case):
    cause, phrases = REJECTED[name, case]
    with pytest.raises(DataError) as info:
        label(tokenizers[name], case)
    err = info.value
    assert isinstance(err, TemplateError) and err.cause == cause
    assert (err.source, err.row) == ("chats.jsonl", 7)
    assert str(err).startswith("chats.jsonl: row 7: ")
    for phrase in phrases:
        assert phrase in str(err)


def test_phi3_closing_eos_is_in_the_input_but_unlabelled(tokenizers):
    tok = tokenizers["phi3_mini_instruct"]
    for case in ("single", "three_turn"):
        chat = label(tok, case)
        assert chat.input_ids[-1] == tok.eos_token_id and chat.labels[-1] == IGNORE_INDEX
        assert chat.labels[-2] != IGNORE_INDEX  # the "\n" after <|end|>, end of the last reply
        assert tok.eos_token_id not in [lab for lab in chat.labels if lab != IGNORE_INDEX]


def test_truncation_inside_the_prompt_leaves_no_target(tokenizers):
    for name in ("llama3.2_instruct", "qwen2.5_instruct", "phi3_mini_instruct"):
        assert tokenize_chat(tokenizers[name], [U1, A1], max_length=8).num_targets == 0


def test_qwen3_single_turn_keeps_the_reasoning_of_the_reply(tokenizers):
    tok = tokenizers["qwen3"]
    reply = {"role": "assistant", "content": "<think>\n7 more than 12\n</think>\n\n\\boxed{19}"}
    chat = tokenize_chat(tok, [U1, reply])
    assert (
        render_labels(tok, chat)
        == CHATML_U1 + "[[<think>\n7 more than 12\n</think>\n\n\\boxed{19}<|im_end|>\n]]"
    )
