"""w2v-BERT 2.0 speech encoder in flax.linen: feature projection, conformer blocks, optional feed-forward and adapter.

HF never ported the model to Flax; the parameter tree follows DESIGN.md's canonical names (the PyTorch keys of
`Wav2Vec2BertModel` with `.` -> `/`; conv kernels [K, in/groups, out]; see `convert.base.archs.wav2vec2_bert`).
The input is `SeamlessM4TFeatureExtractor`'s stacked log-mel frames [B, S, F], not audio: there is no conv feature
encoder, and the frame mask is the attention mask itself. The self-attention (with Shaw's relative keys), the
relative table and the block stack are wav2vec2-conformer's (transformers copies them from there), the
feed-forward, SpecAugment and padded-frame masking the wav2vec2 family's.

Numerics follow transformers' `Wav2Vec2BertModel` (the relative-key scores arranged as
`flax_model.wav2vec2_conformer.SelfAttention` says: the same dot products, linear in T per query).

Train mode (`deterministic=False`, a "dropout" rng): dropout, LayerDrop of the conformer blocks and SpecAugment
from explicit masks, as the other encoders. transformers also drops adapter layers at random in training (which
changes the output length); a compiled step needs static shapes, so the adapter is never dropped here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from convert.base.archs.wav2vec2_bert import Wav2Vec2BertConfig
from convert.base.errors import UnsupportedConfig
from flax_model.layers import ACTIVATIONS, Dense, strided_conv
from flax_model.random_bits import Dropout
from flax_model.wav2vec2 import FeedForward, layer_norm, masked_frames, module_shapes, spec_augment
from flax_model.wav2vec2_conformer import ConformerLayers as ConformerStack
from flax_model.wav2vec2_conformer import SelfAttention, relative_position_table


def rotary_frequencies(config: Wav2Vec2BertConfig) -> np.ndarray:
    """transformers' `inv_freq` [H/2] float32 (a non-persistent buffer there: computed from the config)."""
    h = config.head_size
    return (1.0 / config.rotary_embedding_base ** (np.arange(0, h, 2).astype(np.float32) / h)).astype(np.float32)


class ConvolutionModule(nn.Module):
    """Layer norm, padded frames zeroed, pointwise conv + GLU, causal depthwise conv, layer norm, activation,
    pointwise conv, dropout."""

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        d, kernel = c.hidden_size, c.conv_depthwise_kernel_size
        hidden = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")(hidden)
        if frame_mask is not None:  # padded frames must not leak into real ones through the conv
            hidden = jnp.where(frame_mask[:, :, None], hidden, jnp.zeros((), hidden.dtype))
        hidden = nn.Conv(2 * d, kernel_size=(1,), use_bias=False, conv_general_dilated=strided_conv, dtype=self.dtype,
                         name="pointwise_conv1")(hidden)
        hidden = nn.glu(hidden, axis=-1)  # [B, T, D]
        # Causal: every pad on the left.
        hidden = nn.Conv(d, kernel_size=(kernel,), padding=[(kernel - 1, 0)], feature_group_count=d, use_bias=False,
                         dtype=self.dtype, name="depthwise_conv")(hidden)
        hidden = layer_norm(c.layer_norm_eps, self.dtype, "depthwise_layer_norm")(hidden)
        hidden = ACTIVATIONS[c.hidden_act](hidden)
        hidden = nn.Conv(d, kernel_size=(1,), use_bias=False, conv_general_dilated=strided_conv, dtype=self.dtype,
                         name="pointwise_conv2")(hidden)
        return Dropout(c.conformer_conv_dropout)(hidden, deterministic=deterministic)


class ConformerBlock(nn.Module):
    """Half-step feed-forward, self-attention, convolution module, half-step feed-forward, layer norm."""

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, bias: jax.Array | None, positions: jax.Array | None,
                 frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        norm = lambda name: layer_norm(c.layer_norm_eps, self.dtype, name)
        ffn1 = FeedForward(c, self.dtype, name="ffn1")
        hidden = hidden + 0.5 * ffn1(norm("ffn1_layer_norm")(hidden), deterministic)
        attention = SelfAttention(c, self.dtype, name="self_attn")
        attended = attention(norm("self_attn_layer_norm")(hidden), bias, positions, deterministic)
        hidden = hidden + Dropout(c.attention_dropout)(attended, deterministic=deterministic)
        hidden = hidden + ConvolutionModule(c, self.dtype, name="conv_module")(hidden, frame_mask, deterministic)
        ffn2 = FeedForward(c, self.dtype, name="ffn2")
        hidden = hidden + 0.5 * ffn2(norm("ffn2_layer_norm")(hidden), deterministic)
        return norm("final_layer_norm")(hidden)


class ConformerLayers(ConformerStack):
    """wav2vec2-conformer's block stack over w2v-BERT's blocks (which also take the frame mask)."""

    BLOCK: ClassVar[type[nn.Module]] = ConformerBlock


class ConformerEncoder(nn.Module):
    """Padded frames zeroed, dropout, the conformer blocks; no layer norm after them."""

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        c = self.config
        hidden, bias = masked_frames(hidden, frame_mask, self.dtype)
        hidden = Dropout(c.hidden_dropout)(hidden, deterministic=deterministic)
        positions = None
        if c.position_embeddings_type == "rotary":
            positions = jnp.asarray(rotary_frequencies(c))
        elif c.position_embeddings_type == "relative":
            positions = jnp.asarray(relative_position_table(hidden.shape[1], c.hidden_size))
        return ConformerLayers(c, self.dtype, name="layers")(hidden, bias, positions, frame_mask,
                                                              deterministic=deterministic)


class AdapterLayer(nn.Module):
    """Subsamples the residual and the attention's input by strided convs + GLU, attends over the subsampled
    frames with their own padding mask, then a feed-forward."""

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, lengths: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`hidden` [B, S, D]; `lengths` [B]: each row's real frames after this layer's subsampling, or None."""
        c = self.config
        width = c.encoder_output_size
        norm = lambda name: layer_norm(c.layer_norm_eps, self.dtype, name)

        def subsample(name: str, x: jax.Array) -> jax.Array:  # [B, S, D] -> [B, S', D]
            pad = c.adapter_stride // 2
            x = nn.Conv(2 * width, kernel_size=(c.adapter_kernel_size,), strides=(c.adapter_stride,),
                        padding=[(pad, pad)], dtype=self.dtype, name=name)(x)
            return nn.glu(x, axis=-1)

        residual = subsample("residual_conv", norm("residual_layer_norm")(hidden))
        hidden = subsample("self_attn_conv", norm("self_attn_layer_norm")(hidden))
        bias = None
        if lengths is not None:
            bias = masked_frames(hidden, jnp.arange(hidden.shape[1])[None, :] < lengths[:, None], self.dtype)[1]
        attended = SelfAttention(c, self.dtype, kind=None, name="self_attn")(hidden, bias, None, deterministic)
        hidden = Dropout(c.conformer_conv_dropout)(attended, deterministic=deterministic) + residual
        ffn = FeedForward(c, self.dtype, activation=c.adapter_act, width=width, name="ffn")
        return ffn(norm("ffn_layer_norm")(hidden), deterministic) + hidden


class Adapter(nn.Module):
    """A projection when the widths differ, then the subsampling layers (each recomputing the padding mask)."""

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config
        if c.encoder_output_size != c.hidden_size:
            hidden = Dense(c.encoder_output_size, dtype=self.dtype, name="proj")(hidden)  # [B, S, D_out]
            hidden = layer_norm(c.layer_norm_eps, self.dtype, "proj_layer_norm")(hidden)
        lengths = None if frame_mask is None else frame_mask.sum(-1)
        return AdapterLayers(c, self.dtype, name="layers")(hidden, lengths, deterministic)


class AdapterLayers(nn.Module):
    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, lengths: jax.Array | None, deterministic: bool = True) -> jax.Array:
        """`lengths` [B]: the real frames before the first layer (None: nothing is padded)."""
        for i in range(self.config.num_adapter_layers):
            lengths = None if lengths is None else self.config.subsampled_lengths(lengths)
            hidden = AdapterLayer(self.config, self.dtype, name=str(i))(hidden, lengths, deterministic)
        return hidden


class FeatureProjection(nn.Module):
    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        features = layer_norm(c.layer_norm_eps, self.dtype, "layer_norm")(features)
        hidden = Dense(c.hidden_size, dtype=self.dtype, name="projection")(features)  # [B, S, D]
        return Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)


class Wav2Vec2BertModule(nn.Module):
    """HF's `Wav2Vec2BertModel` as a linen module, returning the last hidden state.

    Attributes:
        config: the encoder config.
        dtype: the computation dtype (parameters stay float32).
    """

    config: Wav2Vec2BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_features: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True, freeze_feature_encoder: bool = False,
                 mask_time_indices: jax.Array | None = None,
                 mask_feature_indices: jax.Array | None = None) -> jax.Array:
        """Encodes feature frames.

        Args:
            input_features: [B, S, F] stacked log-mel frames (`SeamlessM4TFeatureExtractor`).
            attention_mask: [B, S], 1 for real frames, 0 for right padding; None if nothing is padded.
            deterministic: False applies dropout and LayerDrop (needs a "dropout" rng).
            freeze_feature_encoder: refused: there is no conv feature encoder to freeze.
            mask_time_indices: [B, S] bool, SpecAugment's masked frames, or None (applied whenever given).
            mask_feature_indices: [B, D] bool, SpecAugment's masked channels (D: `hidden_size`), or None.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        c = self.config
        if freeze_feature_encoder:
            raise UnsupportedConfig("freeze_feature_encoder: wav2vec2-bert has no conv feature encoder (it reads "
                                    "log-mel features), so there is nothing to freeze")
        masked_spec_embed = None
        if c.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            masked_spec_embed = self.param("masked_spec_embed", nn.initializers.uniform(), (c.hidden_size,))
        frame_mask = None if attention_mask is None else attention_mask.astype(bool)
        hidden = FeatureProjection(c, self.dtype, name="feature_projection")(
            input_features.astype(self.dtype), deterministic)  # [B, S, D]
        hidden = spec_augment(c, hidden, masked_spec_embed, mask_time_indices, mask_feature_indices)
        hidden = ConformerEncoder(c, self.dtype, name="encoder")(hidden, frame_mask, deterministic)
        if c.use_intermediate_ffn_before_adapter:
            ffn = FeedForward(c, self.dtype, activation="relu", name="intermediate_ffn")
            hidden = hidden + 0.5 * ffn(hidden, deterministic)
        if c.add_adapter:
            hidden = Adapter(c, self.dtype, name="adapter")(hidden, frame_mask, deterministic)  # [B, S', D_out]
        return hidden


def init_shapes(config: Wav2Vec2BertConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(Wav2Vec2BertModule(config))
