"""The engine shared by every token loss: chunking over target rows, float32 math, and
the gradient computed and stored during the forward (the Liger-Kernel recipe).

A loss only supplies its per-chunk math (``ChunkedLoss.run_chunk``: its analytic ``chunk``,
or ``autograd_chunk`` over its ``value``): value, gradient with respect to the chunk's
logits, extra metrics. Everything else lives here, and nothing here imports the loss
contract (``base.py`` imports the engine, never the reverse):

- only target rows (label != -100) are touched; they are split into chunks of at most
  ``rows`` rows, and a chunk that is one contiguous run of rows is read (and, for float32,
  its gradient written) through a view instead of a gather;
- the softmax, log-sum-exp, target logit, block maxima (for an exact top-k when needed),
  entropy and top-1 metrics are computed once per chunk, in float32, into buffers reused
  across chunks (on the CPU a fresh 64 MiB tensor costs more in page faults than the
  softmax that fills it);
- gradients are computed in the forward and only scaled by ``grad_output`` in the
  backward, so the float32 ``[rows, V]`` buffers are the only extra memory on top of the
  gradient itself (logits path) or of ``grad_weight`` (fused path: no ``N x V`` at all).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from sedsft import IGNORE_INDEX

# Elements per float32 [rows, V] chunk buffer (64 MiB). Fewer, bigger chunks mean less
# per-chunk work and, on the fused path, fewer passes over grad_weight [V, D].
DEFAULT_CHUNK_ELEMS = 1 << 24
# The fused path on the CPU: 16 MiB, but at least 128 rows. Its buffers (logits,
# probabilities) are real memory, alive where a training step peaks; below glibc's largest
# mmap threshold (32 MiB) they are also recycled from call to call instead of page-faulted
# in afresh. Below ~128 rows the per-chunk update of grad_weight [V, D], a pass over all of
# it, starts to dominate. (On the logits path a chunk of contiguous rows is a view of the
# logits and of their gradient: no buffer.)
DEFAULT_CHUNK_ELEMS_FUSED_CPU = 1 << 22
MIN_FUSED_ROWS = 128
# Logits per autograd block (16 MiB in float32): below glibc's largest mmap threshold (32 MiB),
# so the temporaries of one block are reused by the next instead of faulted in afresh.
AUTOGRAD_BLOCK_ELEMS = 1 << 22
# Block width of the blocked top-k below: 128 keeps the block-max reduction vectorised; a
# vocabulary under 4096 gets 16-wide blocks, so that it still has more blocks than 2 k.
_TOPK_BLOCK = 128
_TOPK_BLOCK_SMALL_V = 16


def block_width(vocab: int) -> int:
    """Width of the column blocks of ``block_max`` / ``topk_logits`` for ``vocab``."""
    return _TOPK_BLOCK if vocab >= 32 * _TOPK_BLOCK else _TOPK_BLOCK_SMALL_V


@dataclass
class Chunk:
    """What a loss sees of one chunk of ``C`` target rows (all tensors float32 unless said).

    ``z`` may be a view of the caller's logits: never write into it. ``buf`` holds
    ``softmax(z)`` on entry; when ``need_grad`` the loss must leave ``d loss / d z`` in it
    (possibly up to a per-row factor returned as ``ChunkResult.row_scale``); otherwise it
    may use it as scratch. ``tmp`` is scratch of the same shape.
    """

    z: Tensor  # [C, V] logits
    y: Tensor  # [C] int64 targets
    lse: Tensor  # [C] log-sum-exp of z
    z_y: Tensor  # [C] target logit
    zmax: Tensor  # [C] row maximum of z
    bmax: Tensor | None  # [C, blocks] maxima of column blocks (see block_max)
    entropy: Tensor  # [C] H(p) in nats
    topk_mass: Tensor | None  # [C] top-k mass (k = stats_top_k_effective), token stats only
    buf: Tensor  # [C, V] softmax(z) on entry, gradient on exit
    tmp: Tensor  # [C, V] scratch
    need_grad: bool

    @property
    def ce(self) -> Tensor:
        """[C] ``-log p_y``."""
        return self.lse - self.z_y

    @property
    def p_y(self) -> Tensor:
        """[C] target probability."""
        return torch.exp(self.z_y - self.lse)


@dataclass
class ChunkResult:
    """A loss's answer for one chunk: per-row value ``loss`` [C]; optional ``row_scale`` [C]
    (the true gradient is ``row_scale[:, None] * buf``, applied where it is cheapest); extra
    per-row metrics, averaged over target tokens by the engine."""

    loss: Tensor
    row_scale: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class ChunkedLoss(Protocol):
    """What the engine needs of a loss (``TokenLoss`` is the one implementation)."""

    chunk_size: int | None
    extra_metrics: tuple[str, ...]

    @property
    def stats_top_k_effective(self) -> int: ...

    def run_chunk(self, c: Chunk) -> ChunkResult: ...


PerToken = Tensor | tuple[Tensor, dict[str, Tensor]]  # a loss's value(z, y): per-token [C], extras


def split_value(out: PerToken) -> tuple[Tensor, dict[str, Tensor]]:
    """``value``'s answer as (per-token loss, extras)."""
    return out if isinstance(out, tuple) else (out, {})


def autograd_chunk(value: Callable[[Tensor, Tensor], PerToken], c: Chunk) -> ChunkResult:
    """One chunk through a loss's ``value(z, y)`` with its gradient by local autograd passes.

    The rows go through in blocks of at most ``AUTOGRAD_BLOCK_ELEMS`` logits, one small
    graph each, freed before the next: memory stays bounded by the block (a few
    ``[rows, V]`` float32 temporaries of at most 16 MiB), and blocks that size are
    recycled by the CPU allocator instead of being mapped afresh (page faults) for every
    chunk. ``c.z`` may be a view of the caller's logits: it is detached, never written.
    """
    rows = max(1, AUTOGRAD_BLOCK_ELEMS // max(c.z.shape[1], 1))
    parts: list[tuple[Tensor, dict[str, Tensor]]] = []
    for start in range(0, c.z.shape[0], rows):
        z, y = c.z[start : start + rows].detach(), c.y[start : start + rows]
        if not c.need_grad:
            parts.append(split_value(value(z, y)))
            continue
        with torch.enable_grad():
            z = z.requires_grad_()
            per, extras = split_value(value(z, y))
            (grad,) = torch.autograd.grad(per.sum(), z)
        c.buf[start : start + rows].copy_(grad)
        parts.append((per, extras))
    per = torch.cat([p for p, _ in parts]).detach()
    extras = {k: torch.cat([e[k] for _, e in parts]).detach() for k in parts[0][1]}
    return ChunkResult(per, extras=extras)


def subtract_onehot_(buf: Tensor, y: Tensor, value: Tensor | float = 1.0) -> Tensor:
    """``buf[i, y_i] -= value_i`` in place; ``buf`` [C, V], ``y`` [C], ``value`` scalar or [C]."""
    if isinstance(value, Tensor):
        src = value.to(buf.dtype).unsqueeze(1).neg()
    else:
        src = torch.full((y.numel(), 1), -value, dtype=buf.dtype, device=buf.device)
    return buf.scatter_add_(1, y.unsqueeze(1), src)


def default_rows(vocab_size: int, chunk_size: int | None, budget: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits ``budget`` elements."""
    if chunk_size is not None:
        return chunk_size
    return max(1, budget // max(vocab_size, 1))


def block_max(z: Tensor) -> tuple[Tensor | None, Tensor]:
    """Maxima of the column blocks of ``z`` [C, V] ([C, V // width], ``block_width(V)``; None
    when V has fewer than 8 blocks) and the row maxima [C]: one pass, as cheap as ``amax``,
    that the exact top-k (``topk_logits``) reuses."""
    rows, vocab = z.shape
    width = block_width(vocab)
    blocks = vocab // width
    if blocks < 8:
        return None, z.amax(-1)
    bmax = z[:, : blocks * width].view(rows, blocks, width).amax(-1)
    zmax = bmax.amax(-1)
    if blocks * width < vocab:
        zmax = torch.maximum(zmax, z[:, blocks * width :].amax(-1))
    return bmax, zmax


def topk_logits(
    z: Tensor,
    k: int,
    bmax: Tensor | None = None,
    rows: Tensor | None = None,
    best: Tensor | None = None,
) -> Tensor:
    """The ``min(k, V)`` largest entries of each row of ``z`` [C, V], descending, [C, k]
    (of the rows ``rows`` [R] only, [R, k], when given).

    ``torch.topk`` over a 128k vocabulary costs several softmaxes on the CPU. The k largest
    entries all lie in the k blocks with the largest block maxima (an entry outside them is
    beaten by k block maxima), so the block maxima ``bmax`` [C, blocks] (``block_max``;
    computed here when not given) plus two tiny top-k's suffice, and a subset of rows costs
    only its candidates. ``best`` [R, k]: those blocks' indices, when already known.
    Column 0 is the row maximum.
    """
    vocab = z.shape[1]
    k = min(k, vocab)
    width = block_width(vocab)
    blocks = vocab // width
    if blocks <= 2 * k:
        zr = z if rows is None else z.index_select(0, rows)
        return zr.topk(k, dim=-1).values
    if bmax is None and rows is not None:
        z, rows = z.index_select(0, rows), None
    n_rows = z.shape[0] if rows is None else rows.numel()
    if rows is None:
        rows = torch.arange(n_rows, device=z.device)
    if best is None:
        if bmax is None:
            bmax = z[:, : blocks * width].view(z.shape[0], blocks, width).amax(-1)
        best = bmax.index_select(0, rows).topk(k, dim=-1).indices  # [R, k]
    if blocks * width == vocab and z.is_contiguous():
        # Whole blocks as rows of a [C * blocks, width] view: one row gather, no fancy indexing.
        offsets = (rows * blocks).unsqueeze(1) + best
        cand = z.view(-1, width).index_select(0, offsets.flatten()).view(n_rows, -1)
    else:
        main = z[:, : blocks * width].view(z.shape[0], blocks, width)
        cand = main[rows.unsqueeze(1), best].reshape(n_rows, -1)
        if blocks * width < vocab:
            cand = torch.cat([cand, z[rows, blocks * width :]], dim=1)
    return cand.topk(k, dim=-1).values


def row_dot(a: Tensor, b: Tensor, tmp: Tensor) -> Tensor:
    """``sum_v a[c, v] * b[c, v]`` [C] of two [C, V] tensors; ``tmp`` [C, V] is scratch.

    On the CPU with a large vocabulary one BLAS dot per row reads each operand once from
    cache instead of writing and re-reading a product (about 1.7x faster at V = 32k);
    elsewhere (small V: per-row call overhead; GPUs: one kernel) multiply and sum.
    """
    rows, vocab = a.shape
    if a.device.type != "cpu" or vocab < 8192:
        return torch.mul(a, b, out=tmp).sum(-1)
    out = torch.empty(rows, dtype=a.dtype, device=a.device)
    for i in range(rows):
        torch.dot(a[i], b[i], out=out[i])
    return out


def plan_chunks(
    idx: Tensor, rows: int, segment: int | None = None
) -> list[tuple[int, int, int | None]]:
    """Split sorted target-row indices ``idx`` [n] (CPU) into chunks of at most ``rows``.

    Returns ``(start, end, first_row)`` over positions of ``idx``; ``first_row`` is set when
    ``idx[start:end]`` is one contiguous run of rows, so the chunk can be a view. A chunk is
    cut at the end of a run when that keeps it at least half full: SFT batches are long
    target runs separated by prompts and padding, and views skip a gather and a scatter.
    With ``segment`` set, rows ``r`` and ``r + 1`` only form a run inside one segment of
    that many rows (the logits are a non-mergeable ``[B, T, V]`` view and ``segment = T``).
    """
    n = idx.numel()
    if n == 0:
        return []
    breaks = idx[1:] - idx[:-1] != 1
    if segment is not None:
        breaks |= idx[1:] % segment == 0
    run_ends = (torch.nonzero(breaks).flatten() + 1).tolist() + [n]
    plan: list[tuple[int, int, int | None]] = []
    start = 0
    while start < n:
        run_end = run_ends[bisect.bisect_right(run_ends, start)]
        if run_end - start >= max(1, rows // 2):
            end = min(start + rows, run_end)
        else:
            end = min(start + rows, n)
        plan.append((start, end, int(idx[start]) if end <= run_end else None))
        start = end
    return plan


class _LogitsSource:
    """Chunks read from logits [..., V]; gradient written into ``grad`` [N, V] (input
    dtype), with per-row factors kept aside and applied in the backward pass.

    Logits that cannot be flattened to ``[N, V]`` without a copy (e.g. ``logits[:, :-1]``
    of a ``[B, T, V]`` tensor) are read as ``[B, T', V]``: runs are views inside one
    sequence and other rows are gathered, so the caller's slice is never copied whole.
    """

    def __init__(self, logits: Tensor, need_grad: bool):
        vocab = logits.shape[-1]
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        self.segment: int | None = None
        try:
            self.x = logits.view(-1, vocab)
        except RuntimeError:
            self.x = logits.reshape(-1, logits.shape[-2], vocab)
            self.segment = logits.shape[-2]
        self.need_grad = need_grad
        self.low_precision = logits.dtype != torch.float32
        self.n_rows, self.vocab = logits.numel() // max(vocab, 1), vocab
        self.dtype, self.device = logits.dtype, logits.device
        self.budget = DEFAULT_CHUNK_ELEMS
        self.grad: Tensor | None = None
        self.row_scale: Tensor | None = None

    def setup(self, idx: Tensor, rows: int) -> None:
        self.idx = idx
        if self.need_grad:
            # Rows that are not targets keep a zero gradient; skip the fill when there are none.
            alloc = torch.empty if idx.numel() == self.n_rows else torch.zeros
            self.grad = alloc(self.n_rows, self.vocab, dtype=self.dtype, device=self.device)
        self._zbuf = _LazyBuffer(rows, self.vocab, self.device)
        self._pbuf = _LazyBuffer(rows, self.vocab, self.device)
        self.tmp = _LazyBuffer(rows, self.vocab, self.device)

    def _run_view(self, first_row: int, n: int) -> Tensor:
        if self.segment is None:
            return self.x[first_row : first_row + n]
        seq, pos = divmod(first_row, self.segment)
        return self.x[seq, pos : pos + n]

    def logits(self, start: int, end: int, first_row: int | None) -> Tensor:
        n = end - start
        if first_row is not None:
            view = self._run_view(first_row, n)
            return self._zbuf.get(n).copy_(view) if self.low_precision else view
        rows = self.idx[start:end]
        if self.segment is not None:
            return self._zbuf.get(n).copy_(self.x[rows // self.segment, rows % self.segment])
        if self.low_precision:
            return self._zbuf.get(n).copy_(self.x.index_select(0, rows))
        return torch.index_select(self.x, 0, rows, out=self._zbuf.get(n))

    def prob_buffer(self, start: int, end: int, first_row: int | None) -> Tensor:
        n = end - start
        if self.need_grad and first_row is not None and not self.low_precision:
            return self.grad[first_row : first_row + n]
        return self._pbuf.get(n)

    def put_grad(
        self, start: int, end: int, first_row: int | None, g: Tensor, scale: Tensor | None
    ) -> None:
        n = end - start
        if scale is not None and self.low_precision:
            # Scale in float32 before the cast, so that a large unscaled gradient cannot
            # overflow float16.
            g.mul_(scale.unsqueeze(1))
        elif scale is not None:
            if self.row_scale is None:
                self.row_scale = torch.ones(self.n_rows, device=self.device)
            self.row_scale.index_copy_(0, self.idx[start:end], scale)
        if first_row is not None:
            dest = self.grad[first_row : first_row + n]
            if dest.data_ptr() != g.data_ptr():
                dest.copy_(g)
        else:
            self.grad.index_copy_(0, self.idx[start:end], g.to(self.grad.dtype))


class _LinearSource:
    """Chunks computed as ``z = h @ W.T (+ b)`` from hidden states ``h`` [N, D] and the LM
    head ``W`` [V, D]; gradients go straight into ``grad_h`` [N, D], ``grad_w`` [V, D] and
    ``grad_b`` [V], so no ``N x V`` tensor exists at any time."""

    segment = None

    def __init__(self, h: Tensor, w: Tensor, b: Tensor | None, needs: tuple[bool, bool, bool]):
        if torch.is_autocast_enabled(h.device.type):
            # Match what the model's own lm_head would do under mixed precision.
            self.mm_dtype = torch.get_autocast_dtype(h.device.type)
        else:
            self.mm_dtype = torch.promote_types(h.dtype, w.dtype)
        self.h, self.w, self.b = h, w.to(self.mm_dtype), b
        self.need_h, self.need_w, self.need_b = needs
        self.vocab, self.device = w.shape[0], h.device
        cpu = h.device.type == "cpu"
        self.budget = DEFAULT_CHUNK_ELEMS
        if cpu:
            self.budget = max(DEFAULT_CHUNK_ELEMS_FUSED_CPU, MIN_FUSED_ROWS * self.vocab)
        self.grad_h = torch.zeros_like(h) if self.need_h else None
        # Accumulated in the weight's own dtype, as autograd would return it.
        self.grad_w = torch.zeros_like(w) if self.need_w else None
        self.grad_b = torch.zeros(self.vocab, device=h.device) if self.need_b else None
        self._hc: Tensor | None = None

    def setup(self, idx: Tensor, rows: int) -> None:
        self.idx = idx
        self._zbuf = _LazyBuffer(rows, self.vocab, self.device)
        self._pbuf = _LazyBuffer(rows, self.vocab, self.device)
        self._mmbuf = _LazyBuffer(rows, self.vocab, self.device, self.mm_dtype)
        self.tmp = _LazyBuffer(rows, self.vocab, self.device)

    def logits(self, start: int, end: int, first_row: int | None) -> Tensor:
        n = end - start
        if first_row is not None:
            hc = self.h[first_row : first_row + n]
        else:
            hc = self.h.index_select(0, self.idx[start:end])
        self._hc = hc = hc.to(self.mm_dtype)
        if self.mm_dtype == torch.float32:
            z = torch.mm(hc, self.w.t(), out=self._zbuf.get(n))
        else:
            z = self._zbuf.get(n).copy_(torch.mm(hc, self.w.t(), out=self._mmbuf.get(n)))
        if self.b is not None:
            z.add_(self.b)
        return z

    def prob_buffer(self, start: int, end: int, first_row: int | None) -> Tensor:
        return self._pbuf.get(end - start)

    def put_grad(
        self, start: int, end: int, first_row: int | None, g: Tensor, scale: Tensor | None
    ) -> None:
        n = end - start
        # A per-row factor goes on the small side of each product instead of a pass over
        # g [C, V]: (s g) W = s (g W), (s g)^T h = g^T (s h), sum_c s_c g_c = g^T s.
        if self.need_b:
            self.grad_b += g.sum(0) if scale is None else torch.mv(g.t(), scale)
        gm = g if self.mm_dtype == torch.float32 else self._mmbuf.get(n).copy_(g)
        if self.need_h:
            gh = torch.mm(gm, self.w)
            if scale is not None:
                gh = gh.float().mul_(scale.unsqueeze(1))
            if first_row is not None:
                self.grad_h[first_row : first_row + n].copy_(gh)
            else:
                self.grad_h.index_copy_(0, self.idx[start:end], gh.to(self.grad_h.dtype))
        if self.need_w:
            hc = self._hc
            if scale is not None:
                hc = (hc.float() * scale.unsqueeze(1)).to(self.mm_dtype)
            if self.grad_w.dtype == self.mm_dtype:
                self.grad_w.addmm_(gm.t(), hc)
            else:
                self.grad_w.add_(torch.mm(gm.t(), hc))


class _LazyBuffer:
    """A ``[rows, V]`` buffer allocated on first use and sliced to each chunk's size.

    It lives for one call: kept across calls it would sit in memory through the backward
    pass, where the step's peak is. (On the CPU the fused path's 16 MiB buffers are
    recycled by the allocator from call to call anyway.)
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, dtype=torch.float32):
        self.shape, self.device, self.dtype = (rows, vocab), device, dtype
        self._data: Tensor | None = None

    def get(self, n: int) -> Tensor:
        if self._data is None:
            self._data = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._data[:n]


@dataclass
class RunResult:
    """Sums over target tokens from one pass of the engine (all detached, float32)."""

    loss_sum: Tensor
    num_tokens: int
    metric_sums: dict[str, Tensor]
    token_stats: dict[str, Tensor] | None


def run_chunks(
    loss: ChunkedLoss,
    source: _LogitsSource | _LinearSource,
    y: Tensor,
    plan: list[tuple[int, int, int | None]],
    need_grad: bool,
    token_stats: bool,
    device: torch.device,
) -> RunResult:
    """Loop over ``plan``; ``y`` [n] are the targets of the selected rows."""
    k = loss.stats_top_k_effective if token_stats else None
    zero = torch.zeros((), device=device)
    names = ("ce", "entropy", "top1_acc", *loss.extra_metrics)
    sums = dict.fromkeys(names, zero)
    loss_sum = zero
    stats: dict[str, list[Tensor]] = {"entropy": [], "topk_mass": []}
    for start, end, first_row in plan:
        yc = y[start:end]
        z = source.logits(start, end, first_row)
        buf = source.prob_buffer(start, end, first_row)
        tmp = source.tmp.get(end - start)
        bmax, zmax = block_max(z)
        torch.softmax(z, dim=-1, out=buf)
        # p at the arg-max is 1 / sum exp(z - max) >= 1 / V, so this log never underflows.
        lse = zmax - buf.amax(-1).log()
        z_y = z.gather(1, yc.unsqueeze(1)).squeeze(1)
        entropy = lse - row_dot(buf, z, tmp)
        mass = None
        if k:
            mass = torch.exp(topk_logits(z, k, bmax) - lse.unsqueeze(1)).sum(-1)
        chunk = Chunk(z, yc, lse, z_y, zmax, bmax, entropy, mass, buf, tmp, need_grad)
        res = loss.run_chunk(chunk)
        if need_grad:
            source.put_grad(start, end, first_row, buf, res.row_scale)
        loss_sum = loss_sum + res.loss.sum()
        sums["ce"] = sums["ce"] + (lse - z_y).sum()
        sums["entropy"] = sums["entropy"] + entropy.sum()
        # Ties with the maximum count as correct: no separate arg-max pass over V.
        sums["top1_acc"] = sums["top1_acc"] + (z_y >= zmax).sum()
        for name, value in res.extras.items():
            sums[name] = sums[name] + value.sum()
        if token_stats:
            stats["entropy"].append(entropy)
            stats["topk_mass"].append(mass)
    out_stats = None
    if token_stats:
        out_stats = {
            name: torch.cat(parts) if parts else torch.zeros(0, device=device)
            for name, parts in stats.items()
        }
    return RunResult(loss_sum, int(y.numel()), sums, out_stats)


def _run(
    loss: ChunkedLoss,
    source: _LogitsSource | _LinearSource,
    labels: Tensor,
    need_grad: bool,
    token_stats: bool,
) -> RunResult:
    """Select the target rows, plan the chunks and run them."""
    flat = labels.reshape(-1)
    idx = torch.nonzero(flat != IGNORE_INDEX).flatten()  # the one host sync of a call
    rows = min(default_rows(source.vocab, loss.chunk_size, source.budget), max(idx.numel(), 1))
    source.setup(idx, rows)
    plan = plan_chunks(idx.cpu(), rows, source.segment)
    y = flat.index_select(0, idx)
    # The engine picks its own dtypes (float32 math, the source's matmul dtype).
    with torch.autocast(source.device.type, enabled=False):
        return run_chunks(loss, source, y, plan, need_grad, token_stats, source.device)


def logits_loss(
    loss: ChunkedLoss, logits: Tensor, labels: Tensor, token_stats: bool
) -> tuple[Tensor, RunResult]:
    """Run the engine over ``logits`` [..., V]; returns (differentiable loss sum, result)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        aux: dict[str, RunResult] = {}
        loss_sum = _LogitsFn.apply(logits, labels, loss, token_stats, aux)
        return loss_sum, aux["result"]
    result = _run(loss, _LogitsSource(logits, False), labels, False, token_stats)
    return result.loss_sum, result


class _LogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, loss, token_stats, aux):
        source = _LogitsSource(logits, True)
        aux["result"] = result = _run(loss, source, labels, True, token_stats)
        ctx.grad, ctx.row_scale, ctx.shape = source.grad, source.row_scale, logits.shape
        return result.loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "chunked loss: backward ran twice; the stored gradient is scaled in place, "
                "so retain_graph=True through this loss is not supported"
            )
        ctx.grad = None
        scale = grad_output if ctx.row_scale is None else ctx.row_scale.unsqueeze(1) * grad_output
        return grad.mul_(scale).view(ctx.shape), None, None, None, None


def fused_loss(
    loss: ChunkedLoss,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    token_stats: bool,
) -> tuple[Tensor, RunResult]:
    """Run the engine over ``hidden`` [..., D] @ ``weight`` [V, D].T (+ ``bias`` [V])."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if any(needs):
        aux: dict[str, RunResult] = {}
        loss_sum = _FusedFn.apply(hidden, weight, bias, labels, loss, needs, token_stats, aux)
        return loss_sum, aux["result"]
    h = hidden.reshape(-1, hidden.shape[-1])
    result = _run(loss, _LinearSource(h, weight, bias, needs), labels, False, token_stats)
    return result.loss_sum, result


class _FusedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, loss, needs, token_stats, aux):
        # Hidden states are small (D << V): flattening a non-contiguous view is cheap.
        source = _LinearSource(hidden.reshape(-1, hidden.shape[-1]), weight, bias, needs)
        aux["result"] = result = _run(loss, source, labels, True, token_stats)
        ctx.grads = [source.grad_h, source.grad_w, source.grad_b]
        ctx.shape = hidden.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return result.loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "fused chunked loss: backward ran twice; the stored gradients are scaled in "
                "place, so retain_graph=True through this loss is not supported"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_output).view(ctx.shape)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_output)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_output).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None
