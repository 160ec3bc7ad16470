"""Lightning callbacks of the SFT stage, one concern each, chosen in ``configs/callbacks/``:
checkpoints to resume from, a checkpoint on an exception, validation at the last step,
metrics of sampled completions, and the Hugging Face export."""
