"""Figures and the summary table of a pipeline grid, drawn from its run records:

    python src/plots.py grid_dir=<sweep dir> out_dir=<dir> [figures=[pass_at_k,rl_reward]]

Writes ``summary.md`` (mean ± 95% t-interval per loss over seeds, paired differences to CE by
seed) and one PNG per figure whose inputs the grid holds; a figure without them is named
with the reason (``sedsft.reporting``). Knobs: ``configs/plots.yaml``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sedsft.utils.cli import preflight

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

EXAMPLE = "python src/plots.py grid_dir=logs/pipeline/multiruns/<timestamp> out_dir=plots"


@hydra.main(version_base="1.3", config_path="../configs", config_name="plots.yaml")
def main(cfg: DictConfig) -> None:
    from sedsft.reporting.records import NotAGridError

    try:
        from sedsft.reporting.report import write_report
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        raise SystemExit("error: the figures need matplotlib (in the dev extra): pip install -e '.[dev]'") from None

    out_dir = cfg.out_dir if cfg.out_dir is not None else Path(cfg.grid_dir) / "plots"
    names = list(cfg.figures) if cfg.figures is not None else None
    try:
        report = write_report(cfg.grid_dir, out_dir, names, reference=str(cfg.reference), dpi=int(cfg.dpi))
    except (NotAGridError, ValueError) as err:  # not a grid, an unknown figure, a broken record: one message
        raise SystemExit(f"error: {err}") from None
    print(report.markdown)
    for path in report.written.values():
        print(f"wrote {path}")
    for name, why in report.skipped.items():
        print(f"skipped {name}: {why}")
    print(f"wrote {report.table}")


if __name__ == "__main__":
    preflight("plots.yaml", {"grid_dir": (
        lambda cfg: OmegaConf.is_missing(cfg, "grid_dir"),
        "the pipeline grid to plot (the sweep directory of python src/pipeline.py grid=...)",
        EXAMPLE,
    )})  # fmt: skip
    main()
