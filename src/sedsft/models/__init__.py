"""Models: what to load (``CausalLMSpec`` and its Hugging Face loading), the embedded tiny
model, LoRA, and compilation. The LightningModule that trains them is ``sedsft.sft.module``."""
