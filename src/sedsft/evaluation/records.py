"""Sampling an eval set through a backend into its ``samples.jsonl``, resumable.

Every finished prompt's samples are graded and appended at once, one record per sample, so a
killed run loses at most the prompts in flight; ``resume=<eval run dir>`` continues such a
run in place, sampling only the prompts not complete there. ``eval_run.json`` records the
checkpoint, backend, grading and sampling settings the records were made with, and a resume
that asks for others is refused (``check_resume``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from sedsft.evaluation.backends import Backend
from sedsft.evaluation.benchmarks import Problem
from sedsft.evaluation.eval_sets import EvalSet
from sedsft.evaluation.sampling import PromptSamples
from sedsft.metrics import grade
from sedsft.metrics.answers import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

RUN_FILE = "eval_run.json"  # checkpoint, backend and sampling settings of an eval run, for resume


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


def check_resume(
    output_dir: Path, cfg: DictConfig, eval_sets: Sequence[EvalSet], grading: GradingSettings
) -> None:
    """Record the run's checkpoint, backend and sampling settings in ``eval_run.json``; on
    resume, refuse settings that differ from the ones the samples there were drawn with."""
    file = output_dir / RUN_FILE
    previous = json.loads(file.read_text()) if file.is_file() else None
    current = {
        "ckpt": str(cfg.ckpt),
        "backend": cfg.backend,
        "grading": asdict(grading),
        "sets": {s.name or "data": s.settings.drawn() for s in eval_sets},
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
