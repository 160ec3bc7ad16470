"""``SFTModule``: a Hugging Face causal LM trained with a pluggable token-level loss.

Loss normalisation follows the paper, on every strategy (single device, DDP, FSDP,
DeepSpeed ZeRO-2/3): the loss of an optimiser step is the *sum* over the target tokens of
every micro-batch of the accumulation window (on every rank), divided by the number of
those tokens. Each micro-batch back-propagates its token sum; ``on_before_optimizer_step``
at the window's end (after its last backward, before clipping) all-reduces the window's
token count and rescales the gradients where the strategy keeps them, undoing what
Lightning and the strategy divided them by (``sedsft.sft.strategies.gradient_divisor``).
This is exact for micro-batches of unequal size and needs no look-ahead into the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sedsft.losses.base import Preparation, TokenLoss
from sedsft.models.hf import CausalLMSpec
from sedsft.sft import logging as runlog
from sedsft.sft.callbacks.final_validation import ValidateAtEnd
from sedsft.sft.strategies import (
    ends_accumulation,
    gradient_divisor,
    owns_gradients,
    scale_gradients,
    shards_lm_head,
)

log = logging.getLogger(__name__)

HISTOGRAM_SAMPLE = 200_000  # target positions kept per validation epoch for histograms


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM with a loss from ``sedsft.losses``.

    Args:
        lm: what to load (``CausalLMSpec``); weights are built in ``configure_model``.
        loss: a loss from ``sedsft.losses.build_loss``; what it prepares before training
            (``TokenLoss.prepare``) lives in its buffers, so checkpoints carry it.
        optimizer: partial optimiser, finished with the model's parameters.
        scheduler: partial schedule ``f(optimizer, num_training_steps)``, or None.
        tokenizer: saved with checkpoints and exports so they describe themselves.
        fused_loss: ``auto`` uses the hidden-state + LM-head path (no full logits) when
            the model and strategy allow it; ``true`` requires it; ``false`` never.
        weight_decay_1d: apply weight decay to biases and norm weights too.
        nonfinite: what a non-finite loss or gradient does: ``stop`` raises with the
            step, batch, data rows and loss parts; ``skip`` drops that micro-batch (loss)
            or optimiser step (gradients), counts it in ``train/skipped_nonfinite``, and
            stops once more than ``max_nonfinite_skips`` were skipped.
        max_nonfinite_skips: cap for ``skip``.
    """

    def __init__(
        self,
        lm: CausalLMSpec,
        loss: TokenLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        fused_loss: str | bool = "auto",
        weight_decay_1d: bool = False,
        nonfinite: str = "stop",
        max_nonfinite_skips: int = 10,
    ):
        super().__init__()
        if str(fused_loss).lower() not in {"auto", "true", "false"}:
            raise ValueError(f"module.fused_loss={fused_loss!r}; allowed: auto, true, false")
        self.lm_spec = lm
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = tokenizer
        if nonfinite not in {"stop", "skip"}:
            raise ValueError(f"module.nonfinite={nonfinite!r}; allowed: stop, skip")
        self.fused_loss = str(fused_loss).lower()
        self.nonfinite = nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0
        self.weight_decay_1d = weight_decay_1d
        self.model: nn.Module | None = None
        self.run_config: dict | None = None  # set by train.py; stored in checkpoints
        # Scalars measured outside Lightning's loops (the loss's preparation), for metrics.json.
        self.run_metrics: dict[str, float] = {}
        self._window_tokens = 0
        self._histogram_values: dict[str, list[torch.Tensor]] = {}
        # Token-weighted running means of the evaluation splits (training logs per step).
        self.means = nn.ModuleDict({split: nn.ModuleDict() for split in ("val", "test")})

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is None:
            # from_pretrained returns the model in eval mode (dropout off); Lightning keeps
            # whatever mode it finds, so switch to training mode here.
            self.model = self.lm_spec.load_model().train()
            self._check_config_against_model()

    def _check_config_against_model(self) -> None:
        """Start-up checks that need the model, so that they fail before the first step."""
        head = self.model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or getattr(self.model.config, "vocab_size", None)
        if vocab is not None:
            self.loss_fn.check_model(int(vocab), self.lm_spec.name_or_path)
        self.use_fused()  # raises when module.fused_loss=true cannot be honoured

    def fused_path_available(self) -> tuple[bool, str]:
        """Whether hidden states + LM head can replace full logits, and why not."""
        head = self.model.get_output_embeddings()
        config = self.model.config
        if not isinstance(head, nn.Linear):
            return False, "the model has no separate linear LM head"
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            return False, "the model transforms its logits after the LM head"
        strategy = self._trainer.strategy if self._trainer is not None else None
        if shards_lm_head(strategy):
            return False, "the LM head weight is sharded by the strategy"
        return True, ""

    def use_fused(self) -> bool:
        if self.fused_loss == "false":
            return False
        available, why = self.fused_path_available()
        if self.fused_loss == "true" and not available:
            raise ValueError(f"module.fused_loss=true but {why}; allowed here: module.fused_loss=auto or false")
        return available

    def model_step(
        self,
        batch: dict[str, torch.Tensor],
        token_stats: bool = False,
        labels: torch.Tensor | None = None,
        loss_fn: nn.Module | None = None,
    ):
        """Forward + loss for one micro-batch; shared by train / val / test and by a loss
        preparing itself (``TokenLoss.prepare``: its own ``labels`` [B, T], a probe ``loss_fn``).

        Labels are shifted here, once: position ``t`` predicts token ``t + 1``.
        """
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        labels = (batch["labels"] if labels is None else labels)[:, 1:]
        batch = {k: v.to(self.device) for k, v in batch.items()} if batch["input_ids"].device != self.device else batch
        labels = labels.to(self.device)
        # Packed rows (data.packing) carry position_ids and no attention mask: the model then
        # keeps attention inside each example, but only without a KV cache, hence use_cache.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self.use_fused():
            hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]
            head = self.model.get_output_embeddings()
            return loss_fn.fused(
                hidden, head.weight, labels, bias=head.bias, return_token_stats=token_stats
            )
        logits = self.model(**inputs, use_cache=False).logits[:, :-1]
        return loss_fn(logits, labels, return_token_stats=token_stats)

    # ------------------------------------------------------------------ logging
    def _log_means(self, split: str, out, **kwargs: Any) -> None:
        weight = max(out.num_tokens, 1)
        values = {"loss": out.loss.detach(), **out.metrics}
        for name, value in values.items():
            if name not in self.means[split]:
                self.means[split][name] = MeanMetric().to(self.device)
            self.means[split][name].update(value.float(), weight=weight)
        means = {name: self.means[split][name] for name in values}
        runlog.log_metrics(self, split, means, metric_attribute=f"means.{split}.{{name}}", **kwargs)

    # ------------------------------------------------------------------ training
    def _nonfinite(self, what: str, batch_idx: int, rows: torch.Tensor | None, parts: dict) -> None:
        """Apply the non-finite policy: raise, or count a skip (raising past the cap)."""
        described = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}
        message = (
            f"non-finite {what} at global step {self.global_step} (batch {batch_idx}, "
            f"data rows {None if rows is None else rows.tolist()}); loss parts {described}"
        )
        if self.nonfinite == "stop":
            raise FloatingPointError(message + "; set module.nonfinite=skip to skip such steps")
        self.nonfinite_skips += 1
        log.warning("skipping: %s", message)
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise FloatingPointError(
                f"{self.nonfinite_skips} non-finite steps skipped, more than "
                f"module.max_nonfinite_skips={self.max_nonfinite_skips}; last: {message}"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        out = self.model_step(batch)
        if not torch.isfinite(out.loss_sum.detach()):
            self._nonfinite("loss", batch_idx, batch.get("rows"), {"loss": out.loss, **out.metrics})
            return None  # Lightning skips backward for this micro-batch
        self._last_batch = (batch_idx, batch.get("rows"))
        batch_size = batch["input_ids"].shape[0]
        step_values = {"loss": out.loss.detach(), **out.metrics}
        runlog.log_metrics(self, "train", step_values, on_step=True, on_epoch=False, batch_size=batch_size)
        runlog.log_metrics(
            self, "train", {"target_tokens": float(out.num_tokens)}, on_step=True, on_epoch=False, reduce_fx="sum", batch_size=batch_size
        )
        self._window_tokens += out.num_tokens
        return out.loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        strategy = self.trainer.strategy
        if not ends_accumulation(strategy):
            return  # DeepSpeed: a micro-batch inside the window, its gradients still accumulating
        local = torch.tensor(float(self._window_tokens), device=self.device)
        total = strategy.reduce(local, reduce_op="sum")
        self._window_tokens = 0
        # Undo what Lightning and the strategy divided the token sums by, then divide by the tokens.
        scale = gradient_divisor(self.trainer) / total.clamp(min=1.0)
        grads = scale_gradients(strategy, optimizer, scale)
        if not owns_gradients(strategy):  # under DeepSpeed, dropping .grad cannot skip the engine's step
            self._check_gradients(optimizer, grads)

    def _check_gradients(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
        # One fused 2-norm (16x cheaper than the inf-norm on the CPU), one host sync: it is
        # non-finite iff an entry is, or the squares overflow, which clipping would meet too.
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else None
        local_bad = torch.zeros((), device=self.device) if norm is None else (~norm.isfinite()).float()
        # Sharded strategies hold different gradient shards per rank: agree on the verdict.
        if self.trainer.strategy.reduce(local_bad, reduce_op="sum") > 0:
            batch_idx, rows = getattr(self, "_last_batch", (None, None))
            self._nonfinite("gradient", batch_idx, rows, {})
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # optimisers skip parameters without gradients
        runlog.log_metrics(self, "train", {"skipped_nonfinite": float(self.nonfinite_skips)}, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        out = self.model_step(batch, token_stats=split == "val")
        self._log_means(split, out, on_step=False, on_epoch=True)
        if out.token_stats:
            for name, values in out.token_stats.items():
                self._histogram_values.setdefault(name, []).append(values.detach().float().cpu())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        values, self._histogram_values = self._histogram_values, {}
        if self.trainer.sanity_checking:
            return
        for name, chunks in values.items():
            runlog.log_histogram(self.trainer, runlog.histogram_key("val", name), torch.cat(chunks)[:HISTOGRAM_SAMPLE])

    # ------------------------------------------------------------------ loss preparation
    def on_fit_start(self) -> None:
        # A resumed run takes the loss's prepared state from its checkpoint; strategies that
        # restore after this hook (DeepSpeed) have not loaded it yet, so the checkpoint path decides.
        if self.loss_fn.needs_preparation and not self.trainer.ckpt_path:
            prep = Preparation(
                step=self.model_step,
                heldout=self.trainer.datamodule.heldout_dataloader,
                broadcast=self.trainer.strategy.broadcast,
            )
            was_training = self.training
            self.eval()
            try:
                values = self.loss_fn.prepare(prep)
            finally:
                self.train(was_training)
            # self.log is not available in on_fit_start: straight to the loggers, and kept
            # for the run's metrics.json.
            runlog.log_scalars(self.trainer, values)
            self.run_metrics.update(values)

    # ------------------------------------------------------------------ callbacks
    def configure_callbacks(self) -> list[L.Callback]:
        # A run validates (and evaluates generations) at its last step however it stops:
        # max_steps, max_time, epochs (ValidateAtEnd).
        return [ValidateAtEnd()]

    # ------------------------------------------------------------------ resuming
    def on_train_start(self) -> None:
        # The schedule's estimated_stepping_batches makes Lightning build the train loader
        # before a resumed run's loop state is restored, and the loader's saved position is
        # then never handed to it (Lightning issue #20550): the run would restart the epoch.
        # Hand it over here, before the first batch is drawn.
        fit_loop = self.trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.trainer.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 or self.weight_decay_1d else no_decay).append(param)
        optimizer = self.optimizer_factory(
            params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sedsft"] = {
            "config": self.run_config,
            "chat_template": getattr(self.tokenizer, "chat_template", None),
            "nonfinite_skips": self.nonfinite_skips,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skips = checkpoint.get("sedsft", {}).get("nonfinite_skips", 0)

