"""What a training run reports: a validation (with generation metrics) at its end however
it stops, and only once; TensorBoard run names and the HParams tab; the resolved config;
style metrics by default on toy math; the CPU thread knob; one logging path."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import ROOT, compose_config
from sedsft.sft import logging as runlog
from sedsft.sft.training import train
from sedsft.utils import console
from sedsft.utils.threads import AUTO_MAX, resolve_cpu_threads, set_cpu_threads

SMALL_GENERATION = [
    "callbacks.generation_eval.num_prompts=4",
    "callbacks.generation_eval.sampling.num_samples=2",
    "callbacks.generation_eval.sampling.max_new_tokens=16",
]


def read_events(directory: Path) -> tuple[dict[str, list[int]], dict, list[str]]:
    """(tag -> steps it was written at, HParams session values, HParams metric tags)."""
    steps: dict[str, list[int]] = defaultdict(list)
    session, metric_tags = {}, []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    if data.HasField("session_start_info"):
                        for name, v in data.session_start_info.hparams.items():
                            session[name] = getattr(v, v.WhichOneof("kind"))
                    if data.HasField("experiment"):
                        metric_tags = [m.name.tag for m in data.experiment.metric_infos]
                else:
                    tag = value.tag.removesuffix("/text_summary")  # add_text's suffix
                    steps[tag].append(event.step)
    return dict(steps), session, metric_tags


def test_max_steps_mid_epoch_still_validates_once_and_reports(make_config, tmp_path):
    """12 batches an epoch, stopped by max_steps=3: before, no val/* or gen/* at all."""
    cfg = make_config("trainer.max_steps=3", "cpu_threads=1", *SMALL_GENERATION)
    metrics = train(cfg)
    assert {"val/loss", "val/entropy", "gen/pass@1", "gen/pass@2", "gen/self_bleu"} <= set(metrics)
    # style metrics on by default: data=toy_math names its classifier
    assert "gen/label_entropy" in metrics and "gen/labels_per_prompt" in metrics
    fractions = {k: v for k, v in metrics.items() if k.startswith("gen/label_frac/")}
    assert fractions and sum(fractions.values()) == pytest.approx(1.0)

    run = tmp_path / "tensorboard" / "ce" / "seed42"  # <loss>/seed<seed> in TensorBoard's list
    steps, session, metric_tags = read_events(run)
    # one validation, at the last step (Lightning writes after 3 steps at step index 2)
    assert steps["val/loss"] == [2]
    assert steps["gen/pass@1"] == [2]
    assert steps["val/entropy_hist"] == [2] and steps[runlog.SAMPLES_TEXT] == [2]
    assert steps["data/skipped_train"] == [0]

    # HParams tab: the knobs that tell runs apart, and the headline metrics as columns
    assert session["loss"] == "ce" and session["experiment"] == "none"
    assert session["seed"] == 42 and session["lr"] == pytest.approx(1e-3)  # the tiny model's lr
    assert session["data"] == "toy_math" and session["model"] == "tiny"
    assert session["trainer/max_steps"] == 3
    assert "loss/lam" not in session  # CE has no knobs
    assert metric_tags[:3] == ["gen/pass@1", "gen/pass@2", "gen/avg@2"]
    assert {"val/loss", "val/entropy", "gen/label_entropy"} <= set(metric_tags)
    assert set(metric_tags) <= set(steps)  # the tab reads each metric's own curve

    # the resolved config next to .hydra/config.yaml, without ${...}
    text = (tmp_path / "config_resolved.yaml").read_text()
    assert "${" not in text
    assert OmegaConf.to_container(OmegaConf.create(text)) == OmegaConf.to_container(
        cfg, resolve=True
    )
    assert torch.get_num_threads() == 1  # cpu_threads=1 applied


def test_scheduled_validations_plus_one_at_the_end(make_config, tmp_path):
    """Validation every 2 steps, run cut at 5: validations at 2 and 4, and at 5 because the
    run ends there; generation every 2nd validation (after 4 steps) and at the end."""
    metrics = train(
        make_config(
            "loss=sed",
            "trainer.max_steps=5",
            "trainer.max_epochs=1",
            "trainer.val_check_interval=2",
            "callbacks.generation_eval.every_n_val_epochs=2",
            *SMALL_GENERATION,
        )
    )
    run = tmp_path / "tensorboard" / "sed" / "seed42"
    steps, session, metric_tags = read_events(run)
    assert steps["val/loss"] == [1, 3, 4]
    assert steps["gen/pass@1"] == [3, 4]
    assert session["loss"] == "sed"
    assert (
        session["loss/lam"] == 1.0 and session["loss/top_k"] == 10 and session["loss/tau"] == "None"
    )
    assert "calibration/tau" in metric_tags and 0.0 < metrics["calibration/tau"] <= 1.0


def test_tensorboard_run_name_carries_the_experiment(tmp_path, cache_dir):
    import hydra

    cfg = compose_config(tmp_path, cache_dir, "experiment=paper_llama32_3b_sed", shrink=False)
    logger = hydra.utils.instantiate(cfg.logger.tensorboard)
    assert (
        Path(logger.log_dir) == tmp_path / "tensorboard" / "paper_llama32_3b_sed" / "sed" / "seed42"
    )
    assert logger.version == ""  # no version_N folder, no v_num in the progress bar


def test_run_ending_with_its_epoch_validates_once(make_config, tmp_path):
    """Epoch end is on Lightning's schedule and is the run's end: one validation, not two."""
    train(
        make_config(
            "trainer.max_steps=-1", "trainer.max_epochs=1", "data.train.n=32", *SMALL_GENERATION
        )
    )
    steps, _, _ = read_events(tmp_path / "tensorboard")
    assert steps["val/loss"] == [3]  # 32 rows / 8 = 4 steps
    assert steps["gen/pass@1"] == [3]


def test_logging_keys_and_histogram_buckets():
    assert runlog.key("train", "loss") == "train/loss"
    assert (
        runlog.key("val", "ce") == "val/loss_terms/ce"
        and runlog.key("train", "reg") == "train/loss_terms/reg"
    )
    assert runlog.key("gen", "pass@1") == "gen/pass@1"
    assert runlog.histogram_key("val", "entropy") == "val/entropy_hist"
    edges = runlog.histogram_bins(torch.tensor([0.5, 0.9, 1.0]).numpy())
    assert len(edges) == runlog.HISTOGRAM_BINS + 1 and edges[0] == 0.5 and edges[-1] == 1.0
    assert (
        runlog.histogram_bins(torch.ones(3).numpy()) == "tensorflow"
    )  # one value: default buckets
    table = console.format_table({"gen/pass@1": 0.25, "val/loss": 1.5}, "final metrics")
    assert table.splitlines() == ["final metrics:", "  gen/pass@1  0.2500", "  val/loss    1.5000"]
    side = console.format_columns({"before RL": {"pass@1": 0.25, "distinct_4": float("nan")}, "after RL": {"pass@1": 0.5}}, "held-out")
    assert side.splitlines() == [
        "held-out:",
        "               before RL    after RL",
        "  pass@1          0.2500      0.5000",
        "  distinct_4           -           -",
    ]


def test_one_logging_path_in_the_sft_stage():
    """TensorBoard is written only through sedsft.sft.logging (issue 11: it was written four
    ways: self.log, logger.log_metrics, add_histogram/add_text, callback_metrics edits)."""
    pattern = re.compile(
        r"(?<!runlog)\.log_metrics\(|add_histogram\(|add_text\(|callback_metrics\.update|\.log_dict\(|self\.log\("
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "src" / "sedsft" / "sft").rglob("*.py"))
        if path.name != "logging.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("setting", "cores", "expected"),
    [
        ("auto", 2, 1),
        ("auto", 1, 1),
        ("auto", 6, 3),
        ("auto", 64, AUTO_MAX),
        (3, 2, 3),
        ("2", 8, 2),
        (None, 8, None),
    ],
)
def test_cpu_threads_setting(setting, cores, expected):
    assert resolve_cpu_threads(setting, cores=cores) == expected


@pytest.mark.parametrize("setting", [0, -1, "many", 1.5])
def test_cpu_threads_rejects(setting):
    with pytest.raises(ValueError, match="cpu_threads=.*allowed: auto, null"):
        resolve_cpu_threads(setting, cores=2)


def test_cpu_threads_left_alone_on_gpu_runs_and_explicit_omp_wins(monkeypatch):
    before = torch.get_num_threads()
    assert set_cpu_threads(1, on_cpu=False) == before  # GPU runs keep torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_cpu_threads("auto") == 1 and torch.get_num_threads() == 1


class StopAfter(L.Callback):
    """Asks to stop after ``steps`` optimiser steps, the way ``max_time`` (Timer) and early
    stopping do, but on a step count instead of a clock."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_requested_stop_validates_once_with_generation(make_config, tmp_path):
    """A stop requested mid-epoch (max_time, early stopping): one validation, at the last
    step, and generation eval there although every_n_val_epochs=5 would skip it."""
    cfg = make_config(
        "+callbacks.stop._target_=test_run_report.StopAfter",
        "+callbacks.stop.steps=2",
        "trainer.min_epochs=null",  # Lightning refuses early stops before min_epochs
        "trainer.max_steps=-1",
        "callbacks.generation_eval.every_n_val_epochs=5",
        *SMALL_GENERATION,
    )
    train(cfg)
    steps, _, _ = read_events(tmp_path / "tensorboard")
    assert max(steps["train/loss"]) == 1  # stopped after 2 of 12 steps
    assert steps["val/loss"] == [1]
    assert steps["gen/pass@1"] == [1]


def test_progress_bar_counts_epochs_from_one():
    """Lightning's bar reads "Epoch 1/1" on the second epoch of two; the run's reads "Epoch 2/2"."""
    from types import SimpleNamespace

    from sedsft.sft.callbacks.progress import EpochsFromOneRich

    bar = EpochsFromOneRich()
    bar._trainer = SimpleNamespace(max_epochs=2)
    assert bar._get_train_description(0).strip() == "Epoch 1/2"
    assert bar._get_train_description(1).strip() == "Epoch 2/2"
    bar._trainer = SimpleNamespace(max_epochs=-1)  # max_steps only
    assert bar._get_train_description(3).strip() == "Epoch 4"
