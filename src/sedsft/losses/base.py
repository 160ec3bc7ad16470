"""The loss contract: what a token loss states, what it may add, and how it registers.

A loss is one subclass of ``TokenLoss`` in one file under ``sedsft/losses/``:

- ``name``: its registry key and the ``configs/loss/<name>.yaml`` it is chosen with;
  defining the class registers it (``__init_subclass__``), and the registry imports every
  module of the package, so dropping the file in is enough.
- ``value(z, y)``: the per-token loss [C] of float32 logits ``z`` [C, V] and targets
  ``y`` [C], written with differentiable torch ops. This is the definition: the engine
  takes its gradient by autograd, one chunk of rows at a time (as Liger-Kernel's chunked
  losses do), so memory stays bounded by the chunk and never grows with ``N x V``.
- ``chunk(c)`` (optional): the same loss with a hand-derived gradient written into
  ``c.buf``, reusing the engine's softmax; a speed-up only, checked against ``value``'s
  autograd gradient by the tests for every loss that has one.
- a setting measured on the initial model before training (optional; SED's calibrated
  ``tau``): ``needs_preparation`` says it is still missing, ``prepare(Preparation)``
  measures it through the training forward on held-out batches, ``check_model`` refuses
  knobs the model cannot honour. The training stage calls these and nothing else, so it
  never names a loss's knobs.
- state: what a loss measured lives in its registered buffers (``register_buffer``), so it
  travels with the module's ``state_dict``: in the Lightning checkpoint (a resumed run does
  not prepare again) and back into a loss rebuilt from it (``load_state_dict``); an export
  records it in ``sedsft.json`` through ``export_meta`` (by default every buffer, as plain
  numbers).

The tests hold, for every registered name, a float64 reference written from the paper's
formula apart from this code (``tests/loss_references.py``): ``value`` and ``chunk`` are
checked against it, so a wrong formula cannot pass by agreeing with itself.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sedsft.losses.engine import (
    Chunk,
    ChunkResult,
    PerToken,
    autograd_chunk,
    fused_loss,
    logits_loss,
)

# name -> loss class, filled by TokenLoss.__init_subclass__ (read it through registry.py).
REGISTRY: dict[str, type[TokenLoss]] = {}


@dataclass
class LossOutput:
    """Result of a token loss over one batch.

    ``loss`` / ``loss_sum``: differentiable scalars, mean and sum over target tokens (the
    mean is 0 when there are none). ``metrics``: detached scalar means over target tokens.
    ``token_stats``: detached [n] tensors over target tokens, only on request.
    """

    loss: Tensor
    loss_sum: Tensor
    num_tokens: int
    metrics: dict[str, Tensor]
    token_stats: dict[str, Tensor] | None = None


@dataclass
class Preparation:
    """What the training stage hands a loss that prepares itself (``TokenLoss.prepare``).

    ``step(batch, token_stats=..., labels=..., loss_fn=...)``: the training forward on one
    padded batch (fused path included), returning a ``LossOutput``; ``labels`` [B, T]
    choose the positions and ``loss_fn`` a probe loss whose token statistics are read.
    ``heldout(n)``: the first ``n`` held-out examples as padded batches, in order.
    ``broadcast(tensor)``: rank 0's value on every rank (every rank runs ``step``: sharded
    strategies need them all), or None in a single process.
    """

    step: Callable[..., LossOutput]
    heldout: Callable[[int], Iterable[dict[str, Tensor]]]
    broadcast: Callable[[Tensor], Tensor] | None = None


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``; messages state the allowed values."""
    if not ok:
        raise ValueError(message)


def check_positive_int(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    allowed = "an int >= 1" + (" or None" if allow_none else "")
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be {allowed}, got {value!r}",
    )


def check_lam(value: float) -> float:
    check(
        isinstance(value, (int, float)) and value >= 0, f"lam must be a number >= 0, got {value!r}"
    )
    return float(value)


class TokenLoss(nn.Module):
    """Base class of every token loss (module docstring: the contract).

    Args:
        chunk_size: rows per chunk; ``None`` picks ``max(1, 2**24 // V)`` (64 MiB per
            float32 chunk buffer), on the CPU's fused path ``max(2**22 // V, 128)`` (16 MiB;
            engine.py says why).
        stats_top_k: k of the ``topk_mass`` token statistic (SED uses its own ``top_k``).

    ``analytic``: use ``chunk`` when the class defines one (default); ``False`` makes the
    engine take the gradient of ``value`` by autograd instead (the tests compare both).
    """

    name: ClassVar[str] = ""
    extra_metrics: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, register: bool = True, **kwargs):
        """Register every subclass that sets its own ``name`` (``register=False`` opts out,
        e.g. for a throwaway class in a test)."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not register or not name:
            return
        if cls.value is TokenLoss.value:
            raise TypeError(
                f"loss {name!r} ({cls.__module__}.{cls.__qualname__}) must define "
                "value(z, y): the per-token loss (docs/losses.md: Add a loss)"
            )
        other = REGISTRY.get(name)
        where = (cls.__module__, cls.__qualname__)
        if other is not None and (other.__module__, other.__qualname__) != where:
            raise ValueError(
                f"loss name {name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                f"{other.__module__}.{other.__qualname__}; give the new class another `name`"
            )
        REGISTRY[name] = cls

    def __init__(self, chunk_size: int | None = None, stats_top_k: int = 10):
        super().__init__()
        check_positive_int("chunk_size", chunk_size, allow_none=True)
        check_positive_int("stats_top_k", stats_top_k)
        self.chunk_size = chunk_size
        self.stats_top_k = stats_top_k
        self.analytic = True

    def extra_repr(self) -> str:
        """The loss's own knobs as set (``lam=0.1``), read off its constructor, so a loss file
        writes no repr of its own."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "chunk_size", "stats_top_k")]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names if hasattr(self, name))

    # -- what a loss states ---------------------------------------------------------------
    def value(self, z: Tensor, y: Tensor) -> PerToken:
        """Per-token loss [C] of logits ``z`` [C, V] (float32, or float64 in the tests) and
        targets ``y`` [C] int64, differentiable in ``z``; optionally also a dict of extra
        per-token metrics [C] (names listed in ``extra_metrics``), averaged over tokens."""
        raise NotImplementedError(f"{type(self).__name__} must define value(z, y)")

    def chunk(self, c: Chunk) -> ChunkResult:
        """Optional analytic path: per-token loss [C] and, when ``c.need_grad``, its gradient
        ``d loss / d z`` left in ``c.buf`` (which holds ``softmax(z)`` on entry)."""
        raise NotImplementedError

    @classmethod
    def has_analytic_gradient(cls) -> bool:
        return cls.chunk is not TokenLoss.chunk

    @property
    def stats_top_k_effective(self) -> int:
        """k of the ``topk_mass`` token statistic."""
        return self.stats_top_k

    def _before_call(self) -> None:
        """Checks that the loss can run (SED: ``tau`` known)."""

    # -- what a loss may prepare before training, and keep ------------------------------------
    @property
    def needs_preparation(self) -> bool:
        """True while a setting still has to be measured on the initial model (SED: ``tau``
        not given and not yet calibrated). The training stage then calls ``prepare`` once,
        before the first step, unless it resumes from a checkpoint (which holds the state)."""
        return False

    def prepare(self, prep: Preparation) -> dict[str, float]:
        """Measure the missing setting in place, the same on every rank; return the scalars
        to log and keep in the run's ``metrics.json``, under their logged names."""
        raise NotImplementedError(
            f"{type(self).__name__} reports needs_preparation but defines no prepare(prep)"
        )

    def check_model(self, vocab_size: int, model_name: str) -> None:
        """Raise ``ValueError`` naming the ``loss.<knob>`` when a knob cannot run on this
        model (SED: ``top_k`` larger than the vocabulary), before any step is taken."""

    def export_meta(self) -> dict[str, Any]:
        """What an export's ``sedsft.json`` records of this loss's state: every buffer as a
        plain number (a list for a tensor of several values), ``None`` for one still unset
        (NaN). Override to record something else."""
        meta: dict[str, Any] = {}
        for name, buf in self.named_buffers():
            values = buf.detach().double().cpu()
            if values.numel() == 1:
                value = float(values)
                meta[name] = None if math.isnan(value) else value
            else:
                meta[name] = values.tolist()
        return meta

    # -- what the engine calls ---------------------------------------------------------------
    def run_chunk(self, c: Chunk) -> ChunkResult:
        """The analytic ``chunk`` when there is one and ``analytic`` is on, else autograd."""
        if self.analytic and self.has_analytic_gradient():
            return self.chunk(c)
        return autograd_chunk(self.value, c)

    # -- entry points -----------------------------------------------------------------------
    def forward(
        self, logits: Tensor, labels: Tensor, return_token_stats: bool = False
    ) -> LossOutput:
        """``logits`` [..., V] (any float dtype), ``labels`` [...] int64 already aligned with
        the logits (no shift here), -100 = ignored."""
        _check_labels(logits.shape[:-1], labels)
        self._before_call()
        loss_sum, result = logits_loss(self, logits, labels.long(), return_token_stats)
        return self._output(loss_sum, result)

    def fused(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None = None,
        return_token_stats: bool = False,
    ) -> LossOutput:
        """Same loss on ``logits = hidden @ weight.T + bias`` without ever holding the
        ``N x V`` logits: ``hidden`` [..., D], ``weight`` [V, D], ``bias`` [V] or None."""
        _check_labels(hidden.shape[:-1], labels)
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                f"got {tuple(weight.shape)}"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        self._before_call()
        loss_sum, result = fused_loss(self, hidden, weight, bias, labels.long(), return_token_stats)
        return self._output(loss_sum, result)

    def _output(self, loss_sum: Tensor, result) -> LossOutput:
        n = result.num_tokens
        denom = max(n, 1)
        metrics = {name: (value / denom).detach() for name, value in result.metric_sums.items()}
        return LossOutput(loss_sum / denom, loss_sum, n, metrics, result.token_stats)


def _check_labels(lead_shape: torch.Size, labels: Tensor) -> None:
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)} (labels are used as given: shift them before the call)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
