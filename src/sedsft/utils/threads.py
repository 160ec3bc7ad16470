"""How many threads torch uses for CPU work (``cpu_threads`` in the stage configs).

torch's default is one intra-op thread per core. Its OpenMP workers spin-wait for each
other at the end of every parallel operator, so when another process holds one of the
cores, every small operator waits for a descheduled thread: on a shared 2-core machine the
tiny model's training and sampling loops ran many times slower with torch's default than
with one thread (docs/performance.md, "CPU threads"). ``auto`` therefore leaves room: half the cores
this process may run on, at least 1, at most ``AUTO_MAX`` (more threads stop paying off
for the matrix sizes CPU runs use and only add to the waiting).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

AUTO_MAX = 8  # upper bound of cpu_threads=auto


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM or cgroup allotment)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_cpu_threads(setting: int | str | None, cores: int | None = None) -> int | None:
    """The thread count ``setting`` asks for: ``auto`` = ``min(AUTO_MAX, cores // 2)``, at
    least 1; an integer >= 1 as given; None = leave torch's default.

    Raises:
        ValueError: naming the knob and the allowed values.
    """
    if setting is None:
        return None
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        cores = usable_cores() if cores is None else cores
        return max(1, min(AUTO_MAX, cores // 2))
    try:
        threads = int(setting)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or str(setting).strip() != str(threads):
        raise ValueError(
            f"cpu_threads={setting!r}; allowed: auto, null (torch's default) or an integer >= 1"
        )
    return threads


def set_cpu_threads(setting: int | str | None, on_cpu: bool = True) -> int:
    """Apply ``cpu_threads`` when the run computes on the CPU; returns the count in use.

    GPU runs keep torch's default (the CPU then only feeds the device). An explicit
    ``OMP_NUM_THREADS`` in the environment wins over ``auto``, so a job script or test
    harness that pins threads keeps its choice.
    """
    threads = resolve_cpu_threads(setting)
    if threads is None or not on_cpu:
        return torch.get_num_threads()
    if setting == "auto" and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.debug("torch uses %d CPU threads (cpu_threads=%s)", threads, setting)
    return threads
