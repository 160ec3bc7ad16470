"""SFT then GRPO per (loss, seed), with held-out evaluation before and after RL:
``python src/pipeline.py loss=sed seed=1``; ``python src/pipeline.py grid=toy_claim`` runs
the whole toy grid and writes its summary (mean ± 95% interval per loss, paired
differences to CE by seed) into the sweep directory.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline.yaml")
def main(cfg: DictConfig) -> None:
    from sedsft.pipeline.run import run_pipeline

    run_pipeline(cfg)


if __name__ == "__main__":
    preflight("pipeline.yaml")  # a mistake on the command line: one message, nothing on disk
    main()
