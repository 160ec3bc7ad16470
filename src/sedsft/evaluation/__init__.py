"""Generation-time evaluation: sampling k completions per prompt and scoring them."""
