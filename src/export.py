"""Export Hugging Face weights from a Lightning checkpoint, ready for verl / TRL:

    python src/export.py ckpt=<checkpoint> out=<dir> [merge=true] [dtype=bfloat16]
                         [model.name_or_path=<local copy of the base model>]

``ckpt`` is a single-file checkpoint (``last.ckpt``; DDP, single device, FSDP with
``state_dict_type=full``), a sharded FSDP checkpoint directory (``meta.pt`` + shards,
consolidated with Lightning's loader), or a DeepSpeed checkpoint directory (converted
with Lightning's ZeRO utility; needs ``sedsft[deepspeed]``). The run config stored in the
checkpoint rebuilds the model (base weights from ``model.name_or_path``, overridable),
the checkpoint's weights replace them, and ``out`` receives ``save_pretrained`` weights,
the tokenizer with its chat template, and ``sedsft.json`` (loss, tau). LoRA runs are
merged into full weights (``merge=true``, a QLoRA adapter into the full-precision base)
or written as the adapter alone (``merge=false``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
from omegaconf import OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from sedsft.callbacks.hf_export import MODEL_PREFIX, save_hf  # noqa: E402
from sedsft.models.hf import resolve_dtype  # noqa: E402
from sedsft.models.lora import is_peft  # noqa: E402

USAGE = "usage: python src/export.py ckpt=<checkpoint file or directory> out=<dir> [merge=true] [dtype=bfloat16]"


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
            raise ImportError(f"{path} is a DeepSpeed checkpoint; converting it needs pip install 'sedsft[deepspeed]'") from err
    raise FileNotFoundError(f"ckpt={path}: not a checkpoint file, an FSDP checkpoint directory (meta.pt) or a DeepSpeed one (latest)")


def export(ckpt: str, out: str, merge: bool = True, dtype: str | None = None, model: dict | None = None) -> Path:
    """Write ``out`` from checkpoint ``ckpt`` (see the module docstring); returns ``out``."""
    checkpoint = load_checkpoint(ckpt)
    meta = checkpoint.get("sedsft") or {}
    if not meta.get("config"):
        raise ValueError(f"{ckpt}: the checkpoint carries no sedsft run config (not written by src/train.py)")
    config = OmegaConf.create(meta["config"])
    spec_cfg = OmegaConf.merge(config.model, model or {})
    spec = hydra.utils.instantiate(spec_cfg)
    spec.gradient_checkpointing, spec.compile = False, False
    if spec.lora:  # merge into the full-precision base, never into a quantised one
        spec.lora = {**spec.lora, "quantization": None}
    lm = spec.load_model()
    tokenizer = spec.load_tokenizer()
    if meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]

    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if is_peft(lm):
        # The base stayed frozen: only adapter (and modules_to_save) weights come from the run.
        state = {k: v for k, v in state.items() if "lora_" in k or ".modules_to_save." in k}
        missing = [k for k in lm.state_dict() if ("lora_" in k or ".modules_to_save." in k) and k not in state]
        if missing or not state:
            raise ValueError(f"{ckpt}: adapter weights missing from the checkpoint, e.g. {missing[:3]}")
        lm.load_state_dict(state, strict=False)
    else:
        lm.load_state_dict(state, strict=True)
    if dtype is not None:
        lm.to(resolve_dtype(dtype))

    loss = hydra.utils.instantiate(config.loss)
    if "loss_fn.tau" in checkpoint["state_dict"] and hasattr(loss, "set_tau"):
        tau = float(checkpoint["state_dict"]["loss_fn.tau"])
        if tau == tau:  # not NaN (a run without calibration)
            loss.set_tau(tau)
    save_hf(SimpleNamespace(model=lm, tokenizer=tokenizer, loss_fn=loss), out, merge=merge)
    return Path(out)


def main(argv: list[str]) -> None:
    args = OmegaConf.from_cli(argv)
    if "ckpt" not in args or "out" not in args:
        raise SystemExit(USAGE)
    directory = export(
        ckpt=str(args.ckpt),
        out=str(args.out),
        merge=bool(args.get("merge", True)),
        dtype=args.get("dtype"),
        model=OmegaConf.to_container(args.model) if "model" in args else None,
    )
    print(f"exported Hugging Face model to {directory}")


if __name__ == "__main__":
    main(sys.argv[1:])
