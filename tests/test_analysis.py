"""Multirun analysis: hand-made runs give exact tables; the notebook runs on the fixture."""

from __future__ import annotations

import json
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from omegaconf import OmegaConf

from conftest import ROOT
from sedsft.utils.analysis import (
    collect_runs,
    headline_metrics,
    mean_std,
    samples_per_prompt,
    summarize,
)

FIXTURE = ROOT / "tests" / "fixtures" / "toy_multirun"


def fake_run(directory, loss: str, seed: int, metrics: dict) -> None:
    (directory / ".hydra").mkdir(parents=True)
    OmegaConf.save({"seed": seed, "loss": {"name": loss, "lam": 1.0}}, directory / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"choices": {"loss": loss, "experiment": f"toy_{loss}"}}}}, directory / ".hydra" / "hydra.yaml")
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_collect_and_summarize_hand_computed(tmp_path):
    fake_run(tmp_path / "0", "ce", 1, {"gen/pass@1": 0.2, "gen/distinct_2": 0.10})
    fake_run(tmp_path / "1", "ce", 2, {"gen/pass@1": 0.4, "gen/distinct_2": 0.30})
    fake_run(tmp_path / "2", "sed", 1, {"gen/pass@1": 0.5, "gen/distinct_2": 0.60, "val/mask_frac": 0.3})
    (tmp_path / "not_a_run").mkdir()
    runs = collect_runs(tmp_path)
    assert sorted(runs["run"]) == ["0", "1", "2"]
    assert set(runs["experiment"]) == {"toy_ce", "toy_sed"}
    # ce: mean(0.2, 0.4) = 0.3, sample std = sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    stats = mean_std(runs, "gen/pass@1")
    assert stats.loc["ce", "mean"] == pytest.approx(0.3)
    assert stats.loc["ce", "std"] == pytest.approx(0.141421, abs=1e-6)
    assert stats.loc["sed", "std"] == 0.0  # a single run
    table = summarize(runs, ["gen/pass@1", "gen/distinct_2", "val/mask_frac", "not/a_metric"])
    assert table.loc["ce", "val/mask_frac"] == "-"  # not logged by ce
    assert table.loc["sed", "val/mask_frac"] == "0.300 ± 0.000"
    assert table.loc["ce", "gen/pass@1"] == "0.300 ± 0.141"
    assert table.loc["sed", "gen/distinct_2"] == "0.600 ± 0.000"
    assert list(table["runs"]) == [2, 1]
    assert "not/a_metric" not in table.columns


def test_collect_runs_rejects_a_directory_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run with metrics.json"):
        collect_runs(tmp_path)


def test_headline_metrics_follow_the_logged_k_and_skip_what_is_missing():
    names = ["val/loss", "gen/pass@1", "gen/pass@2", "gen/pass@8", "gen/avg@8", "gen/self_bleu", "train/loss"]
    assert samples_per_prompt(names) == 8
    assert headline_metrics(names) == ["gen/pass@1", "gen/pass@8", "gen/avg@8", "gen/self_bleu", "val/loss"]
    # a run stopped before sampling: no k, no accuracy columns, no error
    assert samples_per_prompt(["val/loss", "train/loss"]) is None
    assert headline_metrics(["val/loss", "train/loss"]) == ["val/loss"]


def execute_notebook(monkeypatch, runs, figures=None) -> nbformat.NotebookNode:
    monkeypatch.setenv("SEDSFT_MULTIRUN", str(runs))
    if figures is None:
        monkeypatch.delenv("SEDSFT_FIGURES", raising=False)
    else:
        monkeypatch.setenv("SEDSFT_FIGURES", str(figures))
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "toy_lab.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return notebook


def text_of(notebook) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def images_of(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


def test_notebook_executes_on_the_committed_fixture(tmp_path, monkeypatch):
    assert collect_runs(FIXTURE)["loss"].nunique() >= 2
    notebook = execute_notebook(monkeypatch, FIXTURE, figures=tmp_path)
    assert (tmp_path / "diversity_vs_accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "histograms.png").stat().st_size > 10_000
    assert "±" in text_of(notebook)
    assert images_of(notebook) == 2  # both figures also inline


def test_notebook_handles_runs_without_metrics_and_writes_nothing(tmp_path, monkeypatch):
    """A multirun whose runs stopped before validating (no gen/*, no val/*) in one loss:
    before, ``max() arg is an empty sequence``. Without SEDSFT_FIGURES nothing is written."""
    runs = tmp_path / "multirun"
    shutil.copytree(FIXTURE, runs)
    stripped = 0
    for path in runs.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        if collect_runs(path.parent).loc[0, "loss"] == "ce":
            metrics = {k: v for k, v in metrics.items() if k.startswith("train/")}
            stripped += 1
        path.write_text(json.dumps(metrics))
    assert stripped >= 1
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    notebook = execute_notebook(monkeypatch, runs)
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before
    text = text_of(notebook)
    assert "not logged by every run" in text and "gen/pass@1" in text
    assert images_of(notebook) == 2

    # no run sampled at all: tables and histograms still, the scatter plot says why not
    for path in runs.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in metrics.items() if not k.startswith("gen/")}))
    notebook = execute_notebook(monkeypatch, runs)
    assert "no run logged generation metrics" in text_of(notebook)
    assert images_of(notebook) == 1
