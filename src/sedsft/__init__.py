"""sedsft: supervised fine-tuning with pluggable token-level losses (SED-SFT and baselines),
then GRPO, then evaluation. See the README's Layout section for the package map."""

IGNORE_INDEX = -100  # label of positions that take no part in any loss (prompt, padding)
