"""LoRA and QLoRA through ``peft``: ``python src/train.py model.lora.r=16``.

Off by default (``model.lora.r=0`` or no ``lora`` entry: full fine-tuning). With ``r > 0``
the loaded model is wrapped in a ``peft`` LoRA model whose only trainable parameters are
the adapters; ``quantization: 4bit`` loads the frozen base in NF4 through bitsandbytes
(QLoRA). Exports either hold the adapter alone (``peft``'s format) or the merged full
weights, ``W + (alpha / r) B A``, computed from a (possibly gathered) state dict so the
live model is never modified.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: LoRA adapters on the frozen base model.

    Attributes:
        r: adapter rank; 0 turns LoRA off (full fine-tuning).
        alpha: scaling numerator, the update is ``alpha / r * B A`` (``alpha / sqrt(r)`` with rslora).
        dropout: dropout on the adapter input.
        target_modules: ``all-linear`` (every linear layer but the LM head) or module names.
        bias: ``none`` | ``all`` | ``lora_only``: which biases train.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full next to the adapters (e.g. ``[lm_head]``).
        quantization: ``null`` | ``4bit`` (QLoRA, NF4 + double quantisation) | ``8bit``;
            needs bitsandbytes and a CUDA device.
    """

    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"model.lora.r must be an int >= 0 (0 = off), got {self.r!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"model.lora.quantization={self.quantization!r}; allowed: null, 4bit, 8bit")
        if self.quantization and not self.r:
            raise ValueError("model.lora.quantization needs LoRA on (model.lora.r > 0): a quantised base cannot be trained in full")


def lora_settings(lora: dict | LoraSettings | None) -> LoraSettings | None:
    """The validated settings, or None when LoRA is off; unknown keys name the allowed ones."""
    if lora is None or isinstance(lora, LoraSettings):
        return lora if lora is None or lora.r else None
    allowed = [f.name for f in fields(LoraSettings)]
    unknown = sorted(set(lora) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model.lora option(s) {unknown}; allowed: {allowed}")
    values = {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in dict(lora).items()}
    settings = LoraSettings(**values)
    return settings if settings.r else None


def load_kwargs(settings: LoraSettings | None, compute_dtype: torch.dtype | str) -> dict:
    """Extra ``from_pretrained`` arguments: the bitsandbytes config for QLoRA."""
    if settings is None or settings.quantization is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise ImportError(
            f"model.lora.quantization={settings.quantization} (QLoRA) needs bitsandbytes and a CUDA "
            "device: pip install bitsandbytes; or set model.lora.quantization=null"
        )
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.bfloat16
    if settings.quantization == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    }


def apply_lora(model: nn.Module, settings: LoraSettings, gradient_checkpointing: bool) -> nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.quantization:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        use_rslora=settings.use_rslora,
        modules_to_save=settings.modules_to_save,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: %.2fM of %.1fM parameters train", settings.r, trainable / 1e6, total / 1e6)
    return model


def is_peft(model: nn.Module) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full weights of the base model with the active LoRA adapter merged in.

    ``model`` is the ``PeftModel`` (read for structure and scaling only); ``state_dict``
    its full state (PeftModel key names; e.g. gathered from a sharded run), defaulting to
    ``model.state_dict()``. Returns the plain transformers key names.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    state = dict(model.state_dict() if state_dict is None else state_dict)
    adapter = model.active_adapter
    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or module.use_dora.get(adapter, False):
            raise NotImplementedError(
                f"merging {type(module).__name__} at {name} is not supported; export the adapter "
                "alone (callbacks.hf_export.merge=false) and merge with peft's merge_and_unload"
            )
        base = state.pop(f"{name}.base_layer.weight")
        a = state.pop(f"{name}.lora_A.{adapter}.weight").float()
        b = state.pop(f"{name}.lora_B.{adapter}.weight").float()
        delta = b @ a
        if module.fan_in_fan_out:
            delta = delta.T
        merged[f"{name}.weight"] = (base.float() + module.scaling[adapter] * delta).to(base.dtype)
        if f"{name}.base_layer.bias" in state:
            merged[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    for key, value in state.items():
        if "lora_" in key or ".original_module." in key:
            continue  # other adapters' weights; the frozen copies of modules_to_save
        merged[_MODULES_TO_SAVE.sub(".", key)] = value
    return {k.removeprefix(PEFT_PREFIX): v for k, v in merged.items()}


def save_lora(
    model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None, merge: bool
) -> str:
    """Write the adapter alone (``merge=False``: ``adapter_config.json`` +
    ``adapter_model.safetensors``) or the merged model (``save_pretrained`` format).

    Returns what was written: ``adapter`` or ``merged``.
    """
    directory = Path(directory)
    quantized = getattr(model.get_base_model(), "is_quantized", False)
    if merge and quantized:
        log.warning(
            "a QLoRA base is quantised: merging into it would be lossy; exporting the adapter "
            "alone. Merge it into the full-precision base with: python src/export.py ckpt=... merge=true"
        )
        merge = False
    if not merge:
        model.save_pretrained(directory, state_dict=state_dict)
        return "adapter"
    model.get_base_model().save_pretrained(directory, state_dict=merged_state_dict(model, state_dict))
    return "merged"
