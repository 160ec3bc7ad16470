"""The LightningModule: token normalisation across gradient accumulation, loss paths."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_config
from sedsft.losses import build_loss
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
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"]["loss_fn.tau"].item() == pytest.approx(metrics["calibration/tau"])
