"""The DeepSpeed paths of the SFT stage, run as far as a CPU allows.

- Loss normalisation: on every strategy the gradient of an optimiser step is the sum of the
  token losses of the accumulation window divided by its target tokens. Under DeepSpeed the
  token sums pass through Lightning's division by the accumulation and the engine's second
  one, and the module rescales the engine's gradients at the window's end. Checked twice:
  with the divisions Lightning and DeepSpeed apply restated by hand (runs without
  DeepSpeed), and through DeepSpeed's real engine (ZeRO-2 and ZeRO-3 on one gloo rank, ZeRO-2
  on two, Lightning's own loss division and backward call; skipped without DeepSpeed). Lightning
  itself refuses DeepSpeed without CUDA, so its loop is followed step by step here.
- Checkpoint conversion: a real ZeRO-2 checkpoint written by DeepSpeed's engine on the CPU
  (one gloo rank), read back by ``sedsft.checkpoints.load_checkpoint``. Needs DeepSpeed
  (``pip install 'sedsft[deepspeed]'``), skipped without it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from transformers import LlamaConfig, LlamaForCausalLM

import sedsft.sft.logging as runlog
from loss_references import reference
from sedsft.losses import build_loss
from sedsft.sft.module import SFTModule
from sedsft.sft.strategies import gradient_divisor, owns_gradients, shards_lm_head

VOCAB = 40
ACCUMULATE = 2
ZERO_KNOBS = {"overlap_comm": True, "contiguous_gradients": True}  # as configs/trainer/deepspeed_zero2.yaml
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install 'sedsft[deepspeed]')",
)


@pytest.fixture(scope="module")
def gloo_rank():
    """One gloo process group for every DeepSpeed engine of this file: DeepSpeed keeps its
    process groups cached across engines, so the group is made once and ended at the end."""
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FakeEngine:
    """What the module asks DeepSpeed's engine: its accumulation and whether the coming
    ``step()`` is a boundary (micro-step counting as in ``DeepSpeedEngine``)."""

    def __init__(self, accumulate: int):
        self.accumulate, self.micro_steps = accumulate, 0

    def gradient_accumulation_steps(self) -> int:
        return self.accumulate

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulate == 0

    def step(self) -> None:
        self.micro_steps += 1


def deepspeed_strategy(stage: int, engine=None) -> DeepSpeedStrategy:
    """A ``DeepSpeedStrategy`` as the module sees it (its class, ZeRO stage and engine),
    built without DeepSpeed installed (its ``__init__`` would refuse)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    strategy._model = engine
    return strategy


class FakeTrainer:
    """What ``training_step`` / ``on_before_optimizer_step`` read from the trainer."""

    def __init__(self, strategy, accumulate: int):
        self.strategy, self.accumulate_grad_batches, self.world_size = strategy, accumulate, 1
        self.training = True

    @property
    def model(self):
        return self.strategy.model

    @staticmethod
    def reduce(value, reduce_op="sum"):
        return value


def small_module(strategy) -> SFTModule:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    module = SFTModule(
        lm=None, loss=build_loss("ce"), optimizer=torch.optim.SGD, fused_loss="false"
    )
    module.model = LlamaForCausalLM(config)
    module._trainer = FakeTrainer(strategy, accumulate=ACCUMULATE)
    strategy.reduce = FakeTrainer.reduce
    strategy._lightning_module = module
    return module


def micro_batch(length: int, first_target: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :first_target] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# Two micro-batches of 21 and 4 target tokens: a mean of per-micro-batch means would weigh the
# 4 tokens like the 21, so the test tells the two normalisations apart.
WINDOW = [(24, 3, 1), (10, 6, 2)]


def reference_gradients(model: torch.nn.Module, batches, tokens: int = 25) -> dict[str, torch.Tensor]:
    """Float64 gradient of (sum of the token CE losses over all micro-batches) / (their
    target tokens), from a float64 copy of ``model`` and the CE formula of loss_references."""
    model = copy.deepcopy(model).double()
    expected_tokens, total, tokens = tokens, 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        total = total + reference("ce", logits[keep], labels[keep]).sum()
        tokens += int(keep.sum())
    assert tokens == expected_tokens
    (total / tokens).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_gradients_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(
            actual[name].double(), grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{what}, {n}: {m}"
        )


@pytest.mark.parametrize("kind", ["deepspeed", "single_device"])
def test_window_gradient_is_token_sum_over_window_tokens_under_each_strategy(monkeypatch, kind):
    """The divisions Lightning 2.6 and DeepSpeed 0.19 apply to a returned loss, restated:
    Lightning divides it by the accumulation on every strategy; DeepSpeed's
    ``engine.backward`` divides it by its ``gradient_accumulation_steps()`` again, and
    Lightning calls ``on_before_optimizer_step`` after every micro-batch, the engine
    stepping only at its boundary. Here DeepSpeed's gradients sit in ``.grad`` (as ZeRO
    keeps them before its reduction); the real engine is the test below."""
    monkeypatch.setattr(runlog, "log_metrics", lambda *args, **kwargs: None)  # no Lightning loop here
    engine = FakeEngine(ACCUMULATE)
    strategy = deepspeed_strategy(2, engine) if kind == "deepspeed" else SingleDeviceStrategy(torch.device("cpu"))
    module = small_module(strategy)
    assert owns_gradients(strategy) is (kind == "deepspeed")
    batches = [micro_batch(*shape) for shape in WINDOW]
    expected = reference_gradients(module.model, batches)
    engine_divisor = ACCUMULATE if kind == "deepspeed" else 1
    assert gradient_divisor(module.trainer) == ACCUMULATE * engine_divisor
    optimizer = torch.optim.SGD(module.model.parameters(), lr=1.0)
    for i, batch in enumerate(batches):
        returned = module.training_step(batch, i)
        (returned / ACCUMULATE / engine_divisor).backward()
        if kind == "deepspeed" or i == len(batches) - 1:
            module.on_before_optimizer_step(optimizer)
            engine.step()
    got = {name: p.grad for name, p in module.model.named_parameters()}
    assert_gradients_match(got, expected, kind)
    assert module._window_tokens == 0  # the window's count starts again after its step


@needs_deepspeed
@pytest.mark.parametrize("stage, clip", [(2, 0.0), (3, 0.0), (2, 1.0)])
def test_deepspeed_engine_step_applies_token_sum_over_window_tokens(monkeypatch, gloo_rank, stage, clip):
    """Through DeepSpeed's engine (one gloo rank, fp32, SGD with lr 1 so the weight change is
    the gradient): each micro-batch goes through the engine's forward (Lightning's
    ``_forward_redirection`` to ``training_step``), Lightning's ``ClosureResult`` division by
    the accumulation, ``DeepSpeedPrecision.backward`` (the engine's ``backward``), the
    module's ``on_before_optimizer_step`` and ``engine.step()``, as Lightning's loop calls them.
    With clipping at 1.0 (the reference gradient's norm is 1.18) the engine must clip the
    normalised gradient: the rescaling happens before its clipping, as on other strategies."""
    import deepspeed
    from lightning.pytorch.loops.optimization.automatic import ClosureResult
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    monkeypatch.setattr(runlog, "log_metrics", lambda *args, **kwargs: None)
    strategy = deepspeed_strategy(stage)
    module = small_module(strategy)
    batches = [micro_batch(*shape) for shape in WINDOW]
    expected = reference_gradients(module.model, batches)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ACCUMULATE,  # Lightning sets it from accumulate_grad_batches
        "zero_optimization": {"stage": stage, **ZERO_KNOBS},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,  # Lightning sets it from trainer.gradient_clip_val (0.0 when unset)
    }
    engine, optimizer, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config
    )
    strategy._model = engine
    precision = DeepSpeedPrecision("32-true")
    assert gradient_divisor(module.trainer) == ACCUMULATE * ACCUMULATE
    for i, batch in enumerate(batches):
        returned = _ForwardRedirection()(engine, module, "training_step", batch, i)
        loss = ClosureResult.from_training_step_output(returned, ACCUMULATE).closure_loss
        precision.backward(loss, module, optimizer)
        module.on_before_optimizer_step(optimizer)  # Lightning: Precision._after_closure
        engine.step()
    assert engine.global_steps == 1
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        got = {name: before[name] - p.detach() for name, p in module.model.named_parameters()}
    if clip:
        norm = torch.sqrt(sum((g**2).sum() for g in expected.values()))
        assert norm > clip * 1.1, "the case must be one that clipping changes"
        expected = {name: g * clip / norm for name, g in expected.items()}
    assert_gradients_match(got, expected, f"ZeRO-{stage}, clip {clip}")


# Two ranks, each with its own window: 21 + 4 and 10 + 25 target tokens. The ranks' totals differ,
# so normalising each rank by its own tokens and averaging would give another step.
RANK_WINDOWS = [WINDOW, [(12, 2, 3), (30, 5, 4)]]


def _zero2_rank(rank: int, port: int, out: str) -> None:
    """One rank of the two-rank ZeRO-2 step (spawned): Lightning's calls as in the test
    above, the token count all-reduced by the strategy as ``DeepSpeedStrategy.reduce`` does."""
    import deepspeed
    import torch.distributed as dist
    from lightning.pytorch.loops.optimization.automatic import ClosureResult
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})  # fmt: skip
    torch.set_num_threads(1)
    runlog.log_metrics = lambda *args, **kwargs: None
    strategy = deepspeed_strategy(2)
    module = small_module(strategy)  # the same seed on both ranks: the same weights
    module._trainer.world_size = 2

    def reduce(value, reduce_op="sum"):
        dist.all_reduce(value)
        return value

    strategy.reduce = reduce
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": ACCUMULATE,
              "zero_optimization": {"stage": 2, **ZERO_KNOBS}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}  # fmt: skip
    engine, optimizer, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config
    )
    strategy._model = engine
    precision = DeepSpeedPrecision("32-true")
    for i, shape in enumerate(RANK_WINDOWS[rank]):
        returned = _ForwardRedirection()(engine, module, "training_step", micro_batch(*shape), i)
        precision.backward(ClosureResult.from_training_step_output(returned, ACCUMULATE).closure_loss, module, optimizer)
        module.on_before_optimizer_step(optimizer)
        engine.step()
    if rank == 0:
        torch.save({name: before[name] - p.detach() for name, p in module.model.named_parameters()}, out)
    dist.destroy_process_group()


@needs_deepspeed
@pytest.mark.slow  # two spawned processes, each importing DeepSpeed: about 40 s on 2 cores
def test_deepspeed_zero2_two_ranks_normalises_over_all_ranks_tokens(tmp_path):
    """Two gloo ranks under ZeRO-2: each rank's optimiser holds half of the gradient (some
    parameters wholly on the other rank), the engine averages over the ranks, and the step
    is still the sum of every token loss of both windows over their 60 target tokens."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    reference_model = small_module(SingleDeviceStrategy(torch.device("cpu"))).model
    batches = [micro_batch(*shape) for window in RANK_WINDOWS for shape in window]
    expected = reference_gradients(reference_model, batches, tokens=60)
    out = tmp_path / "step.pt"
    mp.start_processes(_zero2_rank, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert_gradients_match(got, expected, "ZeRO-2, two ranks")


def test_lm_head_is_sharded_only_under_zero3():
    assert not shards_lm_head(deepspeed_strategy(2))
    assert shards_lm_head(deepspeed_strategy(3))


# -- a real ZeRO checkpoint, converted ----------------------------------------------------------------
class Holder(torch.nn.Module):
    """Parameters named as in an ``SFTModule`` (``model.*``), as DeepSpeed saves them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_deepspeed
def test_zero2_checkpoint_written_on_the_cpu_loads_as_one_state_dict(tmp_path, gloo_rank):
    import deepspeed

    from sedsft.checkpoints import load_checkpoint

    holder = Holder()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=holder, optimizer=torch.optim.SGD(holder.parameters(), lr=0.1), config=config
    )
    loss = (engine.module.model(torch.randn(2, 4, generator=torch.Generator().manual_seed(1))) ** 2).sum()
    engine.backward(loss)
    engine.step()  # the weights move: the checkpoint must hold the new ones
    # Lightning saves its own keys next to DeepSpeed's as client state
    engine.save_checkpoint(str(tmp_path / "last.ckpt"), client_state={"global_step": 1, "sedsft": {"seed": 42}})
    expected = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    assert checkpoint["global_step"] == 1 and checkpoint["sedsft"] == {"seed": 42}
    assert checkpoint["state_dict"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name].float(), tensor, msg=name)
    assert os.path.isdir(tmp_path / "last.ckpt" / "global_step1")
