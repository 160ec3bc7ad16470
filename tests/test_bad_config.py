"""Bad configuration: a clear error at start-up (before tokenising where possible, always
before the first step) that names the key and the allowed values."""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from conftest import compose_config
from sedsft.data.datamodule import SFTDataModule
from sedsft.losses import build_loss
from sedsft.models.tiny import TinyLMSpec
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
        (["loss.name=foo"], "unknown loss 'foo'; choose one of ['ce', 'sed'"),
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
