"""Tiny seeded Qwen2 checkpoints in Hugging Face format (see `scripts.fixtures_llama` for how they are drawn).

Cases:
    qwen2_lm    Qwen2ForCausalLM, safetensors, biases on the query/key/value projections, a tied head (as
                Qwen2.5-1.5B), YaRN RoPE in transformers 5's `rope_parameters`, and a sliding window of 4 on the
                layers from `max_window_layers=1` on (`use_sliding_window`): layer 0 full, layer 1 windowed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.base.archs.qwen2 import Qwen2Config
from scripts.fixtures_llama import SEED, build, hf_config


def qwen2_lm(directory: Path) -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    config = hf_config("qwen2", "Qwen2ForCausalLM", tie_word_embeddings=True, rope_parameters=rope,
                       use_sliding_window=True, sliding_window=4, max_window_layers=1, hidden_act="silu",
                       bos_token_id=93, eos_token_id=95)
    build(directory, config, SEED + 10, Qwen2Config)


CASES: dict[str, Callable[[Path], object]] = {"qwen2_lm": qwen2_lm}

# The encoders this decoder pairs with in the heavy generic tests (test_pairs, test_training); it composes with every
# encoder in parity_tests/test_rotary_decoders.py.
HEAVY_ENCODERS = ("hubert",)
