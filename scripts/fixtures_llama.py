"""Tiny seeded Llama checkpoints in Hugging Face format, and the builder the Qwen2, Mistral and Gemma 2 fixtures share.

The tensors are named and shaped as transformers' `...ForCausalLM` stores them (written out here from the
modeling files, not from this toolkit's key tables, so that the tables are checked against them), every one drawn
from a seeded generator.

Cases:
    llama_lm        LlamaForCausalLM, safetensors, untied head, grouped-query attention (4 query heads, 2 key/value
                    heads), `rope_scaling` llama3 in the pre-transformers-5 spelling (with a top-level
                    `rope_theta`), sized so that every band of the llama3 rule is hit (one frequency kept, one
                    blended, two divided).
    llama_tied_bf16 A tied head (no `lm_head.weight` in the file), biases on every attention projection and on the
                    MLP (`attention_bias`, `mlp_bias`), weights stored in bfloat16, a list of eos ids and Llama 3.x's
                    sampling `generation_config.json` (temperature 0.6, top-p 0.9).
    llama_bin_sharded
                    LlamaModel names (no `model.` prefix, no head) in two `pytorch_model-*.bin` shards with the
                    per-layer `rotary_emb.inv_freq` buffers older transformers saved, linear RoPE scaling, a
                    tied head.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.llama import LlamaConfig, RotaryDecoderConfig
from scripts.fixture_io import save_hf_checkpoint

SEED = 20260102
# Embeddings and an untied head drawn wide, and the sub-layers' output projections drawn large against the
# embeddings, so that the logits' argmax changes along a sequence (a tied head otherwise repeats its input token).
EMBED_STD = 0.5
OUTPUT_GAIN = 4.0

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def hf_config(model_type: str, architecture: str, **overrides: Any) -> dict[str, Any]:
    """A config.json dict with the fields transformers 5 writes for every family of this builder."""
    config = dict(
        TINY,
        model_type=model_type,
        architectures=[architecture],
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_cache=True,
        tie_word_embeddings=False,
        dtype="float32",
        transformers_version="5.24.0",
    )
    config.update(overrides)
    return config


def tensor_shapes(config: RotaryDecoderConfig, layer_norms: tuple[str, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of `...ForCausalLM` for `config`, as transformers' modeling files make them."""
    d, h, inner = config.hidden_size, config.head_size, config.intermediate_size
    q, kv = config.num_attention_heads * h, config.num_kv_heads * h
    yield "model.embed_tokens.weight", (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for proj, out, inp, bias in (("q_proj", q, d, config.bias_qkv), ("k_proj", kv, d, config.bias_qkv),
                                     ("v_proj", kv, d, config.bias_qkv), ("o_proj", d, q, config.bias_o)):
            yield f"{layer}self_attn.{proj}.weight", (out, inp)
            if bias:
                yield f"{layer}self_attn.{proj}.bias", (out,)
        for proj, out, inp in (("gate_proj", inner, d), ("up_proj", inner, d), ("down_proj", d, inner)):
            yield f"{layer}mlp.{proj}.weight", (out, inp)
            if config.bias_mlp:
                yield f"{layer}mlp.{proj}.bias", (out,)
        for norm in layer_norms:
            yield f"{layer}{norm}.weight", (d,)
    yield "model.norm.weight", (d,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, d)


def random_state(config: RotaryDecoderConfig, layer_norms: tuple[str, ...], seed: int,
                 embed_std: float = EMBED_STD) -> dict[str, torch.Tensor]:
    """Every weight drawn from `seed`: embeddings and the head wide, linear weights at 1/sqrt(fan-in), biases
    small, norm scales around 1 (Gemma's `1 + weight` around 0)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in tensor_shapes(config, layer_norms):
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            state[name] = (1.0 - config.norm_offset) + 0.2 * noise
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = embed_std * noise
        elif name.endswith(".bias"):
            state[name] = 0.1 * noise
        else:
            gain = OUTPUT_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            state[name] = gain * noise / math.sqrt(shape[1])
    return state


def inv_freq_buffers(config: RotaryDecoderConfig, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The per-layer `rotary_emb.inv_freq` buffers transformers < 4.36 saved (dropped when read)."""
    inv_freq = torch.from_numpy(config.rotary_frequencies()[0])
    return {f"{prefix}layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
            for i in range(config.num_hidden_layers)}


def build(directory: Path, config: dict[str, Any], seed: int, config_class: type[RotaryDecoderConfig] = LlamaConfig,
          layer_norms: tuple[str, ...] = LLAMA_NORMS, dtype: torch.dtype = torch.float32, fmt: str = "safetensors", shards: int = 1, prefix: str = "model.",
          extra: Callable[[RotaryDecoderConfig], dict[str, torch.Tensor]] | None = None,
          embed_std: float = EMBED_STD) -> None:
    """Writes one checkpoint: `config`'s weights from `seed` in `dtype`, `prefix` in place of `model.` (a
    `...Model` file has none), plus `extra(config)` tensors."""
    typed = config_class.from_hf_dict(config)
    state = {k: v.to(dtype) for k, v in random_state(typed, layer_norms, seed, embed_std).items()}
    if prefix != "model.":
        state = {(prefix + k.removeprefix("model.")): v for k, v in state.items() if k != "lm_head.weight"}
    if extra is not None:
        state.update(extra(typed))
    save_hf_checkpoint(directory, state, config, fmt=fmt, shards=shards)


def llama_lm(directory: Path) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    build(directory, hf_config("llama", "LlamaForCausalLM", rope_scaling=rope, rope_theta=10000.0,
                               bos_token_id=1, eos_token_id=2, hidden_act="silu"), SEED)


# Llama 3.x's generation_config.json: sampling settings and several end-of-sequence ids.
LLAMA3_GENERATION = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2, 94], "temperature": 0.6, "top_p": 0.9,
                     "transformers_version": "5.24.0"}


def llama_tied_bf16(directory: Path) -> None:
    config = hf_config("llama", "LlamaForCausalLM", tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                       bos_token_id=1, eos_token_id=[2, 94], dtype="bfloat16",
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    build(directory, config, SEED + 1, dtype=torch.bfloat16)
    (directory / "generation_config.json").write_text(json.dumps(LLAMA3_GENERATION, indent=2) + "\n")


def llama_bin_sharded(directory: Path) -> None:
    config = hf_config("llama", "LlamaModel", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=10000.0)
    build(directory, config, SEED + 2, fmt="bin", shards=2, prefix="",
          extra=lambda typed: inv_freq_buffers(typed, prefix=""))


CASES: dict[str, Callable[[Path], object]] = {
    "llama_lm": llama_lm,
    "llama_tied_bf16": llama_tied_bf16,
    "llama_bin_sharded": llama_bin_sharded,
}

# The rotary families share the decoder core's code: Qwen2 and Gemma 2 (between them: query/key/value biases,
# grouped-query cross-attention, sliding windows, soft-capping, sandwich norms) take part in the heavy generic tests
# (test_pairs, test_training; Qwen2 test_scan) for all four; this one composes with every encoder in
# parity_tests/test_rotary_decoders.py and is checked against transformers in test_goldens.py.
HEAVY_ENCODERS: tuple[str, ...] = ()
SCANNED = False
