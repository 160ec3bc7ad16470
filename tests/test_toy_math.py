"""The toy data set (determinism, correctness of every style, the style classifier, the
kind of each solution position) and the tiny base built on it (tokenizer, vocabulary)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import project_cache
from sedsft.data import toy_math
from sedsft.data.toy_math import WHOLE_NUMBERS
from sedsft.evaluation.evaluate import label_diversity
from sedsft.metrics import is_correct
from sedsft.models.tiny import (
    TinyArch,
    TinyLMSpec,
    build_tiny,
    tokenizer_corpus,
    train_tokenizer,
)


def test_generation_is_deterministic_and_seeded():
    assert toy_math.generate(50, seed=3) == toy_math.generate(50, seed=3)
    assert toy_math.generate(50, seed=3) != toy_math.generate(50, seed=4)


def test_every_style_is_correct_and_recognised():
    rng = __import__("random").Random(0)
    for _ in range(40):
        problem = toy_math.sample_problem(rng)
        assert problem.middle >= 0 and problem.answer >= 0
        for name, style in toy_math.STYLES.items():
            text = style(problem)
            assert is_correct(text, str(problem.answer)), text
            assert toy_math.classify_style(text) == name
            # the arithmetic written in the solution is right
            for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
                if text.count("=") == 1 and name == "one_equation":
                    continue
                assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), text


def test_style_weights_shape_the_mix():
    rows = toy_math.generate(400, seed=0, style_weights={"step_by_step": 1.0})
    assert {r["style"] for r in rows} == {"step_by_step"}
    with pytest.raises(ValueError, match="unknown toy_math styles"):
        toy_math.generate(3, style_weights={"poetry": 1.0})


def test_label_diversity_hand_computed():
    groups = [["First, 1 + 2 = 3.", "First, 2 + 2 = 4."], ["The net change is +1", "1 + 2 - 1 = 2, so"]]
    out = label_diversity(groups, toy_math.classify_style)
    # labels: step_by_step x2, net_change, one_equation -> p = (1/2, 1/4, 1/4)
    assert out["label_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert out["labels_per_prompt"] == pytest.approx((1 + 2) / 2)
    assert out["label_frac/step_by_step"] == pytest.approx(0.5)


# -- where a solution is free and where it is determined --------------------------------------


def test_position_kinds_hand_labelled():
    """A prompt of 4 characters, then "7 + 5 = 12, so \\boxed{12}." cut into tokens by hand,
    then an end marker: the first token is the style choice even though it is a number."""
    response = "7 + 5 = 12, so \\boxed{12}."
    prefix = "Q?\n "
    spans = [(0, 2), (2, 3), (3, 4)]  # prompt tokens
    cuts = ["7", " +", " ", "5", " =", " ", "12", ",", " so", " \\", "boxed", "{", "12", "}."]
    at = len(prefix)
    for piece in cuts:
        spans.append((at, at + len(piece)))
        at += len(piece)
    assert at == len(prefix) + len(response)
    spans += [(at, at + 10), (0, 0)]  # <|im_end|>, padding
    kinds = toy_math.position_kinds(response, spans, start=len(prefix))
    assert kinds == [None, None, None, "style", "text", "text", "number", "text", "text", "number",
                     "text", "text", "text", "text", "text", "number", "text", None, None]  # fmt: skip


def test_position_kinds_through_the_chat_template():
    """With the tiny tokenizer and the real chat template, the labelled tokens are the
    reply's tokens; the numbers written are exactly the number tokens."""
    tokenizer = train_tokenizer(tokenizer_corpus(200, seed=0), TinyArch().vocab_size)
    problem = toy_math.Problem("Max", "shells", 6, -2, -2, "uses", "loses")
    for name, style in toy_math.STYLES.items():
        response = style(problem)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        kinds = toy_math.position_kinds(response, enc["offset_mapping"], text.index(response))
        pieces = [tokenizer.decode([i]) for i in enc["input_ids"]]
        labelled = [(p, k) for p, k in zip(pieces, kinds, strict=True) if k is not None]
        assert "".join(p for p, _ in labelled) == response, name
        assert [k for _, k in labelled].count("style") == 1 and labelled[0][1] == "style"
        written = re.findall(r"\d+", response)
        if name == "one_equation":  # opens on its first operand, the style position
            written = written[1:]
        assert [p for p, k in labelled if k == "number"] == written, name


# -- the tiny base's tokenizer and size --------------------------------------------------------


def test_numbers_are_whole_tokens_and_replies_open_on_one_token():
    tokenizer = train_tokenizer(tokenizer_corpus(200, seed=0), TinyArch().vocab_size)
    for n in range(WHOLE_NUMBERS):
        assert tokenizer.tokenize(str(n)) == [str(n)], n
    assert tokenizer.tokenize("First, 13 + 5 = 18.") == ["First", ",", "Ġ", "13", "Ġ+", "Ġ", "5", "Ġ=", "Ġ", "18", "."]
    reply = tokenizer.apply_chat_template([{"role": "assistant", "content": "The net change is +9"}], tokenize=False)
    assert tokenizer.tokenize(reply)[:5] == ["<|im_start|>", "assistant", "Ċ", "The", "Ġnet"]


def test_built_vocabulary_is_the_configured_one(cache_dir):
    """configs/model/tiny.yaml and TinyArch promise 527 tokens: the built tokenizer and the
    model's embedding both have exactly that many."""
    spec = TinyLMSpec(cache_dir=str(cache_dir / "models"))
    path = spec.resolved_path()
    config = json.loads((Path(path) / "config.json").read_text())
    assert len(spec.load_tokenizer()) == config["vocab_size"] == TinyArch().vocab_size == 527


def test_a_vocabulary_the_corpus_cannot_fill_names_the_knob(tmp_path):
    with pytest.raises(ValueError, match=r"model.arch.vocab_size=600, .* only yields a 527-token"):
        build_tiny(tmp_path, TinyArch(vocab_size=600), seed=0, corpus_size=200)


@pytest.mark.slow
def test_default_base_does_the_task_and_keeps_every_style():
    """The default run's base (1000 pretraining steps, ~100 s to build on one core) solves
    step-by-step problems greedily and samples all four styles where a reply begins. It is the
    quick start's base, so the test loads it from the project cache when that run built it."""
    spec = TinyLMSpec(cache_dir=str(project_cache() / "models"), pretrain_steps=1000)
    model, tokenizer = spec.load_model(), spec.load_tokenizer()
    rows = toy_math.generate(32, seed=1)
    tokenizer.padding_side = "left"
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    enc = tokenizer([c + "First," for c in chats], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(is_correct(t, r["answer"]) for t, r in zip(texts, rows, strict=True)) / len(rows) >= 0.25
    enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=True, num_return_sequences=4)
    styles = [toy_math.classify_style(t) for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    assert {"step_by_step", "one_equation", "narrative", "net_change"} <= set(styles)
