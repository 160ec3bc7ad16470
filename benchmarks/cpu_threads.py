"""CPU threads next to a competing process: why ``cpu_threads: auto`` is 1 on 2 cores.

Two workloads of the embedded tiny model, the loops of CPU runs: an SFT optimiser step
(forward, CE, backward, AdamW on 16 rows x 96 tokens) and GRPO-style sampling (8 toy
prompts x 4 completions x 32 new tokens with ``generate``). Each is timed with torch at 1
thread and at torch's default (one per core), with the other cores idle and with one
busy process (a pure-Python spin loop: another job, a data worker, a second agent) next
to it. The conditions are interleaved round by round in one process, so background load
changes hit all cells alike; the load average is printed before and after.

    PYTHONPATH=src python benchmarks/cpu_threads.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from sedsft.data import toy_math
from sedsft.evaluation.sampling import SamplingSettings, sample_completions
from sedsft.models.tiny import TinyLMSpec
from sedsft.utils.threads import resolve_cpu_threads, usable_cores


def sft_step(model, optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up at this thread count
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every cell")
    parser.add_argument("--steps", type=int, default=5, help="timed SFT steps per cell and round")
    parser.add_argument("--cache-dir", default=".cache/models", help="where the tiny model is (built if absent)")
    args = parser.parse_args()

    cores = usable_cores()
    default_threads = torch.get_num_threads() if "OMP_NUM_THREADS" not in os.environ else cores
    thread_counts = sorted({1, default_threads, resolve_cpu_threads("auto", cores)})
    spec = TinyLMSpec(cache_dir=args.cache_dir, pretrain_steps=300)
    tokenizer = spec.load_tokenizer()
    model = spec.load_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(3, model.config.vocab_size, (16, 96), generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": row["question"]}] for row in toy_math.generate(8, seed=1)]
    settings = SamplingSettings(num_samples=4, max_new_tokens=32, batch_size=8, seed=0)

    def sample() -> None:
        model.eval()
        sample_completions(model, tokenizer, prompts, settings)
        model.train()

    workloads = {
        "sft step": (lambda: sft_step(model, optimizer, batch), args.steps),
        "sampling": (sample, 1),
    }
    results: dict[tuple[str, str, int], list[float]] = {}
    print(f"cores {cores}; torch default threads {default_threads}; cpu_threads=auto -> {resolve_cpu_threads('auto', cores)}")
    print(f"load average before: {os.getloadavg()}")
    for round_ in range(args.rounds):
        for condition in ("idle", "1 busy process"):
            spinner = None
            if condition != "idle":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for name, (fn, repeats) in workloads.items():
                        seconds = median_seconds(fn, repeats)
                        results.setdefault((name, condition, threads), []).append(seconds)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print()
    print(f"median over {args.rounds} rounds; ms per SFT step / per sampling call; x = vs 1 thread idle")
    print(f"{'workload':<10} {'condition':<15} {'threads':>7} {'ms':>9} {'x':>7}")
    for name in workloads:
        base = statistics.median(results[(name, "idle", 1)])
        for condition in ("idle", "1 busy process"):
            for threads in thread_counts:
                ms = statistics.median(results[(name, condition, threads)])
                print(f"{name:<10} {condition:<15} {threads:>7} {1000 * ms:>9.1f} {ms / base:>7.2f}")


if __name__ == "__main__":
    main()
