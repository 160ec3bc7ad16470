"""``SFTDataModule``: raw rows -> validated chats -> token ids with assistant-only labels."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sedsft.data import chat, formats
from sedsft.data.chat import tokenize_chat
from sedsft.data.collate import EpochSeededRandomSampler, ResumableDataLoader, SFTCollator
from sedsft.data.formats import ROW_FIELD, DataError, gold_answer, to_messages, to_prompt
from sedsft.data.packing import PackingCollator
from sedsft.utils.code_digest import source_digest

log = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """A tokenised split and what was left out of it."""

    dataset: datasets.Dataset  # columns: input_ids, labels, num_targets, row (in the source), index (in raw)
    raw: datasets.Dataset  # the source rows, for prompts and gold answers
    problems: list[str] = field(default_factory=list)  # why each skipped row was skipped
    cut: int = 0  # rows cut at max_length (kept, shortened)
    answer_cut: int = 0  # of those, rows whose cut removed the final answer of the reply


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = (backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items())))
    payload += str(tokenizer.chat_template)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class SFTDataModule(L.LightningDataModule):
    """Chat-templated SFT data in which only assistant tokens carry labels.

    Args:
        tokenizer: the model's tokenizer, with a chat template.
        train: source of training rows (``sedsft.data.sources``).
        val: source of held-out rows; if None, ``val_size`` rows are split off ``train``.
        val_size: held-out rows taken from ``train`` when ``val`` is None (int count or fraction).
        system_prompt: system message prepended to conversations that have none (None: no system).
        max_length: token budget per example; longer examples are cut at the end.
        batch_size: micro-batch size per device.
        eval_batch_size: batch size for validation (defaults to ``batch_size``).
        num_workers: data loader worker processes.
        seed: shuffle and split seed.
        max_skip_frac: fraction of rows that may be skipped (bad format, nothing left to
            train after truncation) before the run stops with the list of offenders.
        cache_dir: tokenised splits are saved here and reused by later runs (None: no cache).
        num_proc: processes for tokenisation (None: in-process).
        packing: training micro-batches become one row without padding, examples kept
            apart by restarting ``position_ids`` (``sedsft.data.packing``); evaluation and
            preparation (``heldout_dataloader``) batches stay padded.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train: Any,
        val: Any | None = None,
        val_size: float | int = 0.05,
        system_prompt: str | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_skip_frac: float = 0.01,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        packing: bool = False,
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if not 0.0 <= max_skip_frac <= 1.0:
            raise ValueError(f"data.max_skip_frac must be in [0, 1], got {max_skip_frac}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.train_source, self.val_source, self.val_size = train, val, val_size
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_skip_frac = max_skip_frac
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        self.collator = SFTCollator(tokenizer.pad_token_id)
        self.train_collator = PackingCollator() if packing else self.collator
        self.splits: dict[str, PreparedSplit] = {}

    # ---------------------------------------------------------------- preparation
    @staticmethod
    def _load(source: Any) -> datasets.Dataset:
        """The source's rows, numbered as in the source (messages name that number even
        after the rows are shuffled into train and val)."""
        ds = source.load()
        offset = (getattr(source, "rows", None) or [0])[0]
        return ds.add_column(ROW_FIELD, list(range(offset, offset + len(ds))))

    def _raw_splits(self) -> dict[str, tuple[str, datasets.Dataset]]:
        train = self._load(self.train_source)
        if self.val_source is not None:
            return {"train": (self.train_source.name, train), "val": (self.val_source.name, self._load(self.val_source))}
        if not self.val_size:
            return {"train": (self.train_source.name, train)}
        parts = train.train_test_split(test_size=self.val_size, seed=self.seed, shuffle=True)
        return {"train": (self.train_source.name, parts["train"]), "val": (self.train_source.name, parts["test"])}

    def _cache_path(self, split: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = {
            # the code that turns rows into token ids and labels, so a change to it is a new cache
            # entry without anyone bumping a version (the sources key their generators likewise)
            "code": source_digest(chat, formats, sys.modules[__name__]),
            "train": self.train_source.fingerprint(),
            "val": None if self.val_source is None else self.val_source.fingerprint(),
            "val_size": self.val_size,
            "seed": self.seed,
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(self.cache_dir) / "tokenized" / f"{digest}-{split}"

    def _tokenize_row(self, row: dict, index: int, source: str) -> dict:
        number = row[ROW_FIELD]
        out = {"input_ids": [], "labels": [], "num_targets": 0, "row": number, "index": index, "skip": "",
               "cut": False, "answer_cut": False}  # fmt: skip
        try:
            messages = to_messages(row, source, number, self.system_prompt)
            chat = tokenize_chat(self.tokenizer, messages, self.max_length, source=source, row=number)
        except DataError as err:
            return {**out, "skip": str(err)}
        if not chat.num_targets:
            return {**out, "skip": str(DataError(
                source, number, None,
                f"no assistant token left after truncation to data.max_length={self.max_length} (prompt too long)",
            ))}
        return {**out, "input_ids": chat.input_ids, "labels": chat.labels, "num_targets": chat.num_targets,
                "cut": chat.truncated, "answer_cut": chat.answer_cut}  # fmt: skip

    def _prepare(self, split: str, source: str, raw: datasets.Dataset) -> PreparedSplit:
        cache = self._cache_path(split)
        if cache is not None and (cache / "state.json").exists():
            tokenized = datasets.load_from_disk(str(cache))
            log.info("%s: loaded tokenised data from %s", split, cache)
        else:
            tokenized = raw.map(
                self._tokenize_row,
                with_indices=True,
                fn_kwargs={"source": source},
                remove_columns=raw.column_names,
                num_proc=self.num_proc,
                load_from_cache_file=False,
                desc=f"tokenising {split}",
            )
            if cache is not None:
                tokenized.save_to_disk(str(cache))
        problems = [p for p in tokenized["skip"] if p]
        self._check_skips(split, source, len(raw), problems)
        kept = tokenized.filter(lambda s: not s, input_columns="skip") if problems else tokenized
        cut, answer_cut = sum(kept["cut"]), sum(kept["answer_cut"])
        if cut:  # the target loses its end: said at preparation, with how often the answer goes too
            log.warning(
                "%s (%s): %d of %d rows are longer than data.max_length=%d tokens and cut at the end; %d of them "
                "lose their final answer (the reply's last \\boxed{}, or its end without one)",
                split, source, cut, len(kept), self.max_length, answer_cut,
            )  # fmt: skip
        kept = kept.remove_columns(["skip", "cut", "answer_cut"])
        return PreparedSplit(dataset=kept, raw=raw, problems=problems, cut=cut, answer_cut=answer_cut)

    def _check_skips(self, split: str, source: str, total: int, problems: list[str]) -> None:
        """Log the skipped rows; stop when the split is empty or too much of it was skipped."""
        first = "; first problems:\n  " + "\n  ".join(problems[:10])
        if problems:
            log.warning("%s (%s): skipped %d of %d rows%s", split, source, len(problems), total, first)
        if len(problems) == total:
            raise DataError(source, None, None, f"the {split} split is empty after filtering ({total} rows, all skipped)" + first)
        if len(problems) > self.max_skip_frac * total:
            raise DataError(
                source, None, None,
                f"{len(problems)} of {total} {split} rows ({len(problems) / total:.1%}) cannot be used, more than "
                f"data.max_skip_frac={self.max_skip_frac} (fix the rows, or raise data.max_skip_frac to skip them)" + first,
            )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, (source, raw) in self._raw_splits().items():
            self.splits[split] = self._prepare(split, source, raw)
        for split, prepared in self.splits.items():
            log.info("%s: %d examples, %d target tokens", split, len(prepared.dataset), sum(prepared.dataset["num_targets"]))

    def cut_counts(self) -> dict[str, int]:
        """Rows cut at ``max_length`` per split (``<split>``) and those that lost their final
        answer (``<split>_answer``), for the run's metrics."""
        counts = {}
        for split, prepared in self.splits.items():
            counts[split], counts[f"{split}_answer"] = prepared.cut, prepared.answer_cut
        return counts

    def skip_counts(self) -> dict[str, int]:
        """Rows left out per split (logged by the training script)."""
        return {split: len(p.problems) for split, p in self.splits.items()}

    # ---------------------------------------------------------------- loaders
    def _torch_view(self, split: str) -> datasets.Dataset:
        return self.splits[split].dataset.select_columns(["input_ids", "labels", "row"])

    def train_dataloader(self) -> DataLoader:
        dataset = self._torch_view("train")
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(dataset, seed=self.seed),
            collate_fn=self.train_collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.splits:
            return []
        return DataLoader(
            self._torch_view("val"),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split (SFT data sets here have no separate test split)."""
        return self.val_dataloader()

    def heldout_dataloader(self, num_examples: int) -> DataLoader:
        """The first ``num_examples`` held-out examples (training ones when there is no
        held-out split), padded, in order: what a loss prepares itself on before training
        (``TokenLoss.prepare``)."""
        split = "val" if "val" in self.splits else "train"
        dataset = self.splits[split].dataset
        subset = dataset.select(range(min(num_examples, len(dataset))))
        return DataLoader(
            subset.select_columns(["input_ids", "labels"]),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
        )

    # ---------------------------------------------------------------- generation prompts
    def prompts(self, split: str = "val", limit: int | None = None) -> list[tuple[list[dict], str | None]]:
        """``(prompt messages, gold answer)`` for held-out rows, for generation-time metrics."""
        prepared = self.splits[split]
        raw = prepared.raw.select(prepared.dataset["index"][: limit if limit is not None else None])
        return [(to_prompt(r, split, r[ROW_FIELD], self.system_prompt), gold_answer(r)) for r in raw]
