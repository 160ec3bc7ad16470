"""Name -> loss class, and ``build_loss`` with knob validation.

Loss classes register themselves when defined (``TokenLoss.__init_subclass__``); importing
this module first imports every module of the ``sedsft.losses`` package, so a loss is
known as soon as its file exists: no list to edit here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from sedsft.losses.base import REGISTRY, TokenLoss


def _import_all() -> None:
    """Import every module under ``sedsft/losses/`` (sub-packages too), so that each loss
    file's classes run their registration. The folder is found from this file, not by
    importing the package, which imports this module."""
    for info in pkgutil.walk_packages([str(Path(__file__).parent)], prefix=f"{__package__}."):
        if info.name != __name__:
            importlib.import_module(info.name)


_import_all()
LOSSES: dict[str, type[TokenLoss]] = REGISTRY  # live: classes defined later join it too
LOSS_NAMES: tuple[str, ...] = tuple(sorted(REGISTRY))  # every loss of the package


def loss_knobs(name: str) -> tuple[str, ...]:
    """Keyword arguments accepted by loss ``name``."""
    params = inspect.signature(LOSSES[name].__init__).parameters
    return tuple(p for p in params if p != "self")


def build_loss(name: str, **knobs) -> TokenLoss:
    """``build_loss("sed", lam=1.0, top_k=10, tau=0.9)``; raises ``ValueError`` naming
    the allowed choices for an unknown loss, an unknown knob or an out-of-range value."""
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}; choose one of {sorted(LOSSES)} "
            "(a loss is a TokenLoss subclass with that `name` in a file under sedsft/losses/)"
        )
    allowed = loss_knobs(name)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; allowed: {list(allowed)}")
    return LOSSES[name](**knobs)
