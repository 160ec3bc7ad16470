"""Every option of every config group composes; cheap objects instantiate."""

from __future__ import annotations

import hydra
import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

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

