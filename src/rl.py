"""GRPO after SFT on TRL: ``python src/rl.py policy=<SFT run dir | HF dir | .ckpt>``.

Any config value is a Hydra override (``grpo.max_steps=200``, ``data=local data.path=rl.parquet``,
``experiment=rl_paper_llama32_3b``); ``print_verl=true`` prints the equivalent verl command.
The run directory (``logs/rl/runs/<timestamp>``) holds the config, TensorBoard events,
resumable checkpoints, the Hugging Face export and ``metrics.json``. Several GPUs:
``accelerate launch --config_file configs/accelerate/<zero2|zero3|fsdp|ddp>.yaml src/rl.py ...``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="rl.yaml")
def main(cfg: DictConfig) -> None:
    if cfg.get("print_verl"):
        from sedsft.rl.verl import print_verl_command

        print_verl_command(cfg)
        return
    from sedsft.rl.training import train  # after Hydra set up logging and the run directory

    train(cfg)


if __name__ == "__main__":
    preflight("rl.yaml", {"policy": (
        lambda cfg: OmegaConf.is_missing(cfg, "policy") and not cfg.get("resume"),
        "the SFT policy to start from (an SFT run directory, a Hugging Face directory, a Lightning .ckpt), "
        "or resume=<RL run directory> to continue a run",
        "python src/rl.py policy=logs/train/runs/<timestamp>",
    )})  # fmt: skip
    main()
