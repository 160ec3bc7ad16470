"""Non-finite loss or gradients (``module.nonfinite``): ``stop`` raises with the step, the
batch, the data rows and the loss parts; ``skip`` leaves weights and optimiser state as
they were for that step, counts it in ``train/skipped_nonfinite`` and stops past
``module.max_nonfinite_skips``. Faults are injected with hooks on one chosen batch."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sedsft.losses import build_loss
from sedsft.models.tiny import TinyLMSpec
from sedsft.sft.module import SFTModule

STEPS = 4


@pytest.fixture(scope="module")
def tiny_spec(cache_dir):
    return TinyLMSpec(cache_dir=str(cache_dir / "models"))


def batches(n: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of two rows; batch ``i`` carries data rows ``100 i`` and ``100 i + 1``."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 400, (2, 24), generator=generator)
        labels = ids.clone()
        labels[:, :8] = -100
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "attention_mask": torch.ones_like(ids),
                "rows": torch.tensor([100 * i, 100 * i + 1]),
            }
        )
    return out


class Fault(L.Callback):
    """Arms a fault for the batches in ``bad``, and records the weights and the optimiser
    state around every step."""

    def __init__(self, bad: set[int]):
        self.bad, self.armed, self.changed = bad, False, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.armed = batch_idx in self.bad
        self.before = (snapshot(module.model.parameters()), optimizer_snapshot(trainer))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        weights, state = snapshot(module.model.parameters()), optimizer_snapshot(trainer)
        self.changed[batch_idx] = (
            not torch.equal(weights, self.before[0]),
            not _same_state(state, self.before[1]),
        )


def snapshot(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


def optimizer_snapshot(trainer) -> list[dict]:
    state = trainer.optimizers[0].state
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in state.values()]


def _same_state(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def fit(spec, fault: Fault, inject: str, loss: str = "ce", fused: str = "false", **module_kwargs):
    """Train ``STEPS`` steps with AdamW; ``inject`` is ``logits`` (inf from the LM head, or
    into the final hidden states on the fused path) or ``gradient`` (NaN in one gradient)."""
    torch.manual_seed(0)
    knobs = {"tau": 0.9} if loss == "sed" else {}
    module = SFTModule(
        lm=spec,
        loss=build_loss(loss, **knobs),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        fused_loss=fused,
        **module_kwargs,
    )
    module.configure_model()
    model = module.model
    if inject == "logits":
        # the fused path never calls the LM head: poison its input instead
        target = model.model.norm if fused == "true" else model.lm_head
        target.register_forward_hook(lambda m, args, out: out.masked_fill(torch.tensor(fault.armed), float("inf")))
    else:
        model.model.embed_tokens.weight.register_hook(lambda g: g * float("nan") if fault.armed else g)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[fault],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches(), batch_size=None))
    return module, trainer


@pytest.mark.parametrize(("loss", "fused"), [("ce", "false"), ("sed", "true")])
def test_stop_on_inf_logits_names_step_batch_rows_and_loss_parts(tiny_spec, loss, fused):
    with pytest.raises(FloatingPointError) as caught:
        fit(tiny_spec, Fault({2}), "logits", loss=loss, fused=fused)
    message = str(caught.value)
    assert "non-finite loss at global step 2 (batch 2, data rows [200, 201]); loss parts {'loss': " in message
    assert "set module.nonfinite=skip" in message
    if loss == "sed":
        assert "'reg': " in message and "'mask_frac': " in message


def test_skip_on_inf_logits_leaves_that_step_out(tiny_spec):
    fault = Fault({1})
    module, trainer = fit(tiny_spec, fault, "logits", nonfinite="skip")
    assert fault.changed[1] == (False, False)  # weights, optimiser state
    assert all(fault.changed[i] == (True, True) for i in (0, 2, 3))
    assert module.nonfinite_skips == 1
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1.0
    assert trainer.global_step == STEPS


def test_skip_stops_past_the_cap(tiny_spec):
    with pytest.raises(FloatingPointError) as caught:
        fit(tiny_spec, Fault({1, 2}), "logits", nonfinite="skip", max_nonfinite_skips=1)
    message = str(caught.value)
    assert "2 non-finite steps skipped, more than module.max_nonfinite_skips=1" in message
    assert "last: non-finite loss at global step 2 (batch 2, data rows [200, 201])" in message


def test_stop_on_nan_gradient(tiny_spec):
    with pytest.raises(FloatingPointError) as caught:
        fit(tiny_spec, Fault({1}), "gradient")
    assert "non-finite gradient at global step 1 (batch 1, data rows [100, 101])" in str(caught.value)


def test_skip_on_nan_gradient_leaves_weights_and_optimizer_state(tiny_spec):
    fault = Fault({2})
    module, trainer = fit(tiny_spec, fault, "gradient", nonfinite="skip")
    assert fault.changed[2] == (False, False)
    assert all(fault.changed[i] == (True, True) for i in (0, 1, 3))
    assert module.nonfinite_skips == 1
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1.0
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
