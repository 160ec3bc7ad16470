"""Batched sampling of ``k`` completions per prompt with Hugging Face ``generate``.

Memory: ``generate`` expands every prompt to its ``k`` rows before the prefill, and a batch
is left-padded to its longest prompt, so one call costs about
``rows x (longest prompt + max_new_tokens)`` tokens of activations and KV cache. Given
``max_batch_tokens``, prompts are sorted by length and grouped so that no call exceeds that
budget (one prompt whose ``k`` rows alone exceed it is sampled in several calls). Without it,
``batch_size`` prompts go into each call in their given order: the same number of calls on
every rank, which sharded models (ZeRO-3, FSDP) generating in lockstep rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class EntropyTracker(LogitsProcessor):
    """Accumulates the predictive entropy (nats) of the model's raw next-token distribution
    at every sampled position of unfinished sequences; passes the scores on unchanged.

    Custom processors run before temperature / top-p, so this is the model's entropy,
    not the truncated sampling distribution's. Nothing ``[steps, B, V]``-sized is kept:
    besides the running total, only per-row sums and counts (``[B]``, for the current call).
    """

    def __init__(self, stop_ids: Sequence[int]):
        self.stop_ids = torch.tensor(sorted(set(stop_ids)))
        self.total = 0.0
        self.count = 0
        self.row_sums: torch.Tensor | None = None  # [B] summed entropy of each row, this call
        self.row_counts: torch.Tensor | None = None  # [B] positions counted per row, this call
        self._done: torch.Tensor | None = None
        self._prompt_length = 0

    def start(self, prompt_length: int) -> None:
        self._done, self._prompt_length = None, prompt_length
        self.row_sums = self.row_counts = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._done is None:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.row_sums = torch.zeros(
                input_ids.shape[0], dtype=torch.float64, device=input_ids.device
            )
            self.row_counts = torch.zeros(
                input_ids.shape[0], dtype=torch.long, device=input_ids.device
            )
        elif input_ids.shape[1] > self._prompt_length:
            self._done |= torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        log_p = torch.log_softmax(scores.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
        active = ~self._done
        entropy = torch.where(active, entropy, torch.zeros_like(entropy))
        self.row_sums += entropy.double()
        self.row_counts += active.long()
        self.total += float(entropy.sum())
        self.count += int(active.sum())
        return scores

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class Samples:
    texts: list[list[str]]  # texts[i][j]: sample j of prompt i
    num_tokens: list[list[int]]  # generated tokens of each sample
    entropy: float  # mean predictive entropy at sampled positions (nats)
    # per sample, when known: summed entropy over its sampled positions, and their number
    entropy_sums: list[list[float]] | None = None
    entropy_counts: list[list[int]] | None = None


@dataclass
class PromptSamples:
    """The ``k`` samples of one prompt, as a backend hands them over."""

    texts: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # generated tokens, stop token included
    entropy_sums: list[float | None] = field(default_factory=list)  # None: backend cannot tell
    entropy_counts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled, passed whole from the config to every sampler.

    The first five fields decide what is drawn (``drawn``: stored with an evaluation, so a
    resume can check them); ``batch_size`` and ``max_batch_tokens`` only group the work of
    the Hugging Face sampler (``plan_batches``). Bad values are refused here, once.
    """

    num_samples: int = 8  # completions per prompt (k of pass@k / avg@k)
    max_new_tokens: int = 256  # generation budget per completion
    temperature: float = 1.0  # 0: greedy decoding, one sample per prompt
    top_p: float = 1.0  # nucleus threshold
    seed: int | None = None  # None: the global RNG as it stands
    batch_size: int = 16  # prompts per generate call at most
    max_batch_tokens: int | None = None  # rows x (longest prompt + new tokens) per call at most

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"num_samples, max_new_tokens and batch_size must be >= 1, got "
                f"{self.num_samples}, {self.max_new_tokens}, {self.batch_size}"
            )
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {self.max_batch_tokens}")
        check_greedy(self.temperature, self.num_samples)

    @classmethod
    def from_config(cls, block: Mapping[str, Any], where: str = "sampling", **fixed: Any) -> SamplingSettings:
        """The settings of a config's ``sampling:`` block (``heldout.sampling``, a callback's
        ``sampling``, ...), passed whole; ``fixed`` (e.g. the run's seed) overrides the block;
        fields absent from both keep their defaults. A key that is no field here is refused,
        named by ``where`` (the block's path in the config)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; a sampling block takes {sorted(names)} "
                f"(sedsft.evaluation.sampling.SamplingSettings)"
            )
        return cls(**{**block, **fixed})

    def drawn(self) -> dict[str, Any]:
        """The fields that decide the samples (not how the work is batched)."""
        return {
            "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def plan_batches(
    lengths: Sequence[int],
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    max_batch_tokens: int | None = None,
) -> list[list[tuple[int, int]]]:
    """Generate calls as lists of ``(prompt index, rows)``; every call gives all its prompts
    the same number of rows (``num_return_sequences``).

    Without ``max_batch_tokens``: ``batch_size`` prompts per call in the given order. With it:
    prompts sorted by length (shortest first, ties by index), at most ``batch_size`` per call,
    and ``prompts x num_samples x (longest prompt + max_new_tokens) <= max_batch_tokens``;
    a prompt over budget on its own gets ``max_batch_tokens // (length + max_new_tokens)``
    rows per call (at least 1).
    """
    if max_batch_tokens is None:
        order = list(range(len(lengths)))
        return [
            [(i, num_samples) for i in order[s : s + batch_size]]
            for s in range(0, len(order), batch_size)
        ]
    calls: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        cost = lengths[i] + max_new_tokens  # tokens of one row; the longest in ``current`` so far
        if num_samples * cost > max_batch_tokens:
            if current:
                calls.append(current)
                current = []
            rows = max(1, max_batch_tokens // cost)
            calls += [[(i, min(rows, num_samples - s))] for s in range(0, num_samples, rows)]
            continue
        if current and (
            len(current) + 1 > batch_size
            or (len(current) + 1) * num_samples * cost > max_batch_tokens
        ):
            calls.append(current)
            current = []
        current.append((i, num_samples))
    if current:
        calls.append(current)
    return calls


def check_greedy(temperature: float, num_samples: int) -> None:
    """Temperature 0 is greedy decoding: one answer per prompt, so ``num_samples`` must be 1."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy decoding)")
    if temperature == 0 and num_samples != 1:
        raise ValueError(
            f"temperature=0 (greedy) with num_samples={num_samples}: greedy decoding gives the same "
            "answer every time; use num_samples=1 for greedy pass@1, or temperature>0 for n samples"
        )


_PROBE = "Sedsft end-of-turn probe"


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ...), as a list of at most one id; empty
    when the tokenizer has no chat template or the template closes with ordinary text.

    Found by rendering a one-turn conversation and tokenizing what follows the reply: the
    first token there, when it is a special (or added) token. A model whose generation
    config names only its base model's EOS would otherwise run past the end of its turn.
    """
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
            tokenize=False,
        )
    except Exception:  # no template, or one that refuses this conversation
        return []
    if _PROBE not in text:
        return []
    after = text.split(_PROBE, 1)[1].lstrip(" ")
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [ids[0]] if ids and ids[0] in special else []


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where generation stops: the model's EOS ids (generation config, else the tokenizer's)
    and the chat template's end-of-turn token."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    ids = [i for i in ids if i is not None]
    return ids + [i for i in end_of_turn_ids(tokenizer) if i not in ids]


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]]) -> list[str]:
    """Chat prompts as text: the tokenizer's chat template with the generation prompt."""
    return [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


@torch.no_grad()
def iter_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    settings: SamplingSettings,
) -> Iterator[tuple[int, PromptSamples]]:
    """Sample ``settings.num_samples`` completions per chat prompt, yielding ``(prompt index,
    its samples)`` as each prompt completes (in generation order, see ``plan_batches``).

    Prompts are rendered with the chat template and a generation prompt and left-padded.
    Generation stops at the model's EOS and at the template's end-of-turn token
    (``stop_token_ids``); ``temperature=0`` decodes greedily (``num_samples`` is then 1).
    The model is put in eval mode for the call and restored afterwards (also when the
    caller stops iterating early).
    """
    if not prompts:
        return
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    k, max_new_tokens = settings.num_samples, settings.max_new_tokens
    stop_ids = stop_token_ids(model, tokenizer)
    tracker = EntropyTracker(stop_ids)
    rendered = render_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    calls = plan_batches(lengths, k, max_new_tokens, settings.batch_size, settings.max_batch_tokens)
    decoding = (
        {"do_sample": False}  # greedy: temperature 0
        if settings.temperature == 0
        else {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    )
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    context = getattr(model.config, "max_position_embeddings", None)
    longest = 0  # the longest prompt batch that overran the context, to warn once at the end
    partial: dict[int, PromptSamples] = {}
    try:
        for call in calls:
            rows = call[0][1]
            inputs = tokenizer(
                [rendered[i] for i, _ in call],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            inputs = inputs.to(model.device)
            prompt_length = inputs["input_ids"].shape[1]
            if context and prompt_length + max_new_tokens > context:
                longest = max(longest, prompt_length)
            tracker.start(prompt_length)
            output = model.generate(
                **inputs,
                **decoding,
                max_new_tokens=max_new_tokens,
                num_return_sequences=rows,
                logits_processor=LogitsProcessorList([tracker]),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            generated = output[:, prompt_length:]
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            counts = _lengths(generated, stop_ids)
            sums, positions = tracker.row_sums.tolist(), tracker.row_counts.tolist()
            for slot, (i, _) in enumerate(call):
                part = partial.setdefault(i, PromptSamples())
                span = slice(slot * rows, (slot + 1) * rows)
                part.texts += decoded[span]
                part.num_tokens += counts[span]
                part.entropy_sums += sums[span]
                part.entropy_counts += positions[span]
                if len(part.texts) == k:
                    yield i, partial.pop(i)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if longest:
        log.warning(
            "prompts of up to %d tokens + max_new_tokens=%d overran the model's context of %d "
            "positions; samples past it are unreliable (shorten the prompts or use a longer-context model)",
            longest, max_new_tokens, context,
        )  # fmt: skip


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    settings: SamplingSettings,
) -> Samples:
    """Sample completions for each chat prompt (``iter_samples``), returned in prompt order."""
    done = dict(iter_samples(model, tokenizer, prompts, settings))
    return merge_samples([done[i] for i in range(len(prompts))])


def merge_samples(groups: Sequence[PromptSamples]) -> Samples:
    """One ``Samples`` from per-prompt samples, the entropy pooled by ``pooled_entropy``
    (0.0 when the backend did not measure it)."""
    sums = [list(g.entropy_sums) for g in groups]
    counts = [list(g.entropy_counts) for g in groups]
    return Samples(
        texts=[list(g.texts) for g in groups],
        num_tokens=[list(g.num_tokens) for g in groups],
        entropy=pooled_entropy(sums, counts) or 0.0,
        entropy_sums=sums,
        entropy_counts=counts,
    )


def pooled_entropy(
    sums: Sequence[Sequence[float | None]], counts: Sequence[Sequence[int]]
) -> float | None:
    """The mean predictive entropy over every sampled position: the per-sample entropy sums
    (``sums[i][j]``, None where the backend did not measure it) over the positions they
    cover (``counts[i][j]``); None when no position was measured. Pooling positions, not
    per-sample means, so a long completion weighs as much as its tokens."""
    known = [
        (s, c)
        for gs, gc in zip(sums, counts, strict=True)
        for s, c in zip(gs, gc, strict=True)
        if s is not None
    ]
    total = sum(c for _, c in known)
    return sum(s for s, _ in known) / total if total else None


def _lengths(generated: torch.Tensor, stop_ids: Sequence[int]) -> list[int]:
    """Generated tokens per row, up to and including the first stop token."""
    stops = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    full = torch.full((generated.shape[0],), generated.shape[1], device=generated.device)
    return torch.where(stops.any(1), stops.int().argmax(1) + 1, full).tolist()
