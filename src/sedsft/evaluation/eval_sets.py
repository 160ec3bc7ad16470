"""The prompt sets of an evaluation run, each with its sampling settings.

Two kinds (``sedsft.evaluation.run``): the benchmarks a config selects (``benchmark=<name>``,
``configs/benchmark/``), each sampled as its own config says unless a top-level knob
overrides it; or, without benchmarks, the data config's held-out source (``data=``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sedsft.data.formats import DataError, gold_answer, to_prompt
from sedsft.evaluation.benchmarks import BenchmarkSpec, Problem, build_problems, load_rows
from sedsft.evaluation.sampling import SamplingSettings

log = logging.getLogger(__name__)

# sampling of a data= set when the top-level knobs are null (benchmarks carry their own)
DATA_DEFAULTS = {
    "num_prompts": 64,
    "num_samples": 8,
    "max_new_tokens": 256,
    "temperature": 1.0,
    "top_p": 1.0,
}


@dataclass
class EvalSet:
    """One thing to sample and score: a benchmark, or the data config's eval set."""

    name: str | None  # benchmark key; None for a data= set (files at the run's top level)
    problems: list[Problem]
    settings: SamplingSettings
    spec: BenchmarkSpec | None = None

    def directory(self, root: Path) -> Path:
        return root if self.name is None else root / self.name


def build_eval_sets(cfg: DictConfig) -> list[EvalSet]:
    """The selected benchmarks in config order, else the data config's eval set."""
    specs = benchmark_specs(cfg)
    return [benchmark_eval_set(cfg, spec) for spec in specs] if specs else [data_eval_set(cfg)]


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


def _pick(cfg: DictConfig, key: str, default: Any) -> Any:
    """A knob of the run's config block ``cfg`` when set (it overrides every eval set), else ``default``."""
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
    """The run's ``sampling:`` block, passed whole, its null keys taken from the eval set's
    own sampling (``defaults``); the seed is the run's."""
    block = dict(cfg.sampling)
    for key, cast in (("num_samples", int), ("max_new_tokens", int), ("temperature", float), ("top_p", float)):
        block[key] = cast(_pick(cfg.sampling, key, defaults[key]))
    return SamplingSettings.from_config(block, where="sampling", seed=cfg.seed)


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
            and (cfg.sampling.get("num_samples") or 1) > 1
            and cfg.sampling.get("temperature") is None
        ):
            n = cfg.sampling.num_samples
            raise ValueError(
                f"sampling.num_samples={n} with pass1=greedy: greedy pass@1 takes one answer per problem; "
                f"pass pass1=mean@{n} (n samples, the unbiased pass@1) or pass1=sample as well"
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
