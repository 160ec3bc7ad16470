"""The one-GPU routes test (grid=gpu1_routes_test): its presets compose to the values they
state, the batches come out exact on one device, the RL budget keeps the paper's ratios, the
pipeline's eval stage evaluates each policy, and the same pipeline runs end to end on a CPU
with the tiny model and tiny local files in place of the real ones. Nothing here reaches a hub."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from sedsft.utils.batches import BatchError, apply_rl_batch, apply_sft_batch
from sedsft.utils.world import lightning_world, rl_world

LOSSES = ("ce", "sed", "sed_nomask")
BENCHMARKS = ["math", "gsm8k", "aime24", "amc23"]


def stages(tmp_path: Path, *overrides: str) -> tuple:
    """The (pipeline, sft, rl, eval) configs of one job of the grid, as the job composes them."""
    from hydra import initialize_config_dir

    from sedsft.pipeline.evaluation import composable, eval_overrides
    from sedsft.pipeline.stages import stage_config, stage_overrides

    cfg = compose_config(tmp_path, tmp_path, "grid=gpu1_routes_test", *overrides, shrink=False, name="pipeline.yaml")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        sft = stage_config("train", stage_overrides(cfg, "sft", tmp_path))
        rl = stage_config("rl", stage_overrides(cfg, "rl", tmp_path))
        ev = stage_config("eval", composable(eval_overrides(cfg, tmp_path, "rl")))
    return cfg, sft, rl, ev


# ---------------------------------------------------------------------------------------------
# what the presets state


@pytest.mark.parametrize("loss", LOSSES)
def test_sft_presets_compose_to_the_stated_model_data_and_paper_settings(composed, loss):
    cfg = composed(f"experiment=gpu1_qwen25_05b_{loss}")
    assert cfg.loss.name == loss and cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.model._target_ == "sedsft.models.hf.CausalLMSpec" and cfg.model.dtype == "float32"
    assert cfg.data.train.name == "miromind-ai/MiroMind-M1-SFT-719K" and list(cfg.data.train.rows) == [0, 4000]
    assert list(cfg.data.val.rows) == [20000, 21000] and cfg.data.max_length == 4096
    assert cfg.data.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("gpu", 1, 1)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_epochs == 2 and "strategy" not in cfg.trainer
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.scheduler.warmup_ratio) == (2e-5, [0.9, 0.95], 0.03)
    assert cfg.batch.sequences_per_step == 64 and cfg.batch.allow_inexact is False
    if loss == "sed":  # the paper's SED settings: k=10, tau calibrated so that 70% of target tokens are at or above it
        assert (cfg.loss.top_k, cfg.loss.tau, cfg.loss.cumsum_ratio, cfg.loss.lam) == (10, None, 0.7, 1.0)


def test_the_larger_model_is_one_override(composed):
    cfg = composed("experiment=gpu1_qwen25_05b_sed", "model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.loss.name == "sed"


def test_sft_batch_on_one_gpu_is_exact(composed):
    cfg = composed("experiment=gpu1_sft", "loss=ce")
    world = lightning_world(cfg, env={})  # what the SFT run counts: trainer.devices x num_nodes, no launcher
    assert world.size == 1
    derived = apply_sft_batch(cfg, world)
    assert derived.exact and derived.accumulation == 16 == cfg.trainer.accumulate_grad_batches  # 64 / (4 x 1)
    assert derived.sequences == 64
    cfg = composed("experiment=gpu1_sft", "loss=ce", "data.batch_size=3")  # 64 is no multiple of 3: refused
    with pytest.raises(BatchError, match="cannot be met"):
        apply_sft_batch(cfg, world)


def test_rl_preset_is_grpo_with_the_paper_ratios_and_vllm_colocated(composed, tmp_path):
    cfg = composed("experiment=gpu1_rl", "policy=unused", name="rl.yaml")
    grpo = cfg.grpo
    assert (grpo.use_vllm, grpo.vllm_mode, grpo.vllm_tensor_parallel_size) == (True, "colocate", 1)
    assert grpo.vllm_max_model_length == 4096 == cfg.max_prompt_length + grpo.max_completion_length
    assert grpo.bf16 is True and cfg.policy_dtype == "float32"
    assert (grpo.num_generations, grpo.num_iterations, grpo.beta) == (8, 1, 0.0)
    assert (grpo.epsilon, grpo.epsilon_high, grpo.loss_type, grpo.lr_scheduler_type) == (0.2, 0.28, "dapo", "constant")
    assert Path(cfg.data.path).name == "math_dapo_rl_2069.parquet" and cfg.heldout.enabled is False
    reward = OmegaConf.to_container(cfg.reward.funcs[0])
    assert reward["_target_"] == "sedsft.rl.dapo.dapo_reward" and (reward["correct"], reward["wrong"]) == (1.0, -1.0)
    derived = apply_rl_batch(cfg, rl_world(env={}, processes=1))  # one process, no launcher
    assert derived.exact and derived.updates_per_rollout == 8 and derived.update_prompts == 32
    assert cfg.grpo.gradient_accumulation_steps == 64  # 32 prompts x 8 completions / (4 per micro-step x 1 GPU)
    assert cfg.grpo.generation_batch_size == 2048  # 256 prompts x 8
    from sedsft.rl.training import grpo_config

    cfg.grpo.bf16, cfg.grpo.use_vllm = False, False  # TRL checks them against this CPU; every other key as the GPU gets it
    args = grpo_config(cfg, tmp_path)  # each grpo.* key is a field of TRL's GRPOConfig
    assert args.steps_per_generation // args.gradient_accumulation_steps == 8  # TRL: 512 micro-steps = 8 updates
    assert (args.max_steps, args.learning_rate, args.vllm_max_model_length) == (128, 2e-6, 4096)


def sft_lr_sum(peak: float, steps: int, warmup_ratio: float) -> float:
    """Summed learning rate of linear warm-up then cosine to 0 over ``steps`` steps, as an
    integral (the per-step sum differs from it by less than one step's lr)."""
    warm = warmup_ratio * steps
    return peak * (warm / 2 + (steps - warm) / 2)


def test_summed_rl_learning_rate_is_a_fifth_of_sfts_as_in_the_paper(composed):
    """The paper: SFT 20,000 rows x 2 epochs / 128 = 313 steps at peak 2e-5; RL 640 updates x
    1e-6 (10 epochs of 8 rollout batches x 8 updates). Here both sides are read from the presets:
    4,000 rows x 2 epochs / 64 (the last partial step of an epoch is taken) and max_steps updates."""
    paper = 640 * 1e-6 / sft_lr_sum(2e-5, math.ceil(20000 / 128) * 2, 0.03)
    sft = composed("experiment=gpu1_sft", "loss=ce")
    rows = sft.data.train.rows[1] - sft.data.train.rows[0]
    steps = math.ceil(rows / sft.batch.sequences_per_step) * sft.trainer.max_epochs
    rl = composed("experiment=gpu1_rl", "policy=unused", name="rl.yaml")
    updates = rl.grpo.max_steps
    assert steps == 126 and updates == 128
    assert updates == (2069 // rl.batch.rollout_prompts) * 2 * (rl.batch.rollout_prompts // rl.batch.prompts_per_update)
    ratio = updates * rl.grpo.learning_rate / sft_lr_sum(sft.optimizer.lr, steps, sft.scheduler.warmup_ratio)
    assert paper == pytest.approx(0.204, abs=0.001)
    assert ratio == pytest.approx(paper, rel=0.02)


def test_eval_preset_samples_four_benchmarks_64_times_with_vllm(composed):
    cfg = composed("experiment=gpu1_eval", "ckpt=unused", name="eval.yaml")
    from sedsft.evaluation.eval_sets import benchmark_specs, pass1_sampling

    specs = benchmark_specs(cfg)
    assert [s.name for s in specs] == BENCHMARKS
    for spec in specs:  # what each benchmark is sampled with: pass@1 ones through pass1, the others their own
        n = pass1_sampling(cfg.pass1)["num_samples"] if spec.metric == "pass@1" else spec.num_samples
        assert n == 64 and spec.temperature == 1.0 and spec.max_new_tokens == 3072
    from sedsft.evaluation.evaluate import pass_at_k_curve

    assert pass_at_k_curve(64) == [1, 2, 4, 8, 16, 32, 64]
    assert cfg.backend == "vllm" and cfg.vllm.tensor_parallel_size == 1 and cfg.vllm.max_model_len == 4096
    assert cfg.sampling.num_samples is None and cfg.sampling.temperature is None  # nothing run-wide overrides the benchmarks


def test_grid_runs_three_losses_by_three_seeds_one_job_at_a_time(tmp_path):
    grid = OmegaConf.load(ROOT / "configs" / "grid" / "gpu1_routes_test.yaml")
    assert grid.hydra.sweeper.params == {"seed": "1,2,3", "loss": "ce,sed,sed_nomask"}
    assert grid.defaults == [{"override /hydra/launcher": "basic"}]  # sequential: one GPU
    cfg, sft, rl, ev = stages(tmp_path, "loss=sed_nomask", "seed=3")
    assert list(cfg.stages) == ["sft", "rl", "eval"] and list(cfg.eval.policies) == ["sft", "rl"]
    assert sft.loss.name == "sed_nomask" and sft.seed == rl.seed == ev.seed == 3
    assert sft.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and sft.data.train.rows[1] == 4000
    assert rl.policy == str(tmp_path / "sft") and rl.grpo.use_vllm and rl.grpo.max_steps == 128
    assert ev.ckpt == str(tmp_path / "rl") and ev.backend == "vllm" and list(ev.benchmarks) == BENCHMARKS
    _, sft, _, _ = stages(tmp_path / "big", "gpu1_model=Qwen/Qwen2.5-1.5B-Instruct", "loss=ce")
    assert sft.model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"


# ---------------------------------------------------------------------------------------------
# the eval stage


def test_eval_stage_overrides_resume_an_interrupted_evaluation_and_refuse_unknown_policies(tmp_path):
    from sedsft.pipeline.evaluation import eval_overrides, eval_policies

    cfg = OmegaConf.create({"seed": 5, "eval": {"policies": ["sft", "rl"], "overrides": ["experiment=gpu1_eval"], "add": ["num_prompts=2"]}})
    first = eval_overrides(cfg, tmp_path, "sft")
    assert first == [f"ckpt={tmp_path / 'sft'}", "label=sft", "seed=5", f"hydra.run.dir={tmp_path / 'eval' / 'sft'}",
                     "experiment=gpu1_eval", "num_prompts=2"]  # fmt: skip
    (tmp_path / "eval" / "sft").mkdir(parents=True)
    (tmp_path / "eval" / "sft" / "eval_run.json").write_text("{}")  # an evaluation stopped midway
    assert f"resume={tmp_path / 'eval' / 'sft'}" in eval_overrides(cfg, tmp_path, "sft")
    for bad in (["sft", "base"], [], ["rl", "rl"]):
        cfg.eval.policies = bad
        with pytest.raises(ValueError, match=r"eval.policies=.*\['sft', 'rl'\]"):
            eval_policies(cfg)


def test_eval_stage_runs_in_one_process_with_its_own_rendezvous(monkeypatch):
    from sedsft.pipeline.evaluation import check_single_process, eval_env

    check_single_process({})
    for env in ({"WORLD_SIZE": "2"}, {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "pipeline"}):
        with pytest.raises(ValueError, match="each process would evaluate the same policies"):
            check_single_process(env)
    # what TRL's colocate mode leaves in the job process is not handed to the evaluation process
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29513"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEDSFT_CACHE", "/somewhere")
    env = eval_env()
    assert env["SEDSFT_CACHE"] == "/somewhere" and not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)


def test_eval_metrics_are_kept_per_policy_and_benchmark():
    from sedsft.pipeline.evaluation import flat_metrics

    summary = {"ckpt": "x", "label": "rl", "benchmarks": {
        "aime24": {"avg@64": 0.25, "pass@64": 0.5, "num_samples": 64, "source": "file"},
        "math": {"pass@1": 0.5, "greedy": False},
    }}  # fmt: skip
    assert flat_metrics(summary, "rl") == {
        "rl/aime24/avg@64": 0.25, "rl/aime24/pass@64": 0.5, "rl/aime24/num_samples": 64.0, "rl/math/pass@1": 0.5,
    }  # fmt: skip
    assert flat_metrics({"pass@1": 0.125, "num_prompts": 8}, "sft") == {"sft/pass@1": 0.125, "sft/num_prompts": 8.0}


def test_grid_summary_has_the_benchmarks_before_and_after_rl(tmp_path):
    """Two seeds of ce and sed; the table holds pass@1 and pass@k at the largest k (64) per
    benchmark and policy, mean ± t-interval per loss, and sed - ce paired by seed."""
    from sedsft.pipeline.summary import collect, summary_tables

    t_975_1 = 12.706204736174707  # Student t, 97.5% quantile, 1 degree of freedom
    for loss, seed, sft1, rl1, rl64 in [("ce", 1, 0.2, 0.3, 0.5), ("ce", 2, 0.4, 0.5, 0.7),
                                        ("sed", 1, 0.2, 0.4, 0.6), ("sed", 2, 0.4, 0.6, 0.8)]:  # fmt: skip
        job = tmp_path / f"{loss}_seed{seed}"
        job.mkdir()
        metrics = {"sft/math/pass@1": sft1, "sft/math/pass@2": 0.9, "sft/math/pass@64": 0.9,
                   "rl/math/pass@1": rl1, "rl/math/pass@64": rl64, "rl/math/avg@64": rl1}  # fmt: skip
        record = {"loss": loss, "seed": seed, "metrics": {"sft": {}, "rl": {}, "eval": metrics}}
        (job / "pipeline.json").write_text(json.dumps(record))
    tables = summary_tables(collect(tmp_path), order=["ce", "sed"])
    table = tables["benchmarks"]
    assert list(table.columns) == ["seeds", "math pass@1 SFT", "math pass@1 RL", "math pass@64 SFT", "math pass@64 RL"]
    half = t_975_1 * math.sqrt(0.02) / math.sqrt(2)  # ce's pass@1 after RL: 0.3, 0.5 -> sd sqrt(0.02)
    assert table.loc["ce", "math pass@1 RL"] == f"0.400 ± {half:.3f}" and table.loc["ce", "math pass@64 SFT"] == "0.900 ± 0.000"
    assert tables["benchmarks_vs_ce"].loc["sed", "math pass@1 RL"] == "0.100 ± 0.000"  # +0.1 on both seeds


# ---------------------------------------------------------------------------------------------
# the same pipeline on a CPU: tiny model and tiny local files in place of the real ones


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_files(root: Path) -> dict[str, Path]:
    """Local stand-ins for MiroMind rows, the RL prompts and the four benchmarks, each in its
    real schema (toy problems: the tiny model's tokenizer knows their words)."""
    from sedsft.data import toy_math

    rows = toy_math.generate(40, seed=3)
    sft = [{"id": i, "question": r["question"], "response": r["response"]} for i, r in enumerate(rows[:24])]
    rl = [{"question": r["question"], "answer": r["answer"]} for r in rows[24:32]]
    bench = rows[32:]
    return {
        "sft": write_jsonl(root / "sft.jsonl", sft),
        "rl": write_jsonl(root / "rl.jsonl", rl),
        "math": write_jsonl(root / "math.jsonl", [{"problem": r["question"], "solution": r["response"]} for r in bench]),
        "gsm8k": write_jsonl(root / "gsm8k.jsonl", [{"question": r["question"], "answer": f"so\n#### {r['answer']}"} for r in bench]),
        "aime24": write_jsonl(root / "aime24.jsonl", [{"problem": r["question"], "answer": r["answer"]} for r in bench]),
        "amc23": write_jsonl(root / "amc23.jsonl", [{"question": r["question"], "answer": float(r["answer"])} for r in bench]),
    }  # fmt: skip


def as_list(overrides: list[str]) -> str:
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


@pytest.mark.slow
def test_one_job_of_the_grid_runs_end_to_end_on_cpu_with_the_tiny_model(tmp_path, cache_dir):
    """grid=gpu1_routes_test for one (loss, seed), every stage's preset kept; added on top: the
    model (a tiny Llama saved as a Hugging Face directory, loaded as the real one is), the data
    (local files in the real schemas), the device (CPU: no vLLM, no bf16) and a budget of a few
    steps and samples."""
    from sedsft.models.tiny import TinyLMSpec

    model = TinyLMSpec(cache_dir=str(cache_dir / "models"), pretrain_steps=0).resolved_path()
    files = tiny_files(tmp_path)
    sft_add = [
        f"model.name_or_path={model}", "data=local", f"data.path={files['sft']}", "data.val_size=4",  # model, data
        "trainer.accelerator=cpu", "trainer.precision=32-true",  # device
        "data.batch_size=4", "batch.sequences_per_step=8", "data.max_length=128", "trainer.max_steps=2",  # budget
        "data.num_workers=0", "loss.calib_num_examples=4",
    ]  # fmt: skip
    rl_cfg = compose_config(tmp_path / "rl_cfg", cache_dir, "experiment=gpu1_rl", "policy=unused", shrink=False, name="rl.yaml")
    pinned = ["data.train.sha256=null"] if "sha256" in rl_cfg.data.train else []  # the real file's hash, not the stand-in's
    rl_add = [
        f"data.path={files['rl']}", *pinned,  # data
        "grpo.use_vllm=false", "grpo.bf16=false", "policy_dtype=auto", "+grpo.dataloader_pin_memory=false",  # device
        "batch.rollout_prompts=4", "batch.prompts_per_update=2", "grpo.num_generations=2",  # budget
        "grpo.max_steps=2", "grpo.max_completion_length=16", "grpo.activation_checkpointing=false",
    ]  # fmt: skip
    eval_add = [
        *[f"benchmarks.{name}.path={files[name]}" for name in BENCHMARKS],  # data
        "backend=hf", "device=cpu",  # device
        "num_prompts=2", "sampling.num_samples=2", "sampling.max_new_tokens=16",  # budget
    ]  # fmt: skip
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "src/pipeline.py", "grid=gpu1_routes_test", "loss=sed", "seed=1", f"hydra.sweep.dir={sweep}",
        f"sft.add={as_list(sft_add)}", f"rl.add={as_list(rl_add)}", f"eval.add={as_list(eval_add)}",
    ]  # fmt: skip
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job = sweep / "sed_seed1"
    record = json.loads((job / "pipeline.json").read_text())
    assert (record["loss"], record["seed"], sorted(record["metrics"])) == ("sed", 1, ["eval", "rl", "sft"])
    assert record["metrics"]["sft"]["train/loss"] > 0 and record["metrics"]["rl"]["global_step"] == 2
    sft_cfg = OmegaConf.load(job / "sft" / "config.yaml")  # the preset's knobs reached the stage
    assert sft_cfg.optimizer.lr == 2e-5 and sft_cfg.loss.name == "sed" and sft_cfg.trainer.max_epochs == 2
    rl_cfg = OmegaConf.load(job / "rl" / "config.yaml")
    assert rl_cfg.grpo.learning_rate == 2e-6 and rl_cfg.reward.funcs[0]._target_ == "sedsft.rl.dapo.dapo_reward"
    metrics = record["metrics"]["eval"]
    for policy in ("sft", "rl"):
        summary = json.loads((job / "eval" / policy / "metrics.json").read_text())
        assert summary["ckpt"] == str(job / policy) and list(summary["benchmarks"]) == BENCHMARKS
        for name in BENCHMARKS:
            assert metrics[f"{policy}/{name}/num_prompts"] == 2 and metrics[f"{policy}/{name}/num_samples"] == 2
            assert 0.0 <= metrics[f"{policy}/{name}/pass@1"] <= metrics[f"{policy}/{name}/pass@2"] <= 1.0
    assert "Benchmarks (eval stage)" in (sweep / "summary.md").read_text()
