"""Mistakes a user makes on the command line in the first minutes: one message each, with the
closest valid name and, on the last line, what to type; exit status 2, no traceback, nothing
written (sedsft.utils.cli.preflight runs before Hydra makes a run directory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from sedsft.utils.cli import preflight


def mistake(capsys, config: str, *argv: str, required=None) -> list[str]:
    with pytest.raises(SystemExit) as stopped:
        preflight(config, required, argv=list(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_misspelt_loss_knob_names_the_loss_its_knobs_and_the_closest(capsys):
    lines = mistake(capsys, "train.yaml", "loss=sed", "loss.lamda=0.5")
    assert lines[0] == "loss.lamda=0.5: loss 'sed' has no knob 'lamda'."
    assert "lam" in lines[1] and "top_k" in lines[1] and "calib_top_k" in lines[1]
    assert lines[-1] == "Did you mean: loss.lam=0.5"
    assert not any("+loss" in line for line in lines)  # Hydra's advice would add a key the loss refuses


def test_a_misspelt_knob_of_any_group(capsys):
    assert mistake(capsys, "train.yaml", "trainer.max_stepz=3")[-1] == "Did you mean: trainer.max_steps=3"
    assert mistake(capsys, "rl.yaml", "policy=x", "grpo.learning_rat=1e-6")[-1] == "Did you mean: grpo.learning_rate=1e-6"


def test_an_unknown_option_ends_with_the_closest_one(capsys):
    lines = mistake(capsys, "train.yaml", "loss=sedd")
    assert lines[0] == "loss=sedd: there is no configs/loss/sedd.yaml."
    assert "sed_nomask" in lines[1]
    assert lines[-1] == "Did you mean: loss=sed"
    assert mistake(capsys, "pipeline.yaml", "grid=toy_clam")[-1] == "Did you mean: grid=toy_claim"


def test_valid_command_lines_and_hydra_flags_pass(capsys):
    preflight("train.yaml", argv=["loss=sed", "loss.lam=0.5", "trainer.max_steps=3"])
    preflight("train.yaml", argv=["-m", "loss=ce,sed"])  # a sweep: each job is composed by Hydra
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("script", "argv", "first", "last"),
    [
        ("eval.py", [], "ckpt= is missing: the model to evaluate", "For example: python src/eval.py ckpt="),
        ("rl.py", [], "policy= is missing: the SFT policy", "For example: python src/rl.py policy="),
        ("export.py", ["ckpt=last.ckpt"], "out= is missing: the directory", "For example: python src/export.py ckpt="),
    ],
)
def test_a_missing_required_value_is_one_message_before_anything_starts(tmp_path, script, argv, first, last):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}  # logs/ would be made under tmp_path
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[0].startswith(first) and lines[-1].startswith(last) and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no logs/
