"""Every option of every config group composes; cheap objects instantiate."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config

CONFIGS = ROOT / "configs"
# Groups whose options are composed here; hydra/paths have one option, experiment and
# hparams_search files are checked by their own tests, trainer strategies in test_scale.
GROUPS = ["data", "model", "loss", "trainer", "logger", "callbacks", "debug"]
NEEDS = {  # options that need a value the user must give
    ("data", "local"): ["data.path=train.jsonl"],
    ("model", "hf"): ["model.name_or_path=some/model"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_group_option_composes(tmp_path, cache_dir, group, option):
    cfg = compose_config(tmp_path, cache_dir, f"{group}={option}", *NEEDS.get((group, option), []), shrink=False)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "loss":
        loss = hydra.utils.instantiate(cfg.loss)
        assert loss is not None


def test_defaults_are_the_embedded_default(tmp_path, cache_dir):
    cfg = compose_config(tmp_path, cache_dir)
    assert cfg.model._target_.endswith("TinyLMSpec")
    assert cfg.data.train._target_.endswith("ToyMathSource")
    assert cfg.loss.name == "ce"
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.scheduler.warmup_ratio == 0.03


def test_sed_release_preset_differs_from_sed_only_in_the_quirks(tmp_path, cache_dir):
    sed = compose_config(tmp_path, cache_dir, "loss=sed").loss
    release = compose_config(tmp_path, cache_dir, "loss=sed_release").loss
    diff = {k for k in sed if sed[k] != release[k]}
    assert diff == {"top_k", "calib_top_k", "calib_positions"}
    assert (release.top_k, release.calib_top_k, release.calib_positions) == (2, 10, "all")



TOY_EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("toy_*.yaml") if p.stem != "toy_base")


@pytest.mark.parametrize("experiment", TOY_EXPERIMENTS)
def test_toy_experiments_differ_only_in_the_loss(tmp_path, cache_dir, experiment):
    cfg = compose_config(tmp_path, cache_dir, f"experiment={experiment}", shrink=False)
    reference = compose_config(tmp_path, cache_dir, "experiment=toy_ce", shrink=False)
    assert cfg.loss.name == experiment.removeprefix("toy_")
    for key in ("data", "model", "trainer", "optimizer", "scheduler", "callbacks", "seed"):
        assert cfg[key] == reference[key], key
    assert cfg.callbacks.generation_eval.sample_classifier == "sedsft.data.toy_math.classify_style"


def test_toy_grid_covers_every_loss_and_three_seeds(tmp_path, cache_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedsft.losses import LOSS_NAMES

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["hparams_search=toy_grid"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert {e.removeprefix("toy_") for e in params.experiment.split(",")} == set(LOSS_NAMES)
    assert params.seed.split(",") == ["1", "2", "3"]
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
