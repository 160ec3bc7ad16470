"""Padding-free batching: a micro-batch of examples packed end to end into one row.

Instead of padding ``B`` examples to the longest, the collator concatenates them into a
single ``[1, sum of lengths]`` row and restarts ``position_ids`` at 0 for every example.
Transformers reads the restarts as example boundaries when no attention mask is given
(and no KV cache is in use): ``sdpa`` and ``eager`` build a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``; a dense ``T x T`` mask, so the fused
flash kernel is not used), ``flash_attention_2`` runs its variable-length kernel from the
same ``position_ids``. Either way no token attends across examples and rotary positions
are those of the unpacked example, so the loss equals the padded batch's.

Labels never cross a boundary: after the model step's shift, the last position of an
example would predict the first token of the next one, so that token's label is -100.
(Chat examples begin with prompt tokens, which are -100 already; this makes it a rule.)
The micro-batch keeps its examples, so the number of optimiser steps and the token
normalisation are unchanged: packing only removes padding work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sedsft.data.chat import IGNORE_INDEX


class PackingCollator:
    """Packs rows ``{"input_ids", "labels"[, "row"]}`` into one row without padding.

    Returns ``input_ids`` / ``labels`` / ``position_ids`` as ``[1, T]`` int64 tensors with
    ``T`` the total length, no ``attention_mask`` (its absence is what tells the model to
    read boundaries from ``position_ids``), and ``rows`` ``[B]`` when rows carry their
    source row number.
    """

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for row in rows:
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            lab = torch.as_tensor(row["labels"], dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX  # predicted from the previous example's last position
            input_ids.append(ids)
            labels.append(lab)
            positions.append(torch.arange(len(ids), dtype=torch.long))
        batch = {
            "input_ids": torch.cat(input_ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
        }
        if all("row" in r for r in rows):
            batch["rows"] = torch.tensor([r["row"] for r in rows], dtype=torch.long)
        return batch

