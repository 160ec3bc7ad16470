"""Generation-time evaluation: sampling k completions per prompt and scoring them.

``src/eval.py``'s run (``run.evaluate``) in its order: the prompt sets (``eval_sets``, the
benchmarks in ``benchmarks``), the policy behind a generation backend (``backends``), sampling
into ``samples.jsonl`` with resume (``records``), scoring (``evaluate``), tables and files
(``tables``). ``sampling`` (``SamplingSettings``, the HF sampler, entropy pooling) and
``evaluate.score_samples`` also serve the SFT and RL stages' evaluations during training.
"""
