"""Export Hugging Face weights from a Lightning checkpoint, ready for TRL / verl:

    python src/export.py ckpt=<checkpoint> out=<dir> [merge=true] [dtype=bfloat16]
                         [model.name_or_path=<local copy of the base model>]

``ckpt`` is any layout ``sedsft.checkpoints`` reads (single file, sharded FSDP directory,
DeepSpeed directory); ``sedsft.checkpoints.export_checkpoint`` does the work. Knobs:
``configs/export.yaml``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


EXAMPLE = "python src/export.py ckpt=logs/train/runs/<timestamp>/checkpoints/last.ckpt out=exported"
# Knobs without a default, checked before Hydra starts (sedsft.utils.cli.preflight).
REQUIRED = {
    "ckpt": (
        lambda cfg: OmegaConf.is_missing(cfg, "ckpt"),
        "the Lightning checkpoint to export (a .ckpt file, an FSDP or DeepSpeed checkpoint directory)",
        EXAMPLE,
    ),
    "out": (lambda cfg: OmegaConf.is_missing(cfg, "out"), "the directory to write the Hugging Face model into", EXAMPLE),
}


@hydra.main(version_base="1.3", config_path="../configs", config_name="export.yaml")
def main(cfg: DictConfig) -> Path:
    from sedsft.checkpoints import export_checkpoint

    overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if v is not None}
    directory = export_checkpoint(str(cfg.ckpt), str(cfg.out), bool(cfg.merge), cfg.dtype, overrides)
    print(f"exported Hugging Face model to {directory}")
    return directory


if __name__ == "__main__":
    preflight("export.yaml", REQUIRED)
    main()
