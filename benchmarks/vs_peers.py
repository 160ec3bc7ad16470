"""One SFT job through sedsft (ce, sed), Hugging Face ``Trainer`` and TRL ``SFTTrainer``.

The same model (same initial weights), the same conversations, the same batches in the
same order (sequential sampling; checked token for token: every system must feed the
model the same ``input_ids`` and the same target tokens at every step), the same optimiser
(``torch.optim.AdamW``, not fused, constant learning rate, gradient clipping at 1.0) and
the same number of steps:

- ``sedsft-ce`` / ``sedsft-sed``: ``SFTModule`` under a Lightning ``Trainer``, the code path
  of ``src/train.py`` (fused hidden-state loss when the model allows it);
- ``hf``: ``transformers.Trainer`` with the model's own loss on labels from sedsft's
  assistant-only tokenisation (plain ``Trainer`` has no chat logic of its own);
- ``trl``: ``trl.SFTTrainer`` on the conversations with ``assistant_only_loss=True``: TRL
  tokenises and masks by itself, from the chat template's ``{% generation %}`` markers.

Systems run interleaved (round r runs each once, in turn) in one process with a fixed
number of threads, so load changes on a shared machine hit all alike; the table gives
medians over rounds. tokens/s counts the non-padding input tokens of steps 2..S over their
wall time (the first step, with its one-time set-up, is shown on its own). Peak memory is
the peak above what was in use before the trainer was built (the model's weights): the
CUDA allocator's peak, or on the CPU the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) after handing freed heap back to the OS (``malloc_trim``).
The final loss is the mean cross-entropy over the target tokens of the last step (for
``sedsft-sed`` its CE term): sedsft-ce, hf and trl must agree.

    PYTHONPATH=src python benchmarks/vs_peers.py --shape tiny
    PYTHONPATH=src python benchmarks/vs_peers.py --shape mid --steps 10 --rounds 3
    PYTHONPATH=src python benchmarks/vs_peers.py --shape qwen2.5-0.5b --device cuda  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from measure import read_peak, reset_peak, text_table

# Shapes: (model family, config sizes, default batch, default sequence length, default steps).
# "tiny" is the project's own tiny Llama; the vocabulary is the tiny tokenizer's unless the
# shape names its own (ids beyond the tokenizer's are then simply never used).
SHAPES: dict[str, dict] = {
    "tiny": {"family": "llama", "sizes": {}, "batch": 8, "seq_len": 256, "steps": 20},
    "mid": {  # a small LM's proportions: 58M parameters, over half of them in a 32k vocabulary
        "family": "llama",
        "sizes": dict(
            vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        ),
        "batch": 4, "seq_len": 256, "steps": 8,
    },
    "qwen2.5-0.5b": {  # the published config's sizes; random weights, nothing downloaded
        "family": "qwen2",
        "sizes": dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True, max_position_embeddings=32768,
        ),
        "batch": 4, "seq_len": 2048, "steps": 10,
    },
}  # fmt: skip
SYSTEMS = ("sedsft-ce", "sedsft-sed", "hf", "trl")
LR = 1e-4
BETAS = (0.9, 0.999)
CLIP = 1.0
SED_KNOBS = {"lam": 1.0, "top_k": 10}  # tau: 30% of the first batches' target positions below

# ChatML as the tiny model's template renders it, with TRL's {% generation %} markers around
# what sedsft labels in a ChatML reply (content, <|im_end|> and the newline the template
# writes with it; tests/test_chat_templates.py): the markers add no text, so sedsft's
# tokenisation of the same conversations is unchanged and TRL's mask can equal its labels.
CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="conversations per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per conversation (at most)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument(
        "--warmup-rounds", type=int, default=1, help="unmeasured rounds first (imports, allocator)"
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {SYSTEMS}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--cache-dir", default=".cache/models", help="where the tiny tokenizer is built (once)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--memory",
        choices=["process", "inline"],
        default=None,
        help="peak memory from one run per system in a fresh process (CPU default) or from "
        "the timed runs (CUDA default)",
    )
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: child run
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.memory = args.memory or ("inline" if args.device == "cuda" else "process")
    shape = SHAPES[args.shape]
    args.batch = args.batch or shape["batch"]
    args.seq_len = args.seq_len or shape["seq_len"]
    args.steps = args.steps or shape["steps"]
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (tokens/s is taken over steps 2..S)")
    args.bf16 = args.device == "cuda"  # mixed precision on the GPU, as trainer=gpu does
    return args


# -- the job: tokenizer, model, conversations, batches -------------------------------------------
def build_tokenizer(args):
    from sedsft.models.tiny import TinyLMSpec

    tokenizer = TinyLMSpec(cache_dir=args.cache_dir).load_tokenizer()
    tokenizer.chat_template = CHATML_GENERATION
    return tokenizer


def build_model(args, tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from sedsft.models.tiny import TinyArch

    shape = SHAPES[args.shape]
    family = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = family[shape["family"]]
    sizes = dict(shape["sizes"]) or {
        k: v for k, v in asdict(TinyArch()).items() if k != "vocab_size"
    }
    sizes.setdefault("vocab_size", len(tokenizer))
    sizes.setdefault("tie_word_embeddings", False)
    config = config_cls(
        **sizes,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return model_cls(config).to(args.device).train()


def make_conversations(args, tokenizer) -> list[list[dict]]:
    """``batch * steps`` multi-turn toy-math chats, each grown turn by turn up to
    ``seq_len`` tokens (at least one turn)."""
    from sedsft.data import toy_math

    rows = iter(toy_math.generate(200 * args.batch * args.steps, seed=args.seed + 1))
    conversations = []
    for _ in range(args.batch * args.steps):
        messages: list[dict] = []
        while True:
            row = next(rows)
            turn = [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["response"]},
            ]
            text = tokenizer.apply_chat_template(messages + turn, tokenize=False)
            if (
                messages
                and len(tokenizer(text, add_special_tokens=False)["input_ids"]) > args.seq_len
            ):
                break
            messages += turn
            if len(messages) > 2 * args.seq_len:  # a runaway guard, never reached in practice
                break
        conversations.append(messages)
    return conversations


def sedsft_examples(tokenizer, conversations) -> list[dict]:
    from sedsft.data.chat import tokenize_chat

    return [
        {"input_ids": chat.input_ids, "labels": chat.labels}
        for chat in (tokenize_chat(tokenizer, m) for m in conversations)
    ]


def collate_batches(args, tokenizer, examples) -> list[dict]:
    from sedsft.data.collate import SFTCollator

    collate = SFTCollator(tokenizer.pad_token_id)
    return [collate(examples[i : i + args.batch]) for i in range(0, len(examples), args.batch)]


def sed_tau(args, model, batches) -> float:
    """tau with 30% of the target positions of the first batches below it (the release's
    cumsum_ratio 0.7), from the initial model: calibrated once, outside the timed runs."""
    from sedsft.losses.sed import tau_from_topk_mass, topk_mass

    masses = []
    with torch.no_grad():
        for batch in batches[:4]:
            logits = model(
                input_ids=batch["input_ids"].to(args.device),
                attention_mask=batch["attention_mask"].to(args.device),
            ).logits[:, :-1]
            labels = batch["labels"][:, 1:].to(args.device)
            masses.append(topk_mass(logits, SED_KNOBS["top_k"], labels=labels).cpu())
    return tau_from_topk_mass(torch.cat(masses), 0.7)


# -- one run ---------------------------------------------------------------------------------------
@dataclass
class Record:
    """What a run saw and did: per step, the input ids and target labels (for the check),
    the non-padding tokens, the wall-clock time at its end."""

    input_ids: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    step_end: list[float] = field(default_factory=list)
    start: float = 0.0
    last_loss: torch.Tensor | None = None

    def see(self, batch: dict) -> None:
        mask = batch["attention_mask"].bool().cpu()
        self.input_ids.append(batch["input_ids"].cpu()[mask])
        self.targets.append(batch["labels"][:, 1:].cpu())
        self.tokens.append(int(mask.sum()))


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=0.0)


def run_sedsft(args, loss_name: str, model, batches, tau: float, record: Record) -> float:
    import lightning as L

    from sedsft.losses import build_loss
    from sedsft.models.hf import CausalLMSpec
    from sedsft.sft.module import SFTModule

    knobs = {**SED_KNOBS, "tau": tau} if loss_name == "sed" else {}
    module = SFTModule(
        lm=CausalLMSpec(name_or_path=f"bench-{args.shape}"),
        loss=build_loss(loss_name, **knobs),
        optimizer=adamw,
    )
    module.model = model

    class Stamp(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record.start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record.see(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            record.step_end.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=args.steps,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Stamp()],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    key = "train/loss_terms/ce"
    return float(trainer.callback_metrics[key])


def _hf_callback(record: Record, device: str):
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            record.step_end.append(time.perf_counter())

    return Stamp()


def _hf_common(args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=CLIP,
        optim="adamw_torch",  # torch.optim.AdamW, not fused (HF's default is the fused one)
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        # TRL's SFTConfig turns this on by default; the same job means the same activations.
        gradient_checkpointing=False,
        seed=args.seed,
    )


def recording(trainer_cls: type, record: Record) -> type:
    """A subclass of a ``transformers.Trainer`` class whose ``compute_loss`` shows every
    batch to ``record`` and keeps the last loss."""

    class RecordingTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            record.see(inputs)
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record.last_loss = (loss[0] if return_outputs else loss).detach()
            return loss

    return RecordingTrainer


def run_hf(args, model, tokenizer, examples, record: Record) -> float:
    from transformers import Trainer, TrainingArguments

    from sedsft.data.collate import SFTCollator

    with tempfile.TemporaryDirectory() as out:
        trainer = recording(Trainer, record)(
            model=model,
            args=TrainingArguments(**_hf_common(args, out)),
            train_dataset=examples,
            data_collator=SFTCollator(tokenizer.pad_token_id),
            callbacks=[_hf_callback(record, args.device)],
        )
        trainer.train()
    return float(record.last_loss)


def run_trl(args, model, tokenizer, conversations, record: Record) -> float:
    import datasets
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"messages": m} for m in conversations])
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            **_hf_common(args, out),
            assistant_only_loss=True,
            max_length=None,
            packing=False,
            dataset_num_proc=None,
        )
        trainer = recording(SFTTrainer, record)(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[_hf_callback(record, args.device)],
        )
        trainer.train()
    return float(record.last_loss)


def _release_heap() -> None:
    """Free what earlier runs left, so a run's peak is measured from a clean baseline."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # not glibc: the CPU baseline is then approximate
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_system(args, system: str, base_model, tokenizer, data: dict, steps: int | None) -> dict:
    """One run of ``system`` from the base model's weights; ``steps`` overrides --steps (the
    warm-up rounds run 2)."""
    if steps is not None:
        args = argparse.Namespace(**{**vars(args), "steps": steps})
    model = copy.deepcopy(base_model).train()
    record = Record()
    _release_heap()
    device = torch.device(args.device)
    baseline = reset_peak(device)
    if system.startswith("sedsft-"):
        loss = run_sedsft(
            args, system.removeprefix("sedsft-"), model, data["batches"], data["tau"], record
        )
    elif system == "hf":
        loss = run_hf(args, model, tokenizer, data["examples"], record)
    else:
        loss = run_trl(args, model, tokenizer, data["conversations"], record)
    peak = read_peak(device) - baseline
    if len(record.step_end) != args.steps:
        raise RuntimeError(
            f"{system}: {len(record.step_end)} steps recorded, expected {args.steps}"
        )
    seconds = record.step_end[-1] - record.step_end[0]
    return {
        "tokens_per_s": sum(record.tokens[1:]) / seconds,
        "first_step_s": record.step_end[0] - record.start,
        "peak_bytes": peak,
        "final_loss": loss,
        "record": record,
    }


# -- checks and table ----------------------------------------------------------------------------
def check_same_tokens(records: dict[str, Record]) -> str:
    """Every system fed the same input ids and the same target tokens at every step."""
    names = list(records)
    ref_name, ref = names[0], records[names[0]]
    for name in names[1:]:
        other = records[name]
        if len(other.targets) != len(ref.targets):
            raise AssertionError(
                f"{name} ran {len(other.targets)} steps, {ref_name} {len(ref.targets)}"
            )
        for step, (a, b, ia, ib) in enumerate(
            zip(ref.targets, other.targets, ref.input_ids, other.input_ids, strict=True)
        ):
            if not torch.equal(ia, ib):
                raise AssertionError(f"step {step + 1}: {name} fed other input ids than {ref_name}")
            if a.shape != b.shape or not torch.equal(a, b):
                raise AssertionError(
                    f"step {step + 1}: {name} trained on other targets than {ref_name}"
                )
    targets = sum(int((t != -100).sum()) for t in ref.targets)
    tokens = sum(ref.tokens)
    return (
        f"token check: {len(names)} systems fed identical input ids ({tokens} tokens) and "
        f"identical targets ({targets} target tokens) at each of {len(ref.targets)} steps"
    )


def format_table(args, results: dict[str, list[dict]]) -> str:
    gib = 2**20
    peers = [p for p in ("hf", "trl") if p in results]
    header = ["system", "tokens/s"] + [f"/{p}" for p in peers] + ["peak MiB"]
    header += [f"/{p}" for p in peers] + ["first step s", "final loss"]
    rows = []
    for system, runs in results.items():
        row = [system, f"{statistics.median(r['tokens_per_s'] for r in runs):.0f}"]
        for peer in peers:  # per-round ratios (same round = same load), then the median
            ratios = [
                r["tokens_per_s"] / q["tokens_per_s"]
                for r, q in zip(runs, results[peer], strict=True)
            ]
            row.append(f"{statistics.median(ratios):.2f}")
        row.append(f"{statistics.median(r['peak_bytes'] for r in runs) / gib:.1f}")
        for peer in peers:
            ratios = [
                r["peak_bytes"] / max(q["peak_bytes"], 1)
                for r, q in zip(runs, results[peer], strict=True)
            ]
            row.append(f"{statistics.median(ratios):.2f}")
        row.append(f"{statistics.median(r['first_step_s'] for r in runs):.2f}")
        row.append(f"{runs[0]['final_loss']:.5f}")
        rows.append(row)
    return text_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print the table; returns the per-system results."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    levels = {}
    for name in ("lightning", "lightning.pytorch", "transformers", "trl", "accelerate"):
        levels[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _compare(args)
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def import_trainers() -> None:
    """Import the three stacks up front, so no run's peak holds another's module imports."""
    import datasets  # noqa: F401
    import lightning  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from sedsft.sft.module import SFTModule  # noqa: F401


# On the CPU the peak resident set only follows the tensors when large blocks go back to the
# OS as soon as they are freed; glibc's adaptive mmap threshold would otherwise keep them in
# its heap, and the peak would depend on what ran before. Set for the memory processes only
# (it adds page faults, so the timed runs keep the default allocator).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def memory_in_process(args, system: str) -> int:
    """Peak bytes of one run of ``system`` (3 steps: optimiser states exist from step 1) in
    a fresh process with ``MEMORY_ENV``."""
    argv, skip = [], False
    for a in args.argv:  # everything but --memory (value separate or with "=")
        if skip or a.startswith("--memory"):
            skip = a == "--memory"
            continue
        argv.append(a)
    cmd = [sys.executable, __file__, *argv, "--memory-of", system]
    env = {**os.environ, **MEMORY_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {system} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def prepare(args) -> tuple:
    tokenizer = build_tokenizer(args)
    base_model = build_model(args, tokenizer)
    conversations = make_conversations(args, tokenizer)
    examples = sedsft_examples(tokenizer, conversations)
    batches = collate_batches(args, tokenizer, examples)
    data = {"conversations": conversations, "examples": examples, "batches": batches}
    data["tau"] = sed_tau(args, base_model, batches) if "sedsft-sed" in args.systems else None
    return tokenizer, base_model, data


def _compare(args) -> dict:
    load_before = os.getloadavg()
    import_trainers()
    tokenizer, base_model, data = prepare(args)
    if args.memory_of:
        with contextlib.redirect_stdout(io.StringIO()):
            run = run_system(args, args.memory_of, base_model, tokenizer, data, min(args.steps, 3))
        print(json.dumps({"peak_bytes": run["peak_bytes"]}))
        return {}

    results: dict[str, list[dict]] = {s: [] for s in args.systems}
    for round_ in range(args.warmup_rounds + args.rounds):
        warmup = round_ < args.warmup_rounds
        for system in args.systems:
            with contextlib.redirect_stdout(io.StringIO()):  # trainers' banners and tips
                result = run_system(
                    args, system, base_model, tokenizer, data, 2 if warmup else None
                )
            if not warmup:
                results[system].append(result)
    if args.memory == "process":
        for system, runs in results.items():
            peak = memory_in_process(args, system)
            for run in runs:
                run["peak_bytes"] = peak
    check = check_same_tokens({s: runs[0]["record"] for s, runs in results.items()})
    ce_like = {s: results[s][0]["final_loss"] for s in ("sedsft-ce", "hf", "trl") if s in results}
    if len(ce_like) > 1:
        spread = max(ce_like.values()) - min(ce_like.values())
        if spread > 1e-3 * max(abs(v) for v in ce_like.values()):
            raise AssertionError(f"final CE differs between systems: {ce_like}")

    params = sum(p.numel() for p in base_model.parameters())
    config = base_model.config
    print(
        f"vs_peers: shape {args.shape} ({params / 1e6:.1f}M parameters, hidden "
        f"{config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}); "
        f"batch {args.batch} conversations of <= {args.seq_len} tokens; {args.steps} steps "
        f"(tokens/s over steps 2..{args.steps}); {args.rounds} interleaved rounds after "
        f"{args.warmup_rounds} warm-up, medians"
    )
    print(
        f"device {args.device}, {'bf16 autocast' if args.bf16 else 'float32'}, torch threads "
        f"{args.threads}, AdamW (not fused) lr {LR}, clip {CLIP}; "
        f"load avg {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    if args.memory == "process":
        print(
            "peak memory: one 3-step run per system in a fresh process, large blocks "
            "unmapped on free (MALLOC_MMAP_THRESHOLD_=65536)"
        )
    print(format_table(args, results))
    print(check)
    if len(ce_like) > 1:
        print(f"final CE agrees across {', '.join(ce_like)} (spread {spread:.2e})")
    return results


if __name__ == "__main__":
    main()
