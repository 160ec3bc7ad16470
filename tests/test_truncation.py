"""Rows cut at data.max_length: counted at data preparation, and whether the cut took the
final answer (the reply's last \\boxed{...}) away from the target."""

from __future__ import annotations

import json
import logging

from sedsft.data.chat import IGNORE_INDEX, final_answer_end, tokenize_chat
from sedsft.data.datamodule import SFTDataModule
from sedsft.data.sources import LocalFileSource


def _chat(reply: str, question: str = "q1") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def test_final_answer_end_is_after_the_last_box_or_the_reply_end():
    text = "xx Sum \\boxed{1} then \\boxed{\\frac{1}{2}} done"
    span = (3, len(text))
    assert text[: final_answer_end(text, span)].endswith("\\boxed{\\frac{1}{2}}")
    assert final_answer_end("abc no box", (0, 10)) == 10
    assert final_answer_end("\\boxed{open", (0, 11)) == 11  # never closed: the reply's end


def test_cut_before_or_after_the_final_answer(chatml_tokenizer):
    reply = "So the answer is \\boxed{4}." + " and some closing words" * 20
    full = tokenize_chat(chatml_tokenizer, _chat(reply))
    targets = [t for t, label in enumerate(full.labels) if label != IGNORE_INDEX]
    box_end = next(n for n in range(targets[0], len(full.input_ids) + 1)
                   if "\\boxed{4}" in chatml_tokenizer.decode(full.input_ids[targets[0]:n]))  # fmt: skip
    keeps = tokenize_chat(chatml_tokenizer, _chat(reply), max_length=box_end + 2)
    assert keeps.truncated and not keeps.answer_cut  # only the closing words went
    loses = tokenize_chat(chatml_tokenizer, _chat(reply), max_length=box_end - 1)
    assert loses.truncated and loses.answer_cut
    whole = tokenize_chat(chatml_tokenizer, _chat(reply), max_length=len(full.input_ids))
    assert not whole.truncated and not whole.answer_cut


def test_preparation_counts_cut_rows_and_lost_answers(chatml_tokenizer, tmp_path, caplog):
    rows = [
        {"question": "q1", "response": "short \\boxed{1}"},  # fits
        {"question": "q2", "response": "\\boxed{2}" + " tail" * 80},  # cut after its answer
        {"question": "q3", "response": "work" * 80 + " \\boxed{3}"},  # cut before its answer
        {"question": "q4", "response": "no box at all" * 30},  # cut: its end is gone
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fits = len(tokenize_chat(chatml_tokenizer, _chat(rows[0]["response"])).input_ids)  # the longest row that fits
    datamodule = SFTDataModule(chatml_tokenizer, LocalFileSource(str(path)), val_size=0, max_length=fits, cache_dir=None)
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
    assert datamodule.cut_counts() == {"train": 3, "train_answer": 2}
    assert f"3 of 4 rows are longer than data.max_length={fits} tokens" in caplog.text and "2 of them lose" in caplog.text
    assert set(datamodule.splits["train"].dataset.column_names) == {"input_ids", "labels", "num_targets", "row", "index"}
