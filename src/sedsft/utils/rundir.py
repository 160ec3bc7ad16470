"""Run directories that no two runs share: ``${sedsft.unique_dir:<parent>,<name>}``.

Hydra names a run's directory by the second, so two runs started in the same second (by
hand, by a job array, by two users) would write into one directory: one run's config,
checkpoints and metrics overwritten by the other's. ``configs/hydra/default.yaml`` names
run and multirun directories through :func:`unique_dir` instead, which *creates* the
directory itself with ``os.mkdir`` (atomic: it fails when the name is taken) and moves on
to ``<name>_1``, ``<name>_2``, ... until one is free. An existing directory is never
reused, except by a requeued SLURM job (below).

The processes of one distributed run share the directory of their rank 0:

- Lightning's own DDP launcher starts ranks 1.. with ``hydra.run.dir=<rank 0's directory>``
  (``lightning/fabric/strategies/launchers/subprocess_script.py``): a plain path, so this
  resolver is not called there.
- ``torchrun`` / ``accelerate launch``: rank 0 creates the directory and publishes it in the
  launcher's own TCP store (the one ``torch.distributed`` joins later); the other ranks
  read it from there.
- SLURM tasks (``srun``, where Lightning takes ranks from SLURM): the name comes from the
  job, ``slurm-<job id>[.<step id>]``, which every task computes alike; rank 0 creates it and
  the others wait for it. A requeued job (``SLURM_RESTART_COUNT`` > 0) reuses it, so that
  Lightning finds the ``hpc_ckpt_*.ckpt`` it wrote there before the requeue and resumes.

Resolved values are cached on the config (``use_cache``) and Hydra copies that cache into
every multirun job's config (pickled along with it by the submitit launcher), so one run
resolves its directory once. Hydra imports this module when it instantiates
:class:`RunDirCallback` (listed under ``hydra.callbacks``), which registers the resolver in
every process that composes or unpickles such a config, submitit jobs included.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

RESOLVER = "sedsft.unique_dir"
WAIT_S = 600.0  # how long a non-zero rank waits for rank 0's directory
MAX_SUFFIX = 10_000


def unique_dir(parent: str, name: str, env: Mapping[str, str] | None = None) -> str:
    """Create a directory under ``parent`` that no other run has, and return its path.

    ``name`` is the preferred name (a timestamp); taken names get ``_1``, ``_2``, ... .
    ``env`` (default ``os.environ``) says which launcher started this process.
    """
    env = os.environ if env is None else env
    parent_dir = Path(parent)
    if _torchelastic(env):
        return _shared_by_torchelastic(parent_dir, name, env)
    if _slurm(env):
        return _shared_by_slurm_job(parent_dir, env)
    return str(claim(parent_dir, name))


def claim(parent: Path, name: str, first_suffix: int = 0) -> Path:
    """``parent/name`` (or ``name_<n>`` from ``first_suffix`` on), created by this call:
    ``os.mkdir`` raises when another process took the name first, so a name is never
    handed out twice, not even to processes started in the same instant."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(first_suffix, MAX_SUFFIX):
        path = parent / (name if n == 0 else f"{name}_{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(
        f"{parent}: {name} and {name}_1 .. _{MAX_SUFFIX - 1} all exist; clean up old runs"
    )


def _torchelastic(env: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1


def _shared_by_torchelastic(parent: Path, name: str, env: Mapping[str, str]) -> str:
    """Rank 0 claims a directory and puts it in the launcher's TCP store; the others get it."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise RuntimeError(
            "torchrun without its agent store (TORCHELASTIC_USE_AGENT_STORE != True): the ranks "
            "cannot agree on a run directory; give all of them hydra.run.dir=<directory>"
        )
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=WAIT_S),
    )
    key = f"sedsft/run_dir/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/{parent}"
    if int(env["RANK"]) == 0:
        path = str(claim(parent, name))
        store.set(key, path)
        return path
    return store.get(key).decode()  # blocks until rank 0 has set it


def _slurm(env: Mapping[str, str]) -> bool:
    """Lightning's own test for taking ranks from SLURM (``SLURMEnvironment.detect``)."""
    return (
        "SLURM_NTASKS" in env
        and "SLURM_JOB_ID" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    )


def slurm_name(env: Mapping[str, str]) -> str:
    """``slurm-<job id>[.<step id>]``, the same in every task of a job step and across requeues
    (an array task is named ``<array job id>_<task id>``, as ``squeue`` shows it)."""
    job = env["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    step = env.get("SLURM_STEP_ID", "")
    return f"slurm-{job}" + (f".{step}" if step.isdigit() and int(step) < 0xFFFFFFF0 else "")


def _shared_by_slurm_job(parent: Path, env: Mapping[str, str]) -> str:
    name = slurm_name(env)
    path = parent / name
    restarted = int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if int(env.get("SLURM_PROCID", "0")) != 0:
        deadline = time.monotonic() + WAIT_S
        while not path.is_dir():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SLURM task {env.get('SLURM_PROCID')}: rank 0 did not create {path} in {WAIT_S:.0f} s"
                )
            time.sleep(0.5)
        return str(path)
    if restarted:  # the requeued job continues in its directory (Lightning resumes its hpc_ckpt)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        # the other tasks only know this one name: taking another would split the run
        parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(
                f"{path} exists although SLURM job {name} was not requeued; remove it or set hydra.run.dir"
            ) from None
        return str(path)
    return str(claim(parent, name))  # one task: a second run in the same job gets name_1


class RunDirCallback(Callback):
    """A Hydra callback (``hydra.callbacks.run_dir``) that only exists to be imported: Hydra
    instantiates callbacks before it resolves the run directory, in every process, and
    unpickles them in submitit jobs, so the ``sedsft.unique_dir`` resolver is always
    registered where a config names it."""


OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True, replace=True)
