"""Decoder layers of a Hugging Face model, and per-layer ``torch.compile``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def decoder_layer_names(root: nn.Module) -> set[str]:
    """Class names of the decoder layers of every Hugging Face model inside ``root``
    (``_no_split_modules``: the blocks that must not be split across devices)."""
    names: set[str] = set()
    for module in root.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or [])
    return names


def decoder_layers(root: nn.Module, layer_cls: str | Sequence[str] = "auto") -> list[nn.Module]:
    """Modules of ``root`` whose class name is in ``layer_cls`` (``auto``: see above)."""
    names = decoder_layer_names(root) if layer_cls == "auto" else {layer_cls} if isinstance(layer_cls, str) else set(layer_cls)
    return [m for m in root.modules() if type(m).__name__ in names]


def compile_decoder_layers(model: nn.Module, options: bool | dict | None) -> nn.Module:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``).

    Per layer rather than the whole model: parameter names, ``save_pretrained``, the fused
    loss path (which calls the decoder directly), FSDP units and checkpoint wrappers all
    keep working, and the compiled graph is one small layer, reused by every layer.
    ``options``: ``true`` or a dict of ``torch.compile`` arguments (e.g. ``{mode: max-autotune}``).
    """
    if not options:
        return model
    kwargs = dict(options) if isinstance(options, dict) else {}
    layers = decoder_layers(model)
    for layer in layers or [model]:
        layer.compile(**kwargs)
    log.info("torch.compile on %d %s module(s)", len(layers) or 1, type((layers or [model])[0]).__name__)
    return model
