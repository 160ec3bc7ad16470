"""Resume and reproducibility.

A run interrupted at step k and resumed from ``last.ckpt`` ends exactly like the run that
was never interrupted: same batches in the same order (mid-epoch and across the epoch
boundary), same losses, weights, optimiser, schedule and SED ``tau`` (restored, not
recalibrated). Both runs are configured with the same ``max_steps`` so that their
schedules agree; the interruption is an exception raised inside step k + 1.
Ctrl-C on ``python src/train.py`` writes ``checkpoints/on_exception.ckpt``, which resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from conftest import ROOT, compose_config
from sedsft.losses.sed import calibration
from sedsft.sft.callbacks import checkpoint as checkpoint_callback
from sedsft.sft.module import SFTModule
from sedsft.sft.training import train

N_TRAIN, BATCH, MAX_STEPS = 32, 8, 6  # 4 batches per epoch: the runs cross an epoch boundary
BASE = [  # the defaults of callbacks.model_checkpoint: best by val/loss, last.ckpt every 15 minutes
    "loss=sed",
    f"data.train.n={N_TRAIN}",
    "data.val.n=8",
    f"data.batch_size={BATCH}",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "data.num_workers=0",
    "loss.calib_num_examples=8",
    "~callbacks.generation_eval",
    "~callbacks.hf_export",
    "~callbacks.lr_monitor",
    "logger=[]",
]
RUN = [  # no validation; last.ckpt at every step boundary (the time trigger with a zero interval)
    *BASE,
    "+trainer.limit_val_batches=0",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.every_minutes=0",
]


class Interrupted(Exception):
    pass


@pytest.fixture
def trace(monkeypatch):
    """Per training step: (global step, data rows, loss); raises inside step ``stop_at + 1``;
    counts tau calibrations."""
    record = {"steps": [], "stop_at": None, "calibrations": 0}
    step = SFTModule.training_step
    calibrate = calibration.calibrate_tau

    def spy_step(self, batch, batch_idx):
        if self.global_step == record["stop_at"]:
            raise Interrupted(f"stopped before step {self.global_step + 1}")
        loss = step(self, batch, batch_idx)
        record["steps"].append((self.global_step, batch["rows"].tolist(), loss.item()))
        return loss

    def spy_calibrate(*args, **kwargs):
        record["calibrations"] += 1
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(SFTModule, "training_step", spy_step)
    monkeypatch.setattr(calibration, "calibrate_tau", spy_calibrate)
    return record


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def expected_rows(seed: int, steps: int, start: int = 0) -> list[list[int]]:
    """The rows of steps ``start + 1 .. steps`` by the sampler's definition: the shuffle of
    epoch e is ``randperm(N_TRAIN)`` seeded with ``seed + e`` (toy rows are numbered 0..N-1)."""
    out = []
    for epoch in range(steps * BATCH // N_TRAIN + 1):
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += [order[i : i + BATCH] for i in range(0, N_TRAIN, BATCH)]
    return out[start:steps]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The reference run to MAX_STEPS, traced."""
    record = {"steps": [], "calibrations": 0}
    out = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as patch:
        step = SFTModule.training_step

        def spy_step(self, batch, batch_idx):
            loss = step(self, batch, batch_idx)
            record["steps"].append((self.global_step, batch["rows"].tolist(), loss.item()))
            return loss

        patch.setattr(SFTModule, "training_step", spy_step)
        record["metrics"] = train(compose_config(out, cache_dir, *RUN))
    record["last"] = checkpoint(out / "checkpoints" / "last.ckpt")
    return record


@pytest.mark.parametrize("k", [2, 4])  # mid-epoch; at the end of epoch 0
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, cache_dir, trace, uninterrupted, k):
    full = uninterrupted["steps"]
    assert [rows for _, rows, _ in full] == expected_rows(42, MAX_STEPS)

    trace["stop_at"] = k
    with pytest.raises(Interrupted):
        train(compose_config(tmp_path, cache_dir, *RUN))
    first = trace["steps"]
    # same config and seed, trained from scratch again: the same numbers, to the bit
    assert first == full[:k]
    assert trace["calibrations"] == 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["global_step"] == k

    trace.update(steps=[], stop_at=None, calibrations=0)
    resumed = compose_config(tmp_path / "resumed", cache_dir, *RUN, f"ckpt_path={last}")
    metrics = train(resumed)
    assert trace["calibrations"] == 0  # tau comes from the checkpoint
    assert trace["steps"] == full[k:]  # exactly the unseen batches, same losses
    assert metrics["train/loss"] == uninterrupted["metrics"]["train/loss"]

    a, b = uninterrupted["last"], checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():  # weights and tau
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert b["state_dict"]["loss_fn.tau"] == checkpoint(last)["state_dict"]["loss_fn.tau"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
    assert b["sedsft"]["config"]["seed"] == 42


class SigtermAt(L.Callback):
    """Sends this process SIGTERM (what a scheduler sends before it kills a job) at the start
    of step ``step + 1``: that step finishes, then Lightning stops."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_exits_non_zero_with_a_checkpoint_that_resumes(tmp_path, cache_dir, trace, uninterrupted, caplog):
    full = uninterrupted["steps"]
    cfg = compose_config(tmp_path, cache_dir, *RUN, "+callbacks.sigterm._target_=test_resume.SigtermAt", "+callbacks.sigterm.step=2")
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 143  # not 0: a pre-empted run is not a completed one
    assert trace["steps"] == full[:3]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["global_step"] == 3
    # last.ckpt was written at this very step: no on_exception.ckpt copy of the same state
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert "stopped by SIGTERM at step 3 (pre-empted?); exit status 143; resume with:" in caplog.text
    assert f"ckpt_path={last}" in caplog.text

    trace.update(steps=[], calibrations=0)
    metrics = train(compose_config(tmp_path / "resumed", cache_dir, *RUN, f"ckpt_path={last}"))
    assert trace["steps"] == full[3:]  # the unseen batches, same losses
    assert metrics["train/loss"] == uninterrupted["metrics"]["train/loss"]


def test_last_checkpoint_every_15_minutes_before_any_validation(tmp_path, cache_dir, trace, uninterrupted, monkeypatch):
    """The default knobs (best by val/loss, validated at the end of each 4-step epoch;
    last.ckpt every 15 minutes) on a clock where every step takes 5 minutes: a run killed in
    step 4 has last.ckpt from step 3 (15 minutes), not nothing until the end of the epoch."""
    monkeypatch.setattr(checkpoint_callback, "time", SimpleNamespace(monotonic=lambda: 300.0 * len(trace["steps"])))
    trace["stop_at"] = 3
    with pytest.raises(Interrupted):
        train(compose_config(tmp_path, cache_dir, *BASE))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["global_step"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no validation yet: no best file

    trace.update(steps=[], stop_at=None, calibrations=0)
    train(compose_config(tmp_path / "resumed", cache_dir, *BASE, f"ckpt_path={last}"))
    assert trace["steps"] == uninterrupted["steps"][3:]  # the uninterrupted run's batches and losses


def test_last_and_best_of_one_step_are_one_file(tmp_path, cache_dir):
    """One epoch of 4 steps, last.ckpt at every step boundary and validation at the end: the
    best file and last.ckpt hold step 4, stored once (last.ckpt links to the best file)."""
    train(compose_config(tmp_path, cache_dir, *BASE, "trainer.max_steps=4", "trainer.max_epochs=1", "callbacks.model_checkpoint.every_minutes=0"))
    folder = tmp_path / "checkpoints"
    last, best = folder / "last.ckpt", folder / "best_step_000004.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == ["best_step_000004.ckpt", "last.ckpt"]
    assert last.is_symlink() and last.resolve() == best.resolve() and best.is_file() and not best.is_symlink()
    assert checkpoint(last)["global_step"] == 4


def test_sigterm_without_checkpoint_callbacks_still_exits_non_zero(tmp_path, cache_dir, caplog):
    cfg = compose_config(
        tmp_path, cache_dir, "callbacks=none", "logger=[]", "+trainer.enable_checkpointing=false", "data.train.n=32",
        "trainer.max_steps=3", "+callbacks.sigterm._target_=test_resume.SigtermAt", "+callbacks.sigterm.step=1",
    )  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 143
    assert "stopped by SIGTERM at step 2; no checkpoint was written" in caplog.text


class RowLog(L.Callback):
    """Appends ``{"step", "rows"}`` of every completed step to a JSON-lines file; with
    ``pause`` it sleeps before each step from step ``pause_after`` on (a window for Ctrl-C)."""

    def __init__(self, path: str, pause: float = 0.0, pause_after: int = 0):
        self.path, self.pause, self.pause_after = Path(path), pause, pause_after

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.pause and trainer.global_step >= self.pause_after:
            (self.path.parent / "paused").touch()
            time.sleep(self.pause)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": batch["rows"].tolist()}) + "\n")


def cli_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a ``src/train.py`` subprocess: the session's model cache, and ``src``
    and ``tests`` importable (the ``RowLog`` callback lives here)."""
    path = f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"
    return {**os.environ, "SEDSFT_CACHE": str(cache_dir), "PYTHONPATH": path, **extra}


def cli_command(rows: Path, *overrides: str, steps: int = MAX_STEPS) -> list[str]:
    """``python src/train.py`` on this module's small data, no validation, no exports, the
    rows of each step logged to ``rows`` (``RowLog``), then ``overrides``."""
    return [
        sys.executable, "src/train.py", "model.pretrain_steps=4", f"data.train.n={N_TRAIN}", "data.val.n=8",
        f"data.batch_size={BATCH}", f"trainer.max_steps={steps}", "+trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~callbacks.generation_eval",
        "~callbacks.hf_export", "~callbacks.lr_monitor", "logger=[]", "callbacks.model_checkpoint.monitor=null",
        "+callbacks.rows._target_=test_resume.RowLog", f"+callbacks.rows.path={rows}", *overrides,
    ]  # fmt: skip


def start_paused(command: list[str], env: dict[str, str], rows: Path) -> subprocess.Popen:
    """Start ``command`` (with ``+callbacks.rows.pause=...``) and return once its ``RowLog``
    pauses (``<rows dir>/paused`` exists), within 240 s."""
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    paused = rows.parent / "paused"
    deadline = time.monotonic() + 240
    while not paused.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert paused.exists(), run.communicate()[0][-3000:] if run.poll() is not None else "no pause"
    return run


def test_ctrl_c_writes_a_checkpoint_that_resumes(tmp_path, cache_dir):
    env = cli_env(cache_dir)
    rows_log = tmp_path / "rows.jsonl"
    common = cli_command(rows_log, f"paths.log_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "run"))
    run = start_paused([*common, "+callbacks.rows.pause=30", "+callbacks.rows.pause_after=2"], env, rows_log)
    os.kill(run.pid, signal.SIGINT)  # in the pause before step 3, with its batch in flight
    output = run.communicate(timeout=120)[0]
    assert run.returncode != 0, output[-3000:]
    on_exception = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert on_exception.is_file(), output[-3000:]
    assert f"resume with ckpt_path={on_exception}" in output
    assert checkpoint(on_exception)["global_step"] == 2

    saved = yaml.safe_load((tmp_path / "run" / ".hydra" / "config.yaml").read_text())
    assert saved["seed"] == checkpoint(on_exception)["sedsft"]["config"]["seed"] == 42

    resumed = subprocess.run(
        [*common, f"ckpt_path={on_exception}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
    logged = [json.loads(line) for line in rows_log.read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, MAX_STEPS + 1))
    assert [entry["rows"] for entry in logged] == expected_rows(42, MAX_STEPS)
