"""WavLM speech encoder in flax.linen: wav2vec2's modules with gated relative position bias.

HF never ported WavLM to Flax; the parameter tree follows DESIGN.md's canonical names (the PyTorch keys of
`WavLMModel` with `.` -> `/`), except that layer 0's relative-position embedding sits beside the stack, at
`encoder/rel_attn_embed/embedding` (see `convert.base.archs.wavlm`): the encoder computes the bias once and every
layer gates it.

Numerics follow transformers' `WavLMModel`: the bias of relative position j - i comes from a bucket (exact
below num_buckets // 4, log-spaced up to max_bucket_distance; the buckets depend only on the static length, so
they are computed with numpy at trace time), layer i multiplies it by a gate of its own input, and LayerDrop
never drops layer 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from convert.base.archs.wavlm import WavLMConfig
from flax_model.layers import Dense, is_scanned, layer_drop, make_stack, run_stack, run_unless_dropped
from flax_model.random_bits import Dropout
from flax_model.wav2vec2 import (
    Attention,
    Encoder,
    FeedForward,
    Wav2Vec2Module,
    layer_norm,
    module_shapes,
)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """WavLM's bucket of each relative position (key j - query i): [T, S] int32, in [0, num_buckets).

    Half the buckets are for keys after the query; in each half, distances below `num_buckets // 4` get their
    own bucket and longer ones share log-spaced buckets, the last holding everything from `max_distance` on.
    Computed in float32 as transformers does, so that the rounding to a bucket is the same.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # [T, S]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # log(0) is never taken: distances below max_exact use their own bucket.
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum((np.float32(max_exact) + scaled).astype(np.int64), half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class WavLMAttention(Attention):
    """wav2vec2's attention plus the relative position bias, gated per head and query frame."""

    config: WavLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, position_bias: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] padding bias or None; `position_bias` [N, T, S] ungated."""
        c = self.config
        b, t, d = hidden.shape
        n = c.num_attention_heads
        per_head = hidden.reshape(b, t, n, d // n)  # [B, T, N, H]
        gate = Dense(8, dtype=self.dtype, name="gru_rel_pos_linear")(per_head)  # [B, T, N, 8]
        gate = jax.nn.sigmoid(gate.reshape(b, t, n, 2, 4).sum(-1))  # [B, T, N, 2]
        const = self.param("gru_rel_pos_const", nn.initializers.ones, (1, n, 1, 1))
        gate = gate[..., 0] * (gate[..., 1] * const.reshape(n).astype(self.dtype) - 1.0) + 2.0  # [B, T, N]
        gated = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias.astype(self.dtype)  # [B, N, T, S]
        if bias is not None:
            gated = gated + bias
        return super().__call__(hidden, gated, deterministic)


class WavLMEncoderLayer(nn.Module):
    """A transformer layer with WavLM's attention: post-norm, or pre-norm when `config.do_stable_layer_norm`."""

    config: WavLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, position_bias: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        c = self.config
        attention = WavLMAttention(c, self.dtype, name="attention")
        norm = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")
        feed_forward = FeedForward(c, self.dtype, name="feed_forward")
        final_norm = layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")
        dropout = Dropout(c.hidden_dropout)
        if c.do_stable_layer_norm:
            attended = attention(norm(hidden), bias, position_bias, deterministic)
            hidden = hidden + dropout(attended, deterministic=deterministic)
            return hidden + feed_forward(final_norm(hidden), deterministic)
        attended = attention(hidden, bias, position_bias, deterministic)
        hidden = norm(hidden + dropout(attended, deterministic=deterministic))
        return final_norm(hidden + feed_forward(hidden, deterministic))


class WavLMEncoderLayers(nn.Module):
    """The layer stack; LayerDrop in training skips any layer but the first, as transformers does."""

    config: WavLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, position_bias: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        c = self.config
        layers = make_stack(self, lambda i, name: WavLMEncoderLayer(c, self.dtype, name=name), c.num_hidden_layers)
        scanned = is_scanned(layers)

        def step(layer: nn.Module, i: Any, hidden: jax.Array, _: None, position_bias: jax.Array
                 ) -> tuple[jax.Array, None]:
            if scanned:  # every layer draws from its own key; layer 0's draw is ignored
                drop = layer_drop(layer, c.layerdrop, deterministic)
                drop = drop if drop is False else drop & (i > 0)
            else:  # unrolled: layer 0 draws nothing (this module's stream, as before scanning existed)
                drop = i > 0 and layer_drop(self, c.layerdrop, deterministic)
            return run_unless_dropped(drop, layer, lambda m, h, *a: m(h, *a, deterministic), hidden, bias,
                                      position_bias), None

        # The position bias is computed once by the encoder (from the first layer's params) and shared.
        return run_stack(layers, c.num_hidden_layers, step, hidden, shared=(position_bias,))[0]


class WavLMEncoder(Encoder):
    """wav2vec2's encoder whose layers share one relative position bias, computed here."""

    def run_layers(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool) -> jax.Array:
        c = self.config
        length = hidden.shape[1]
        buckets = relative_position_buckets(length, length, c.num_buckets, c.max_bucket_distance)  # [T, S]
        table = nn.Embed(c.num_buckets, c.num_attention_heads, dtype=self.dtype, name="rel_attn_embed")
        position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))  # [N, T, S]
        return WavLMEncoderLayers(c, self.dtype, name="layers")(hidden, bias, position_bias, deterministic)


class WavLMModule(Wav2Vec2Module):
    """HF's `WavLMModel` as a linen module, returning the last hidden state (see `Wav2Vec2Module`)."""

    config: WavLMConfig
    dtype: Any = jnp.float32

    ENCODER: ClassVar[type[nn.Module]] = WavLMEncoder


def init_shapes(config: WavLMConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(WavLMModule(config))
