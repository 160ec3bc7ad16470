"""Per-process batch sizes and accumulation, derived from the paper's global quantities.

A paper preset states what the paper states, once, as global numbers (``batch.*``):

* SFT: ``batch.sequences_per_step`` (128) sequences per optimiser step;
* RL: ``batch.rollout_prompts`` (256) prompts per rollout batch and
  ``batch.prompts_per_update`` (32) prompts per optimiser update, each prompt sampled
  ``grpo.num_generations`` (8) times.

The micro-batch a device holds (``data.batch_size``, ``grpo.per_device_train_batch_size``)
is a memory choice and stays a knob; accumulation (and TRL's rollout size in completions)
follows from it and the world size of ``sedsft.utils.world`` at run time. When the world
size cannot meet a global number exactly the run is refused with the numbers and the
fixes, unless ``batch.allow_inexact=true``: then the nearest whole accumulation is used
and the run's first lines say what it trains with instead. With the ``batch.*`` numbers
null, the per-process knobs are used as given (the toy presets).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from sedsft.utils.world import World

log = logging.getLogger(__name__)


class BatchError(ValueError):
    """A global batch that the world size cannot meet; the message gives numbers and fixes."""


def _fix(total: int, micro: int, micro_knob: str) -> str:
    """How ``total`` items per step can be met in micro-batches of ``micro``: the process
    counts that divide it exactly, or else another micro-batch size."""
    counts = [d // micro for d in range(1, total + 1) if total % d == 0 and d % micro == 0]
    if counts:
        return f"run on a process count in {counts}"
    return f"set {micro_knob} to a divisor of {total} (no process count works with {micro})"


class _DerivedBatch:
    """A batch derived from a global number: ``exact`` when the run meets the number it was
    asked for (``_asked``, ``_met``); its description says so when it does not."""

    _unit = ""

    @property
    def exact(self) -> bool:
        return self._met == self._asked

    def describe(self) -> str:
        text = self._formula()
        return text if self.exact else f"{text}; NOT the requested {self._asked}{self._unit} (batch.allow_inexact=true)"


@dataclass(frozen=True)
class SFTBatch(_DerivedBatch):
    sequences_per_step: int  # what the preset asks for
    micro_batch: int  # sequences per device per micro-batch (data.batch_size)
    world: World
    accumulation: int  # derived trainer.accumulate_grad_batches

    @property
    def sequences(self) -> int:
        """Sequences per optimiser step the run trains with."""
        return self.micro_batch * self.world.size * self.accumulation

    _asked = property(lambda self: self.sequences_per_step)
    _met = property(lambda self: self.sequences)

    def _formula(self) -> str:
        return (
            f"batch: {self.sequences} sequences per optimiser step = data.batch_size={self.micro_batch} x "
            f"{self.world} x trainer.accumulate_grad_batches={self.accumulation} (derived from "
            f"batch.sequences_per_step={self.sequences_per_step})"
        )


def sft_batch(sequences_per_step: int, micro_batch: int, world: World, allow_inexact: bool = False) -> SFTBatch:
    """Accumulation giving ``sequences_per_step`` sequences per step on ``world``."""
    if sequences_per_step < 1 or micro_batch < 1:
        raise BatchError(
            f"batch.sequences_per_step={sequences_per_step} and data.batch_size={micro_batch} must be >= 1"
        )
    per_window = micro_batch * world.size  # sequences of one micro-step over all processes
    low = sequences_per_step // per_window
    if low * per_window == sequences_per_step:
        return SFTBatch(sequences_per_step, micro_batch, world, low)
    high = low + 1
    # The nearer of the two whole accumulations (ties: the larger batch); never zero.
    nearest = low if low and sequences_per_step - low * per_window < high * per_window - sequences_per_step else high
    if not allow_inexact:
        fix = _fix(sequences_per_step, micro_batch, "data.batch_size")
        raise BatchError(
            f"batch.sequences_per_step={sequences_per_step} cannot be met on {world}: one micro-step over all "
            f"processes is data.batch_size={micro_batch} x {world.size} = {per_window} sequences, and "
            f"{sequences_per_step} is not a multiple of it (accumulating {low} gives {low * per_window}, "
            f"{high} gives {high * per_window}). Fix: {fix}, or pass batch.allow_inexact=true "
            f"to train with {nearest * per_window} sequences per step"
        )
    return SFTBatch(sequences_per_step, micro_batch, world, nearest)


@dataclass(frozen=True)
class RLBatch(_DerivedBatch):
    rollout_prompts: int  # requested prompts per rollout batch
    prompts_per_update: int  # requested prompts per optimiser update
    num_generations: int  # completions per prompt
    per_device: int  # completions per micro-step per process
    world: World
    accumulation: int  # derived gradient_accumulation_steps

    @property
    def updates_per_rollout(self) -> int:
        return self.rollout_prompts // self.prompts_per_update

    @property
    def update_completions(self) -> int:
        return self.per_device * self.world.size * self.accumulation

    @property
    def update_prompts(self) -> int:
        return self.update_completions // self.num_generations

    @property
    def generation_batch_size(self) -> int:
        """Completions per rollout batch (TRL's ``generation_batch_size``)."""
        return self.update_completions * self.updates_per_rollout

    _asked = property(lambda self: self.prompts_per_update)
    _met = property(lambda self: self.update_prompts)
    _unit = " prompts per update"

    def _formula(self) -> str:
        return (
            f"batch: {self.generation_batch_size // self.num_generations} prompts x {self.num_generations} per rollout "
            f"batch, {self.updates_per_rollout} updates of {self.update_prompts} prompts = "
            f"grpo.per_device_train_batch_size={self.per_device} x {self.world} x "
            f"grpo.gradient_accumulation_steps={self.accumulation} completions (derived from "
            f"batch.rollout_prompts={self.rollout_prompts}, batch.prompts_per_update={self.prompts_per_update})"
        )


def rl_batch(
    rollout_prompts: int,
    prompts_per_update: int,
    num_generations: int,
    per_device: int,
    world: World,
    allow_inexact: bool = False,
) -> RLBatch:
    """Accumulation giving ``prompts_per_update`` prompts per update on ``world``."""
    if min(rollout_prompts, prompts_per_update, num_generations, per_device) < 1:
        raise BatchError(
            f"batch.rollout_prompts={rollout_prompts}, batch.prompts_per_update={prompts_per_update}, "
            f"grpo.num_generations={num_generations} and grpo.per_device_train_batch_size={per_device} must be >= 1"
        )
    if rollout_prompts % prompts_per_update:
        raise BatchError(
            f"batch.rollout_prompts={rollout_prompts} is not a multiple of batch.prompts_per_update="
            f"{prompts_per_update}: a rollout batch must split into whole updates"
        )
    completions = prompts_per_update * num_generations
    per_window = per_device * world.size  # completions of one micro-step over all processes
    if completions % per_window == 0:
        return RLBatch(rollout_prompts, prompts_per_update, num_generations, per_device, world, completions // per_window)
    # The smallest accumulation at or above the request whose update holds whole prompt groups.
    accumulation = max(1, math.ceil(completions / per_window))
    while (per_window * accumulation) % num_generations:
        accumulation += 1
    if not allow_inexact:
        fix = _fix(completions, per_device, "grpo.per_device_train_batch_size")
        raise BatchError(
            f"batch.prompts_per_update={prompts_per_update} (x grpo.num_generations={num_generations} = {completions} "
            f"completions) cannot be met on {world}: one micro-step over all processes is "
            f"grpo.per_device_train_batch_size={per_device} x {world.size} = {per_window} completions, and "
            f"{completions} is not a multiple of it. Fix: {fix} (or another per-device size), or pass "
            f"batch.allow_inexact=true to train with {per_window * accumulation // num_generations} prompts per update"
        )
    return RLBatch(rollout_prompts, prompts_per_update, num_generations, per_device, world, accumulation)


def _requested(cfg: DictConfig, derived_key: str, example: str, *keys: str) -> bool:
    """Whether the preset states the global numbers ``batch.<keys>`` (all or none of them);
    when it states none, the per-process ``derived_key`` they would set must be given."""
    values = [OmegaConf.select(cfg, f"batch.{k}", default=None) for k in keys]
    if all(v is None for v in values):
        if OmegaConf.select(cfg, derived_key, default=1) is None:
            names = " and ".join(f"batch.{k}" for k in keys)
            raise BatchError(
                f"{derived_key}=null is derived from {names}, which {'are' if len(keys) > 1 else 'is'} null too: "
                f"set {'them' if len(keys) > 1 else 'it'} (e.g. {example}) or {derived_key}"
            )
        return False
    if any(v is None for v in values):
        raise BatchError(f"set all of batch.{', batch.'.join(keys)} or none of them (got {values})")
    return True


def apply_sft_batch(cfg: DictConfig, world: World | Callable[[], World]) -> SFTBatch | None:
    """Set ``trainer.accumulate_grad_batches`` from ``batch.sequences_per_step`` and the
    world size (a ``World``, or a function giving it, asked only when needed); None (config
    untouched) when the preset states no global batch. The loss of a step is normalised by
    the whole accumulated batch's target tokens whatever the strategy (``SFTModule``), so
    the accumulation derived here changes no normalisation."""
    if not _requested(cfg, "trainer.accumulate_grad_batches", "128", "sequences_per_step"):
        return None
    derived = sft_batch(
        int(cfg.batch.sequences_per_step),
        int(cfg.data.batch_size),
        world() if callable(world) else world,
        bool(cfg.batch.get("allow_inexact", False)),
    )
    _replace(cfg, "trainer.accumulate_grad_batches", derived.accumulation, "batch.sequences_per_step")
    return derived


def _replace(cfg: DictConfig, key: str, value: int, source: str) -> None:
    # A per-process value given beside the global one is overruled, and said so.
    given = OmegaConf.select(cfg, key, default=None)
    if given is not None and given != value:
        log.warning("%s=%s replaced by %d, derived from %s and the process count", key, given, value, source)
    parent, name = key.rsplit(".", 1)
    with open_dict(cfg):
        OmegaConf.select(cfg, parent)[name] = value


def apply_rl_batch(cfg: DictConfig, world: World) -> RLBatch | None:
    """Set ``grpo.gradient_accumulation_steps`` and ``grpo.generation_batch_size`` from
    ``batch.rollout_prompts`` / ``batch.prompts_per_update`` and the world size; None
    (config untouched) when the preset states no global batch."""
    if not _requested(cfg, "grpo.gradient_accumulation_steps", "256 and 32", "rollout_prompts", "prompts_per_update"):
        return None
    derived = rl_batch(
        int(cfg.batch.rollout_prompts),
        int(cfg.batch.prompts_per_update),
        int(cfg.grpo.num_generations),
        int(cfg.grpo.per_device_train_batch_size),
        world,
        bool(cfg.batch.get("allow_inexact", False)),
    )
    source = "batch.rollout_prompts / batch.prompts_per_update"
    _replace(cfg, "grpo.gradient_accumulation_steps", derived.accumulation, source)
    _replace(cfg, "grpo.generation_batch_size", derived.generation_batch_size, source)
    with open_dict(cfg):
        if "steps_per_generation" in cfg.grpo:
            cfg.grpo.steps_per_generation = None  # TRL takes one of the two
    return derived


def rl_batch_problems(cfg: DictConfig, world: World) -> list[str]:
    """What ``apply_rl_batch`` would refuse on ``world``, as messages (checked when a run or a
    pipeline job starts, so a bad process count is named before SFT or the policy load)."""
    keys = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size")
    probe = OmegaConf.create({
        "batch": OmegaConf.to_container(cfg.batch, resolve=True) if cfg.get("batch") is not None else None,
        "grpo": {k: OmegaConf.select(cfg, f"grpo.{k}", default=None) for k in keys},
    })  # fmt: skip
    try:
        apply_rl_batch(probe, world)  # on a copy of the knobs it reads: the run's config is left as it is
    except BatchError as err:
        return [str(err)]
    return []


@dataclass(frozen=True)
class VerlBatch:
    train_batch_size: int  # prompts per rollout batch (global in verl)
    ppo_mini_batch_size: int  # prompts per update (global in verl)
    ppo_micro_batch_size_per_gpu: int  # completions per GPU per micro-step
    updates_per_rollout: int


def verl_batch(cfg: DictConfig, world: World) -> VerlBatch:
    """verl's batch sizes from the global numbers: verl takes them as global and divides
    ``ppo_mini_batch_size x rollout.n`` by the GPU count itself, flooring silently, so a
    GPU count that does not divide it (or leaves no whole micro-batch) is refused here."""
    rollout = int(cfg.batch.rollout_prompts)
    update = int(cfg.batch.prompts_per_update)
    group = int(cfg.grpo.num_generations)
    micro = int(cfg.grpo.per_device_train_batch_size)
    if rollout % update:
        raise BatchError(f"batch.rollout_prompts={rollout} is not a multiple of batch.prompts_per_update={update}")
    per_gpu, left = divmod(update * group, world.size)
    if left or per_gpu % micro or per_gpu == 0:
        raise BatchError(
            f"verl splits batch.prompts_per_update={update} x rollout.n={group} = {update * group} completions over "
            f"{world}: {update * group / world.size:g} per GPU, which is not a whole multiple of "
            f"ppo_micro_batch_size_per_gpu=grpo.per_device_train_batch_size={micro} (verl would floor it silently). "
            f"Fix: a GPU count dividing {update * group} with a per-GPU share divisible by {micro}"
        )
    return VerlBatch(rollout, update, micro, rollout // update)


def announce(derived: SFTBatch | RLBatch | None) -> None:
    """The derived batch as one of the run's first log lines (main process only); an
    inexact one as a warning."""
    from lightning.pytorch.utilities import rank_zero_only

    if derived is None or rank_zero_only.rank != 0:
        return
    (log.info if derived.exact else log.warning)(derived.describe())  # console and the run's log file
