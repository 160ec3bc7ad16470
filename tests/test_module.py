"""The LightningModule: token normalisation across gradient accumulation, loss paths."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_config
from sedsft.checkpoints import loss_from_stored, loss_meta, loss_state
from sedsft.losses import Preparation, TokenLoss, build_loss
from sedsft.models.tiny import TinyLMSpec
from sedsft.sft.module import SFTModule


@pytest.fixture(scope="module")
def tiny_spec(cache_dir):
    return TinyLMSpec(cache_dir=str(cache_dir / "models"))


def batch_of(rows: list[list[int]], targets_from: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels start at ``targets_from[i]`` in row i."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, targets_from, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = torch.tensor(row[start:])
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def weight_change(spec, batches, accumulate: int, fused: str = "false") -> torch.Tensor:
    """With SGD(lr=1), no clipping and no schedule, the update is minus the gradient."""
    torch.manual_seed(0)
    module = SFTModule(
        lm=spec,
        loss=build_loss("ce"),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        fused_loss=fused,
    )
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters()])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    after = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    return before - after


def test_accumulation_normalises_over_all_tokens_of_the_window(tiny_spec):
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (30, 12, 25)]
    starts = [5, 4, 20]  # 25, 8 and 5 target tokens: micro-batches of 33 and 5 targets
    first, second = batch_of(rows[:2], starts[:2]), batch_of(rows[2:], starts[2:])
    together = batch_of(rows, starts)

    accumulated = weight_change(tiny_spec, [first, second], accumulate=2)
    single = weight_change(tiny_spec, [together], accumulate=1)
    torch.testing.assert_close(accumulated, single, rtol=1e-4, atol=1e-7)

    # The test can fail: a mean of per-micro-batch means weights the 5 tokens of the
    # second micro-batch like the 33 of the first and moves the weights differently.
    mean_of_means = (weight_change(tiny_spec, [first], 1) + weight_change(tiny_spec, [second], 1)) / 2
    assert not torch.allclose(mean_of_means, single, rtol=1e-2, atol=1e-6)


def test_fused_path_matches_logits_path(tiny_spec):
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (20, 14)]
    batch = batch_of(rows, [6, 3])
    fused = weight_change(tiny_spec, [batch], 1, fused="true")
    dense = weight_change(tiny_spec, [batch], 1, fused="false")
    torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-7)


def test_fused_true_rejected_without_linear_head(tiny_spec):
    module = SFTModule(lm=tiny_spec, loss=build_loss("ce"), optimizer=torch.optim.SGD, fused_loss="true")
    module.configure_model()
    module.model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="fused_loss=true but the model has no separate linear LM head"):
        module.use_fused()


def test_bad_fused_option(tiny_spec):
    with pytest.raises(ValueError, match="allowed: auto, true, false"):
        SFTModule(lm=tiny_spec, loss=build_loss("ce"), optimizer=torch.optim.SGD, fused_loss="yes")


def test_tau_calibrated_once_and_stored(tmp_path, cache_dir):
    from sedsft.sft.training import train

    cfg = compose_config(tmp_path, cache_dir, "loss=sed", "trainer.max_steps=2")
    metrics = train(cfg)
    assert 0.0 < metrics["calibration/tau"] <= 1.0
    # ~30% of calibration positions are masked by construction (cumsum_ratio 0.7)
    assert 0.2 < metrics["calibration/mask_rate"] < 0.4
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["loss_fn.tau"].item() == pytest.approx(metrics["calibration/tau"])


class CalibratedTemperatureCE(TokenLoss, register=False):
    """``-log softmax(z / T)_y`` with ``T`` measured on the initial model before training
    (its held-out cross-entropy): a loss that prepares itself, through the contract only."""

    name = "calibrated_temperature"

    def __init__(self, chunk_size=None, stats_top_k=10):
        super().__init__(chunk_size, stats_top_k)
        self.register_buffer("temperature", torch.tensor(math.nan))
        self.preparations = 0

    @property
    def needs_preparation(self) -> bool:
        return math.isnan(float(self.temperature))

    @torch.no_grad()
    def prepare(self, prep: Preparation) -> dict[str, float]:
        self.preparations += 1
        probe = build_loss("ce")
        outs = [prep.step(batch, loss_fn=probe) for batch in prep.heldout(3)]
        value = float(sum(o.loss_sum for o in outs) / sum(o.num_tokens for o in outs))
        if prep.broadcast is not None:
            value = float(prep.broadcast(torch.tensor(value)))
        self.temperature.fill_(value)
        return {"prepared/temperature": value}

    def value(self, z, y):
        assert not self.needs_preparation, "trained before it was prepared"
        logp = torch.log_softmax(z / self.temperature, -1)
        return -logp.gather(1, y.unsqueeze(1)).squeeze(1)


class HeldOut(L.LightningDataModule):
    """Training batches, and the held-out batches a loss prepares itself on."""

    def __init__(self, train, heldout):
        super().__init__()
        self.train, self.heldout, self.asked = train, heldout, []

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None)

    def heldout_dataloader(self, num_examples):
        self.asked.append(num_examples)
        return self.heldout


def test_a_loss_prepares_itself_once_before_training_and_keeps_its_state(tiny_spec, tmp_path):
    """SFTModule calls the contract's hooks only: ``prepare`` runs once, before the first
    step, on the held-out batches through the training forward (the value equals the
    initial model's held-out cross-entropy recomputed in float64 from its logits), its
    scalars reach the run's metrics, and the state lands in the checkpoint and the export."""
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (18, 11, 15)]
    heldout, train = batch_of(rows[:2], [4, 2]), batch_of(rows[2:], [5])
    loss_fn = CalibratedTemperatureCE()
    module = SFTModule(lm=tiny_spec, loss=loss_fn, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    module.configure_model()
    with torch.no_grad():
        logits = module.model(input_ids=heldout["input_ids"], attention_mask=heldout["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = heldout["labels"][:, 1:]
    keep = labels != -100
    expected = float(-logp[keep].gather(1, labels[keep].unsqueeze(1)).mean())

    datamodule = HeldOut([train], [heldout])
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert loss_fn.preparations == 1 and datamodule.asked == [3]
    assert float(loss_fn.temperature) == pytest.approx(expected, rel=1e-5)
    assert module.run_metrics == {"prepared/temperature": pytest.approx(expected, rel=1e-5)}
    assert module.state_dict()["loss_fn.temperature"] == loss_fn.temperature
    assert loss_meta(loss_fn) == {"loss": "CalibratedTemperatureCE", "temperature": pytest.approx(expected, rel=1e-5)}

    trainer.fit(module, datamodule=datamodule)  # already prepared: not again
    assert loss_fn.preparations == 1


def test_loss_state_travels_from_a_checkpoint_into_a_rebuilt_loss():
    """What a loss measured is its buffers: a loss rebuilt from a checkpoint's stored config
    gets them back (SED's tau), an export records them, and a state that does not fit the
    named loss is refused naming the file."""
    sed = build_loss("sed")
    sed.set_tau(0.625)
    checkpoint = {"state_dict": {"model.w": torch.zeros(1), **{f"loss_fn.{k}": v for k, v in sed.state_dict().items()}}}
    assert loss_state(checkpoint) == {"tau": sed.tau}
    stored = {"_target_": "sedsft.losses.build_loss", "name": "sed", "top_k": 3}
    rebuilt = loss_from_stored(stored, "run/last.ckpt", state=loss_state(checkpoint))
    assert float(rebuilt.tau) == 0.625 and rebuilt.top_k == 3 and not rebuilt.needs_preparation
    assert loss_meta(rebuilt) == {"loss": "SEDLoss", "tau": 0.625}
    assert loss_meta(build_loss("sed")) == {"loss": "SEDLoss", "tau": None}  # not calibrated yet
    assert loss_meta(build_loss("ce")) == {"loss": "CELoss"}
    with pytest.raises(ValueError, match=r"run/last.ckpt: the checkpoint's loss state \['tau'\] does not fit loss 'ce'"):
        loss_from_stored({"_target_": "sedsft.losses.build_loss", "name": "ce"}, "run/last.ckpt", state=loss_state(checkpoint))


def test_export_meta_records_every_buffer_as_plain_numbers():
    class Table(TokenLoss, register=False):
        name = "table"

        def __init__(self):
            super().__init__()
            self.register_buffer("counts", torch.tensor([1.0, 2.5]))
            self.register_buffer("unset", torch.tensor(math.nan))

        def value(self, z, y):
            return torch.logsumexp(z, -1)

    assert Table().export_meta() == {"counts": [1.0, 2.5], "unset": None}
