"""Named errors of the RL and evaluation stages: a bad ``grpo.*`` knob, a ``policy=`` /
``ckpt=`` that is not a model, an RL file without gold answers, a benchmark that cannot be
downloaded, RL prompts longer than the limits; each says which knob or field, and what to
do, before anything slow is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import compose_config
from sedsft.data.formats import DataError

FAST_RL = ["grpo.max_steps=1", "grpo.generation_batch_size=8", "grpo.num_generations=4",
           "grpo.per_device_train_batch_size=4", "grpo.max_completion_length=8", "data.train.n=8",
           "heldout.enabled=false"]  # fmt: skip


@pytest.fixture
def no_loading(monkeypatch) -> None:
    """Any model load fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def fake_hf_dir(path: Path) -> Path:
    """A directory that names a Hugging Face model (only its config.json is looked at here)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def rl_config(tmp_path: Path, *overrides: str):
    return compose_config(tmp_path / "run", tmp_path, *FAST_RL, *overrides, shrink=False, name="rl.yaml")


# ------------------------------------------------------------------------- grpo.* knobs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grpo.learning_rate=-1"], "grpo.learning_rate=-1 must be > 0"),
        (["grpo.epsilon=-0.1"], "grpo.epsilon=-0.1 must be > 0"),
        (["grpo.epsilon=0.3", "grpo.epsilon_high=0.2"], "grpo.epsilon_high=0.2 must be >= grpo.epsilon=0.3"),
        (["grpo.beta=-0.01"], "grpo.beta=-0.01 must be >= 0"),
        (["grpo.temperature=0"], "grpo.temperature=0 must be > 0"),
        (["grpo.delta=1.0"], "grpo.delta=1.0 must be > 1"),
        (["grpo.learning_rate=abc"], "grpo.learning_rate='abc' must be a number"),
        (["max_prompt_length=0"], "max_prompt_length=0 must be >= 1"),
        (["heldout.enabled=true", "heldout.sampling.num_samples=0"], "heldout.sampling.num_samples=0 must be >= 1"),
    ],
)
def test_bad_grpo_knob_stops_before_anything_is_loaded(tmp_path, no_loading, overrides, message):
    from sedsft.rl.training import train

    policy = fake_hf_dir(tmp_path / "policy")
    with pytest.raises(ValueError) as caught:
        train(rl_config(tmp_path, f"policy={policy}", *overrides))
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_every_bad_grpo_knob_is_named_at_once(tmp_path):
    from sedsft.rl.checks import validate_rl_config

    cfg = rl_config(tmp_path, "policy=p", "grpo.learning_rate=0", "grpo.epsilon=-1", "heldout.sampling.top_p=1.5")
    with pytest.raises(ValueError) as caught:
        validate_rl_config(cfg)
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert [line.split("=")[0].strip() for line in lines[1:]] == ["grpo.learning_rate", "grpo.epsilon", "heldout.sampling.top_p"]
    validate_rl_config(rl_config(tmp_path, "policy=p"))  # the shipped presets pass
    for preset in ("rl_paper_llama32_3b", "rl_paper_qwen25_math_7b"):
        validate_rl_config(compose_config(tmp_path, tmp_path, f"experiment={preset}", "policy=p", "data.path=x.parquet",
                                          shrink=False, name="rl.yaml"))  # fmt: skip


# ------------------------------------------------------------------ policy= / ckpt= paths


def test_run_directory_without_hf_points_at_its_checkpoint(tmp_path, no_loading):
    from sedsft.rl.training import train

    run = tmp_path / "sft_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError) as caught:
        train(rl_config(tmp_path, f"policy={run}"))
    message = str(caught.value)
    assert f"policy={run}: a run directory without an hf/ export" in message
    assert f"policy={run / 'checkpoints' / 'last.ckpt'}" in message  # what to pass instead
    # an RL run killed before its export: its newest checkpoint-<step> is a Hugging Face directory
    from sedsft.model_paths import CheckpointPathError, resolve_model_path

    rl_run = tmp_path / "rl_run"
    for step in (25, 100, 50):
        fake_hf_dir(rl_run / "checkpoints" / f"checkpoint-{step}")
    with pytest.raises(CheckpointPathError, match=r"pass ckpt=.*checkpoint-100"):
        resolve_model_path(rl_run, "ckpt")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"step,loss\n1,2.0\n", "not a torch checkpoint"),
        (b"", "an empty file"),
        (b'{"a": 1}', "not a torch checkpoint"),
    ],
)
def test_non_checkpoint_file_is_named(tmp_path, no_loading, content, problem):
    from sedsft.evaluation.backends import build_backend

    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        build_backend("hf", str(path))
    message = str(caught.value)
    assert message.startswith(f"ckpt={path}: {problem}")
    assert "Lightning .ckpt file" in message  # what ckpt= accepts


def test_safetensors_file_and_missing_path(tmp_path):
    from safetensors.torch import save_file

    from sedsft.model_paths import CheckpointPathError, resolve_model_path

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, weights)
    with pytest.raises(CheckpointPathError, match=r"policy=.*model.safetensors: a safetensors weights file.*directory"):
        resolve_model_path(weights, "policy")
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*nowhere: no such file or directory"):
        resolve_model_path(tmp_path / "nowhere", "ckpt")
    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")
    assert resolve_model_path(tmp_path / "last.ckpt", "ckpt") == tmp_path / "last.ckpt"


# --------------------------------------------------------------------------- RL data


def test_rl_file_without_gold_names_the_fields_it_read(tmp_path):
    from sedsft.rl.data import build_train_dataset

    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "solution": f"{i + 1}"}) for i in range(3)))
    data = OmegaConf.create({"train": {"_target_": "sedsft.data.sources.LocalFileSource", "path": str(path)}})
    with pytest.raises(DataError) as caught:
        build_train_dataset(data)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "'gold', 'reward_model.ground_truth' or 'answer'" in message
    assert "row 0 has ['question', 'solution']" in message


def test_long_rl_prompts_warn(chatml_tokenizer, caplog):
    from sedsft.rl.checks import warn_long_prompts

    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "add " * 60 + "1 and 2"}]]
    lengths = [len(chatml_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for p in prompts]  # fmt: skip
    short, long = lengths
    limit = (short + long) // 2  # cuts the second prompt only
    assert short < limit < long
    with caplog.at_level(logging.WARNING, logger="sedsft.rl.checks"):
        warn_long_prompts(prompts, chatml_tokenizer, max_prompt_length=limit, max_completion_length=16, context=512)
    assert f"1 of 2 RL prompts are longer than max_prompt_length={limit} tokens (the longest: {long})" in caplog.text
    assert "context" not in caplog.text  # limit + 16 fit in 512
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sedsft.rl.checks"):
        warn_long_prompts(prompts, chatml_tokenizer, max_prompt_length=None, max_completion_length=16, context=long)
    assert f"RL prompts of up to {long} tokens + grpo.max_completion_length=16 overrun the model's context of {long}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sedsft.rl.checks"):
        warn_long_prompts(prompts, chatml_tokenizer, max_prompt_length=None, max_completion_length=16, context=long + 16)
    assert not caplog.text  # everything fits


# ------------------------------------------------------------------------- benchmarks


def test_offline_benchmark_names_benchmark_data_dir(tmp_path, cache_dir):
    from sedsft.evaluation.benchmarks import load_rows
    from sedsft.evaluation.eval_sets import benchmark_specs

    # a source that cannot be reached (nothing listens on port 9): what an offline machine sees
    url = "http://127.0.0.1:9/aime24/test.jsonl"
    cfg = compose_config(tmp_path, cache_dir, "ckpt=unused", "benchmark=aime24", f"benchmarks.aime24.load.data_files={url}",
                         shrink=False, name="eval.yaml")  # fmt: skip
    (spec,) = benchmark_specs(cfg)
    with pytest.raises(OSError) as caught:
        load_rows(spec)
    message = str(caught.value)
    assert f"benchmarks.aime24: could not load {url}" in message
    assert "benchmark_data_dir=<dir>" in message and "<dir>/aime24/test.jsonl" in message
    assert "benchmarks.aime24.path=" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one message, no datasets traceback
