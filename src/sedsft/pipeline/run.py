"""One pipeline job: SFT with a loss, then GRPO from its export, in one process.

Each stage is composed from its own entry config (``train.yaml``, ``rl.yaml``) with the
overrides listed under ``sft.overrides`` / ``rl.overrides`` plus the job's ``loss`` and
``seed``, and writes into ``<job dir>/sft`` and ``<job dir>/rl`` exactly what
``src/train.py`` and ``src/rl.py`` would. On toy data the ``positions`` stage measures, on
held-out solutions, where SED's mask falls (free style positions vs determined digits and
template words) for the base and the SFT model (``sedsft.evaluation.positions``). The RL
stage evaluates the held-out prompts before its first update (the SFT policy) and after its
last, with the same sampling, so both columns of the result come from one protocol. ``<job dir>/pipeline.json`` records the
job's loss, seed and both stages' metrics; a finished stage is not run again when the
job is relaunched (its ``metrics.json`` exists), so a killed grid resumes per stage, and an RL
stage killed midway continues from its newest checkpoint. A relaunch must ask for the same
job (``<job dir>/job.json``: loss, knobs, seed; ``sedsft.pipeline.job``), else it is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sedsft.pipeline.job import claim_job_dir, job_identity
from sedsft.pipeline.stages import (
    loss_label,
    release_gpu_memory,
    stage_config,
    stage_experiment,
    stage_overrides,
)

log = logging.getLogger(__name__)

STAGES = ("sft", "positions", "rl", "routes", "eval")  # routes: the routes task's report (sedsft.pipeline.routes); eval: src/eval.py on the job's policies (sedsft.pipeline.evaluation)
# what a pipeline job keeps of each stage's metrics.json, under <stage>/<key>
RL_KEYS_BEFORE = "heldout_before/"  # held-out metrics of the SFT policy (before RL)
RL_KEYS_AFTER = "heldout/"  # held-out metrics after RL












def check_replaced_overrides(cfg: DictConfig) -> None:
    """Refuse a command-line ``<stage>.overrides=[...]`` that drops entries of the stage's base
    (``experiment=toy`` ...): a user adding one knob that way would silently run another
    experiment. ``<stage>.add`` adds knobs; ``<stage>.replace=true`` replaces on purpose."""
    given = list(HydraConfig.get().overrides.task)
    replaced = [s for s in ("sft", "rl", "eval") if s in cfg and any(o.lstrip("+~").startswith(f"{s}.overrides=") for o in given)]
    replaced = [s for s in replaced if not cfg[s].get("replace", False)]
    if not replaced:
        return
    base = stage_config("pipeline", [o for o in given if not o.lstrip("+~").startswith(tuple(f"{s}.overrides=" for s in replaced))])
    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    for stage in replaced:
        kept = {key(o) for o in cfg[stage].overrides}  # experiment=routes in place of experiment=toy is a choice
        dropped = [o for o in base[stage].overrides if key(o) not in kept]
        if dropped:
            raise ValueError(
                f"{stage}.overrides={list(cfg[stage].overrides)} replaces the stage's base overrides and drops {dropped}, "
                f"so the {stage} stage would run another experiment. To add knobs keep the base: "
                f"{stage}.add=[...]; to replace the base on purpose add {stage}.replace=true"
            )




def run_stage(cfg: DictConfig, stage: str, job_dir: Path) -> dict[str, float]:
    """Run ``stage`` unless its ``metrics.json`` exists; returns its metrics."""
    out = job_dir / stage / "metrics.json"
    if out.is_file():
        log.info("%s: already done (%s), not run again", stage, out)
        return json.loads(out.read_text())
    if stage == "positions":
        return run_positions(cfg, job_dir)
    if stage == "routes":
        from sedsft.pipeline.routes import run_routes

        return run_routes(cfg, job_dir)
    if stage == "eval":
        from sedsft.pipeline.evaluation import run_eval

        return run_eval(cfg, job_dir)
    stage_cfg = stage_config("train" if stage == "sft" else "rl", stage_overrides(cfg, stage, job_dir))
    if stage == "sft" and OmegaConf.select(stage_cfg, "logger.tensorboard") is not None:
        # The stage is composed inside the pipeline's Hydra run, whose choices have no
        # experiment: name the TensorBoard run by the stage's own (<experiment>/<loss>/seed<seed>).
        stage_cfg.logger.tensorboard.name = stage_experiment(stage_overrides(cfg, stage, job_dir))
    (job_dir / stage).mkdir(parents=True, exist_ok=True)
    (job_dir / stage / "config.yaml").write_text(OmegaConf.to_yaml(stage_cfg, resolve=True))
    first = job_dir / stage / ".hydra" / "config.yaml"  # as src/rl.py keeps it: a resume checks its knobs against it
    if stage == "rl" and not first.is_file():
        first.parent.mkdir(exist_ok=True)
        first.write_text(OmegaConf.to_yaml(stage_cfg))
    log.info("%s: starting in %s", stage, job_dir / stage)
    if stage == "rl" and stage_cfg.get("resume"):
        log.info("rl: an earlier launch of this job stopped during RL; continuing from its newest checkpoint")
    if stage == "sft":
        from sedsft.sft.training import train
    else:
        from sedsft.rl.training import train
    return train(stage_cfg)




def run_positions(cfg: DictConfig, job_dir: Path) -> dict[str, float]:
    """Mask rate, top-k mass and accuracy per position kind (style / number / text) of the
    base and the SFT model on the SFT run's held-out toy problems, under the mask the report
    asks of SED's loss (``positions.report_loss``: the SFT loss's own threshold when it fixes
    one, else calibrated on the base); writes
    ``<job dir>/positions/metrics.json``. Empty (with a warning) on data other than the toy."""
    import hydra

    from sedsft.checkpoints import load_model
    from sedsft.data import toy_math
    from sedsft.evaluation.positions import position_report, report_loss

    train_cfg = stage_config("train", stage_overrides(cfg, "sft", job_dir))
    val = train_cfg.data.get("val")
    if val is None or not str(val.get("_target_", "")).endswith(("ToyMathSource", "RoutesSource")):
        log.warning("positions: the SFT data is not the toy (data.val=%s); no position report", val)
        return {}
    n = min(int(cfg.positions.num_examples), int(val.n))
    if str(val._target_).endswith("RoutesSource"):  # the routes task: its own calibration split
        table = hydra.utils.instantiate(val).load()
        rows = [table[i] for i in range(n)]
    else:
        style_weights = OmegaConf.to_container(val.style_weights) if val.get("style_weights") else None
        rows = toy_math.generate(n, seed=int(val.seed), style_weights=style_weights)
    spec = hydra.utils.instantiate(train_cfg.model)
    base = (spec.load_model(), spec.load_tokenizer())
    tuned = load_model(job_dir / "sft")
    mask = report_loss(
        OmegaConf.to_container(train_cfg.loss, resolve=True), int(cfg.positions.top_k), float(cfg.positions.cumsum_ratio)
    )
    metrics = position_report(base, tuned, rows, mask)
    out = job_dir / "positions" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("positions: wrote %s", out)
    return metrics


def check_rl_stage(cfg: DictConfig, job_dir: Path) -> None:
    """The RL stage's knobs (``sedsft.rl.checks``), checked when the job starts."""
    from sedsft.rl.checks import validate_rl_config

    try:
        validate_rl_config(stage_config("rl", stage_overrides(cfg, "rl", job_dir)))
    except ValueError as err:
        raise ValueError(f"rl stage: {err}") from None


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """SFT then RL for ``cfg.loss`` and ``cfg.seed``; returns and writes ``pipeline.json``."""
    job_dir = Path(cfg.paths.output_dir)
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ValueError(f"stages={list(cfg.stages)}: unknown stage {stage!r}; allowed: {list(STAGES)}")
    check_replaced_overrides(cfg)  # sft.overrides=[one knob] must not drop experiment=toy silently
    claim_job_dir(job_dir, job_identity(cfg, loss_label()))  # refuses another loss, knob or seed
    if "rl" in cfg.stages and not (job_dir / "rl" / "metrics.json").is_file():
        check_rl_stage(cfg, job_dir)  # a bad grpo.* knob stops the job before SFT, not after it
    if "eval" in cfg.stages and not (job_dir / "eval" / "metrics.json").is_file():
        from sedsft.pipeline.evaluation import check_eval_stage

        check_eval_stage(cfg, job_dir)  # likewise a bad benchmark knob
    results: dict[str, dict[str, float]] = {}
    for stage in cfg.stages:
        results[stage] = run_stage(cfg, stage, job_dir)
        release_gpu_memory()
    record = {
        "loss": loss_label(),
        "loss_name": HydraConfig.get().runtime.choices["loss"],
        "seed": int(cfg.seed),
        "metrics": results,
    }
    (job_dir / "pipeline.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    print(job_report(record, job_dir), flush=True)
    return record


def job_report(record: dict[str, Any], job_dir: Path) -> str:
    """The table a job prints last: the held-out metrics of the SFT policy and of the RL
    policy side by side (same prompts, same sampling), then the key."""
    from sedsft.rl.console import HELDOUT_SHOWN
    from sedsft.utils.console import METRIC_KEY, format_columns

    rl = record["metrics"].get("rl") or {}
    columns = {
        "after SFT": {k: rl[RL_KEYS_BEFORE + k] for k in HELDOUT_SHOWN if RL_KEYS_BEFORE + k in rl},
        "after RL": {k: rl[RL_KEYS_AFTER + k] for k in HELDOUT_SHOWN if RL_KEYS_AFTER + k in rl},
    }
    title = f"{record['loss']}, seed {record['seed']}: held-out"
    return "\n".join([format_columns(columns, title), f"all metrics: {job_dir / 'pipeline.json'}", METRIC_KEY])
