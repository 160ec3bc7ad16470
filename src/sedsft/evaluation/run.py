"""The evaluation run behind ``src/eval.py``: sample, score, print, write files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from sedsft.checkpoints import load_model
from sedsft.data.formats import DataError, gold_answer, to_prompt
from sedsft.evaluation.evaluate import evaluate_generations

log = logging.getLogger(__name__)


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
        prompts.append((to_prompt(row, source.name, index, data_cfg.get("system_prompt")), gold_answer(row)))
    if not prompts:
        raise DataError(source.name, None, None, "no prompts to evaluate")
    missing = [i for i, (_, gold) in enumerate(prompts) if gold is None]
    if missing:
        log.warning(
            "%s: %d of %d rows have no gold answer and are left out of pass@k / avg@k (rows %s%s)",
            source.name, len(missing), count, missing[:10], " ..." if len(missing) > 10 else "",
        )  # fmt: skip
    return prompts


def format_table(metrics: dict[str, float]) -> str:
    width = max(map(len, metrics))
    return "\n".join(f"{name:<{width}}  {value:10.4f}" for name, value in sorted(metrics.items()))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.ckpt)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    prompts = eval_prompts(cfg.data, cfg.num_prompts)
    metrics, records = evaluate_generations(
        model,
        tokenizer,
        [p for p, _ in prompts],
        [g for _, g in prompts],
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        classify=hydra.utils.get_method(cfg.sample_classifier) if cfg.get("sample_classifier") else None,
    )
    metrics["num_prompts"] = float(len(prompts))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    with (output_dir / "samples.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    print(f"\n{cfg.ckpt}: {len(prompts)} prompts x {cfg.num_samples} samples\n{format_table(metrics)}\n")
    log.info("wrote %s and %s", output_dir / "metrics.json", output_dir / "samples.jsonl")
    return metrics
