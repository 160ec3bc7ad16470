"""Where the mask falls: per-kind statistics of a model over toy solutions, and their table."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sedsft.data import toy_math
from sedsft.evaluation.positions import (
    encode_with_kinds,
    position_report,
    report_loss,
    summarize,
    token_statistics,
)
from sedsft.losses import build_loss
from sedsft.losses.sed import SEDLoss
from sedsft.pipeline.summary import collect, summary_tables


def test_summarize_by_hand():
    stats = {
        "kind": torch.tensor([0, 1, 1, 2, 2, 2]),  # style, number, number, text x3
        "topk_mass": torch.tensor([0.2, 0.9, 0.4, 0.6, 0.45, 0.95]),
        "p_target": torch.tensor([0.1, 0.8, 0.3, 0.5, 0.2, 0.9]),
        "top1": torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
    }
    unmasked = dict(stats)
    stats["masked"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # c_k < 0.5
    out = summarize(stats, prefix="sft/")
    assert out["sft/mask_rate/style"] == 1.0
    assert out["sft/mask_rate/number"] == 0.5  # 0.4 < 0.5, 0.9 is not
    assert out["sft/mask_rate/text"] == pytest.approx(1 / 3)  # only 0.45
    assert out["sft/top1_acc/text"] == pytest.approx(2 / 3)
    assert out["sft/p_target/number"] == pytest.approx(0.55)
    assert out["sft/topk_mass/style"] == pytest.approx(0.2)
    assert out["sft/count/text"] == 3.0
    assert "mask_rate/style" not in "".join(summarize(unmasked))  # no mask, no mask rate


@pytest.fixture(scope="module")
def small_lm(chatml_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(chatml_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_token_statistics_match_a_float64_reference_per_row(small_lm, chatml_tokenizer):
    """Batched with padding, the statistics of each labelled token equal those computed
    row by row in float64 from the logits that predict it (the one before it)."""
    rows = toy_math.generate(5, seed=4)
    stats = token_statistics(small_lm, chatml_tokenizer, rows, SEDLoss(top_k=3), batch_size=2)
    assert "masked" not in stats  # no tau yet: no mask
    expected = {"kind": [], "topk_mass": [], "p_target": []}
    for row in rows:
        ids, kinds = encode_with_kinds(chatml_tokenizer, row["question"], row["response"])
        with torch.no_grad():
            logits = small_lm(input_ids=torch.tensor([ids])).logits[0].double()
        probs = torch.softmax(logits, -1)
        for t in range(1, len(ids)):
            if kinds[t] is not None:
                expected["kind"].append(toy_math.POSITION_KINDS.index(kinds[t]))
                expected["topk_mass"].append(float(probs[t - 1].topk(3).values.sum()))
                expected["p_target"].append(float(probs[t - 1, ids[t]]))
    assert stats["kind"].tolist() == expected["kind"]
    assert expected["kind"].count(0) == 5  # one style position per solution
    torch.testing.assert_close(stats["topk_mass"].double(), torch.tensor(expected["topk_mass"], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["p_target"].double(), torch.tensor(expected["p_target"], dtype=torch.float64), atol=1e-5, rtol=0)
    # The mask is the loss's: 1[c_3 < tau] at a tau inside the range of these masses.
    mass = torch.tensor(expected["topk_mass"], dtype=torch.float64)
    tau = float(mass.median())
    masked = token_statistics(small_lm, chatml_tokenizer, rows, SEDLoss(top_k=3, tau=tau), batch_size=2)["masked"]
    clear = (mass - tau).abs() > 1e-6  # away from the threshold, float32 and float64 agree
    assert masked[clear].tolist() == (mass < tau).double()[clear].tolist()
    assert 0 < int(masked.sum()) < mass.numel()


def test_position_report_calibrates_tau_on_the_base(small_lm, chatml_tokenizer):
    rows = toy_math.generate(6, seed=5)
    report = position_report((small_lm, chatml_tokenizer), (small_lm, chatml_tokenizer), rows, SEDLoss(top_k=3))
    stats = token_statistics(small_lm, chatml_tokenizer, rows, SEDLoss(top_k=3))
    # 70% at or above tau: exactly n - ceil(0.7 n) masses below it (no ties among them)
    n = stats["topk_mass"].numel()
    below = int((stats["topk_mass"] < report["tau"]).sum())
    assert below == n - math.ceil(0.7 * n), f"{below} of {n} positions below tau, expected {n - math.ceil(0.7 * n)}"
    for kind in toy_math.POSITION_KINDS:  # the same model on both sides
        assert report[f"base/mask_rate/{kind}"] == report[f"sft/mask_rate/{kind}"]


def write_job(root: Path, loss: str, seed: int, mask_number: float, top1_number: float) -> None:
    job = root / f"{loss}_{seed}"
    job.mkdir(parents=True)
    positions = {"base/mask_rate/number": 0.5, "base/top1_acc/number": 0.2,
                 "sft/mask_rate/number": mask_number, "sft/top1_acc/number": top1_number}  # fmt: skip
    record = {"loss": loss, "seed": seed, "metrics": {"positions": positions, "rl": {"heldout/pass@1": 0.1}}}
    (job / "pipeline.json").write_text(json.dumps(record))


def test_summary_has_a_position_table_with_the_base_as_a_row(tmp_path):
    for seed in (1, 2):
        write_job(tmp_path, "ce", seed, 0.10, 0.60)
        write_job(tmp_path, "sed_nomask", seed, 0.20, 0.50)
    tables = summary_tables(collect(tmp_path), order=["ce", "sed_nomask"])
    table = tables["positions"]
    assert list(table.index) == ["base", "ce", "sed_nomask"]
    assert table.loc["base", "mask number"] == "0.500 ± 0.000" and table.loc["base", "seeds"] == 2
    assert table.loc["sed_nomask", "top1 number"] == "0.500 ± 0.000"
    assert tables["positions_vs_ce"].loc["sed_nomask", "top1 number"] == "-0.100 ± 0.000"


def test_position_report_takes_a_fixed_tau(small_lm, chatml_tokenizer):
    rows = toy_math.generate(4, seed=6)
    report = position_report((small_lm, chatml_tokenizer), (small_lm, chatml_tokenizer), rows, SEDLoss(top_k=3, tau=1.0))
    assert report["tau"] == 1.0
    assert all(report[f"sft/mask_rate/{kind}"] == 1.0 for kind in toy_math.POSITION_KINDS)  # c_3 < 1 everywhere


def test_report_loss_asks_the_runs_loss_for_a_fixed_threshold():
    """The report's mask is SED's at the report's k and ratio, at the SFT loss's own tau when
    it fixes one, else calibrated on the base (losses without a mask, or SED calibrating)."""
    fixed = report_loss({"_target_": "sedsft.losses.build_loss", "name": "sed", "tau": 0.98, "top_k": 2}, top_k=3, cumsum_ratio=0.6)
    assert (fixed.top_k, fixed.cumsum_ratio, float(fixed.tau)) == (3, 0.6, pytest.approx(0.98))
    for run_loss in ({"name": "sed"}, {"name": "ce"}, {"name": "sed_nomask", "lam": 0.5}):
        assert report_loss(run_loss).needs_calibration, run_loss
    with pytest.raises(ValueError, match="unknown loss 'sedd'"):
        report_loss({"name": "sedd"})
    assert build_loss("sed", tau=0.98).mask(torch.tensor([[9.0, 0.0, 0.0]])).tolist() == [0.0]
