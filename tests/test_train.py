"""End to end on the embedded default: the real config, in-process and through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from loss_references import reference, topk_mass
from sedsft.losses import LOSS_NAMES, LOSSES
from sedsft.sft.training import build, train
from sedsft.utils.analysis import read_histograms

SMALL_GENERATION = [
    "callbacks.generation_eval.num_prompts=4",
    "callbacks.generation_eval.sampling.num_samples=4",
    "callbacks.generation_eval.sampling.max_new_tokens=24",
]


def test_default_run_writes_events_checkpoints_and_loadable_export(make_config, tmp_path):
    metrics = train(make_config("test=true", "trainer.val_check_interval=2", *SMALL_GENERATION))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert {"train/loss", "val/loss", "val/loss_terms/ce", "val/entropy", "val/top1_acc", "test/loss"} <= set(metrics)
    # TensorBoard's run list names the loss and seed: <run>/tensorboard/<loss>/seed<seed>
    assert list((tmp_path / "tensorboard" / "ce" / "seed42").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)

    export = tmp_path / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][f"model.{name}"])
    assert checkpoint["sedsft"]["chat_template"] == tokenizer.chat_template
    assert checkpoint["sedsft"]["config"]["seed"] == 42
    # validation histograms of target positions, in buckets over the values' own range
    for tag, upper in (("val/topk_mass_hist", 1.0), ("val/entropy_hist", None)):
        (step, edges, counts), *_ = read_histograms(tmp_path, tag)
        assert step > 0 and len(edges) >= 32 and (counts > 0).sum() > 1
        if upper is not None:
            assert edges[-1] <= upper + 1e-6  # not TensorBoard's default buckets, which reach 1.1
    # the generation callback's numbers reached the logger
    assert {"gen/distinct_2", "gen/self_bleu", "gen/pass@1", "gen/pass@4", "gen/avg@4", "gen/sampled_entropy"} <= set(metrics)


class LastBatch(L.Callback):
    """Keeps the last training batch and the weights its step started from."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = {k: v.detach().clone() for k, v in batch.items()}
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def assert_loss_is_the_configured_one(loss_fn, loss_cfg: dict) -> None:
    """The module's loss is the class registered under ``loss.name`` with every knob of
    the config (``calibrate`` is only checked by the constructor; ``tau: null`` means
    still to calibrate)."""
    assert type(loss_fn) is LOSSES[loss_cfg["name"]], (type(loss_fn), loss_cfg["name"])
    for knob, value in loss_cfg.items():
        if knob in ("_target_", "name", "calibrate"):
            continue
        got = getattr(loss_fn, knob)
        if knob == "tau":
            got = None if loss_fn.needs_calibration else float(got)
        assert got == value, f"loss.{knob}: the config says {value!r}, the module's loss has {got!r}"


@pytest.mark.parametrize("loss", [n for n in LOSS_NAMES] + ["sed_release"])
def test_every_loss_trains_with_its_configured_loss(make_config, loss):
    """loss=<name> puts that class with the config's knobs into the module, and the loss
    terms logged for a training step equal the paper's formula (tests/loss_references.py)
    recomputed in float64 from the same batch, weights and shifted labels."""
    cfg = make_config(f"loss={loss}", "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks=none", "logger=[]")
    L.seed_everything(cfg.seed)
    objects = build(cfg)
    module, trainer, datamodule = objects["module"], objects["trainer"], objects["datamodule"]
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    assert_loss_is_the_configured_one(module.loss_fn, loss_cfg)
    last = LastBatch()
    trainer.callbacks.append(last)
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0.0 <= metrics["val/top1_acc"] <= 1.0

    module.model.load_state_dict(last.state)
    batch = last.batch
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = module.model.eval()(**inputs).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != -100
    z, y = logits[keep], labels[keep]
    knobs = {k: v for k, v in loss_cfg.items() if k not in ("_target_", "name")}
    if loss.startswith("sed") and loss != "sed_nomask":
        knobs["tau"] = float(module.loss_fn.tau)  # calibrated at fit start
    expected = {
        "train/loss": float(reference(loss_cfg["name"], z, y, **knobs).mean()),
        "train/loss_terms/ce": float(reference("ce", z, y).mean()),
        "train/target_tokens": float(keep.sum()),
    }
    if "train/loss_terms/reg" in metrics:  # sed, sed_nomask, entropy: loss = ce + reg
        expected["train/loss_terms/reg"] = expected["train/loss"] - expected["train/loss_terms/ce"]
    if "mask_frac" in module.loss_fn.extra_metrics:
        k = knobs.get("top_k")
        masked = torch.ones(len(y)) if k is None else topk_mass(z, k) < knobs["tau"]
        expected["train/mask_frac"] = float(masked.double().mean())
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (
            f"loss={loss}: logged {name} = {metrics[name]:.6f}, but the configured loss "
            f"recomputed on the step's batch gives {value:.6f}"
        )


def test_cli_fast_dev_run(tmp_path, cache_dir):
    """``python src/train.py`` itself, as a user types it (one batch each way)."""
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "src/train.py", "debug=fdr", "loss=sed", "model.pretrain_steps=4", f"paths.log_dir={tmp_path}", "data.train.n=64", "data.val.n=16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(Path(tmp_path, "debug", "runs").glob("*/.hydra/config.yaml"))
    # debug=fdr logs DEBUG, but not the font and image-plugin chatter of matplotlib / PIL
    assert "[matplotlib" not in result.stdout and "[PIL" not in result.stdout


LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - |[A-Z]+: )")


def test_cli_console_one_line_per_event_run_dir_first_metrics_table_last(tmp_path, cache_dir):
    """The terminal of ``python src/train.py trainer.max_steps=3``: the run directory first,
    every log record once (Lightning printed each twice, once through its own handler), no
    product adverts or library deprecation, no monitor warning, a table of the final metrics
    last on lines of its own, then the one-line key to the metric names."""
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "PYTHONPATH": ""}
    result = subprocess.run(
        [
            sys.executable, "src/train.py", "trainer.max_steps=3", "model.pretrain_steps=4", f"paths.log_dir={tmp_path}",
            "data.train.n=64", "data.val.n=16", "data.eval_batch_size=16", *SMALL_GENERATION,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = Path(tmp_path, "train", "runs").iterdir()
    out = result.stdout.splitlines()
    assert out[0] == f"run directory: {run.resolve()}"
    console = result.stdout + result.stderr
    for unwanted in ("Tip", "LeafSpec", "could not find the monitored key", "DEBUG"):
        assert unwanted not in console, unwanted
    messages = [LOG_PREFIX.sub("", line) for line in console.splitlines() if LOG_PREFIX.match(line)]
    assert any("max_steps=3" in m for m in messages)  # Lightning's records do show, once
    assert [m for m, n in Counter(messages).items() if n > 1] == []
    start = next(i for i, line in enumerate(out) if line.startswith("final metrics"))
    assert out[start] == f"final metrics (all in {run / 'metrics.json'}):"
    assert out[-1].startswith("key: ") and "lower = more diverse" in out[-1]  # what the names mean
    rows = dict(line.split() for line in out[start + 1 : -1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(rows)[:3] == ["gen/pass@1", "gen/pass@4", "gen/avg@4"]
    assert {"val/loss", "gen/label_entropy"} <= set(rows)
    assert all(value == f"{metrics[name]:.4f}" for name, value in rows.items())
