"""What every stage does when a scheduler pre-empts it: exit with the status a shell gives
a process ended by SIGTERM, after printing the command that resumes the run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

# 128 + SIGTERM. Lightning ends a fit stopped by SIGTERM with SystemExit(None), i.e. status 0,
# and TRL's trainer does not stop at all: a scheduler would record a pre-empted job as done.
PREEMPTED_EXIT_CODE = 143


def resume_command(checkpoint: Path | str, knob: str = "ckpt_path", script: str = "src/train.py") -> str:
    """This run's command line with ``<knob>=<checkpoint>`` (any earlier one replaced); the
    overrides are Hydra's for this run, the script the one that runs (else ``script``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started by a Hydra main
        overrides = []
    kept = [o for o in overrides if not o.lstrip("+~").startswith(f"{knob}=")]
    running = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else script
    return shlex.join(["python", running, *kept, f"{knob}={checkpoint}"])
