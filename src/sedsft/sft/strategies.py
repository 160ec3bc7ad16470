"""Lightning's FSDP / DeepSpeed strategies for Hugging Face models, configured from YAML.

What a YAML file cannot say directly is a Python class. FSDP wraps (and checkpoints) the
model one decoder layer at a time, so its policy here names the layer class by *name*
(``LlamaDecoderLayer``, ``Qwen2DecoderLayer``), or ``auto``: the classes a Hugging Face
model lists in ``_no_split_modules``. Names are resolved when FSDP wraps the built model,
so one config serves every architecture and nothing is imported by hand.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import _Policy

from sedsft.models.compile import decoder_layer_names, decoder_layers

log = logging.getLogger(__name__)


class DecoderLayerPolicy(_Policy):
    """FSDP wrap / activation-checkpointing policy: every module whose class *name* is in
    ``layer_cls`` (``"auto"``: the model's ``_no_split_modules``) becomes a unit.

    Args:
        layer_cls: ``auto`` or class names, e.g. ``[LlamaDecoderLayer, Qwen2DecoderLayer]``.
        skip_if_checkpointed: for activation checkpointing: leave the layers alone when the
            model already recomputes them (``model.gradient_checkpointing=true``), so no
            layer is recomputed twice.
    """

    def __init__(self, layer_cls: str | Sequence[str] = "auto", skip_if_checkpointed: bool = False):
        self.layer_cls = layer_cls if isinstance(layer_cls, str) else list(layer_cls)
        self.skip_if_checkpointed = skip_if_checkpointed

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        if self.skip_if_checkpointed and any(
            getattr(m, "gradient_checkpointing", False) for m in root_module.modules()
        ):
            log.info("decoder layers are already checkpointed by the model; FSDP adds no second checkpoint")
            return {}
        layers = [m for m in decoder_layers(root_module, self.layer_cls) if m not in ignored_modules]
        if not layers:
            raise ValueError(
                f"FSDP layer_cls={self.layer_cls!r} matches no module of the model (its decoder "
                f"layers are {sorted(decoder_layer_names(root_module)) or 'unknown'}); set "
                "trainer.strategy.layer_cls to the decoder layer class name, e.g. [LlamaDecoderLayer]"
            )
        return {m: copy.copy(root_kwargs) for m in layers}


class _NormClippingFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` whose ``clip_grad_by_norm`` works: the global norm of sharded
    gradients needs the root FSDP module (``FullyShardedDataParallel.clip_grad_norm_``),
    which Lightning's own plugin has no reference to (it raises instead)."""

    def __init__(self, precision: Any, strategy: FSDPStrategy):
        super().__init__(precision)
        self.strategy = strategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        self.strategy.model.clip_grad_norm_(clip_val)


class ClippingFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with ``trainer.gradient_clip_val`` (clip by norm) supported."""

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = _NormClippingFSDPPrecision(plugin.precision, self)
        FSDPStrategy.precision_plugin.fset(self, plugin)


def fsdp_strategy(
    layer_cls: str | Sequence[str] = "auto",
    activation_checkpointing: bool = True,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` sharding the model decoder layer by decoder layer (with
    gradient clipping by norm, see ``ClippingFSDPStrategy``).

    Args:
        layer_cls: decoder layer class names (or ``auto``): FSDP units and checkpoint units.
        activation_checkpointing: recompute each decoder layer in backward (skipped for a
            model that already does it through ``model.gradient_checkpointing``).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3 like), ``SHARD_GRAD_OP`` (ZeRO-2 like),
            ``HYBRID_SHARD`` (shard inside a node, replicate across nodes), ``NO_SHARD``.
        state_dict_type: ``sharded`` (a checkpoint directory, one file per rank; fast) or
            ``full`` (one file gathered on rank 0).
        cpu_offload: keep parameters and gradients in CPU memory between uses.
        kwargs: other ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """
    return ClippingFSDPStrategy(
        auto_wrap_policy=DecoderLayerPolicy(layer_cls),
        activation_checkpointing_policy=(
            DecoderLayerPolicy(layer_cls, skip_if_checkpointed=True) if activation_checkpointing else None
        ),
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        **kwargs,
    )


DEEPSPEED_MISSING = (
    "trainer={name} needs DeepSpeed, an optional extra that is not installed: "
    "pip install 'sedsft[deepspeed]' (needs CUDA and a compiler), or train with trainer=fsdp"
)


class HFDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``; under ZeRO-3 the Hugging Face weights are loaded
    straight into partitions: ``from_pretrained`` sees the DeepSpeed config (through
    ``HfDeepSpeedConfig``) and gathers one parameter at a time, instead of loading into the
    empty shards that Lightning's own ``zero.Init`` context would give it."""

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        if not self.zero_stage_3:
            with super().model_sharded_context():
                yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._init_config_if_needed()
        # transformers keeps only a weak reference: hold the object for the strategy's life.
        self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        yield


def deepspeed_strategy(stage: int = 2, **kwargs: Any) -> DeepSpeedStrategy:
    """``HFDeepSpeedStrategy(stage=..., **kwargs)``, or an install hint without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(DEEPSPEED_MISSING.format(name=f"deepspeed_zero{stage}"))
    return HFDeepSpeedStrategy(stage=stage, **kwargs)


# -- what the rest of the SFT stage needs to know about a strategy: asked here, in one place --
def shards_lm_head(strategy: Strategy | None) -> bool:
    """Whether the LM head weight is split across ranks (FSDP, ZeRO-3): the fused loss path
    multiplies by the whole weight, so it needs it unsharded."""
    return isinstance(strategy, FSDPStrategy) or (
        isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    )


def owns_gradients(strategy: Strategy | None) -> bool:
    """Whether the strategy keeps gradients inside its own engine (DeepSpeed): its optimiser
    steps on its own copies, so dropping a parameter's ``.grad`` cannot skip a step."""
    return isinstance(strategy, DeepSpeedStrategy)


def gradient_divisor(trainer: Trainer) -> int:
    """What a training step's returned loss is divided by on its way into the gradients the
    optimiser step sees, so that ``SFTModule`` can undo it exactly.

    * Lightning divides every micro-batch loss by ``accumulate_grad_batches`` on every
      strategy (``lightning/pytorch/loops/optimization/automatic.py``, ``closure_loss /
      normalize``, with ``normalize=trainer.accumulate_grad_batches``).
    * DeepSpeed's ``engine.backward`` divides it once more by its own
      ``gradient_accumulation_steps()`` (``scale_wrt_gas=True`` by default; Lightning's
      ``DeepSpeedPrecision.backward`` passes nothing else), which Lightning sets to the same
      ``accumulate_grad_batches``: under DeepSpeed the loss is divided by the square.
    * Data-parallel reductions (DDP, FSDP, ZeRO) average the gradients over the ranks.
    """
    divisor = trainer.accumulate_grad_batches * trainer.world_size
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        divisor *= trainer.strategy.deepspeed_engine.gradient_accumulation_steps()
    return divisor


def ends_accumulation(strategy: Strategy | None) -> bool:
    """Whether the optimiser step that ``on_before_optimizer_step`` precedes really updates
    the weights. Lightning calls the hook once per accumulation window, except under
    DeepSpeed, where it calls it after every micro-batch and the engine decides which of its
    ``step()`` calls are accumulation boundaries."""
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.deepspeed_engine.is_gradient_accumulation_boundary()
    return True


def scale_gradients(strategy: Strategy | None, optimizer: Any, scale: float | Tensor) -> list[Tensor]:
    """Multiply the gradients the coming optimiser step will apply by ``scale``, where the
    strategy keeps them, and return the tensors scaled (this rank's share).

    Outside DeepSpeed they are the parameters' ``.grad``. DeepSpeed keeps them in its
    optimiser after the window's last backward: ZeRO-3 in this rank's gradient partition
    (``safe_get_local_grad`` / ``safe_set_local_grad``), ZeRO-1/2 and the bf16 optimiser in
    the fragment of the reduced gradient this rank owns (the tensor that DeepSpeed's
    ``safe_set_full_grad`` writes into, reached without its all-reduce). Every rank scales
    its own share by the same factor, so the whole gradient is scaled once.
    """
    if not owns_gradients(strategy):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)  # one call over all gradients, not one op per tensor
        return grads
    scaled = []
    for param in strategy.lightning_module.parameters():
        if not param.requires_grad:
            continue
        # In the order of DeepSpeed's safe_get_full_grad: where each optimiser keeps the gradient.
        if getattr(param, "_hp_grad", None) is not None:  # the bf16 optimiser
            grad = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group).mul_(scale)
        elif param.grad is not None:  # not partitioned (ZeRO-1 before its step)
            grad = param.grad.mul_(scale)
        elif hasattr(param, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            grad = safe_get_local_grad(param)
            if grad is None:
                continue
            grad = grad * scale
            safe_set_local_grad(param, grad)
        elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2: this rank's fragment
            grad = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group).mul_(scale)
        elif hasattr(param, "_hp_mapping"):
            continue  # ZeRO-1/2: another rank owns this parameter's partition
        else:
            raise RuntimeError(
                f"cannot reach the gradient of a parameter of shape {tuple(param.shape)} inside the DeepSpeed "
                f"optimizer {type(strategy.deepspeed_engine.optimizer).__name__}, so the loss cannot be normalised by "
                "the accumulated batch's target tokens; train with trainer=deepspeed_zero2 or deepspeed_zero3 (or fsdp)"
            )
        scaled.append(grad)
    return scaled


def full_state_dict(trainer: Trainer) -> dict:
    """The module's full (unsharded) state dict on rank 0; every rank must call it.

    FSDP gathers shards whatever ``state_dict_type`` checkpoints use; ZeRO-3 gathers the
    partitioned parameters; other strategies hold full weights already.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
            return strategy.model.state_dict()
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        module = strategy.lightning_module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if not strategy.is_global_zero:
                return {}
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return strategy.lightning_module_state_dict()
