"""wav2vec2 speech encoder in flax.linen, with HF's `FlaxWav2Vec2Module` parameter tree.

HF's Flax port implemented only the stable layout with a layer-norm feature encoder; this one also has the
post-norm layout (`do_stable_layer_norm=False`) and the group-norm feature encoder, named the way the
PyTorch modules are (the group norm is `feature_extractor/conv_layers/0/layer_norm/{scale,bias}`).
Numerics follow HF's PyTorch `Wav2Vec2Model`, which is the reference: where HF's Flax code differs
(`-inf` attention bias, `layer_norm_eps` in the conv and adapter norms) we follow PyTorch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from convert.archs.wav2vec2 import Wav2Vec2Config
from flax_model.layers import ACTIVATIONS, frame_mask

# HF's PyTorch defaults: nn.GroupNorm / nn.LayerNorm in the conv feature encoder and the adapter do not
# take config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5
_ADAPTER_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------------------------------------
# Lengths and masks


def feature_vector_mask(config: Wav2Vec2Config, attention_mask: jax.Array, num_frames: int,
                        add_adapter: bool | None = None) -> jax.Array:
    """Which frames hold real audio, from the sample-level mask.

    Args:
        config: the encoder config.
        attention_mask: [B, N], 1 for real samples (right padding).
        num_frames: S, the number of frames of the padded batch.
        add_adapter: count the adapter's strided convs too; defaults to `config.add_adapter`.

    Returns:
        [B, S] bool, True for the first `config.output_lengths(sum(attention_mask))` frames of each row.
    """
    return frame_mask(config, attention_mask, num_frames, add_adapter)


def _layer_norm(epsilon: float, dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form loses digits).
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


# ----------------------------------------------------------------------------------------------------------
# Feature encoder


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm (if any) and activation."""

    config: Wav2Vec2Config
    layer_id: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c, i = self.config, self.layer_id
        hidden = nn.Conv(c.conv_dim[i], kernel_size=(c.conv_kernel[i],), strides=(c.conv_stride[i],),
                         padding="VALID", use_bias=c.conv_bias, dtype=self.dtype, name="conv")(hidden)  # [B, L, C]
        if c.feat_extract_norm == "layer":
            hidden = _layer_norm(_CONV_NORM_EPS, self.dtype, "layer_norm")(hidden)
        elif i == 0:
            # One group per channel: each channel is normalised over time.
            hidden = nn.GroupNorm(num_groups=c.conv_dim[0], epsilon=_CONV_NORM_EPS, dtype=self.dtype,
                                  use_fast_variance=False, name="layer_norm")(hidden)
        return ACTIVATIONS[c.feat_extract_activation](hidden)


class ConvLayers(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        for i in range(len(self.config.conv_dim)):
            hidden = ConvLayer(self.config, i, self.dtype, name=str(i))(hidden)
        return hidden


class FeatureEncoder(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array, freeze_feature_encoder: bool = False) -> jax.Array:
        hidden = input_values[:, :, None]  # [B, N, 1]
        hidden = ConvLayers(self.config, self.dtype, name="conv_layers")(hidden)  # [B, S, C]
        if freeze_feature_encoder:
            hidden = jax.lax.stop_gradient(hidden)
        return hidden


class FeatureProjection(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        if c.feat_proj_layer_norm:
            features = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")(features)
        hidden = nn.Dense(c.hidden_size, dtype=self.dtype, name="projection")(features)  # [B, S, D]
        return nn.Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------------
# Transformer encoder


class WeightNormConv(nn.Module):
    """The positional conv: grouped, weight-normalised (g and v kept in PyTorch's layout, like HF's Flax)."""

    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        width, kernel, groups = c.hidden_size, c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups
        weight_v = self.param("weight_v", nn.initializers.he_normal(), (width, width // groups, kernel))
        # dim=2 weight norm: one magnitude per kernel tap.
        weight_g = self.param("weight_g", lambda _: _tap_norms(weight_v))  # [1, 1, K]
        bias = self.param("bias", nn.initializers.zeros, (width,))
        weight = weight_v * (weight_g / _tap_norms(weight_v))  # [D, D/G, K]
        out = jax.lax.conv_general_dilated(
            hidden.astype(self.dtype),
            jnp.transpose(weight, (2, 1, 0)).astype(self.dtype),  # [K, D/G, D]
            window_strides=(1,),
            padding=[(kernel // 2, kernel // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=groups,
        )  # [B, S + 1 - K % 2, D]
        return out + bias.astype(self.dtype)


def _tap_norms(weight_v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(0, 1), keepdims=True))  # [1, 1, K]


class PositionalConvEmbedding(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        out = WeightNormConv(c, self.dtype, name="conv")(hidden)
        # Symmetric padding of an even kernel yields one frame too many; the last one is dropped.
        out = out[:, :hidden.shape[1]]  # [B, S, D]
        return ACTIVATIONS[c.feat_extract_activation](out)


class Attention(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] additive (0 or the dtype's min), or None."""
        c = self.config
        b, t, d = hidden.shape
        heads = (b, t, c.num_attention_heads, d // c.num_attention_heads)
        q = nn.Dense(d, dtype=self.dtype, name="q_proj")(hidden) * heads[-1] ** -0.5
        q = q.reshape(heads)  # [B, T, N, H]
        k = nn.Dense(d, dtype=self.dtype, name="k_proj")(hidden).reshape(heads)  # [B, S, N, H]
        v = nn.Dense(d, dtype=self.dtype, name="v_proj")(hidden).reshape(heads)  # [B, S, N, H]
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k)
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class FeedForward(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        hidden = nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate_dense")(hidden)  # [B, T, F]
        hidden = nn.Dropout(c.activation_dropout)(ACTIVATIONS[c.hidden_act](hidden), deterministic=deterministic)
        hidden = nn.Dense(c.hidden_size, dtype=self.dtype, name="output_dense")(hidden)  # [B, T, D]
        return nn.Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """A transformer layer: post-norm, or pre-norm when `config.do_stable_layer_norm`."""

    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        attention = Attention(c, self.dtype, name="attention")
        layer_norm = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")
        feed_forward = FeedForward(c, self.dtype, name="feed_forward")
        final_layer_norm = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")
        dropout = nn.Dropout(c.hidden_dropout)
        if c.do_stable_layer_norm:
            hidden = hidden + dropout(attention(layer_norm(hidden), bias, deterministic), deterministic=deterministic)
            return hidden + feed_forward(final_layer_norm(hidden), deterministic)
        hidden = layer_norm(hidden + dropout(attention(hidden, bias, deterministic), deterministic=deterministic))
        return final_layer_norm(hidden + feed_forward(hidden, deterministic))


class EncoderLayers(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            hidden = EncoderLayer(self.config, self.dtype, name=str(i))(hidden, bias, deterministic)
        return hidden


class Encoder(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        c = self.config
        bias = None
        if frame_mask is not None:
            # Padded frames are zeroed so that the positional conv does not carry them into real ones.
            hidden = jnp.where(frame_mask[:, :, None], hidden, 0.0)
            bias = jnp.where(frame_mask, 0.0, jnp.finfo(self.dtype).min).astype(self.dtype)[:, None, None, :]
        hidden = hidden + PositionalConvEmbedding(c, self.dtype, name="pos_conv_embed")(hidden)
        layer_norm = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")
        if not c.do_stable_layer_norm:
            hidden = layer_norm(hidden)
        hidden = nn.Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)
        hidden = EncoderLayers(c, self.dtype, name="layers")(hidden, bias, deterministic)
        if c.do_stable_layer_norm:
            hidden = layer_norm(hidden)
        return hidden


# ----------------------------------------------------------------------------------------------------------
# Adapter


class AdapterLayer(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        hidden = nn.Conv(2 * c.encoder_output_size, kernel_size=(c.adapter_kernel_size,), strides=(c.adapter_stride,),
                         padding=((1, 1),), dtype=self.dtype, name="conv")(hidden)  # [B, S', 2 * D_out]
        return nn.glu(hidden, axis=-1)  # [B, S', D_out]


class AdapterLayers(nn.Module):
    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        for i in range(self.config.num_adapter_layers):
            hidden = AdapterLayer(self.config, self.dtype, name=str(i))(hidden)
        return hidden


class Adapter(nn.Module):
    """Strided conv + GLU layers that shorten the encoder output (after a projection when widths differ)."""

    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        if c.encoder_output_size != c.hidden_size:
            hidden = nn.Dense(c.encoder_output_size, dtype=self.dtype, name="proj")(hidden)  # [B, S, D_out]
            hidden = _layer_norm(_ADAPTER_NORM_EPS, self.dtype, "proj_layer_norm")(hidden)
        return AdapterLayers(c, self.dtype, name="layers")(hidden)


# ----------------------------------------------------------------------------------------------------------
# Model


class Wav2Vec2Module(nn.Module):
    """HF's `FlaxWav2Vec2Module` (same parameter tree), returning the last hidden state.

    Attributes:
        config: the encoder config.
        dtype: the computation dtype (parameters stay float32).
    """

    config: Wav2Vec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True,
                 freeze_feature_encoder: bool = False) -> jax.Array:
        """Encodes raw audio.

        Args:
            input_values: [B, N] float samples.
            attention_mask: [B, N], 1 for real samples, 0 for right padding; None if nothing is padded.
            deterministic: False applies dropout (needs a "dropout" rng).
            freeze_feature_encoder: stop gradients at the conv feature encoder's output.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        c = self.config
        if c.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            self.param("masked_spec_embed", nn.initializers.uniform(), (c.hidden_size,))
        features = FeatureEncoder(c, self.dtype, name="feature_extractor")(
            input_values.astype(self.dtype), freeze_feature_encoder)  # [B, S, C]
        frame_mask = None
        if attention_mask is not None:
            # The encoder's frames come before the adapter: it shortens them afterwards.
            frame_mask = feature_vector_mask(c, attention_mask, features.shape[1], add_adapter=False)
        hidden = FeatureProjection(c, self.dtype, name="feature_projection")(features, deterministic)  # [B, S, D]
        hidden = Encoder(c, self.dtype, name="encoder")(hidden, frame_mask, deterministic)
        if c.add_adapter:
            hidden = Adapter(c, self.dtype, name="adapter")(hidden)  # [B, S', D_out]
        return hidden


def init_shapes(config: Wav2Vec2Config) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    module = Wav2Vec2Module(config)
    dummy = jax.ShapeDtypeStruct((1, config.min_input_length), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), dummy)
    return dict(variables["params"])
