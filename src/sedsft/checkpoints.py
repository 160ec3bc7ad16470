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

Loading never runs code from the file: checkpoints are shared and downloaded, and both
routes by which one could run code are closed. Every file is unpickled with
``torch.load(weights_only=True)`` (tensors, containers and primitives only; third-party
loaders run under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), and the stored model config is data, not
a recipe: its ``_target_`` must name a model spec class of ``sedsft.models`` (see
:func:`spec_from_stored`), nothing in it is instantiated recursively, and remote code stays
off unless the caller turns it on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from sedsft.models.hf import CausalLMSpec
from sedsft.models.lora import is_peft, save_lora

MODEL_PREFIX = "model."  # SFTModule keeps the Hugging Face model under ``self.model``
LOSS_PREFIX = "loss_fn."  # ... and its loss under ``self.loss_fn`` (whose buffers hold its state)
META_FILE = "sedsft.json"  # written next to every export: the loss and its state (export_meta)


def hf_directory(path: str | Path) -> Path | None:
    """The Hugging Face directory ``path`` names (itself, or a run directory's ``hf/``)."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


class UnsafeCheckpointError(ValueError):
    """A checkpoint asked to run code (a pickled object, a foreign ``_target_``, remote code)."""


# Pickle errors of a file that is no checkpoint, or one holding objects weights_only refuses.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, FileNotFoundError, IndexError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``, even where a third-party
    loader (Lightning's DeepSpeed converter, DeepSpeed's ``zero_to_fp32``) passes ``False``.
    Sets the process environment for the duration: not for concurrent use from threads."""
    saved = {key: os.environ.get(key) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refused(path: Path, err: Exception) -> Exception:
    text = str(err)
    found = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
    if isinstance(err, pickle.UnpicklingError) and found:
        return UnsafeCheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects, not only tensors and plain "
            f"data ({found}); loading it could run code from the file. Use the "
            "run's Hugging Face export (hf/) or a checkpoint written by src/train.py"
        )
    return ValueError(
        f"{path}: not a readable checkpoint ({type(err).__name__}: {text.splitlines()[0] if text else ''}); "
        "ckpt= / policy= take a run directory, a Hugging Face directory (config.json) or a Lightning .ckpt "
        "file written by src/train.py"
    )


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as one dict (``state_dict`` + the rest), whatever its layout,
    read with ``weights_only=True`` (:class:`UnsafeCheckpointError` when it holds objects)."""
    path = Path(path)
    try:
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        if (path / "meta.pt").is_file():  # FSDPStrategy(state_dict_type="sharded")
            return _load_sharded(path)
        if (path / "latest").is_file():  # DeepSpeedStrategy
            return _load_deepspeed(path)
    except _UNPICKLE_ERRORS as err:
        raise _refused(path, err) from err
    raise FileNotFoundError(
        f"{path}: not a Hugging Face directory (config.json), a run directory with hf/, a "
        "Lightning .ckpt file, an FSDP checkpoint directory (meta.pt) or a DeepSpeed one (latest)"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` ``.metadata`` file (a plain pickle, which
    torch reads with ``pickle.load``) allowing only the classes such a file holds."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Weights only load failed: GLOBAL {module}.{name} is not allowed in .metadata")


def _load_sharded(path: Path) -> dict:
    """Lightning's consolidation of a sharded FSDP checkpoint (DCP shards + ``meta.pt``),
    with the DCP metadata read by :class:`_MetadataUnpickler` and every ``torch.load``
    weights-only."""
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    with open(path / ".metadata", "rb") as stream:  # refused here rather than inside DCP's retries
        _MetadataUnpickler(stream).load()
    checkpoint: dict[str, Any] = {}
    with weights_only_loads():
        _load_state_dict(checkpoint, storage_reader=SafeReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
    return _format_checkpoint(checkpoint)


def _load_deepspeed(path: Path) -> dict:
    try:
        import deepspeed  # noqa: F401  (the converter needs it; fail here with the install hint)
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ModuleNotFoundError as err:
        raise ImportError(f"{path} is a DeepSpeed checkpoint; converting it needs pip install 'sedsft[deepspeed]'") from err
    with tempfile.TemporaryDirectory() as scratch, weights_only_loads(), torch.serialization.safe_globals(_deepspeed_classes()):
        return convert_zero_checkpoint_to_fp32_state_dict(path, Path(scratch) / "consolidated.ckpt")


def _deepspeed_classes() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its ZeRO files (loss scaler settings, the
    ZeRO stage, parameter fragment addresses): rebuilt from their stored fields, nothing else
    from the file is allowed."""
    names = {
        "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
        "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
        "deepspeed.utils.tensor_fragment": ("fragment_address",),
    }
    found = []
    for module, classes in names.items():
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(loaded, name) for name in classes if hasattr(loaded, name)]
    return found


_TARGET_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _nested_targets(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        found = [f"{where}.{k}" for k in value if k in _TARGET_KEYS]
        for key, item in value.items():
            found += _nested_targets(item, f"{where}.{key}")
        return found
    if isinstance(value, list | tuple):
        return [hit for i, item in enumerate(value) for hit in _nested_targets(item, f"{where}[{i}]")]
    return []


def spec_from_stored(model: dict, source: str | Path = "checkpoint", overrides: dict | None = None) -> CausalLMSpec:
    """The model spec a checkpoint's stored ``model`` config describes, built as data.

    ``model["_target_"]`` must name a subclass of :class:`CausalLMSpec` defined in the
    ``sedsft.models`` package (the only classes imported: the project's own code); every
    other key must be a field of it, and no value may hold a ``_target_`` of its own.
    ``trust_remote_code`` is taken from ``overrides`` only: a stored ``true`` would run code
    from the repository the checkpoint names, so it is refused unless the caller sets it.
    """
    stored = dict(model)
    target = str(stored.pop("_target_", ""))
    module_name, _, class_name = target.rpartition(".")
    cls = None
    if module_name == "sedsft.models" or module_name.startswith("sedsft.models."):
        cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CausalLMSpec)):
        raise UnsafeCheckpointError(
            f"{source}: the stored model config names _target_={target!r}, which is not a model spec of "
            "sedsft.models (a CausalLMSpec subclass); a checkpoint never chooses code to run"
        )
    overrides = dict(overrides or {})
    nested = _nested_targets({k: v for k, v in stored.items() if k not in _TARGET_KEYS}, "model")
    nested += [f"model.{k}" for k in stored if k in _TARGET_KEYS]
    if nested:
        raise UnsafeCheckpointError(f"{source}: the stored model config holds instantiation keys {nested}; refusing to build it")
    stored_kwargs = stored.get("model_kwargs") or {}
    if (stored.get("trust_remote_code") or stored_kwargs.get("trust_remote_code")) and "trust_remote_code" not in overrides:
        raise UnsafeCheckpointError(
            f"{source}: the stored model config sets trust_remote_code=true, which would run code from "
            f"{stored.get('name_or_path')!r}; pass model.trust_remote_code=true yourself if you trust it"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {**stored, "trust_remote_code": False, **overrides}
    values["model_kwargs"] = {k: v for k, v in (values.get("model_kwargs") or {}).items() if k != "trust_remote_code"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown model option(s) {unknown} for {target}; allowed: {sorted(fields)}")
    return cls(**values)


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
    # Plain data from here on: the stored config was resolved when it was written, and an
    # interpolation in it is never resolved (a resolver can act: make directories, read env).
    config = OmegaConf.to_container(OmegaConf.create(meta["config"]), resolve=False)
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{source}: the stored run config has no model section")
    spec = spec_from_stored(config["model"], source, model_overrides)
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
    return model, tokenizer, config


def loss_from_stored(loss: dict, source: str | Path = "checkpoint", state: dict | None = None) -> nn.Module:
    """The loss a checkpoint's stored ``loss`` config names, built through the loss registry
    (``sedsft.losses.build_loss``), never by instantiating a stored ``_target_``; ``state``
    (``loss_state``) loads what it prepared before training back into it."""
    from sedsft.losses import build_loss

    knobs = dict(loss)
    target = knobs.pop("_target_", None)
    if target != "sedsft.losses.build_loss" or "name" not in knobs:
        raise UnsafeCheckpointError(
            f"{source}: the stored loss config names _target_={target!r}; only sedsft.losses.build_loss "
            "with a registered loss name is built from a checkpoint"
        )
    loss_fn = build_loss(**knobs)
    if state is not None:
        missing, unexpected = loss_fn.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{source}: the checkpoint's loss state {sorted(state)} does not fit loss "
                f"{knobs['name']!r} (missing {missing}, unexpected {unexpected}); was it written "
                "by another version of that loss?"
            )
    return loss_fn


def loss_state(checkpoint: dict) -> dict:
    """The loss's own state in a Lightning checkpoint (its buffers: what it measured before
    training), keys relative to the loss module."""
    return {k[len(LOSS_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(LOSS_PREFIX)}


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
    """The ``sedsft.json`` of an export (loss and its state), or ``{}`` when absent."""
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
    """What an export records of the loss that trained it: its class and its state
    (``TokenLoss.export_meta``)."""
    if loss_fn is None:
        return {}
    return {"loss": type(loss_fn).__name__, **loss_fn.export_meta()}


def export_checkpoint(
    ckpt: str | Path, out: str | Path, merge: bool = True, dtype: str | None = None, model_overrides: dict | None = None
) -> Path:
    """Write the Hugging Face export of Lightning checkpoint ``ckpt`` (any layout
    ``load_checkpoint`` reads) into ``out``: the run config stored in the checkpoint rebuilds
    the model (``model_overrides`` change it, e.g. ``{"name_or_path": <local base>}``), the
    checkpoint's weights replace the base ones, the loss is rebuilt with its state for
    ``sedsft.json``; a LoRA model is merged (``merge``) or written as the adapter alone."""
    checkpoint = load_checkpoint(ckpt)
    lm, tokenizer, config = model_from_checkpoint(checkpoint, ckpt, model_overrides)
    if dtype is not None:
        from sedsft.models.hf import resolve_dtype

        lm.to(resolve_dtype(dtype))
    loss = loss_from_stored(config.get("loss") or {}, ckpt, state=loss_state(checkpoint))
    return save_hf(lm, tokenizer, out, meta=loss_meta(loss), merge=merge)
