"""The evaluation run behind ``src/eval.py``, step by step: the prompt sets
(``eval_sets``), the policy behind a generation backend (``backends``), sampling into
``samples.jsonl`` with resume (``records``), scoring (``evaluate``), tables and files
(``tables``).

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

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from sedsft.evaluation.backends import build_backend
from sedsft.evaluation.eval_sets import build_eval_sets
from sedsft.evaluation.evaluate import score_records
from sedsft.evaluation.records import RUN_FILE, GradingSettings, check_resume, sample_eval_set
from sedsft.evaluation.tables import report_benchmarks, report_data_set, write_set_metrics
from sedsft.utils import console

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample and score every eval set of ``cfg`` with its checkpoint; returns what
    ``metrics.json`` holds."""
    console.configure_console()  # one line per event (Lightning's seed line once, not twice)
    output_dir = run_directory(cfg)
    L.seed_everything(cfg.seed)
    if cfg.backend not in ("hf", "vllm"):
        raise ValueError(f"backend={cfg.backend!r}: unknown; use backend=hf or backend=vllm")
    if cfg.get("resume"):
        log.info("resuming the evaluation in %s", output_dir)

    eval_sets = build_eval_sets(cfg)
    grading = GradingSettings.from_config(cfg)
    check_resume(output_dir, cfg, eval_sets, grading)
    vllm = {**OmegaConf.to_container(cfg.vllm, resolve=True), "seed": cfg.seed}
    backend = build_backend(cfg.backend, cfg.ckpt, vllm, cfg.device, output_dir / "hf_export")
    classify = (
        hydra.utils.get_method(cfg.sample_classifier) if cfg.get("sample_classifier") else None
    )

    results = {}
    for eval_set in eval_sets:
        directory = eval_set.directory(output_dir)
        records = sample_eval_set(backend, eval_set, directory / "samples.jsonl", classify,
                                  bool(cfg.get("progress", True)), grading)  # fmt: skip
        results[eval_set.name] = score_records(records, eval_set, backend.entropy_key, classify)
        write_set_metrics(directory, eval_set, results[eval_set.name])

    if eval_sets[0].spec is None:
        return report_data_set(output_dir, str(cfg.ckpt), eval_sets[0], results[None])
    run = {"ckpt": str(cfg.ckpt), "label": cfg.get("label") or str(cfg.ckpt), "backend": cfg.backend}
    return report_benchmarks(output_dir, run, [s.spec for s in eval_sets], results, grading)


def run_directory(cfg: DictConfig) -> Path:
    """The run's directory: ``resume``'s (an earlier evaluation run, refused when it is not
    one) or a fresh one."""
    output_dir = Path(cfg.get("resume") or cfg.paths.output_dir)
    console.announce_run_directory(output_dir)
    if cfg.get("resume"):
        if not output_dir.is_dir():
            raise FileNotFoundError(f"resume={output_dir}: no such eval run directory")
        if not (output_dir / RUN_FILE).is_file():  # another stage's run: its metrics.json must stay
            raise ValueError(
                f"resume={output_dir}: not an evaluation run (no {RUN_FILE}); resume= continues an interrupted "
                f"src/eval.py run in place. To evaluate the model of that run, pass ckpt={output_dir} (without resume=)"
            )
    return output_dir
