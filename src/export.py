"""Export Hugging Face weights from a Lightning checkpoint, ready for TRL / verl:

    python src/export.py ckpt=<checkpoint> out=<dir> [merge=true] [dtype=bfloat16]
                         [model.name_or_path=<local copy of the base model>]

``ckpt`` is any layout ``sedsft.checkpoints`` reads (single file, sharded FSDP directory,
DeepSpeed directory). The run config stored in the checkpoint rebuilds the model, the
checkpoint's weights replace the base ones, and ``out`` receives ``save_pretrained``
weights, the tokenizer with its chat template, and ``sedsft.json`` (the loss and its state). LoRA runs
are merged into full weights (``merge=true``, a QLoRA adapter into the full-precision base)
or written as the adapter alone (``merge=false``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from sedsft.checkpoints import (  # noqa: E402
    load_checkpoint,
    loss_from_stored,
    loss_meta,
    loss_state,
    model_from_checkpoint,
    save_hf,
)
from sedsft.models.hf import resolve_dtype  # noqa: E402

USAGE = "usage: python src/export.py ckpt=<checkpoint file or directory> out=<dir> [merge=true] [dtype=bfloat16]"


def export(ckpt: str, out: str, merge: bool = True, dtype: str | None = None, model: dict | None = None) -> Path:
    """Write ``out`` from checkpoint ``ckpt`` (see the module docstring); returns ``out``."""
    checkpoint = load_checkpoint(ckpt)
    lm, tokenizer, config = model_from_checkpoint(checkpoint, ckpt, model)
    if dtype is not None:
        lm.to(resolve_dtype(dtype))
    loss = loss_from_stored(config.get("loss") or {}, ckpt, state=loss_state(checkpoint))
    return save_hf(lm, tokenizer, out, meta=loss_meta(loss), merge=merge)


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
