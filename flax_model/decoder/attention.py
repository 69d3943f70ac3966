"""The decoder core's attention arithmetic: heads, rotary positions, scores, masking and the weighted sum.

Shapes: B batch, T query positions, S key positions, N query heads, K key/value heads (N = K * G), H head dim.
Queries, keys and values are kept heads first ([B, N|K, T|S, H]), the layout of the cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert.base.decoder_core import DecoderCore
from flax_model.attention_probs import probs_times_values
from flax_model.random_bits import dropout as draw_dropout


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, heads * H] -> [B, heads, T, H]."""
    return x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)


def dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """Inverted dropout drawn from `module`'s "dropout" stream (what `nn.Dropout` computes, without a submodule)."""
    return draw_dropout(x, rate, deterministic, lambda: module.make_rng("dropout"))


def rotary_angles(core: DecoderCore, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B|1, T, H] of the rotary embedding at `positions` [B|1, T] (transformers' `...RotaryEmbedding`:
    the inverse frequencies from the base layer, duplicated over both halves, times yarn's attention factor)."""
    inv_freq, factor = core.rope_frequencies()
    inv_freq = jnp.asarray(inv_freq, jnp.float32)  # [H / 2], the numbers torch uses too
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B|1, T, H / 2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B|1, T, H]
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, T, H] rotated by angles cos/sin [B|1, T, H] (transformers' `rotate_half` convention)."""
    cos, sin = cos.astype(x.dtype)[:, None], sin.astype(x.dtype)[:, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's soft-capping), or x."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attend(module: nn.Module, core: DecoderCore, query: jax.Array, key: jax.Array, value: jax.Array,
           mask: jax.Array, deterministic: bool, layer_index: Any, dtype: Any) -> jax.Array:
    """Scaled dot-product attention over key/value heads shared by groups of query heads.

    Args:
        module: the module whose "dropout" stream drops attention probabilities.
        core: the scaling, capping and dropout settings.
        query: [B, N, T, H]; key, value: [B, K, S, H].
        mask: [B, 1, T|1, S] bool, True where a query may attend.
        layer_index: the layer's index (an int, or traced in a scanned stack), for `scale_by_inverse_layer`.

    Returns:
        [B, T, N * H], the heads side by side.
    """
    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    if core.upcast_attention:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    if groups == 1:
        scores = jnp.einsum("BNTH,BNSH->BNTS", query, key)
    else:  # query head n reads key/value head n // groups (transformers' repeat_kv), without repeating them
        grouped = query.reshape(batch, key.shape[1], groups, length, -1)
        scores = jnp.einsum("BKGTH,BKSH->BKGTS", grouped, key).reshape(batch, heads, length, -1)
    if core.score_scale is not None:
        scores = scores * core.score_scale
    if core.score_divisor is not None:
        scores = scores / jnp.asarray(core.score_divisor, scores.dtype)
    if core.scale_by_inverse_layer:
        # A Python int or a traced int32: both divide by the same float32 value.
        scores = scores / jnp.asarray(layer_index + 1, scores.dtype)
    scores = softcap(scores, core.attn_logit_softcap)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    grouped_shape = None if groups == 1 else (batch, key.shape[1], groups, length, scores.shape[-1])
    out = probs_times_values(scores, value, "BNTS,BNSH->BTNH" if groups == 1 else "BKGTS,BKSH->BTKGH",
                             core.attention_dropout, deterministic, lambda: module.make_rng("dropout"),
                             grouped_shape)
    return out.reshape(batch, length, -1)


def layer_flags(core: DecoderCore) -> np.ndarray:
    """[layers] bool: which layers attend through the sliding window."""
    return np.asarray([core.is_sliding(i) for i in range(core.num_layers)], bool)
