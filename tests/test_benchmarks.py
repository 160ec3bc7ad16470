"""The paper's eight benchmarks: every config composes; fixture rows in each source's real
schema go through the real loader, gold parsing and prompt; a scripted backend gives the
suite's table with hand-computed numbers; an interrupted run resumes; the tiny model runs
the suite end to end; the vLLM backend on a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, compose_config
from sedsft.data.formats import PAPER_SYSTEM_PROMPT, DataError
from sedsft.evaluation import run as eval_run
from sedsft.evaluation.backends import VLLMBackend, topk_entropy
from sedsft.evaluation.benchmarks import (
    BenchmarkSpec,
    build_problems,
    gold_boxed,
    gold_first,
    gold_gsm8k,
    gold_plain,
    load_rows,
)
from sedsft.evaluation.eval_sets import benchmark_specs
from sedsft.evaluation.evaluate import pass_at_k_curve, score_records
from sedsft.evaluation.records import GradingSettings
from sedsft.evaluation.run import evaluate
from sedsft.evaluation.sampling import PromptSamples, SamplingSettings
from sedsft.evaluation.tables import results_tables
from sedsft.metrics import is_correct

FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"
PAPER8 = [
    "aime24",
    "aime25",
    "amc23",
    "gsm8k",
    "math",
    "gaokao2023en",
    "olympiadbench",
    "college_math",
]


def fixtures(*names: str) -> list[str]:
    """Overrides reading benchmarks ``names`` from the fixtures: the toolkit layout through
    data_dir, and a file for the two (MATH-500, AIME25) the toolkit does not hold."""
    files = {"math": "math500", "aime25": "aime25"}
    return [
        f"benchmark_data_dir={FIXTURES}",
        *(f"benchmarks.{n}.path={FIXTURES / files[n] / 'test.jsonl'}" for n in names if n in files),
    ]


SUITE = ["benchmark=paper_math8", *fixtures(*PAPER8)]

# Gold answers of the fixture rows, read by hand off the files (first row's question start too).
EXPECTED = {
    "aime24": (["204", "025"], "Every morning Aya goes for a $9$-kilometer-long walk"),
    "aime25": (["70", "16", "117"], "Find the sum of all integer bases $b>9$"),
    "amc23": (["27", "36", "45"], "Cities $A$ and $B$ are $45$ miles apart."),
    "gsm8k": (["18", "3", "70000"], "Janet\u2019s ducks lay 16 eggs per day."),
    "math": (
        ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}", "9"],
        "Convert the point $(0,3)$",
    ),
    "gaokao2023en": (
        ["\\{x|-2\\leq x < 1\\}", "-1-\\sqrt{3}", "48, 384"],
        "Given sets $M=\\{x|x+2\\geq 0\\}",
    ),
    "olympiadbench": (
        ["2", "\\frac{1}{2 n+2}", "(1,8,19), (2,7,13), (4,5,7)"],
        "Xenia and Sergey play the following game.",
    ),
    "college_math": (["10-4 n", "(45,2),(-10,-9)", "Yes"], "Simplify: $-10-4(n-5)$"),
}


def compose_eval(tmp_path: Path, cache_dir: Path, *overrides: str):
    return compose_config(
        tmp_path,
        cache_dir,
        "ckpt=unused",
        "progress=false",
        *overrides,
        shrink=False,
        name="eval.yaml",
    )


def specs_of(cfg) -> dict[str, BenchmarkSpec]:
    return {spec.name: spec for spec in benchmark_specs(cfg)}


# ----------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (ROOT / "configs" / "benchmark").glob("*.yaml"))
)
def test_every_benchmark_config_composes(tmp_path, cache_dir, name):
    cfg = compose_eval(tmp_path, cache_dir, f"benchmark={name}")
    specs = specs_of(cfg)
    assert list(specs) == (PAPER8 if name == "paper_math8" else [name])
    for spec in specs.values():
        # the paper: Avg@8 on AIME24/25 and AMC23, pass@1 elsewhere; validation sampling 1.0 / 1.0
        assert (spec.metric, spec.num_samples) == (
            ("avg@8", 8) if spec.name in ("aime24", "aime25", "amc23") else ("pass@1", 1)
        )
        assert (spec.temperature, spec.top_p, spec.max_new_tokens) == (1.0, 1.0, 3072)
        assert spec.load and spec.data_dir is None and spec.path is None
    assert cfg.system_prompt == PAPER_SYSTEM_PROMPT


def test_suite_titles_and_sources_in_the_papers_order(tmp_path, cache_dir):
    specs = specs_of(compose_eval(tmp_path, cache_dir, "benchmark=paper_math8"))
    assert [s.title for s in specs.values()] == [
        "AIME24",
        "AIME25",
        "AMC23",
        "GSM8K",
        "MATH",
        "GAOKAO",
        "OlympiadBench",
        "CollegeMATH",
    ]
    toolkit = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/a45202bd16f1ec06f433442dc1152d0074773465/evaluation/data"
    for name in ("aime24", "amc23", "gaokao2023en", "olympiadbench", "college_math"):
        assert specs[name].load == {
            "path": "json",
            "data_files": f"{toolkit}/{name}/test.jsonl",
            "split": "train",
        }
    assert specs["gsm8k"].load == {"path": "openai/gsm8k", "name": "main", "split": "test"}
    assert specs["math"].load == {"path": "HuggingFaceH4/MATH-500", "split": "test"}
    assert [d["name"] for d in specs["aime25"].load] == ["AIME2025-I", "AIME2025-II"]
    assert (
        specs["gsm8k"].source
        == "datasets.load_dataset(path='openai/gsm8k', name='main', split='test')"
    )


# ------------------------------------------------------------------------------ gold parsing


def test_gold_parsers_hand_checked():
    assert gold_plain(27.0) == "27" and gold_plain(2.5) == "2.5" and gold_plain("025") == "025"
    assert gold_plain("$48$, $384$") == "48, 384"
    assert gold_gsm8k("So he made 70,000-0=70,000\n#### 70,000") == "70000"
    assert (
        gold_boxed("so $x=\\boxed{\\frac{1}{2}}$, not \\boxed{3}... in fact $\\boxed{\\sqrt{2}}$")
        == "\\sqrt{2}"
    )
    assert gold_first(["$2n-2$", "$n$"]) == "2n-2"
    assert (
        gold_first(np.array(["$2^{1009}$"], dtype=object)) == "2^{1009}"
    )  # a list read from parquet
    with pytest.raises(ValueError, match="####"):
        gold_gsm8k("18")
    with pytest.raises(ValueError, match="boxed"):
        gold_boxed("the answer is 3")
    with pytest.raises(ValueError, match="non-empty list"):
        gold_first([])


@pytest.mark.parametrize("name", PAPER8)
def test_fixture_rows_through_the_real_loader(tmp_path, cache_dir, name):
    cfg = compose_eval(tmp_path, cache_dir, f"benchmark={name}", *fixtures(name))
    spec = specs_of(cfg)[name]
    problems = build_problems(spec, load_rows(spec), cfg.system_prompt)
    golds, start = EXPECTED[name]
    assert [p.gold for p in problems] == golds
    assert problems[0].question.startswith(start)
    assert problems[0].messages == [
        {"role": "system", "content": PAPER_SYSTEM_PROMPT},
        {"role": "user", "content": problems[0].question},
    ]
    assert [p.index for p in problems] == list(range(len(golds)))


@pytest.mark.parametrize("name", ["amc23", "olympiadbench"])
def test_load_path_is_the_real_datasets_call(tmp_path, cache_dir, name):
    """``load`` goes through ``datasets.load_dataset``: the json builder on a fixture file
    (the default configs point it at the toolkit's file on GitHub) reads the same problems."""
    load = {
        "path": "json",
        "data_files": str(FIXTURES / name / "test.jsonl"),
        "split": "train",
        "cache_dir": str(tmp_path / "hf"),
    }
    spec = specs_of(compose_eval(tmp_path, cache_dir, f"benchmark={name}"))[name]
    spec.load = load
    problems = build_problems(spec, load_rows(spec), None)
    assert [p.gold for p in problems] == EXPECTED[name][0]
    assert (
        spec.source == f"datasets.load_dataset({', '.join(f'{k}={v!r}' for k, v in load.items())})"
    )


def test_yes_no_gold_gets_the_toolkits_hint(tmp_path, cache_dir):
    spec = specs_of(compose_eval(tmp_path, cache_dir, "benchmark=college_math", *fixtures()))[
        "college_math"
    ]
    problems = build_problems(spec, load_rows(spec), None)
    assert problems[2].question.endswith("$h(x)=10 x+5$ (Yes or No)")
    assert problems[0].messages == [
        {"role": "user", "content": "Simplify: $-10-4(n-5)$"}
    ]  # no system prompt


@pytest.mark.parametrize(
    ("reply", "gold", "right"),
    [
        ("... so $\\boxed{25}$ minutes", "025", True),  # AIME's zero-padded answers
        ("\\boxed{27}", "27", True),  # AMC23's 27.0
        ("\\boxed{70,000}", "70000", True),  # GSM8K
        ("\\boxed{7000}", "70000", False),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MATH
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("\\boxed{14/3}", "\\frac{14}{3}", True),
        ("\\boxed{-1-\\sqrt{3}}", "-1-\\sqrt{3}", True),  # GAOKAO
        ("\\boxed{-1-\\sqrt{3}i}", "-1-\\sqrt{3}", False),
        ("\\boxed{\\frac{1}{2(n+1)}}", "\\frac{1}{2 n+2}", True),  # OlympiadBench, symbolic
        ("\\boxed{\\frac{1}{2n}}", "\\frac{1}{2 n+2}", False),
        ("\\boxed{-4n+10}", "10-4 n", True),  # CollegeMATH
        ("\\boxed{Yes}", "Yes", True),
        ("\\boxed{No}", "Yes", False),
    ],
)
def test_fixture_golds_against_hand_written_replies(reply, gold, right):
    assert is_correct(reply, gold) is right


def test_loader_errors_name_the_file_and_the_knob(tmp_path, cache_dir):
    spec = specs_of(
        compose_eval(tmp_path, cache_dir, "benchmark=aime24", f"benchmark_data_dir={tmp_path}")
    )["aime24"]
    with pytest.raises(
        FileNotFoundError, match=r"aime24/test.jsonl not found.*benchmarks.aime24.data_dir=null"
    ):
        load_rows(spec)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"problem": "What is 1+1?", "answer": "2"})
        + "\n"
        + json.dumps({"text": "?", "answer": "3"})
        + "\n"
    )
    spec = specs_of(
        compose_eval(tmp_path, cache_dir, "benchmark=aime24", f"benchmarks.aime24.path={bad}")
    )["aime24"]
    with pytest.raises(
        DataError,
        match=r"bad.jsonl: row 1: field 'question': no question.*benchmarks.aime24.question_fields",
    ):
        build_problems(spec, load_rows(spec), None)
    with pytest.raises(ValueError, match=r"benchmarks.x: unknown keys \['tittle'\]"):
        BenchmarkSpec.from_config("x", {"tittle": "X"})


def test_unreadable_gold_is_left_out_and_named(tmp_path, cache_dir, caplog):
    rows = [{"question": "q0", "answer": "A: #### 4"}, {"question": "q1", "answer": "no marker"}]
    spec = specs_of(compose_eval(tmp_path, cache_dir, "benchmark=gsm8k"))["gsm8k"]
    problems = build_problems(spec, rows, None)
    assert [p.gold for p in problems] == ["4", None]
    assert (
        "1 of 2 rows have no readable gold" in caplog.text
        and "row 1: no '#### <answer>' line" in caplog.text
    )


# ------------------------------------------------------------------------- scoring and tables


def test_pass_at_k_curve_points():
    assert pass_at_k_curve(1) == [1]
    assert pass_at_k_curve(8) == [1, 2, 4, 8]
    assert pass_at_k_curve(6) == [1, 2, 4, 6]


def test_score_records_hand_computed():
    problems = [SimpleNamespace(gold="1"), SimpleNamespace(gold="2"), SimpleNamespace(gold=None)]
    eval_set = SimpleNamespace(problems=problems, settings=SamplingSettings(num_samples=4, temperature=0.7))
    correct = [[True, False, False, False], [True, True, False, False], [None] * 4]
    grading = [
        ["correct", "timeout", "no_answer", "no_answer"],
        ["correct", "correct", "refused", "wrong"],
        [None] * 4,
    ]
    records = [
        {
            "completion": f"c{i}{j} and so on",
            "new_tokens": 2,
            "correct": correct[i][j],
            "grading": grading[i][j],
            "entropy_sum": 1.0 + i,
            "entropy_count": 2,
        }
        for i in range(3)
        for j in range(4)
    ]
    metrics = score_records(records, eval_set, "sampled_entropy")
    assert metrics["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert metrics["avg@4"] == pytest.approx(0.375)
    # pass@2 = 1 - C(n-c, 2) / C(n, 2): 1 - 3/6 and 1 - 1/6
    assert metrics["pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert metrics["pass@4"] == pytest.approx(1.0)
    # entropy: sum of sums / sum of counts = 4 * (1 + 2 + 3) / (12 * 2)
    assert metrics["sampled_entropy"] == pytest.approx(1.0)
    assert (metrics["num_prompts"], metrics["num_samples"], metrics["num_scored"]) == (
        3.0,
        4.0,
        2.0,
    )
    assert metrics["temperature"] == 0.7  # the estimator's name in the tables needs it
    assert (
        metrics["grading/timeouts"],
        metrics["grading/refused"],
        metrics["grading/no_answer"],
    ) == (1.0, 1.0, 2.0)
    # a backend that measures no entropy leaves the key out
    no_entropy = [{**r, "entropy_sum": None, "entropy_count": 0} for r in records]
    assert "sampled_entropy" not in score_records(no_entropy, eval_set, None)


def test_results_table_layout():
    spec = lambda name, title, metric: BenchmarkSpec(name, title, metric, ["q"], "a", "plain")  # noqa: E731
    specs = [spec("aime24", "AIME24", "avg@8"), spec("gsm8k", "GSM8K", "pass@1")]
    common = {f"distinct_{n}": 0.5 for n in range(1, 5)} | {
        "self_bleu": float("nan"),
        "sampled_entropy": 1.25,
        "mean_new_tokens": 10.0,
    }
    results = {
        "aime24": {
            **common,
            "num_prompts": 2.0,
            "num_samples": 8.0,
            "avg@8": 0.6875,
            "pass@1": 0.6875,
            "pass@2": 0.8,
            "pass@4": 0.9,
            "pass@8": 1.0,
            "self_bleu": 12.5,
            "temperature": 1.0,
            "grading/timeouts": 1.0,
        },
        "gsm8k": {
            **common,
            "num_prompts": 3.0,
            "num_scored": 2.0,  # one row without a readable gold
            "num_samples": 1.0,
            "temperature": 0.0,
            "pass@1": 2 / 3,
            "avg@1": 2 / 3,
        },
    }
    text, numbers = results_tables("ce-sft", specs, results, GradingSettings())
    lines = text.splitlines()
    assert lines[0] == "| Model | AIME24 | GSM8K | Avg. |"
    assert lines[2] == "| ce-sft | 68.75 | 66.67 | 67.71 |"
    assert lines[4] == (
        "Accuracy in %; Avg@8 (T=1): AIME24; greedy pass@1: GSM8K; Avg. is the mean over the columns."
    )
    assert lines[5] == (
        "Answers: last \\boxed{} only (grading.boxed_only=true); each check limited to 5 s "
        "(grading.timeout_s), past it graded wrong."
    )
    assert (
        lines[6] == "Problems without a readable gold answer, left out of the column: GSM8K 1 of 3."
    )
    assert lines[7] == "Answers past the time limit (graded wrong): AIME24 1."
    results["gsm8k"]["num_samples"], results["gsm8k"]["temperature"] = 8.0, 1.0
    assert "pass@1 (mean of 8 samples, T=1): GSM8K" in results_tables("x", specs, results)[0]
    assert "| AIME24 | 2 | 8 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 12.50 | 1.2500 | 10.0 |" in lines
    assert (
        "| GSM8K | 3 | 1 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | — | 1.2500 | 10.0 |" in lines
    )  # one sample: no self-BLEU
    assert lines[-3:] == [
        "| pass@k (%) | k=1 | k=2 | k=4 | k=8 |",
        "|---|---:|---:|---:|---:|",
        "| AIME24 | 68.75 | 80.00 | 90.00 | 100.00 |",
    ]
    assert numbers["table"] == pytest.approx(
        {"aime24": 68.75, "gsm8k": 200 / 3, "average": (68.75 + 200 / 3) / 2}
    )
    assert numbers["columns"]["aime24"] == {
        "title": "AIME24",
        "metric": "avg@8",
        "estimator": "Avg@8 (T=1)",
    }


# --------------------------------------------------- the suite with a scripted backend, resume


class ScriptedBackend:
    """Answers from a table (question start -> boxed answer of each sample); one "token" per
    whitespace word, entropy 0.5 nats at each. ``stop_after`` prompts, it raises as a kill would."""

    name = "scripted"
    entropy_key = "sampled_entropy"

    def __init__(self, answers: dict[str, list[str]], stop_after: int | None = None):
        self.answers, self.stop_after, self.asked = answers, stop_after, []

    def generate(self, prompts, settings: SamplingSettings, keys=None):
        for position, messages in enumerate(prompts):
            if self.stop_after is not None and len(self.asked) == self.stop_after:
                raise KeyboardInterrupt
            question = messages[-1]["content"]
            self.asked.append(question)
            script = next((v for k, v in self.answers.items() if question.startswith(k)), [])
            texts = [
                f"We compute carefully. \\boxed{{{script[j] if j < len(script) else 'none'}}}"
                for j in range(settings.num_samples)
            ]
            tokens = [len(t.split()) for t in texts]
            yield position, PromptSamples(texts, tokens, [0.5 * n for n in tokens], tokens)


# AIME24: row 0 right in 3 of 8 samples, row 1 ("025") in 8 of 8; GSM8K rows 0 and 2 right; the rest wrong.
ANSWERS = {
    "Every morning Aya": ["204", "204", "204", "200", "1", "2", "3", "4"],
    "There exist real numbers $x$ and $y$": ["25"] * 8,
    "Janet\u2019s ducks": ["18"],
    "A robe takes": ["4"],
    "Josh decides to try flipping": ["70,000"],
}


def hand_table() -> dict[str, float]:
    aime24 = 100 * (3 / 8 + 1) / 2  # 68.75
    gsm8k = 100 * 2 / 3
    return {"aime24": aime24, "gsm8k": gsm8k, "average": (aime24 + gsm8k) / 8}


def check_suite_outputs(out: Path, summary: dict) -> None:
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["table"] == pytest.approx({**dict.fromkeys(PAPER8, 0.0), **hand_table()})
    assert summary["table"] == pytest.approx(on_disk["table"])
    aime = on_disk["benchmarks"]["aime24"]
    # pass@k of row 0 (n=8, c=3): 1 - C(5,k)/C(8,k); row 1 solves everything
    assert aime["pass@2"] == pytest.approx((1 - 10 / 28 + 1) / 2)
    assert aime["pass@4"] == pytest.approx((1 - 5 / 70 + 1) / 2)
    assert aime["pass@8"] == 1.0 and aime["sampled_entropy"] == pytest.approx(0.5)
    assert on_disk["benchmarks"]["gsm8k"]["self_bleu"] is None  # one sample per problem: undefined
    assert "pass@2" not in on_disk["benchmarks"]["gsm8k"]
    assert on_disk["benchmarks"]["college_math"]["source"].endswith("college_math/test.jsonl")
    for name, count in {
        "aime24": 2 * 8,
        "aime25": 3 * 8,
        "amc23": 3 * 8,
        "gsm8k": 3,
        "college_math": 3,
    }.items():
        records = [
            json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()
        ]
        assert len(records) == count
        assert json.loads((out / name / "metrics.json").read_text())["num_prompts"] == count / (
            8 if name.startswith("a") else 1
        )
    table = (out / "table.md").read_text()
    assert (
        "| Model | AIME24 | AIME25 | AMC23 | GSM8K | MATH | GAOKAO | OlympiadBench | CollegeMATH | Avg. |"
        in table
    )
    assert "| sft | 68.75 | 0.00 | 0.00 | 66.67 | 0.00 | 0.00 | 0.00 | 0.00 | 16.93 |" in table


def test_suite_table_with_a_scripted_backend(tmp_path, cache_dir, monkeypatch, capsys):
    backend = ScriptedBackend(ANSWERS)
    monkeypatch.setattr(eval_run, "build_backend", lambda *args, **kwargs: backend)
    summary = evaluate(compose_eval(tmp_path, cache_dir, *SUITE, "label=sft"))
    check_suite_outputs(tmp_path, summary)
    assert "| sft | 68.75 |" in capsys.readouterr().out
    assert len(backend.asked) == 2 + 3 * 7


def test_killed_suite_resumes_where_it_stopped(tmp_path, cache_dir, monkeypatch):
    first = tmp_path / "first"
    killed = ScriptedBackend(ANSWERS, stop_after=4)  # AIME24's 2 rows, then 2 of AIME25's 3
    monkeypatch.setattr(eval_run, "build_backend", lambda *args, **kwargs: killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(compose_eval(first, cache_dir, *SUITE, "label=sft"))
    assert len((first / "aime25" / "samples.jsonl").read_text().splitlines()) == 2 * 8
    with (first / "aime25" / "samples.jsonl").open("a") as handle:  # a line torn by the kill
        handle.write('{"prompt_index": 2, "sample": 0, "prompt": "Find the num')

    # a different run dir: the resumed run writes into the first one
    resumed = ScriptedBackend(ANSWERS)
    monkeypatch.setattr(eval_run, "build_backend", lambda *args, **kwargs: resumed)
    summary = evaluate(
        compose_eval(tmp_path / "second", cache_dir, *SUITE, "label=sft", f"resume={first}")
    )
    assert resumed.asked[0].startswith(
        "Find the number of ordered pairs"
    )  # AIME25's last row first
    assert len(resumed.asked) == 1 + 3 * 6
    check_suite_outputs(first, summary)

    # resuming with other sampling settings is refused, naming the knob
    with pytest.raises(
        ValueError, match=r"aime24 was sampled with num_samples=8, this run asks for num_samples=4"
    ):
        evaluate(
            compose_eval(
                tmp_path / "third",
                cache_dir,
                *SUITE,
                "sampling.num_samples=4",
                "pass1=sample",
                f"resume={first}",
            )
        )
    # and so is other grading: the verdicts in samples.jsonl were made with the first
    with pytest.raises(ValueError, match=r"it was sampled with grading=\{'boxed_only': True"):
        evaluate(
            compose_eval(
                tmp_path / "fourth",
                cache_dir,
                *SUITE,
                "grading.boxed_only=false",
                f"resume={first}",
            )
        )


def test_resume_refuses_a_changed_source(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(eval_run, "build_backend", lambda *args, **kwargs: ScriptedBackend(ANSWERS))
    evaluate(compose_eval(tmp_path, cache_dir, "benchmark=gsm8k", *fixtures()))
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"row 0 holds the question 'Janet.*the source changed"):
        evaluate(
            compose_eval(
                tmp_path / "again",
                cache_dir,
                "benchmark=gsm8k",
                f"benchmarks.gsm8k.path={other}",
                f"resume={tmp_path}",
            )
        )


# ----------------------------------------------------------------- the tiny model, end to end


@pytest.fixture(scope="module")
def tiny_model_dir(cache_dir) -> str:
    """The tiny Llama the training tests start from (pretrained 4 steps; shared cache)."""
    from sedsft.models.tiny import TinyLMSpec

    return TinyLMSpec(cache_dir=str(cache_dir / "models"), pretrain_steps=4).resolved_path()


def test_suite_end_to_end_with_the_tiny_model(tmp_path, cache_dir, tiny_model_dir):
    """The real Hugging Face backend on every benchmark's fixture: first row, 4 new tokens."""
    cfg = compose_eval(
        tmp_path,
        cache_dir,
        *SUITE,
        f"ckpt={tiny_model_dir}",
        "num_prompts=1",
        "sampling.max_new_tokens=4",
        "sampling.max_batch_tokens=256",
    )
    summary = evaluate(cfg)
    assert list(summary["table"]) == [*PAPER8, "average"]
    for name in PAPER8:
        records = [
            json.loads(line)
            for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()
        ]
        k = 8 if name in ("aime24", "aime25", "amc23") else 1
        assert [r["sample"] for r in records] == list(range(k))
        assert all(
            1 <= r["new_tokens"] <= 4 and r["entropy_count"] == r["new_tokens"] for r in records
        )
        assert records[0]["gold"] == EXPECTED[name][0][0]
        metrics = summary["benchmarks"][name]
        assert metrics[f"avg@{k}"] == pytest.approx(sum(r["correct"] for r in records) / k)
        entropy = sum(r["entropy_sum"] for r in records) / sum(r["entropy_count"] for r in records)
        assert metrics["sampled_entropy"] == pytest.approx(entropy) and entropy > 0


def test_topk_entropy_hand_computed():
    entry = lambda lp, rank: SimpleNamespace(logprob=lp, rank=rank)  # noqa: E731
    position = {
        5: entry(math.log(0.5), 1),
        7: entry(math.log(0.25), 2),
        9: entry(math.log(0.01), 40),
    }  # 9: sampled, not top-2
    assert topk_entropy(position, 2) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    )
    assert topk_entropy(position, 1) == pytest.approx(-0.5 * math.log(0.5))


class FakeVLLM:
    """Stands in for the ``vllm`` module: records what the backend asks for and answers with
    two tokens per sample, each position's top-2 log-probabilities log 0.5 and log 0.25."""

    def __init__(self):
        self.engine_kwargs, self.calls = None, []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engine_kwargs = kwargs

            def generate(self, requests, params, use_tqdm=True):
                fake.calls.append((requests, params))
                top2 = {
                    1: SimpleNamespace(logprob=math.log(0.5), rank=1),
                    2: SimpleNamespace(logprob=math.log(0.25), rank=2),
                }
                return [
                    SimpleNamespace(
                        outputs=[
                            SimpleNamespace(
                                text=f"r{len(fake.calls)}.{j}",
                                token_ids=[1, 2],
                                logprobs=[top2, top2],
                            )
                            for j in range(p.n)
                        ]
                    )
                    for p in params
                ]

        self.LLM, self.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)


def test_vllm_backend_requests_and_outputs_without_a_gpu(monkeypatch, chatml_tokenizer):
    import sys

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = VLLMBackend(
        "/models/x",
        chatml_tokenizer,
        tensor_parallel_size=2,
        prompts_per_call=2,
        entropy_top_k=2,
        seed=7,
    )
    assert fake.engine_kwargs == {
        "model": "/models/x",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "max_model_len": None,
        "enforce_eager": False,
        "seed": 7,
        "max_logprobs": 20,
    }
    prompts = [
        [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, {"role": "user", "content": f"q{i}"}]
        for i in range(3)
    ]
    settings = SamplingSettings(
        num_samples=2, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=100
    )
    out = list(backend.generate(prompts, settings, keys=[5, 6, 9]))
    assert [i for i, _ in out] == [0, 1, 2]
    assert [len(requests) for requests, _ in fake.calls] == [2, 1]  # prompts_per_call
    rendered = chatml_tokenizer.apply_chat_template(
        prompts[2], tokenize=False, add_generation_prompt=True
    )
    ids = chatml_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert fake.calls[1][0] == [
        {"prompt_token_ids": ids}
    ]  # the chat template, no extra special tokens
    params = [p for _, ps in fake.calls for p in ps]
    assert [p.seed for p in params] == [105, 106, 109]  # seed + row number: resume samples the same
    assert {(p.n, p.max_tokens, p.temperature, p.top_p, p.logprobs) for p in params} == {
        (2, 64, 1.0, 1.0, 2)
    }
    samples = out[2][1]
    assert samples.texts == ["r2.0", "r2.1"] and samples.num_tokens == [2, 2]
    per_position = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    assert samples.entropy_sums == pytest.approx(
        [2 * per_position] * 2
    ) and samples.entropy_counts == [2, 2]
    assert backend.entropy_key == "sampled_entropy_top2"


def test_backend_errors_say_what_to_do(monkeypatch, chatml_tokenizer):
    import sys

    from sedsft.evaluation.backends import build_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install -e '.\[vllm\]' \(or use backend=hf\)"):
        VLLMBackend("/models/x", chatml_tokenizer)
    with pytest.raises(ValueError, match="backend='tgi': unknown; use backend=hf"):
        build_backend("tgi", "/models/x", {})


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs CUDA and vLLM (pip install -e '.[vllm]')",
)
def test_vllm_backend_samples_k_per_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    backend = VLLMBackend(tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir), gpu_memory_utilization=0.3,
                          entropy_top_k=5, enforce_eager=True)  # fmt: skip
    prompts = [[{"role": "user", "content": f"What is {a} + 3?"}] for a in (2, 5)]
    settings = SamplingSettings(num_samples=3, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0)
    first = dict(backend.generate(prompts, settings, keys=[10, 11]))
    again = dict(
        backend.generate(prompts[1:], settings, keys=[11])
    )  # per-prompt seeds: resume-exact
    assert sorted(first) == [0, 1] and all(len(s.texts) == 3 for s in first.values())
    assert all(1 <= n <= 8 for s in first.values() for n in s.num_tokens)
    assert all(
        c == n and e > 0
        for s in first.values()
        for e, c, n in zip(s.entropy_sums, s.entropy_counts, s.num_tokens, strict=True)
    )
    assert again[0].texts == first[1].texts
    assert backend.entropy_key == "sampled_entropy_top5"
