"""Training-step throughput and peak memory: CE vs SED vs GEM, logits vs fused loss path.

A whole optimiser step (forward, loss, backward, AdamW) of a randomly initialised model
with the shape of Qwen2.5-0.5B or Llama-3.2-1B (built from a config: nothing downloaded),
through ``SFTModule.model_step``, the code path training uses. Each (loss, path) cell
runs in its own subprocess so allocator state never leaks between cells; the table gives
tokens/s, ms per step, peak memory, and ratios against CE on the same path and against
the logits path of the same loss.

Memory: ``peak`` is ``torch.cuda.max_memory_allocated`` on CUDA, the peak RSS on the CPU
(``VmHWM`` after writing 5 to ``/proc/self/clear_refs``); ``step`` is the peak minus what
was resident before the timed steps (weights and AdamW states): the
activations, logits and loss buffers of a step, where the losses and paths differ.

    PYTHONPATH=src python benchmarks/train_throughput.py --shape qwen2.5-0.5b    # GPU, seq 2048
    PYTHONPATH=src python benchmarks/train_throughput.py --shape llama3.2-1b
    PYTHONPATH=src python benchmarks/train_throughput.py --device cpu --layers 2 --seq-len 256 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys

import torch
from measure import read_peak, reset_peak, text_table, timed
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sedsft.losses import build_loss
from sedsft.models.hf import CausalLMSpec
from sedsft.sft.module import SFTModule

SHAPES = {  # the published configs' sizes (rope scaling and the like left out: no effect on cost)
    "qwen2.5-0.5b": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True, max_position_embeddings=32768),
    ),
    "llama3.2-1b": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=5e5,
             rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072),
    ),
}
LOSSES = {"ce": {}, "sed": {"lam": 1.0, "top_k": 10, "tau": 0.5}, "gem": {"beta": 0.7, "h": "linear"}}
PATHS = ("logits", "fused")
PROMPT_FRACTION = 0.1  # leading positions labelled -100, as the prompt of an SFT example


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, kernels)")
    p.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=list(LOSSES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                   help="default: bf16-mixed on CUDA (as trainer=gpu), 32-true on the CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one "loss:path"
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device.startswith("cuda") else "32-true")
    return args


# -- one cell ---------------------------------------------------------------------------------------
def build_module(args, loss_name: str, path: str, device: torch.device) -> SFTModule:
    model_cls, config_cls, sizes = SHAPES[args.shape]
    sizes = {**sizes, **({"num_hidden_layers": args.layers} if args.layers else {})}
    sizes = {**sizes, **({"vocab_size": args.vocab} if args.vocab else {})}
    config = config_cls(**sizes, attn_implementation=args.attn, use_cache=False)
    torch.manual_seed(0)
    with device:
        model = model_cls(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = SFTModule(
        lm=CausalLMSpec(name_or_path=f"random-{args.shape}"),
        loss=build_loss(loss_name, **LOSSES[loss_name]),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, betas=(0.9, 0.95)),
        fused_loss="true" if path == "fused" else "false",
    )
    module.model = model.train()
    return module.to(device)


def run_cell(args, loss_name: str, path: str) -> dict:
    device = torch.device(args.device)
    module = build_module(args, loss_name, path, device)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    vocab = module.model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : int(PROMPT_FRACTION * args.seq_len)] = -100
    batch = {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
    }
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            out = module.model_step(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    resident = reset_peak(device)
    seconds = statistics.median(timed(step, device) for _ in range(args.steps))
    return {
        "loss": loss_name,
        "path": path,
        "tokens_per_s": args.batch * args.seq_len / seconds,
        "ms_per_step": 1000 * seconds,
        "peak_bytes": (peak := read_peak(device)),
        "step_bytes": peak - resident,
    }


# -- driver -----------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    by_key = {(r["loss"], r["path"]): r for r in results}
    header = ["loss", "path", "tokens/s", "ms/step", "peak GiB", "step GiB", "time/ce", "step mem/ce", "time/logits", "step mem/logits"]
    rows = []
    for r in results:
        ce = by_key.get(("ce", r["path"]))
        logits = by_key.get((r["loss"], "logits"))

        def ratio(ref: dict | None, key: str, r=r) -> str:
            return f"{r[key] / ref[key]:.2f}" if ref else "-"

        rows.append([
            r["loss"], r["path"], f"{r['tokens_per_s']:.0f}", f"{r['ms_per_step']:.1f}",
            f"{r['peak_bytes'] / 2**30:.2f}", f"{r['step_bytes'] / 2**30:.2f}",
            ratio(ce, "ms_per_step"), ratio(ce, "step_bytes"),
            ratio(logits, "ms_per_step"), ratio(logits, "step_bytes"),
        ])
    return text_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cell:
        loss_name, path = args.cell.split(":")
        print(json.dumps(run_cell(args, loss_name, path)))
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for loss_name in args.losses:
        for path in PATHS:
            cmd = [sys.executable, __file__, *passthrough, "--cell", f"{loss_name}:{path}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"cell {loss_name}:{path} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    layers = args.layers or SHAPES[args.shape][2]["num_hidden_layers"]
    print(
        f"{args.shape} ({layers} layers, vocab {args.vocab or SHAPES[args.shape][2]['vocab_size']}), "
        f"batch {args.batch} x seq {args.seq_len}, {args.precision}, device {args.device}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
