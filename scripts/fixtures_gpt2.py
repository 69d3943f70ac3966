"""Tiny seeded gpt2 checkpoints in Hugging Face format (filled in by the gpt2 work)."""

CASES = {}
