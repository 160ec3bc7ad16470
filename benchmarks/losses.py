"""Time and peak memory of the token losses: naive dense vs chunked logits vs fused head.

For each loss and path this measures forward + backward time (median of ``--repeats``
interleaved rounds) and the peak memory above what the inputs already hold:

- ``dense``: the loss's own ``value`` formula on the full ``[N, V]`` float32 logits with
  autograd, as the authors' release computes its loss (a new loss is benchmarked as is);
- ``chunked``: ``loss_fn(logits, labels)`` (sedsft engine, gradient computed per chunk);
- ``fused_dense``: ``hidden @ W.T`` to full logits, then the dense formula;
- ``fused``: ``loss_fn.fused(hidden, W, labels)``, never holding ``N x V``.

Memory is measured on the first call of each (loss, path) cell in its own fresh
subprocess, so allocator caches never hide or leak allocations: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the peak RSS (``VmHWM`` after writing 5
to ``/proc/self/clear_refs``) minus the RSS at reset, inputs allocated before, with glibc
told to unmap every block of 64 KiB or more when it is freed (``MEMORY_ENV``), so that the
resident set follows the live tensors instead of what the heap kept. Time is
measured per path in one subprocess (``--threads`` torch threads, 1 by default) that runs
the losses round-robin, so load changes on a shared machine hit every loss alike; each
round gives a ratio to CE of the same round, and the table shows the medians of those
ratios, in wall time and in CPU time of the process (which leaves out waiting for a core).
The load average is printed with the table.

    PYTHONPATH=src python benchmarks/losses.py --n 2048 --v 32000 --paths chunked,fused \
        --losses ce,sed,gem,exp_pass --d 256 --repeats 9 --no-memory

``exp_pass`` is not a loss but a floor: one ``torch.exp`` of every logit, what a softmax at a
second temperature (GEM) adds to CE at the very least on the logits path.
    PYTHONPATH=src python benchmarks/losses.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from measure import read_peak, reset_peak, timed_cpu

from sedsft.losses import LOSS_NAMES, build_loss
from sedsft.losses.sed import topk_mass

PATHS = ("dense", "chunked", "fused_dense", "fused")
# Benchmark names -> (loss name, knobs); every registered loss is also available under its
# own name with its defaults. SED gets its tau from calibration on the inputs.
LOSS_SPECS = {
    "ce": ("ce", {}),
    "sed": ("sed", {"lam": 1.0, "top_k": 10}),
    "sed_nomask": ("sed_nomask", {"lam": 1.0}),
    "gem": ("gem", {"beta": 0.7, "h": "linear"}),
    "gem_logsigmoid": ("gem", {"beta": 0.7, "h": "logsigmoid"}),
    "dft": ("dft", {}),
    "entropy": ("entropy", {"lam": 0.1}),
}
IGNORE = -100
# Not a loss: one exponential of every logit, written to a preallocated buffer. Any loss
# that needs a softmax at a second temperature (GEM's q = softmax(z / beta)) pays at least
# this on top of CE on the logits path, so ``1 + exp_pass/ce`` is the floor of its ratio.
FLOOR = "exp_pass"


def loss_spec(bench_name: str) -> tuple[str, dict]:
    if bench_name in LOSS_SPECS:
        return LOSS_SPECS[bench_name]
    return bench_name, {}


# -- naive dense formulas -----------------------------------------------------------------------
def dense_loss(name: str, knobs: dict, logits: torch.Tensor, labels: torch.Tensor):
    """Mean loss over target tokens from the loss's ``value`` on the full float32 logits
    [N, V] with autograd (every row, ignored ones masked out afterwards, as a dense
    implementation does)."""
    keep = labels != IGNORE
    per = build_loss(name, **knobs).value(logits.float(), labels.clamp(min=0))
    per = per[0] if isinstance(per, tuple) else per
    return (per * keep).sum() / keep.sum().clamp(min=1)


# -- one cell ---------------------------------------------------------------------------------------
def make_inputs(args, path: str, device: torch.device, dtype: torch.dtype):
    """Random inputs; rows are tiled from 256 random rows (generating 500M normals on the
    CPU would take longer than the benchmark)."""
    g = torch.Generator().manual_seed(args.seed)
    reps = -(-args.n // 256)
    labels = torch.randint(0, args.v, (args.n,), generator=g)
    labels[torch.rand(args.n, generator=g) < args.ignore_frac] = IGNORE
    labels = labels.to(device)
    if path in ("dense", "chunked"):
        base = (torch.randn(256, args.v, generator=g) * args.scale).to(device, dtype)
        logits = base.repeat(reps, 1)[: args.n].contiguous().requires_grad_()
        return {"logits": logits}, labels
    base = torch.randn(256, args.d, generator=g).to(device, dtype)
    hidden = base.repeat(reps, 1)[: args.n].contiguous().requires_grad_()
    weight = (torch.randn(args.v, args.d, generator=g) * args.scale / args.d**0.5).to(device, dtype)
    return {"hidden": hidden, "weight": weight.requires_grad_()}, labels


def make_step(args, bench_name: str, path: str, inputs: dict, labels: torch.Tensor):
    """A closure running one forward + backward of ``bench_name`` on ``path``."""
    device = torch.device(args.device)
    if bench_name == FLOOR:
        if "logits" not in inputs:
            raise ValueError(f"{FLOOR} is measured on the logits paths (dense, chunked) only")
        x = inputs["logits"].detach()
        out = torch.empty_like(x, dtype=torch.float32)
        return lambda: float(torch.exp(x, out=out)[0, 0])
    name, knobs = loss_spec(bench_name)
    knobs = dict(knobs)
    if getattr(build_loss(name, **knobs), "needs_calibration", False):
        # tau from the inputs themselves, so about 30% of tokens are regularised.
        with torch.no_grad():
            sample = inputs.get("logits")
            if sample is None:
                sample = inputs["hidden"][:256] @ inputs["weight"].T
            knobs["tau"] = float(topk_mass(sample[:256], knobs.get("top_k", 10)).quantile(0.3))
    loss_fn = build_loss(name, chunk_size=args.chunk_size, **knobs).to(device)

    def step() -> float:
        if path == "dense":
            loss = dense_loss(name, knobs, inputs["logits"], labels)
        elif path == "chunked":
            loss = loss_fn(inputs["logits"], labels).loss
        elif path == "fused_dense":
            loss = dense_loss(name, knobs, inputs["hidden"] @ inputs["weight"].T, labels)
        else:
            loss = loss_fn.fused(inputs["hidden"], inputs["weight"], labels).loss
        loss.backward()
        value = float(loss.detach())
        for t in inputs.values():
            t.grad = None
        return value

    return step


def memory_cell(args, bench_name: str, path: str) -> dict:
    """Peak extra memory of the first fwd+bwd in a fresh process (nothing cached yet)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs, labels = make_inputs(args, path, device, dtype)
    step = make_step(args, bench_name, path, inputs, labels)
    gc.collect()
    baseline = reset_peak(device)
    t0 = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t0
    return {"peak_bytes": read_peak(device) - baseline, "first_s": seconds, "loss": value}


def timing_path(args, names: list[str], path: str) -> dict:
    """Times of every loss on one path, interleaved round-robin over ``--repeats`` rounds,
    so a load change on a shared machine hits all losses alike. Returns, per loss, the
    median wall and CPU seconds and the medians over rounds of the ratio to CE's time in
    the same round."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs, labels = make_inputs(args, path, device, dtype)
    steps = {name: make_step(args, name, path, inputs, labels) for name in names}
    for step in steps.values():  # warm-up
        step()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, step in steps.items():
            gc.collect()
            w, c = timed_cpu(step, device)
            wall[name].append(w)
            cpu[name].append(c)
    med = statistics.median
    return {
        name: {
            "time_s": med(wall[name]),
            "cpu_s": med(cpu[name]),
            "time_vs_ce": med(w / r for w, r in zip(wall[name], wall["ce"], strict=True)),
            "cpu_vs_ce": med(c / r for c, r in zip(cpu[name], cpu["ce"], strict=True)),
        }
        for name in names
    }


# -- driver -----------------------------------------------------------------------------------------
# For the memory cells only: large blocks go back to the OS when freed (see the docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def in_subprocess(args, *flag: str) -> dict:
    cmd = [sys.executable, __file__, *flag, *args.forward_argv]
    env = {**os.environ, **MEMORY_ENV} if "--memory-cell" in flag else None
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(cell: dict, other: dict, key: str) -> str:
    return f"{cell[key] / other[key]:.2f}" if other.get(key) else "-"


def print_table(args, results: dict, paths: list[str], names: list[str], load: tuple) -> None:
    gib = 1024**3
    print(
        f"\nN={args.n} V={args.v} D={args.d} dtype={args.dtype} device={args.device} "
        f"threads={args.threads} repeats={args.repeats} ignore_frac={args.ignore_frac} "
        f"chunk_size={args.chunk_size}"
    )
    print(
        f"load average {load[0][0]:.2f} {load[0][1]:.2f} {load[0][2]:.2f} before, "
        f"{load[1][0]:.2f} {load[1][1]:.2f} {load[1][2]:.2f} after"
    )
    print("time, cpu = median fwd+bwd wall / process-CPU seconds over interleaved rounds;")
    print("/ce = median over rounds of the ratio to CE in the same round, same path;")
    print("mem = peak extra GiB (first call, fresh process); /dense = vs the naive dense")
    print("formula of the same loss (chunked vs dense, fused vs fused_dense)\n")
    w = max(15, *(len(n) + 2 for n in names))
    header = (
        f"{'loss':<{w}}{'path':<12}{'time':>8}{'/ce':>6}{'cpu':>8}{'/ce':>6}{'/dense':>8}"
        f"{'mem':>8}{'/ce':>6}{'/dense':>8}"
    )
    print(header)
    print("-" * len(header))
    ref_path = {"chunked": "dense", "fused": "fused_dense"}
    for name in names:
        for path in paths:
            r = results[name][path]
            if "error" in r:
                print(f"{name:<{w}}{path:<12}  error: {r['error']}")
                continue
            ce = results.get("ce", {}).get(path, {})
            dense = results[name].get(ref_path.get(path, ""), {})
            line = f"{name:<{w}}{path:<12}"
            if "time_s" in r:
                line += (
                    f"{r['time_s']:>8.3f}{r['time_vs_ce']:>6.2f}{r['cpu_s']:>8.3f}"
                    f"{r['cpu_vs_ce']:>6.2f}{_ratio(r, dense, 'time_s'):>8}"
                )
            else:
                line += f"{'-':>8}{'-':>6}{'-':>8}{'-':>6}{'-':>8}"
            if "peak_bytes" in r:
                line += (
                    f"{r['peak_bytes'] / gib:>8.3f}{_ratio(r, ce, 'peak_bytes'):>6}"
                    f"{_ratio(r, dense, 'peak_bytes'):>8}"
                )
            else:
                line += f"{'-':>8}{'-':>6}{'-':>8}"
            print(line)
        print()


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="token rows")
    parser.add_argument("--v", type=int, default=128256, help="vocabulary size")
    parser.add_argument("--d", type=int, default=4096, help="hidden size (fused paths)")
    parser.add_argument(
        "--losses", default=",".join(LOSS_SPECS), help="comma-separated; any registered loss"
    )
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {PATHS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    parser.add_argument("--no-memory", action="store_true", help="time only (no memory cells)")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="share of -100 labels")
    parser.add_argument("--scale", type=float, default=2.0, help="std of the logits")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: what one subprocess measures.
    parser.add_argument("--memory-cell", nargs=2, metavar=("LOSS", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--time-path", nargs=2, metavar=("LOSSES", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forward_argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_cell:
        print(json.dumps(memory_cell(args, *args.memory_cell)))
        return {}
    if args.time_path:
        print(json.dumps(timing_path(args, args.time_path[0].split(","), args.time_path[1])))
        return {}
    names = [s for s in args.losses.split(",") if s]
    paths = [s for s in args.paths.split(",") if s]
    known = set(LOSS_SPECS) | set(LOSS_NAMES) | {FLOOR}
    unknown = [s for s in names if s not in known] + [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(
            f"unknown losses/paths {unknown}; losses: {sorted(known)}, paths: {list(PATHS)}"
        )
    if "ce" not in names:
        names.insert(0, "ce")
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    for path in paths:
        here = [n for n in names if n != FLOOR or path in ("dense", "chunked")]
        for name in names:
            results[name][path] = {} if name in here else {"error": "logits paths only"}
        for name in here:
            if args.no_memory:
                continue
            results[name][path] = r = in_subprocess(args, "--memory-cell", name, path)
            shown = r.get("error") or f"{r['peak_bytes'] / 1024**3:.3f} GiB"
            print(f"  memory {name:<15}{path:<12}{shown}", file=sys.stderr, flush=True)
        if args.no_time:
            continue
        times = in_subprocess(args, "--time-path", ",".join(here), path)
        for name in here:
            cell = results[name][path]
            if "error" in times:
                cell.setdefault("error", times["error"])
            elif "error" not in cell:
                cell.update(times[name])
        print(f"  time   {path}: {times}", file=sys.stderr, flush=True)
    print_table(args, results, paths, names, (load_before, os.getloadavg()))
    return results


if __name__ == "__main__":
    main()
