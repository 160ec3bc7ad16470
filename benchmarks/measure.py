"""Measurements shared by the benchmark scripts: wall time of one call and peak memory.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the
CPU: the process's peak resident set (``VmHWM``), reset by writing 5 to
``/proc/self/clear_refs`` (Linux), so a measurement covers only what follows the reset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device) -> int:
    """Start a new peak; returns the memory in use now in bytes (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def read_peak(device: torch.device) -> int:
    """The peak in bytes since the last ``reset_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with CUDA work finished before the clock starts and stops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``fn()``. On a shared machine the
    CPU time (user + system, page faults included) leaves out the time spent waiting for a
    core, so ratios of it are steadier than wall-time ratios."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """``header`` and ``rows`` as a plain-text table with ``|`` between left-aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
