"""self-BLEU: how much the samples for one prompt repeat each other (Zhu et al., 2018).

For a prompt with samples ``s_1 .. s_m`` (m >= 2):

    self-BLEU(prompt) = (1/m) sum_i BLEU(s_i ; references = {s_j : j != i})

and the metric is the mean of that over prompts (each prompt weighs the same, whatever
its number of samples). Lower means more diverse. "Texygen: A Benchmarking Platform
for Text Generation Models", Zhu et al. (SIGIR 2018).

BLEU is sacrebleu's sentence BLEU (Post, 2018) on its 0..100 scale, with
``effective_order=True`` and its default ``exp`` smoothing. Every other sample is a
separate reference (multi-reference BLEU: clipping by the max count in any reference,
brevity penalty from the closest reference length). Passing the others as a single
reference stream -- a bug of the GEM release -- would compare each sample against one
of them only.

Tokenisation: by default sacrebleu's standard ``13a`` tokenizer on the raw text; it
splits punctuation and operators (``x+1=2`` -> ``x + 1 = 2``), which suits math
output better than a whitespace split. With ``tokenizer`` given (see
:func:`sedsft.metrics.distinct.split_tokens`), its tokens are joined by spaces and
sacrebleu is told not to tokenise again (``tokenize="none"``).

Edge cases: self-BLEU of a group with fewer than two samples is undefined (no sibling to
compare with): such groups are left out of the mean over prompts and counted in
``skipped``, and ``compute()`` returns NaN with an
:class:`~sedsft.metrics.distinct.UndefinedMetricWarning` when no group was scored (0.0 would
read as "maximally diverse"). An empty sample scores 0 (no n-grams), also against an
identical empty reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sacrebleu.metrics import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from torchmetrics import Metric

from sedsft.metrics.distinct import Tokenizer, split_tokens, warn_undefined


def make_bleu(n_gram: int = 4, tokenize: str = "13a") -> BLEU:
    """Sentence-level BLEU scorer used by self-BLEU."""
    return BLEU(max_ngram_order=n_gram, effective_order=True, tokenize=tokenize)


def self_bleu_scores(group: Sequence[str], bleu: BLEU) -> list[float]:
    """BLEU (0..100) of each sample of ``group`` against all the others as references.

    Equal to ``[bleu.sentence_score(s_i, [s_j for j != i]).score for i]`` (the tests
    check this), but each sample is tokenised and counted once instead of once per
    hypothesis: for every n-gram the largest and second-largest count over the samples
    give the clipping count "max over the other samples" in O(1).
    """
    order = bleu.max_ngram_order
    # sacrebleu's segment preprocessing: optional lowercasing, then its tokenizer
    texts = [text.lower() if bleu.lowercase else text for text in group]
    counts = [extract_all_word_ngrams(bleu.tokenizer(t.rstrip()), 1, order) for t in texts]
    top: dict[tuple[str, ...], list[int]] = {}  # n-gram -> [max count, its sample, 2nd max]
    for j, (ngrams, _) in enumerate(counts):
        for ngram, c in ngrams.items():
            t = top.get(ngram)
            if t is None:
                top[ngram] = [c, j, 0]
            elif c > t[0]:
                top[ngram] = [c, j, t[0]]
            elif c > t[2]:
                t[2] = c

    scores = []
    for i, (hyp_ngrams, hyp_len) in enumerate(counts):
        total = [max(hyp_len - k, 0) for k in range(order)]  # number of (k+1)-grams
        correct = [0] * order
        for ngram, c in hyp_ngrams.items():
            best, owner, second = top[ngram]
            ref = second if owner == i else best  # max count among the other samples
            if ref:
                correct[len(ngram) - 1] += c if c < ref else ref
        ref_lens = [length for j, (_, length) in enumerate(counts) if j != i]
        # sacrebleu's closest reference length: smallest |difference|, ties to the shorter
        ref_len = min(ref_lens, key=lambda r: (abs(r - hyp_len), r))
        score = BLEU.compute_bleu(
            correct=correct,
            total=total,
            sys_len=hyp_len,
            ref_len=ref_len,
            smooth_method=bleu.smooth_method,
            smooth_value=bleu.smooth_value,
            effective_order=bleu.effective_order,
            max_ngram_order=order,
        )
        scores.append(score.score)
    return scores


class SelfBLEU(Metric):
    """Mean over prompts of the mean over samples of BLEU(sample ; other samples).

    ``update(groups)`` takes one list of sampled texts per prompt. Scale 0..100. Prompts
    with fewer than two samples are undefined: left out of the mean, counted in ``skipped``.
    DDP: the sum of per-prompt scores and the prompt counts are ``sum`` states.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        n_gram: int = 4,
        tokenizer: Tokenizer | None = None,
        sacrebleu_tokenize: str = "13a",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_gram < 1:
            raise ValueError(f"self-BLEU needs n_gram >= 1, got n_gram={n_gram}")
        self.n_gram = n_gram
        self.tokenizer = tokenizer
        # Pre-tokenised text must not be split again by sacrebleu.
        self.sacrebleu_tokenize = "none" if tokenizer is not None else sacrebleu_tokenize
        self.add_state(
            "score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("groups", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # prompts left out of the mean: fewer than two samples
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, groups: Sequence[Sequence[str]]) -> None:
        """Add generations; ``groups[i]`` holds the samples for prompt ``i``."""
        bleu = make_bleu(self.n_gram, self.sacrebleu_tokenize)
        for group in groups:
            if len(group) < 2:
                self.skipped += 1
                continue
            if self.tokenizer is not None:
                group = [" ".join(map(str, split_tokens(t, self.tokenizer))) for t in group]
            scores = self_bleu_scores(group, bleu)
            self.score_sum += sum(scores) / len(scores)
            self.groups += 1

    def compute(self) -> torch.Tensor:
        """self-BLEU in [0, 100]; NaN (with a warning) when no prompt had two samples."""
        if self.groups == 0:
            warn_undefined(
                "self-BLEU is undefined: no prompt has two or more samples to compare; "
                "returning NaN (sample more than one completion per prompt)"
            )
            return torch.tensor(float("nan"), device=self.device)
        if self.skipped:
            warn_undefined(
                f"self-BLEU: {int(self.skipped)} of {int(self.skipped + self.groups)} prompts "
                "have fewer than two samples and are left out of the mean"
            )
        return (self.score_sum / self.groups).float()
