"""Generation-time evaluation: the entropy tracker, sampling, scoring, and ``src/eval.py`` on a
trained run (run dir, HF export, Lightning checkpoint) and on verl-style RL parquet."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, compose_config
from sedsft.checkpoints import load_model
from sedsft.evaluation.eval_sets import eval_prompts
from sedsft.evaluation.evaluate import label_diversity, score_samples
from sedsft.evaluation.run import evaluate
from sedsft.evaluation.sampling import (
    EntropyTracker,
    PromptSamples,
    Samples,
    SamplingSettings,
    merge_samples,
    plan_batches,
    pooled_entropy,
    sample_completions,
)
from sedsft.sft.training import train

RL_SAMPLE = ROOT / "tests" / "fixtures" / "math_dapo_rl_sample.parquet"  # first 12 rows of the file below
SMALL_EVAL = ["num_prompts=3", "sampling.num_samples=3", "sampling.max_new_tokens=12", "sampling.batch_size=2"]


def entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_entropy_tracker_averages_active_rows_of_the_raw_distribution():
    tracker = EntropyTracker(stop_ids=[9])
    tracker.start(prompt_length=2)
    uniform4 = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    peaked = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    scores = torch.cat([uniform4, peaked])
    out = tracker(torch.tensor([[1, 2], [1, 2]]), scores)
    assert out is scores  # passed on unchanged
    # second step: row 1 has just emitted the stop token, so only row 0 counts
    tracker(torch.tensor([[1, 2, 5], [1, 2, 9]]), scores)
    expected = (entropy([0.25] * 4) + entropy([0.7, 0.1, 0.1, 0.1]) + entropy([0.25] * 4)) / 3
    assert tracker.count == 3
    assert tracker.mean == pytest.approx(expected, rel=1e-6)
    # -inf scores (banned tokens) contribute 0, not NaN
    tracker.start(prompt_length=1)
    tracker(torch.tensor([[1]]), torch.tensor([[0.0, 0.0, -math.inf]]))
    assert math.isfinite(tracker.mean)


def test_label_diversity_hand_computed():
    groups = [["a1", "a2", "b1"], ["a3", "a4", "a5"]]
    out = label_diversity(groups, classify=lambda text: text[0])
    # pooled labels: a x5, b x1
    assert out["label_entropy"] == pytest.approx(entropy([5 / 6, 1 / 6]))
    assert out["labels_per_prompt"] == pytest.approx((2 + 1) / 2)
    assert out["label_frac/a"] == pytest.approx(5 / 6)


def test_score_samples_hand_computed():
    samples = Samples(
        texts=[["\\boxed{4}", "\\boxed{5}", "no answer"], ["x \\boxed{7}", "\\boxed{7}", "\\boxed{7}"], ["hi", "hi", "ho"]],
        num_tokens=[[3, 3, 2], [4, 3, 3], [1, 1, 1]],
        entropy=0.5,
    )
    metrics, correct = score_samples(samples, ["4", "7", None], k=3)
    assert correct == [[True, False, False], [True, True, True], [None, None, None]]
    # prompts with a gold: c = 1 of 3 and 3 of 3 -> pass@1 = (1/3 + 1) / 2; pass@3 = 1
    assert metrics["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["pass@3"] == pytest.approx(1.0)
    assert metrics["avg@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["sampled_entropy"] == 0.5
    assert metrics["mean_new_tokens"] == pytest.approx(21 / 9)
    # diversity covers every prompt, the one without a gold too
    assert 0.0 < metrics["distinct_1"] <= 1.0 and "self_bleu" in metrics


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir) -> Path:
    """A few steps of the default training; its run directory (hf/ and checkpoints/)."""
    out = tmp_path_factory.mktemp("run")
    train(compose_config(out, cache_dir, "callbacks=[hf_export,model_checkpoint]", "logger=[]",
                         "callbacks.model_checkpoint.monitor=null"))  # fmt: skip
    return out


def test_sampling_is_batched_seeded_and_restores_model_and_tokenizer(trained_run):
    model, tokenizer = load_model(str(trained_run))
    model.train()
    prompts = [[{"role": "user", "content": f"What is {a} + 3?"}] for a in (2, 5, 7)]
    settings = SamplingSettings(num_samples=4, max_new_tokens=10, batch_size=2, seed=0)
    first = sample_completions(model, tokenizer, prompts, settings)
    again = sample_completions(model, tokenizer, prompts, settings)
    assert [len(group) for group in first.texts] == [4, 4, 4]
    assert all(1 <= n <= 10 for group in first.num_tokens for n in group)
    assert first.texts == again.texts and first.entropy == again.entropy > 0.0
    assert model.training and tokenizer.padding_side == "right"


def test_sampling_settings_from_a_config_block_and_refused_values():
    # a sampling block is read whole; fixed values win; absent keys keep their defaults
    block = {"num_samples": 4, "temperature": 0.7, "max_batch_tokens": None, "seed": 1}
    settings = SamplingSettings.from_config(block, seed=42)
    assert settings == SamplingSettings(num_samples=4, temperature=0.7, seed=42)
    with pytest.raises(ValueError, match=r"heldout.sampling: unknown key\(s\) \['num_prompts', 'num_sample'\]"):
        SamplingSettings.from_config({"num_sample": 4, "num_prompts": 3}, where="heldout.sampling")
    assert (settings.max_new_tokens, settings.top_p, settings.batch_size) == (256, 1.0, 16)  # the defaults
    assert settings.drawn() == {"num_samples": 4, "max_new_tokens": 256, "temperature": 0.7, "top_p": 1.0, "seed": 42}
    with pytest.raises(ValueError, match=r"temperature=0 \(greedy\) with num_samples=4"):
        SamplingSettings(num_samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples, max_new_tokens and batch_size must be >= 1, got 0, 256, 16"):
        SamplingSettings(num_samples=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1 or None, got 0"):
        SamplingSettings(max_batch_tokens=0)


def test_each_config_that_samples_reads_its_sampling_block_whole(tmp_path, cache_dir):
    """The training callback, the RL held-out evaluation and eval.py take one sampling block each."""
    import hydra

    from sedsft.sft.callbacks.generation_eval import GenerationEval

    sft_cfg = compose_config(tmp_path, cache_dir, "callbacks.generation_eval.sampling.num_samples=3")
    callback = hydra.utils.instantiate(sft_cfg.callbacks.generation_eval)
    assert callback.sampling == SamplingSettings(num_samples=3, max_new_tokens=96, seed=1234)  # the config's block
    assert GenerationEval().sampling == SamplingSettings(max_new_tokens=128, seed=1234)  # the class's defaults
    with pytest.raises(ValueError, match=r"callbacks.generation_eval.sampling: unknown key\(s\) \['samples'\]"):
        GenerationEval(sampling={"samples": 3})
    evaluation = compose_config(tmp_path, cache_dir, "ckpt=x", "sampling.top_p=0.9", shrink=False, name="eval.yaml")
    assert dict(evaluation.sampling) == {"num_samples": None, "max_new_tokens": None, "temperature": None,
                                         "top_p": 0.9, "batch_size": 16, "max_batch_tokens": 32768}  # fmt: skip


def test_pooled_entropy_weighs_every_sampled_position():
    # two prompts: entropy sums 3.0 over 2 positions, 1.0 over 4, and one sample not measured
    sums, counts = [[3.0, None], [1.0]], [[2, 0], [4]]
    assert pooled_entropy(sums, counts) == pytest.approx(4.0 / 6.0)  # not the mean of 1.5 and 0.25
    assert pooled_entropy([[None]], [[0]]) is None
    groups = [PromptSamples(["a", "b"], [2, 1], [3.0, None], [2, 0]), PromptSamples(["c"], [4], [1.0], [4])]
    merged = merge_samples(groups)
    assert merged.entropy == pytest.approx(4.0 / 6.0) and merged.texts == [["a", "b"], ["c"]]
    assert merge_samples([PromptSamples(["a"], [1], [None], [0])]).entropy == 0.0  # nothing measured


def test_plan_batches_by_count_and_by_token_budget():
    lengths = [50, 10, 30, 200, 20]
    # no budget: batch_size prompts per call, in the given order
    assert plan_batches(lengths, 4, 10, 2) == [[(0, 4), (1, 4)], [(2, 4), (3, 4)], [(4, 4)]]
    # budget 500: sorted 10, 20, 30, 50, 200; a call holds n prompts x 4 rows x (longest + 10)
    # 1 x 4 x 20 = 80, 2 x 4 x 30 = 240, 3 x 4 x 40 = 480 <= 500; 4 x 4 x 60 = 960 > 500
    # then 50 alone (240); 200 alone costs 4 x 210 = 840 > 500: split into 500 // 210 = 2 rows per call
    assert plan_batches(lengths, 4, 10, 16, 500) == [
        [(1, 4), (4, 4), (2, 4)],
        [(0, 4)],
        [(3, 2)],
        [(3, 2)],
    ]
    # a budget below one row still samples, one row per call
    assert plan_batches([100], 3, 10, 16, 50) == [[(0, 1)], [(0, 1)], [(0, 1)]]
    # batch_size still caps the prompts per call
    assert plan_batches([5, 5, 5], 1, 5, 2, 10_000) == [[(0, 1), (1, 1)], [(2, 1)]]


def test_token_budget_splits_samples_and_keeps_per_sample_entropy(trained_run):
    """A budget below one prompt's k rows: the samples come in several generate calls and in
    prompt order; every sample's entropy is summed over exactly its generated tokens."""
    model, tokenizer = load_model(str(trained_run))
    prompts = [[{"role": "user", "content": f"What is {a} + 3? Think it through."}] for a in (2, 5)]
    samples = sample_completions(model, tokenizer, prompts, SamplingSettings(num_samples=3, max_new_tokens=6, seed=0, max_batch_tokens=40))
    assert [len(group) for group in samples.texts] == [3, 3]
    assert samples.entropy_counts == samples.num_tokens
    total = sum(map(sum, samples.entropy_sums)) / sum(map(sum, samples.entropy_counts))
    assert samples.entropy == pytest.approx(total) and total > 0


def test_sampling_warns_when_prompts_overrun_the_context(trained_run, caplog):
    model, tokenizer = load_model(str(trained_run))
    model.config.max_position_embeddings = 16  # only read by the check
    prompt = [[{"role": "user", "content": "What is 12 + 30? Please think it through carefully."}]]
    sample_completions(model, tokenizer, prompt, SamplingSettings(num_samples=1, max_new_tokens=8, seed=0))
    assert "max_new_tokens=8 overran the model's context of 16 positions" in caplog.text


@pytest.mark.parametrize("target", ["run_dir", "hf", "ckpt"])
def test_eval_writes_metrics_and_samples_for_every_checkpoint_kind(trained_run, tmp_path, cache_dir, target):
    ckpt = {"run_dir": trained_run, "hf": trained_run / "hf", "ckpt": trained_run / "checkpoints" / "last.ckpt"}[target]
    cfg = compose_config(tmp_path, cache_dir, f"ckpt={ckpt}", "data.val.n=8", *SMALL_EVAL, shrink=False, name="eval.yaml")
    metrics = evaluate(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3 and all(r["gold"] is not None for r in records)
    assert metrics["num_prompts"] == 3
    assert metrics["avg@3"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    assert {"pass@1", "pass@3", "distinct_2", "self_bleu", "sampled_entropy"} <= set(metrics)


def test_eval_prompts_from_rl_parquet():
    prompts = eval_prompts(compose_rl_data(RL_SAMPLE), None)
    assert len(prompts) == 12
    messages, gold = prompts[0]
    assert messages[-1]["role"] == "user" and "invest" in messages[-1]["content"]
    assert gold == "42409"  # reward_model.ground_truth


def test_eval_prompts_blank_gold_counts_as_none(tmp_path, caplog):
    """A blank ``ground_truth`` (real RL files have such rows) is no gold: named, not scored."""
    import pandas as pd

    rows = pd.read_parquet(RL_SAMPLE)
    rows.at[3, "reward_model"] = {**rows.at[3, "reward_model"], "ground_truth": ""}
    path = tmp_path / "rl_blank.parquet"
    rows.to_parquet(path)
    prompts = eval_prompts(compose_rl_data(path), None)
    assert len(prompts) == 12
    assert [i for i, (_, gold) in enumerate(prompts) if gold is None] == [3]
    assert "1 of 12 rows have no gold answer" in caplog.text and "[3]" in caplog.text


def compose_rl_data(path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("eval.yaml", overrides=["ckpt=unused", "data=local", f"data.path={path}"]).data


def test_eval_cli_scores_rl_parquet(trained_run, tmp_path, cache_dir):
    """``python src/eval.py`` as a user types it, on verl-style RL rows: a tiny model solves
    none of them, but every sample is scored against the row's ground truth."""
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "src/eval.py", f"ckpt={trained_run / 'hf'}", "data=local", f"data.path={RL_SAMPLE}",
         f"hydra.run.dir={tmp_path}", *SMALL_EVAL],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    # the stages' console: run directory first, the table, where the files are, the key last
    assert out[0] == f"run directory: {tmp_path.resolve()}"
    assert "pass@1" in result.stdout and "self_bleu" in result.stdout  # the printed table
    assert out[-2].startswith("all metrics: ") and out[-1].startswith("key: ")
    console = result.stdout + result.stderr
    assert console.count("Seed set to") == 1 and "Loading weights" not in console  # once; no loading bars
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    truths = [row["ground_truth"] for row in pd.read_parquet(RL_SAMPLE)["reward_model"]]
    assert [r["gold"] for r in records] == [truth for truth in truths[:3] for _ in range(3)]
    assert all(isinstance(r["correct"], bool) for r in records)
    assert json.loads((tmp_path / "metrics.json").read_text())["pass@1"] == 0.0
