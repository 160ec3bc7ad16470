"""Name -> loss class, and ``build_loss`` with knob validation."""

from __future__ import annotations

import inspect

from sedsft.losses.base import TokenLoss
from sedsft.losses.ce import CELoss
from sedsft.losses.dft import DFTLoss
from sedsft.losses.entropy import EntropyLoss
from sedsft.losses.gem import GEMLoss
from sedsft.losses.sed import SEDLoss, SEDNoMaskLoss

LOSSES: dict[str, type[TokenLoss]] = {
    cls.name: cls for cls in (CELoss, SEDLoss, SEDNoMaskLoss, GEMLoss, DFTLoss, EntropyLoss)
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def loss_knobs(name: str) -> tuple[str, ...]:
    """Keyword arguments accepted by loss ``name``."""
    params = inspect.signature(LOSSES[name].__init__).parameters
    return tuple(p for p in params if p != "self")


def build_loss(name: str, **knobs) -> TokenLoss:
    """``build_loss("sed", lam=1.0, top_k=10, tau=0.9)``; raises ``ValueError`` naming
    the allowed choices for an unknown loss, an unknown knob or an out-of-range value."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")
    allowed = loss_knobs(name)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; allowed: {list(allowed)}")
    return LOSSES[name](**knobs)
