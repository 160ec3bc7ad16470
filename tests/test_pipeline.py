"""The SFT -> GRPO pipeline per (loss, seed) and its summary across seeds."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import initialize_config_dir

from conftest import ROOT, compose_config
from sedsft.pipeline.summary import interval, paired, per_loss, summary_tables, write_summary

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom


def test_interval_by_hand():
    mean, half, n = interval([0.1, 0.2, 0.3])
    assert (mean, n) == (pytest.approx(0.2), 3)
    assert half == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))  # sd = 0.1
    mean, half, n = interval([0.5, float("nan"), None])  # undefined values are left out
    assert (mean, n) == (0.5, 1) and math.isnan(half)
    assert interval([])[2] == 0


def test_paired_differences_pair_by_seed():
    df = pd.DataFrame(
        {
            "loss": ["ce"] * 3 + ["sed"] * 3,
            "seed": [1, 2, 3, 3, 2, 1],  # sed's rows in another order: pairing goes by seed
            "m": [0.1, 0.2, 0.3, 0.4, 0.2, 0.15],
        }
    )
    diff = paired(df, ["m"]).set_index("loss").loc["sed"]
    # differences by seed: 0.05, 0.0, 0.1 -> mean 0.05, sd 0.05
    assert diff["mean"] == pytest.approx(0.05) and diff["n"] == 3
    assert diff["half"] == pytest.approx(T_975_2 * 0.05 / math.sqrt(3))
    unpaired = per_loss(df, ["m"]).set_index("loss").loc["sed", "mean"]
    assert unpaired == pytest.approx(0.25)


def write_job(root: Path, loss: str, seed: int, before: float, after: float) -> None:
    job = root / f"{loss}_{seed}"
    job.mkdir(parents=True)
    record = {"loss": loss, "seed": seed, "metrics": {
        "sft": {"val/loss": 1.0},
        "rl": {"heldout_before/pass@1": before, "heldout/pass@1": after},
    }}  # fmt: skip
    (job / "pipeline.json").write_text(json.dumps(record))


def test_summary_tables_and_files(tmp_path):
    for seed, (b, a) in enumerate([(0.1, 0.3), (0.2, 0.4), (0.3, 0.5)], start=1):
        write_job(tmp_path, "ce", seed, b, a)
        write_job(tmp_path, "sed", seed, b, a + 0.1)
    from sedsft.pipeline.summary import collect

    tables = summary_tables(collect(tmp_path), order=["ce", "sed"])
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert tables["after_sft"].loc["ce", "pass@1"] == f"0.200 ± {half:.3f}"
    assert tables["after_rl"].loc["sed", "pass@1"] == f"0.500 ± {half:.3f}"
    assert tables["after_rl_vs_ce"].loc["sed", "pass@1"] == "0.100 ± 0.000"  # the same +0.1 on every seed
    assert list(tables["after_rl"].index) == ["ce", "sed"] and tables["after_rl"].loc["ce", "seeds"] == 3
    text = write_summary(tmp_path)
    assert "After RL, paired difference to ce by seed" in text and (tmp_path / "summary.json").is_file()


def test_pipeline_and_grid_presets_compose(tmp_path):
    cfg = compose_config(tmp_path, tmp_path, "loss=sed", "loss.lam=0.5", "seed=3", shrink=False, name="pipeline.yaml")
    assert cfg.loss.name == "sed" and list(cfg.stages) == ["sft", "positions", "rl"]
    from sedsft.pipeline.stages import stage_overrides

    sft = stage_overrides(cfg, "sft", tmp_path)
    assert sft[:4] == ["loss=sed", "loss.lam=0.5", "seed=3", f"paths.output_dir={tmp_path / 'sft'}"]
    assert stage_overrides(cfg, "rl", tmp_path)[0] == f"policy={tmp_path / 'sft'}"
    from sedsft.pipeline.stages import loss_label

    assert loss_label() == "sed[loss.lam=0.5]"  # a grid over a knob keeps its settings apart
    grid = compose_config(tmp_path, tmp_path, "grid=toy_claim", shrink=False, name="pipeline.yaml")
    assert grid is not None
    slurm = compose_config(tmp_path, tmp_path, "grid=paper_slurm", "loss=gem", shrink=False, name="pipeline.yaml")
    assert list(slurm.sft.overrides[:2]) == ["experiment=paper/base", "model=llama32_3b"]  # the loss from the sweep


def test_added_overrides_extend_the_stage_base_and_a_silent_replacement_is_refused(tmp_path, cache_dir):
    from sedsft.pipeline.stages import stage_overrides
    from test_relaunch import pipeline_config, run_job

    cfg = pipeline_config(tmp_path / "job", cache_dir, "sft.add=['trainer.max_steps=2']", "rl.add=['grpo.max_steps=3']")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        sft = stage_overrides(cfg, "sft", tmp_path / "job")
        rl = stage_overrides(cfg, "rl", tmp_path / "job")
    assert sft[-3:] == ["experiment=toy", "trainer.enable_progress_bar=false", "trainer.max_steps=2"]
    assert rl[-3:] == ["grpo=toy", "++grpo.disable_tqdm=true", "grpo.max_steps=3"]
    # the way a user first tries it: the list replaces the base and would drop experiment=toy
    with pytest.raises(ValueError) as caught:
        run_job(tmp_path / "job2", cache_dir, "sft.overrides=['trainer.max_steps=2']")
    message = str(caught.value)
    assert "drops ['experiment=toy', 'trainer.enable_progress_bar=false']" in message
    assert "sft.add=[...]" in message and "sft.replace=true" in message
    assert not (tmp_path / "job2" / "sft").exists()  # refused before any stage


def test_a_job_names_its_tensorboard_run_by_the_stage_experiment_and_ends_with_both_stages():
    from sedsft.pipeline.run import job_report
    from sedsft.pipeline.stages import stage_experiment

    assert stage_experiment(["loss=sed", "experiment=toy", "trainer.max_steps=2"]) == "toy"
    assert stage_experiment(["loss=sed"]) is None
    record = {"loss": "sed", "seed": 3, "metrics": {"rl": {"heldout_before/pass@1": 0.25, "heldout/pass@1": 0.5}}}
    lines = job_report(record, Path("JOB")).splitlines()
    assert lines[:3] == ["sed, seed 3: held-out:", "           after SFT    after RL", "  pass@1      0.2500      0.5000"]
    assert lines[-2] == "all metrics: JOB/pipeline.json" and lines[-1].startswith("key: ")


SFT_TINY = [
    "experiment=toy", "model.pretrain_steps=4", "data.train.n=48", "data.val.n=8",
    "data.batch_size=8", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "callbacks.generation_eval.num_prompts=2", "callbacks.generation_eval.sampling.num_samples=2",
    "callbacks.generation_eval.sampling.max_new_tokens=8",
]  # fmt: skip
RL_TINY = [
    "grpo=toy", "data.train.n=16", "grpo.max_steps=2", "grpo.generation_batch_size=8",
    "grpo.num_generations=4", "grpo.per_device_train_batch_size=4", "grpo.max_completion_length=8",
    "grpo.save_steps=100", "heldout.num_prompts=2", "heldout.sampling.num_samples=2", "heldout.sampling.batch_size=2",
    "++grpo.disable_tqdm=true",
]  # fmt: skip


def as_list(overrides: list[str]) -> str:
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


@pytest.mark.slow
def test_two_job_grid_on_submitits_local_executor(tmp_path, cache_dir):
    """``-m loss=ce,sed`` through ``hydra/launcher=submitit_local``: both jobs run SFT and
    RL in their own directories and the summary lands in the sweep directory."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "src/pipeline.py", "-m", "loss=ce,sed", "seed=1",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
        f"hydra.sweep.dir={sweep}", f"sft.overrides={as_list(SFT_TINY)}", f"rl.overrides={as_list(RL_TINY)}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("pipeline.json"))]
    assert sorted(r["loss"] for r in records) == ["ce", "sed"]
    for record in records:
        assert record["metrics"]["sft"]["train/loss"] > 0
        assert record["metrics"]["rl"]["global_step"] == 2
        assert 0.0 <= record["metrics"]["rl"]["heldout_before/pass@1"] <= 1.0
    assert "After RL" in (sweep / "summary.md").read_text()


FIXTURE = ROOT / "tests" / "fixtures" / "pipeline_grid"  # made by tests/fixtures/make_pipeline_grid.sh


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="no committed pipeline grid fixture")
def test_notebook_executes_on_the_committed_grid(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    before = sorted(p.stat().st_mtime_ns for p in FIXTURE.rglob("*"))
    monkeypatch.setenv("SEDSFT_GRID", str(FIXTURE))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "pipeline.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "6 jobs" in text and "sed" in text
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "mask number" in shown and "base" in shown  # the position table, the base as a row
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the three figures
    assert sorted(p.stat().st_mtime_ns for p in FIXTURE.rglob("*")) == before  # read only
