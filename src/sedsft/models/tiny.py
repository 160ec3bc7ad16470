"""The embedded default model: a tiny Llama with a tokenizer trained offline.

Nothing is downloaded. The first use trains a byte-level BPE tokenizer on the toy
math corpus, builds a small Llama from a config, pretrains it on toy text and saves
both with ``save_pretrained`` into the cache; later uses load that directory through
the same ``from_pretrained`` code path that real models take.

Numbers are whole tokens (``"18"`` is one token, 0-63 are guaranteed), not digits: the
toy's sums are a lookup from two number tokens to one, which a 0.9M-parameter model
learns in a few hundred steps, while digit-by-digit sums with carries were still at
chance after 900 steps and took about 2,500 (toy-lab measurements).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sedsft.data import toy_math, toy_routes
from sedsft.data.formats import PAPER_SYSTEM_PROMPT
from sedsft.models.hf import CausalLMSpec
from sedsft.utils.code_digest import source_digest
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
TASKS = ("toy_math", "routes")
"""What a tiny base is pretrained on: the toy (``toy_math``) or the routes task
(``toy_routes``, covered range only)."""
_NUMBER_LINE_REPEATS = 50  # copies of "0 1 ... 63" in the tokenizer corpus


@dataclass(frozen=True)
class TinyArch:
    """Shape of the tiny Llama (defaults: about 0.9 M parameters).

    ``vocab_size`` is the size of the BPE vocabulary, special tokens included, and so
    the number of embedding rows. The default, 527, is every merge the toy corpus has
    (527 for corpus seeds 0-2 and sizes 200-2000 alike); the build fails if the corpus
    cannot fill the size asked for, so config and model always agree.
    """

    vocab_size: int = 527
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    initializer_range: float = 0.05  # init std; with Llama's 0.02 copying was learnt ~100 steps later


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE in which every number 0-63 is one token.

    Digit runs are split off before BPE, so merges never mix digits with letters; a run
    of digits is then merged into one token when the corpus makes it frequent, which a
    number line added here guarantees for 0 .. ``toy_math.WHOLE_NUMBERS - 1``. The result has
    exactly ``vocab_size`` tokens when the corpus has that many merges, fewer otherwise.
    """
    number_line = " ".join(map(str, range(toy_math.WHOLE_NUMBERS)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=False),
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
    tok.train_from_iterator([*texts, *[number_line] * _NUMBER_LINE_REPEATS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"model.task={task!r}: allowed {list(TASKS)}")


def tokenizer_corpus(size: int, seed: int, task: str = "toy_math", routes: dict | None = None) -> list[str]:
    """What the tiny tokenizer learns from: ``size`` problems of ``task`` with their
    solutions in every style, and the chat scaffolding that is part of every example (role
    names, which open a line in ChatML, and the paper's system prompt)."""
    _check_task(task)
    if task == "routes":
        problems = toy_routes.corpus(size, seed=seed, ranges=toy_routes.Ranges(**(routes or {})))
    else:
        problems = toy_math.corpus(size, seed=seed)
    return problems + ["system\nuser\nassistant", PAPER_SYSTEM_PROMPT] * 50


def pretraining_rows(
    n: int, seed: int, style_weights: dict[str, float] | None, task: str = "toy_math", routes: dict | None = None
) -> list[dict[str, str]]:
    """The pretraining problems of ``task``: toy problems, or the routes task's easy
    problems of the SFT triples (never a hard running total, never a held-out triple)."""
    _check_task(task)
    if task == "routes":
        return toy_routes.generate("pretrain", n, seed=seed, style_weights=style_weights, ranges=toy_routes.Ranges(**(routes or {})))
    return toy_math.generate(n, seed=seed, style_weights=style_weights)


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    style_weights: dict[str, float] | None = None,
    task: str = "toy_math",
    routes: dict | None = None,
) -> list[float]:
    """Give the model a prior: next-token training on every token of chat-formatted toy
    problems whose solutions are drawn from all styles (uniformly by default).

    Afterwards the model spreads probability over the styles where a reply begins, so
    SFT data that favours one style has a distribution to collapse. Batches are formed
    from rows of similar length (sorted within windows of 16 batches, then the batches
    shuffled with ``seed``), so almost no compute goes to padding. Batches are small
    because the sums are learnt after a number of updates more than of examples: for the
    same compute, 16 x 1000 steps reached 58% teacher-forced accuracy on them where
    32 x 500 reached 14%. ``task`` / ``routes`` choose the problems (``pretraining_rows``).
    Returns the losses.
    """
    rows = pretraining_rows(steps * batch_size, seed + 10_000, style_weights, task, routes)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}],
            tokenize=False,
        )
        for r in rows
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    window = 16 * batch_size
    batches = []
    for start in range(0, len(encoded), window):
        ordered = sorted(encoded[start : start + window], key=len)
        batches += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    random.Random(seed).shuffle(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = cosine_with_warmup(optimizer, num_training_steps=steps, warmup_ratio=0.05)
    model.train()
    losses = []
    for step, chunk in enumerate(batches):
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
        if step % 100 == 0 or step == steps - 1:
            log.info("pretraining tiny model: step %d/%d loss %.3f", step + 1, steps, loss.item())
    return losses


def build_tiny(
    directory: Path,
    arch: TinyArch,
    seed: int,
    corpus_size: int,
    pretrain_steps: int = 0,
    pretrain_kwargs: dict | None = None,
    task: str = "toy_math",
    routes: dict | None = None,
) -> None:
    """Train the tokenizer, build a Llama (pretrained on ``task``'s text when
    ``pretrain_steps``), save both in ``directory``."""
    tokenizer = train_tokenizer(tokenizer_corpus(corpus_size, seed, task, routes), arch.vocab_size)
    if len(tokenizer) != arch.vocab_size:
        raise ValueError(
            f"model.arch.vocab_size={arch.vocab_size}, but the toy corpus (model.corpus_size="
            f"{corpus_size}) only yields a {len(tokenizer)}-token BPE vocabulary; set "
            f"model.arch.vocab_size to at most {len(tokenizer)}"
        )
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
        pretrain(model, tokenizer, pretrain_steps, seed=seed, task=task, routes=routes, **(pretrain_kwargs or {}))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@dataclass
class TinyLMSpec(CausalLMSpec):
    """``model=tiny`` / ``model=tiny_lab``: built on first use, cached under ``cache_dir``
    (one directory per construction), then loaded from disk.

    The cache key is the construction: these settings and a digest of the source of the
    code that builds the base (this module and the task's generator), so a changed
    generator or pretraining loop builds a new base instead of reusing an old one.

    Attributes:
        cache_dir: where built models live (one sub-directory per construction hash).
        seed: seed of tokenizer corpus and weight initialisation.
        corpus_size: toy problems used to train the tokenizer.
        arch: sizes of the Llama (see ``TinyArch``).
        pretrain_steps: steps of toy-text pretraining that teach the task and give the
            model a prior over solution styles (0: random initialisation). The sums are
            learnt late: after CE-SFT on the toy mix, held-out pass@1 was 0.32 with 1000
            steps and 0.53 with 1600 (toy lab).
        pretrain: options of ``pretrain`` (batch_size, lr, style_weights).
        task: what the base is pretrained on and its tokenizer learns from: ``toy_math``
            (the toy lab) or ``routes`` (the routes task's covered range).
        routes: ``toy_routes.Ranges`` overrides for ``task=routes`` (cap, hard_max, max_change).
    """

    name_or_path: str = "tiny-llama"
    dtype: str = "float32"
    cache_dir: str = ".cache"
    seed: int = 0
    corpus_size: int = 2000
    arch: dict | None = None
    pretrain_steps: int = 0
    pretrain: dict | None = None
    task: str = "toy_math"
    routes: dict | None = None

    def construction(self) -> dict:
        _check_task(self.task)
        generators = (toy_math, toy_routes) if self.task == "routes" else (toy_math,)
        # the ranges in full, so an explicit default and an omitted one share a base
        task = {"task": self.task, "routes": asdict(toy_routes.Ranges(**dict(self.routes or {})))} if self.task == "routes" else {}
        return {
            "code": source_digest(sys.modules[__name__], *generators),
            **task,
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
            target.parent.mkdir(parents=True, exist_ok=True)
            with _build_lock(target):  # parallel jobs wanting one base build it once
                if not (target / "config.json").exists():
                    self._build(target, recipe)
        return str(target)

    def _build(self, target: Path, recipe: dict) -> None:
        """Build into a scratch directory and rename: parallel runs (multirun, test workers)
        never see a half-written model."""
        # Said before it starts (a warning, so it shows in every stage's console): a build with
        # pretraining takes minutes (1,000 steps of the default size: about 100 s on one core).
        minutes = f", about {self.pretrain_steps / 600:.0f} min on one CPU core" if self.pretrain_steps >= 600 else ""
        log.warning("building the tiny base %s once into %s (%d pretraining steps%s); later runs load it",
                    self.name_or_path, target, self.pretrain_steps, minutes)  # fmt: skip
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        try:
            build_tiny(
                scratch, TinyArch(**recipe["arch"]), self.seed, self.corpus_size, self.pretrain_steps,
                recipe["pretrain"], self.task, recipe.get("routes"),
            )
            (scratch / "construction.json").write_text(json.dumps(recipe, indent=2))
            os.replace(scratch, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _build_lock(target: Path):
    """An exclusive lock next to ``target`` while it is built: a second process asking for
    the same base (two grid jobs with one base seed) waits and then loads it."""
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
