"""Token losses against float64 references written from the papers' formulas
(``loss_references.py``, independent of the loss classes), plus hand-sized cases."""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loss_references import (
    ENGINE_KNOBS,
    REFERENCES,
    SED_CALIBRATION_KNOBS,
    missing_reference_message,
    reference,
)
from sedsft.losses import LOSS_NAMES, LOSSES, TokenLoss, build_loss
from sedsft.losses.engine import ChunkResult, plan_chunks, topk_logits
from sedsft.losses.sed import SEDLoss, tau_from_topk_mass, topk_mass

IGNORE = -100


# -- references ---------------------------------------------------------------------------
def reference_mean(name: str, kw: dict, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean reference loss over the target rows of float64 ``logits`` [n, V], ``labels`` [n]."""
    assert logits.dtype == torch.float64
    keep = labels != IGNORE
    per = reference(name, logits[keep], labels[keep], **kw)
    return per.sum() / max(int(keep.sum()), 1)


def make_batch(n: int, vocab: int, seed: int = 0, scale: float = 3.0):
    """Logits [n, V] and labels [n] with a contiguous ignored prefix plus scattered ignores,
    so both the view (contiguous run) and the gather chunk paths run."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = IGNORE
    labels[: n // 4] = IGNORE
    return logits, labels


def sed_tau_between(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> float:
    """A tau halfway between two neighbouring top-k masses, so float32 and float64 agree."""
    mass = topk_mass(logits.double(), top_k, labels=labels).sort().values
    i = mass.numel() // 2
    return float((mass[i - 1] + mass[i]) / 2)


# Knob variants worth a case of their own; every other registered loss runs with defaults.
VARIANTS = [
    ("ce", {}),
    ("sed", {"lam": 1.3, "top_k": 3}),
    ("sed_nomask", {"lam": 0.8}),
    ("gem", {"beta": 0.7, "h": "linear"}),
    ("gem", {"beta": 0.5, "h": "logsigmoid"}),
    ("dft", {}),
    ("entropy", {"lam": 0.3}),
]
CONFIGS = VARIANTS + [(n, {}) for n in LOSS_NAMES if n not in {v for v, _ in VARIANTS}]
CONFIG_IDS = [f"{n}-{kw.get('h', '')}" for n, kw in CONFIGS]
ANALYTIC = [(n, kw) for n, kw in CONFIGS if LOSSES[n].has_analytic_gradient()]
ANALYTIC_IDS = [f"{n}-{kw.get('h', '')}" for n, kw in ANALYTIC]


# What a loss prepares before training (TokenLoss.prepare) is also one of its knobs (None =
# prepare, as SED's tau); these tests give it a value chosen from their own logits. A loss
# that prepares itself adds its entry (docs/losses.md: Add a loss).
PREPARED_KNOBS = {
    # a tau between two neighbouring top-k masses of these logits
    "sed": lambda logits, labels, kw: {"tau": sed_tau_between(logits, labels, kw.get("top_k", 10))},
}


def knobs_for(name, kw, logits, labels):
    """``kw`` plus what the loss cannot run without: the setting of a loss still to prepare."""
    kw = dict(kw)
    if build_loss(name, **kw).needs_preparation:
        assert name in PREPARED_KNOBS, (
            f"loss {name!r} prepares itself before training: add to PREPARED_KNOBS in "
            "tests/test_losses.py the knob that holds what it prepares, with a value for the "
            "test's logits (docs/losses.md: Add a loss)"
        )
        kw.update(PREPARED_KNOBS[name](logits, labels, kw))
    return kw


def make_loss(name, kw, analytic=True, **extra):
    loss_fn = build_loss(name, **kw, **extra)
    loss_fn.analytic = analytic
    return loss_fn


def test_every_loss_is_covered_and_what_it_provides_is_read_off_its_class():
    """The cases come from the registry alone: every registered loss runs the reference
    tests, and every one whose class defines ``chunk`` (itself or by inheritance) also the
    analytic-vs-autograd test; adding ``chunk`` to a loss edits no test."""
    assert {n for n, _ in CONFIGS} == set(LOSS_NAMES)
    assert {"ce", "sed", "sed_nomask", "gem", "dft", "entropy", "label_smoothing"} <= set(
        LOSS_NAMES
    )

    class ValueOnly(TokenLoss, register=False):
        name = "value_only"

        def value(self, z, y):
            return torch.logsumexp(z, -1)

    class WithChunk(ValueOnly, register=False):
        name = "with_chunk"

        def chunk(self, c):
            return ChunkResult(c.lse)

    class Inherits(WithChunk, register=False):
        name = "inherits"

    assert not ValueOnly.has_analytic_gradient()
    assert WithChunk.has_analytic_gradient() and Inherits.has_analytic_gradient()
    own = {n: [c for c in LOSSES[n].__mro__ if issubclass(c, TokenLoss) and c is not TokenLoss] for n in LOSS_NAMES}
    defines_chunk = {n for n, classes in own.items() if any("chunk" in vars(c) for c in classes)}
    assert {n for n, _ in ANALYTIC} == defines_chunk


def test_every_registered_loss_has_an_independent_reference():
    """A loss is checked against its paper's formula, restated in ``loss_references.py``;
    a registered loss without one fails here with what to add."""
    missing = [name for name in LOSS_NAMES if name not in REFERENCES]
    assert not missing, "\n".join(missing_reference_message(name) for name in missing)
    with pytest.raises(KeyError, match=r"'focal' is registered but has no independent float64"):
        reference("focal", torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reference_knobs_and_defaults_match_the_loss(name):
    """The reference takes the loss's formula knobs, with the same defaults: a knob added
    to a loss (or a default changed) without its reference fails here."""
    if name not in REFERENCES:
        pytest.fail(missing_reference_message(name))
    loss_params = inspect.signature(LOSSES[name].__init__).parameters
    ref_params = inspect.signature(REFERENCES[name]).parameters
    formula = {
        k: p.default for k, p in loss_params.items() if k != "self" and k not in ENGINE_KNOBS
    }
    named = {
        k: p.default
        for k, p in ref_params.items()
        if k not in ("z", "y") and p.kind != p.VAR_KEYWORD
    }
    if any(p.kind == p.VAR_KEYWORD for p in ref_params.values()):  # SED: how tau is found
        formula = {k: v for k, v in formula.items() if k not in SED_CALIBRATION_KNOBS}
    assert named == formula, (
        f"tests/loss_references.py {name}: knobs and defaults {named} != the loss's {formula}"
    )


# -- value and gradient ---------------------------------------------------------------------
@pytest.mark.parametrize("analytic", [True, False], ids=["analytic", "autograd"])
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(("n", "vocab"), [(7, 11), (33, 257), (64, 1000)])
def test_logits_path_matches_reference(name, kw, n, vocab, analytic):
    logits, labels = make_batch(n, vocab, seed=n + vocab)
    kw = knobs_for(name, kw, logits, labels)
    x = logits.clone().requires_grad_()
    loss_fn = make_loss(name, kw, analytic, chunk_size=5)
    out = loss_fn(x, labels)
    out.loss.backward()

    ref_x = logits.double().requires_grad_()
    ref = reference_mean(name, kw, ref_x, labels)
    ref.backward()
    keep = labels != IGNORE
    assert out.num_tokens == int(keep.sum())
    what = f"{name} {kw} ({'chunk' if analytic else 'autograd of value'}) vs its paper formula"
    torch.testing.assert_close(
        out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: loss\n{m}"
    )
    torch.testing.assert_close(
        out.loss_sum.double(), ref.detach() * keep.sum(), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what}: gradient\n{m}"
    )
    assert torch.all(x.grad[~keep] == 0)

    z = logits.double()[keep]
    ce_ref = -torch.log_softmax(z, -1).gather(1, labels[keep][:, None]).mean()
    p = torch.softmax(z, -1)
    ent_ref = -(p * p.log()).sum(-1).mean()
    acc_ref = (z.argmax(-1) == labels[keep]).double().mean()
    torch.testing.assert_close(out.metrics["ce"].double(), ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["entropy"].double(), ent_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["top1_acc"].double(), acc_ref)


@pytest.mark.parametrize(("name", "kw"), ANALYTIC, ids=ANALYTIC_IDS)
@pytest.mark.parametrize("path", ["logits", "fused"])
def test_analytic_gradient_equals_autograd_of_value(name, kw, path):
    """A hand-derived gradient is only a speed-up: it must agree with autograd through the
    loss's own ``value`` in float32 (same chunks, same engine), values and metrics too."""
    n, dim, vocab = 48, 12, 700
    logits, labels = make_batch(n, vocab, seed=41)
    g = torch.Generator().manual_seed(42)
    hidden, weight = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
    dense = logits if path == "logits" else hidden @ weight.T
    kw = knobs_for(name, kw, dense, labels)
    results = []
    for analytic in (True, False):
        loss_fn = make_loss(name, kw, analytic, chunk_size=7)
        if path == "logits":
            x = logits.clone().requires_grad_()
            out = loss_fn(x, labels, return_token_stats=True)
            out.loss.backward()
            grads = [x.grad]
        else:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            out = loss_fn.fused(h, w, labels, return_token_stats=True)
            out.loss.backward()
            grads = [h.grad, w.grad]
        results.append((out, grads))
    (fast, fast_grads), (auto, auto_grads) = results
    torch.testing.assert_close(fast.loss, auto.loss, rtol=1e-6, atol=1e-6)
    assert fast.metrics.keys() == auto.metrics.keys()
    for key in fast.metrics:
        torch.testing.assert_close(fast.metrics[key], auto.metrics[key], rtol=1e-6, atol=1e-6)
    for a, b in zip(fast_grads, auto_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.token_stats["topk_mass"], auto.token_stats["topk_mass"])


@pytest.mark.parametrize("block_elems", [None, 60])
def test_autograd_path_is_chunked_and_keeps_the_caller_graph_apart(monkeypatch, block_elems):
    """The autograd path runs one local graph per block of a chunk (value sees at most
    chunk_size rows, and at most AUTOGRAD_BLOCK_ELEMS logits) and never writes into the
    caller's logits."""
    import sedsft.losses.engine as engine

    if block_elems:
        monkeypatch.setattr(engine, "AUTOGRAD_BLOCK_ELEMS", block_elems)  # 2 rows of V = 30
    seen = []

    class Probe(TokenLoss, register=False):
        name = "probe"

        def value(self, z, y):
            seen.append(z.shape[0])
            return torch.logsumexp(z, -1) - z.gather(1, y[:, None]).squeeze(1)

    logits, labels = make_batch(40, 30, seed=43)
    x = logits.clone().requires_grad_()
    out = Probe(chunk_size=4)(x, labels)
    out.loss.backward()
    assert max(seen) == (2 if block_elems else 4) and sum(seen) == out.num_tokens
    assert torch.equal(x.detach(), logits) and "probe" not in LOSSES
    ce, ce_grad = run_with_grad(build_loss("ce", chunk_size=4), logits, labels)
    torch.testing.assert_close(out.loss, ce.loss)
    torch.testing.assert_close(x.grad, ce_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: no graph at all
        assert Probe(chunk_size=4)(logits, labels).loss.grad_fn is None


def test_loss_names_must_be_unique():
    with pytest.raises(ValueError, match=r"loss name 'ce' of .*Dup is already taken by .*CELoss"):

        class Dup(TokenLoss):
            name = "ce"

            def value(self, z, y):
                return z[:, 0]

    assert LOSSES["ce"].__name__ == "CELoss"
    with pytest.raises(TypeError, match=r"loss 'no_value' .* must define value\(z, y\)"):

        class NoValue(TokenLoss):
            name = "no_value"

    assert "no_value" not in LOSSES


def test_batched_shape_and_grad_output_scaling():
    logits, labels = make_batch(24, 50, seed=3)
    logits, labels = logits.view(4, 6, 50), labels.view(4, 6)
    x = logits.clone().requires_grad_()
    out = build_loss("sed_nomask", chunk_size=4)(x, labels)
    (2.5 * out.loss + out.loss_sum).backward()

    ref_x = logits.double().requires_grad_()
    ref = reference_mean("sed_nomask", {}, ref_x, labels)
    n = int((labels != IGNORE).sum())
    (2.5 * ref + ref * n).backward()
    assert x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ce", "sed", "gem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_logits_view_is_read_in_place(name, dtype):
    # logits[:, :-1] of [B, T, V] cannot be flattened without a copy: read per sequence.
    full, labels = make_batch(4 * 9, 40, seed=21)
    full = full.view(4, 9, 40).to(dtype)
    labels = labels.view(4, 9)[:, 1:]
    kw = {"tau": 0.3} if name == "sed" else {}
    x = full.clone().requires_grad_()
    out = build_loss(name, chunk_size=5, **kw)(x[:, :-1], labels)
    out.loss.backward()
    ref_x = full.double().requires_grad_()
    ref = reference_mean(name, kw, ref_x[:, :-1].reshape(-1, 40), labels.reshape(-1))
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol * 1e-1)
    assert torch.all(x.grad[:, -1] == 0)


def test_backward_twice_is_refused():
    logits, labels = make_batch(10, 20)
    x = logits.requires_grad_()
    out = build_loss("ce")(x, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("analytic", [True, False], ids=["analytic", "autograd"])
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_path_matches_reference(name, kw, with_bias, analytic):
    n, dim, vocab = 40, 16, 300
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / 2
    bias = torch.randn(vocab, generator=g) if with_bias else None
    _, labels = make_batch(n, vocab, seed=8)
    dense = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    kw = knobs_for(name, kw, dense, labels)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    loss_fn = make_loss(name, kw, analytic, chunk_size=6)
    out = loss_fn.fused(h.view(5, 8, dim), w, labels.view(5, 8), bias=b)
    out.loss.backward()

    rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rb = bias.double().requires_grad_() if with_bias else None
    ref_logits = rh @ rw.T + (0 if rb is None else rb)
    ref = reference_mean(name, kw, ref_logits, labels)
    ref.backward()
    what = (
        f"{name} {kw} fused ({'chunk' if analytic else 'autograd of value'}) vs its paper formula"
    )
    torch.testing.assert_close(
        out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: loss\n{m}"
    )
    torch.testing.assert_close(
        h.grad.double(),
        rh.grad,
        rtol=1e-4,
        atol=1e-5,
        msg=lambda m: f"{what}: hidden gradient\n{m}",
    )
    torch.testing.assert_close(w.grad.double(), rw.grad, rtol=1e-4, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(b.grad.double(), rb.grad, rtol=1e-4, atol=1e-5)


def test_fused_frozen_head_and_no_grad_eval():
    n, dim, vocab = 20, 8, 64
    hidden, weight = torch.randn(n, dim), torch.randn(vocab, dim)
    _, labels = make_batch(n, vocab, seed=1)
    loss_fn = build_loss("gem", chunk_size=7)
    h = hidden.clone().requires_grad_()
    out = loss_fn.fused(h, weight, labels)
    out.loss.backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        ev = loss_fn.fused(hidden, weight, labels)
        ev_logits = loss_fn(hidden @ weight.T, labels)
    assert ev.loss.grad_fn is None
    torch.testing.assert_close(ev.loss, out.loss.detach())
    torch.testing.assert_close(ev_logits.loss, ev.loss, rtol=1e-5, atol=1e-6)


def test_fused_under_cpu_autocast():
    hidden, weight = torch.randn(12, 8), torch.randn(40, 8).requires_grad_()
    _, labels = make_batch(12, 40, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build_loss("ce", chunk_size=5).fused(hidden, weight, labels)
    out.loss.backward()
    ref = reference_mean("ce", {}, hidden.double() @ weight.detach().double().T, labels)
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_ignored_gives_zero_loss_and_grad(name):
    kw = {"tau": 0.5} if name == "sed" else {}
    loss_fn = build_loss(name, **kw)
    x = torch.randn(3, 5, 17).requires_grad_()
    labels = torch.full((3, 5), IGNORE)
    out = loss_fn(x, labels, return_token_stats=True)
    out.loss.backward()
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and out.loss_sum.item() == 0.0
    assert torch.all(x.grad == 0)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert out.token_stats["entropy"].numel() == 0

    h, w = torch.randn(15, 4).requires_grad_(), torch.randn(17, 4).requires_grad_()
    fused = loss_fn.fused(h, w, labels.view(-1))
    fused.loss.backward()
    assert fused.loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ce", "sed", "gem", "entropy"])
def test_low_precision_inputs(dtype, name):
    logits, labels = make_batch(30, 200, seed=5)
    kw = {"tau": sed_tau_between(logits, labels, 10)} if name == "sed" else {}
    low = logits.to(dtype).requires_grad_()
    out = build_loss(name, chunk_size=8, **kw)(low, labels)
    out.loss.backward()
    assert low.grad.dtype == dtype

    # Same values upcast: the engine works in float32, so only the grad's rounding differs.
    hi = low.detach().float().requires_grad_()
    ref = build_loss(name, chunk_size=8, **kw)(hi, labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(low.grad.float(), hi.grad, rtol=1e-2, atol=1e-5)

    h = torch.randn(30, 8).to(dtype).requires_grad_()
    w = torch.randn(200, 8).to(dtype).requires_grad_()
    fused = build_loss(name, chunk_size=8, **kw).fused(h, w, labels)
    fused.loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert torch.isfinite(fused.loss)


# -- SED ------------------------------------------------------------------------------------
def test_sed_gradient_is_ce_gradient_times_row_factor():
    logits, labels = make_batch(40, 120, seed=11)
    tau = sed_tau_between(logits, labels, 4)
    x = logits.clone().requires_grad_()
    out = build_loss("sed", lam=2.0, top_k=4, tau=tau, chunk_size=9)(x, labels)
    out.loss.backward()
    keep = labels != IGNORE
    z, y = logits.double()[keep], labels[keep]
    p = torch.softmax(z, -1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    mask = (p.topk(4, -1).values.sum(-1) < tau).double()
    grad = (p - F.one_hot(y, 120).double()) * (1 - 2 * 2.0 * mask * (p_y - 0.5) * p_y)[:, None]
    torch.testing.assert_close(x.grad.double()[keep], grad / keep.sum(), rtol=1e-4, atol=1e-7)
    assert 0 < out.metrics["mask_frac"] < 1
    assert round(out.metrics["mask_frac"].item() * out.num_tokens) == int(mask.sum())
    reg = (2.0 * mask * (p_y - 0.5) ** 2).mean()
    torch.testing.assert_close(out.metrics["reg"].double(), reg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ce", "sed", "gem", "entropy", "dft"])
def test_large_vocabulary_paths_match_reference(name):
    # V >= 8192 with a partial last block: per-row BLAS dots, block maxima, SED's bounds.
    n, vocab = 30, 9000
    logits, labels = make_batch(n, vocab, seed=51)
    logits[-6:, 17] += 40.0  # peaked: p_max ~ 1 >= tau, unmasked by the lower bound
    logits[8:14] *= 0.01  # flat: k p_max < tau, masked by the upper bound
    kw = knobs_for(name, {}, logits, labels)
    x = logits.clone().requires_grad_()
    loss_fn = build_loss(name, chunk_size=7, **kw)
    out = loss_fn(x, labels)
    out.loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = reference_mean(name, kw, ref_x, labels)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-7)
    keep = labels != IGNORE
    p = torch.softmax(logits.double()[keep], -1)
    ent = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(out.metrics["entropy"].double(), ent, rtol=1e-5, atol=1e-5)
    if name == "sed":
        exact = (p.topk(10, -1).values.sum(-1) < kw["tau"]).double().mean()
        assert out.metrics["mask_frac"].item() == pytest.approx(exact.item())


# 128-wide blocks with and without a partial last block; 16-wide blocks with one
@pytest.mark.parametrize("vocab", [9000, 8960, 527])
def test_sed_mask_bounds_decide_like_the_exact_top_k_mass(vocab):
    """The cheap bounds (p_max <= c_k <= k p_max, and the mass of the k largest block maxima
    <= c_k) must never decide a row differently from thresholding the exact float32 top-k
    mass, at any tau (ties included); each bound must decide rows here."""
    from sedsft.losses.engine import block_max
    from sedsft.losses.sed.loss import sed_mask

    g = torch.Generator().manual_seed(52)
    z = torch.randn(300, vocab, generator=g) * torch.logspace(-2, 1.2, 300)[:, None]
    z[::7, 3] += 30.0
    lse = torch.logsumexp(z, -1)
    bmax, zmax = block_max(z)
    assert torch.equal(zmax, z.amax(-1))
    for k in (1, 2, 10):
        mass = torch.exp(topk_logits(z, k) - lse[:, None]).sum(-1)
        p_max = torch.exp(zmax - lse)
        low = torch.exp(bmax.topk(k, -1).values - lse[:, None]).sum(-1)
        # tau >= 1 is decided exactly by design (test_sed_tau_one_equals_nomask...).
        taus = [t for t in mass[::13].tolist() if t < 1] + torch.linspace(0, 0.999, 23).tolist()
        decided = {"p_max": 0, "k p_max": 0, "block maxima": 0}
        for tau in taus:
            expected = (mass < tau).float()
            assert torch.equal(sed_mask(z, lse, zmax, k, tau, bmax=bmax), expected), (k, tau)
            assert torch.equal(sed_mask(z, lse, zmax, k, tau), expected), (k, tau)
            decided["p_max"] += int((p_max >= tau).sum())
            decided["k p_max"] += int((k * p_max * (1 + 1e-6 * k) < tau).sum())
            decided["block maxima"] += int(((low >= tau) & (p_max < tau)).sum())
        assert decided["p_max"] > 0, decided
        if k > 1:
            assert decided["k p_max"] > 0 and decided["block maxima"] > 0, decided


def test_sed_mask_frac_matches_topk_mass_below_tau():
    logits, labels = make_batch(64, 500, seed=12)
    for top_k in (1, 2, 10):
        tau = sed_tau_between(logits, labels, top_k)
        out = build_loss("sed", top_k=top_k, tau=tau, chunk_size=10)(logits, labels)
        frac = (topk_mass(logits, top_k, labels=labels) < tau).double().mean()
        assert out.metrics["mask_frac"].item() == pytest.approx(frac.item())


def run_with_grad(loss_fn, logits, labels):
    x = logits.clone().requires_grad_()
    out = loss_fn(x, labels)
    out.loss.backward()
    return out, x.grad


def test_sed_tau_one_equals_nomask_and_tau_zero_equals_ce():
    logits, labels = make_batch(50, 300, seed=13)
    # Peaked rows whose float32 top-k mass rounds to exactly 1.0.
    logits[-5:, 0] = 200.0
    assert (topk_mass(logits[-5:], 10) == 1.0).all()
    sed1, g1 = run_with_grad(build_loss("sed", lam=0.7, tau=1.0, chunk_size=8), logits, labels)
    nomask, g2 = run_with_grad(build_loss("sed_nomask", lam=0.7, chunk_size=8), logits, labels)
    assert torch.equal(sed1.loss, nomask.loss) and torch.equal(g1, g2)
    assert sed1.metrics["mask_frac"].item() == 1.0

    # k >= V: c_k is exactly 1, so nothing is masked even at tau = 1.
    small = logits[:, :8]
    big_k, _ = run_with_grad(build_loss("sed", top_k=8, tau=1.0), small, labels.clamp(max=7))
    assert big_k.metrics["mask_frac"].item() == 0.0

    sed0, g3 = run_with_grad(build_loss("sed", lam=0.7, tau=0.0, chunk_size=8), logits, labels)
    ce, g4 = run_with_grad(build_loss("ce", chunk_size=8), logits, labels)
    assert torch.equal(sed0.loss, ce.loss) and torch.equal(g3, g4)
    assert sed0.metrics["mask_frac"].item() == 0.0 and sed0.metrics["reg"].item() == 0.0


def test_sed_calibration_state():
    loss_fn = build_loss("sed")
    assert loss_fn.needs_calibration
    logits, labels = make_batch(8, 20)
    with pytest.raises(RuntimeError, match="tau is not set"):
        loss_fn(logits, labels)
    loss_fn.set_tau(0.25)
    assert not loss_fn.needs_calibration
    state = loss_fn.state_dict()
    assert state["tau"].item() == pytest.approx(0.25)
    fresh = build_loss("sed")
    fresh.load_state_dict(state)
    assert not fresh.needs_calibration and fresh.tau.item() == pytest.approx(0.25)
    fresh.to(torch.bfloat16)
    assert fresh.tau.dtype == torch.float32 and fresh.tau.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fresh.set_tau(1.5)

    release = build_loss("sed", top_k=2, calib_top_k=10, calib_positions="all")
    assert release.calibration_top_k == 10 and release.top_k == 2
    assert build_loss("sed", top_k=4).calibration_top_k == 4
    tau = release.calibrate(torch.linspace(0.1, 1.0, 10))
    assert tau == pytest.approx(0.4) and release.tau.item() == pytest.approx(0.4)


def test_token_stats():
    logits, labels = make_batch(30, 80, seed=14)
    keep = labels != IGNORE
    sed = build_loss("sed", top_k=3, tau=0.5, chunk_size=7)
    out = sed(logits, labels, return_token_stats=True)
    assert out.token_stats["topk_mass"].shape == (int(keep.sum()),)
    torch.testing.assert_close(out.token_stats["topk_mass"], topk_mass(logits, 3, labels=labels))
    p = torch.softmax(logits.double()[keep], -1)
    torch.testing.assert_close(
        out.token_stats["entropy"].double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5
    )
    ce = build_loss("ce", stats_top_k=5)(logits, labels, return_token_stats=True)
    torch.testing.assert_close(ce.token_stats["topk_mass"], topk_mass(logits, 5, labels=labels))
    assert build_loss("ce")(logits, labels).token_stats is None


# -- exact values -----------------------------------------------------------------------------
def test_label_smoothing_by_hand():
    # The worked example (docs/losses.md, "Add a loss"); these exact values are an extra: the
    # parametrised tests above already cover it from its file alone.
    # z = [0, log 3]: p = [1/4, 3/4]; y = 0, eps = 0.2.
    z = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    out = build_loss("label_smoothing", eps=0.2)(z, torch.tensor([0]))
    out.loss.backward()
    expected = 0.8 * math.log(4) + 0.2 * (math.log(4) + math.log(4 / 3)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # d/dz = p - (1 - eps) e_y - eps / V = [1/4 - 0.8 - 0.1, 3/4 - 0.1]
    torch.testing.assert_close(z.grad, torch.tensor([[-0.65, 0.65]]), rtol=1e-6, atol=1e-6)
    uniform = build_loss("label_smoothing", eps=0.3)(torch.zeros(3, 50), torch.tensor([0, 7, 9]))
    assert uniform.loss.item() == pytest.approx(math.log(50), rel=1e-6)
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\)"):
        build_loss("label_smoothing", eps=1.0)


# Hand-sized cases: logits log(weights), so p is the normalised weights and every value and
# gradient below is worked out on paper from the paper's formula (not from the code).
# Two classes z = [0, log 3]: p = [1/4, 3/4]. Three classes z = log [1, 2, 5]: p = [1, 2, 5] / 8.
L = math.log
S = 1 / (1 + 3**-0.01)  # sigmoid(0.01 * (log 3 - 0)): GEM's logsigmoid weight of class 1 for y = 0
H2 = L(4) - 0.75 * L(3)  # H([1/4, 3/4])
HAND_CASES = [
    # (name, knobs, class weights, y, value, d value / d z, what the case pins down)
    ("ce", {}, [1, 3], 1, L(4 / 3), [1 / 4, -1 / 4], "-log p_y; gradient p - e_y"),
    # DFT: the gradient is p_y (p - e_y); without sg(p_y) it would be p_y (1 + log p_y) (p - e_y).
    ("dft", {}, [1, 3], 1, 0.75 * L(4 / 3), [3 / 16, -3 / 16], "-sg(p_y) log p_y"),
    ("dft", {}, [1, 3], 0, 0.25 * L(4), [-3 / 16, 3 / 16], "-sg(p_y) log p_y"),
    # Entropy bonus: -log p_y - lam H; dH/dz_j = -p_j (log p_j + H).
    ("entropy", {"lam": 0.5}, [1, 3], 0, L(4) - 0.5 * H2,
     [0.25 - 1 + 0.5 * 0.25 * (L(0.25) + H2), 0.75 + 0.5 * 0.75 * (L(0.75) + H2)],
     "-log p_y - lam H(p): a bonus lowers the loss"),
    # GEM with beta = 1/2: q = softmax(2 z) = [1, 9] / 10. Value sum_v q_v w_v (z_v - z_y).
    ("gem", {"beta": 0.5, "h": "linear"}, [1, 3], 0, 0.9 * L(3), [-0.9, 0.9], "q = softmax(z / beta)"),
    ("gem", {"beta": 0.5, "h": "linear"}, [1, 3], 1, -0.1 * L(3), [0.1, -0.1], "q = softmax(z / beta)"),
    # logsigmoid: w = [sigmoid(0), sigmoid(0.01 log 3)] = [1/2, S]; a = q w = [0.05, 0.9 S];
    # gradient a - (sum a) e_y.
    ("gem", {"beta": 0.5, "h": "logsigmoid"}, [1, 3], 0, 0.9 * S * L(3), [-0.9 * S, 0.9 * S],
     "w_v = sg(sigmoid(0.01 (z_v - z_y)))"),
    # SED, k = 1: c_1 = 3/4. Masked (tau 0.8): +lam (1/4 - 1/2)^2, gradient (p - e_y) times
    # 1 - 2 lam (p_y - 1/2) p_y = 1 + 1/8. Unmasked (tau 0.7): CE.
    ("sed", {"lam": 1.0, "top_k": 1, "tau": 0.8}, [1, 3], 0, L(4) + 1 / 16, [-27 / 32, 27 / 32],
     "masked: -log p_y + lam (p_y - 1/2)^2"),
    ("sed", {"lam": 1.0, "top_k": 1, "tau": 0.7}, [1, 3], 0, L(4), [-3 / 4, 3 / 4], "unmasked (c_k >= tau): CE"),
    # SED, three classes, k = 2: c_2 = 7/8; y = 1 (p_y = 1/4), lam = 2: factor 1 + 1/4.
    ("sed", {"lam": 2.0, "top_k": 2, "tau": 0.9}, [1, 2, 5], 1, L(4) + 1 / 8,
     [5 / 32, -15 / 16, 25 / 32], "masked: c_2 = 7/8 < tau"),
    ("sed", {"lam": 2.0, "top_k": 2, "tau": 0.85}, [1, 2, 5], 1, L(4), [1 / 8, -3 / 4, 5 / 8],
     "unmasked: c_2 = 7/8 >= tau"),
    # sed_nomask, p_y = 3/4: +(1/4)^2; factor 1 - 2 (1/4)(3/4) = 5/8.
    ("sed_nomask", {"lam": 1.0}, [1, 3], 1, L(4 / 3) + 1 / 16, [5 / 32, -5 / 32],
     "-log p_y + lam (p_y - 1/2)^2 everywhere"),
    # Label smoothing, eps = 0.2, y = 0: gradient p - (1 - eps) e_y - eps / V.
    ("label_smoothing", {"eps": 0.2}, [1, 3], 0, 0.8 * L(4) + 0.1 * (L(4) + L(4 / 3)),
     [0.25 - 0.8 - 0.1, 0.75 - 0.1], "-(1 - eps) log p_y - eps mean_v log p_v"),
]  # fmt: skip
HAND_IDS = [
    f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}-y{y}" for n, kw, _, y, *_ in HAND_CASES
]


def test_hand_cases_cover_every_loss():
    missing = sorted(set(LOSS_NAMES) - {case[0] for case in HAND_CASES})
    assert not missing, (
        f"no hand case for {missing}: add (name, knobs, class weights, y, value, gradient, what) "
        "worked out on paper from the paper's formula to HAND_CASES in tests/test_losses.py"
    )


@pytest.mark.parametrize("analytic", [True, False], ids=["analytic", "autograd"])
@pytest.mark.parametrize(
    ("name", "kw", "weights", "y", "value", "grad", "what"), HAND_CASES, ids=HAND_IDS
)
def test_hand_case(name, kw, weights, y, value, grad, what, analytic):
    """Value and gradient of one target row, worked out on paper, for the loss (both paths
    of the engine) and for its reference in loss_references.py."""
    z64 = torch.tensor([weights], dtype=torch.float64).log()
    expected, expected_grad = (
        torch.tensor(value, dtype=torch.float64),
        torch.tensor([grad], dtype=torch.float64),
    )
    ref_z = z64.clone().requires_grad_()
    ref = reference(name, ref_z, torch.tensor([y]), **kw).sum()
    ref.backward()
    torch.testing.assert_close(
        ref.detach(), expected, msg=lambda m: f"reference {name} {kw} ({what}): value\n{m}"
    )
    torch.testing.assert_close(
        ref_z.grad, expected_grad, msg=lambda m: f"reference {name} {kw}: gradient\n{m}"
    )

    z = z64.float().requires_grad_()
    out = make_loss(name, kw, analytic)(z, torch.tensor([y]))
    out.loss.backward()
    path = "chunk" if analytic and LOSSES[name].has_analytic_gradient() else "value (autograd)"
    torch.testing.assert_close(
        out.loss.double(), expected, rtol=1e-6, atol=1e-6,
        msg=lambda m: f"{name} {kw} via {path}: loss value is not the paper's ({what})\n{m}",
    )  # fmt: skip
    torch.testing.assert_close(
        z.grad.double(), expected_grad, rtol=1e-5, atol=1e-6,
        msg=lambda m: f"{name} {kw} via {path}: gradient is not the paper's ({what})\n{m}",
    )  # fmt: skip


def test_dft_uniform_two_classes_is_half_ce():
    out = build_loss("dft")(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
    assert out.loss.item() == pytest.approx(math.log(2) / 2)
    assert out.metrics["ce"].item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("vocab", [7, 1000])
def test_entropy_metric_of_uniform_logits_is_log_v(vocab):
    out = build_loss("ce")(torch.zeros(3, vocab), torch.tensor([0, 1, 2]))
    assert out.metrics["entropy"].item() == pytest.approx(math.log(vocab), rel=1e-6)
    assert out.loss.item() == pytest.approx(math.log(vocab), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "kw"), [("sed", {"tau": 0.6}), ("sed_nomask", {}), ("entropy", {})]
)
def test_zero_weight_regulariser_equals_ce(name, kw):
    logits, labels = make_batch(20, 64, seed=15)
    out, grad = run_with_grad(build_loss(name, lam=0.0, chunk_size=6, **kw), logits, labels)
    ce, ce_grad = run_with_grad(build_loss("ce", chunk_size=6), logits, labels)
    torch.testing.assert_close(out.loss, ce.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ce_grad, rtol=0, atol=0)
    assert out.metrics["reg"].item() == 0.0


# -- construction -------------------------------------------------------------------------------
def test_bad_names_and_knobs_list_allowed_values():
    with pytest.raises(ValueError, match=r"unknown loss 'focal'; choose one of \[") as err:
        build_loss("focal")
    assert all(f"'{name}'" in str(err.value) for name in LOSS_NAMES)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\].*'top_k'.*'tau'"):
        build_loss("sed", topk=3)
    with pytest.raises(ValueError, match=r"\['beta'\].*allowed: \[\]|\['beta'\].*chunk_size"):
        build_loss("ce", beta=0.5)
    bad = [
        ("sed", {"top_k": 0}, "top_k must be an int >= 1"),
        ("sed", {"tau": 1.5}, r"tau must be a number in \[0, 1\]"),
        ("sed", {"tau": -0.1}, r"tau must be a number in \[0, 1\]"),
        ("sed", {"lam": -1.0}, "lam must be a number >= 0"),
        ("sed", {"cumsum_ratio": 0.0}, r"cumsum_ratio must be in \(0, 1\]"),
        ("sed", {"calib_positions": "prompt"}, r"one of \['target', 'all'\]"),
        ("sed", {"calib_top_k": 0}, "calib_top_k must be an int >= 1 or None"),
        ("gem", {"beta": 0.0}, "beta must be a number > 0"),
        ("gem", {"h": "tanh"}, r"h must be one of \['linear', 'logsigmoid'\]"),
        ("entropy", {"lam": -0.5}, "lam must be a number >= 0"),
        ("ce", {"chunk_size": 0}, "chunk_size must be an int >= 1 or None"),
    ]
    for name, kw, message in bad:
        with pytest.raises(ValueError, match=message):
            build_loss(name, **kw)


def test_losses_are_modules_and_labels_are_checked():
    for name in LOSS_NAMES:
        loss_fn = build_loss(name)
        assert isinstance(loss_fn, torch.nn.Module)
        loss_fn.state_dict()
    with pytest.raises(ValueError, match="leading shape"):
        build_loss("ce")(torch.randn(4, 5, 9), torch.zeros(4, 6, dtype=torch.long))
    assert isinstance(build_loss("sed", tau=0.3), SEDLoss)


# -- engine pieces and calibration ----------------------------------------------------------------
def test_plan_chunks_uses_views_for_runs_and_covers_everything():
    labels = torch.full((60,), IGNORE)
    labels[5:30] = 1  # a long run -> views
    labels[[33, 35, 37, 40, 42]] = 1  # fragments -> a gather
    labels[45:60] = 1
    idx = torch.nonzero(labels != IGNORE).flatten()
    plan = plan_chunks(idx, rows=8)
    assert [e - s for s, e, _ in plan] and all(e - s <= 8 for s, e, _ in plan)
    assert plan[0][0] == 0 and plan[-1][1] == idx.numel()
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:], strict=False))
    for s, e, first in plan:
        if first is not None:
            assert torch.equal(idx[s:e], torch.arange(first, first + e - s))
    assert any(f is None for *_, f in plan) and sum(f is not None for *_, f in plan) >= 4


@pytest.mark.parametrize(
    ("vocab", "k"),
    [(3000, 1), (3000, 10), (3072, 3), (1000, 2), (527, 10), (4096, 10), (300, 10), (5, 10)],
)
def test_blocked_topk_matches_torch_topk(vocab, k):
    from sedsft.losses.engine import block_max

    z = torch.randn(17, vocab)
    z[3] = torch.randint(0, 4, (vocab,)).float()  # heavy ties
    expected = z.topk(min(k, vocab), -1).values
    assert torch.equal(topk_logits(z, k), expected)
    bmax, zmax = block_max(z)
    assert torch.equal(zmax, z.amax(-1))
    assert torch.equal(topk_logits(z, k, bmax), expected)
    rows = torch.tensor([16, 3, 0, 3])
    assert torch.equal(topk_logits(z, k, bmax, rows=rows), expected[rows])
    assert torch.equal(topk_logits(z, k, rows=rows), expected[rows])


def test_row_dot_matches_the_product_sum():
    from sedsft.losses.engine import row_dot

    g = torch.Generator().manual_seed(53)
    for vocab in (100, 9000):  # multiply-and-sum, then one BLAS dot per row
        a, b = torch.rand(5, vocab, generator=g), torch.rand(5, vocab, generator=g) - 0.2
        expected = (a.double() * b.double()).sum(-1)
        got = row_dot(a, b, torch.empty(5, vocab))
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_topk_mass_shapes_and_values():
    logits, labels = make_batch(12, 40, seed=16)
    mass = topk_mass(logits.view(3, 4, 40), 5)
    assert mass.shape == (3, 4) and mass.dtype == torch.float32
    expected = torch.softmax(logits.double(), -1).topk(5, -1).values.sum(-1).view(3, 4)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-6, atol=1e-6)
    assert topk_mass(logits, 5, labels=labels).shape == (int((labels != IGNORE).sum()),)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        topk_mass(logits, 0)


def test_tau_from_topk_mass():
    values = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 1.0, 0.4, 0.6, 0.8])
    # 7 of 10 at or above tau -> sorted[3] = 0.4; 0.1, 0.2, 0.3 are masked.
    assert tau_from_topk_mass(values, 0.7) == pytest.approx(0.4)
    assert tau_from_topk_mass(values, 1.0) == pytest.approx(0.1)
    assert tau_from_topk_mass(values, 0.05) == pytest.approx(1.0)
    rand = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for ratio in (0.3, 0.7, 0.9):
        tau = tau_from_topk_mass(rand, ratio)
        assert (rand >= tau).double().mean().item() == pytest.approx(ratio, abs=1.5e-3)
    with pytest.raises(ValueError, match="non-empty"):
        tau_from_topk_mass(torch.tensor([]), 0.7)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tau_from_topk_mass(values, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tau_from_topk_mass(values, 1.5)


def test_benchmark_dense_formulas_match_the_losses(monkeypatch):
    # The benchmark's dense baselines (the loss's value on the full logits) and the engine
    # must both compute the paper's formula, checked against the independent reference.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "losses.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling module measure
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits, labels = make_batch(30, 300, seed=31)
    for name, knobs in bench.LOSS_SPECS.values():
        knobs = dict(knobs)
        if name == "sed":
            knobs["tau"] = sed_tau_between(logits, labels, knobs["top_k"])
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        dense = bench.dense_loss(name, knobs, x1, labels)
        dense.backward()
        out = build_loss(name, **knobs)(x2, labels)
        out.loss.backward()
        torch.testing.assert_close(out.loss, dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)
        x3 = logits.double().requires_grad_()
        ref = reference_mean(name, knobs, x3, labels)
        ref.backward()
        what = f"benchmark dense {name} {knobs} vs its paper formula"
        torch.testing.assert_close(
            dense.double(),
            ref.detach(),
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, what=what: f"{what}: loss\n{m}",
        )
        torch.testing.assert_close(
            x1.grad.double(),
            x3.grad,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, what=what: f"{what}: gradient\n{m}",
        )
