"""The plots command and the reporting module on a committed routes grid (a real tiny run of
``grid=routes_claim``, made by ``tests/fixtures/grids/make_routes_smoke.sh``), and the routes
notebook executed on it."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from sedsft.reporting import figures, records
from sedsft.reporting.report import write_report

GRID = ROOT / "tests" / "fixtures" / "grids" / "routes_smoke"
TOY_GRID = ROOT / "tests" / "fixtures" / "pipeline_grid"  # the toy task's grid: no routes stage
PNG = b"\x89PNG\r\n\x1a\n"
T_975_1 = 12.706204736174698  # Student t, 97.5% quantile, 1 degree of freedom
T_975_2 = 4.302652729911275  # 2 degrees of freedom
ALL_FIGURES = set(figures.FIGURES)
# read by hand from the fixture's files (tests/fixtures/grids/routes_smoke)
HAND = {
    "ce_seed1 routes sft/overall/pass@1": 5 / 128,  # 5 correct of 16 held-out prompts x 8 samples
    "ce_seed1 rl/reward at step 1": 1 / 16,  # 1 correct of the first rollout batch's 4 prompts x 4
}


def snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def load(path):
    return json.loads((GRID / path).read_text())


def test_reader_returns_the_records_of_each_job():
    jobs = records.read_grid(GRID)
    assert [(j.loss, j.seed) for j in jobs] == [("ce", 1), ("ce", 2), ("sed", 1), ("sed", 2)]
    assert set(jobs[0].metrics) == {"sft", "positions", "rl", "routes"}
    rows = {(r["loss"], r["seed"]): r for r in records.rows(jobs)}
    # the same numbers as the jobs' own files
    assert rows["ce", 1]["routes/sft/hard/pass@1"] == load("ce_seed1/routes/metrics.json")["sft/hard/pass@1"]
    assert rows["sed", 2]["rl/heldout/pass@1"] == load("sed_seed2/rl/metrics.json")["heldout/pass@1"]
    assert rows["sed", 2]["rl/heldout/pass@1"] == load("sed_seed2/pipeline.json")["metrics"]["rl"]["heldout/pass@1"]
    # hand-read from the fixture: 16 held-out prompts x 8 samples of the routes report
    assert rows["ce", 1]["routes/sft/overall/pass@1"] == pytest.approx(HAND["ce_seed1 routes sft/overall/pass@1"])
    assert records.pass_at_k(records.rows(jobs), "routes/rl/hard/") == list(range(1, 9))


def test_interval_per_loss_and_paired_difference_by_hand():
    table = [
        {"loss": "ce", "seed": 1, "m": 0.10},
        {"loss": "ce", "seed": 2, "m": 0.40},
        {"loss": "ce", "seed": 3, "m": 0.25},
        {"loss": "sed", "seed": 3, "m": 0.35},
        {"loss": "sed", "seed": 1, "m": 0.30},
        {"loss": "sed", "seed": 4, "m": 0.90},  # no CE run of seed 4: not paired
        {"loss": "sed", "seed": 2, "m": float("nan")},  # an undefined value is left out
    ]
    mean, half, n = records.loss_interval(table, "m", "ce")
    # mean 0.25, sd = sqrt((0.15^2 + 0.15^2 + 0) / 2) = 0.15
    assert (mean, n) == (pytest.approx(0.25), 3)
    assert half == pytest.approx(T_975_2 * 0.15 / math.sqrt(3))
    mean, half, n = records.paired_difference(table, "m", "sed")
    # seeds both ran with a value: 1 (0.30 - 0.10) and 3 (0.35 - 0.25) -> 0.20, 0.10
    assert (mean, n) == (pytest.approx(0.15), 2)
    assert half == pytest.approx(T_975_1 * (0.05 * math.sqrt(2)) / math.sqrt(2))  # sd of (0.2, 0.1)


def test_curve_band_is_the_mean_and_interval_over_seeds_at_each_step():
    curves = [
        {"loss": "ce", "seed": 1, "step": 1, "value": 0.2},
        {"loss": "ce", "seed": 2, "step": 1, "value": 0.4},
        {"loss": "ce", "seed": 1, "step": 3, "value": 0.5},  # seed 2 did not log step 3
        {"loss": "sed", "seed": 1, "step": 1, "value": 0.9},
    ]
    (s1, m1, h1, n1), (s3, m3, h3, n3) = records.band(curves, "ce")
    assert (s1, n1, s3, n3) == (1, 2, 3, 1)
    assert m1 == pytest.approx(0.3) and h1 == pytest.approx(T_975_1 * 0.1)  # sd 0.1 * sqrt(2), / sqrt(2)
    assert m3 == 0.5 and math.isnan(h3)


def test_reward_curves_come_from_the_jobs_tensorboard_events():
    jobs = records.read_grid(GRID)
    curve = [(p["step"], p["value"]) for p in records.scalar_curves(jobs[:1], "rl/reward")]
    # 16 updates, 2 per rollout batch (16 completions, 8 per update): one reward per rollout batch
    assert [step for step, _ in curve] == list(range(1, 17, 2))
    assert all(0.0 <= value <= 1.0 for _, value in curve)
    assert curve[0][1] == pytest.approx(HAND["ce_seed1 rl/reward at step 1"])
    tags = records.scalar_tags(jobs, "rl/explore/hard/")
    assert {"rl/explore/hard/reward", "rl/explore/hard/any_correct", "rl/explore/hard/all_equal"} <= set(tags)


def test_plots_command_writes_every_figure_and_the_table(tmp_path):
    before = snapshot(GRID)
    out = tmp_path / "plots"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "src/plots.py", f"grid_dir={GRID}", f"out_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    written = {p.stem for p in out.glob("*.png")}
    assert written == ALL_FIGURES  # the routes grid holds every figure's inputs
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
        assert f"wrote {png}" in result.stdout
    table = (out / "summary.md").read_text()
    assert "4 jobs, losses ['ce', 'sed'], seeds [1, 2]" in table
    assert "## routes_vs_ce" in table and "## after_rl" in table and "## positions" in table
    assert "| sed    |       2 |" in table  # paired by seed: both seeds
    assert table in result.stdout
    assert snapshot(GRID) == before  # the grid is only read


def test_a_grid_without_a_figures_inputs_skips_it_with_the_reason(tmp_path):
    grid = tmp_path / "grid"  # a cut grid: every job stopped after SFT
    for job in GRID.iterdir():
        if job.is_dir():
            (grid / job.name / "sft").mkdir(parents=True)
            shutil.copy(job / "job.json", grid / job.name / "job.json")
            shutil.copy(job / "sft" / "metrics.json", grid / job.name / "sft" / "metrics.json")
    report = write_report(grid, tmp_path / "out")
    assert set(report.written) == {"diversity_vs_accuracy"}  # from the SFT run's generation eval
    assert set(report.skipped) == ALL_FIGURES - {"diversity_vs_accuracy"}
    assert "routes/metrics.json" in report.skipped["route_shares"]
    assert "rl/tensorboard" in report.skipped["rl_reward"]
    assert "positions/metrics.json" in report.skipped["mask_positions"]
    assert "4 jobs" in report.markdown


def test_the_toy_grid_draws_what_it_recorded(tmp_path):
    report = write_report(TOY_GRID, tmp_path, ["pass_at_k", "rl_exploration", "mask_positions"])
    assert set(report.written) == {"pass_at_k", "mask_positions"}  # pass@k from the RL held-out evaluation
    assert "rl/explore" in report.skipped["rl_exploration"]


def test_a_directory_that_is_not_a_grid_is_named_with_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not a grid")
    with pytest.raises(records.NotAGridError, match=r"not a pipeline grid.*<job>/pipeline\.json or <job>/job\.json"):
        records.read_grid(tmp_path)
    with pytest.raises(records.NotAGridError, match="no such directory"):
        records.read_grid(tmp_path / "missing")
    result = subprocess.run(
        [sys.executable, "src/plots.py", f"grid_dir={tmp_path}", f"out_dir={tmp_path / 'out'}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"grid_dir={tmp_path} is not a pipeline grid" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_grid_dir_is_one_message():
    result = subprocess.run(
        [sys.executable, "src/plots.py"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "grid_dir= is missing" in result.stderr and "python src/plots.py grid_dir=" in result.stderr


def test_routes_notebook_executes_on_the_committed_grid(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    before = snapshot(GRID)
    monkeypatch.setenv("SEDSFT_GRID", str(GRID))
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "routes.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 jobs, losses ['ce', 'sed'], seeds [1, 2]" in text
    assert "skipped" not in text  # the routes grid holds every figure's inputs
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "routes_vs_ce" in shown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(ALL_FIGURES)
    assert snapshot(GRID) == before


def test_unknown_figure_and_broken_record_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"figures=\['nope'\]: unknown \['nope'\]; known: \['diversity_vs_accuracy'"):
        write_report(GRID, tmp_path / "out", ["nope"])
    job = tmp_path / "grid" / "ce_seed1"
    shutil.copytree(GRID / "ce_seed1", job)
    (job / "rl" / "metrics.json").write_text("{")  # a stage cut while writing
    with pytest.raises(ValueError, match=r"ce_seed1/rl/metrics\.json: not valid JSON.*rerun the job's rl stage"):
        records.read_grid(tmp_path / "grid")
