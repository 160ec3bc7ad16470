"""Models: Hugging Face loading, the embedded tiny model, the LightningModule."""
