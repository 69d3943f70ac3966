"""data2vec-audio speech encoder in flax.linen: wav2vec2's modules with a stack of positional convs.

HF never ported data2vec-audio to Flax; the parameter tree follows DESIGN.md's canonical names (the PyTorch keys
of `Data2VecAudioModel` with `.` -> `/`): wav2vec2's, with `encoder/pos_conv_embed/layers/{j}/conv/{kernel,bias}`
in place of the weight-normalised conv.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from convert.base.archs.data2vec_audio import Data2VecAudioConfig
from flax_model.layers import ACTIVATIONS, grouped_conv
from flax_model.wav2vec2 import Encoder, Wav2Vec2Module, layer_norm, module_shapes

# HF's nn.LayerNorm(hidden_size, elementwise_affine=False) keeps torch's default epsilon.
_POS_NORM_EPS = 1e-5


class PositionalConvLayer(nn.Module):
    """A same-padded grouped conv, a layer norm without parameters, and the activation."""

    config: Data2VecAudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        kernel = c.conv_pos_kernel_size
        out = nn.Conv(c.hidden_size, kernel_size=(kernel,), padding=[(kernel // 2, kernel // 2)],
                      feature_group_count=c.num_conv_pos_embedding_groups, dtype=self.dtype,
                      conv_general_dilated=grouped_conv,
                      name="conv")(hidden)  # [B, S + 1 - K % 2, D]
        # Symmetric padding of an even kernel yields one frame too many; the last one is dropped.
        out = out[:, :hidden.shape[1]]  # [B, S, D]
        out = layer_norm(_POS_NORM_EPS, self.dtype, "layer_norm", use_scale=False)(out)
        return ACTIVATIONS[c.feat_extract_activation](out)


class PositionalConvLayers(nn.Module):
    config: Data2VecAudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        for j in range(self.config.num_conv_pos_embeddings):
            hidden = PositionalConvLayer(self.config, self.dtype, name=str(j))(hidden)
        return hidden


class Data2VecAudioPositionalConvEmbedding(nn.Module):
    config: Data2VecAudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        return PositionalConvLayers(self.config, self.dtype, name="layers")(hidden)


class Data2VecAudioEncoder(Encoder):
    POSITIONAL: ClassVar[type[nn.Module]] = Data2VecAudioPositionalConvEmbedding


class Data2VecAudioModule(Wav2Vec2Module):
    """HF's `Data2VecAudioModel` as a linen module, returning the last hidden state (see `Wav2Vec2Module`)."""

    config: Data2VecAudioConfig
    dtype: Any = jnp.float32

    ENCODER: ClassVar[type[nn.Module]] = Data2VecAudioEncoder


def init_shapes(config: Data2VecAudioConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(Data2VecAudioModule(config))
