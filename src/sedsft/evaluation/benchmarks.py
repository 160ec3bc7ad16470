"""The paper's math benchmarks: where their rows come from, how a gold answer is read, and
the chat prompt each problem becomes.

A benchmark is one ``configs/benchmark/<name>.yaml`` (``BenchmarkSpec``). Its rows come from,
in this order of precedence:

1. ``path``: a local jsonl / json / parquet file in the benchmark's schema;
2. ``data_dir``: a local copy of Qwen2.5-Math's ``evaluation/data`` directory
   (``<data_dir>/<toolkit_name>/test.jsonl``), the layout the paper's suites use;
3. ``load``: ``datasets.load_dataset(**load)`` (a hub data set, or the toolkit's file at a
   pinned commit through the ``json`` builder); a list of such dicts is concatenated.

Gold answers (``GOLD_PARSERS``), as Qwen2.5-Math's ``parser.parse_ground_truth`` reads them:

- ``plain``: the field itself, ``$`` and a trailing "." removed (``"$10-4 n$"`` -> ``"10-4 n"``,
  ``"Yes."`` -> ``"Yes"``); integral floats lose their ``.0`` (AMC23 stores ``27.0``);
- ``gsm8k``: the number after the last ``####`` of the worked answer, commas removed;
- ``boxed``: the content of the last ``\\boxed{}`` of a worked solution (MATH);
- ``first``: the first item of a list, cleaned as ``plain`` (OlympiadBench's ``final_answer``).

The question is the first present of ``question_fields``; as in the toolkit's
``parse_question``, a question whose gold is yes/no or true/false gets ``(Yes or No)`` /
``(True or False)`` appended. The prompt is ``[system, user]`` with the paper's system prompt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sedsft.data.formats import DataError
from sedsft.metrics import extract_boxed

log = logging.getLogger(__name__)

TOOLKIT_FILE = "test.jsonl"  # Qwen2.5-Math: evaluation/data/<name>/test.jsonl


_LABEL_AFTER_RE = re.compile(r"^\$([^$]+)\$\s*[A-Za-z][A-Za-z ]*:\s*$")


def _no_dollars(text: str) -> str:
    """The gold without ``$``, a trailing "." (242 CollegeMATH golds such as ``Yes.`` and
    ``$\\sqrt{27}$.``; OlympiadBench's ``...$.``) and a stray label after the closing ``$``
    (GAOKAO's ``$145$solution:``): none of them is part of the answer, and each kept a
    correct reply from matching (and ``Yes.`` from getting its yes/no hint)."""
    label = _LABEL_AFTER_RE.match(text.strip())
    if label:
        text = label.group(1)
    text = text.replace("$", "").strip()
    while text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


def gold_plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _no_dollars(str(value))


def gold_gsm8k(value: Any) -> str:
    text = str(value)
    if "####" not in text:
        raise ValueError("no '#### <answer>' line in the worked answer")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def gold_boxed(value: Any) -> str:
    boxed = extract_boxed(str(value))
    if boxed is None:
        raise ValueError("no \\boxed{...} in the solution")
    return boxed.strip()


def gold_first(value: Any) -> str:
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) == 0:
        raise ValueError(f"expected a non-empty list, got {value!r}")  # parquet lists are arrays
    return _no_dollars(str(value[0]))


GOLD_PARSERS: dict[str, Callable[[Any], str]] = {
    "plain": gold_plain,
    "gsm8k": gold_gsm8k,
    "boxed": gold_boxed,
    "first": gold_first,
}


@dataclass
class BenchmarkSpec:
    """One benchmark as configured in ``configs/benchmark/<name>.yaml``."""

    name: str  # key in metrics.json and the output folder
    title: str  # column header of the results table
    metric: str  # what the paper reports: "avg@8" or "pass@1"
    question_fields: list[str]
    answer_field: str
    gold: str  # a key of GOLD_PARSERS
    load: Any = None  # kwargs (or a list of kwargs) of datasets.load_dataset
    toolkit_name: str | None = None
    data_dir: str | None = None
    path: str | None = None
    num_prompts: int | None = None  # first N problems; None: all
    num_samples: int = 1
    max_new_tokens: int = 3072
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.gold not in GOLD_PARSERS:
            raise ValueError(
                f"benchmarks.{self.name}.gold={self.gold!r}: unknown; use one of {sorted(GOLD_PARSERS)}"
            )
        if isinstance(self.question_fields, str):
            self.question_fields = [self.question_fields]
        if not re.fullmatch(r"(avg|pass)@\d+", self.metric):
            raise ValueError(
                f"benchmarks.{self.name}.metric={self.metric!r}: expected avg@<k> or pass@<k>"
            )

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> BenchmarkSpec:
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"benchmarks.{name}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(name=name, **dict(cfg))

    @property
    def source(self) -> str:
        """Where the rows come from, for logs and ``metrics.json``."""
        if self.path:
            return str(self.path)
        if self.data_dir and self.toolkit_name:
            return str(Path(self.data_dir) / self.toolkit_name / TOOLKIT_FILE)
        loads = self.load if isinstance(self.load, list) else [self.load]
        return " + ".join(
            f"datasets.load_dataset({', '.join(f'{k}={v!r}' for k, v in dict(kw).items())})"
            for kw in loads
        )


@dataclass
class Problem:
    """One benchmark item ready to sample: row number, chat prompt, gold answer."""

    index: int  # row number in the source
    question: str
    gold: str | None  # None: unreadable gold, left out of accuracy
    messages: list[dict[str, str]]


def read_file(path: str | Path) -> list[dict]:
    """Rows of a local jsonl / json (list of objects) / parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(str(path), None, None, "expected a JSON list of objects")
        return rows
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(str(path), number, None, f"not valid JSON ({err.msg})") from err
    return rows


def load_rows(spec: BenchmarkSpec) -> list[dict]:
    """The benchmark's rows from ``path``, ``data_dir`` or ``load`` (module docstring)."""
    if spec.path:
        return read_file(spec.path)
    if spec.data_dir and spec.toolkit_name:
        file = Path(spec.data_dir) / spec.toolkit_name / TOOLKIT_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"benchmarks.{spec.name}: {file} not found; data_dir should be a copy of Qwen2.5-Math's "
                f"evaluation/data (holding {spec.toolkit_name}/{TOOLKIT_FILE}), or set "
                f"benchmarks.{spec.name}.data_dir=null to use {spec.load}"
            )
        return read_file(file)
    if not spec.load:
        raise ValueError(f"benchmarks.{spec.name}: no source; set path, data_dir or load")
    import datasets

    rows: list[dict] = []
    for kwargs in spec.load if isinstance(spec.load, list) else [spec.load]:
        try:
            rows += list(datasets.load_dataset(**dict(kwargs)))
        except OSError as err:  # no network, offline mode, a moved file (ConnectionError is one)
            raise _unreachable(spec, dict(kwargs), err) from None
    return rows


def _unreachable(spec: BenchmarkSpec, kwargs: dict, err: Exception) -> OSError:
    """What to do when a benchmark's download fails (an offline machine): read a local copy.
    One message instead of ``datasets``' traceback, which names the URL but not the knobs."""
    what = kwargs.get("data_files") if kwargs.get("path") == "json" else kwargs.get("path")
    local = (
        f"put a copy of Qwen2.5-Math's evaluation/data somewhere and pass benchmark_data_dir=<dir> "
        f"(read as <dir>/{spec.toolkit_name}/{TOOLKIT_FILE}), or "
        if spec.toolkit_name
        else ""
    )
    first = (str(err).splitlines() or [""])[0][:200]
    why = type(err).__name__ if str(what) in first else f"{type(err).__name__}: {first}"  # the URL once
    return OSError(
        f"benchmarks.{spec.name}: could not load {what} ({why}). Offline? "
        f"{local}pass benchmarks.{spec.name}.path=<local jsonl / json / parquet file in its schema>"
    )


def _question(row: Mapping[str, Any], spec: BenchmarkSpec, index: int) -> str:
    for name in spec.question_fields:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    present = sorted(k for k, v in row.items() if v is not None)
    raise DataError(spec.source, index, spec.question_fields[0],
                    f"no question: none of {spec.question_fields} is a non-empty string (columns {present}); "
                    f"set benchmarks.{spec.name}.question_fields")  # fmt: skip


def _hint(question: str, gold: str | None) -> str:
    if gold is None:
        return question
    lower = gold.lower()
    if lower in ("true", "false"):
        return question + " (True or False)"
    if lower in ("yes", "no"):
        return question + " (Yes or No)"
    return question


def build_problems(
    spec: BenchmarkSpec, rows: Sequence[Mapping[str, Any]], system_prompt: str | None
) -> list[Problem]:
    """Problems of the first ``spec.num_prompts`` rows. A row without a question raises; a row
    whose gold cannot be read is kept without one (left out of accuracy) and named in a warning."""
    count = len(rows) if spec.num_prompts is None else min(spec.num_prompts, len(rows))
    if count == 0:
        raise DataError(spec.source, None, None, f"benchmarks.{spec.name}: no rows")
    parse = GOLD_PARSERS[spec.gold]
    problems, unreadable = [], []
    for index in range(count):
        row = rows[index]
        question = _question(row, spec, index)
        raw, gold, why = row.get(spec.answer_field), None, None
        if raw is None:
            why = f"no field {spec.answer_field!r}"
        else:
            try:
                gold = parse(raw) or None
                why = None if gold else "empty gold answer"
            except ValueError as err:
                why = str(err)
        if why:
            unreadable.append((index, why))
        question = _hint(question, gold)
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        problems.append(Problem(index=index, question=question, gold=gold, messages=messages))
    if unreadable:
        log.warning(
            "%s (%s): %d of %d rows have no readable gold in field %r and are left out of accuracy: %s%s",
            spec.name, spec.source, len(unreadable), count, spec.answer_field,
            "; ".join(f"row {i}: {why}" for i, why in unreadable[:5]), " ..." if len(unreadable) > 5 else "",
        )  # fmt: skip
    return problems
