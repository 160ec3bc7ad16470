"""The SFT stage (``src/train.py``): the LightningModule, its run, checks, logging and
strategies.

- ``module``: ``SFTModule``, a causal LM trained with a loss from ``sedsft.losses``.
- ``training``: build everything from the config, fit, test, write the run's metrics.
- ``checks``: the config's knobs and data files, checked before anything is built.
- ``logging``: where every number, histogram and text panel of a run goes.
- ``strategies``: FSDP / DeepSpeed for Hugging Face models from YAML.
- ``callbacks``: checkpoints, validation at the end, generation metrics, the export.
"""
