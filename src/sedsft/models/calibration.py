"""Calibration of SED's threshold ``tau`` with the initial model (SPEC.md).

The model runs over the first ``calib_num_examples`` held-out examples; the top-k mass
``c_k`` is collected at target positions (or at every non-padding position, as the
release does) and ``tau`` is chosen so that a fraction ``cumsum_ratio`` of positions
lie at or above it. Every rank computes on the same examples (FSDP needs all ranks in
the forward) and rank 0's value is broadcast, so all ranks mask identically.
"""

from __future__ import annotations

import torch

from sedsft.data.chat import IGNORE_INDEX
from sedsft.losses.calibration import tau_from_topk_mass, topk_mass


@torch.no_grad()
def collect_topk_mass(module, batches, k: int, positions: str) -> torch.Tensor:
    """Top-``k`` mass at the chosen positions of ``batches`` (1-D float32, on CPU)."""
    if positions not in {"target", "all"}:
        raise ValueError(f"loss.calib_positions={positions!r}; allowed: target, all")
    values = []
    for batch in batches:
        batch = {key: tensor.to(module.device) for key, tensor in batch.items()}
        logits = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1]
        if positions == "target":
            keep = batch["labels"][:, 1:] != IGNORE_INDEX
        else:
            keep = batch["attention_mask"][:, 1:].bool()
        values.append(topk_mass(logits[keep], k).float().cpu())
    return torch.cat(values) if values else torch.empty(0)


def calibrate_tau(module, datamodule) -> tuple[float, float]:
    """Return ``(tau, mask_rate)`` for ``module.loss_fn``; mask rate is measured with
    the loss's own ``top_k`` on the calibration positions (it differs from
    ``1 - cumsum_ratio`` when calibration uses another k, as in the release)."""
    loss = module.loss_fn
    split = "val" if "val" in datamodule.splits else "train"
    dataset = datamodule.splits[split].dataset
    count = min(loss.calib_num_examples, len(dataset))
    subset = dataset.select(range(count)).select_columns(["input_ids", "labels"])
    loader = torch.utils.data.DataLoader(subset, batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collator)
    calib_k = loss.calib_top_k or loss.top_k
    was_training = module.training
    module.eval()
    try:
        batches = list(loader)
        masses = collect_topk_mass(module, batches, calib_k, loss.calib_positions)
        tau = tau_from_topk_mass(masses, loss.cumsum_ratio)
        if calib_k != loss.top_k:
            masses = collect_topk_mass(module, batches, loss.top_k, loss.calib_positions)
    finally:
        module.train(was_training)
    tau = float(module.trainer.strategy.broadcast(torch.tensor(tau), src=0))
    mask_rate = float((masses < tau).float().mean()) if masses.numel() else 0.0
    return tau, mask_rate
