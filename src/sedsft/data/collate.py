"""Batching: dynamic padding, and a data loader that can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from sedsft.data.chat import IGNORE_INDEX


class SFTCollator:
    """Pads a list of ``{"input_ids", "labels"}`` rows to the longest row of the batch.

    Returns ``input_ids`` / ``labels`` / ``attention_mask`` as ``[B, T]`` int64 tensors;
    padding gets ``pad_token_id``, label ``IGNORE_INDEX`` and attention 0. When rows carry
    their source ``row`` number it comes along as ``rows`` ``[B]`` (for error messages).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        }
        if all("row" in r for r in rows):
            batch["rows"] = torch.tensor([r["row"] for r in rows], dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(row["labels"])
            batch["attention_mask"][i, :n] = 1
        return batch


class EpochSeededRandomSampler(RandomSampler):
    """A shuffle that is a pure function of ``(seed, epoch)``, so a resumed run sees the
    same order. Subclassing ``RandomSampler`` tells Lightning the loader is shuffled, so
    under DDP it substitutes a (also seed-and-epoch-determined) ``DistributedSampler``."""

    def __init__(self, data_source: Sequence, seed: int = 0):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict``: Lightning stores how many
    batches of the current epoch were consumed, and after a restart the loader skips
    them, so a run resumed mid-epoch sees exactly the batches it had not seen.

    The state names its epoch (the sampler's): a checkpoint taken on the last batch of an
    epoch resumes into the next epoch, where nothing may be skipped. Lightning does not
    prefetch from a loader with a length, so "consumed" is "handed to the training loop";
    a checkpoint written in the middle of a step (``ExceptionCheckpoint``) corrects it
    with ``set_consumed``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._resume: tuple[int | None, int] = (None, 0)  # (epoch, batches to skip)

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def state_dict(self) -> dict[str, int | None]:
        return {"epoch": self._epoch(), "batches_consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self._resume = (state.get("epoch"), int(state.get("batches_consumed") or 0))

    def set_consumed(self, batches: int) -> None:
        """Overwrite the count, for a checkpoint written while a batch was in flight."""
        self._consumed = batches

    def __iter__(self) -> Iterator[Any]:
        (epoch, skip), self._resume = self._resume, (None, 0)
        if epoch is not None and epoch != self._epoch():
            skip = 0  # saved at the end of an earlier epoch: this one starts afresh
        iterator = super().__iter__()
        for _ in range(skip):  # collating skipped batches is cheap next to a training step
            next(iterator, None)
        self._consumed = skip
        for batch in iterator:
            self._consumed += 1
            yield batch
