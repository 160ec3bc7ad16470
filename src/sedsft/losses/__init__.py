"""Token-level SFT losses (CE, SED-SFT and baselines) on a chunked, memory-bounded engine.

``build_loss(name, **knobs)`` returns a ``TokenLoss`` (a ``torch.nn.Module``); call it on
aligned ``(logits, labels)`` or use ``.fused(hidden, lm_head_weight, labels)``; both return
a ``LossOutput``. ``base.py`` states the contract, ``engine.py`` runs it.

What is registered has one source: every ``TokenLoss`` subclass with a ``name`` in a module
of this package registers itself, and ``registry.py`` imports every such module; nothing
here lists the losses. A loss class is ``LOSSES[name]`` (or its own module's), and what it
provides is read off the class: ``has_analytic_gradient()``, ``needs_preparation``,
``extra_metrics``, its knobs (``loss_knobs``). docs/losses.md: Add a loss.
"""

from sedsft import IGNORE_INDEX
from sedsft.losses.base import LossOutput, Preparation, TokenLoss
from sedsft.losses.registry import LOSS_NAMES, LOSSES, build_loss, loss_knobs

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "LOSS_NAMES",
    "LossOutput",
    "Preparation",
    "TokenLoss",
    "build_loss",
    "loss_knobs",
]
