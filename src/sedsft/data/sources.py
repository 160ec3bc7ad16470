"""Where raw rows come from: the toy generator, local files, or the Hugging Face hub.

A source is a small object with ``name`` (used in error messages), ``fingerprint()``
(used as the tokenised-cache key) and ``load()`` returning a ``datasets.Dataset``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow as pa

from sedsft.data import toy_math, toy_routes
from sedsft.data.formats import PROBLEM_FIELD, DataError, row_problem
from sedsft.utils.code_digest import source_digest

log = logging.getLogger(__name__)
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
        return _digest({"toy_math": asdict(self), "code": source_digest(toy_math)})

    def load(self) -> datasets.Dataset:
        weights = dict(self.style_weights) if self.style_weights else None
        return datasets.Dataset.from_list(toy_math.generate(self.n, self.seed, weights))


@dataclass
class RoutesSource:
    """One split of the routes task (``sedsft.data.toy_routes``), generated deterministically.

    Attributes:
        split: ``sft`` (easy), ``calibration`` (easy, tau), ``rl`` or ``heldout`` (half easy,
            half hard); splits never share a problem's numbers.
        n: number of problems.
        seed: generation seed within the split.
        style_weights: relative frequency of each solution style (route); None = uniform.
        ranges: ``toy_routes.Ranges`` overrides (cap, hard_max, max_change, start_min).
        difficulties: keep only problems of these difficulties (``easy`` / ``hard``), still
            ``n`` of them, drawn from the split's own problems; None keeps the split's mix.
    """

    split: str = "sft"
    n: int = 2000
    seed: int = 0
    style_weights: dict[str, float] | None = None
    ranges: dict[str, int] | None = None
    difficulties: list[str] | None = None

    @property
    def name(self) -> str:
        return f"routes(split={self.split}, n={self.n}, seed={self.seed})"

    def fingerprint(self) -> str:
        return _digest({"routes": asdict(self), "code": source_digest(toy_math, toy_routes)})

    def load(self) -> datasets.Dataset:
        weights = dict(self.style_weights) if self.style_weights else None
        ranges = toy_routes.Ranges(**dict(self.ranges or {}))
        if not self.difficulties:
            return datasets.Dataset.from_list(toy_routes.generate(self.split, self.n, self.seed, weights, ranges))
        mix = toy_routes.SPLIT_MIX[self.split]
        unknown = sorted(set(self.difficulties) - set(mix))
        if unknown:
            raise ValueError(f"routes {self.split}: difficulties {unknown} not in this split; it has {list(mix)}")
        # the split interleaves its difficulties evenly: len(mix) / len(kept) times n rows hold n kept ones
        drawn = toy_routes.generate(self.split, -(-self.n * len(mix) // len(set(self.difficulties))), self.seed, weights, ranges)
        return datasets.Dataset.from_list([r for r in drawn if r["difficulty"] in self.difficulties][: self.n])


@dataclass
class LocalFileSource:
    """A local ``.json`` (list of rows, or JSON lines), ``.jsonl`` or ``.parquet`` file.

    Attributes:
        path: the file.
        rows: optional ``[start, stop)`` row range, e.g. ``[0, 20000]``.
        sha256: the file's SHA-256 (hex), pinning a released file: a different file is refused
            before it is read. None: read whatever is there.
    """

    path: str
    rows: list[int] | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.path

    def fingerprint(self) -> str:
        stat = Path(self.path).stat()
        return _digest({"path": os.path.abspath(self.path), "size": stat.st_size, "mtime": stat.st_mtime_ns, "rows": self.rows})

    def load(self) -> datasets.Dataset:
        problem = local_file_problem(self.path)
        if problem is not None:
            raise DataError(self.path, None, None, problem)
        path = Path(self.path)
        if self.sha256:
            check_sha256(path, self.sha256)
        if LOCAL_FORMATS[path.suffix.lower()] == "json":
            ds = _load_json(path)
        else:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        return _select_rows(ds, self.rows, self.name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a file whose SHA-256 is not the pinned one (a different release, a re-export,
    a truncated download), and say in the log which file was verified."""
    actual = file_sha256(path)
    if actual != expected.strip().lower():
        raise DataError(
            str(path), None, None,
            f"has SHA-256 {actual}, not the pinned {expected}: it is not the file the config names. Put the "
            "pinned file there (the config's comment says where it is published), or set sha256=null to read it as it is",
        )  # fmt: skip
    log.info("%s: SHA-256 %s, as pinned", path, actual)


def local_file_problem(path: str) -> str | None:
    """What keeps ``path`` from being read as a data file (None if nothing): missing, a
    directory, or a type that is not supported. Cheap: the config checks call it before
    anything is built."""
    file = Path(path)
    if file.is_dir():
        inside = sorted(str(p) for p in file.iterdir() if p.suffix.lower() in LOCAL_FORMATS)[:5]
        hint = f"; data files in it: {inside}" if inside else f"; it holds no {sorted(LOCAL_FORMATS)} file"
        return f"is a directory, not a data file: give one file{hint}"
    if not file.exists():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        return f"data file not found{where}"
    if file.suffix.lower() not in LOCAL_FORMATS:
        return f"unsupported file type {file.suffix!r}; allowed: {sorted(LOCAL_FORMATS)}"
    return None


EXPECTED_ROWS = "expected rows: a JSON array of objects ([{...}, {...}]) or JSON lines (one object per line)"


def _load_json(path: Path) -> datasets.Dataset:
    """JSON array or JSON lines. Undecodable bytes name the line; a syntax error names the
    line (and column); a file holding something other than rows says what it holds."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            str(path), None, None,
            f"line {line}, byte {column}: {data[err.start:err.end]!r} is not UTF-8 ({err.reason}); "
            f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})",
        ) from None  # fmt: skip
    stripped = text.lstrip()
    try:
        whole = json.loads(text)  # an array, or a single value (JSON lines with 2+ rows fail here)
    except json.JSONDecodeError as err:
        if stripped.startswith("["):
            raise DataError(str(path), None, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        rows = _json_lines(path, text)
    else:
        if isinstance(whole, list):
            rows = whole
        elif isinstance(whole, dict) and path.suffix.lower() == ".jsonl" and "\n" not in text.strip():
            rows = [whole]  # JSON lines with a single row
        else:
            raise DataError(str(path), None, None, _not_rows(whole, path.name))
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


def _json_lines(path: Path, text: str) -> list:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            hint = ""
            if line.strip() in ("{", "[") or (line.lstrip().startswith("{") and not line.rstrip().endswith("}")):
                hint = " (an object spread over several lines: JSON lines need one whole object per line)"
            raise DataError(str(path), None, None, f"invalid JSON on line {lineno}: {err.msg}{hint}") from None
    return rows


def _not_rows(value: object, name: str) -> str:
    """What a JSON file holds when it is one value instead of rows, and what to do."""
    if not isinstance(value, dict):
        return f"holds a single JSON {type(value).__name__}, not rows; {EXPECTED_ROWS}"
    if row_problem(value, "", 0) is None:
        return f"holds a single JSON object (one row), not a list of rows; {EXPECTED_ROWS}"
    lists = {k: v for k, v in value.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    if lists:
        key, inner = next(iter(lists.items()))
        return (
            f"holds one JSON object whose key {key!r} holds a list of {len(inner)} row(s); {EXPECTED_ROWS}. "
            f"Write the rows themselves, e.g. jq -c '.{key}[]' {name} > rows.jsonl"
        )
    return f"holds one JSON object (keys {sorted(value)[:8]}), not rows; {EXPECTED_ROWS}"


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
        if self.revision:
            log.info("%s: revision %s, as pinned", self.name, self.revision)
        revision = self.revision or current_revision(self.name)
        ds = datasets.load_dataset(self.name, self.subset, split=self.split, revision=revision)
        return _select_rows(ds, self.rows, self.name)


def current_revision(name: str) -> str | None:
    """The hub's current commit of data set ``name``, logged so that an unpinned run says
    which data it read and how to pin it; None (and a warning) when the hub cannot be asked
    (offline): then ``datasets`` takes whatever it has, unrecorded."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name).sha
    except Exception as err:  # offline, no such data set, no access: datasets reports those itself
        log.warning("%s: no revision given and the hub's current commit could not be read (%s): the data read "
                    "is not recorded; pin it with revision=<commit> (e.g. data.train.revision=...)", name, err)  # fmt: skip
        return None
    log.warning("%s: no revision given; reading the hub's current commit %s. Pin it for the next runs: "
                "revision=%s (e.g. data.train.revision=%s)", name, sha, sha, sha)  # fmt: skip
    return sha
