"""Token-level SFT losses (CE, SED-SFT and baselines) on a chunked, memory-bounded engine.

``build_loss(name, **knobs)`` returns a ``torch.nn.Module``; call it on aligned
``(logits, labels)`` or use ``.fused(hidden, lm_head_weight, labels)``; both return a
``LossOutput``. Every ``TokenLoss`` subclass in a module of this package is registered
under its ``name`` (``base.py`` states the contract; README "Add a loss").
"""

from sedsft import IGNORE_INDEX
from sedsft.losses.base import LossOutput, TokenLoss
from sedsft.losses.ce import CELoss
from sedsft.losses.dft import DFTLoss
from sedsft.losses.entropy import EntropyLoss
from sedsft.losses.gem import GEMLoss
from sedsft.losses.registry import LOSS_NAMES, LOSSES, build_loss, loss_knobs
from sedsft.losses.sed import SEDLoss, SEDNoMaskLoss, calibrate_tau, tau_from_topk_mass, topk_mass

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "LOSS_NAMES",
    "CELoss",
    "DFTLoss",
    "EntropyLoss",
    "GEMLoss",
    "LossOutput",
    "SEDLoss",
    "SEDNoMaskLoss",
    "TokenLoss",
    "build_loss",
    "calibrate_tau",
    "loss_knobs",
    "tau_from_topk_mass",
    "topk_mass",
]
