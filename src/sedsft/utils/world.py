"""How many training processes a run has, as each launcher states it.

The paper's batches are global (128 sequences per SFT step; 256 prompts per rollout batch,
32 per update), while the knobs that frameworks take are per process. The per-process
values are derived from the world size this module reports (``sedsft.utils.batches``), at
run time, for every way a run is started:

* Lightning starts its own processes: ``trainer.devices x trainer.num_nodes``. Under a
  SLURM allocation it joins the tasks SLURM started instead, so those must agree.
* ``accelerate launch`` / ``torchrun`` export ``WORLD_SIZE``.
* SLURM through Hydra's submitit launcher (or ``srun``) starts ``SLURM_NTASKS`` tasks;
  for TRL they form one process group only once the torch variables are exported
  (``export_slurm_process_group``).
* verl: ``trainer.nnodes x trainer.n_gpus_per_node`` GPUs (``verl.*`` in ``rl.yaml``).

Every function takes the environment as a mapping so tests can state any world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class WorldSizeError(ValueError):
    """Launcher and config disagree on the number of processes; the message names both."""


@dataclass(frozen=True)
class World:
    size: int  # training processes in the whole job
    launcher: str  # lightning | torchrun | slurm | single | verl
    source: str  # where the number came from, for the run's first lines

    def __str__(self) -> str:
        return f"{self.size} process(es) ({self.source})"


def _slurm_tasks(env: Mapping[str, str]) -> int | None:
    # Lightning's rule: an interactive allocation (job name bash / interactive) is not a launcher.
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(env["SLURM_NTASKS"])


def launcher_world(env: Mapping[str, str] | None = None) -> World:
    """The processes an external launcher started: torchrun / accelerate (``WORLD_SIZE``),
    SLURM tasks (``SLURM_NTASKS``, e.g. Hydra's submitit launcher), else this one process."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE"):
        return World(int(env["WORLD_SIZE"]), "torchrun", f"WORLD_SIZE={env['WORLD_SIZE']} (torchrun / accelerate launch)")
    tasks = _slurm_tasks(env)
    if tasks is not None:
        return World(tasks, "slurm", f"SLURM_NTASKS={tasks} (SLURM / submitit)")
    return World(1, "single", "one process: no WORLD_SIZE, no SLURM tasks")


def lightning_world(cfg: DictConfig, env: Mapping[str, str] | None = None) -> World:
    """``trainer.devices x trainer.num_nodes``, checked against the tasks SLURM started
    (Lightning joins them instead of starting its own) or ``WORLD_SIZE`` under torchrun."""
    from sedsft.utils.knobs import device_count

    env = os.environ if env is None else env
    devices = device_count(cfg)
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    if devices is None:
        raise WorldSizeError(
            f"trainer.devices={OmegaConf.select(cfg, 'trainer.devices')!r}: the number of processes cannot be told "
            "from the config, so the per-device batch cannot be derived; give trainer.devices as a number"
        )
    size = devices * nodes
    world = World(size, "lightning", f"trainer.devices={devices} x trainer.num_nodes={nodes}")
    outside = launcher_world(env)
    if outside.launcher == "single" or outside.size == size:
        return world
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    hint = (
        f"start {devices} task(s) per node (tasks_per_node / --ntasks-per-node={devices}; SLURM says {per_node})"
        if outside.launcher == "slurm"
        else f"launch {size} process(es)"
    )
    raise WorldSizeError(
        f"{outside.source} but the config asks Lightning for {world.source} = {size} processes: "
        f"{hint}, or set trainer.devices / trainer.num_nodes to match"
    )


def rl_world(env: Mapping[str, str] | None = None, processes: int | None = None) -> World:
    """The processes of an RL (TRL / accelerate) run: what accelerate joined into one group
    (``processes``; asked from ``accelerate.PartialState`` when None), which must be what
    the launcher started: SLURM tasks that did not join would each train alone."""
    outside = launcher_world(env)
    if processes is None:
        from accelerate import PartialState

        processes = PartialState().num_processes
    if processes != outside.size:
        raise WorldSizeError(
            f"{outside.source}, but accelerate sees {processes} process(es) in its group: the per-process batch "
            "would be derived for the wrong count. Start the RL stage with accelerate launch / torchrun, or under "
            "SLURM with one task per GPU (sedsft exports RANK / WORLD_SIZE / MASTER_ADDR from SLURM's variables)"
        )
    return World(processes, outside.launcher, outside.source if outside.launcher != "single" else "one process")


def verl_world(cfg: DictConfig) -> World:
    """The GPUs of the printed verl command: ``verl.nnodes x verl.n_gpus_per_node``."""
    nodes, gpus = int(cfg.verl.nnodes), int(cfg.verl.n_gpus_per_node)
    return World(nodes * gpus, "verl", f"verl.nnodes={nodes} x verl.n_gpus_per_node={gpus}")


def export_slurm_process_group(env: MutableMapping[str, str] | None = None) -> bool:
    """Under SLURM tasks not started by torchrun / accelerate (submitit, plain srun), export
    the torch variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) so that ``accelerate`` joins the tasks into one process group; without
    them each task would train alone on its share of GPUs. Variables already set (e.g. by an
    SFT stage that ran in the same process) are kept. Returns whether anything was exported."""
    env = os.environ if env is None else env
    tasks = _slurm_tasks(env)
    if "LOCAL_RANK" in env or tasks is None or tasks < 2:  # torchrun / accelerate launch set all of them
        return False
    if env is os.environ and not any(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        try:  # submitit knows the allocation's first node (MASTER_ADDR) and a job-unique port
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=False)
            return True
        except (ImportError, RuntimeError, KeyError) as err:
            log.warning("submitit could not export the torch process group (%s); using SLURM's variables", err)
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("WORLD_SIZE", str(tasks))
    if "MASTER_ADDR" not in env:
        if "SLURM_LAUNCH_NODE_IPADDR" not in env:
            raise WorldSizeError(
                f"SLURM started {tasks} tasks but MASTER_ADDR is unset and SLURM gives no SLURM_LAUNCH_NODE_IPADDR: "
                "export MASTER_ADDR (the first node's address) and MASTER_PORT, or start the stage with torchrun / accelerate"
            )
        env["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True
