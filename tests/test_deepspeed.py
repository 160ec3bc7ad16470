"""The DeepSpeed paths of the SFT stage, run as far as a CPU allows.

- Loss normalisation: under DeepSpeed the engine owns the gradients, so each micro-batch
  back-propagates its own token mean and the module leaves the gradients alone; elsewhere
  it back-propagates the token sum and rescales once per window. Runs without DeepSpeed
  (a ``DeepSpeedStrategy`` object is enough for the module's decisions).
- Checkpoint conversion: a real ZeRO-2 checkpoint written by DeepSpeed's engine on the CPU
  (one gloo rank), read back by ``sedsft.checkpoints.load_checkpoint``. Needs DeepSpeed
  (``pip install 'sedsft[deepspeed]'``), skipped without it.
"""

from __future__ import annotations

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
from sedsft.sft.strategies import owns_gradients, shards_lm_head

VOCAB = 40


def deepspeed_strategy(stage: int) -> DeepSpeedStrategy:
    """A ``DeepSpeedStrategy`` as the module sees it (its class and ZeRO stage), built
    without DeepSpeed installed (its ``__init__`` would refuse)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


class FakeTrainer:
    """What ``training_step`` / ``on_before_optimizer_step`` read from the trainer."""

    def __init__(self, strategy, accumulate: int):
        self.strategy, self.accumulate_grad_batches, self.world_size = strategy, accumulate, 1

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
    module._trainer = FakeTrainer(strategy, accumulate=2)
    strategy.reduce = FakeTrainer.reduce
    return module


def micro_batch(length: int, first_target: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :first_target] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def token_mean_and_count(module: SFTModule, batch) -> tuple[float, int]:
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits[0, :-1].double()
    labels = batch["labels"][0, 1:]
    keep = labels != -100
    return float(reference("ce", logits[keep], labels[keep]).mean()), int(keep.sum())


@pytest.mark.parametrize("kind", ["deepspeed", "single_device"])
def test_micro_batch_normalisation_follows_who_owns_the_gradients(monkeypatch, kind):
    """Two micro-batches of 21 and 4 target tokens: DeepSpeed gets each one's own mean (its
    engine divides by the accumulation count itself) and the gradients stay as the engine
    left them; other strategies get token sums, rescaled by accumulate / total tokens."""
    monkeypatch.setattr(
        runlog, "log_metrics", lambda *args, **kwargs: None
    )  # no Lightning loop here
    strategy = (
        deepspeed_strategy(2) if kind == "deepspeed" else SingleDeviceStrategy(torch.device("cpu"))
    )
    module = small_module(strategy)
    assert owns_gradients(strategy) is (kind == "deepspeed")
    batches = [micro_batch(24, 3, seed=1), micro_batch(10, 6, seed=2)]
    counts = []
    for i, batch in enumerate(batches):
        returned = module.training_step(batch, i).detach()
        mean, count = token_mean_and_count(module, batch)
        counts.append(count)
        expected = mean if kind == "deepspeed" else mean * count
        assert float(returned) == pytest.approx(expected, rel=1e-5), (
            f"{kind}: micro-batch {i} returned {float(returned):.6f}; expected "
            f"{'its token mean' if kind == 'deepspeed' else 'its token sum'} {expected:.6f}"
        )
    param = next(module.model.parameters())
    param.grad = torch.ones_like(param)
    optimizer = torch.optim.SGD([param], lr=1.0)
    module.on_before_optimizer_step(optimizer)
    assert counts == [21, 4]
    scale = 1.0 if kind == "deepspeed" else 2 / 25  # accumulate * world / window tokens
    torch.testing.assert_close(param.grad, torch.full_like(param, scale))


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


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install 'sedsft[deepspeed]')",
)
def test_zero2_checkpoint_written_on_the_cpu_loads_as_one_state_dict(tmp_path, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from sedsft.checkpoints import load_checkpoint

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    holder = Holder()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=holder, optimizer=torch.optim.SGD(holder.parameters(), lr=0.1), config=config
    )
    try:
        loss = (
            engine.module.model(torch.randn(2, 4, generator=torch.Generator().manual_seed(1))) ** 2
        ).sum()
        engine.backward(loss)
        engine.step()  # the weights move: the checkpoint must hold the new ones
        # Lightning saves its own keys next to DeepSpeed's as client state
        engine.save_checkpoint(
            str(tmp_path / "last.ckpt"), client_state={"global_step": 1, "sedsft": {"seed": 42}}
        )
        expected = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    assert checkpoint["global_step"] == 1 and checkpoint["sedsft"] == {"seed": 42}
    assert checkpoint["state_dict"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name].float(), tensor, msg=name)
    assert os.path.isdir(tmp_path / "last.ckpt" / "global_step1")
