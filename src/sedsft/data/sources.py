"""Where raw rows come from: the toy generator, local files, or the Hugging Face hub.

A source is a small object with ``name`` (used in error messages), ``fingerprint()``
(used as the tokenised-cache key) and ``load()`` returning a ``datasets.Dataset``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow as pa

from sedsft.data import toy_math
from sedsft.data.formats import PROBLEM_FIELD, DataError, row_problem

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _digest(payload: Mapping) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _select_rows(ds: datasets.Dataset, rows: list[int] | None, name: str) -> datasets.Dataset:
    if rows is None:
        return ds
    start, stop = rows
    if not 0 <= start < stop:
        raise ValueError(f"{name}: rows={rows} must be [start, stop) with 0 <= start < stop")
    if start >= len(ds):
        raise DataError(name, None, None, f"rows {rows} start past the end ({len(ds)} rows)")
    return ds.select(range(start, min(stop, len(ds))))


@dataclass
class ToyMathSource:
    """Synthetic arithmetic chats (``sedsft.data.toy_math``), generated deterministically.

    Attributes:
        n: number of problems.
        seed: generation seed (the train and eval sets use different seeds).
        style_weights: relative frequency of each solution style; None = uniform.
    """

    n: int = 2000
    seed: int = 0
    style_weights: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return f"toy_math(n={self.n}, seed={self.seed})"

    def fingerprint(self) -> str:
        return _digest({"toy_math": asdict(self), "version": 1})

    def load(self) -> datasets.Dataset:
        weights = dict(self.style_weights) if self.style_weights else None
        return datasets.Dataset.from_list(toy_math.generate(self.n, self.seed, weights))


@dataclass
class LocalFileSource:
    """A local ``.json`` (list of rows, or JSON lines), ``.jsonl`` or ``.parquet`` file.

    Attributes:
        path: the file.
        rows: optional ``[start, stop)`` row range, e.g. ``[0, 20000]``.
    """

    path: str
    rows: list[int] | None = None

    @property
    def name(self) -> str:
        return self.path

    def fingerprint(self) -> str:
        stat = Path(self.path).stat()
        return _digest({"path": os.path.abspath(self.path), "size": stat.st_size, "mtime": stat.st_mtime_ns, "rows": self.rows})

    def load(self) -> datasets.Dataset:
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DataError(self.path, None, None, f"unsupported file type {path.suffix!r}; allowed: {sorted(LOCAL_FORMATS)}")
        if builder == "json":
            ds = _load_json(path)
        else:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        return _select_rows(ds, self.rows, self.name)


def _load_json(path: Path) -> datasets.Dataset:
    """JSON array or JSON lines; a syntax error names the file and line."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(str(path), None, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(str(path), None, None, f"invalid JSON on line {lineno}: {err.msg}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(str(path), i, None, f"expected a JSON object per row, got {type(row).__name__}")
    if not rows:
        raise DataError(str(path), None, None, "contains no rows")
    try:
        return _table(rows)
    except pa.ArrowException:
        pass
    # Arrow needs one type per column, so a row whose value has another type (content 3
    # among strings, messages as a string) fails the whole file. Such rows are kept as
    # placeholders that carry their problem, so the data module counts them as skipped
    # (data.max_skip_frac) and every other row keeps its number.
    for i, row in enumerate(rows):
        problem = row_problem(row, str(path), i)
        if problem is not None:
            rows[i] = {PROBLEM_FIELD: problem}
    try:
        return _table(rows)
    except pa.ArrowException:
        raise _type_conflict(path, rows) from None


def _table(rows: list[dict]) -> datasets.Dataset:
    # Columns are the union of all rows' keys (``from_list`` would keep only the first row's).
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_dict({key: [row.get(key) for row in rows] for key in columns})


def _type_conflict(path: Path, rows: list[dict]) -> DataError:
    """The first row whose value of some column has a type arrow cannot unify with the rows
    before it (found by bisecting on the column's prefix)."""
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(key) for row in rows]
        try:
            pa.array(values)
            continue
        except pa.ArrowException as err:
            reason = str(err)
        lo, hi = 1, len(values)  # the prefix of length hi fails; find the shortest one
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                pa.array(values[:mid])
                lo = mid + 1
            except pa.ArrowException:
                hi = mid
        row = hi - 1
        return DataError(
            str(path), row, key,
            f"a {type(values[row]).__name__} value whose type conflicts with earlier rows, so the "
            f"file cannot be read as a table ({reason}); make the column's type consistent",
        )
    return DataError(str(path), None, None, "rows have inconsistent types and cannot be read as a table")


@dataclass
class HubSource:
    """A data set on the Hugging Face hub (downloaded by ``datasets``; cached locally).

    Attributes:
        name: hub id, e.g. ``miromind-ai/MiroMind-M1-SFT-719K``.
        split: split name.
        subset: configuration name, if the data set has several.
        revision: commit / tag for a reproducible download.
        rows: optional ``[start, stop)`` row range of the split.
    """

    name: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    rows: list[int] | None = None

    def fingerprint(self) -> str:
        return _digest(asdict(self))

    def load(self) -> datasets.Dataset:
        ds = datasets.load_dataset(self.name, self.subset, split=self.split, revision=self.revision)
        return _select_rows(ds, self.rows, self.name)
