"""Every option of every config group composes; cheap objects instantiate."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from sedsft.losses import LOSS_NAMES

CONFIGS = ROOT / "configs"
# Groups whose options are composed here; hydra/paths have one option, experiment and
# hparams_search files are checked by their own tests, trainer strategies in test_scale.
GROUPS = ["data", "model", "loss", "trainer", "logger", "callbacks", "debug"]
NEEDS = {  # options that need a value the user must give
    ("data", "local"): ["data.path=train.jsonl"],
    ("model", "hf"): ["model.name_or_path=some/model"],
    ("data", "rl_hub"): ["data.name=some/dataset"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_group_option_composes(tmp_path, cache_dir, group, option):
    cfg = compose_config(
        tmp_path, cache_dir, f"{group}={option}", *NEEDS.get((group, option), []), shrink=False
    )
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


def test_toy_experiment_takes_any_loss(tmp_path, cache_dir):
    # One toy experiment; the loss is picked with loss=<name>, so a new loss needs no file.
    reference = compose_config(tmp_path, cache_dir, "experiment=toy", shrink=False)
    assert reference.loss.name == "ce"  # train.yaml's default
    for name in LOSS_NAMES:
        cfg = compose_config(tmp_path, cache_dir, "experiment=toy", f"loss={name}", shrink=False)
        assert cfg.loss.name == name
        assert list(cfg.tags) == ["toy_lab", name]
        for key in ("data", "model", "trainer", "optimizer", "scheduler", "callbacks", "seed"):
            assert cfg[key] == reference[key], key
        assert (
            cfg.callbacks.generation_eval.sample_classifier == "sedsft.data.toy_math.classify_style"
        )
    assert sorted(p.stem for p in (CONFIGS / "experiment").glob("toy*.yaml")) == ["toy"]


def loss_presets() -> set[str]:
    """configs/loss files that preset another loss (their defaults name a loss config)."""
    presets = set()
    for path in (CONFIGS / "loss").glob("*.yaml"):
        defaults = OmegaConf.load(path).get("defaults", [])
        if any(d in options("loss") for d in defaults if isinstance(d, str)):
            presets.add(path.stem)
    return presets


def test_every_registered_loss_has_one_config_and_back():
    # A loss is one file plus configs/loss/<name>.yaml: the two sets must be the same.
    assert loss_presets() == {"sed_release", "sed_route"}
    plain = set(options("loss")) - loss_presets()
    assert plain == set(LOSS_NAMES)
    for name in plain:
        assert OmegaConf.load(CONFIGS / "loss" / f"{name}.yaml").name == name


def sweep_jobs(overrides: list[str]) -> list[dict[str, str]]:
    """The jobs Hydra's basic sweeper launches for ``hparams_search`` overrides, expanded
    exactly as it does (globs included), without running them."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    return [dict(o.split("=", 1) for o in job) for job in batch]


def test_toy_grid_covers_every_loss_and_three_seeds():
    jobs = sweep_jobs(["hparams_search=toy_grid"])
    assert {job["experiment"] for job in jobs} == {"toy"}
    assert {job["loss"] for job in jobs} == set(LOSS_NAMES)
    assert sorted(job["seed"] for job in jobs) == sorted(["1", "2", "3"] * len(LOSS_NAMES))
    assert len({(job["loss"], job["seed"]) for job in jobs}) == len(jobs) == 3 * len(LOSS_NAMES)
