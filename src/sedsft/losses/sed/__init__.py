"""SED-SFT: the loss (``loss.py``) and the calibration of its threshold (``calibration.py``)."""

from sedsft.losses.sed.calibration import calibrate_tau, tau_from_topk_mass, topk_mass
from sedsft.losses.sed.loss import SEDLoss, SEDNoMaskLoss

__all__ = ["SEDLoss", "SEDNoMaskLoss", "calibrate_tau", "tau_from_topk_mass", "topk_mass"]
