"""Paper presets on any cluster shape: the global batches stated once, per-process sizes
derived from the world size of every launcher (fake world sizes), refused where they cannot
be met; presets and grids composing to the release's values."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from sedsft.utils.batches import (
    BatchError,
    apply_rl_batch,
    apply_sft_batch,
    rl_batch,
    sft_batch,
    verl_batch,
)
from sedsft.utils.world import (
    World,
    WorldSizeError,
    export_slurm_process_group,
    launcher_world,
    lightning_world,
    rl_world,
    verl_world,
)

SIZES = [1, 2, 4, 8]  # divide the paper's batches
ODD = 6  # does not


def launcher_env(launcher: str, size: int) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, config overrides) that give ``size`` processes under ``launcher``."""
    if launcher == "torchrun":  # accelerate launch / torchrun
        return {"WORLD_SIZE": str(size), "RANK": "0"}, {}
    if launcher == "slurm":  # submitit: SLURM_NTASKS tasks
        return {"SLURM_NTASKS": str(size), "SLURM_JOB_NAME": "pipeline", "SLURM_PROCID": "0"}, {}
    return {}, {}


@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "single"])
@pytest.mark.parametrize("size", [*SIZES, ODD])
def test_launcher_world_sizes(launcher, size):
    env, _ = launcher_env(launcher, size)
    world = launcher_world(env)
    assert world.size == (1 if launcher == "single" else size) and world.launcher == launcher


def test_interactive_slurm_allocation_is_not_a_launcher():
    assert launcher_world({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "bash"}).size == 1


# ------------------------------------------------------------------ SFT: 128 sequences per step
@pytest.mark.parametrize("size", SIZES)
def test_sft_accumulation_keeps_128_sequences_on_every_world_size(size):
    world = World(size, "test", f"{size} fake processes")
    derived = sft_batch(128, 1, world)
    assert (derived.accumulation, derived.sequences, derived.exact) == (128 // size, 128, True)
    assert sft_batch(128, 2, world).accumulation == 64 // size  # two sequences per micro-batch


def test_sft_world_size_that_cannot_give_128_is_refused_with_the_numbers():
    world = World(ODD, "test", "6 fake processes")
    with pytest.raises(BatchError, match=r"128 .*6 = 6 sequences.*accumulating 21 gives 126, 22 gives 132.*allow_inexact=true to train with 126"):
        sft_batch(128, 1, world)
    with pytest.raises(BatchError, match=r"Fix: run on a process count in \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        sft_batch(128, 1, world)  # the counts dividing 128 sequences in micro-batches of one
    with pytest.raises(BatchError, match=r"Fix: set data.batch_size to a divisor of 128 \(no process count works with 3\)"):
        sft_batch(128, 3, world)
    inexact = sft_batch(128, 1, world, allow_inexact=True)
    assert (inexact.accumulation, inexact.sequences, inexact.exact) == (21, 126, False)  # the nearer of 126 / 132
    assert "NOT the requested 128" in inexact.describe()
    assert sft_batch(128, 1, World(256, "test", "x"), allow_inexact=True).accumulation == 1  # never 0


@pytest.mark.parametrize("size", [*SIZES, ODD])
@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "slurm"])
def test_sft_preset_derives_accumulation_under_every_launcher(composed, launcher, size):
    """Lightning's world is devices x num_nodes; under torchrun / SLURM the launcher's count must
    agree with it (Lightning joins those processes instead of starting its own)."""
    cfg = composed("experiment=paper_llama32_3b_sed")
    cfg.trainer.devices = size
    env, _ = launcher_env(launcher, size) if launcher != "lightning" else ({}, {})
    world = lightning_world(cfg, env)
    assert world.size == size
    if 128 % size:
        with pytest.raises(BatchError, match="batch.sequences_per_step=128 cannot be met"):
            apply_sft_batch(cfg, world)
        return
    derived = apply_sft_batch(cfg, world)
    assert cfg.trainer.accumulate_grad_batches == derived.accumulation == 128 // size
    assert cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches * cfg.data.batch_size == 128


def test_sft_on_two_nodes_and_a_mismatched_slurm_allocation(tmp_path):
    cfg = compose_config(tmp_path, tmp_path, "experiment=paper_qwen25_math_7b_ce", "trainer.num_nodes=2", shrink=False)
    assert apply_sft_batch(cfg, lightning_world(cfg, {})).accumulation == 8  # 1 x 8 x 2 nodes x 8
    one_task = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "pipeline"}
    with pytest.raises(WorldSizeError, match=r"SLURM_NTASKS=1 .* 16 processes: start 8 task\(s\) per node"):
        lightning_world(cfg, one_task)  # the old grid's tasks_per_node: 1 beside devices=8


def test_sft_without_a_global_batch_keeps_the_given_accumulation(tmp_path):
    cfg = compose_config(tmp_path, tmp_path, "trainer.accumulate_grad_batches=3")
    assert apply_sft_batch(cfg, World(2, "test", "x")) is None and cfg.trainer.accumulate_grad_batches == 3
    paper = compose_config(tmp_path, tmp_path, "experiment=paper_llama32_3b_ce", "batch.sequences_per_step=null", shrink=False)
    with pytest.raises(BatchError, match="trainer.accumulate_grad_batches=null is derived from batch.sequences_per_step"):
        apply_sft_batch(paper, World(8, "test", "x"))


# ------------------------------------------------------------------ RL: 256 prompts, updates of 32
@pytest.mark.parametrize("per_device", [4, 2])
@pytest.mark.parametrize("size", SIZES)
def test_rl_updates_of_32_prompts_on_every_world_size(size, per_device):
    derived = rl_batch(256, 32, 8, per_device, World(size, "test", "x"))
    assert derived.accumulation * per_device * size == 256  # completions per update = 32 prompts x 8
    assert (derived.update_prompts, derived.updates_per_rollout, derived.generation_batch_size) == (32, 8, 2048)


def test_rl_world_size_that_cannot_give_32_prompts_is_refused_or_rounded_on_request():
    world = World(ODD, "test", "6 fake processes")
    with pytest.raises(BatchError, match=r"256 completions\) cannot be met.*4 x 6 = 24 completions.*33 prompts per update"):
        rl_batch(256, 32, 8, 4, world)
    with pytest.raises(BatchError, match=r"Fix: run on a process count in \[1, 2, 4, 8, 16, 32, 64\]"):
        rl_batch(256, 32, 8, 4, world)  # 256 completions in micro-steps of 4 per process
    with pytest.raises(BatchError, match=r"Fix: set grpo.per_device_train_batch_size to a divisor of 256"):
        rl_batch(256, 32, 8, 3, world)
    inexact = rl_batch(256, 32, 8, 4, world, allow_inexact=True)
    # 11 micro-steps of 24 = 264 completions = 33 whole prompt groups; 8 such updates per rollout batch
    assert (inexact.accumulation, inexact.update_prompts, inexact.generation_batch_size) == (11, 33, 2112)
    assert not inexact.exact and "NOT the requested 32" in inexact.describe()
    with pytest.raises(BatchError, match="not a multiple of batch.prompts_per_update"):
        rl_batch(250, 32, 8, 4, World(1, "test", "x"))


@pytest.mark.parametrize("preset", ["rl_paper_llama32_3b", "rl_paper_qwen25_math_7b"])
@pytest.mark.parametrize(
    ("launcher", "size"), [("single", 1)] + [(launcher, size) for launcher in ("torchrun", "slurm") for size in (*SIZES, ODD)]
)
def test_rl_preset_derives_grpo_sizes_under_every_launcher(composed, preset, launcher, size):
    cfg = composed(f"experiment={preset}", "policy=p", name="rl.yaml")
    env, _ = launcher_env(launcher, size)
    world = rl_world(env, processes=size)
    per_device = cfg.grpo.per_device_train_batch_size
    if 256 % (per_device * size):
        with pytest.raises(BatchError, match="batch.prompts_per_update=32"):
            apply_rl_batch(cfg, world)
        return
    derived = apply_rl_batch(cfg, world)
    assert cfg.grpo.gradient_accumulation_steps == derived.accumulation == 256 // (per_device * size)
    assert cfg.grpo.generation_batch_size == 2048 and derived.updates_per_rollout == 8


def test_rl_in_one_process_builds_trls_config_with_the_paper_batches(tmp_path):
    """The single-process build that took 4 prompts per update and 64 updates per rollout batch."""
    from sedsft.rl.training import grpo_config

    cfg = compose_config(tmp_path, tmp_path, "experiment=rl_paper_llama32_3b", "policy=p", "grpo.bf16=false",
                         "grpo.use_vllm=false", shrink=False, name="rl.yaml")  # fmt: skip
    apply_rl_batch(cfg, rl_world({}, processes=1))
    args = grpo_config(cfg, tmp_path)
    completions_per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps  # one process
    assert completions_per_update // args.num_generations == 32
    assert args.steps_per_generation // args.gradient_accumulation_steps == 8  # updates per rollout batch
    assert args.generation_batch_size // args.num_generations == 256


def test_rl_tasks_that_did_not_join_one_group_are_refused():
    with pytest.raises(WorldSizeError, match="SLURM_NTASKS=8 .* accelerate sees 1 process"):
        rl_world({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "pipeline"}, processes=1)


def test_slurm_tasks_are_exported_as_one_torch_process_group():
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "SLURM_JOB_NAME": "p",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7", "SLURM_JOB_ID": "1234"}  # fmt: skip
    assert export_slurm_process_group(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.7"}  # fmt: skip
    assert launcher_world(env).size == 8
    # after an SFT stage in the same process: its MASTER_ADDR / PORT / WORLD_SIZE are kept, the ranks added
    after_sft = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_JOB_NAME": "p",
                 "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "WORLD_SIZE": "8"}  # fmt: skip
    assert export_slurm_process_group(after_sft)
    assert (after_sft["RANK"], after_sft["LOCAL_RANK"], after_sft["MASTER_ADDR"]) == ("3", "3", "node1")
    assert not export_slurm_process_group({"LOCAL_RANK": "0", "WORLD_SIZE": "8", "SLURM_NTASKS": "8"})  # torchrun did
    assert not export_slurm_process_group({"SLURM_NTASKS": "1"})
    with pytest.raises(WorldSizeError, match="MASTER_ADDR is unset"):
        export_slurm_process_group({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "p"})


# ------------------------------------------------------------------ verl: global batches
@pytest.mark.parametrize("gpus", [*SIZES, ODD])
def test_verl_batches_stay_global_on_any_gpu_count(composed, gpus):
    cfg = composed("experiment=rl_paper_llama32_3b", "policy=p", name="rl.yaml")
    cfg.verl.n_gpus_per_node = gpus
    world = verl_world(cfg)
    assert world.size == gpus
    if 256 % gpus:  # verl would floor 256 / 6 = 42 completions per GPU silently
        with pytest.raises(BatchError, match=r"256 completions over .*42.6667 per GPU"):
            verl_batch(cfg, world)
        return
    sizes = verl_batch(cfg, world)
    assert (sizes.train_batch_size, sizes.ppo_mini_batch_size, sizes.updates_per_rollout) == (256, 32, 8)


def test_verl_command_on_4_gpus_keeps_the_global_mini_batch(tmp_path):
    from sedsft.rl.verl import verl_overrides

    hf = tmp_path / "export"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cfg = compose_config(tmp_path, tmp_path, "experiment=rl_paper_llama32_3b", f"policy={hf}",
                         "verl.n_gpus_per_node=4", shrink=False, name="rl.yaml")  # fmt: skip
    overrides = dict(o.split("=", 1) for o in verl_overrides(cfg, "/d/train.parquet", "/d/val.parquet"))
    assert overrides["actor_rollout_ref.actor.ppo_mini_batch_size"] == "32"  # was 16 on 4 GPUs
    assert overrides["data.train_batch_size"] == "256" and overrides["trainer.n_gpus_per_node"] == "4"
    assert "trainer.val_before_train" not in overrides and "actor_rollout_ref.actor.optim.weight_decay" not in overrides
    # the release's DAPO rules through the project's scorer (verl's own one would read "Answer:" lines)
    assert overrides["custom_reward_function.path"].endswith("dapo.py")
    assert overrides["++custom_reward_function.reward_kwargs.mode"] == "strict_box"
    assert cfg.verl.data_source == "math_dapo"


# ------------------------------------------------------------------ presets: the release's values
@pytest.mark.parametrize("model", ["llama32_3b", "qwen25_math_7b"])
def test_paper_sed_presets_run_the_release_sed_and_its_length_limit(tmp_path, model):
    cfg = compose_config(tmp_path, tmp_path, f"experiment=paper_{model}_sed", shrink=False)
    loss = cfg.loss
    assert (loss.name, loss.top_k, loss.calib_top_k, loss.calib_positions, loss.cumsum_ratio, loss.lam) == (
        "sed", 2, 10, "all", 0.7, 1.0)  # fmt: skip
    assert cfg.data.max_length == 32000 and cfg.batch.sequences_per_step == 128
    consistent = compose_config(tmp_path, tmp_path, f"experiment=paper_{model}_sed", "loss=sed", shrink=False).loss
    assert (consistent.top_k, consistent.calib_top_k, consistent.calib_positions) == (10, None, "target")


@pytest.mark.parametrize("preset", ["rl_paper_llama32_3b", "rl_paper_qwen25_math_7b"])
def test_rl_presets_follow_the_released_data_and_scorer(tmp_path, preset):
    cfg = compose_config(tmp_path, tmp_path, f"experiment={preset}", "policy=p", shrink=False, name="rl.yaml")
    assert cfg.data.system_prompt is None  # the released prompts carry a user turn only
    assert Path(cfg.data.path).name == "math_dapo_rl_2069.parquet" and Path(cfg.heldout.path).name == "aime-2024.parquet"
    reward = OmegaConf.to_container(cfg.reward.funcs[0])
    assert reward == {"_target_": "sedsft.rl.dapo.dapo_reward", "_partial_": True, "mode": "strict_box",
                      "after_think": True, "correct": 1.0, "wrong": -1.0}  # fmt: skip  (the release's rules)
    assert cfg.verl.use_project_reward  # verl's own math_dapo scorer would read "Answer:" lines
    # The release's RL file, pinned by its SHA-256 (pppa2019/SED-SFT@1a251a9d); AIME-2024 not pinned.
    assert cfg.data.train.sha256 == "bf24da10600809f85640f736a8aaa8c06ebc8a6d8e2da9dca52c1dd0af84be8e"
    assert cfg.heldout.sha256 is None
    assert (cfg.batch.rollout_prompts, cfg.batch.prompts_per_update, cfg.grpo.num_generations) == (256, 32, 8)


@pytest.mark.parametrize(("grid", "model"), [("paper_slurm", "Llama-3.2-3B"), ("paper_slurm_qwen25_math_7b", "Qwen2.5-Math-7B")])
def test_slurm_grids_start_one_task_per_gpu_and_name_every_file(tmp_path, grid, model):
    from hydra import initialize_config_dir

    from sedsft.pipeline.stages import stage_config, stage_overrides

    cfg = compose_config(tmp_path, tmp_path, f"grid={grid}", "loss=sed_release", shrink=False, name="pipeline.yaml")
    launcher = OmegaConf.load(ROOT / "configs" / "grid" / "paper_slurm.yaml").hydra.launcher
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        sft = stage_config("train", stage_overrides(cfg, "sft", tmp_path))
        rl = stage_config("rl", stage_overrides(cfg, "rl", tmp_path))
    assert launcher.tasks_per_node == sft.trainer.devices == launcher.gpus_per_node == 8
    assert model in sft.model.name_or_path and sft.loss.top_k == 2 and sft.batch.sequences_per_step == 128
    assert rl.data.path.endswith("math_dapo_rl_2069.parquet") and rl.heldout.path.endswith("aime-2024.parquet")
    env = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "pipeline"}
    assert apply_sft_batch(sft, lightning_world(sft, env)).accumulation == 16
    assert apply_rl_batch(rl, rl_world(env, processes=8)).update_prompts == 32


@pytest.mark.parametrize("trainer", ["fsdp", "ddp", "gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_every_strategy_takes_the_paper_batch_with_the_same_normalisation(composed, trainer):
    """No strategy is refused for its normalisation any more: the module normalises by the
    accumulated batch's target tokens on each (tests/test_module.py, tests/test_ddp.py,
    tests/test_deepspeed.py), so the paper's 128 sequences derive the same accumulation."""
    cfg = composed("experiment=paper_llama32_3b_ce", f"trainer={trainer}", "trainer.devices=8")
    assert "allow_micro_batch_mean" not in cfg.batch
    assert apply_sft_batch(cfg, lightning_world(cfg, {})).accumulation == 16


def test_pinned_local_file_is_read_only_when_its_sha256_matches(tmp_path, caplog):
    import hashlib
    import logging

    import pandas as pd

    from sedsft.data.formats import DataError
    from sedsft.data.sources import LocalFileSource

    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"question": ["1+1?", "2+2?"], "answer": ["2", "4"]}).to_parquet(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO, logger="sedsft.data.sources"):
        assert len(LocalFileSource(str(path), sha256=digest.upper()).load()) == 2
    assert f"SHA-256 {digest}, as pinned" in caplog.text  # said in the run's log
    other = "0" * 64
    with pytest.raises(DataError, match=rf"prompts.parquet.*has SHA-256 {digest}, not the pinned {other}.*sha256=null"):
        LocalFileSource(str(path), sha256=other).load()
    assert len(LocalFileSource(str(path)).load()) == 2  # unpinned: read as it is


def test_heldout_file_pin_is_passed_to_the_source(tmp_path):
    from sedsft.data.formats import DataError
    from sedsft.rl.data import heldout_prompts

    path = tmp_path / "aime.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n')
    cfg = OmegaConf.create({"heldout": {"path": str(path), "sha256": "0" * 64, "num_prompts": None},
                            "data": {"system_prompt": None}})  # fmt: skip
    with pytest.raises(DataError, match="not the pinned"):
        heldout_prompts(cfg)
    cfg.heldout.sha256 = None
    assert heldout_prompts(cfg)[1] == ["2"]


def test_pinned_hub_revision_is_passed_and_logged(monkeypatch, caplog):
    import logging

    import datasets

    from sedsft.data.sources import HubSource

    seen = {}

    def load_dataset(name, subset, split, revision):
        seen["revision"] = revision
        return datasets.Dataset.from_dict({"question": ["q"], "response": ["r"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with caplog.at_level(logging.INFO, logger="sedsft.data.sources"):
        HubSource("owner/data", revision="abc123").load()
    assert seen["revision"] == "abc123" and "owner/data: revision abc123, as pinned" in caplog.text


def test_unpinned_hub_data_reads_and_logs_the_current_commit(monkeypatch, caplog):
    """MiroMind rows and hub RL prompts without a revision: the hub's current commit is read,
    used for the download and logged with the knob that pins it (no network here)."""
    import datasets
    import huggingface_hub

    from sedsft.data.sources import HubSource

    seen = {}

    class Info:
        sha = "0123abcd" * 5

    def load_dataset(name, subset, split, revision):
        seen["revision"] = revision
        return datasets.Dataset.from_dict({"question": ["q"] * 3, "response": ["r"] * 3})

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name: Info())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with caplog.at_level("WARNING"):
        rows = HubSource("owner/data", rows=[0, 2]).load()
    assert len(rows) == 2 and seen["revision"] == Info.sha
    assert f"pin it for the next runs: revision={Info.sha}" in caplog.text.lower()
    seen.clear()
    HubSource("owner/data", revision="v1").load()  # a pinned source is not looked up
    assert seen["revision"] == "v1"

    def offline(self, name):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    seen.clear()
    with caplog.at_level("WARNING"):
        HubSource("owner/data").load()
    assert seen["revision"] is None and "could not be read (offline)" in caplog.text


def test_rl_check_at_start_names_a_process_count_that_cannot_give_the_batches(composed, monkeypatch):
    """validate_rl_config (run start, and pipeline job start before SFT) uses the launcher's count."""
    from sedsft.rl.checks import validate_rl_config

    cfg = composed("experiment=rl_paper_llama32_3b", "policy=p", name="rl.yaml")
    monkeypatch.setenv("WORLD_SIZE", "8")
    validate_rl_config(cfg)
    assert cfg.grpo.gradient_accumulation_steps is None  # checked on a copy; derived only when the run starts
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"invalid configuration:\n  batch.prompts_per_update=32 .* on 6 process"):
        validate_rl_config(cfg)


def test_a_per_process_value_beside_the_global_batch_is_overruled_and_said(composed, caplog):
    cfg = composed("experiment=paper_llama32_3b_ce")
    cfg.trainer.accumulate_grad_batches = 8  # e.g. a command line from before batch.sequences_per_step
    with caplog.at_level("WARNING"):
        apply_sft_batch(cfg, World(8, "test", "8 fake processes"))
    assert cfg.trainer.accumulate_grad_batches == 16
    assert "trainer.accumulate_grad_batches=8 replaced by 16, derived from batch.sequences_per_step" in caplog.text
