"""The benchmark scripts run at a tiny shape and print their tables; vs_peers' check that
sedsft, Hugging Face Trainer and TRL train on the same tokens holds and catches a
difference. Timings are not asserted (they belong to docs/performance.md, measured on purpose)."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from conftest import ROOT

BENCH = ROOT / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling module `measure`
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_losses_benchmark_table(capsys, monkeypatch):
    losses = load("losses")
    monkeypatch.chdir(BENCH)  # its subprocesses run `python losses.py` with measure beside
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    argv = ["--n", "48", "--v", "300", "--d", "8", "--repeats", "2", "--paths", "chunked,fused"]
    results = losses.main([*argv, "--losses", "sed,label_smoothing", "--no-memory"])
    out = capsys.readouterr().out
    assert re.search(r"load average [\d.]+ [\d.]+ [\d.]+ before, [\d.]+ [\d.]+ [\d.]+ after", out)
    assert "threads=1 repeats=2" in out
    rows = [line.split() for line in out.splitlines() if line[:4] in ("ce  ", "sed ", "labe")]
    assert [r[:2] for r in rows] == [
        ["ce", "chunked"], ["ce", "fused"], ["sed", "chunked"], ["sed", "fused"],
        ["label_smoothing", "chunked"], ["label_smoothing", "fused"],
    ]  # fmt: skip
    for row in rows[:2]:  # CE against itself: ratio 1 in both clocks
        assert row[3] == "1.00" and row[5] == "1.00"
    for name in ("ce", "sed", "label_smoothing"):
        for path in ("chunked", "fused"):
            cell = results[name][path]
            assert cell["time_s"] > 0 and cell["cpu_s"] > 0 and "peak_bytes" not in cell

    memory = losses.main([*argv, "--losses", "ce", "--paths", "fused", "--no-time"])
    assert memory["ce"]["fused"]["peak_bytes"] > 0 and "time_s" not in memory["ce"]["fused"]


def test_vs_peers_tiny_shape_table_and_token_check(capsys, cache_dir):
    vs_peers = load("vs_peers")
    argv = ["--shape", "tiny", "--steps", "2", "--rounds", "1", "--warmup-rounds", "0"]
    argv += ["--batch", "2", "--seq-len", "160", "--cache-dir", str(cache_dir / "models")]
    argv += ["--memory", "inline"]  # the fresh-process memory runs are left to the script
    results = vs_peers.main(argv)
    out = capsys.readouterr().out
    assert re.search(r"load avg [\d.]+ before, [\d.]+ after", out)
    header = next(line for line in out.splitlines() if line.startswith("system"))
    assert [c.strip() for c in header.split("|")] == [
        "system", "tokens/s", "/hf", "/trl", "peak MiB", "/hf", "/trl", "first step s",
        "final loss",
    ]  # fmt: skip
    table = [line.split("|")[0].strip() for line in out.splitlines() if " | " in line]
    assert table[1:] == ["sedsft-ce", "sedsft-sed", "hf", "trl"]
    assert re.search(r"token check: 4 systems fed identical input ids \(\d+ tokens\)", out)
    assert "final CE agrees across sedsft-ce, hf, trl" in out
    records = {name: runs[0]["record"] for name, runs in results.items()}
    assert all(len(r.targets) == 2 for r in records.values())
    # Each conversation holds at least one whole turn; its reply tokens are targets.
    assert all(int((t != -100).sum()) > 0 for t in records["trl"].targets)

    # The check is real: one target token moved (as a template mismatch would) is caught.
    records["trl"].targets[1] = records["trl"].targets[1].clone()
    row, col = (records["trl"].targets[1] != -100).nonzero()[-1].tolist()
    records["trl"].targets[1][row, col] = -100
    with pytest.raises(AssertionError, match="step 2: trl trained on other targets"):
        vs_peers.check_same_tokens(records)
    assert torch.get_num_threads() <= 2  # the script restores the session's threads
