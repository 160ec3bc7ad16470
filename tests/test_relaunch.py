"""Outputs that are never overwritten or mislabelled: a pipeline job directory belongs to one
(loss, knobs, seed) and a relaunch continues RL from its checkpoints; an evaluation resumes
only an evaluation run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from conftest import ROOT, compose_config
from test_benchmarks import ANSWERS, ScriptedBackend, compose_eval, fixtures
from test_pipeline import RL_TINY, SFT_TINY, as_list

# ----------------------------------------------------------------------------- pipeline


def pipeline_config(job: Path, cache_dir: Path, *overrides: str):
    return compose_config(job, cache_dir, *overrides, shrink=False, name="pipeline.yaml")


def run_job(job: Path, cache_dir: Path, *overrides: str) -> dict:
    from sedsft.pipeline.run import run_pipeline

    cfg = pipeline_config(job, cache_dir, *overrides)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return run_pipeline(cfg)


def finished_stages(job: Path) -> None:
    """The metrics files a finished job leaves (its stages are then not run again)."""
    for stage, metrics in {"sft": {"val/loss": 0.5}, "rl": {"global_step": 2.0, "heldout/pass@1": 0.25}}.items():
        (job / stage).mkdir(parents=True, exist_ok=True)
        (job / stage / "metrics.json").write_text(json.dumps(metrics))


def test_job_directory_refuses_another_loss_knob_or_seed(tmp_path, cache_dir):
    job = tmp_path / "job"
    finished_stages(job)
    record = run_job(job, cache_dir, "loss=sed", "seed=1", "stages=[sft,rl]")
    assert (record["loss"], record["seed"]) == ("sed", 1)
    kept = (job / "pipeline.json").read_text()
    for overrides, names in [
        (["loss=ce", "seed=3"], ["loss: this job is sed, the launch asks for ce", "seed: this job is 1, the launch asks for 3"]),
        (["loss=sed", "loss.lam=0.5", "seed=1"], ["loss: this job is sed, the launch asks for sed[loss.lam=0.5]"]),
        (["loss=sed", "seed=1", f"rl.overrides={as_list(['grpo=toy', '++grpo.disable_tqdm=true', 'grpo.max_steps=7'])}"], ["rl.overrides: this job is"]),
    ]:
        with pytest.raises(ValueError) as caught:
            run_job(job, cache_dir, *overrides, "stages=[sft,rl]")
        message = str(caught.value)
        assert message.startswith(f"{job} holds the job ") and all(name in message for name in names), message
        assert "another hydra.run.dir" in message
        assert (job / "pipeline.json").read_text() == kept  # the old results keep their labels
    # the same job relaunched is accepted (every stage is done: nothing runs)
    assert run_job(job, cache_dir, "loss=sed", "seed=1", "stages=[sft,rl]")["metrics"] == record["metrics"]


def test_job_directory_of_an_earlier_version_is_read_from_pipeline_json(tmp_path, cache_dir):
    job = tmp_path / "job"
    finished_stages(job)
    (job / "pipeline.json").write_text(json.dumps({"loss": "ce", "loss_name": "ce", "seed": 1, "metrics": {}}))
    with pytest.raises(ValueError, match="loss: this job is ce, the launch asks for sed"):
        run_job(job, cache_dir, "loss=sed", "seed=1", "stages=[sft,rl]")
    assert json.loads((job / "pipeline.json").read_text())["loss"] == "ce"


def test_relaunch_continues_rl_from_its_newest_checkpoint(tmp_path, cache_dir):
    from sedsft.pipeline.stages import stage_overrides

    job = tmp_path / "job"
    cfg = pipeline_config(job, cache_dir, "loss=ce", "seed=1")
    assert not any(o.startswith("resume=") for o in stage_overrides(cfg, "rl", job))  # a fresh job
    for step in (1, 2):  # what a kill during RL leaves
        (job / "rl" / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (job / "rl" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    overrides = stage_overrides(cfg, "rl", job)
    assert f"resume={job / 'rl'}" in overrides
    assert overrides.index(f"resume={job / 'rl'}") < overrides.index("grpo=toy")  # the user's overrides come last


def test_bad_rl_knob_stops_the_pipeline_before_sft(tmp_path, cache_dir):
    job = tmp_path / "job"
    rl = ["grpo=toy", "grpo.learning_rate=-1"]
    with pytest.raises(ValueError, match=r"rl stage: invalid configuration:\n  grpo.learning_rate=-1 must be > 0"):
        run_job(job, cache_dir, "loss=ce", "seed=1", f"sft.overrides={as_list(SFT_TINY)}", "rl.add=['grpo.learning_rate=-1']")
    assert not (job / "sft").exists()
    # no stage left a result: the job may be relaunched in place with the knob corrected
    from sedsft.pipeline.job import claim_job_dir

    (job / "job.json").write_text(json.dumps({"loss": "ce", "seed": 1, "rl.overrides": rl}))
    claim_job_dir(job, {"loss": "ce", "seed": 1, "rl.overrides": ["grpo=toy"]})
    assert json.loads((job / "job.json").read_text())["rl.overrides"] == ["grpo=toy"]
    (job / "rl" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # now it holds a result
    with pytest.raises(ValueError, match="rl.overrides: this job is"):
        claim_job_dir(job, {"loss": "ce", "seed": 1, "rl.overrides": rl})


@pytest.mark.slow
def test_pipeline_killed_during_rl_resumes_rl(tmp_path, cache_dir):
    """SFT then 2 RL updates with a checkpoint after each; the RL stage's end is then undone as
    a kill after the first checkpoint leaves it, and the relaunch takes only update 2."""
    job = tmp_path / "job"
    overrides = ["loss=ce", "seed=1", "stages=[sft,rl]", f"sft.overrides={as_list(SFT_TINY)}",
                 f"rl.overrides={as_list([*RL_TINY, 'grpo.save_steps=1'])}"]  # fmt: skip
    first = run_job(job, cache_dir, *overrides)
    assert first["metrics"]["rl"]["global_step"] == 2
    assert (job / "rl" / ".hydra" / "config.yaml").is_file()  # the first run's knobs, which a resume compares
    for left in ("metrics.json", "hf", "checkpoints/checkpoint-2"):
        path = job / "rl" / left
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = run_job(job, cache_dir, *overrides)
    assert again["metrics"]["rl"]["global_step"] == 2 and again["metrics"]["rl"]["steps_this_run"] == 1
    assert again["metrics"]["sft"] == first["metrics"]["sft"]  # SFT was not run again


# --------------------------------------------------------------------------- evaluation


def test_eval_resume_refuses_a_directory_that_is_not_an_eval_run(tmp_path, cache_dir, monkeypatch):
    from sedsft.evaluation import run as eval_run
    from sedsft.evaluation.run import evaluate

    monkeypatch.setattr(eval_run, "build_backend", lambda *args, **kwargs: ScriptedBackend(ANSWERS))
    sft_run = tmp_path / "sft_run"  # an SFT run: its metrics.json must survive
    (sft_run / "checkpoints").mkdir(parents=True)
    (sft_run / "metrics.json").write_text(json.dumps({"val/loss": 1.25}))
    kept = sorted((p.relative_to(sft_run), p.read_bytes() if p.is_file() else None) for p in sft_run.rglob("*"))
    with pytest.raises(ValueError) as caught:
        evaluate(compose_eval(tmp_path / "eval", cache_dir, "benchmark=gsm8k", *fixtures(), f"resume={sft_run}"))
    message = str(caught.value)
    assert message.startswith(f"resume={sft_run}: not an evaluation run (no eval_run.json)")
    assert f"ckpt={sft_run}" in message  # to evaluate that run, name it as the checkpoint
    assert sorted((p.relative_to(sft_run), p.read_bytes() if p.is_file() else None) for p in sft_run.rglob("*")) == kept

    # an evaluation of the data= set is not continued as a benchmark run (or the reverse)
    data_run = tmp_path / "data_eval"
    evaluate(compose_eval(data_run, cache_dir, "num_prompts=2", "sampling.num_samples=2"))
    flat = (data_run / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"it evaluated the data= set, this run asks for benchmarks \['gsm8k'\]"):
        evaluate(compose_eval(tmp_path / "eval", cache_dir, "benchmark=gsm8k", *fixtures(), f"resume={data_run}"))
    assert (data_run / "metrics.json").read_text() == flat
