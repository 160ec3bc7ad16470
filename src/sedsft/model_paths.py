"""What a ``policy=`` (``src/rl.py``) or ``ckpt=`` (``src/eval.py``) argument names, checked
before anything is loaded, and the model it names.

``sedsft.checkpoints.load_model`` reads every layout the project writes; handed something
else, it fails far from the knob: a text file as whatever ``torch.load`` makes of its bytes
(``UnpicklingError``, ``EOFError``, even ``KeyError: 101``), an SFT run directory whose
``hf/`` export was never written (a killed run, ``callbacks`` without ``hf_export``) as "not a
Hugging Face directory" with no word of the ``checkpoints/last.ckpt`` sitting next to it.
Here the argument is looked at first (a torch checkpoint is a zip archive holding
``data.pkl``, or an old-style pickle), and every refusal names the knob, the path, what it
is, and what to pass instead.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sedsft.checkpoints import hf_directory, load_model

LAYOUTS = (
    "a Hugging Face directory (config.json), a run directory with an hf/ export, a Lightning .ckpt file, "
    "an FSDP checkpoint directory (meta.pt) or a DeepSpeed one (latest)"
)
_STEP = re.compile(r"(\d+)")


class CheckpointPathError(ValueError):
    """A ``policy=`` / ``ckpt=`` that names no loadable model; the message says what to pass."""


def checkpoint_file_problem(path: Path) -> str | None:
    """Why the file ``path`` is not a torch checkpoint (None when it looks like one): ``torch.save``
    writes a zip archive with a ``data.pkl`` member, or (before torch 1.6) a pickle."""
    if path.stat().st_size == 0:
        return "an empty file"
    if path.suffix == ".safetensors":
        return "a safetensors weights file, without the config that builds the model; pass the Hugging Face directory that holds it (config.json)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return None
        return "a zip archive without data.pkl, not a torch checkpoint"
    with path.open("rb") as handle:
        head = handle.read(16)
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy format
        return None
    return f"not a torch checkpoint (neither a zip archive holding data.pkl nor a pickle; it starts with {head!r})"


def run_checkpoints(directory: Path) -> list[Path]:
    """What a run directory without an export holds under ``checkpoints/``, most useful first:
    SFT's ``last.ckpt``, then the other ``.ckpt`` files and RL's ``checkpoint-<step>``
    Hugging Face directories, newest step first."""
    folder = directory / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if (p.is_file() and p.suffix == ".ckpt") or hf_directory(p) == p]

    def rank(p: Path) -> tuple[int, int]:
        digits = _STEP.findall(p.name)
        return (p.name != "last.ckpt", -int(digits[-1]) if digits else 0)

    return sorted(found, key=rank)


def resolve_model_path(path: str | Path, knob: str) -> Path:
    """``path`` when it names a layout ``load_model`` reads (module docstring); otherwise a
    ``CheckpointPathError`` (``FileNotFoundError`` for a missing path) naming ``knob``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{knob}={path}: no such file or directory; {knob}= takes {LAYOUTS}")
    if hf_directory(path) is not None:
        return path
    if path.is_dir():
        if (path / "meta.pt").is_file() or (path / "latest").is_file():
            return path
        found = run_checkpoints(path)
        if found:
            listed = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
            raise CheckpointPathError(
                f"{knob}={path}: a run directory without an hf/ export (the run stopped before its end, or ran "
                f"without callbacks.hf_export); its checkpoints/ holds {listed}: pass {knob}={found[0]}"
                + (f", or write the export first: python src/export.py ckpt={found[0]} out={path / 'hf'}"
                   if found[0].is_file() else "")
            )  # fmt: skip
        raise CheckpointPathError(f"{knob}={path}: a directory holding none of: {LAYOUTS}")
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise CheckpointPathError(f"{knob}={path}: {problem}; {knob}= takes {LAYOUTS}")
    return path


def load_model_from(path: str | Path, knob: str, dtype: str | torch.dtype = "auto") -> tuple[nn.Module, Any]:
    """``load_model`` of what ``knob=path`` names, after ``resolve_model_path`` refused by name a
    path that names no model (a file that passes the format check but cannot be read is
    reported by ``sedsft.checkpoints.load_checkpoint`` itself)."""
    return load_model(resolve_model_path(path, knob), dtype=dtype)
