"""wav2vec2 speech encoder in flax.linen, with HF's `FlaxWav2Vec2Module` parameter tree.

HF's Flax port implemented only the stable layout with a layer-norm feature encoder; this one also has the
post-norm layout (`do_stable_layer_norm=False`) and the group-norm feature encoder, named the way the
PyTorch modules are (the group norm is `feature_extractor/conv_layers/0/layer_norm/{scale,bias}`).
Numerics follow HF's PyTorch `Wav2Vec2Model`, which is the reference: where HF's Flax code differs
(`-inf` attention bias, `layer_norm_eps` in the conv and adapter norms) we follow PyTorch.

The modules here are the wav2vec2 family's shared pieces: HuBERT, WavLM and data2vec-audio subclass them and
swap a part through a class attribute (`Encoder.POSITIONAL`, `EncoderLayers.LAYER`, `Wav2Vec2Module.ENCODER`,
`Wav2Vec2Module.FEATURE_ENCODER`), as transformers' files say "Copied from wav2vec2" with changes.

Train mode (`deterministic=False`, a "dropout" rng): dropout, attention and activation dropout, LayerDrop of
the transformer layers, SpecAugment from explicit masks, and `freeze_feature_encoder`. transformers also drops
adapter layers at random in training (`Wav2Vec2Adapter`, with numpy's global RNG), which changes the output
length from step to step; a compiled step needs static shapes and the composed model's frame mask counts every
adapter layer, so the adapter is never dropped here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from convert.base.archs.wav2vec2 import Wav2Vec2FamilyConfig
from convert.base.configs import encoder_input_shape
from convert.base.errors import UnsupportedConfig
from flax_model.attention_probs import probs_times_values
from flax_model.layers import (ACTIVATIONS, Dense, LayerNorm, add_bias, frame_mask, grouped_conv, is_scanned,
                               layer_drop, make_stack, normalise, run_stack, run_unless_dropped, strided_conv)
from flax_model.random_bits import Dropout

# HF's PyTorch defaults: nn.GroupNorm / nn.LayerNorm in the conv feature encoder and the adapter do not
# take config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5
_ADAPTER_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------------------------------------
# Lengths and masks


def feature_vector_mask(config: Wav2Vec2FamilyConfig, attention_mask: jax.Array, num_frames: int,
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


def spec_augment(config: Wav2Vec2FamilyConfig, hidden: jax.Array, masked_spec_embed: jax.Array | None,
                 mask_time_indices: jax.Array | None, mask_feature_indices: jax.Array | None) -> jax.Array:
    """SpecAugment as transformers applies it after the feature projection.

    Args:
        config: the encoder config (`apply_spec_augment=False` leaves `hidden` as it is).
        hidden: [B, S, D] projected features.
        masked_spec_embed: [D], the vector masked frames become (a parameter of the model).
        mask_time_indices: [B, S] bool, frames to replace by `masked_spec_embed`, or None.
        mask_feature_indices: [B, D] bool, channels to zero in every frame, or None.
    """
    if not config.apply_spec_augment:
        return hidden
    if mask_time_indices is not None:
        if masked_spec_embed is None:
            raise UnsupportedConfig("mask_time_indices: this config has no masked_spec_embed (mask_time_prob=0 and "
                                    "mask_feature_prob=0), so frames cannot be masked")
        hidden = jnp.where(mask_time_indices[:, :, None], masked_spec_embed.astype(hidden.dtype), hidden)
    if mask_feature_indices is not None:
        hidden = jnp.where(mask_feature_indices[:, None, :], jnp.zeros((), hidden.dtype), hidden)
    return hidden


def masked_frames(hidden: jax.Array, frame_mask: jax.Array | None, dtype: Any
                  ) -> tuple[jax.Array, jax.Array | None]:
    """The encoder's input with padded frames zeroed (so that a positional conv does not carry them into real ones)
    and the self-attention's additive bias [B, 1, 1, S] (0 or the dtype's min); unchanged and None without a mask.
    `frame_mask` [B, S] bool, True for real frames."""
    if frame_mask is None:
        return hidden, None
    bias = jnp.where(frame_mask, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]
    return jnp.where(frame_mask[:, :, None], hidden, 0.0), bias


def layer_norm(epsilon: float, dtype: Any, name: str, use_scale: bool = True) -> LayerNorm:
    return LayerNorm(epsilon=epsilon, dtype=dtype, use_scale=use_scale, use_bias=use_scale, name=name)


# ----------------------------------------------------------------------------------------------------------
# Feature encoder


class ChannelNorm(nn.Module):
    """`nn.GroupNorm` with one group per channel (HF's `nn.GroupNorm(C, C)`): each channel of [B, L, C]
    normalised over time with the layer norm's arithmetic (`layers.normalise`: statistics in at least float32,
    the variance of the centred values); GroupNorm's params (`scale`, `bias`: [C]).

    Written out rather than `nn.GroupNorm(num_groups=C)`: that one reduces a [B, L, C, 1] view over time and its
    size-1 axis, which XLA:CPU runs ~18x slower than the same sums over time alone (wav2vec2-base's first conv at
    4 x 10 s, the variance: 489 ms against the mean's 28 ms in a profiled step)."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        channels = (hidden.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, channels, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, channels, jnp.float32)
        return normalise(hidden, scale, bias, self.epsilon, self.dtype, axis=-2)


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm (if any) and activation."""

    config: Wav2Vec2FamilyConfig
    layer_id: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c, i = self.config, self.layer_id
        hidden = nn.Conv(c.conv_dim[i], kernel_size=(c.conv_kernel[i],), strides=(c.conv_stride[i],),
                         padding="VALID", use_bias=c.conv_bias, conv_general_dilated=strided_conv, dtype=self.dtype,
                         name="conv")(hidden)  # [B, L, C]
        if c.feat_extract_norm == "layer":
            hidden = layer_norm(_CONV_NORM_EPS, self.dtype, "layer_norm")(hidden)
        elif i == 0:
            hidden = ChannelNorm(_CONV_NORM_EPS, self.dtype, name="layer_norm")(hidden)
        return ACTIVATIONS[c.feat_extract_activation](hidden)


class ConvLayers(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        for i in range(len(self.config.conv_dim)):
            hidden = ConvLayer(self.config, i, self.dtype, name=str(i))(hidden)
        return hidden


class FeatureEncoder(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array, freeze_feature_encoder: bool = False) -> jax.Array:
        hidden = input_values[:, :, None]  # [B, N, 1]
        hidden = ConvLayers(self.config, self.dtype, name="conv_layers")(hidden)  # [B, S, C]
        if freeze_feature_encoder:
            hidden = jax.lax.stop_gradient(hidden)
        return hidden


class FeatureProjection(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        if c.has_projection_layer_norm:
            features = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")(features)
        hidden = Dense(c.hidden_size, dtype=self.dtype, name="projection")(features)  # [B, S, D]
        return Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------------
# Transformer encoder


class WeightNormConv(nn.Module):
    """The positional conv: grouped, weight-normalised (g and v kept in PyTorch's layout, like HF's Flax)."""

    config: Wav2Vec2FamilyConfig
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
        # Same padding: [B, S + 1 - K % 2, D] (an even kernel yields one frame too many).
        out = grouped_conv(hidden.astype(self.dtype), jnp.transpose(weight, (2, 1, 0)).astype(self.dtype), (1,),
                           [(kernel // 2, kernel // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
                           feature_group_count=groups)  # kernel [K, D/G, D]
        return add_bias(out, bias)


def _tap_norms(weight_v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(0, 1), keepdims=True))  # [1, 1, K]


class PositionalConvEmbedding(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        out = WeightNormConv(c, self.dtype, name="conv")(hidden)
        # Symmetric padding of an even kernel yields one frame too many; the last one is dropped.
        out = out[:, :hidden.shape[1]]  # [B, S, D]
        return ACTIVATIONS[c.feat_extract_activation](out)


class Attention(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, T, D]; `bias` additive, broadcastable to [B, N, T, S] (0 or the dtype's min), or None."""
        c = self.config
        b, t, d = hidden.shape
        heads = (b, t, c.num_attention_heads, d // c.num_attention_heads)
        # Heads before time ([B, N, T, H]): the products below are then batched matmuls over B x N whose operands
        # are contiguous, which XLA:CPU runs 20-25% faster than with the heads' axis inside (fwd + bwd).
        q = Dense(d, dtype=self.dtype, name="q_proj")(hidden) * heads[-1] ** -0.5
        q = q.reshape(heads).transpose(0, 2, 1, 3)  # [B, N, T, H]
        k = Dense(d, dtype=self.dtype, name="k_proj")(hidden).reshape(heads).transpose(0, 2, 1, 3)  # [B, N, S, H]
        v = Dense(d, dtype=self.dtype, name="v_proj")(hidden).reshape(heads).transpose(0, 2, 1, 3)  # [B, N, S, H]
        scores = jnp.einsum("BNTH,BNSH->BNTS", q, k)
        if bias is not None:
            scores = scores + bias
        drop = Dropout(c.attention_dropout)
        out = probs_times_values(scores, v, "BNTS,BNSH->BNTH", drop.rate, deterministic,
                                 lambda: drop.make_rng("dropout"))
        out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
        return Dense(d, dtype=self.dtype, name="out_proj")(out)


class FeedForward(nn.Module):
    """Dense, activation, dense, each followed by dropout; `activation` and `width` default to the config's
    `hidden_act` and `hidden_size` (w2v-BERT's adapter and intermediate feed-forwards set their own)."""

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32
    activation: str | None = None
    width: int | None = None

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        hidden = Dense(c.intermediate_size, dtype=self.dtype, name="intermediate_dense")(hidden)  # [B, T, F]
        hidden = ACTIVATIONS[self.activation or c.hidden_act](hidden)
        hidden = Dropout(c.activation_dropout)(hidden, deterministic=deterministic)
        hidden = Dense(self.width or c.hidden_size, dtype=self.dtype, name="output_dense")(hidden)  # [B, T, D]
        return Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """A transformer layer: post-norm, or pre-norm when `config.do_stable_layer_norm`."""

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        attention = Attention(c, self.dtype, name="attention")
        norm = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")
        feed_forward = FeedForward(c, self.dtype, name="feed_forward")
        final_norm = layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")
        dropout = Dropout(c.hidden_dropout)
        if c.do_stable_layer_norm:
            hidden = hidden + dropout(attention(norm(hidden), bias, deterministic), deterministic=deterministic)
            return hidden + feed_forward(final_norm(hidden), deterministic)
        hidden = norm(hidden + dropout(attention(hidden, bias, deterministic), deterministic=deterministic))
        return final_norm(hidden + feed_forward(hidden, deterministic))


class EncoderLayers(nn.Module):
    """The layer stack, with LayerDrop in training: a dropped layer passes its input through.

    Unrolled, the LayerDrop draws come from this module's "dropout" stream; scanned
    (`flax_model.layers.layer_scan`), from each layer's own (the key split per layer).
    """

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    LAYER: ClassVar[type[nn.Module]] = EncoderLayer

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        layers = make_stack(self, lambda i, name: self.LAYER(c, self.dtype, name=name), c.num_hidden_layers)
        scanned = is_scanned(layers)

        def step(layer: nn.Module, i: Any, hidden: jax.Array, _: None, bias: jax.Array | None
                 ) -> tuple[jax.Array, None]:
            drop = layer_drop(layer if scanned else self, c.layerdrop, deterministic)
            return run_unless_dropped(drop, layer, lambda m, h, b: m(h, b, deterministic), hidden, bias), None

        return run_stack(layers, c.num_hidden_layers, step, hidden, shared=(bias,))[0]


class Encoder(nn.Module):
    """Positional embedding, the layer stack and the encoder's layer norm (before the layers in the post-norm
    layout, after them in the stable one)."""

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    POSITIONAL: ClassVar[type[nn.Module]] = PositionalConvEmbedding
    LAYERS: ClassVar[type[nn.Module]] = EncoderLayers

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        c = self.config
        hidden, bias = masked_frames(hidden, frame_mask, self.dtype)
        hidden = hidden + self.POSITIONAL(c, self.dtype, name="pos_conv_embed")(hidden, deterministic)
        norm = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")
        if not c.do_stable_layer_norm:
            hidden = norm(hidden)
        hidden = Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)
        hidden = self.run_layers(hidden, bias, deterministic)
        if c.do_stable_layer_norm:
            hidden = norm(hidden)
        return hidden

    def run_layers(self, hidden: jax.Array, bias: jax.Array | None, deterministic: bool) -> jax.Array:
        """The layer stack (named "layers"); a subclass may pass the layers more (called inside `__call__`)."""
        return self.LAYERS(self.config, self.dtype, name="layers")(hidden, bias, deterministic)


# ----------------------------------------------------------------------------------------------------------
# Adapter


class AdapterLayer(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        hidden = nn.Conv(2 * c.encoder_output_size, kernel_size=(c.adapter_kernel_size,), strides=(c.adapter_stride,),
                         padding=((1, 1),), dtype=self.dtype, name="conv")(hidden)  # [B, S', 2 * D_out]
        return nn.glu(hidden, axis=-1)  # [B, S', D_out]


class AdapterLayers(nn.Module):
    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        for i in range(self.config.num_adapter_layers):
            hidden = AdapterLayer(self.config, self.dtype, name=str(i))(hidden)
        return hidden


class Adapter(nn.Module):
    """Strided conv + GLU layers that shorten the encoder output (after a projection when widths differ)."""

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        if c.encoder_output_size != c.hidden_size:
            hidden = Dense(c.encoder_output_size, dtype=self.dtype, name="proj")(hidden)  # [B, S, D_out]
            hidden = layer_norm(_ADAPTER_NORM_EPS, self.dtype, "proj_layer_norm")(hidden)
        return AdapterLayers(c, self.dtype, name="layers")(hidden)


# ----------------------------------------------------------------------------------------------------------
# Model


class Wav2Vec2Module(nn.Module):
    """HF's `FlaxWav2Vec2Module` (same parameter tree), returning the last hidden state.

    Attributes:
        config: the encoder config.
        dtype: the computation dtype (parameters stay float32).
    """

    config: Wav2Vec2FamilyConfig
    dtype: Any = jnp.float32

    FEATURE_ENCODER: ClassVar[type[nn.Module]] = FeatureEncoder
    ENCODER: ClassVar[type[nn.Module]] = Encoder

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True,
                 freeze_feature_encoder: bool = False, mask_time_indices: jax.Array | None = None,
                 mask_feature_indices: jax.Array | None = None) -> jax.Array:
        """Encodes raw audio.

        Args:
            input_values: [B, N] float samples.
            attention_mask: [B, N], 1 for real samples, 0 for right padding; None if nothing is padded.
            deterministic: False applies dropout and LayerDrop (needs a "dropout" rng).
            freeze_feature_encoder: stop gradients at the conv feature encoder's output.
            mask_time_indices: [B, S] bool, SpecAugment's masked frames (S: frames of the conv feature
                encoder), or None. Applied whenever given, as transformers does (see `convert.base.spec_augment`).
            mask_feature_indices: [B, C] bool, SpecAugment's masked channels (C: `hidden_size`), or None.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        c = self.config
        masked_spec_embed = None
        if c.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            masked_spec_embed = self.param("masked_spec_embed", nn.initializers.uniform(), (c.hidden_size,))
        features = self.FEATURE_ENCODER(c, self.dtype, name="feature_extractor")(
            input_values.astype(self.dtype), freeze_feature_encoder)  # [B, S, C]
        frame_mask = None
        if attention_mask is not None:
            # The encoder's frames come before the adapter: it shortens them afterwards.
            frame_mask = feature_vector_mask(c, attention_mask, features.shape[1], add_adapter=False)
        hidden = FeatureProjection(c, self.dtype, name="feature_projection")(features, deterministic)  # [B, S, D]
        hidden = spec_augment(c, hidden, masked_spec_embed, mask_time_indices, mask_feature_indices)
        hidden = self.ENCODER(c, self.dtype, name="encoder")(hidden, frame_mask, deterministic)
        if c.add_adapter:
            hidden = Adapter(c, self.dtype, name="adapter")(hidden)  # [B, S', D_out]
        return hidden


def module_shapes(module: nn.Module) -> dict[str, Any]:
    """The abstract parameter tree of an encoder module (nested dicts of `jax.ShapeDtypeStruct`), no weights made."""
    dummy = jax.ShapeDtypeStruct(encoder_input_shape(module.config, 1, module.config.min_input_length), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), dummy)
    return dict(variables["params"])


def init_shapes(config: Wav2Vec2FamilyConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(Wav2Vec2Module(config))
