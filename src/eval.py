"""Evaluate a trained model.

    python src/eval.py ckpt=<run | HF dir | .ckpt> benchmark=paper_math8   # the paper's eight, Table 1
    python src/eval.py ckpt=<...> benchmark=aime24 sampling.num_samples=8
    python src/eval.py ckpt=<...> benchmark=gsm8k backend=vllm            # on a GPU
    python src/eval.py ckpt=<...> data=local data.path=<file>             # any eval file
    python src/eval.py ckpt=<...> benchmark=paper_math8 resume=<eval run dir>

Samples completions per prompt, prints accuracy and diversity tables, and writes
``metrics.json`` and ``samples.jsonl`` (per benchmark: ``<name>/samples.jsonl``) into the
evaluation's run directory (``sedsft.evaluation.run``).
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    from sedsft.evaluation.run import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    preflight("eval.yaml", {"ckpt": (
        lambda cfg: OmegaConf.is_missing(cfg, "ckpt"),
        "the model to evaluate (an SFT or RL run directory, a Hugging Face directory, a Lightning .ckpt)",
        "python src/eval.py ckpt=logs/train/runs/<timestamp> benchmark=aime24",
    )})  # fmt: skip
    main()
