"""The routes task: slices, splits, routes, cache keys, exploration statistics, configs.

Everything here is cheap: generation is pure Python, the one model is an untrained tiny Llama
(no pretraining), and configs are only composed.
"""

from __future__ import annotations

import inspect
import json
import os
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sedsft.data import toy_math, toy_routes
from sedsft.data.sources import RoutesSource, ToyMathSource
from sedsft.data.toy_routes import Ranges
from sedsft.metrics import is_correct
from sedsft.rl.exploration import ExplorationReward, exploration_stats

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
RANGES = Ranges()  # cap 31, hard_max 41, max_change 10
CAP, HARD_MAX, CHANGE = RANGES.cap, RANGES.hard_max, RANGES.max_change


def numbers(row: dict) -> tuple[int, int, int]:
    return toy_routes.question_numbers(row["question"])


# -- slices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,n", [("sft", 600), ("rl", 600), ("heldout", 400), ("calibration", 200)])
def test_slices_respect_their_ranges(split, n):
    """Checked from the numbers alone, not with toy_routes.difficulty: an easy problem computes
    only values in 0..cap; a hard one adds past cap (cap+1..hard_max) from a covered start and
    comes back into the covered range."""
    rows = toy_routes.generate(split, n, seed=3)
    assert len(rows) == n
    kinds = {r["difficulty"] for r in rows}
    assert kinds == ({"easy", "hard"} if split in ("rl", "heldout") else {"easy"})
    for row in rows:
        start, first, second = numbers(row)
        middle, answer = start + first, start + first + second
        assert 1 <= abs(first) <= CHANGE and 1 <= abs(second) <= CHANGE
        assert 0 <= answer <= CAP and row["answer"] == str(answer)
        if row["difficulty"] == "easy":
            assert 0 <= middle <= CAP and 2 <= start <= CAP
        else:
            assert first > 0 and second < 0 and start <= CAP and CAP < middle <= HARD_MAX


def test_mixed_splits_alternate_easy_and_hard():
    rows = toy_routes.generate("heldout", 10)
    assert [r["difficulty"] for r in rows] == ["easy", "hard"] * 5


def test_no_number_past_cap_is_read_or_written_before_rl():
    """Every number in a pretraining or SFT text (question and solution, in every style) is
    in 0..cap: the hard running totals cap+1..hard_max are numbers the model never sees
    before RL, so reward cannot teach the running-total route to write them."""
    rows = toy_routes.generate("pretrain", 2000, seed=0) + toy_routes.generate("sft", 2000, seed=0)
    assert {r["style"] for r in rows} == set(toy_math.STYLES)
    seen = {int(n) for r in rows for n in re.findall(r"\d+", r["question"] + " " + r["response"])}
    assert max(seen) == CAP


def test_seen_above_cap_makes_every_hard_total_a_pretraining_number():
    """The earlier variant (``seen_above_cap=True``): easy problems may start above cap and
    decrease, so each hard running total is read and copied in pretraining, never computed."""
    ranges = Ranges(seen_above_cap=True)
    rows = toy_routes.generate("pretrain", 4000, seed=0, ranges=ranges)
    starts = {numbers(r)[0] for r in rows}
    assert set(range(CAP + 1, HARD_MAX + 1)) <= starts
    sums = set()
    for row in rows:
        start, first, second = numbers(row)
        sums |= {start + first, start + first + second}
    assert max(sums) <= CAP


# -- splits ------------------------------------------------------------------------------------


def test_splits_are_disjoint_by_numbers_and_by_text():
    sft = toy_routes.generate("sft", 3000, seed=0)
    rl = toy_routes.generate("rl", 1024, seed=0)
    cal = toy_routes.generate("calibration", 200, seed=0)
    held = toy_routes.generate("heldout", 400, seed=0)
    pre = toy_routes.generate("pretrain", 3000, seed=10_000)
    by_numbers = {name: {numbers(r) for r in rows} for name, rows in
                  {"sft": sft + pre, "rl": rl, "cal": cal, "held": held}.items()}  # fmt: skip
    by_text = {name: {r["question"] for r in rows} for name, rows in
               {"sft": sft + pre, "rl": rl, "cal": cal, "held": held}.items()}  # fmt: skip
    names = list(by_numbers)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not by_numbers[a] & by_numbers[b], (a, b)
            assert not by_text[a] & by_text[b], (a, b)
    # held-out and calibration problems have numbers of their own, one problem per triple
    assert len(by_numbers["held"]) == 400 and len(by_numbers["cal"]) == 200


def test_heldout_and_rl_hard_problems_never_share_a_first_sum():
    """RL could teach the running-total route an unseen sum by heart; a held-out hard problem's
    first sum (start + first change) is therefore never one an RL problem computes."""
    held = {numbers(r)[:2] for r in toy_routes.generate("heldout", 400) if r["difficulty"] == "hard"}
    rl = {numbers(r)[:2] for r in toy_routes.generate("rl", 2000) if r["difficulty"] == "hard"}
    assert held and rl and not held & rl


def test_generation_is_a_pure_function_of_its_arguments():
    a = toy_routes.generate("rl", 50, seed=7)
    assert a == toy_routes.generate("rl", 50, seed=7)
    assert a != toy_routes.generate("rl", 50, seed=8)


def test_a_heldout_set_larger_than_its_triples_names_the_split():
    hard = len(toy_routes.partition(RANGES)[("heldout", "hard")])
    with pytest.raises(ValueError, match=r"routes heldout: n=.* asks for .* hard problems .* lower n"):
        toy_routes.generate("heldout", 2 * hard + 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"cap": 31, "hard_max": 31}, "cap < hard_max"), ({"hard_max": 45}, "hard_max <= cap \\+ max_change"),
     ({"cap": 55, "hard_max": 60}, "whole-number tokens")],
)  # fmt: skip
def test_bad_ranges_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Ranges(**kwargs)


def test_sft_mix_follows_the_style_weights():
    weights = {"step_by_step": 0.85, "one_equation": 0.05, "narrative": 0.05, "net_change": 0.05}
    rows = toy_routes.generate("sft", 4000, seed=0, style_weights=weights)
    share = sum(r["style"] == "step_by_step" for r in rows) / len(rows)
    assert abs(share - 0.85) < 0.02


# -- routes ------------------------------------------------------------------------------------

HARD_Q = "Mia has 25 apples. Mia buys 10 and then loses 8. How many apples does Mia have now?"


def test_question_numbers_and_difficulty_by_hand():
    assert toy_routes.question_numbers(HARD_Q) == (25, 10, -8)
    assert toy_routes.question_difficulty(HARD_Q) == "hard"  # 25 + 10 = 35 > 31
    easy = "Tom has 40 coins. Tom gives away 10 and then finds 1. How many coins does Tom have now?"
    assert toy_routes.question_numbers(easy) == (40, -10, 1)
    assert toy_routes.question_difficulty(easy) == "other"  # a start of 40 is past the covered range
    assert toy_routes.question_difficulty(easy, {"seen_above_cap": True}) == "easy"  # 30, then 31
    assert toy_routes.question_difficulty("Tom has 30 coins. Tom gives away 10 and then finds 1. How many coins does Tom have now?") == "easy"
    too_big = "Tom has 40 coins. Tom gives away 12 and then finds 3. How many coins does Tom have now?"
    assert toy_routes.question_difficulty(too_big) == "other"  # a change of 12 is outside the task
    assert toy_routes.question_difficulty("What is 2 + 2?") == "other"
    with pytest.raises(ValueError, match="not a toy question"):
        toy_routes.question_numbers("What is 2 + 2?")


@pytest.mark.parametrize(
    "text,route",
    [
        ("First, 25 + 10 = 35. Then, 35 - 8 = 27. The answer is \\boxed{27}.", "step_by_step"),
        ("The net change is +10 and -8, which is +2. 25 + 2 = 27. Final answer: \\boxed{27}", "net_change"),
        ("25 + 10 - 8 = 27, so \\boxed{27}.", "one_equation"),
        ("Mia starts with 25 apples. After that there are 35. In the end Mia has 27 apples. \\boxed{27}", "narrative"),
        ("\\boxed{27}", "other"),
    ],
)
def test_route_of_hand_written_completions(text, route):
    assert toy_routes.classify_route(text) == route
    assert is_correct(text, "27") == (route != "other" or "27" in text)


def test_forcing_prefixes_open_each_route_by_hand():
    expected = {"step_by_step": "First,", "net_change": "The net change is", "narrative": "Mia starts with", "one_equation": "25"}
    problem = toy_math.Problem("Mia", "apples", 25, 10, -8, "buys", "loses")
    assert problem.question == HARD_Q
    for route, prefix in expected.items():
        assert toy_routes.route_prefix(HARD_Q, route) == prefix
        # the prefix opens that route's own solution, and the solution is classified as it
        solution = toy_math.STYLES[route](problem)
        assert solution.startswith(prefix)
        assert toy_routes.classify_route(solution) == route
    with pytest.raises(ValueError, match="unknown route"):
        toy_routes.route_prefix(HARD_Q, "guess")


def test_every_generated_solution_is_correct_and_classified_as_its_route():
    for row in toy_routes.generate("heldout", 200, seed=1, style_weights=None):
        assert is_correct(row["response"], row["answer"])
        assert toy_routes.classify_route(row["response"]) == row["style"]


# -- cache keys --------------------------------------------------------------------------------


def test_cache_keys_follow_the_generators_source(monkeypatch):
    from sedsft.models.tiny import TinyLMSpec

    toy, routes = TinyLMSpec(), TinyLMSpec(task="routes")
    keys = (toy.construction(), routes.construction(), ToyMathSource().fingerprint(), RoutesSource().fingerprint())
    assert keys[0]["code"] != keys[1]["code"]
    # an explicit default range and an omitted one are one base
    assert TinyLMSpec(task="routes", routes={"cap": CAP}).construction() == keys[1]
    real = inspect.getsource

    def edited(obj):
        text = real(obj)
        return text + "\n# edited\n" if obj is toy_routes else text

    monkeypatch.setattr(inspect, "getsource", edited)
    assert toy.construction() == keys[0]  # the toy base does not depend on the routes generator
    assert routes.construction()["code"] != keys[1]["code"]
    assert ToyMathSource().fingerprint() == keys[2]
    assert RoutesSource().fingerprint() != keys[3]


def test_tokenised_data_cache_follows_the_tokenisation_code(monkeypatch, tmp_path):
    from sedsft.data import chat
    from sedsft.data.datamodule import SFTDataModule
    from sedsft.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(toy_math.corpus(50), 400)
    module = SFTDataModule(tokenizer, RoutesSource(n=8), RoutesSource(split="calibration", n=4), cache_dir=str(tmp_path))
    before = module._cache_path("train")
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: real(obj) + ("\n# edited\n" if obj is chat else ""))
    assert module._cache_path("train") != before


def test_two_processes_wanting_one_base_build_it_once(tmp_path, monkeypatch):
    """Grid jobs that share a base seed ask for it at the same time: the second waits on the
    build lock and then finds the base instead of building it again."""
    import threading
    import time

    from sedsft.models.tiny import TinyLMSpec

    builds = []

    def slow_build(self, target, recipe):
        builds.append(target)
        time.sleep(0.5)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(TinyLMSpec, "_build", slow_build)
    spec = TinyLMSpec(cache_dir=str(tmp_path), task="routes")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(spec.resolved_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(paths)) == 1


def test_unknown_task_names_the_knob():
    from sedsft.models.tiny import TinyLMSpec

    with pytest.raises(ValueError, match="model.task='route'"):
        TinyLMSpec(task="route").construction()


# -- exploration -------------------------------------------------------------------------------


def test_exploration_stats_by_hand():
    hard_q, easy_q = HARD_Q, "Tom has 20 coins. Tom finds 3 and then loses 2. How many coins does Tom have now?"
    questions = [hard_q] * 4 + [hard_q] * 4 + [easy_q] * 4
    rewards = [0, 0, 0, 0] + [0, 1, 0, 0] + [1, 1, 1, 1]
    texts = ["First, x"] * 3 + ["The net change is"] + ["First, x"] * 4 + ["25 + 1"] * 4
    got = exploration_stats(questions, rewards, texts, 4, difficulty=toy_routes.question_difficulty,
                            classify=toy_routes.classify_route)  # fmt: skip
    assert got["hard/reward"] == pytest.approx(1 / 8)
    assert got["hard/any_correct"] == pytest.approx(1 / 2)
    assert got["hard/all_equal"] == pytest.approx(1 / 2)
    assert got["hard/route/step_by_step"] == pytest.approx(7 / 8)
    assert got["hard/route/net_change"] == pytest.approx(1 / 8)
    assert got["easy/any_correct"] == 1.0 and got["easy/all_equal"] == 1.0
    assert got["all/reward"] == pytest.approx(5 / 12)
    assert got["all/all_equal"] == pytest.approx(2 / 3)
    assert got["all/groups"] == 3.0 and got["skipped_groups"] == 0.0
    # a group whose completions belong to two prompts is left out, not mixed
    mixed = exploration_stats([hard_q, easy_q, easy_q, easy_q], [1, 0, 0, 0], ["a"] * 4, 4)
    assert mixed == {"skipped_groups": 1.0}


def test_exploration_reward_scores_as_the_answer_reward_and_logs():
    logged: dict[str, float] = {}
    reward = ExplorationReward(num_generations=2, difficulty=toy_routes.question_difficulty)
    prompts = [[{"role": "user", "content": HARD_Q}]] * 2
    completions = [[{"role": "assistant", "content": "\\boxed{27}"}], [{"role": "assistant", "content": "\\boxed{35}"}]]
    out = reward(completions, ["27", "27"], prompts=prompts, log_metric=logged.__setitem__)
    assert out == [1.0, 0.0]
    assert logged["explore/hard/any_correct"] == 1.0 and logged["explore/hard/all_equal"] == 0.0
    assert reward.__name__ == "math_answer_reward"


def test_a_route_absent_from_a_later_batch_is_logged_as_zero():
    """A logger keeps each name's last value (metrics.json): a route taken in batch 1 and not in
    batch 2 must read 0 after batch 2, not its batch-1 share."""
    logged: dict[str, float] = {}
    reward = ExplorationReward(num_generations=2, classify=toy_routes.classify_route)
    prompts = [[{"role": "user", "content": HARD_Q}]] * 2
    batch1 = [[{"role": "assistant", "content": t}] for t in ("The net change is 2.", "First, 25 + 10")]
    batch2 = [[{"role": "assistant", "content": t}] for t in ("First, 25 + 10", "First, 25 + 10")]
    reward(batch1, ["27", "27"], prompts=prompts, log_metric=logged.__setitem__)
    assert logged["explore/all/route/net_change"] == 0.5
    reward(batch2, ["27", "27"], prompts=prompts, log_metric=logged.__setitem__)
    assert logged["explore/all/route/net_change"] == 0.0 and logged["explore/all/route/step_by_step"] == 1.0
    assert exploration_stats(["q", "q"], [0, 0], ["First,", "First,"], 2, classify=toy_routes.classify_route,
                             routes_known=["narrative"])["all/route/narrative"] == 0.0  # fmt: skip


# -- the report on a real (untrained) model ------------------------------------------------------


def test_route_report_runs_and_forced_samples_open_with_the_route(tmp_path):
    import torch

    from sedsft.models.tiny import TinyLMSpec
    from sedsft.pipeline.routes import route_report, sample_with_prefix

    torch.set_num_threads(1)
    spec = TinyLMSpec(cache_dir=str(tmp_path), task="routes", corpus_size=200, pretrain_steps=0)
    model, tokenizer = spec.load_model(), spec.load_tokenizer()
    rows = toy_routes.generate("heldout", 2, seed=0)
    texts = sample_with_prefix(model, tokenizer, [r["question"] for r in rows], ["The net change is", "First,"], 2, max_new_tokens=4)
    assert [t[:2] for t in texts] and all(s.startswith("The net change is") for s in texts[0])
    assert all(s.startswith("First,") for s in texts[1])
    report = route_report(model, tokenizer, rows, num_samples=2, forced_samples=1, max_new_tokens=4)
    for kind in ("easy", "hard"):
        assert report[f"{kind}/forced/net_change/on_route"] == 1.0  # the prefix alone decides the route
        assert 0.0 <= report[f"{kind}/pass@2"] <= 1.0
        assert sum(report[f"{kind}/route_frac/{r}"] for r in (*toy_routes.ROUTES, "other")) == pytest.approx(1.0)
    assert set(report) >= {"overall/pass@1", "overall/pass@2"}


def test_summary_has_a_routes_table_with_hand_computed_means(tmp_path):
    from sedsft.pipeline.summary import write_summary

    values = {("ce", 1): 0.1, ("ce", 2): 0.3, ("sed", 1): 0.2, ("sed", 2): 0.6}
    for (loss, seed), hard in values.items():
        job = tmp_path / f"loss={loss},seed={seed}"
        job.mkdir()
        record = {"loss": loss, "loss_name": loss, "seed": seed, "metrics": {"routes": {"rl/hard/pass@1": hard}}}
        (job / "pipeline.json").write_text(json.dumps(record))
    text = write_summary(tmp_path)
    assert "Routes task" in text
    assert "0.200 ±" in text and "0.400 ±" in text  # ce mean (0.1 + 0.3) / 2, sed (0.2 + 0.6) / 2
    assert "0.200 ± " in text.split("paired difference")[-1]  # sed - ce: (0.1 + 0.3) / 2


# -- configs -----------------------------------------------------------------------------------


def _compose(name, overrides):
    os.environ.setdefault("PROJECT_ROOT", os.path.abspath(os.path.join(CONFIGS, "..")))
    with initialize_config_dir(os.path.abspath(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=name == "pipeline")


@pytest.mark.parametrize("grid,losses,seeds", [("routes_claim", "ce,sed,sed_nomask", "range(1,11)"),
                                                ("routes_arms", "gem,dft,entropy,sed_route", "range(1,6)"),
                                                ("routes_control", "ce,sed,sed_nomask", "range(1,11)")])  # fmt: skip
def test_grids_compose_with_their_arms_and_seeds(grid, losses, seeds):
    cfg = _compose("pipeline", [f"grid={grid}"])
    assert cfg.hydra.sweeper.params.loss == losses and cfg.hydra.sweeper.params.seed == seeds
    # job directories named by loss and seed (ce_seed3), not by job number, and free of the
    # characters that would break the stage overrides the path is passed in
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert subdir == "${hydra.runtime.choices.loss}_seed${seed}"
    for stage, name in (("sft", "train"), ("rl", "rl")):
        _compose(name, [*cfg[stage].overrides, "policy=x"] if stage == "rl" else list(cfg[stage].overrides))


def test_the_rl_budget_has_the_papers_ratios():
    from pathlib import Path

    import torch

    from sedsft.rl.training import grpo_config
    from sedsft.utils.schedules import cosine_with_warmup

    sft = _compose("train", ["experiment=routes"])
    rl = _compose("rl", ["experiment=rl_routes", "policy=x"])
    args = grpo_config(rl, Path("/tmp/unused"))
    assert args.steps_per_generation == 8 and args.num_generations == 8
    # summed SFT lr over its steps (2 epochs of 2000 rows at batch 16, warm-up + cosine)
    steps = sft.trainer.max_epochs * sft.data.train.n // sft.data.batch_size
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=sft.optimizer.lr)
    schedule = cosine_with_warmup(opt, num_training_steps=steps, warmup_ratio=sft.scheduler.warmup_ratio)
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
    ratio = args.max_steps * args.learning_rate / total
    assert 0.15 <= ratio <= 0.25, ratio
    assert rl.data.train.ranges == sft.data.train.ranges  # one task for both stages


@pytest.mark.slow
def test_one_routes_job_runs_every_stage(tmp_path):
    """SFT -> positions -> GRPO -> routes report for one (loss, seed) on a 4-step base, as
    grid=routes_claim runs each job; about a minute on one core."""
    import subprocess
    import sys

    sft = ["experiment=routes", "model.pretrain_steps=4", "data.train.n=48", "data.val.n=8", "data.batch_size=8",
           "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
           "callbacks.generation_eval.num_prompts=2", "callbacks.generation_eval.sampling.num_samples=2",
           "callbacks.generation_eval.sampling.max_new_tokens=8"]  # fmt: skip
    rl = ["experiment=rl_routes", "data.train.n=16", "grpo.max_steps=2", "grpo.generation_batch_size=8",
          "grpo.num_generations=4", "grpo.per_device_train_batch_size=4", "grpo.max_completion_length=8",
          "grpo.save_steps=100", "heldout.num_prompts=4", "heldout.sampling.num_samples=2", "heldout.sampling.batch_size=2",
          "++grpo.disable_tqdm=true"]  # fmt: skip

    def as_list(items):
        return "[" + ",".join(f"'{i}'" for i in items) + "]"

    job = tmp_path / "job"
    command = [
        sys.executable, "src/pipeline.py", "loss=sed", "seed=1", "stages=[sft,positions,rl,routes]",
        f"sft.overrides={as_list(sft)}", f"rl.overrides={as_list(rl)}", "rl.replace=true", "positions.num_examples=4",
        "routes.num_examples=4", "routes.num_samples=2", "routes.forced_samples=1", "routes.max_new_tokens=8",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={job}",
    ]  # fmt: skip
    root = os.path.abspath(os.path.join(CONFIGS, ".."))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": root}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rl_metrics = json.loads((job / "rl" / "metrics.json").read_text())
    assert {"rl/explore/all/any_correct", "rl/explore/all/all_equal", "rl/explore/all/reward"} <= set(rl_metrics)
    assert any(k.startswith(("rl/explore/easy/", "rl/explore/hard/")) for k in rl_metrics)  # split by difficulty
    report = json.loads((job / "routes" / "metrics.json").read_text())
    for policy in ("sft", "rl"):
        assert {f"{policy}/hard/pass@2", f"{policy}/easy/forced/net_change", f"{policy}/overall/pass@1"} <= set(report)
    assert json.loads((job / "positions" / "metrics.json").read_text())  # the calibration split was measured


# -- checking a reply's steps ------------------------------------------------------------------


def test_steps_hold_by_hand():
    from sedsft.data.route_steps import solution_numbers, steps_hold

    q = "Leo has 26 books. Leo buys 6 and then gives away 6. How many books does Leo have now?"
    assert solution_numbers(q) == {26, 6, 32, 0}
    assert steps_hold(q, "First, 26 + 6 = 32. Then, 32 - 6 = 26. The answer is \\boxed{26}.")
    assert steps_hold(q, "The net change is +6 and -6, which is +0. 26 + 0 = 26. Final answer: \\boxed{26}")
    assert steps_hold(q, "26 + 6 - 6 = 26, so \\boxed{26}.")
    # the shortcut GRPO found: a running total the model can write, then the right answer boxed
    assert not steps_hold(q, "First, 26 + 6 = 30. Then, 30 - 6 = 26. The answer is \\boxed{26}.")
    assert not steps_hold(q, "Leo starts with 26 books. After that there are 31. In the end Leo has 26 books. \\boxed{26}")
    # every route of every held-out and SFT problem, as generated, holds
    rows = toy_routes.generate("heldout", 400) + toy_routes.generate("sft", 500)
    for row in rows:
        for style in toy_math.STYLES.values():
            assert steps_hold(row["question"], style(_problem(row)))


def _problem(row: dict) -> toy_math.Problem:
    """The problem behind a generated row (names and items read back from its question)."""
    start, first, second = numbers(row)
    words = row["question"].split()
    verbs = toy_routes._QUESTION_NUMBERS.search(row["question"]).groups()
    return toy_math.Problem(words[0], words[3].rstrip("."), start, first, second, verbs[1], verbs[3])


def test_reward_with_verify_scores_a_right_answer_by_wrong_steps_as_wrong():
    from sedsft.data.route_steps import steps_hold

    q = "Leo has 26 books. Leo buys 6 and then gives away 6. How many books does Leo have now?"
    prompts = [[{"role": "user", "content": q}]] * 4
    replies = [
        "First, 26 + 6 = 32. Then, 32 - 6 = 26. The answer is \\boxed{26}.",  # right
        "First, 26 + 6 = 30. Then, 30 - 6 = 26. The answer is \\boxed{26}.",  # right answer, wrong steps
        "First, 26 + 6 = 32. Then, 32 - 6 = 25. The answer is \\boxed{25}.",  # wrong answer
        "The net change is +6 and -6, which is +0. 26 + 0 = 26. Final answer: \\boxed{26}",  # right
    ]
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    logged: dict[str, float] = {}
    reward = ExplorationReward(num_generations=4, difficulty=toy_routes.question_difficulty, verify=steps_hold)
    assert reward(completions, ["26"] * 4, prompts=prompts, log_metric=logged.__setitem__) == [1.0, 0.0, 0.0, 1.0]
    assert logged["explore/hard/unfaithful"] == 0.25 and logged["explore/hard/reward"] == 0.5
    plain = ExplorationReward(num_generations=4)
    assert plain(completions, ["26"] * 4, prompts=prompts) == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs the prompts"):
        reward(completions, ["26"] * 4)


def test_route_scores_with_verify_count_only_replies_whose_steps_hold():
    from sedsft.data.route_steps import steps_hold
    from sedsft.pipeline.routes import score_free

    q = "Leo has 26 books. Leo buys 6 and then gives away 6. How many books does Leo have now?"
    samples = [[
        "First, 26 + 6 = 32. Then, 32 - 6 = 26. The answer is \\boxed{26}.",
        "First, 26 + 6 = 30. Then, 30 - 6 = 26. The answer is \\boxed{26}.",
    ]]  # fmt: skip
    checked = score_free(samples, ["26"], toy_routes.classify_route, [q], steps_hold)
    assert checked["pass@1"] == 0.5 and checked["answer_only@1"] == 1.0
    assert checked["route_acc/step_by_step"] == 0.5
    assert score_free(samples, ["26"], toy_routes.classify_route)["pass@1"] == 1.0
    with pytest.raises(ValueError, match="verify needs the questions"):
        score_free(samples, ["26"], toy_routes.classify_route, None, steps_hold)


def test_routes_rl_preset_checks_steps_and_the_report_follows():
    with initialize_config_dir(config_dir=os.path.abspath(CONFIGS), version_base="1.3"):
        rl = compose(config_name="rl", overrides=["experiment=rl_routes", "policy=x"])
        pipe = compose(config_name="pipeline", overrides=["grid=routes_claim"])
    assert rl.reward.funcs[0].verify.path == "sedsft.data.route_steps.steps_hold"
    assert pipe.routes.verify_steps is True


def test_routes_source_keeps_only_the_difficulties_asked_for():
    hard = RoutesSource(split="rl", n=300, difficulties=["hard"]).load()
    assert len(hard) == 300 and set(hard["difficulty"]) == {"hard"}
    mixed = RoutesSource(split="rl", n=300).load()
    # the hard problems are the split's own: the same pool as in the mixed draw
    pool = set(toy_routes.partition(RANGES)[("rl", "hard")])
    assert {numbers(r) for r in hard} <= pool and {numbers(r) for r in mixed if r["difficulty"] == "hard"} <= pool
    with pytest.raises(ValueError, match=r"routes sft: difficulties \['hard'\] not in this split"):
        RoutesSource(split="sft", n=10, difficulties=["hard"]).load()
