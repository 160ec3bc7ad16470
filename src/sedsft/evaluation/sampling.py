"""Batched sampling of ``k`` completions per prompt with Hugging Face ``generate``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class EntropyTracker(LogitsProcessor):
    """Accumulates the predictive entropy (nats) of the model's raw next-token distribution
    at every sampled position of unfinished sequences; passes the scores on unchanged.

    Custom processors run before temperature / top-p, so this is the model's entropy,
    not the truncated sampling distribution's. Nothing ``[steps, B, V]``-sized is kept.
    """

    def __init__(self, stop_ids: Sequence[int]):
        self.stop_ids = torch.tensor(sorted(set(stop_ids)))
        self.total = 0.0
        self.count = 0
        self._done: torch.Tensor | None = None
        self._prompt_length = 0

    def start(self, prompt_length: int) -> None:
        self._done, self._prompt_length = None, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._done is None:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        elif input_ids.shape[1] > self._prompt_length:
            self._done |= torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        log_p = torch.log_softmax(scores.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
        active = ~self._done
        self.total += float(entropy[active].sum())
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


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    num_samples: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int | None = None,
) -> Samples:
    """Sample ``num_samples`` completions for each chat prompt.

    Prompts are rendered with the chat template and a generation prompt, left-padded
    and generated ``batch_size`` prompts at a time (``num_samples`` each). The model is
    put in eval mode for the call and restored afterwards.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if seed is not None:
        torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    tracker = EntropyTracker(stop_ids)
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, lengths = [], []
    context = getattr(model.config, "max_position_embeddings", None)
    longest = 0  # the longest prompt batch that overran the context, to warn once at the end
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
            inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            prompt_length = inputs["input_ids"].shape[1]
            if context and prompt_length + max_new_tokens > context:
                longest = max(longest, prompt_length)
            tracker.start(prompt_length)
            output = model.generate(
                **inputs,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                logits_processor=LogitsProcessorList([tracker]),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            generated = output[:, prompt_length:]
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            counts = _lengths(generated, stop_ids)
            for i in range(len(chunk)):
                texts.append(decoded[i * num_samples : (i + 1) * num_samples])
                lengths.append(counts[i * num_samples : (i + 1) * num_samples])
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if longest:
        log.warning(
            "prompts of up to %d tokens + max_new_tokens=%d overran the model's context of %d "
            "positions; samples past it are unreliable (shorten the prompts or use a longer-context model)",
            longest, max_new_tokens, context,
        )  # fmt: skip
    return Samples(texts=texts, num_tokens=lengths, entropy=tracker.mean)


def _lengths(generated: torch.Tensor, stop_ids: Sequence[int]) -> list[int]:
    """Generated tokens per row, up to and including the first stop token."""
    stops = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    full = torch.full((generated.shape[0],), generated.shape[1], device=generated.device)
    return torch.where(stops.any(1), stops.int().argmax(1) + 1, full).tolist()
