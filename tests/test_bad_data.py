"""Bad input data: every problem is either an error naming the file, the row and the field,
or a skip that is counted, logged and capped by ``data.max_skip_frac``; the whole data
set is validated before a weight is loaded or a step is taken."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_config
from sedsft.data.datamodule import SFTDataModule
from sedsft.data.formats import DataError
from sedsft.data.sources import LocalFileSource
from sedsft.models.tiny import TinyLMSpec


def chat(question: str = "What is 2+3?", answer: str = "2+3 = 5. The answer is 5.") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


GOOD = chat()
BAD_ROWS = {  # name: (row, field named in the error, words of the problem)
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    "empty_assistant": (chat(answer=""), "messages[1].content", "assistant content is empty"),
    "whitespace_assistant": (chat(answer=" \n\t "), "messages[1].content", "assistant content is empty"),
    "unknown_role": (
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "messages[0].role",
        "unknown role 'bot'; allowed: ['system', 'user', 'assistant']",
    ),
    # Among string contents, an int makes the column untypeable for arrow: still one row's problem.
    "non_string_content": (chat(question=3), "messages[0].content", "expected a string, got int"),
    "messages_not_a_list": ({"messages": "hello"}, "messages", "expected a list of messages, got str"),
    "message_not_a_dict": ({"messages": ["hello", "x"]}, "messages[0]", "expected a dict, got str"),
    "null_completion": ({"prompt": "hi", "completion": None}, "completion", "expected a string"),
    "no_supported_columns": ({"text": "hi"}, None, "no supported format among columns ['text']"),
    "prompt_too_long": (chat(question="7 " * 400), None, "no assistant token left after truncation"),
}


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return TinyLMSpec(cache_dir=str(cache_dir / "models")).load_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def prepare(tokenizer, path: Path, **kwargs) -> SFTDataModule:
    options = {"val_size": 0, "max_length": 96, "max_skip_frac": 0.0, "batch_size": 2} | kwargs
    datamodule = SFTDataModule(tokenizer, LocalFileSource(str(path)), **options)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_named_by_file_row_and_field(tokenizer, tmp_path, case):
    bad, field, problem = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 5 + [bad] + [GOOD] * 4)
    # val_size shuffles rows into train and val: the message still gives the file's row number
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, path, val_size=0.3)
    message = str(caught.value)
    expected = f"{path}: row 5: " + (f"field {field!r}: " if field else "")
    assert expected in message, message
    assert problem in message
    assert "data.max_skip_frac=0.0" in message or "empty after filtering" in message


def test_skips_are_counted_logged_and_capped(tokenizer, tmp_path, caplog):
    bad = [BAD_ROWS[name][0] for name in ("unknown_role", "non_string_content", "prompt_too_long")]
    rows = [GOOD] * 10
    rows[2], rows[5], rows[9] = bad
    path = write_jsonl(tmp_path / "data.jsonl", rows)

    with caplog.at_level(logging.WARNING, logger="sedsft.data.datamodule"):
        datamodule = prepare(tokenizer, path, max_skip_frac=0.3)
    assert datamodule.skip_counts() == {"train": 3}
    kept = datamodule.splits["train"].dataset
    assert sorted(kept["row"]) == [0, 1, 3, 4, 6, 7, 8]  # file rows, for later messages
    assert "skipped 3 of 10 rows" in caplog.text
    assert f"{path}: row 2: field 'messages[0].role'" in caplog.text
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch["rows"].tolist()) <= {0, 1, 3, 4, 6, 7, 8}

    with pytest.raises(DataError) as caught:  # 30% skipped > 20% allowed
        prepare(tokenizer, path, max_skip_frac=0.2)
    message = str(caught.value)
    assert "3 of 10 train rows (30.0%) cannot be used, more than data.max_skip_frac=0.2" in message
    assert [int(n) for n in re.findall(r"row (\d+):", message)] == [2, 5, 9]  # the first offenders


def test_all_rows_bad_is_an_empty_data_set(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [BAD_ROWS["no_assistant_turn"][0]] * 4)
    with pytest.raises(DataError, match=r"the train split is empty after filtering \(4 rows, all skipped\)"):
        prepare(tokenizer, path, max_skip_frac=1.0)


def test_invalid_json_names_file_and_line(tokenizer, tmp_path):
    lines = [json.dumps(GOOD), json.dumps(GOOD), '{"messages": [{"role": "user", "content": "hi"}', json.dumps(GOOD)]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=re.escape(f"{path}: invalid JSON on line 3")):
        prepare(tokenizer, path)

    array = tmp_path / "broken.json"
    array.write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    with pytest.raises(DataError, match=re.escape(f"{array}: invalid JSON at line 3")):
        prepare(tokenizer, array)

    not_objects = write_jsonl(tmp_path / "lists.jsonl", [GOOD, [1, 2]])
    with pytest.raises(DataError, match=re.escape(f"{not_objects}: row 1: expected a JSON object per row, got list")):
        prepare(tokenizer, not_objects)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: contains no rows")):
        prepare(tokenizer, empty)


def test_type_clash_outside_the_row_format_names_row_and_column(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD | {"id": i} for i in range(4)] + [GOOD | {"id": "x4"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: row 4: field 'id': a str value whose type conflicts")):
        prepare(tokenizer, path)


def test_rows_of_different_formats_keep_their_columns(tokenizer, tmp_path):
    # The first row's keys must not decide the columns (datasets.from_list would drop 'messages').
    rows = [{"question": "1+1?", "answer": "2"}, GOOD, {"prompt": "2+2?", "completion": "4"}]
    datamodule = prepare(tokenizer, write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert datamodule.skip_counts() == {"train": 0}
    assert len(datamodule.splits["train"].dataset) == 3


def test_parquet_without_a_supported_column(tokenizer, tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"question": ["1+1?", "2+2?"], "solution": ["2", "4"]}).to_parquet(path)
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, path)
    message = str(caught.value)
    assert "the train split is empty after filtering (2 rows, all skipped)" in message
    assert f"{path}: row 0: no supported format among columns ['question', 'solution']" in message
    assert "'question'+'answer'" in message  # what would have worked


def test_parquet_null_content_is_a_row_problem(tokenizer, tmp_path):
    path = tmp_path / "data.parquet"
    answers = ["2", None, "6", "8"]
    pd.DataFrame({"question": ["1+1?", "2+2?", "3+3?", "4+4?"], "answer": answers}).to_parquet(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: field 'answer': expected a string")):
        prepare(tokenizer, path)
    assert prepare(tokenizer, path, max_skip_frac=0.25).skip_counts() == {"train": 1}


def test_bad_last_row_stops_the_real_run_before_any_step(tmp_path, cache_dir, monkeypatch):
    """``data=local``: the row at the end of the file is found before the model is even built."""
    from sedsft.data import toy_math
    from sedsft.sft.module import SFTModule
    from sedsft.sft.training import train

    rows = [{"question": r["question"], "response": r["response"]} for r in toy_math.generate(40, seed=5)]
    rows.append({"question": "what now?", "response": "   "})
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    built = []
    monkeypatch.setattr(SFTModule, "configure_model", lambda self: built.append(self))

    cfg = compose_config(
        tmp_path, cache_dir, "data=local", f"data.path={path}", "data.num_workers=0", "trainer.max_steps=2",
        "model.pretrain_steps=4", shrink=False,
    )
    with pytest.raises(DataError) as caught:
        train(cfg)
    assert f"{path}: row 40: field 'response': assistant content is empty" in str(caught.value)
    assert "data.max_skip_frac=0.01" in str(caught.value)
    assert not built  # no weights loaded, no step taken
    assert not (tmp_path / "checkpoints").exists()


def test_bytes_that_are_not_utf8_name_the_line(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD), json.dumps(GOOD), json.dumps(chat(question="Was kostet ein Caf\u00e9?"), ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("latin-1"))  # a file saved in Latin-1: é is the byte 0xe9
    column = lines[2].index("\u00e9") + 1
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line 3, byte {column}: b'\\xe9' is not UTF-8")
    assert "save the file as UTF-8" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (json.dumps(GOOD), "holds a single JSON object (one row), not a list of rows"),
        (json.dumps(GOOD, indent=2), "holds a single JSON object (one row), not a list of rows"),
        (
            json.dumps({"data": [GOOD, GOOD, GOOD]}, indent=2),
            "holds one JSON object whose key 'data' holds a list of 3 row(s)",
        ),
        (json.dumps({"version": 2, "rows": 3}), "holds one JSON object (keys ['rows', 'version']), not rows"),
        ("3", "holds a single JSON int, not rows"),
    ],
    ids=["one_row", "one_row_pretty", "wrapped_list", "other_object", "number"],
)
def test_json_file_that_is_not_rows_says_what_it_holds(tokenizer, tmp_path, content, problem):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {problem}")
    assert "expected rows: a JSON array of objects ([{...}, {...}]) or JSON lines (one object per line)" in message
    assert "invalid JSON" not in message


def test_json_shapes_that_are_rows(tokenizer, tmp_path):
    pretty_array = tmp_path / "array.json"
    pretty_array.write_text(json.dumps([GOOD] * 4, indent=2))
    assert len(prepare(tokenizer, pretty_array).splits["train"].dataset) == 4
    one_line = write_jsonl(tmp_path / "one.jsonl", [GOOD])  # JSON lines with a single row
    assert len(prepare(tokenizer, one_line).splits["train"].dataset) == 1
    # objects pretty-printed one after another are neither: the line and the reason are named
    stacked = tmp_path / "stacked.jsonl"
    stacked.write_text(json.dumps(GOOD, indent=2) + "\n" + json.dumps(GOOD, indent=2))
    with pytest.raises(DataError, match=re.escape(f"{stacked}: invalid JSON on line 1: ")) as caught:
        prepare(tokenizer, stacked)
    assert "an object spread over several lines: JSON lines need one whole object per line" in str(caught.value)


def test_a_directory_is_not_a_data_file(tokenizer, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD] * 3)
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, folder)
    assert str(caught.value) == (
        f"{folder}: is a directory, not a data file: give one file; data files in it: ['{folder / 'train.jsonl'}']"
    )


@pytest.mark.parametrize("case", ["directory", "missing", "unset"])
def test_unreadable_data_path_stops_before_the_tokenizer(tmp_path, cache_dir, monkeypatch, case):
    """``data=local``: a data.path that is a directory, missing or unset is reported by its knob
    when the config is checked, before the tokenizer (or the embedded model) is loaded."""
    from sedsft.sft.training import train

    loaded = []
    monkeypatch.setattr(TinyLMSpec, "load_tokenizer", lambda self: loaded.append(self))
    (tmp_path / "folder").mkdir()
    path = {"directory": tmp_path / "folder", "missing": tmp_path / "nope.jsonl", "unset": None}[case]
    overrides = ["data=local", "data.num_workers=0"] + ([f"data.path={path}"] if path else [])
    with pytest.raises(Exception) as caught:  # noqa: B017 (OmegaConf's own error when unset)
        train(compose_config(tmp_path, cache_dir, *overrides, shrink=False))
    expected = {
        "directory": f"data.path={path}: is a directory, not a data file",
        "missing": f"data.path={path}: data file not found",
        "unset": "Missing mandatory value: data.path",
    }[case]
    assert expected in str(caught.value)
    assert not loaded
