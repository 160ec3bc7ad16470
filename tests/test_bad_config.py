"""Bad configuration: a clear error at start-up (before tokenising where possible, always
before the first step) that names the key and the allowed values."""

from __future__ import annotations

import logging

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from conftest import compose_config
from sedsft.data.datamodule import SFTDataModule
from sedsft.losses import build_loss
from sedsft.models.hf import CausalLMSpec
from sedsft.models.tiny import TinyLMSpec
from sedsft.sft.checks import validate_config
from sedsft.sft.module import SFTModule
from sedsft.sft.training import build, train

FAST = ("callbacks=none", "logger=[]", "trainer.max_steps=1", "data.train.n=16", "data.val.n=8")


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Records every training step taken (there must be none)."""
    taken: list[int] = []
    original = SFTModule.training_step

    def spy(self, batch, batch_idx):
        taken.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", spy)
    return taken


@pytest.mark.parametrize(
    ("override", "group", "option"),
    [("loss=sedd", "loss", "sed_release"), ("model=tinyy", "model", "tiny"), ("data=toy", "data", "toy_math")],
)
def test_unknown_group_option_lists_the_available_ones(tmp_path, cache_dir, override, group, option):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(tmp_path, cache_dir, override)
    message = str(caught.value)
    assert f"Could not find '{group}/{override.split('=')[1]}'" in message
    assert f"Available options in '{group}'" in message and f"\t{option}\n" in message


def test_misspelt_key_is_refused(tmp_path, cache_dir):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'module\.nonfinte'"):
        compose_config(tmp_path, cache_dir, "module.nonfinte=skip")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.name=foo"], "unknown loss 'foo'; choose one of ['ce', 'dft', 'entropy', 'gem'"),
        (["loss=sed", "+loss.lamda=1"], "unknown option(s) ['lamda'] for loss 'sed'; allowed: ['lam', 'top_k'"),
        (["loss=sed", "loss.lam=-1"], "lam must be a number >= 0, got -1"),
        (["loss=sed", "loss.top_k=0"], "top_k must be an int >= 1, got 0"),
        (["loss=sed", "loss.tau=1.5"], "tau must be a number in [0, 1]"),
        (["loss=sed", "loss.cumsum_ratio=0"], "cumsum_ratio must be in (0, 1], got 0"),
        (["loss=sed", "loss.calib_positions=every"], "calib_positions must be one of ['target', 'all'], got 'every'"),
        (["loss=gem", "loss.h=cubic"], "h must be one of ['linear', 'logsigmoid'], got 'cubic'"),
        (["loss=entropy", "loss.lam=-0.5"], "lam must be a number >= 0"),
    ],
)
def test_out_of_range_loss_knob(tmp_path, cache_dir, overrides, message):
    cfg = compose_config(tmp_path, cache_dir, *overrides)
    with pytest.raises(InstantiationException) as caught:
        hydra.utils.instantiate(cfg.loss)
    assert isinstance(caught.value.__cause__, ValueError)
    assert message in str(caught.value)
    assert "full_key: loss" in str(caught.value)


def test_missing_tau_without_calibration(tmp_path, cache_dir):
    cfg = compose_config(tmp_path, cache_dir, "loss=sed", "loss.calibrate=false")
    with pytest.raises(InstantiationException) as caught:
        hydra.utils.instantiate(cfg.loss)
    assert "loss.tau" in str(caught.value) and "loss.calibrate" in str(caught.value)
    # with a tau it is a valid configuration that skips calibration
    assert not build_loss("sed", tau=0.8, calibrate=False).needs_calibration
    assert build_loss("sed").needs_calibration


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("module.fused_loss=yes", "module.fused_loss='yes'; allowed: auto, true, false"),
        ("module.nonfinite=ignore", "module.nonfinite='ignore'; allowed: stop, skip"),
        ("data.max_skip_frac=2", "data.max_skip_frac must be in [0, 1], got 2"),
        ("data.max_length=1", "data.max_length must be >= 2, got 1"),
        ("model.dtype=float8", "model.dtype='float8' is not supported; allowed: auto"),
    ],
)
def test_bad_value_stops_before_tokenising(tmp_path, cache_dir, monkeypatch, override, message):
    prepared = []
    monkeypatch.setattr(SFTDataModule, "setup", lambda self, stage=None: prepared.append(stage))
    cfg = compose_config(tmp_path, cache_dir, override, *FAST)
    with pytest.raises((ValueError, InstantiationException)) as caught:
        train(cfg)
    assert message in str(caught.value)
    assert not prepared


@pytest.mark.parametrize("knob", ["top_k", "calib_top_k"])
def test_top_k_larger_than_the_vocabulary(tmp_path, cache_dir, steps, knob):
    vocab = TinyLMSpec(cache_dir=str(cache_dir / "models")).load_tokenizer().__len__()
    cfg = compose_config(tmp_path, cache_dir, "loss=sed", f"loss.{knob}=100000", *FAST)
    with pytest.raises(ValueError) as caught:
        train(cfg)
    assert f"loss.{knob}=100000 is larger than the vocabulary of tiny-llama ({vocab} tokens); allowed: 1 to {vocab}" in str(
        caught.value
    )
    assert not steps


class WrappedHead(torch.nn.Module):
    """An LM head that is not a plain ``nn.Linear`` (as in models that post-process logits)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def test_fused_loss_without_a_separate_head_fails_at_start_up(tmp_path, cache_dir, steps, monkeypatch):
    load = TinyLMSpec.load_model

    def load_wrapped(self):
        model = load(self)
        model.lm_head = WrappedHead(model.lm_head)
        return model

    monkeypatch.setattr(TinyLMSpec, "load_model", load_wrapped)
    cfg = compose_config(tmp_path, cache_dir, "module.fused_loss=true", *FAST)
    objects = build(cfg)
    objects["module"].run_config = None
    with pytest.raises(ValueError) as caught:
        objects["trainer"].fit(objects["module"], datamodule=objects["datamodule"])
    assert "module.fused_loss=true but the model has no separate linear LM head" in str(caught.value)
    assert "module.fused_loss=auto or false" in str(caught.value)
    assert not steps
    # auto falls back to the logits path and trains
    cfg = compose_config(tmp_path, cache_dir, "module.fused_loss=auto", *FAST)
    assert torch.isfinite(torch.tensor(train(cfg)["train/loss"]))
    assert steps == [0]


@pytest.mark.parametrize(
    ("overrides", "lines"),
    [
        (
            ["trainer.accumulate_grad_batches=0"],  # was a ZeroDivisionError inside Lightning, after loading
            ["trainer.accumulate_grad_batches=0 must be >= 1 (micro-batches per optimiser step, e.g. 1)"],
        ),
        (["optimizer.lr=abc"], ["optimizer.lr='abc' must be a number (peak learning rate, e.g. 2e-5)"]),  # was a bare TypeError
        (
            ["optimizer.lr=0", "data.batch_size=2.5", "scheduler.warmup_ratio=1", "optimizer.betas=[0.9,1.5]"],
            [
                "data.batch_size=2.5 must be an integer (sequences per micro-batch and device, e.g. 4)",
                "optimizer.lr=0 must be > 0 (peak learning rate, e.g. 2e-5)",
                "scheduler.warmup_ratio=1 must be < 1 (fraction of steps, e.g. 0.03)",
                "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1), e.g. [0.9, 0.95]",
            ],
        ),
    ],
    ids=["accumulate_0", "lr_abc", "several"],
)
def test_bad_numeric_knob_stops_before_anything_is_built(tmp_path, cache_dir, monkeypatch, overrides, lines):
    loaded = []
    monkeypatch.setattr(TinyLMSpec, "load_tokenizer", lambda self: loaded.append(self))
    with pytest.raises(ValueError) as caught:
        train(compose_config(tmp_path, cache_dir, *overrides, *FAST))
    assert str(caught.value) == "invalid configuration:\n  " + "\n  ".join(lines)  # every problem, at once
    assert not loaded


def test_missing_local_model_path_is_not_called_a_hub_id(tmp_path, cache_dir):
    cfg = compose_config(tmp_path, cache_dir, "model=hf", f"model.name_or_path={tmp_path / 'nonexistent'}", *FAST, shrink=False)
    with pytest.raises(InstantiationException) as caught:
        train(cfg)
    message = str(caught.value)
    assert f"model.name_or_path={tmp_path / 'nonexistent'}: no such local directory" in message
    assert "repo id" not in message.lower()
    # relative paths say where they were looked up; hub ids (name, org/name) pass untouched
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path=\./models/x: no such local directory \(relative to "):
        CausalLMSpec(name_or_path="./models/x")
    for hub_id in ("gpt2", "Qwen/Qwen2.5-Math-7B-Instruct"):
        assert CausalLMSpec(name_or_path=hub_id).name_or_path == hub_id


def test_cpu_devices_warn_and_the_global_batch_is_stated(tmp_path, cache_dir, caplog):
    cfg = compose_config(tmp_path, cache_dir, "trainer.devices=4", "trainer.accumulate_grad_batches=2", "data.batch_size=8")
    with caplog.at_level(logging.INFO, logger="sedsft.sft.checks"):
        validate_config(cfg)  # (training would start 4 processes)
    assert (
        "global batch: 64 sequences per optimiser step (data.batch_size=8 x trainer.accumulate_grad_batches=2"
        " x 4 device(s) x trainer.num_nodes=1)"
    ) in caplog.text
    assert "trainer.devices=4 on the CPU starts 4 training processes (DDP over gloo)" in caplog.text
    assert "each optimiser step takes 4 x the batch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sedsft.sft.checks"):
        validate_config(compose_config(tmp_path, cache_dir))
    assert "global batch: 8 sequences per optimiser step" in caplog.text
    assert "on the CPU starts" not in caplog.text
