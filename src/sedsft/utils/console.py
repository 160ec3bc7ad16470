"""What every entry point prints: one line per event, a final table, and a key to it.

Shared by train, rl, eval, export and pipeline, so their terminals read alike: the run
directory first, one line per event, progress bars only where work is long, a table of
final metrics last with :data:`METRIC_KEY` under it.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

# What the metric names mean and which way is better (printed under every final table).
METRIC_KEY = (
    "key: pass@k = share of prompts with a correct answer among k samples, avg@k = mean accuracy of "
    "the k samples (higher is better); distinct_n, entropy = diversity (higher = more diverse); "
    "self_bleu = overlap between samples (lower = more diverse); loss (lower is better)"
)

LIBRARY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing <product>" adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def configure_console() -> None:
    """One line per event on the terminal; idempotent, called at the start of a run.

    - Lightning attaches its own stderr handler (``INFO: ...``) to the ``lightning``
      logger; under Hydra the root logger prints the same record again. When the root
      logger has handlers, Lightning's are removed and its records propagate to them.
    - Lightning's "Tip" adverts for other products are filtered out.
    - Lightning 2.6 builds ``torch.utils._pytree.LeafSpec()``, which torch 2.13 deprecates,
      on every data loader (``lightning/pytorch/utilities/_pytree.py``): nothing in this
      project can change that call, so that one FutureWarning is ignored (remove the
      filter once Lightning uses ``treespec_leaf``).
    """
    root = logging.getLogger()
    if root.handlers:
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler and handler not in root.handlers:
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )

    # transformers 5 deprecates is_gradient_checkpointing, which TRL 1.16's GRPOTrainer still
    # calls on every step; nothing here calls it (remove the filter once TRL uses the new name).
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Bars for work that takes a blink here (loading and saving weights, tokenising a data
    # set); the stages log a line for each instead. Training and sampling keep their bars.
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def announce_run_directory(path) -> None:
    """The first line of every stage: where its outputs go (once: on the main process)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"run directory: {Path(path).resolve()}", flush=True)


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value + 0.0:.4f}"  # + 0.0: no "-0.0000"


def format_table(metrics: Mapping[str, float], title: str) -> str:
    """``title`` then one ``name  value`` row per metric, names aligned."""
    if not metrics:
        return f"{title}: none"
    width = max(map(len, metrics))
    rows = [f"  {name:<{width}}  {_cell(value)}" for name, value in metrics.items()]
    return "\n".join([f"{title}:", *rows])


def format_columns(columns: Mapping[str, Mapping[str, float]], title: str) -> str:
    """``title`` then one row per metric and one column per stage (e.g. before / after RL);
    a metric a column lacks shows ``-``."""
    names = list(dict.fromkeys(name for column in columns.values() for name in column))
    if not names:
        return f"{title}: none"
    width = max(map(len, names))
    heads = list(columns)
    cell = max(10, *map(len, heads))
    rows = [f"  {'':<{width}}  " + "  ".join(f"{h:>{cell}}" for h in heads)]
    for name in names:
        rows.append(f"  {name:<{width}}  " + "  ".join(f"{_cell(columns[h].get(name)):>{cell}}" for h in heads))
    return "\n".join([f"{title}:", *rows])
