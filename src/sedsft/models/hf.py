"""Loading a Hugging Face causal LM and its tokenizer from a hub name or a local path.

``CausalLMSpec`` is what ``configs/model/*.yaml`` instantiate: a small description of
the model that loads lazily, so the LightningModule can build the weights inside
``configure_model`` (where FSDP / DeepSpeed want them built) and the data module can
get the tokenizer without touching the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sedsft.models.compile import compile_decoder_layers
from sedsft.models.lora import apply_lora, lora_settings
from sedsft.models.lora import load_kwargs as lora_load_kwargs

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """``"auto"`` / ``None`` keep the checkpoint's dtype; otherwise a torch dtype."""
    if name is None or name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; allowed: auto, {sorted(DTYPES)}")
    return DTYPES[name]


def missing_local_path(name_or_path: str) -> None:
    """Raise when ``name_or_path`` is written as a local path (absolute, ``./``, ``~``, or
    more than one ``/``) but nothing is there: transformers would call it an invalid hub
    repo id. Hub ids are ``name`` or ``org/name``."""
    text = str(name_or_path)
    looks_local = text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/")
    path = Path(text).expanduser()
    if looks_local and not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"model.name_or_path={text}: no such local directory{where}; give the directory of a "
            "Hugging Face model (with config.json), or a hub id such as Qwen/Qwen2.5-Math-7B-Instruct"
        )


@dataclass
class CausalLMSpec:
    """A causal LM to fine-tune, by hub name or local directory.

    Attributes:
        name_or_path: hub id (e.g. ``meta-llama/Llama-3.2-3B-Instruct``) or local directory.
        dtype: weight dtype: ``auto`` (as stored), ``float32``, ``bfloat16``, ``float16``.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (if installed).
        gradient_checkpointing: recompute activations in backward to save memory.
        chat_template: Jinja template overriding the tokenizer's own (None keeps it).
        revision: hub revision (branch, tag or commit) for reproducible loads.
        trust_remote_code: allow model code from the hub repository.
        model_kwargs: extra keyword arguments for ``from_pretrained``.
        lora: LoRA / QLoRA settings (``sedsft.models.lora.LoraSettings``); None or ``r: 0`` = off.
        compile: ``torch.compile`` each decoder layer: false, true, or a dict of compile arguments.
    """

    name_or_path: str
    dtype: str = "auto"
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = False
    chat_template: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    compile: bool | dict[str, Any] = False

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)  # fail at config time, not after the data is tokenised
        lora_settings(self.lora)
        missing_local_path(self.name_or_path)

    def resolved_path(self) -> str:
        """Where ``from_pretrained`` loads from (subclasses may build it first)."""
        return self.name_or_path

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(
            self.resolved_path(), revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if tokenizer.chat_template is None:
            raise ValueError(
                f"tokenizer of {self.name_or_path!r} has no chat template; set model.chat_template"
            )
        if tokenizer.pad_token is None:
            # Padding positions are masked out of attention and labels, so any id works;
            # eos is the usual choice and keeps the vocabulary unchanged.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self) -> PreTrainedModel:
        lora = lora_settings(self.lora)
        model = AutoModelForCausalLM.from_pretrained(
            self.resolved_path(),
            revision=self.revision,
            dtype=resolve_dtype(self.dtype),
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            **lora_load_kwargs(lora, resolve_dtype(self.dtype)),
            **self.model_kwargs,
        )
        if self.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora is not None:
            model = apply_lora(model, lora, self.gradient_checkpointing)
        compile_decoder_layers(model, self.compile)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("loaded %s: %s, %.1fM parameters, %.1fM trainable", self.name_or_path, type(model).__name__,
                 model.num_parameters() / 1e6, trainable / 1e6)  # fmt: skip
        return model
