"""Every checkpoint layout the project writes, read back as a Hugging Face model; and the
one writer of Hugging Face exports.

Layouts read by ``load_model`` / ``load_checkpoint``:

- a Hugging Face directory (``config.json``), e.g. a run's ``hf/`` export or an RL export;
- an SFT run directory (its ``hf/`` export);
- a single-file Lightning checkpoint (``last.ckpt``; DDP, single device, FSDP with
  ``state_dict_type=full``);
- a sharded FSDP checkpoint directory (``meta.pt`` + shards, consolidated with Lightning's
  loader);
- a DeepSpeed checkpoint directory (``latest``; converted with Lightning's ZeRO utility,
  needs ``sedsft[deepspeed]``).

A Lightning checkpoint carries the run's resolved config (``checkpoint["sedsft"]``): its
``model`` entry rebuilds the model (base weights from ``model.name_or_path``, overridable),
then the checkpoint's weights replace them. LoRA runs load their adapters into the base.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from sedsft.models.lora import is_peft, save_lora

MODEL_PREFIX = "model."  # SFTModule keeps the Hugging Face model under ``self.model``
META_FILE = "sedsft.json"  # written next to every export: loss name, tau


def hf_directory(path: str | Path) -> Path | None:
    """The Hugging Face directory ``path`` names (itself, or a run directory's ``hf/``)."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as one dict (``state_dict`` + the rest), whatever its layout."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if (path / "meta.pt").is_file():  # FSDPStrategy(state_dict_type="sharded")
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(path))
    if (path / "latest").is_file():  # DeepSpeedStrategy
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        try:
            with tempfile.TemporaryDirectory() as scratch:
                return convert_zero_checkpoint_to_fp32_state_dict(path, Path(scratch) / "consolidated.ckpt")
        except ModuleNotFoundError as err:
            raise ImportError(
                f"{path} is a DeepSpeed checkpoint; converting it needs pip install 'sedsft[deepspeed]'"
            ) from err
    raise FileNotFoundError(
        f"{path}: not a Hugging Face directory (config.json), a run directory with hf/, a "
        "Lightning .ckpt file, an FSDP checkpoint directory (meta.pt) or a DeepSpeed one (latest)"
    )


def model_from_checkpoint(
    checkpoint: dict, source: str | Path = "checkpoint", model_overrides: dict | None = None
) -> tuple[nn.Module, Any, dict]:
    """``(model, tokenizer, run_config)`` rebuilt from a loaded Lightning checkpoint.

    ``model_overrides`` changes the stored ``model`` config (e.g. a local copy of the base:
    ``{"name_or_path": ...}``). LoRA runs come back as a peft model with their adapters.
    """
    meta = checkpoint.get("sedsft") or {}
    if not meta.get("config"):
        raise ValueError(
            f"{source}: the checkpoint carries no sedsft run config (not written by src/train.py); "
            "load its Hugging Face export instead"
        )
    config = OmegaConf.create(meta["config"])
    spec = hydra.utils.instantiate(OmegaConf.merge(config.model, model_overrides or {}))
    spec.gradient_checkpointing, spec.compile = False, False
    if spec.lora:  # load adapters onto the full-precision base, never onto a quantised one
        spec.lora = {**spec.lora, "quantization": None}
    model, tokenizer = spec.load_model(), spec.load_tokenizer()
    if meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]
    state = {
        k[len(MODEL_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(MODEL_PREFIX)
    }
    if is_peft(model):
        # The base stayed frozen: only adapter (and modules_to_save) weights come from the run.
        state = {k: v for k, v in state.items() if "lora_" in k or ".modules_to_save." in k}
        missing = [
            k for k in model.state_dict()
            if ("lora_" in k or ".modules_to_save." in k) and k not in state
        ]
        if missing or not state:
            raise ValueError(f"{source}: adapter weights missing from the checkpoint, e.g. {missing[:3]}")
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state, strict=True)
    return model, tokenizer, OmegaConf.to_container(config, resolve=True)


def checkpoint_tau(checkpoint: dict) -> float | None:
    """SED's calibrated ``tau`` stored in a Lightning checkpoint (None for other losses)."""
    tau = checkpoint["state_dict"].get("loss_fn.tau")
    if tau is None or torch.isnan(tau).item():
        return None
    return float(tau)


def load_model(path: str | Path, dtype: str | torch.dtype = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from any layout listed in the module docstring.

    A LoRA run loaded from a Lightning checkpoint comes back merged into full weights.
    """
    directory = hf_directory(path)
    if directory is not None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(directory)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    model, tokenizer, _ = model_from_checkpoint(load_checkpoint(path), path)
    if is_peft(model):
        model = model.merge_and_unload()
    if dtype != "auto":
        from sedsft.models.hf import resolve_dtype

        model = model.to(resolve_dtype(dtype) if isinstance(dtype, str) else dtype)
    return model, tokenizer


def read_meta(directory: str | Path) -> dict:
    """The ``sedsft.json`` of an export (loss name, tau), or ``{}`` when absent."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_hf(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
    meta: dict | None = None,
    state_dict: dict | None = None,
    merge: bool = True,
) -> Path:
    """``save_pretrained`` of ``model`` (weights from ``state_dict`` when given, e.g. a
    gathered FSDP state of a LightningModule, keys prefixed ``model.``) and of ``tokenizer``
    with its chat template, plus ``sedsft.json`` holding ``meta``. A LoRA model is written
    merged into full weights (``merge``) or as the adapter alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        state_dict = {k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    if is_peft(model):
        save_lora(model, directory, state_dict, merge)
    else:
        model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / META_FILE).write_text(json.dumps(meta or {}, indent=2))
    return directory


def loss_meta(loss_fn: nn.Module | None) -> dict:
    """What an export records of the loss that trained it."""
    if loss_fn is None:
        return {}
    tau = getattr(loss_fn, "tau", None)
    tau = None if tau is None or torch.isnan(torch.as_tensor(tau)).item() else float(tau)
    return {"loss": type(loss_fn).__name__, "tau": tau}
