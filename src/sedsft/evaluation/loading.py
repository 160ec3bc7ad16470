"""Find and load the model to evaluate: an HF directory, a run directory, or a ``.ckpt``."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from sedsft.callbacks.hf_export import MODEL_PREFIX


def load_for_eval(path: str, dtype: str = "auto"):
    """``(model, tokenizer)`` from

    - a Hugging Face directory (``config.json`` inside), e.g. a run's ``hf/`` export;
    - a run directory (its ``hf/`` export is used);
    - a Lightning checkpoint: the run config stored in it rebuilds the model, then its
      weights are loaded (for runs stopped before the export was written).
    """
    target = Path(path)
    if target.is_dir() and not (target / "config.json").exists() and (target / "hf" / "config.json").exists():
        target = target / "hf"
    if target.is_dir() and (target / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(target)
    if target.is_file() and target.suffix == ".ckpt":
        checkpoint = torch.load(target, map_location="cpu", weights_only=False)
        config = (checkpoint.get("sedsft") or {}).get("config")
        if config is None:
            raise ValueError(f"{target}: checkpoint carries no sedsft run config; evaluate its hf/ export instead")
        spec = hydra.utils.instantiate(OmegaConf.create(config)["model"])
        model, tokenizer = spec.load_model(), spec.load_tokenizer()
        state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
        model.load_state_dict(state)
        return model, tokenizer
    raise FileNotFoundError(f"ckpt={path}: not a Hugging Face directory, a run directory with hf/, or a .ckpt file")
