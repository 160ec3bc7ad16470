"""Evaluate a trained model: ``python src/eval.py ckpt=<run dir | HF dir | .ckpt> data=<set>``.

Samples ``num_samples`` completions per prompt, prints diversity and accuracy, and writes
``metrics.json`` and ``samples.jsonl`` into the evaluation's run directory.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    from sedsft.evaluation.run import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
