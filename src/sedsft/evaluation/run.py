"""The evaluation run behind ``src/eval.py``: sample, score, print, write files.

Two kinds of eval sets:

- ``benchmark=<name>`` (``configs/benchmark/``; ``paper_math8`` = the paper's eight): each
  benchmark samples into ``<run>/<name>/samples.jsonl`` and scores into
  ``<run>/<name>/metrics.json``; ``<run>/metrics.json`` holds every number of the printed
  tables (Table 1's layout, diversity, pass@k curves) and ``<run>/table.md`` the tables.
- otherwise the data config's held-out source (``data=``), into ``<run>/samples.jsonl`` and a
  flat ``<run>/metrics.json``.

Every finished prompt's samples are appended to ``samples.jsonl`` at once; ``resume=<eval run
dir>`` continues such a run in place, sampling only the prompts not complete there (the
sampling settings and checkpoint must match, ``eval_run.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sedsft.data.formats import DataError, gold_answer, to_prompt
from sedsft.evaluation.backends import Backend, SamplingSettings, build_backend
from sedsft.evaluation.benchmarks import BenchmarkSpec, Problem, build_problems, load_rows
from sedsft.evaluation.evaluate import pass_at_k_curve, score_samples
from sedsft.evaluation.sampling import PromptSamples, Samples, check_greedy
from sedsft.metrics import UndefinedMetricWarning, grade
from sedsft.metrics.answers import DEFAULT_TIMEOUT_S
from sedsft.utils import console

log = logging.getLogger(__name__)

# sampling of a data= set when the top-level knobs are null (benchmarks carry their own)
DATA_DEFAULTS = {
    "num_prompts": 64,
    "num_samples": 8,
    "max_new_tokens": 256,
    "temperature": 1.0,
    "top_p": 1.0,
}
RUN_FILE = "eval_run.json"  # checkpoint, backend and sampling settings of an eval run, for resume
GRADING_STATUSES = {"timeout": "timeouts", "refused": "refused", "no_answer": "no_answer"}


@dataclass(frozen=True)
class GradingSettings:
    """How answers are graded (``sedsft.metrics.grade``); stored with the run, because the
    verdicts in ``samples.jsonl`` were made with them."""

    boxed_only: bool = (
        True  # False: no box -> "the answer is ..." -> last number (the toolkit's fallbacks)
    )
    timeout_s: float = (
        DEFAULT_TIMEOUT_S  # hard limit of one symbolic check; past it: wrong, counted
    )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> GradingSettings:
        grading = cfg.get("grading") or {}
        unknown = sorted(set(grading) - {"boxed_only", "timeout_s"})
        if unknown:
            raise ValueError(f"grading: unknown keys {unknown}; known: ['boxed_only', 'timeout_s']")
        settings = cls(**dict(grading))
        if not settings.timeout_s > 0:
            raise ValueError(f"grading.timeout_s={settings.timeout_s}: must be > 0 seconds")
        return settings

    def describe(self) -> str:
        answers = (
            "last \\boxed{} only"
            if self.boxed_only
            else "last \\boxed{}, else 'the answer is ...', else the last number"
        )
        return f"Answers: {answers} (grading.boxed_only={str(self.boxed_only).lower()}); each check limited to {self.timeout_s:g} s (grading.timeout_s), past it graded wrong."


def eval_prompts(data_cfg: DictConfig, limit: int | None) -> list[tuple[list[dict], str | None]]:
    """Prompts and gold answers of an eval set: the held-out source of a data config when
    it has one (the toy set's val split), else its train source (a whole local file)."""
    source_cfg = data_cfg.get("val") or data_cfg.train
    source = hydra.utils.instantiate(source_cfg)
    rows = source.load()
    count = len(rows) if limit is None else min(limit, len(rows))
    prompts = []
    for index in range(count):
        row = rows[index]
        prompts.append(
            (to_prompt(row, source.name, index, data_cfg.get("system_prompt")), gold_answer(row))
        )
    if not prompts:
        raise DataError(source.name, None, None, "no prompts to evaluate")
    missing = [i for i, (_, gold) in enumerate(prompts) if gold is None]
    if missing:
        log.warning(
            "%s: %d of %d rows have no gold answer and are left out of pass@k / avg@k (rows %s%s)",
            source.name, len(missing), count, missing[:10], " ..." if len(missing) > 10 else "",
        )  # fmt: skip
    return prompts


@dataclass
class EvalSet:
    """One thing to sample and score: a benchmark, or the data config's eval set."""

    name: str | None  # benchmark key; None for a data= set (files at the run's top level)
    problems: list[Problem]
    settings: SamplingSettings
    spec: BenchmarkSpec | None = None

    def directory(self, root: Path) -> Path:
        return root if self.name is None else root / self.name


def _pick(cfg: DictConfig, key: str, default: Any) -> Any:
    """A top-level knob when set (it overrides every eval set), else ``default``."""
    value = cfg.get(key)
    return default if value is None else value


def data_eval_set(cfg: DictConfig) -> EvalSet:
    prompts = eval_prompts(cfg.data, _pick(cfg, "num_prompts", DATA_DEFAULTS["num_prompts"]))
    problems = [
        Problem(index=i, question=m[-1]["content"], gold=g, messages=m)
        for i, (m, g) in enumerate(prompts)
    ]
    return EvalSet(None, problems, _settings(cfg, DATA_DEFAULTS))


def _settings(cfg: DictConfig, defaults: dict[str, Any]) -> SamplingSettings:
    check_greedy(
        float(_pick(cfg, "temperature", defaults["temperature"])),
        int(_pick(cfg, "num_samples", defaults["num_samples"])),
    )
    return SamplingSettings(
        num_samples=int(_pick(cfg, "num_samples", defaults["num_samples"])),
        max_new_tokens=int(_pick(cfg, "max_new_tokens", defaults["max_new_tokens"])),
        temperature=float(_pick(cfg, "temperature", defaults["temperature"])),
        top_p=float(_pick(cfg, "top_p", defaults["top_p"])),
        seed=cfg.seed,
    )


def benchmark_specs(cfg: DictConfig) -> list[BenchmarkSpec]:
    """The selected benchmarks (``cfg.benchmarks``, in config order), with the top-level
    ``num_prompts`` applied when set."""
    specs = []
    for name, entry in (cfg.get("benchmarks") or {}).items():
        spec = BenchmarkSpec.from_config(name, OmegaConf.to_container(entry, resolve=True))
        spec.num_prompts = _pick(cfg, "num_prompts", spec.num_prompts)
        specs.append(spec)
    return specs


def benchmark_eval_set(cfg: DictConfig, spec: BenchmarkSpec) -> EvalSet:
    rows = load_rows(spec)
    problems = build_problems(spec, rows, cfg.get("system_prompt"))
    log.info("%s: %d of %d problems from %s", spec.name, len(problems), len(rows), spec.source)
    defaults = asdict(spec)
    if spec.metric == "pass@1":
        estimator = cfg.get("pass1") or "greedy"
        defaults.update(pass1_sampling(estimator))
        if (
            estimator == "greedy"
            and (cfg.get("num_samples") or 1) > 1
            and cfg.get("temperature") is None
        ):
            raise ValueError(
                f"num_samples={cfg.num_samples} with pass1=greedy: greedy pass@1 takes one answer per problem; "
                f"pass pass1=mean@{cfg.num_samples} (n samples, the unbiased pass@1) or pass1=sample as well"
            )
    return EvalSet(spec.name, problems, _settings(cfg, defaults), spec)


def pass1_sampling(estimator: str) -> dict[str, Any]:
    """Sampling of the pass@1 benchmarks for the ``pass1`` knob: ``greedy`` (temperature 0,
    one answer: Qwen2.5-Math's toolkit's default), ``sample`` (one draw at the benchmark's
    temperature), ``mean@<n>`` (n draws at the benchmark's temperature; pass@1 is then the
    unbiased estimator, the mean accuracy over the n, with far less variance than one draw)."""
    if estimator == "greedy":
        return {"temperature": 0.0, "num_samples": 1}
    if estimator == "sample":
        return {"num_samples": 1}
    match = re.fullmatch(r"mean@(\d+)", estimator)
    if match and int(match.group(1)) >= 1:
        return {"num_samples": int(match.group(1))}
    raise ValueError(
        f"pass1={estimator!r}: unknown; use pass1=greedy, pass1=sample or pass1=mean@<n> (e.g. mean@8)"
    )


# ---------------------------------------------------------------------------------------------
# sampling with resume


def _records(
    problem: Problem,
    samples: PromptSamples,
    classify: Callable[[str], str] | None,
    grading: GradingSettings | None = None,
) -> list[dict]:
    grading = grading or GradingSettings()
    verdicts = [
        grade(text, problem.gold, problem.question, boxed_only=grading.boxed_only, timeout_s=grading.timeout_s)
        if problem.gold is not None
        else None
        for text in samples.texts
    ]  # fmt: skip
    return [
        {
            "prompt_index": problem.index,
            "sample": j,
            "prompt": problem.question,
            "gold": problem.gold,
            "completion": text,
            "correct": None if verdicts[j] is None else verdicts[j].correct,
            "grading": None if verdicts[j] is None else verdicts[j].status,
            "label": classify(text) if classify is not None else None,
            "new_tokens": samples.num_tokens[j],
            "entropy_sum": samples.entropy_sums[j],
            "entropy_count": samples.entropy_counts[j],
        }
        for j, text in enumerate(samples.texts)
    ]


def read_done(path: Path, problems: Sequence[Problem], num_samples: int) -> dict[int, list[dict]]:
    """Records of the problems already complete in ``path`` (a ``samples.jsonl`` of an earlier,
    interrupted run), by row number; the file is rewritten with exactly those, dropping a
    torn last line and the samples of a problem cut off midway."""
    if not path.is_file():
        return {}
    by_index: dict[int, list[dict]] = {}
    torn = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        by_index.setdefault(record["prompt_index"], []).append(record)
    questions = {p.index: p.question for p in problems}
    done = {}
    for index, records in by_index.items():
        if index in questions and records[0]["prompt"] != questions[index]:
            raise ValueError(
                f"resume: {path} row {index} holds the question {records[0]['prompt'][:60]!r}..., the eval set's "
                f"row {index} is {questions[index][:60]!r}...: the source changed; start a fresh run (no resume=)"
            )
        if index in questions and sorted(r["sample"] for r in records) == list(range(num_samples)):
            done[index] = sorted(records, key=lambda r: r["sample"])
    dropped = sum(len(r) for r in by_index.values()) - sum(len(r) for r in done.values())
    if torn or dropped:
        log.warning(
            "resume: %s: dropped %d torn lines and %d samples of incomplete prompts",
            path,
            torn,
            dropped,
        )
    _write_records(path, [r for p in problems if p.index in done for r in done[p.index]])
    return done


def _write_records(path: Path, records: Sequence[dict]) -> None:
    """Replace ``path`` by ``records`` atomically (a kill leaves the old or the new file)."""
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(temporary, path)


def sample_eval_set(
    backend: Backend,
    eval_set: EvalSet,
    path: Path,
    classify: Callable[[str], str] | None = None,
    progress: bool = True,
    grading: GradingSettings | None = None,
) -> list[dict]:
    """Sample every problem of ``eval_set`` not yet complete in ``path``, appending each
    finished problem's records as it completes; at the end ``path`` is rewritten in problem
    order. Returns all records, in problem order."""
    problems, settings = eval_set.problems, eval_set.settings
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(path, problems, settings.num_samples)
    todo = [p for p in problems if p.index not in done]
    if done:
        log.info(
            "%s: %d of %d problems already sampled, %d to go",
            path,
            len(done),
            len(problems),
            len(todo),
        )
    scored = [
        r["correct"] for records in done.values() for r in records if r["correct"] is not None
    ]
    bar = tqdm(total=len(problems), initial=len(done), desc=eval_set.name or "eval", unit="problem",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    with path.open("a", encoding="utf-8") as handle, bar:
        for position, samples in backend.generate(
            [p.messages for p in todo], settings, keys=[p.index for p in todo]
        ):
            problem = todo[position]
            records = _records(problem, samples, classify, grading)
            handle.write("".join(json.dumps(r) + "\n" for r in records))
            handle.flush()
            done[problem.index] = records
            scored += [r["correct"] for r in records if r["correct"] is not None]
            bar.update(1)
            if scored:
                bar.set_postfix(acc=f"{sum(scored) / len(scored):.3f}")
    records = [r for p in problems for r in done[p.index]]
    _write_records(path, records)  # in problem order (they were appended in generation order)
    return records


def score_records(
    records: Sequence[dict],
    eval_set: EvalSet,
    entropy_key: str | None,
    classify: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """Every metric of one eval set from its ``samples.jsonl`` records (``score_samples``)."""
    k = eval_set.settings.num_samples
    groups = [records[i : i + k] for i in range(0, len(records), k)]
    sums = [[r.get("entropy_sum") for r in g] for g in groups]
    counts = [[r.get("entropy_count") or 0 for r in g] for g in groups]
    known = [
        (s, c)
        for gs, gc in zip(sums, counts, strict=True)
        for s, c in zip(gs, gc, strict=True)
        if s is not None
    ]
    total = sum(c for _, c in known)
    samples = Samples(
        texts=[[r["completion"] for r in g] for g in groups],
        num_tokens=[[r["new_tokens"] for r in g] for g in groups],
        entropy=sum(s for s, _ in known) / total if total else 0.0,
        entropy_sums=sums,
        entropy_counts=counts,
    )
    golds = [p.gold for p in eval_set.problems]
    correct = [[r["correct"] for r in g] for g in groups]
    with warnings.catch_warnings():
        if k == 1:  # one sample per prompt (pass@1 benchmarks): self-BLEU is undefined by design
            warnings.filterwarnings("ignore", "self-BLEU is undefined", UndefinedMetricWarning)
        metrics, _ = score_samples(samples, golds, k, classify, correct=correct, curve=True)
    entropy = metrics.pop("sampled_entropy")
    if entropy_key is not None and total:
        metrics[entropy_key] = entropy
    metrics["num_prompts"] = float(len(groups))
    metrics["num_samples"] = float(k)
    metrics["num_scored"] = float(sum(gold is not None for gold in golds))
    temperature = getattr(eval_set.settings, "temperature", None)
    if temperature is not None:
        metrics["temperature"] = float(temperature)
    statuses = [r.get("grading") for r in records]
    for status, key in GRADING_STATUSES.items():
        metrics[f"grading/{key}"] = float(statuses.count(status))
    return metrics


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_value(spec: BenchmarkSpec, metrics: dict[str, float]) -> tuple[str, float | None]:
    """The metric the paper reports for ``spec`` (its ``avg@k`` with k = the samples drawn,
    or ``pass@1``) and its value in percent (None: no gold answers)."""
    kind = spec.metric.split("@")[0]
    key = f"avg@{int(metrics['num_samples'])}" if kind == "avg" else spec.metric
    value = metrics.get(key)
    return key, None if value is None else 100.0 * value


def estimator(key: str, metrics: dict[str, float]) -> str:
    """The name of a table column's estimator, as a reader needs it: ``Avg@8 (T=1)``,
    ``greedy pass@1``, ``pass@1 (1 sample, T=1)``, ``pass@1 (mean of 8 samples, T=1)`` (the
    unbiased estimator over n samples)."""
    n, temperature = int(metrics["num_samples"]), metrics.get("temperature")
    at = "" if temperature is None else f", T={temperature:g}"
    if key.startswith("avg@"):
        return f"Avg@{n}" + (f" (T={temperature:g})" if temperature is not None else "")
    if key == "pass@1" and temperature == 0:
        return "greedy pass@1"
    if key == "pass@1":
        return f"pass@1 ({'1 sample' if n == 1 else f'mean of {n} samples'}{at})"
    return key


def results_tables(
    label: str,
    specs: Sequence[BenchmarkSpec],
    results: dict[str, dict[str, float]],
    grading: GradingSettings | None = None,
) -> tuple[str, dict]:
    """Markdown tables (Table 1's layout; diversity; pass@k curves) and the numbers of the
    first, for ``metrics.json``."""
    table, columns = {}, {}
    for spec in specs:
        key, value = table_value(spec, results[spec.name])
        table[spec.name], columns[spec.name] = value, {"title": spec.title, "metric": key}
    present = [v for v in table.values() if v is not None]
    table["average"] = sum(present) / len(present) if present else None
    by_metric: dict[str, list[str]] = {}
    for spec in specs:
        name = estimator(columns[spec.name]["metric"], results[spec.name])
        columns[spec.name]["estimator"] = name
        by_metric.setdefault(name, []).append(spec.title)
    head = [
        "Model",
        *(spec.title for spec in specs),
        f"Avg. ({len(present)})" if len(present) != len(specs) else "Avg.",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
        "| "
        + " | ".join([label, *(_fmt(table[s.name]) for s in specs), _fmt(table["average"])])
        + " |",
        "",
        "Accuracy in %; "
        + "; ".join(f"{metric}: {', '.join(titles)}" for metric, titles in by_metric.items())
        + "; Avg. is the mean over the columns.",
        *_grading_notes(specs, results, grading),
        "",
        "| Benchmark | problems | samples | distinct-1 | distinct-2 | distinct-3 | distinct-4 | self-BLEU | entropy | new tokens |",
        "|---|" + "---:|" * 9,
    ]
    for spec in specs:
        m = results[spec.name]
        entropy = next((v for k, v in m.items() if k.startswith("sampled_entropy")), None)
        self_bleu = m["self_bleu"] if m["num_samples"] > 1 else None
        cells = [spec.title, f"{int(m['num_prompts'])}", f"{int(m['num_samples'])}",
                 *(_fmt(m[f"distinct_{n}"], 4) for n in range(1, 5)), _fmt(self_bleu), _fmt(entropy, 4),
                 _fmt(m["mean_new_tokens"], 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    curves = [
        s for s in specs if results[s.name]["num_samples"] > 1 and "pass@1" in results[s.name]
    ]
    if curves:
        ks = sorted(
            {k for s in curves for k in pass_at_k_curve(int(results[s.name]["num_samples"]))}
        )
        lines += [
            "",
            "| pass@k (%) | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for spec in curves:
            m = results[spec.name]
            lines.append(
                "| "
                + " | ".join(
                    [
                        spec.title,
                        *(_fmt(100 * m[f"pass@{k}"]) if f"pass@{k}" in m else "" for k in ks),
                    ]
                )
                + " |"
            )
    return "\n".join(lines), {"table": table, "columns": columns}


def _grading_notes(
    specs: Sequence[BenchmarkSpec],
    results: dict[str, dict[str, float]],
    grading: GradingSettings | None,
) -> list[str]:
    """How answers were graded, problems left out of a column for want of a readable gold,
    and checks that ran past the time limit (graded wrong)."""
    notes = [grading.describe()] if grading is not None else []
    unscored = [
        f"{s.title} {int(m['num_prompts'] - m['num_scored'])} of {int(m['num_prompts'])}"
        for s in specs
        if "num_scored" in (m := results[s.name]) and m["num_scored"] < m["num_prompts"]
    ]
    if unscored:
        notes.append(
            "Problems without a readable gold answer, left out of the column: "
            + "; ".join(unscored)
            + "."
        )
    for key, what in (("timeouts", "past the time limit"), ("refused", "too big to evaluate")):
        counts = [f"{s.title} {int(results[s.name][f'grading/{key}'])}" for s in specs
                  if results[s.name].get(f"grading/{key}")]  # fmt: skip
        if counts:
            notes.append(f"Answers {what} (graded wrong): " + "; ".join(counts) + ".")
    return notes


def _json(obj: Any) -> str:
    """JSON with undefined values (NaN, e.g. self-BLEU of one sample per prompt) as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# the run


def _check_resume(output_dir: Path, cfg: DictConfig, eval_sets: Sequence[EvalSet]) -> None:
    """Record the run's checkpoint, backend and sampling settings in ``eval_run.json``; on
    resume, refuse settings that differ from the ones the samples there were drawn with."""
    file = output_dir / RUN_FILE
    previous = json.loads(file.read_text()) if file.is_file() else None
    current = {
        "ckpt": str(cfg.ckpt),
        "backend": cfg.backend,
        "grading": asdict(GradingSettings.from_config(cfg)),
        "sets": {s.name or "data": asdict(s.settings) for s in eval_sets},
    }
    if previous is not None:
        was_data, is_data = "data" in previous["sets"], "data" in current["sets"]
        if (
            was_data != is_data
        ):  # the two kinds write different metrics.json files into the same place
            asked = "the data= set" if is_data else f"benchmarks {sorted(current['sets'])}"
            had = "the data= set" if was_data else f"benchmarks {sorted(previous['sets'])}"
            raise ValueError(
                f"resume={output_dir}: it evaluated {had}, this run asks for {asked}; resume only an "
                "evaluation of the same kind, or start a fresh run (no resume=)"
            )
        for key in ("ckpt", "backend", "grading"):
            if previous.get(key, current[key]) != current[key]:  # runs before grading: no key
                raise ValueError(
                    f"resume={output_dir}: it was sampled with {key}={previous[key]}, this run has "
                    f"{key}={current[key]}; use the same {key} or start a fresh run (no resume=)"
                )
        for name, settings in current["sets"].items():
            for knob, value in previous["sets"].get(name, settings).items():
                if settings[knob] != value:
                    raise ValueError(
                        f"resume={output_dir}: {name} was sampled with {knob}={value}, this run asks for "
                        f"{knob}={settings[knob]}; pass {knob}={value} or start a fresh run (no resume=)"
                    )
        current["sets"] = {**previous["sets"], **current["sets"]}
    output_dir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(current, indent=2))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    console.configure_console()  # one line per event (Lightning's seed line once, not twice)
    output_dir = Path(cfg.get("resume") or cfg.paths.output_dir)
    console.announce_run_directory(output_dir)
    L.seed_everything(cfg.seed)
    if cfg.backend not in ("hf", "vllm"):
        raise ValueError(f"backend={cfg.backend!r}: unknown; use backend=hf or backend=vllm")
    if cfg.get("resume"):
        if not output_dir.is_dir():
            raise FileNotFoundError(f"resume={output_dir}: no such eval run directory")
        if not (output_dir / RUN_FILE).is_file():  # another stage's run: its metrics.json must stay
            raise ValueError(
                f"resume={output_dir}: not an evaluation run (no {RUN_FILE}); resume= continues an interrupted "
                f"src/eval.py run in place. To evaluate the model of that run, pass ckpt={output_dir} (without resume=)"
            )
        log.info("resuming the evaluation in %s", output_dir)
    specs = benchmark_specs(cfg)
    eval_sets = [benchmark_eval_set(cfg, spec) for spec in specs] if specs else [data_eval_set(cfg)]
    _check_resume(output_dir, cfg, eval_sets)
    backend_settings = {
        "hf": {"batch_size": cfg.batch_size, "max_batch_tokens": cfg.max_batch_tokens}
    }
    backend_settings["vllm"] = {**OmegaConf.to_container(cfg.vllm, resolve=True), "seed": cfg.seed}
    backend = build_backend(
        cfg.backend, cfg.ckpt, backend_settings[cfg.backend], cfg.device, output_dir / "hf_export"
    )
    classify = (
        hydra.utils.get_method(cfg.sample_classifier) if cfg.get("sample_classifier") else None
    )
    progress = bool(cfg.get("progress", True))
    grading = GradingSettings.from_config(cfg)

    results = {}
    for eval_set in eval_sets:
        directory = eval_set.directory(output_dir)
        records = sample_eval_set(
            backend, eval_set, directory / "samples.jsonl", classify, progress, grading
        )
        metrics = score_records(records, eval_set, backend.entropy_key, classify)
        if eval_set.spec is not None:
            metrics_file = directory / "metrics.json"
            metrics_file.write_text(
                _json({**dict(sorted(metrics.items())), "source": eval_set.spec.source})
            )
        results[eval_set.name] = metrics

    if not specs:
        metrics = results[None]
        (output_dir / "metrics.json").write_text(_json(dict(sorted(metrics.items()))))
        count, k = int(metrics["num_prompts"]), eval_sets[0].settings.num_samples
        title = f"{cfg.ckpt}: {count} prompts x {k} samples"
        print(f"\n{console.format_table(dict(sorted(metrics.items())), title)}", flush=True)
        print(
            f"all metrics: {output_dir / 'metrics.json'}; samples: {output_dir / 'samples.jsonl'}\n{console.METRIC_KEY}"
        )
        return metrics

    label = cfg.get("label") or str(cfg.ckpt)
    text, numbers = results_tables(label, specs, results, grading)
    summary = {
        "ckpt": str(cfg.ckpt),
        "label": label,
        "backend": cfg.backend,
        "grading": asdict(grading),
        **numbers,
        "benchmarks": {s.name: {**results[s.name], "source": s.source} for s in specs},
    }
    (output_dir / "metrics.json").write_text(_json(summary))
    (output_dir / "table.md").write_text(text + "\n")
    print(f"\n{text}\n", flush=True)
    print(
        f"all metrics: {output_dir / 'metrics.json'}; table: {output_dir / 'table.md'}\n{console.METRIC_KEY}"
    )
    return summary
