"""Tiny seeded bart checkpoints in Hugging Face format (filled in by the bart work)."""

CASES = {}
