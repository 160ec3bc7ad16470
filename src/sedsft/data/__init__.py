"""Data: row formats, chat tokenisation with assistant-only labels, sources, the DataModule."""
