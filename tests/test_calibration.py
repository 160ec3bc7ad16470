"""SED's tau calibration end to end on a fixed tiny batch: the training forward
(``SFTModule.model_step``) of a small causal LM, the positions it counts, tau and the
mask rate, each against a float64 computation from the model's logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sedsft.losses import build_loss
from sedsft.losses.sed.calibration import calibrate_tau, collect_topk_mass
from sedsft.sft.module import SFTModule

VOCAB = 40


@pytest.fixture(scope="module")
def module():
    """An ``SFTModule`` around a random 2-layer Llama (no Trainer: the logits path)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        initializer_range=0.5,  # spread-out logits: masses differ across positions
    )  # fmt: skip
    lm = SFTModule(lm=None, loss=build_loss("ce"), optimizer=torch.optim.SGD, fused_loss="false")
    lm.model = LlamaForCausalLM(config).eval()
    return lm


def tiny_batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows: 9 and 6 tokens, targets from position 5 and 3 (a prompt
    before them), so target, non-padding and padding positions all differ."""
    g = torch.Generator().manual_seed(7)  # tau differs between the two position sets
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    labels[1, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def expected_masses(model, batch, k: int, positions: str) -> torch.Tensor:
    """Top-k mass, in float64, of the logits that predict each counted token (the one
    before it): every non-padding token after the first (``all``) or every labelled one."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = torch.softmax(logits.double(), -1)
    out = []
    for row in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            counted = (
                batch["attention_mask"][row, t] == 1
                if positions == "all"
                else batch["labels"][row, t] != -100
            )
            if counted:
                out.append(float(p[row, t - 1].sort(descending=True).values[:k].sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("positions", "count"), [("all", 8 + 5), ("target", 4 + 3)])
def test_calibration_counts_the_chosen_positions(module, positions, count):
    batch = tiny_batch()
    got = collect_topk_mass(module.model_step, [batch], k=3, positions=positions)
    expected = expected_masses(module.model, batch, 3, positions)
    assert expected.numel() == count  # the batch is what its docstring says
    assert got.numel() == count, (
        f"calib_positions={positions!r} counted {got.numel()} positions, expected {count} "
        "(all: every non-padding token after the first; target: the labelled ones)"
    )
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("knobs", "count"),
    [
        ({"top_k": 3}, 7),  # loss=sed: one k, target positions
        ({"top_k": 3, "calib_positions": "all"}, 13),
        # loss=sed_release's shape: calibrate with a larger k over all positions, mask with
        # k = 2 (the release's 10 suits a large vocabulary; at 40 tokens it covers most mass)
        ({"top_k": 2, "calib_top_k": 4, "calib_positions": "all"}, 13),
    ],
)
def test_calibrate_tau_end_to_end(module, knobs, count):
    """tau is the cumsum_ratio quantile of the calibration masses (k = calib_top_k), and
    the mask rate is measured with the loss's own top_k on the same positions."""
    batch = tiny_batch()
    loss = build_loss("sed", cumsum_ratio=0.7, **knobs)
    tau, mask_rate = calibrate_tau(loss, [batch], module.model_step)

    positions = knobs.get("calib_positions", "target")
    calib = expected_masses(
        module.model, batch, knobs.get("calib_top_k") or knobs["top_k"], positions
    )
    assert calib.numel() == count
    # ceil(0.7 n) positions at or above tau: the (n - ceil(0.7 n))-th smallest mass
    expected_tau = float(calib.sort().values[count - math.ceil(0.7 * count)])
    assert tau == pytest.approx(expected_tau, abs=1e-5), "tau is not the 70% quantile of c_k"
    assert float(loss.tau) == pytest.approx(tau)

    train_k = expected_masses(module.model, batch, knobs["top_k"], positions)
    # The mass tau was taken from (same k) is at tau, so not below it; no other mass is
    # close enough to tau for float32 and float64 to disagree.
    at_tau = (train_k - tau).abs() < 1e-6
    assert int(at_tau.sum()) == (0 if "calib_top_k" in knobs else 1)
    assert (train_k[~at_tau] - tau).abs().min() > 1e-4
    expected_rate = float(((train_k < tau) & ~at_tau).double().mean())
    if "calib_top_k" not in knobs:
        assert expected_rate == pytest.approx((count - math.ceil(0.7 * count)) / count)
    assert mask_rate == pytest.approx(expected_rate), (
        f"mask rate {mask_rate} is not the fraction of top_k={knobs['top_k']} masses below tau "
        f"({expected_rate})"
    )
    if "calib_top_k" in knobs:
        # The release's quirk shows: with k = 2 more positions fall below a tau taken at k = 4.
        calib_rate = float((calib < tau).double().mean())
        assert expected_rate > calib_rate, (expected_rate, calib_rate)
