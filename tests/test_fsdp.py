"""FSDP for real on two CPU processes (gloo), parameters sharded: the strategy's precision
plugin clipping by the global norm, against the same model clipped unsharded in one process;
and the SFT loss of a step normalised by the target tokens of every rank's window, against a
float64 reference (the helpers of tests/test_deepspeed.py)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from sedsft.sft.strategies import fsdp_strategy

WORLD = 2
CLIP = 0.5


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def rank_input(rank: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = FullyShardedDataParallel(
            tiny_model(),
            device_id=torch.device("cpu"),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True,  # as Lightning's FSDPStrategy wraps
        )
        (model(rank_input(rank)) ** 2).sum().backward()  # FSDP averages gradients over ranks
        local = [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]  # this rank's shard
        strategy = fsdp_strategy(layer_cls="auto")
        strategy.precision_plugin = FSDPPrecision("32-true")  # what the Trainer does
        strategy.model = model
        strategy.precision_plugin.clip_gradients(
            torch.optim.SGD(model.parameters(), lr=1.0), clip_val=CLIP
        )
        shard = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            full = torch.cat([p.grad.flatten() for p in model.parameters()])
        if rank == 0:
            torch.save(
                {"full": full, "shard": shard, "local": torch.cat([g.flatten() for g in local])},
                out,
            )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_strategy_clips_sharded_gradients_by_the_global_norm(tmp_path):
    out = str(tmp_path / "grads.pt")
    # fork: the ranks inherit the imports (a spawned rank re-imports Lightning, ~10 s)
    mp.start_processes(
        _worker, args=(free_port(), out), nprocs=WORLD, join=True, start_method="fork"
    )
    got = torch.load(out)

    reference = tiny_model()
    loss = sum((reference(rank_input(r)) ** 2).sum() for r in range(WORLD)) / WORLD
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert norm > 2 * CLIP  # clipping acts
    # rank 0 holds only part of the parameters: a norm of its shard alone would clip less
    assert got["shard"].numel() < expected.numel()
    assert got["local"].norm() < norm
    torch.testing.assert_close(
        got["full"], expected, rtol=1e-5, atol=1e-7,
        msg=lambda m: f"FSDP clipping does not match clip_grad_norm_ of the unsharded model\n{m}",
    )  # fmt: skip
    assert abs(got["full"].norm().item() - CLIP) < 1e-5


# ------------------------------------------------------------------ loss normalisation under FSDP
def _normalisation_worker(rank: int, port: int, out: str) -> None:
    """One rank of an SFT step under FSDP: the module's token sums, Lightning's division by the
    accumulation (FSDP has no no_sync in Lightning: each backward reduce-scatters and the
    shards accumulate), then ``on_before_optimizer_step`` and an SGD step with lr 1."""
    import sedsft.sft.logging as runlog
    from test_deepspeed import ACCUMULATE, RANK_WINDOWS, micro_batch, small_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        runlog.log_metrics = lambda *args, **kwargs: None  # no Lightning loop here
        strategy = fsdp_strategy(layer_cls="auto")
        module = small_module(strategy)  # the same seed on every rank: the same weights
        module._trainer.world_size = WORLD

        def reduce(value, reduce_op="sum"):
            dist.all_reduce(value)
            return value

        strategy.reduce = reduce
        module.model = FullyShardedDataParallel(
            module.model, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True,  # as Lightning's FSDPStrategy wraps
        )  # fmt: skip
        optimizer = torch.optim.SGD(module.model.parameters(), lr=1.0)
        with FullyShardedDataParallel.summon_full_params(module.model):
            before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        for i, shape in enumerate(RANK_WINDOWS[rank]):
            (module.training_step(micro_batch(*shape), i) / ACCUMULATE).backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        with FullyShardedDataParallel.summon_full_params(module.model):
            step = {n: before[n] - p.detach() for n, p in module.model.named_parameters()}
        if rank == 0:
            torch.save(step, out)
    finally:
        dist.destroy_process_group()


def test_fsdp_step_normalises_over_all_ranks_tokens(tmp_path):
    """Two gloo ranks, parameters sharded, windows of 21 + 4 and 10 + 25 target tokens: the
    step is the float64 gradient of every token loss of both windows summed, over 60."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from test_deepspeed import (
        RANK_WINDOWS,
        assert_gradients_match,
        micro_batch,
        reference_gradients,
        small_module,
    )

    out = str(tmp_path / "step.pt")
    mp.start_processes(_normalisation_worker, args=(free_port(), out), nprocs=WORLD, join=True, start_method="fork")
    got = torch.load(out, weights_only=True)
    reference = small_module(SingleDeviceStrategy(torch.device("cpu"))).model
    batches = [micro_batch(*shape) for window in RANK_WINDOWS for shape in window]
    expected = reference_gradients(reference, batches, tokens=60)
    got = {name.replace("_fsdp_wrapped_module.", ""): grad for name, grad in got.items()}
    assert_gradients_match(got, expected, "FSDP, two ranks")
