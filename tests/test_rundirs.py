"""Run directories are never shared: every run (and every rank 0 of a distributed run) gets
a directory it created itself, even when runs start in the same second; the other ranks
of one run, multirun jobs and submitit jobs use the directory of the run they belong to.

The clock is frozen in the launched processes (Hydra's ``${now:...}``), so "started in the
same second" is certain, not a race that usually happens.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from sedsft.utils import rundir

STAMP = "2026-01-02_03-04-05"  # what the frozen clock makes ${now:%Y-%m-%d_%H-%M-%S}

# Runs a script (src/train.py, ...) or, without one, a Hydra app on configs/train.yaml that
# only records where it ran, with Hydra's clock frozen at STAMP.
LAUNCH = textwrap.dedent(
    f"""
    import datetime, json, os, runpy, sys
    import hydra.core.utils

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    hydra.core.utils.datetime = Frozen
    if len(sys.argv) > 1 and sys.argv[1].endswith(".py"):
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        raise SystemExit(0)

    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path={str(ROOT / "configs")!r}, config_name="train")
    def main(cfg):
        out = HydraConfig.get().runtime.output_dir
        record = {{"output_dir": out, "paths": cfg.paths.output_dir, "seed": cfg.seed, "argv": sys.argv}}
        if os.environ.get("PROBE_DDP_CHILD"):  # the command Lightning's DDP launcher gives rank 1
            from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
            record["child_argv"] = _hydra_subprocess_cmd(local_rank=1)[0][1:]
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(json.dumps(record) + "\\n")

    main()
    """
)


@pytest.fixture
def launch(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    log = tmp_path / "probe.jsonl"
    env = {
        **os.environ,
        "PROBE_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        del env[key]

    def start(*args: str, extra_env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), *args], cwd=ROOT, env={**env, **(extra_env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def records() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return start, records


def finish(*runs: subprocess.Popen, timeout: float = 300) -> None:
    for run in runs:
        output = run.communicate(timeout=timeout)[0]
        assert run.returncode == 0, output[-3000:]


def test_claim_gives_every_concurrent_caller_its_own_directory(tmp_path):
    n = 8
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()

    def worker():
        barrier.wait()  # all of them at the same instant, with the same name
        queue.put(str(rundir.claim(tmp_path / "runs", STAMP)))

    procs = [ctx.Process(target=worker) for _ in range(n)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=60) for _ in range(n))
    for p in procs:
        p.join(10)
    expected = [STAMP] + [f"{STAMP}_{i}" for i in range(1, n)]
    assert sorted(Path(p).name for p in got) == sorted(expected)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(expected)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, launch):
    start, records = launch
    runs = [start(f"paths.log_dir={tmp_path}", f"seed={seed}") for seed in (1, 2, 3)]
    finish(*runs)
    got = {r["seed"]: r for r in records()}
    assert len({r["output_dir"] for r in got.values()}) == 3
    runs_dir = tmp_path / "train" / "runs"
    assert sorted(p.name for p in runs_dir.iterdir()) == [STAMP, f"{STAMP}_1", f"{STAMP}_2"]
    for seed, record in got.items():
        assert record["paths"] == record["output_dir"]  # paths.output_dir is the run's directory
        saved = yaml.safe_load((Path(record["output_dir"]) / ".hydra" / "config.yaml").read_text())
        assert saved["seed"] == seed  # each run's config is its own


def test_a_directory_is_never_reused(tmp_path, launch):
    start, records = launch
    (tmp_path / "train" / "runs" / STAMP).mkdir(parents=True)  # an earlier run's
    finish(start(f"paths.log_dir={tmp_path}"))
    assert records()[0]["output_dir"] == str(tmp_path / "train" / "runs" / f"{STAMP}_1")
    # an explicit hydra.run.dir is the user's choice and is used as given
    finish(start(f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'mine'}"))
    assert records()[1]["output_dir"] == str(tmp_path / "mine")


def test_lightning_ddp_child_uses_rank_zeros_directory(tmp_path, launch):
    start, records = launch
    finish(start(f"paths.log_dir={tmp_path}", extra_env={"PROBE_DDP_CHILD": "1"}))
    parent = records()[0]
    finish(start(*parent["child_argv"]))  # what Lightning runs for rank 1, same frozen clock
    child = records()[1]
    assert child["output_dir"] == parent["output_dir"] == str(tmp_path / "train" / "runs" / STAMP)
    assert [p.name for p in (tmp_path / "train" / "runs").iterdir()] == [STAMP]


def test_multiruns_started_together_have_their_own_sweep_directories(tmp_path, launch):
    start, records = launch
    runs = [start("-m", f"paths.log_dir={tmp_path}", f"seed={a},{b}") for a, b in ((1, 2), (3, 4))]
    finish(*runs)
    dirs = {r["seed"]: Path(r["output_dir"]) for r in records()}
    sweeps = tmp_path / "train" / "multiruns"
    assert sorted(p.name for p in sweeps.iterdir()) == [STAMP, f"{STAMP}_1"]
    # the jobs of one sweep share its directory, each in its own job subdirectory
    assert dirs[1].parent == dirs[2].parent != dirs[3].parent == dirs[4].parent
    assert {dirs[1].name, dirs[2].name} == {dirs[3].name, dirs[4].name} == {"0", "1"}


def test_submitit_jobs_use_the_sweep_directory_of_their_launch(tmp_path, launch):
    """The submitit launcher pickles the config; each job resolves the sweep directory again
    in its own process: it must find the launch's, not create another."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    start, records = launch
    finish(
        start(
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            f"paths.log_dir={tmp_path}",
            "seed=1,2",
        )
    )
    dirs = [Path(r["output_dir"]) for r in records()]
    sweep = tmp_path / "train" / "multiruns" / STAMP
    assert sorted(dirs) == [sweep / "0", sweep / "1"]
    assert all(
        "submitit" in " ".join(r["argv"]) for r in records()
    )  # really in submitit's job processes
    assert [p.name for p in sweep.parent.iterdir()] == [STAMP]


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NAME": "train",
}


def test_slurm_tasks_share_the_job_directory_and_a_requeue_reuses_it(tmp_path):
    parent = str(tmp_path / "runs")
    got: dict[str, str] = {}
    waiter = threading.Thread(
        target=lambda: got.update(
            r1=rundir.unique_dir(parent, STAMP, {**SLURM, "SLURM_PROCID": "1"})
        )
    )
    waiter.start()  # task 1 first: it waits for task 0 to create the directory
    time.sleep(0.3)
    assert "r1" not in got
    got["r0"] = rundir.unique_dir(parent, STAMP, {**SLURM, "SLURM_PROCID": "0"})
    waiter.join(10)
    assert got["r0"] == got["r1"] == str(tmp_path / "runs" / "slurm-4242.0")

    # the same job id again without a requeue is refused (two tasks could not agree on another name)
    with pytest.raises(
        FileExistsError,
        match="slurm-4242.0 exists although SLURM job slurm-4242.0 was not requeued",
    ):
        rundir.unique_dir(parent, STAMP, {**SLURM, "SLURM_PROCID": "0"})
    # a requeued job continues in its directory: Lightning resumes the hpc_ckpt it left there
    requeued = {**SLURM, "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"}
    assert rundir.unique_dir(parent, STAMP, requeued) == got["r0"]

    # one task (sbatch running python directly), array task naming, a second run in the same job
    single = {
        "SLURM_JOB_ID": "77",
        "SLURM_ARRAY_JOB_ID": "70",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
    }
    assert Path(rundir.unique_dir(parent, STAMP, single)).name == "slurm-70_3"
    assert Path(rundir.unique_dir(parent, STAMP, single)).name == "slurm-70_3_1"
    # an interactive allocation is not a SLURM-launched run (as for Lightning): timestamps
    interactive = {**single, "SLURM_JOB_NAME": "interactive"}
    assert Path(rundir.unique_dir(parent, STAMP, interactive)).name == STAMP


def test_torchrun_ranks_share_rank_zeros_directory(tmp_path, launch):
    start, records = launch
    script = tmp_path / "launch.py"
    env = {**os.environ, "PROBE_LOG": str(tmp_path / "probe.jsonl"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        f"paths.log_dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = records()
    assert len(got) == 2 and got[0]["output_dir"] == got[1]["output_dir"] == str(
        tmp_path / "train" / "runs" / STAMP
    )
    assert [p.name for p in (tmp_path / "train" / "runs").iterdir()] == [STAMP]


@pytest.mark.slow
def test_trainings_started_together_keep_their_own_outputs(tmp_path, launch, cache_dir):
    """The issue's case: ``loss=ce`` and ``loss=gem`` (and ``dft``) launched in the same second;
    each run's config, checkpoint and metrics must be its own."""
    import torch

    start, _ = launch
    losses = ("ce", "gem", "dft")
    tiny = [
        f"paths.log_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "model.pretrain_steps=4",
        "data.train.n=16", "data.val.n=8", "data.num_workers=0", "trainer.max_steps=1",
        "callbacks=none", "logger=[]", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]  # fmt: skip
    finish(*[start("src/train.py", *tiny, f"loss={loss}") for loss in losses], timeout=600)
    runs = sorted((tmp_path / "train" / "runs").iterdir())
    assert [p.name for p in runs] == [STAMP, f"{STAMP}_1", f"{STAMP}_2"]
    seen: dict[str, float] = {}
    for run in runs:
        loss = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["loss"]["name"]
        (ckpt,) = (run / "checkpoints").glob("*.ckpt")
        assert (
            torch.load(ckpt, map_location="cpu", weights_only=True)["sedsft"]["config"]["loss"][
                "name"
            ]
            == loss
        )
        metrics = json.loads((run / "metrics.json").read_text())
        seen[loss] = metrics["train/loss"]
    assert sorted(seen) == sorted(losses)
    assert len(set(seen.values())) == len(losses)  # three different losses: three metrics files
