"""Lightning callbacks: Hugging Face export, generation-time evaluation."""
