"""Pre-emption is not success: ``python src/train.py`` stopped by SIGTERM (what SLURM and
other schedulers send before they kill a job) writes ``on_exception.ckpt``, prints the
command that resumes it, and exits 143; the printed command resumes to the same batches
as a run that was never stopped. (In-process variants: ``tests/test_resume.py``.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_resume import checkpoint, cli_command, cli_env, expected_rows, start_paused

STEPS = 6


@pytest.mark.slow
def test_sigterm_on_the_cli_exits_143_and_the_printed_command_resumes(tmp_path, cache_dir):
    env = cli_env(cache_dir)
    rows_log = tmp_path / "rows.jsonl"
    command = cli_command(rows_log, f"paths.log_dir={tmp_path}", steps=STEPS)
    pause = ["+callbacks.rows.pause=6", "+callbacks.rows.pause_after=2"]
    run = start_paused([*command, *pause], env, rows_log)
    os.kill(
        run.pid, signal.SIGTERM
    )  # while step 3's batch waits: step 3 finishes, then the run stops
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 143, output[-3000:]

    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    on_exception = run_dir / "checkpoints" / "on_exception.ckpt"
    assert checkpoint(on_exception)["global_step"] == 3
    assert "stopped by SIGTERM at step 3 (pre-empted?); exit status 143; resume with:" in output
    printed = re.search(r"resume with:\n\s+(python .*)", output).group(1)
    args = shlex.split(printed)
    assert args == ["python", "src/train.py", *command[2:], *pause, f"ckpt_path={on_exception}"]

    # the printed command, without the test's pause, resumes: steps 4..6 on the unseen batches
    args = [a for a in args[1:] if a not in pause]
    resumed = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = [json.loads(line) for line in rows_log.read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, STEPS + 1))
    assert [entry["rows"] for entry in logged] == expected_rows(42, STEPS)
    new_dir = next(
        p for p in (tmp_path / "train" / "runs").iterdir() if p != run_dir
    )  # a directory of its own
    assert checkpoint(new_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_only_the_steps_since_last_ckpt(tmp_path, cache_dir):
    """SIGKILL cannot be caught: what survives is last.ckpt. Written every 2 steps here (the
    default is every 15 minutes), a run killed in step 4 resumes from step 2 and ends with
    the weights of a run that was never killed."""
    env = cli_env(cache_dir)

    def command(out, rows, *extra):
        return cli_command(
            rows, f"hydra.run.dir={out}", "loss=sed", "loss.calib_num_examples=8", "trainer.max_epochs=3",
            "trainer.deterministic=true", "data.num_workers=0", "callbacks.model_checkpoint.every_n_train_steps=2",
            *extra, steps=STEPS,
        )  # fmt: skip

    reference = subprocess.run(
        command(tmp_path / "ref", tmp_path / "ref_rows.jsonl"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    rows = tmp_path / "rows.jsonl"
    run = start_paused(
        command(tmp_path / "run", rows, "+callbacks.rows.pause=30", "+callbacks.rows.pause_after=3"), env, rows
    )
    os.kill(run.pid, signal.SIGKILL)  # in step 4, mid-epoch (4 steps per epoch); step 3 is lost
    run.communicate(timeout=60)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert checkpoint(last)["global_step"] == 2

    resumed = subprocess.run(
        command(tmp_path / "resumed", rows, f"ckpt_path={last}"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 3, 4, 5, 6]  # step 3 again after the kill
    assert [e["rows"] for e in logged[3:]] == expected_rows(42, STEPS, start=2)
    a = checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert (
        json.loads((tmp_path / "resumed" / "metrics.json").read_text())["train/loss"]
        == ref_metrics["train/loss"]
    )


@pytest.mark.slow
def test_slurm_requeue_resumes_in_the_same_run_directory(tmp_path, cache_dir):
    """Lightning's SLURM support: on the requeue signal (``#SBATCH --signal=SIGUSR1@90``) it
    writes ``hpc_ckpt_1.ckpt`` into the run directory and calls ``scontrol requeue``; the
    requeued job (same job id, ``SLURM_RESTART_COUNT=1``) gets the same directory
    (``runs/slurm-<job id>``), finds the checkpoint there and continues with the batch that
    was in flight. ``scontrol`` is a stand-in script that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "sft", "SLURM_NNODES": "1"}  # fmt: skip
    env = cli_env(cache_dir, **slurm, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rows = tmp_path / "rows.jsonl"
    command = cli_command(rows, f"paths.log_dir={tmp_path}", steps=STEPS)
    run = start_paused([*command, "+callbacks.rows.pause=6", "+callbacks.rows.pause_after=2"], env, rows)
    os.kill(
        run.pid, signal.SIGUSR1
    )  # SLURM, 90 s before the time limit: step 3's batch is in flight
    deadline = time.monotonic() + 240
    while (
        not (tmp_path / "scontrol.log").exists()
        and run.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    os.kill(run.pid, signal.SIGTERM)  # SLURM then stops the requeued job
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 143, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run_dir = tmp_path / "train" / "runs" / "slurm-4242"
    assert checkpoint(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 2

    requeued = subprocess.run(
        command,
        cwd=ROOT,
        env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert [p.name for p in (tmp_path / "train" / "runs").iterdir()] == [
        "slurm-4242"
    ]  # the same directory
    logged = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [e["step"] for e in logged] == [
        1,
        2,
        3,
        3,
        4,
        5,
        6,
    ]  # from hpc_ckpt_1 (step 2): step 3 again
    assert [e["rows"] for e in logged[3:]] == expected_rows(42, STEPS, start=2)
    assert checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS
