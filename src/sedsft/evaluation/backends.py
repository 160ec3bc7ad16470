"""Generation backends behind one interface: Hugging Face ``generate`` and vLLM.

A backend turns chat prompts into ``k`` sampled completions each and hands them over one
prompt at a time (``(position, PromptSamples)``), so the evaluation can write every finished
prompt to disk at once and a killed run loses at most the prompts in flight.

- ``HFBackend`` (default, CPU or GPU): ``sampling.iter_samples``, batched under a token
  budget; measures the model's predictive entropy at every sampled position.
- ``VLLMBackend`` (``pip install -e ".[vllm]"``, CUDA): ``vllm.LLM`` with tensor parallelism
  for large models; vLLM only returns top-k log-probabilities, so its entropy is the top-k
  truncation (``sampled_entropy_top{k}``), measured only when ``entropy_top_k > 0``.

Both render prompts with the tokenizer's own chat template, identically, stop at the model's
EOS and at the template's end-of-turn token (``sampling.stop_token_ids``), and decode greedily
at ``temperature=0`` (one sample per prompt).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from sedsft.evaluation.sampling import (
    PromptSamples,
    SamplingSettings,
    end_of_turn_ids,
    iter_samples,
    render_prompts,
)

log = logging.getLogger(__name__)

Prompts = Sequence[list[dict]]  # chat prompts, each a list of messages
Keys = Sequence[int] | None  # stable prompt identities (e.g. row numbers) for per-prompt seeding
# (position in prompts, its samples), as each completes
Stream = Iterator[tuple[int, PromptSamples]]


class Backend(Protocol):
    name: str
    entropy_key: str | None  # the metric its entropy sums feed; None: it measures none

    def generate(self, prompts: Prompts, settings: SamplingSettings, keys: Keys = None) -> Stream:
        """``(position in prompts, its samples)`` for every prompt, as each completes.
        ``keys`` are stable prompt identities (e.g. row numbers) for per-prompt seeding."""
        ...


class HFBackend:
    """Hugging Face ``generate``, batched as the settings say (``sampling.plan_batches``)."""

    name = "hf"
    entropy_key = "sampled_entropy"

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: Prompts, settings: SamplingSettings, keys: Keys = None) -> Stream:
        # one RNG stream for the whole call: reproducible for the same prompts and settings
        yield from iter_samples(self.model, self.tokenizer, prompts, settings)


def topk_entropy(position: dict[int, Any], k: int) -> float:
    """``-sum p log p`` over the ``k`` most likely tokens of one position of vLLM's
    ``logprobs`` (``{token id: Logprob(logprob, rank, ...)}``; the sampled token is listed
    too, with its own rank, and only counts when it is among the top ``k``). A lower bound
    of the full entropy: the tail beyond ``k`` is left out."""
    total = 0.0
    for entry in position.values():
        rank, logprob = getattr(entry, "rank", None), entry.logprob
        if rank is not None and rank <= k and math.isfinite(logprob):
            total -= math.exp(logprob) * logprob
    return total


class VLLMBackend:
    """vLLM offline inference on an exported Hugging Face directory.

    ``prompts_per_call`` prompts go to ``LLM.generate`` at once (vLLM schedules them
    itself); results are handed over after each call, which is the granularity of resume.
    Every prompt gets its own seed, ``seed + key``, so a resumed run samples the remaining
    prompts exactly as an uninterrupted one would.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer: Any,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_model_len: int | None = None,
        prompts_per_call: int = 256,
        entropy_top_k: int = 0,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(
                "backend=vllm needs vLLM on a CUDA machine: pip install -e '.[vllm]' (or use backend=hf)"
            ) from err
        self.tokenizer = tokenizer
        # vLLM stops at the EOS of the model's generation config; the template's end of turn
        # (and the tokenizer's EOS) are added, as the HF backend does (sampling.stop_token_ids)
        self.stop_ids = [
            i for i in (tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)) if i is not None
        ]
        self.prompts_per_call, self.entropy_top_k = prompts_per_call, entropy_top_k
        self.entropy_key = f"sampled_entropy_top{entropy_top_k}" if entropy_top_k > 0 else None
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            max_logprobs=max(20, entropy_top_k),
        )

    def generate(self, prompts: Prompts, settings: SamplingSettings, keys: Keys = None) -> Stream:
        from vllm import SamplingParams

        # vLLM: temperature 0 is greedy (the settings allow it with one sample per prompt only)
        keys = list(range(len(prompts))) if keys is None else list(keys)
        rendered = render_prompts(self.tokenizer, prompts)
        for start in range(0, len(prompts), self.prompts_per_call):
            positions = range(start, min(start + self.prompts_per_call, len(prompts)))
            requests = [
                {
                    "prompt_token_ids": self.tokenizer(rendered[i], add_special_tokens=False)[
                        "input_ids"
                    ]
                }
                for i in positions
            ]
            params = [
                SamplingParams(
                    n=settings.num_samples,
                    stop_token_ids=self.stop_ids,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    max_tokens=settings.max_new_tokens,
                    seed=None if settings.seed is None else settings.seed + keys[i],
                    logprobs=self.entropy_top_k or None,
                )
                for i in positions
            ]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            for i, output in zip(positions, outputs, strict=True):
                yield i, self._samples(output)

    def _samples(self, output: Any) -> PromptSamples:
        samples = PromptSamples()
        for completion in output.outputs:
            samples.texts.append(completion.text)
            samples.num_tokens.append(len(completion.token_ids))
            if self.entropy_top_k and completion.logprobs:
                samples.entropy_sums.append(
                    sum(topk_entropy(p, self.entropy_top_k) for p in completion.logprobs)
                )
                samples.entropy_counts.append(len(completion.logprobs))
            else:
                samples.entropy_sums.append(None)
                samples.entropy_counts.append(0)
        return samples


def build_backend(
    name: str,
    ckpt: str,
    vllm: dict[str, Any] | None = None,
    device: str = "auto",
    export_dir: str | Path | None = None,
) -> Backend:
    """The backend ``name`` (``hf`` | ``vllm``) with the policy of checkpoint ``ckpt`` loaded
    (any layout ``sedsft.checkpoints.load_model`` reads). ``vllm``: the vLLM engine's knobs
    from the config; ``device``: where the HF backend's model goes. vLLM reads Hugging Face
    directories only: another layout is exported to ``export_dir`` first."""
    from sedsft.checkpoints import hf_directory, save_hf
    from sedsft.model_paths import load_model_from

    if name == "hf":
        model, tokenizer = load_model_from(ckpt, "ckpt")
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        return HFBackend(model, tokenizer)
    if name == "vllm":
        from transformers import AutoTokenizer

        directory = hf_directory(ckpt)
        if directory is None:
            if export_dir is None:
                raise ValueError(
                    f"ckpt={ckpt} is not a Hugging Face directory and no export_dir was given for vLLM"
                )
            model, tokenizer = load_model_from(ckpt, "ckpt")
            directory = save_hf(model, tokenizer, export_dir)
            del model
            log.info("exported %s to %s for vLLM", ckpt, directory)
        return VLLMBackend(directory, AutoTokenizer.from_pretrained(directory), **(vllm or {}))
    raise ValueError(
        f"backend={name!r}: unknown; use backend=hf (Hugging Face generate) or backend=vllm"
    )
