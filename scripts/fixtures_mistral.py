"""Tiny seeded Mistral checkpoints in Hugging Face format (see `scripts.fixtures_llama` for how they are drawn).

Cases:
    mistral_lm  MistralForCausalLM, safetensors, untied head, grouped-query attention, `rope_theta` 1e6, and a
                sliding window of 4 on every layer: shorter than the test sequences, so that it changes the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.base.archs.mistral import MistralConfig
from scripts.fixtures_llama import SEED, build, hf_config


def mistral_lm(directory: Path) -> None:
    config = hf_config("mistral", "MistralForCausalLM", sliding_window=4, head_dim=None, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=1, eos_token_id=2)
    build(directory, config, SEED + 20, MistralConfig)


CASES: dict[str, Callable[[Path], object]] = {"mistral_lm": mistral_lm}

# The rotary families share the decoder core's code: Qwen2 and Gemma 2 (between them: query/key/value biases,
# grouped-query cross-attention, sliding windows, soft-capping, sandwich norms) take part in the heavy generic tests
# (test_pairs, test_training; Qwen2 test_scan) for all four; this one composes with every encoder in
# parity_tests/test_rotary_decoders.py and is checked against transformers in test_goldens.py.
HEAVY_ENCODERS: tuple[str, ...] = ()
SCANNED = False
