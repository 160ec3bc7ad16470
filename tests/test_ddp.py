"""Two-process DDP on the CPU (gloo), launched by Lightning itself from ``src/train.py``.

One optimiser step of plain SGD (lr 1, no clipping, no schedule) makes the weight change
equal to the gradient, so the run can be compared with gradients computed here:

(a) the token normalisation across ranks: the update must be the sum of both ranks'
    token-loss gradients divided by the *global* target-token count, not the mean of the
    two ranks' per-rank means (which differs as soon as the ranks hold unequal token counts);
(b) SED's tau is calibrated once and broadcast: rank 1's model is disturbed while tau is
    calibrated (and restored before training), so rank 1 only ends up with rank 0's tau
    if it received it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from conftest import ROOT, compose_config
from sedsft.losses.sed import tau_from_topk_mass
from sedsft.losses.sed.calibration import collect_topk_mass
from sedsft.sft.training import build

N_TRAIN, N_VAL = 16, 8  # one micro-batch of 8 per rank = the whole training set in one step
COMMON = [
    "model.pretrain_steps=4",  # as conftest's shrink: a short toy pretraining of the embedded model
    "loss=sed",
    f"data.train.n={N_TRAIN}",
    f"data.val.n={N_VAL}",
    f"data.batch_size={N_TRAIN // 2}",
    "trainer.max_steps=1",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
    "trainer.gradient_clip_val=null",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "optimizer._target_=torch.optim.SGD",
    "~optimizer.betas",
    "~optimizer.eps",
    "optimizer.lr=1.0",
    "~scheduler",
    "logger=[]",
    "module.fused_loss=false",
]
DISTURB_SCALE = 4.0  # rank 1 multiplies its LM head by this during calibration


class RankProbe(L.Callback):
    """Writes, per rank, tau, the rows and target tokens of its batch, and the final weights.
    On rank 1 the LM head is scaled during ``on_fit_start`` (where tau is calibrated) and
    restored before the first step."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict = {"rows": [], "tokens": 0}

    def on_fit_start(self, trainer, pl_module):  # runs before the module's own on_fit_start
        if trainer.global_rank == 1:
            head = pl_module.model.get_output_embeddings().weight
            self._saved = head.detach().clone()
            head.data.mul_(DISTURB_SCALE)

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            pl_module.model.get_output_embeddings().weight.data.copy_(self._saved)
        self.record["tau"] = float(pl_module.loss_fn.tau)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["rows"] += batch["rows"].tolist()
        self.record["tokens"] += int((batch["labels"][:, 1:] != -100).sum())

    def on_train_end(self, trainer, pl_module):
        self.record["state"] = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def gradient_sum(module, datamodule, rows: list[int]) -> dict[str, torch.Tensor]:
    """Gradient of the summed token loss over the examples with source ``rows``."""
    dataset = datamodule.splits["train"].dataset
    index = {row: i for i, row in enumerate(dataset["row"])}
    examples = [dataset[index[r]] for r in rows]
    batch = datamodule.collator([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
    module.model.zero_grad(set_to_none=True)
    module.model_step(batch).loss_sum.backward()
    return {n: p.grad.detach().clone() for n, p in module.model.named_parameters()}


def test_ddp_two_ranks_normalises_over_global_tokens_and_shares_tau(tmp_path, cache_dir):
    # Reference first: the same model, data and loss in this process (this also builds the
    # embedded model into the cache, so the DDP run below only trains).
    cfg = compose_config(tmp_path / "ref", cache_dir, *COMMON, "callbacks=none", shrink=False)
    objects = build(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    datamodule.setup("fit")
    module.configure_model()
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    probe_dir = tmp_path / "probe"
    env = {**os.environ, "SEDSFT_CACHE": str(cache_dir), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    command = [
        sys.executable, "src/train.py", *COMMON,
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "callbacks=none", f"+callbacks.probe._target_={__name__}.RankProbe", f"+callbacks.probe.out={probe_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # The two ranks saw disjoint halves of the data with unequal token counts.
    rows = [r["rows"] for r in ranks]
    assert len(rows[0]) == len(rows[1]) == N_TRAIN // 2
    assert sorted(rows[0] + rows[1]) == list(range(N_TRAIN))
    n0, n1 = ranks[0]["tokens"], ranks[1]["tokens"]
    assert n0 != n1

    # (b) tau: one value on both ranks, the undisturbed single-process calibration.
    loss = module.loss_fn
    val = datamodule.splits["val"].dataset.select(range(min(loss.calib_num_examples, N_VAL)))
    batches = [datamodule.collator([{k: e[k] for k in ("input_ids", "labels")} for e in val])]
    module.eval()
    tau = tau_from_topk_mass(collect_topk_mass(module.model_step, batches, loss.calib_top_k or loss.top_k, loss.calib_positions), loss.cumsum_ratio)
    head = module.model.get_output_embeddings().weight
    head.data.mul_(DISTURB_SCALE)
    tau_disturbed = tau_from_topk_mass(collect_topk_mass(module.model_step, batches, loss.calib_top_k or loss.top_k, loss.calib_positions), loss.cumsum_ratio)
    head.data.div_(DISTURB_SCALE)
    module.train()
    assert abs(tau_disturbed - tau) > 1e-3, "the disturbance must change a locally calibrated tau"
    assert ranks[0]["tau"] == ranks[1]["tau"]
    assert abs(ranks[0]["tau"] - tau) < 1e-6

    # (a) one SGD step with lr 1: the update is the gradient of sum(token losses) / global tokens.
    loss.set_tau(ranks[0]["tau"])
    g0, g1 = gradient_sum(module, datamodule, rows[0]), gradient_sum(module, datamodule, rows[1])
    for rank in ranks:
        for name in g0:
            update = initial[name] - rank["state"][name]
            expected = (g0[name] + g1[name]) / (n0 + n1)
            # The update is read back from float32 weights: allow their rounding.
            atol = 4 * torch.finfo(torch.float32).eps * float(initial[name].abs().max())
            torch.testing.assert_close(update, expected, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    # ... and this comparison can fail: the per-rank-mean alternative is far off.
    gap_right = gap_wrong = 0.0
    for name in g0:
        update = initial[name] - ranks[0]["state"][name]
        gap_right += float(((g0[name] + g1[name]) / (n0 + n1) - update).norm() ** 2)
        gap_wrong += float(((g0[name] / n0 + g1[name] / n1) / 2 - update).norm() ** 2)
    print(f"tokens {n0} + {n1}; squared distance to the update: right {gap_right:.3g}, per-rank means {gap_wrong:.3g}")
    assert gap_wrong > 100 * gap_right
