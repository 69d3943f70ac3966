"""Tiny seeded Gemma 2 checkpoints in Hugging Face format (see `scripts.fixtures_llama` for how they are drawn).

Cases:
    gemma2_lm   Gemma2ForCausalLM, safetensors, tied head, `head_dim` 16 (not hidden_size / heads = 8),
                `query_pre_attn_scalar` 12 (not head_dim), soft-capping small enough to bend the tiny model's
                attention scores (2.0) and logits (1.0), layers alternating between a sliding window of 4
                (layer 0) and full attention (layer 1), and the `1 + weight` norms drawn around 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.base.archs.gemma2 import Gemma2Config
from scripts.fixtures_llama import EMBED_STD, SEED, build, hf_config

GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def gemma2_lm(directory: Path) -> None:
    config = hf_config("gemma2", "Gemma2ForCausalLM", tie_word_embeddings=True, head_dim=16,
                       query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
                       sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                       hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, cache_implementation="hybrid")
    # Gemma multiplies its embeddings by sqrt(hidden_size): drawn smaller, they do not drown the layers' outputs.
    build(directory, config, SEED + 30, Gemma2Config, GEMMA2_NORMS, embed_std=EMBED_STD / 8)


CASES: dict[str, Callable[[Path], object]] = {"gemma2_lm": gemma2_lm}

# The encoders this decoder pairs with in the heavy generic tests (test_pairs, test_training); it composes with every
# encoder in parity_tests/test_rotary_decoders.py.
HEAVY_ENCODERS = ("wav2vec2_conformer",)
# Not in test_scan: scanned Gemma 2 differs from unrolled by float rounding (XLA reorders the arithmetic around the
# embedding scale; 4.6e-7 on logits of magnitude 1, gradients up to 1.1e-6 of their largest: README, "Scanned
# layers"), where the test holds bit-identical families to 1e-6. Qwen2 (alternating full and windowed layers,
# the window flag traced) is scanned for the rotary families.
SCANNED = False
