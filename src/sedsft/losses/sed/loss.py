"""SED-SFT: Chen, Liu, Meng, "SED-SFT: Selectively Encouraging Diversity in Supervised
Fine-Tuning", ACL 2026 (arXiv 2602.07464).

Per target token ``-log p_y + lam * m * (p_y - 1/2)^2`` with the mask
``m = 1[c_k < tau]``, ``c_k`` the sum of the k largest probabilities (no gradient through
``m``). The regulariser only acts where the model spreads its mass (a large exploration
space). ``tau`` is calibrated once on the initial model: ``SEDLoss.prepare`` (the loss
contract's hook the training stage calls) runs ``calibration.calibrate_tau``.

Gradient: ``d (p_y - 1/2)^2 / dz = -2 (p_y - 1/2) p_y (p - e_y)``, so the whole gradient is
CE's ``p - e_y`` times the per-row factor ``1 - 2 lam m (p_y - 1/2) p_y``: SED costs CE plus
the mask. The mask needs ``c_k`` only near ``tau``: with ``p_max`` the largest probability,
``p_max <= c_k <= k p_max``, so ``p_max >= tau`` (unmasked) and ``k p_max < tau`` (masked)
decide a row from the softmax the engine already has; the mass of the k largest column-block
maxima (another lower bound) decides most others, and the exact top-k mass is computed
for the remaining rows only (``sed_mask``).

``sed_nomask`` (the paper's "SED-SFT w/o mask" ablation) applies the regulariser everywhere.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

import sedsft.losses.sed.calibration as calibration
from sedsft.losses.base import Preparation, TokenLoss, check, check_lam, check_positive_int
from sedsft.losses.engine import Chunk, ChunkResult, subtract_onehot_, topk_logits
from sedsft.losses.sed.calibration import CALIB_POSITIONS, tau_from_topk_mass

log = logging.getLogger(__name__)

# Relative slack of the masked bound ``k p_max < tau``: the float32 sum of k terms, each at
# most p_max, can exceed k p_max by rounding (< k * 2**-23 relative); rows inside the slack
# go to the exact top-k, so the bound never decides a row differently from it.
_BOUND_SLACK_PER_TERM = 1e-6


def sed_mask(
    z: Tensor,
    lse: Tensor,
    zmax: Tensor,
    top_k: int,
    tau: float,
    mass: Tensor | None = None,
    bmax: Tensor | None = None,
) -> Tensor:
    """``1[c_k < tau]`` as float [C] for logits ``z`` [C, V] with log-sum-exp ``lse`` [C] and
    row maxima ``zmax`` [C]; identical to thresholding the exact
    ``c_k = sum exp(topk(z) - lse)``, which is given as ``mass`` [C] or computed only for the
    rows the bounds ``p_max <= c_k <= k p_max`` leave open (from the block maxima ``bmax``
    when given, so an open row costs only its top-k candidates).
    """
    vocab = z.shape[1]
    # Decided in exact arithmetic at the ends, where float rounding of c_k matters:
    # c_k == 1 when k >= V (never masked), and c_k < 1 = tau whenever k < V.
    if top_k >= vocab:
        return torch.zeros_like(lse)
    if tau >= 1.0:
        return torch.ones_like(lse)
    if mass is not None:
        return (mass < tau).to(lse.dtype)
    if z.device.type != "cpu":
        # One exact pass: cheaper on an accelerator than the host sync that picking rows needs.
        mass = torch.exp(topk_logits(z, top_k, bmax) - lse.unsqueeze(1)).sum(-1)
        return (mass < tau).to(lse.dtype)
    p_max = torch.exp(zmax - lse)  # the exact sum's first term, bit for bit
    masked = p_max * (top_k * (1.0 + _BOUND_SLACK_PER_TERM * top_k)) < tau
    # float sums of non-negative terms only grow, so c_k >= p_max >= tau holds in float too.
    open_rows = torch.nonzero(~masked & (p_max < tau)).flatten()
    mask = masked.to(lse.dtype)
    best = None
    blocks = 0 if bmax is None else bmax.shape[1]
    if open_rows.numel() and blocks > 2 * top_k:
        # A second lower bound: the k largest block maxima are k distinct entries, each at
        # most its rank's entry of the true top-k, so their (same-order) float sum is at
        # most c_k. When the top k fall in k different blocks it equals c_k.
        top_blocks = bmax.index_select(0, open_rows).topk(top_k, dim=-1)
        low = torch.exp(top_blocks.values - lse.index_select(0, open_rows).unsqueeze(1))
        still = low.sum(-1) < tau
        open_rows, best = open_rows[still], top_blocks.indices[still]
    if open_rows.numel():
        top = topk_logits(z, top_k, bmax, rows=open_rows, best=best)
        exact = torch.exp(top - lse.index_select(0, open_rows).unsqueeze(1)).sum(-1)
        mask.index_copy_(0, open_rows, (exact < tau).to(lse.dtype))
    return mask


def _sed_value(z: Tensor, y: Tensor, lam: float, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Autograd form shared by ``sed`` and ``sed_nomask``; ``mask`` [C] 0/1, no gradient."""
    logp_y = torch.log_softmax(z, -1).gather(1, y.unsqueeze(1)).squeeze(1)
    reg = lam * mask * (logp_y.exp() - 0.5).square()
    return -logp_y + reg, {"reg": reg, "mask_frac": mask}


def _sed_chunk(c: Chunk, lam: float, mask: Tensor) -> ChunkResult:
    """Shared by ``sed`` and ``sed_nomask``; ``mask`` [C] float 0/1."""
    p_y = c.p_y
    centred = p_y - 0.5
    reg = lam * mask * centred.square()
    scale = None
    if c.need_grad:
        subtract_onehot_(c.buf, c.y)
        scale = 1.0 - 2.0 * lam * mask * centred * p_y
    return ChunkResult(c.ce + reg, row_scale=scale, extras={"reg": reg, "mask_frac": mask})


class SEDLoss(TokenLoss):
    """SED-SFT loss.

    Args:
        lam: regulariser weight (the release's training script uses 1.0).
        top_k: k of the top-k mass ``c_k`` that decides the mask.
        tau: mask threshold in [0, 1]; ``None`` = calibrate before training
            (``needs_calibration``, ``prepare``). Kept in a buffer, so checkpoints carry it
            and exports record it (``export_meta``).
        cumsum_ratio: calibration keeps this fraction of positions at or above ``tau``.
        calib_top_k: k used during calibration; ``None`` = ``top_k``. The release
            calibrates with 10 and trains with 2 (preset ``sed_release``).
        calib_positions: calibrate on ``"target"`` positions or on ``"all"`` (release).
        calib_num_examples: held-out examples used for calibration.
        calibrate: calibrate ``tau`` when it is ``None``; ``False`` requires a ``tau``.
        chunk_size: rows per chunk of the engine (``None`` = from a memory budget).
    """

    name = "sed"
    extra_metrics = ("reg", "mask_frac")

    def __init__(
        self,
        lam: float = 1.0,
        top_k: int = 10,
        tau: float | None = None,
        cumsum_ratio: float = 0.7,
        calib_top_k: int | None = None,
        calib_positions: str = "target",
        calib_num_examples: int = 100,
        chunk_size: int | None = None,
        calibrate: bool = True,
    ):
        super().__init__(chunk_size)
        self.lam = check_lam(lam)
        check(
            tau is not None or calibrate,
            "tau is not set and calibrate=False: set loss.tau to a value in [0, 1], "
            "or loss.calibrate=true to calibrate it with the initial model",
        )
        check_positive_int("top_k", top_k)
        check_positive_int("calib_top_k", calib_top_k, allow_none=True)
        check(
            isinstance(cumsum_ratio, (int, float)) and 0 < cumsum_ratio <= 1,
            f"cumsum_ratio must be in (0, 1], got {cumsum_ratio!r}",
        )
        check(
            calib_positions in CALIB_POSITIONS,
            f"calib_positions must be one of {list(CALIB_POSITIONS)}, got {calib_positions!r}",
        )
        check_positive_int("calib_num_examples", calib_num_examples)
        self.top_k, self.calib_top_k = top_k, calib_top_k
        self.cumsum_ratio = float(cumsum_ratio)
        self.calib_positions, self.calib_num_examples = calib_positions, calib_num_examples
        self.register_buffer("tau", torch.tensor(math.nan))
        if tau is not None:
            self.set_tau(tau)
        self._tau = math.nan

    def extra_repr(self) -> str:
        return f"lam={self.lam}, top_k={self.top_k}, tau={float(self.tau):.6g}"

    @property
    def stats_top_k_effective(self) -> int:
        return self.top_k

    @property
    def calibration_top_k(self) -> int:
        """k to use when collecting top-k masses for calibration."""
        return self.calib_top_k if self.calib_top_k is not None else self.top_k

    @property
    def needs_calibration(self) -> bool:
        return math.isnan(float(self.tau))

    # -- the loss contract's preparation hooks (base.py): calibration of tau --------------
    @property
    def needs_preparation(self) -> bool:
        return self.needs_calibration

    def prepare(self, prep: Preparation) -> dict[str, float]:
        """Calibrate ``tau`` on the first ``calib_num_examples`` held-out examples; returns
        ``calibration/tau`` and ``calibration/mask_rate`` (at ``top_k``, on the calibration
        positions) for the run's logs."""
        batches = prep.heldout(self.calib_num_examples)
        # Looked up on the module at call time, so a test can count calibrations.
        tau, mask_rate = calibration.calibrate_tau(self, batches, prep.step, prep.broadcast)
        log.info("calibrated tau=%.4f (mask rate %.3f on calibration positions)", tau, mask_rate)
        return {"calibration/tau": tau, "calibration/mask_rate": mask_rate}

    def check_model(self, vocab_size: int, model_name: str) -> None:
        for knob, k in (("top_k", self.top_k), ("calib_top_k", self.calib_top_k)):
            if k is not None and k > vocab_size:
                raise ValueError(
                    f"loss.{knob}={k} is larger than the vocabulary of {model_name} "
                    f"({vocab_size} tokens); allowed: 1 to {vocab_size}"
                )

    def set_tau(self, tau: float) -> None:
        check(
            isinstance(tau, (int, float)) and 0.0 <= tau <= 1.0,
            f"tau must be a number in [0, 1] (or None to calibrate), got {tau!r}",
        )
        self.tau.fill_(float(tau))

    def calibrate(self, topk_masses: Tensor) -> float:
        """Set ``tau`` from top-k masses [n] collected on held-out data; returns it."""
        tau = tau_from_topk_mass(topk_masses, self.cumsum_ratio)
        self.set_tau(tau)
        return tau

    def _apply(self, fn, recurse=True):
        # Casting the module (e.g. ``.to(torch.bfloat16)``) must not round the threshold.
        tau = self.tau
        super()._apply(fn, recurse)
        self.tau = tau.to(self.tau.device)
        return self

    def _before_call(self) -> None:
        self._tau = float(self.tau)  # one host read per call, not per chunk
        if math.isnan(self._tau):
            raise RuntimeError(
                "SEDLoss: tau is not set. Calibrate it before training "
                "(loss.calibrate(topk_masses) or loss.set_tau(value)), or pass tau=..."
            )

    @torch.no_grad()
    def mask(self, z: Tensor) -> Tensor:
        """The mask ``1[c_k < tau]`` [C] (0/1 in ``z``'s dtype) of logits ``z`` [C, V] at this loss's
        ``top_k`` and ``tau``, from the exact ``c_k`` (what ``value`` applies; readers such
        as the positions report ask the loss instead of restating it)."""
        lse = torch.logsumexp(z, -1)
        mass = torch.exp(topk_logits(z, self.top_k) - lse.unsqueeze(1)).sum(-1)
        return sed_mask(z, lse, z.amax(-1), self.top_k, float(self.tau), mass)

    def value(self, z: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return _sed_value(z, y, self.lam, self.mask(z))

    def chunk(self, c: Chunk) -> ChunkResult:
        mask = sed_mask(c.z, c.lse, c.zmax, self.top_k, self._tau, c.topk_mass, c.bmax)
        return _sed_chunk(c, self.lam, mask)


class SEDNoMaskLoss(TokenLoss):
    """``-log p_y + lam (p_y - 1/2)^2`` on every target token (ablation "SED-SFT w/o mask")."""

    name = "sed_nomask"
    extra_metrics = ("reg", "mask_frac")

    def __init__(self, lam: float = 1.0, chunk_size: int | None = None, stats_top_k: int = 10):
        super().__init__(chunk_size, stats_top_k)
        self.lam = check_lam(lam)

    def value(self, z: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return _sed_value(z, y, self.lam, torch.ones_like(z[:, 0]))

    def chunk(self, c: Chunk) -> ChunkResult:
        return _sed_chunk(c, self.lam, torch.ones_like(c.lse))
