"""The RL stage: GRPO after SFT on TRL's ``GRPOTrainer`` (``src/rl.py``).

- ``data``: RL prompt sets (toy, local verl parquet / jsonl, hub) -> TRL's dataset.
- ``rewards``: the project's answer checker as a TRL reward function (and for verl).
- ``callbacks``: TensorBoard under ``rl/`` and held-out evaluation at intervals.
- ``training``: GRPOConfig from ``cfg.grpo``, the trainer, resume, export, metrics.
- ``verl``: the equivalent verl command for the same settings.
"""
