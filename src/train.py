"""Train a causal LM with a token-level loss: ``python src/train.py loss=sed``.

Any config value is a Hydra override (``trainer.max_steps=50``, ``data.max_length=512``);
``-m`` sweeps a grid. The run directory is printed at the start and holds the config,
TensorBoard events, checkpoints, the Hugging Face export and ``metrics.json``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from sedsft.sft.training import train  # after Hydra set up logging and the run directory

    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    preflight("train.yaml")  # a mistake on the command line: one message, nothing on disk
    main()
