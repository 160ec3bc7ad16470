"""Where SED's mask falls: per-kind statistics of a model's next-token distribution over
held-out toy solutions (teacher-forced).

Each token of a toy solution is a ``style`` position (the one free choice), a ``number``
position (fixed by the problem) or a ``text`` position (fixed by the chosen style's
template); see ``sedsft.data.toy_math.position_kinds``. For each kind this module reports
the mean top-k mass ``c_k`` of the model's distribution before the token, the rate at
which SED's mask would regularise it, the probability of the written token, and whether it
is the model's top choice. The comparison it serves: the mask should fall on free positions
and leave determined ones alone, and a loss that regularises every position
(``sed_nomask``) should pay for it at the determined positions.

The mask and its calibration are the loss's own (``SEDLoss.mask``, ``SEDLoss.calibrate``),
asked of one ``SEDLoss`` for every run (``report_loss``), so rates compare across losses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sedsft.data.toy_math import POSITION_KINDS, position_kinds
from sedsft.losses import build_loss
from sedsft.losses.sed import SEDLoss, topk_mass


def encode_with_kinds(
    tokenizer: PreTrainedTokenizerBase, question: str, response: str
) -> tuple[list[int], list[str | None]]:
    """Token ids of the chat ``[user: question, assistant: response]`` as the chat template
    renders it, and the kind of each token (None outside the response)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": response}], tokenize=False
    )
    start = text.rfind(response)
    if start < 0:
        raise ValueError(f"the chat template does not write the reply verbatim: {response!r} not in {text!r}")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), position_kinds(response, enc["offset_mapping"], start)


def report_loss(run_loss: Mapping, top_k: int = 10, cumsum_ratio: float = 0.7) -> SEDLoss:
    """The SED loss whose mask the report measures: the report's ``top_k`` and
    ``cumsum_ratio`` for every run, at the SFT loss's own fixed threshold when it has one
    (``loss=sed loss.tau=0.98``), else still to be calibrated on the base.

    ``run_loss``: the SFT run's loss config (``_target_``, ``name`` and knobs).
    """
    own = build_loss(**{k: v for k, v in run_loss.items() if k != "_target_"})
    fixed = isinstance(own, SEDLoss) and not own.needs_calibration
    return SEDLoss(top_k=top_k, cumsum_ratio=cumsum_ratio, tau=float(own.tau) if fixed else None)


@torch.no_grad()
def _labelled_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of ``rows`` (``{"question", "response"}``): float32 logits [n, V] that
    predict the n response tokens, those tokens [n] and their kinds [n] (index into
    ``POSITION_KINDS``)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_with_kinds(tokenizer, r["question"], r["response"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        kinds = torch.full((len(chunk), length), -1, dtype=torch.long)
        for i, (row_ids, row_kinds) in enumerate(chunk):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            attention[i, : len(row_ids)] = 1
            kinds[i, : len(row_kinds)] = torch.tensor([-1 if k is None else POSITION_KINDS.index(k) for k in row_kinds])
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
        # the token at t is predicted from the logits at t - 1
        target, kind = ids[:, 1:], kinds[:, 1:]
        keep = kind >= 0
        yield logits[:, :-1][keep], target[keep], kind[keep]


def calibrate(
    loss: SEDLoss,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    batch_size: int = 32,
) -> float:
    """Set ``loss.tau`` as SED calibrates it, on ``model``'s response positions of ``rows``."""
    masses = [topk_mass(z, loss.calibration_top_k) for z, _, _ in _labelled_logits(model, tokenizer, rows, batch_size)]
    return loss.calibrate(torch.cat(masses))


def token_statistics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    loss: SEDLoss,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per labelled token of ``rows`` (``{"question", "response"}``): ``kind`` (index into
    ``POSITION_KINDS``), ``topk_mass`` (c_k at ``loss.top_k`` of the prediction of that
    token), ``masked`` (``loss``'s mask, when its tau is set), ``p_target`` and ``top1``
    (1 when the token is the argmax). 1-D tensors of equal length."""
    out: dict[str, list[torch.Tensor]] = {"kind": [], "topk_mass": [], "p_target": [], "top1": []}
    if not loss.needs_calibration:
        out["masked"] = []
    for z, target, kind in _labelled_logits(model, tokenizer, rows, batch_size):
        out["kind"].append(kind)
        out["topk_mass"].append(topk_mass(z, loss.top_k))
        if "masked" in out:
            out["masked"].append(loss.mask(z))
        out["p_target"].append(torch.log_softmax(z, -1).gather(1, target.unsqueeze(1)).squeeze(1).exp())
        out["top1"].append((z.argmax(-1) == target).float())
    return {name: torch.cat(parts) for name, parts in out.items()}


def summarize(stats: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Means per kind: ``<prefix>count/<kind>``, ``topk_mass``, ``p_target``, ``top1_acc`` and,
    when the statistics hold the loss's mask, ``mask_rate``."""
    out: dict[str, float] = {}
    for index, kind in enumerate(POSITION_KINDS):
        sel = stats["kind"] == index
        n = int(sel.sum())
        out[f"{prefix}count/{kind}"] = float(n)
        if n == 0:
            continue
        out[f"{prefix}topk_mass/{kind}"] = float(stats["topk_mass"][sel].mean())
        out[f"{prefix}p_target/{kind}"] = float(stats["p_target"][sel].mean())
        out[f"{prefix}top1_acc/{kind}"] = float(stats["top1"][sel].mean())
        if "masked" in stats:
            out[f"{prefix}mask_rate/{kind}"] = float(stats["masked"][sel].float().mean())
    return out


def position_report(
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    tuned: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    rows: Sequence[Mapping[str, str]],
    loss: SEDLoss,
    batch_size: int = 32,
) -> dict[str, float]:
    """Per-kind statistics of the ``base`` model (before SFT) and the ``tuned`` one under one
    mask, ``loss``'s (``report_loss``): at its ``tau`` when set, else calibrated on the
    base's response positions first, so mask rates compare across models and losses.

    Keys: ``tau``, ``base/<stat>/<kind>``, ``sft/<stat>/<kind>``.
    """
    if loss.needs_calibration:
        calibrate(loss, *base, rows, batch_size)
    base_stats = token_statistics(*base, rows, loss, batch_size)
    tuned_stats = token_statistics(*tuned, rows, loss, batch_size)
    return {"tau": float(loss.tau), **summarize(base_stats, "base/"), **summarize(tuned_stats, "sft/")}
