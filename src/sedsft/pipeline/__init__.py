"""The paper's whole protocol per (loss, seed): SFT, then GRPO from the SFT policy, with
held-out evaluation before and after RL; and the summary across seeds."""
