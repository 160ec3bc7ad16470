"""distinct-n: the share of n-grams that are unique (Li et al., 2016).

    distinct-n = |set of n-grams| / number of n-grams

"A Diversity-Promoting Objective Function for Neural Conversation Models",
Li, Galley, Brockett, Gao, Dolan (NAACL 2016). Higher means more diverse.

Tokens: whitespace split by default (the usual convention for distinct-n). A
``tokenizer`` may replace it: a callable ``str -> list[str | int]``, or an object
with ``.encode`` (a Hugging Face tokenizer; it is called with
``add_special_tokens=False`` when it accepts that argument). n-grams never cross
the boundary between two generations; a text with fewer than ``n`` tokens (the empty
generation included) contributes no n-grams.

Undefined values: with no n-gram at all there is nothing to measure, and ``compute()``
returns NaN with an :class:`UndefinedMetricWarning` (not 0.0, which would read as "every
n-gram repeated"). The per-prompt mean leaves out the prompts without an n-gram and counts
them in ``skipped``.

N-grams are stored as 64-bit hashes computed from a fixed hash function (blake2b per
token, splitmix64 to chain them), so the ids agree across processes and the corpus
set can be rebuilt exactly under DDP. The chance of any collision among N distinct
n-grams is about N^2 / 2^65, i.e. negligible for any corpus we evaluate.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

# A callable str -> list[str | int], or an object with .encode (Hugging Face tokenizer).
Tokenizer = Any

_MASK64 = (1 << 64) - 1
_CONSOLIDATE_EVERY = 64  # updates between merges of the stored n-gram id chunks


class UndefinedMetricWarning(UserWarning):
    """A metric had nothing to measure (it returns NaN) or left prompts out of its mean.

    Python shows each distinct message once per place it is raised from (the default
    warning filter), so a metric computed at every validation warns once, not every time.
    """


def warn_undefined(message: str) -> None:
    """Issue an :class:`UndefinedMetricWarning` (from one fixed place per metric, so the
    default filter's once-per-location rule applies)."""
    warnings.warn(message, UndefinedMetricWarning, stacklevel=2)


def split_tokens(text: str, tokenizer: Tokenizer | None = None) -> list[str | int]:
    """Tokens of ``text``: whitespace split, or the given ``tokenizer``'s output.

    ``tokenizer`` is a callable ``str -> list[str | int]`` or an object with ``.encode``
    (Hugging Face ``PreTrainedTokenizer``/``tokenizers.Tokenizer``; special tokens are
    not added when the method accepts ``add_special_tokens``).
    """
    if tokenizer is None:
        return text.split()
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            out = encode(text, add_special_tokens=False)
        except TypeError:
            out = encode(text)
    elif callable(tokenizer):
        out = tokenizer(text)
    else:
        raise TypeError(
            f"tokenizer must be a callable str -> list[str | int] or have .encode, "
            f"got {type(tokenizer).__name__}"
        )
    out = getattr(out, "ids", out)  # tokenizers.Tokenizer.encode returns an Encoding
    return list(out)


@lru_cache(maxsize=1 << 20)
def _token_hash(token: str | int) -> int:
    # repr keeps the token 1 and the token "1" apart.
    digest = hashlib.blake2b(repr(token).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrap-around multiplication is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(tokens: Sequence[str | int], n: int) -> np.ndarray:
    """64-bit ids (as int64) of the ``len(tokens) - n + 1`` n-grams of one text.

    The id depends on the tokens and their order only, not on the process, so ids from
    different ranks can be pooled.
    """
    num = len(tokens) - n + 1
    if num <= 0:
        return np.empty(0, dtype=np.int64)
    ids = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    h = np.full(num, (0x9E3779B97F4A7C15 * n) & _MASK64, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = _mix(h ^ ids[j : j + num])
    return h.view(np.int64)


class DistinctN(Metric):
    """distinct-n = unique n-grams / total n-grams, over groups of generations.

    ``update(groups)`` takes one list of sampled texts per prompt.

    - ``pooling="corpus"``: one ratio over all n-grams of all generations of all
      prompts seen (the set is global, so repeats across prompts count as repeats).
    - ``pooling="prompt"``: the ratio within each prompt's group, averaged over
      prompts; a group with no n-gram at all (every text shorter than ``n``) is undefined,
      left out of the mean and counted in ``skipped`` (with a warning at ``compute()``).

    ``compute()`` returns NaN (and warns) when there is no n-gram to measure.

    DDP: corpus pooling keeps the (locally de-duplicated) n-gram ids as a ``cat`` state
    and counts the set after gathering; totals and per-prompt sums are ``sum`` states.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        n: int,
        pooling: Literal["corpus", "prompt"] = "corpus",
        tokenizer: Tokenizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"distinct-n needs n >= 1, got n={n}")
        if pooling not in ("corpus", "prompt"):
            raise ValueError(f"pooling must be 'corpus' or 'prompt', got {pooling!r}")
        self.n = n
        self.pooling = pooling
        self.tokenizer = tokenizer
        if pooling == "corpus":
            self.add_state("ngram_ids", default=[], dist_reduce_fx="cat")
            self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        else:
            self.add_state(
                "ratio_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(
                "groups", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
            )
        # prompts left out of the per-prompt mean (no n-gram); always 0 for corpus pooling
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, groups: Sequence[Sequence[str]]) -> None:
        """Add generations; ``groups[i]`` holds the samples for prompt ``i``."""
        per_group = []
        for group in groups:
            hashes = [ngram_hashes(split_tokens(text, self.tokenizer), self.n) for text in group]
            per_group.append(np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64))

        if self.pooling == "corpus":
            allh = np.concatenate(per_group) if per_group else np.empty(0, dtype=np.int64)
            self.total += int(allh.size)
            # Always append (even an empty tensor) so the state's dtype is int64 on every rank.
            self.ngram_ids.append(torch.from_numpy(np.unique(allh)).to(self.device))
            if len(self.ngram_ids) >= _CONSOLIDATE_EVERY:  # bound memory by the set size
                self.ngram_ids = [torch.unique(dim_zero_cat(self.ngram_ids))]
        else:
            for h in per_group:
                if h.size == 0:
                    self.skipped += 1
                    continue
                self.ratio_sum += np.unique(h).size / h.size
                self.groups += 1

    def compute(self) -> torch.Tensor:
        """distinct-n as a float tensor in [0, 1]; NaN (with a warning) when there is no
        n-gram to measure."""
        if self.pooling == "prompt":
            if self.skipped and self.groups:
                warn_undefined(
                    f"distinct-{self.n} per prompt: {int(self.skipped)} of "
                    f"{int(self.skipped + self.groups)} prompts have no {self.n}-gram (every "
                    "sample shorter than n) and are left out of the mean"
                )
            if self.groups == 0:
                return self._undefined()
            return (self.ratio_sum / self.groups).float()
        if self.total == 0:
            return self._undefined()
        ids = self.ngram_ids
        ids = dim_zero_cat(ids) if isinstance(ids, list) else ids
        return torch.tensor(
            torch.unique(ids).numel() / int(self.total), dtype=torch.float32, device=self.device
        )

    def _undefined(self) -> torch.Tensor:
        warn_undefined(
            f"distinct-{self.n} is undefined: no generation has {self.n} or more tokens, so "
            "there is no n-gram to count; returning NaN"
        )
        return torch.tensor(float("nan"), device=self.device)

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any = None) -> None:
        # torchmetrics fills an empty cat-state with a float tensor on a rank that saw no
        # data, which would clash with the int64 ids of the other ranks in all_gather.
        if self.pooling == "corpus" and isinstance(self.ngram_ids, list) and not self.ngram_ids:
            self.ngram_ids = [torch.empty(0, dtype=torch.long, device=self.device)]
        kwargs = {"process_group": process_group}
        if dist_sync_fn is not None:
            kwargs["dist_sync_fn"] = dist_sync_fn
        super()._sync_dist(**kwargs)
