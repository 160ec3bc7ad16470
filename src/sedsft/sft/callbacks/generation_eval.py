"""Diversity and accuracy of sampled completions, measured during training."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import hydra
import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn

from sedsft.evaluation.evaluate import score_samples
from sedsft.evaluation.sampling import Samples, SamplingSettings, iter_samples, merge_samples
from sedsft.sft import logging as runlog
from sedsft.sft.callbacks.final_validation import training_ends_here

log = logging.getLogger(__name__)


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class GenerationEval(L.Callback):
    """Every ``every_n_val_epochs`` validations, and at the validation that ends training,
    sample ``sampling.num_samples`` completions for ``num_prompts`` held-out prompts and log ``gen/*``:
    distinct-1..4, self-BLEU, sampled token entropy, pass@1, pass@k, avg@k; plus a text
    panel with a few prompts.

    Prompts are split across ranks and the samples gathered, so the numbers are those of
    the whole prompt set. The model is sampled in eval mode, without gradients.

    Args:
        every_n_val_epochs: run on every n-th validation (1: every validation); the
            validation at the end of training always runs it.
        num_prompts: held-out prompts sampled (the first ones of the validation split).
        sampling: the config's ``sampling:`` block (or the settings themselves), read whole
            into ``SamplingSettings``: completions per prompt (the k of pass@k and avg@k),
            generation budget, temperature, top-p, prompts per ``generate`` call and the seed
            (1234 when absent; the same on every evaluation, so successive evaluations differ
            only by the model; each rank adds its rank).
        log_prompts: prompts shown (with all their samples) in the TensorBoard text panel.
        sample_classifier: dotted path of a function text -> label (e.g.
            ``sedsft.data.toy_math.classify_style``); adds gen/label_entropy,
            gen/labels_per_prompt and gen/label_frac/<label>. The config takes the data
            set's own (``data.sample_classifier``), so toy math logs its styles by default.
    """

    def __init__(
        self,
        every_n_val_epochs: int = 1,
        num_prompts: int = 32,
        sampling: Mapping[str, Any] | SamplingSettings | None = None,
        log_prompts: int = 3,
        sample_classifier: str | None = None,
    ):
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.every_n_val_epochs, self.num_prompts, self.log_prompts = every_n_val_epochs, num_prompts, log_prompts
        if not isinstance(sampling, SamplingSettings):
            block = {"max_new_tokens": 128, "seed": 1234, **(sampling or {})}
            sampling = SamplingSettings.from_config(block, where="callbacks.generation_eval.sampling")
        self.sampling = sampling
        self.classify = hydra.utils.get_method(sample_classifier) if sample_classifier else None
        self._validations = 0
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        final = trainer.state.fn == TrainerFn.FITTING and training_ends_here(trainer)
        if self._validations % self.every_n_val_epochs and not final:
            return
        prompts = trainer.datamodule.prompts("val", limit=self.num_prompts)
        mine = prompts[trainer.global_rank :: trainer.world_size]
        # Same seed on every evaluation: sample differences come from the model only.
        seed = self.sampling.seed
        settings = replace(self.sampling, seed=None if seed is None else seed + trainer.global_rank)
        with torch.random.fork_rng(devices=[] if pl_module.device.type == "cpu" else [pl_module.device]):
            done = dict(iter_samples(pl_module.model, pl_module.tokenizer, [p for p, _ in mine], settings))
        # every rank's (prompt, its samples); the entropy is pooled over all sampled positions
        pairs = [pair for part in _gather([(prompt, done[i]) for i, prompt in enumerate(mine)]) for pair in part]
        all_prompts = [prompt for prompt, _ in pairs]
        merged = merge_samples([samples for _, samples in pairs])
        metrics, correct = score_samples(merged, [gold for _, gold in all_prompts], self.sampling.num_samples, self.classify)
        self.last_metrics = metrics
        runlog.log_metrics(pl_module, "gen", metrics, prog_bar=(), rank_zero_only=True)
        if trainer.is_global_zero:
            runlog.log_text(trainer, runlog.SAMPLES_TEXT, self._panel(all_prompts, merged, correct))

    def _panel(self, prompts, samples: Samples, correct) -> str:
        lines = []
        for (prompt, gold), group, marks in list(zip(prompts, samples.texts, correct, strict=True))[: self.log_prompts]:
            lines.append(f"**prompt:** {prompt[-1]['content']}  \n**gold:** {gold}\n")
            lines += [f"{j}. {'✓' if ok else '✗' if ok is not None else ''} `{text}`" for j, (text, ok) in enumerate(zip(group, marks, strict=True))]
            lines.append("")
        return "\n".join(lines)
