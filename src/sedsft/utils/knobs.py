"""Knob checks every stage runs before anything is built: a number checked by name against its
bounds, and how many processes per node a Lightning trainer config starts."""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MISSING = object()


def is_number(value: Any, kind: type) -> bool:
    """``value`` is a finite number of ``kind`` (``int``: an integer; ``float``: any number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int:
        return isinstance(value, int)
    return math.isfinite(value)


def check_knob(cfg: DictConfig, key: str, kind: type, low: Any, high: Any, nullable: bool, what: str) -> str | None:
    """The problem with knob ``key`` of ``cfg`` (``"grpo.epsilon=-0.1 must be >= 0 (...)"``), or
    None when it is unset, null where allowed, or inside its bounds. A bound written as
    ``("open", x)`` excludes ``x``."""
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING or (value is None and nullable):
        return None
    shown = f"{key}={value!r}"
    if not is_number(value, kind):
        noun = "an integer" if kind is int else "a number"
        return f"{shown} must be {noun} ({what})"
    for bound, below in ((low, True), (high, False)):
        if bound is None:
            continue
        is_open = isinstance(bound, tuple)
        limit = bound[1] if is_open else bound
        bad = (value <= limit if is_open else value < limit) if below else (value >= limit if is_open else value > limit)
        if bad:
            relation = (">" if is_open else ">=") if below else ("<" if is_open else "<=")
            return f"{shown} must be {relation} {limit} ({what})"
    return None


def device_count(cfg: DictConfig) -> int | None:
    """Processes per node the trainer will start, by Lightning's rules for ``devices``
    (None when it cannot be told from the config alone)."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda_count())
    if devices in ("auto", -1):
        return 1 if on_cpu and devices == "auto" else (os.cpu_count() if on_cpu else cuda_count())
    return devices if isinstance(devices, int) else None


def cuda_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
