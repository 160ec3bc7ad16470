"""The embedded default model: a tiny Llama with a tokenizer trained offline.

Nothing is downloaded. The first use trains a byte-level BPE tokenizer on the toy
math corpus, builds a small Llama from a config and saves both with
``save_pretrained`` into the cache; later uses load that directory through the same
``from_pretrained`` code path that real models take.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sedsft.data import toy_math
from sedsft.data.formats import PAPER_SYSTEM_PROMPT
from sedsft.models.hf import CausalLMSpec
from sedsft.utils.schedules import cosine_with_warmup

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, the format of Qwen2.5; the assistant turn ends with ``<|im_end|>``."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BUILD_VERSION = 1  # bump when the construction below changes, to invalidate caches


@dataclass(frozen=True)
class TinyArch:
    """Shape of the tiny Llama (defaults: about 1.7 M parameters)."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit pre-tokenisation (so numbers stay composable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    style_weights: dict[str, float] | None = None,
) -> list[float]:
    """Give the model a prior: next-token training on every token of chat-formatted toy
    problems whose solutions are drawn from all styles (uniformly by default).

    Afterwards the model spreads probability over the styles where a reply begins, so
    SFT data that favours one style has a distribution to collapse. Returns the losses.
    """
    rows = toy_math.generate(steps * batch_size, seed=seed + 10_000, style_weights=style_weights)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}],
            tokenize=False,
        )
        for r in rows
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = cosine_with_warmup(optimizer, num_training_steps=steps, warmup_ratio=0.05)
    model.train()
    losses = []
    for step in range(steps):
        chunk = encoded[step * batch_size : (step + 1) * batch_size]
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("pretraining tiny model: step %d/%d loss %.3f", step + 1, steps, loss.item())
    return losses


def build_tiny(
    directory: Path, arch: TinyArch, seed: int, corpus_size: int, pretrain_steps: int = 0, pretrain_kwargs: dict | None = None
) -> None:
    """Train the tokenizer, build a Llama (pretrained on toy text when ``pretrain_steps``),
    save both in ``directory``."""
    # The chat scaffolding (role names, the paper's system prompt) is part of every
    # example, so it belongs in the tokenizer's corpus too.
    scaffold = ["system user assistant", PAPER_SYSTEM_PROMPT] * 50
    tokenizer = train_tokenizer(toy_math.corpus(corpus_size, seed=seed) + scaffold, arch.vocab_size)
    config = LlamaConfig(
        **{k: v for k, v in asdict(arch).items() if k != "vocab_size"},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed=seed, **(pretrain_kwargs or {}))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@dataclass
class TinyLMSpec(CausalLMSpec):
    """``model=tiny``: built on first use, cached under ``cache_dir``, then loaded from disk.

    Attributes:
        cache_dir: where built models live (one sub-directory per construction hash).
        seed: seed of tokenizer corpus and weight initialisation.
        corpus_size: toy problems used to train the tokenizer.
        arch: sizes of the Llama (see ``TinyArch``).
        pretrain_steps: steps of toy-text pretraining that give the model a prior over
            solution styles (0: random initialisation).
        pretrain: options of ``pretrain`` (batch_size, lr, style_weights).
    """

    name_or_path: str = "tiny-llama"
    dtype: str = "float32"
    cache_dir: str = ".cache"
    seed: int = 0
    corpus_size: int = 2000
    arch: dict | None = None
    pretrain_steps: int = 0
    pretrain: dict | None = None

    def construction(self) -> dict:
        return {
            "version": BUILD_VERSION,
            "arch": asdict(TinyArch(**(self.arch or {}))),
            "seed": self.seed,
            "corpus_size": self.corpus_size,
            "pretrain_steps": self.pretrain_steps,
            "pretrain": dict(self.pretrain or {}),
        }

    def resolved_path(self) -> str:
        recipe = self.construction()
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        target = Path(self.cache_dir) / f"{self.name_or_path}-{digest}"
        if not (target / "config.json").exists():
            log.info("building %s into %s (once; later runs load it)", self.name_or_path, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build in a scratch directory and rename: parallel runs (multirun, test
            # workers) never see a half-written model.
            scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
            try:
                build_tiny(
                    scratch, TinyArch(**recipe["arch"]), self.seed, self.corpus_size, self.pretrain_steps, recipe["pretrain"]
                )
                (scratch / "construction.json").write_text(json.dumps(recipe, indent=2))
                os.replace(scratch, target)
            except OSError:
                if not (target / "config.json").exists():
                    raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return str(target)
