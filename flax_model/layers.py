"""Small pieces shared by the Flax architectures: activations, attention masks, decoder positions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_model.cache import DecoderCache, LayerCache

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def frame_mask(encoder_config: Any, attention_mask: jax.Array, num_frames: int,
               add_adapter: bool | None = None) -> jax.Array:
    """Which of an encoder's output frames hold real audio, from the sample-level mask.

    Args:
        encoder_config: an `EncoderConfig` (its `output_lengths` counts frames, adapter included by default).
        attention_mask: [B, N], 1 for real samples (right padding).
        num_frames: S, the number of frames of the padded batch.
        add_adapter: passed to `output_lengths` (False: the frames before an adapter).

    Returns:
        [B, S] bool, True for the first `output_lengths(sum(attention_mask))` frames of each row.
    """
    lengths = encoder_config.output_lengths(attention_mask.sum(-1).astype(jnp.int32), add_adapter)  # [B]
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def layer_drop(module: Any, rate: float, deterministic: bool) -> jax.Array | bool:
    """LayerDrop: whether `module`'s layer is skipped in this call (training only).

    One uniform draw per layer per call from the module's "dropout" PRNG stream, so that a compiled training
    step draws anew at every step (Python's `random` would be frozen into the trace). Use as
    `hidden = jnp.where(layer_drop(self, rate, deterministic), hidden, layer(hidden))`.
    """
    if deterministic or rate <= 0.0:
        return False
    return jax.random.uniform(module.make_rng("dropout"), ()) < rate


def make_causal_mask(query_positions: jax.Array, key_length: int) -> jax.Array:
    """[T] absolute query positions, key length L -> [T, L] bool, True where the key is not in the future."""
    return jnp.arange(key_length)[None, :] <= query_positions[:, None]


def make_attention_mask(causal: jax.Array | None, key_mask: jax.Array) -> jax.Array:
    """Causal [T, S] | None and key padding [B, S] -> [B, 1, T|1, S] bool (True = attend)."""
    mask = key_mask.astype(bool)[:, None, None, :]
    return mask if causal is None else mask & causal[None, None]


def decoder_positions(start: jax.Array | int, length: int) -> jax.Array:
    """Absolute positions of `length` new tokens written from `start`: [T] int32."""
    return start + jnp.arange(length, dtype=jnp.int32)


def decoder_self_mask(attention_mask: jax.Array | None, positions: jax.Array, batch: int,
                      key_length: int) -> jax.Array:
    """Causal self-attention mask of T new tokens at `positions` [T] over L key slots -> [B, 1, T, L] bool.

    `attention_mask` marks real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
    """
    if attention_mask is None:
        attention_mask = jnp.ones((batch, key_length), dtype=bool)
    elif attention_mask.shape[1] != key_length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions, expected {key_length} "
                         "(with a cache it covers every cache slot)")
    return make_attention_mask(make_causal_mask(positions, key_length), attention_mask)


def decoder_cross_mask(cache: DecoderCache | None, encoder_hidden_states: jax.Array | None,
                       encoder_attention_mask: jax.Array | None) -> jax.Array | None:
    """Cross-attention mask [B, 1, 1, S]: the cache's encoder mask, else the given one (all real by
    default), else None when there is no encoder output to attend to."""
    if cache is not None:
        return make_attention_mask(None, cache.encoder_mask)
    if encoder_hidden_states is None:
        return None
    if encoder_attention_mask is None:
        encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
    return make_attention_mask(None, encoder_attention_mask)


def run_layers(layers, hidden: jax.Array, self_mask: jax.Array, encoder_hidden_states: jax.Array | None,
               cross_mask: jax.Array | None, cache: DecoderCache | None,
               deterministic: bool) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
    """Runs a decoder's layers in order, each on its own slice of the cache; hidden [B, T, D].

    Returns:
        (hidden [B, T, D], the layers' new caches, or None without a cache).
    """
    index = cache.index if cache is not None else 0
    new_layers = []
    for i, layer in enumerate(layers):
        layer_cache = cache.layers[i] if cache is not None else None
        hidden, new_layer_cache = layer(hidden, self_mask, encoder_hidden_states, cross_mask, layer_cache, index,
                                        deterministic)
        new_layers.append(new_layer_cache)
    return hidden, (tuple(new_layers) if cache is not None else None)
