"""Float64 references of every registered loss, written from the papers' formulas.

These are deliberately not the loss classes' code: each function restates its paper's
per-token formula with plain float64 tensor operations (softmax by hand, stop-gradients as
``detach``), so a wrong formula in ``sedsft.losses`` (a flipped sign, a temperature
multiplied instead of divided, a missing stop-gradient) makes the engine disagree with the
reference instead of agreeing with itself. Autograd through a reference gives the reference
gradient, because every stop-gradient of the formula is a ``detach`` here.

One function per registered loss name in ``REFERENCES``; a function takes float64 logits
``z`` [n, V], targets ``y`` [n] and the loss's knobs (those of ``build_loss``; engine knobs
such as ``chunk_size`` are ignored) and returns the per-token loss [n]. Its keyword defaults
are the loss's documented defaults (``test_reference_defaults_match_the_loss_defaults``).
A new loss adds its function here (docs/losses.md: Add a loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Knobs of the engine, not of a formula: references accept and ignore them.
ENGINE_KNOBS = frozenset({"chunk_size", "stats_top_k"})
# SED's calibration knobs: they decide how tau is found, not the per-token formula.
SED_CALIBRATION_KNOBS = frozenset(
    {"cumsum_ratio", "calib_top_k", "calib_positions", "calib_num_examples", "calibrate"}
)


def log_probs(z: Tensor) -> Tensor:
    """``log softmax(z)`` over the last axis, as ``z - max - log sum exp(z - max)``."""
    if z.dtype != torch.float64:
        raise TypeError(f"references run in float64, got {z.dtype}")
    shifted = z - z.max(-1, keepdim=True).values.detach()
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def pick(x: Tensor, y: Tensor) -> Tensor:
    """``x[i, y[i]]`` for every row i."""
    return x[torch.arange(x.shape[0]), y]


def ce(z: Tensor, y: Tensor) -> Tensor:
    """``-log p_y``."""
    return -pick(log_probs(z), y)


def dft(z: Tensor, y: Tensor) -> Tensor:
    """DFT (Wu et al. 2025): ``-sg(p_y) log p_y``."""
    logp_y = pick(log_probs(z), y)
    return -logp_y.exp().detach() * logp_y


def entropy(z: Tensor, y: Tensor, lam: float = 0.1) -> Tensor:
    """Unselective entropy bonus: ``-log p_y - lam H(p)``, ``H(p) = -sum_v p_v log p_v``."""
    logp = log_probs(z)
    h = -(logp.exp() * logp).sum(-1)
    return -pick(logp, y) - lam * h


def gem(z: Tensor, y: Tensor, beta: float = 0.7, h: str = "linear") -> Tensor:
    """GEM (Li et al., ICLR 2025): ``-sum_v q_v w_v (log p_y - log p_v)`` with
    ``q = sg(softmax(z / beta))`` and ``w_v = 1`` (linear) or
    ``sg(sigmoid(0.01 (z_v - z_y)))`` (logsigmoid)."""
    logp = log_probs(z)
    q = log_probs(z / beta).exp().detach()
    if h == "linear":
        w = torch.ones_like(z)
    elif h == "logsigmoid":
        w = (1.0 / (1.0 + torch.exp(-0.01 * (z - pick(z, y)[:, None])))).detach()
    else:
        raise ValueError(f"GEM reference: h must be linear or logsigmoid, got {h!r}")
    return -(q * w * (pick(logp, y)[:, None] - logp)).sum(-1)


def topk_mass(z: Tensor, k: int) -> Tensor:
    """``c_k``: the sum of the k largest probabilities of each row (sorted, not topk)."""
    p = log_probs(z).exp()
    return p.sort(-1, descending=True).values[:, :k].sum(-1)


def sed_nomask(z: Tensor, y: Tensor, lam: float = 1.0) -> Tensor:
    """SED-SFT without mask: ``-log p_y + lam (p_y - 1/2)^2`` at every token."""
    logp_y = pick(log_probs(z), y)
    return -logp_y + lam * (logp_y.exp() - 0.5) ** 2


def sed(
    z: Tensor, y: Tensor, lam: float = 1.0, top_k: int = 10, tau: float | None = None, **calibration
) -> Tensor:
    """SED-SFT (Chen et al., ACL 2026): ``-log p_y + lam m (p_y - 1/2)^2``,
    ``m = 1[c_k < tau]`` (no gradient through m). ``tau`` must be given: calibration is
    tested on its own."""
    unknown = set(calibration) - SED_CALIBRATION_KNOBS
    if unknown:
        raise TypeError(f"SED reference: unknown knobs {sorted(unknown)}")
    if tau is None:
        raise ValueError(
            "SED reference needs tau (the loss calibrates it; pass the calibrated value)"
        )
    m = (topk_mass(z.detach(), top_k) < tau).double()
    logp_y = pick(log_probs(z), y)
    return -logp_y + lam * m * (logp_y.exp() - 0.5) ** 2


def label_smoothing(z: Tensor, y: Tensor, eps: float = 0.1) -> Tensor:
    """Label smoothing: ``-(1 - eps) log p_y - eps / V sum_v log p_v``."""
    logp = log_probs(z)
    return -(1 - eps) * pick(logp, y) - eps * logp.sum(-1) / z.shape[-1]


REFERENCES: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "dft": dft,
    "entropy": entropy,
    "gem": gem,
    "label_smoothing": label_smoothing,
    "sed": sed,
    "sed_nomask": sed_nomask,
}


def missing_reference_message(name: str) -> str:
    return (
        f"loss {name!r} is registered but has no independent float64 reference: add a function "
        f"{name}(z, y, **knobs) written from the paper's formula (not from the loss class) to "
        "tests/loss_references.py and list it in REFERENCES (docs/losses.md: Add a loss)"
    )


def reference(name: str, z: Tensor, y: Tensor, **knobs) -> Tensor:
    """Per-token reference loss [n] of loss ``name`` with ``knobs`` (as for ``build_loss``)."""
    if name not in REFERENCES:
        raise KeyError(missing_reference_message(name))
    formula = {k: v for k, v in knobs.items() if k not in ENGINE_KNOBS}
    return REFERENCES[name](z, y, **formula)
