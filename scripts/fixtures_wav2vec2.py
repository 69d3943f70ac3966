"""Tiny seeded wav2vec2 checkpoints in Hugging Face format (filled in by the wav2vec2 work)."""

CASES = {}
