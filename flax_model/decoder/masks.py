"""A decoder's attention masks and positions: small functions with their shapes in the signature."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_model.cache import DecoderCache


def decoder_positions(start: jax.Array | int, length: int) -> jax.Array:
    """Absolute positions of `length` new tokens written from `start`: [T] int32."""
    return start + jnp.arange(length, dtype=jnp.int32)


def make_causal_mask(query_positions: jax.Array, key_length: int, window: int | None = None) -> jax.Array:
    """[T] absolute query positions, key length L -> [T, L] bool, True where the key is not in the future (and,
    with a `window`, is one of the query's last `window` positions, itself included)."""
    keys = jnp.arange(key_length)[None, :]
    mask = keys <= query_positions[:, None]
    if window is not None:
        mask = mask & (keys > query_positions[:, None] - window)
    return mask


def make_attention_mask(causal: jax.Array | None, key_mask: jax.Array) -> jax.Array:
    """Causal [T, S] | None and key padding [B, S] -> [B, 1, T|1, S] bool (True = attend)."""
    mask = key_mask.astype(bool)[:, None, None, :]
    return mask if causal is None else mask & causal[None, None]


def key_padding(attention_mask: jax.Array | None, batch: int, key_length: int) -> jax.Array:
    """The decoder's real tokens over L key slots: `attention_mask` ([B, T] without a cache, [B, L] with one:
    every cache slot), all real when None."""
    if attention_mask is None:
        return jnp.ones((batch, key_length), dtype=bool)
    if attention_mask.shape[1] != key_length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions, expected {key_length} "
                         "(with a cache it covers every cache slot)")
    return attention_mask


def decoder_self_mask(attention_mask: jax.Array | None, positions: jax.Array, batch: int, key_length: int,
                      window: int | None = None) -> jax.Array:
    """Causal self-attention mask of T new tokens at `positions` [T] over L key slots -> [B, 1, T, L] bool."""
    keys = key_padding(attention_mask, batch, key_length)
    return make_attention_mask(make_causal_mask(positions, key_length, window), keys)


def decoder_cross_mask(cache: DecoderCache | None, encoder_hidden_states: jax.Array | None,
                       encoder_attention_mask: jax.Array | None) -> jax.Array | None:
    """Cross-attention mask [B, 1, 1, S]: the cache's encoder mask, else the given one (all real by default), else
    None when there is no encoder output to attend to (no states given, or a cache made without them)."""
    if cache is not None:
        return make_attention_mask(None, cache.encoder_mask) if cache.encoder_mask.shape[1] else None
    if encoder_hidden_states is None:
        return None
    if encoder_attention_mask is None:
        encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
    return make_attention_mask(None, encoder_attention_mask)
