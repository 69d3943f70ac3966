"""wav2vec2-conformer speech encoder in flax.linen: wav2vec2's modules around a stack of conformer blocks.

HF never ported the conformer to Flax; the parameter tree follows DESIGN.md's canonical names (the PyTorch keys of
`Wav2Vec2ConformerModel` with `.` -> `/`; conv kernels [K, in/groups, out] as wav2vec2's; see
`convert.base.archs.wav2vec2_conformer`). The feature encoder, feature projection, SpecAugment and adapter are
`flax_model.wav2vec2`'s; the BatchNorm is HuBERT's (`flax_model.hubert.BatchNorm`). The encoder carries wav2vec2's
weight-normalised positional conv without calling it, as transformers does.

Numerics follow transformers' `Wav2Vec2ConformerModel`: the relative table and the rotary angles are computed in
float32 as transformers computes them (the table with numpy at trace time: it depends only on the static length);
the rotary frequencies are the stored `inv_freq`.

Train mode (`deterministic=False`, a "dropout" rng): dropout, LayerDrop, SpecAugment from explicit masks and
`freeze_feature_encoder`, as the other encoders. The BatchNorm normalises with the batch's statistics in train
mode, as torch's BatchNorm1d in `.train()` (padded frames included, as in transformers), and with the running
statistics otherwise; the running statistics are not updated by training here (a pure function of its parameters;
they are buffers, never trained), unlike torch's, which moves them at every training step.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from convert.base.archs.wav2vec2_conformer import Wav2Vec2ConformerConfig
from flax_model.attention_probs import probs_times_values
from flax_model.hubert import BatchNorm
from flax_model.layers import (ACTIVATIONS, Dense, grouped_conv, is_scanned, layer_drop, make_stack, run_stack,
                               run_unless_dropped, strided_conv)
from flax_model.random_bits import Dropout
from flax_model.wav2vec2 import FeedForward, Wav2Vec2Module, layer_norm, masked_frames, module_shapes

# transformers builds the blocks' layer norms with nn.LayerNorm's default eps, not config.layer_norm_eps.
_BLOCK_NORM_EPS = 1e-5


def relative_position_table(length: int, width: int) -> np.ndarray:
    """Sinusoids of the relative positions length - 1 down to -(length - 1): [2 * length - 1, width] float32.

    Row p describes the distance query - key = length - 1 - p; channels alternate sin, cos (Transformer-XL).
    """
    distance = np.arange(length - 1, -length, -1, dtype=np.float32)[:, None]  # [P, 1]
    inverse = np.exp(np.arange(0, width, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / width)))  # [D/2]
    angles = distance * inverse  # [P, D/2]
    table = np.zeros((2 * length - 1, width), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


def skew(by_distance: jax.Array) -> jax.Array:
    """[..., T, 2T - 1] scores per row of the relative table -> [..., T, S] per key: query i and key j take
    column T - 1 - i + j (the row of distance i - j). Row i is shifted left by T - 1 - i: appending T zero
    columns and refolding the rows T - 1 columns longer moves each row one column further than the one above."""
    *lead, t, width = by_distance.shape
    padded = jnp.pad(by_distance, [(0, 0)] * len(lead) + [(0, 0), (0, t)])  # [..., T, 3T - 1]
    flat = padded.reshape(*lead, t * (width + t))[..., t - 1:t - 1 + t * (width + t - 1)]
    return flat.reshape(*lead, t, width + t - 1)[..., :t]


def rotate(hidden: jax.Array, inv_freq: jax.Array, num_heads: int) -> jax.Array:
    """Rotary embedding of [B, T, D] per head: each head's two halves rotated by angle position * inv_freq."""
    b, t, d = hidden.shape
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq.astype(jnp.float32)  # [T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]  # [1, T, 1, H]
    heads = hidden.reshape(b, t, num_heads, d // num_heads)  # [B, T, N, H]
    first, second = jnp.split(heads, 2, axis=-1)
    turned = jnp.concatenate([-second, first], axis=-1)
    out = heads * jnp.cos(angles).astype(hidden.dtype) + turned * jnp.sin(angles).astype(hidden.dtype)
    return out.reshape(b, t, d)


def relative_key_index(length: int, left: int, right: int) -> np.ndarray:
    """[T, S] row of the distance embedding for query i and key j: j - i clamped to [-left, right], plus left."""
    distance = np.arange(length)[None, :] - np.arange(length)[:, None]
    return np.clip(distance, -left, right) + left


# `SelfAttention.kind` default: the config's `position_embeddings_type`.
FROM_CONFIG = "from config"


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary, relative (Transformer-XL: pos_bias_u/v, linear_pos) or no positions,
    or (w2v-BERT's, whose attention transformers copies from this one) Shaw's `relative_key` distance embeddings
    clamped to `left_max_position_embeddings` / `right_max_position_embeddings`.

    Attributes:
        kind: the position embedding, by default the config's `position_embeddings_type` (w2v-BERT's adapter
            attends without one). The width is the input's: heads of `width // num_attention_heads`.
    """

    config: Any
    dtype: Any = jnp.float32
    kind: str | None = FROM_CONFIG

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, positions: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] or None; `positions`: `inv_freq` [H/2] (rotary), the relative
        table [2T - 1, D] (relative) or None."""
        c = self.config
        kind = c.position_embeddings_type if self.kind == FROM_CONFIG else self.kind
        b, t, d = hidden.shape
        n = c.num_attention_heads
        h = d // n
        dense = lambda name, use_bias=True: Dense(d, use_bias=use_bias, dtype=self.dtype, name=name)
        # Rotary: queries and keys are projected from the rotated input, values from the input itself.
        rotated = rotate(hidden, positions, n) if kind == "rotary" else hidden
        q = dense("linear_q")(rotated).reshape(b, t, n, h)  # [B, T, N, H]
        k = dense("linear_k")(rotated).reshape(b, t, n, h)  # [B, S, N, H]
        v = dense("linear_v")(hidden).reshape(b, t, n, h)  # [B, S, N, H]
        scale = h ** -0.5
        if kind == "relative":
            u = self.param("pos_bias_u", nn.initializers.xavier_uniform(), (n, h)).astype(self.dtype)
            w = self.param("pos_bias_v", nn.initializers.xavier_uniform(), (n, h)).astype(self.dtype)
            p = dense("linear_pos", use_bias=False)(positions.astype(self.dtype)).reshape(-1, n, h)  # [P, N, H]
            by_distance = jnp.einsum("BTNH,PNH->BNTP", q + w, p)
            relative = skew(by_distance)  # [B, N, T, S]
            scores = jnp.einsum("BTNH,BSNH->BNTS", q + u, k) * scale + relative * scale
        else:
            scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * scale
        if kind == "relative_key":
            # Scores against each of the left + right + 1 distance embeddings, then gathered per (query, key):
            # the dot products transformers takes against a gathered [T, S, H] table, in T x P x H instead.
            left, right = c.left_max_position_embeddings, c.right_max_position_embeddings
            table = nn.Embed(left + right + 1, h, dtype=self.dtype, name="distance_embedding").embedding  # [P, H]
            by_distance = jnp.einsum("BTNH,PH->BNTP", q, table.astype(self.dtype))
            index = jnp.asarray(relative_key_index(t, left, right))[None, None]  # [1, 1, T, S]
            scores = scores + jnp.take_along_axis(by_distance, index, axis=-1) * scale
        if bias is not None:
            scores = scores + bias
        drop = Dropout(c.attention_dropout)
        out = probs_times_values(scores, v, "BNTS,BSNH->BTNH", drop.rate, deterministic,
                                 lambda: drop.make_rng("dropout")).reshape(b, t, d)
        return dense("linear_out")(out)


class ConvolutionModule(nn.Module):
    """Layer norm, pointwise conv + GLU, depthwise conv, BatchNorm, activation, pointwise conv, dropout."""

    config: Wav2Vec2ConformerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        d, kernel = c.hidden_size, c.conv_depthwise_kernel_size
        hidden = layer_norm(_BLOCK_NORM_EPS, self.dtype, "layer_norm")(hidden)
        hidden = nn.Conv(2 * d, kernel_size=(1,), use_bias=False, conv_general_dilated=strided_conv, dtype=self.dtype,
                         name="pointwise_conv1")(hidden)
        hidden = nn.glu(hidden, axis=-1)  # [B, T, D]
        pad = (kernel - 1) // 2
        hidden = nn.Conv(d, kernel_size=(kernel,), padding=[(pad, pad)], feature_group_count=d, use_bias=False,
                         conv_general_dilated=grouped_conv,
                         dtype=self.dtype, name="depthwise_conv")(hidden)
        hidden = BatchNorm(d, self.dtype, name="batch_norm")(hidden, deterministic)
        hidden = ACTIVATIONS[c.hidden_act](hidden)
        hidden = nn.Conv(d, kernel_size=(1,), use_bias=False, conv_general_dilated=strided_conv, dtype=self.dtype,
                         name="pointwise_conv2")(hidden)
        return Dropout(c.conformer_conv_dropout)(hidden, deterministic=deterministic)


class ConformerBlock(nn.Module):
    """Half-step feed-forward, self-attention, convolution module, half-step feed-forward, layer norm."""

    config: Wav2Vec2ConformerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, positions: jax.Array | None,
                 deterministic: bool = True) -> jax.Array:
        c = self.config
        norm = lambda name: layer_norm(_BLOCK_NORM_EPS, self.dtype, name)
        ffn1 = FeedForward(c, self.dtype, name="ffn1")
        hidden = hidden + 0.5 * ffn1(norm("ffn1_layer_norm")(hidden), deterministic)
        attended = SelfAttention(c, self.dtype, name="self_attn")(norm("self_attn_layer_norm")(hidden), bias,
                                                                 positions, deterministic)
        # transformers sizes this dropout by attention_dropout.
        hidden = hidden + Dropout(c.attention_dropout)(attended, deterministic=deterministic)
        hidden = hidden + ConvolutionModule(c, self.dtype, name="conv_module")(hidden, deterministic)
        ffn2 = FeedForward(c, self.dtype, name="ffn2")
        hidden = hidden + 0.5 * ffn2(norm("ffn2_layer_norm")(hidden), deterministic)
        return norm("final_layer_norm")(hidden)


class ConformerLayers(nn.Module):
    """The block stack (unrolled, or scanned within `flax_model.layers.layer_scan`), with LayerDrop in training:
    a dropped block passes its input through. Unrolled, the LayerDrop draws come from this module's "dropout"
    stream; scanned, from each block's own (the key split per layer). `BLOCK` is the block (w2v-BERT swaps its
    own in); every block takes the hidden states, then `shared` (the attention bias, the positions, ...)."""

    config: Any
    dtype: Any = jnp.float32

    BLOCK: ClassVar[type[nn.Module]] = ConformerBlock

    @nn.compact
    def __call__(self, hidden: jax.Array, *shared: Any, deterministic: bool = True) -> jax.Array:
        c = self.config
        layers = make_stack(self, lambda i, name: self.BLOCK(c, self.dtype, name=name), c.num_hidden_layers)
        scanned = is_scanned(layers)

        def step(layer: nn.Module, i: Any, hidden: jax.Array, _: None, *shared: Any) -> tuple[jax.Array, None]:
            drop = layer_drop(layer if scanned else self, c.layerdrop, deterministic)
            return run_unless_dropped(drop, layer, lambda m, h, *s: m(h, *s, deterministic), hidden, *shared), None

        # The position embedding and masks are computed once by the encoder and shared.
        return run_stack(layers, c.num_hidden_layers, step, hidden, shared=shared)[0]


class UnusedWeightNormConv(nn.Module):
    """The parameters of wav2vec2's weight-normalised positional conv (`pos_conv_embed/conv/...`), which
    transformers' conformer encoder builds and never calls: declared so that they are read and written, not used."""

    config: Wav2Vec2ConformerConfig

    @nn.compact
    def __call__(self) -> None:
        c = self.config
        width, kernel, groups = c.hidden_size, c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups
        self.param("weight_v", nn.initializers.he_normal(), (width, width // groups, kernel))
        self.param("weight_g", nn.initializers.ones, (1, 1, kernel))
        self.param("bias", nn.initializers.zeros, (width,))


class UnusedPositionalConv(nn.Module):
    config: Wav2Vec2ConformerConfig

    @nn.compact
    def __call__(self) -> None:
        UnusedWeightNormConv(self.config, name="conv")()


class RotaryPositions(nn.Module):
    """transformers' `inv_freq` buffer [H/2], kept as a parameter (never trained) and used as stored."""

    config: Wav2Vec2ConformerConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        h = self.config.head_size
        base = self.config.rotary_embedding_base
        default = lambda _: 1.0 / base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
        return jax.lax.stop_gradient(self.param("inv_freq", default))


class ConformerEncoder(nn.Module):
    """Dropout, the conformer blocks and the encoder's layer norm."""

    config: Wav2Vec2ConformerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        c = self.config
        UnusedPositionalConv(c, name="pos_conv_embed")()
        hidden, bias = masked_frames(hidden, frame_mask, self.dtype)
        hidden = Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)
        positions = None
        if c.position_embeddings_type == "rotary":
            positions = RotaryPositions(c, name="embed_positions")()
        elif c.position_embeddings_type == "relative":
            positions = jnp.asarray(relative_position_table(hidden.shape[1], c.hidden_size))
        hidden = ConformerLayers(c, self.dtype, name="layers")(hidden, bias, positions, deterministic=deterministic)
        return layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")(hidden)


class Wav2Vec2ConformerModule(Wav2Vec2Module):
    """HF's `Wav2Vec2ConformerModel` as a linen module, returning the last hidden state (see `Wav2Vec2Module`)."""

    config: Wav2Vec2ConformerConfig
    dtype: Any = jnp.float32

    ENCODER: ClassVar[type[nn.Module]] = ConformerEncoder


def init_shapes(config: Wav2Vec2ConformerConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(Wav2Vec2ConformerModule(config))
