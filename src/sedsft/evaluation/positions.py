"""Where SED's mask falls: per-kind statistics of a model's next-token distribution over
held-out toy solutions (teacher-forced).

Each token of a toy solution is a ``style`` position (the one free choice), a ``number``
position (fixed by the problem) or a ``text`` position (fixed by the chosen style's
template); see ``sedsft.data.toy_math.position_kinds``. For each kind this module reports
the mean top-k mass ``c_k`` of the model's distribution before the token, the rate
``1[c_k < tau]`` at which SED would regularise it, the probability of the written token,
and whether it is the model's top choice. The comparison it serves: the mask should fall
on free positions and leave determined ones alone, and a loss that regularises every
position (``sed_nomask``) should pay for it at the determined positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sedsft.data.toy_math import POSITION_KINDS, position_kinds
from sedsft.losses.sed.calibration import tau_from_topk_mass


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


@torch.no_grad()
def token_statistics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    top_k: int,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per labelled token of ``rows`` (``{"question", "response"}``): ``kind`` (index into
    ``POSITION_KINDS``), ``topk_mass`` (c_k of the prediction of that token), ``p_target``
    and ``top1`` (1 when the token is the argmax). 1-D tensors of equal length."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_with_kinds(tokenizer, r["question"], r["response"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[torch.Tensor]] = {"kind": [], "topk_mass": [], "p_target": [], "top1": []}
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
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target, kind = ids[:, 1:], kinds[:, 1:]
        keep = kind >= 0
        logp, target = logp[keep], target[keep]
        out["kind"].append(kind[keep])
        out["topk_mass"].append(logp.topk(min(top_k, logp.shape[-1]), dim=-1).values.exp().sum(-1))
        out["p_target"].append(logp.gather(1, target.unsqueeze(1)).squeeze(1).exp())
        out["top1"].append((logp.argmax(-1) == target).float())
    return {name: torch.cat(parts) for name, parts in out.items()}


def summarize(stats: Mapping[str, torch.Tensor], tau: float | None, prefix: str = "") -> dict[str, float]:
    """Means per kind: ``<prefix>count/<kind>``, ``topk_mass``, ``p_target``, ``top1_acc`` and,
    given ``tau``, ``mask_rate`` (the fraction with ``c_k < tau``)."""
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
        if tau is not None:
            out[f"{prefix}mask_rate/{kind}"] = float((stats["topk_mass"][sel] < tau).float().mean())
    return out


def position_report(
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    tuned: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    rows: Sequence[Mapping[str, str]],
    top_k: int = 10,
    cumsum_ratio: float = 0.7,
    batch_size: int = 32,
    tau: float | None = None,
) -> dict[str, float]:
    """Per-kind statistics of the ``base`` model (before SFT) and the ``tuned`` one, with one
    ``tau``: the given one (a loss run with a fixed ``loss.tau``), else calibrated on the base
    as SED calibrates it (a fraction ``cumsum_ratio`` of the response positions at or above
    tau), so mask rates compare across models and losses.

    Keys: ``tau``, ``base/<stat>/<kind>``, ``sft/<stat>/<kind>``.
    """
    base_stats = token_statistics(*base, rows, top_k, batch_size)
    if tau is None:
        tau = tau_from_topk_mass(base_stats["topk_mass"], cumsum_ratio)
    tuned_stats = token_statistics(*tuned, rows, top_k, batch_size)
    return {"tau": tau, **summarize(base_stats, tau, "base/"), **summarize(tuned_stats, tau, "sft/")}
