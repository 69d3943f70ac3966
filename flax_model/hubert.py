"""HuBERT speech encoder in flax.linen: wav2vec2's modules with HuBERT's positional conv.

HF never ported HuBERT to Flax; the parameter tree follows DESIGN.md's canonical names (the PyTorch keys of
`HubertModel` with `.` -> `/`), which are those of `flax_model.wav2vec2` plus, with `conv_pos_batch_norm`,
`encoder/pos_conv_embed/batch_norm/{scale,bias,running_mean,running_var}` and a plain
`encoder/pos_conv_embed/conv/{kernel,bias}`.

The BatchNorm normalises with its running statistics when deterministic and with the batch's statistics in
train mode (as torch's BatchNorm1d in `.train()`); the running statistics are not updated here (a pure
function of its parameters), unlike torch's, which moves them at every training step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from convert.base.archs.hubert import HubertConfig
from flax_model.layers import ACTIVATIONS, grouped_conv
from flax_model.wav2vec2 import Encoder, Wav2Vec2Module, WeightNormConv, module_shapes

# torch's BatchNorm1d default (HF does not set it).
_BATCH_NORM_EPS = 1e-5


class BatchNorm(nn.Module):
    """torch's BatchNorm1d over the channels of [B, S, D], its running statistics kept as parameters (HF's key
    names; the step counter is left out, see `convert.base.archs.hubert`)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        running_mean = self.param("running_mean", nn.initializers.zeros, (self.features,))
        running_var = self.param("running_var", nn.initializers.ones, (self.features,))
        if deterministic:
            mean, var = running_mean, running_var
        else:
            mean = jnp.mean(hidden, axis=(0, 1))  # [D]
            var = jnp.mean(jnp.square(hidden - mean), axis=(0, 1))  # biased, as torch normalises in training
        inv = jax.lax.rsqrt(var.astype(self.dtype) + _BATCH_NORM_EPS)
        return (hidden - mean.astype(self.dtype)) * inv * scale.astype(self.dtype) + bias.astype(self.dtype)


class HubertPositionalConvEmbedding(nn.Module):
    """wav2vec2's weight-normalised positional conv, or with `conv_pos_batch_norm` a BatchNorm then a plain
    grouped conv."""

    config: HubertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        if c.conv_pos_batch_norm:
            kernel = c.num_conv_pos_embeddings
            normed = BatchNorm(c.hidden_size, self.dtype, name="batch_norm")(hidden, deterministic)
            out = nn.Conv(c.hidden_size, kernel_size=(kernel,), padding=[(kernel // 2, kernel // 2)],
                          feature_group_count=c.num_conv_pos_embedding_groups, dtype=self.dtype,
                          conv_general_dilated=grouped_conv,
                          name="conv")(normed)  # [B, S + 1 - K % 2, D]
        else:
            out = WeightNormConv(c, self.dtype, name="conv")(hidden)
        # Symmetric padding of an even kernel yields one frame too many; the last one is dropped.
        out = out[:, :hidden.shape[1]]  # [B, S, D]
        return ACTIVATIONS[c.feat_extract_activation](out)


class HubertEncoder(Encoder):
    POSITIONAL: ClassVar[type[nn.Module]] = HubertPositionalConvEmbedding


class HubertModule(Wav2Vec2Module):
    """HF's `HubertModel` as a linen module, returning the last hidden state (see `Wav2Vec2Module`)."""

    config: HubertConfig
    dtype: Any = jnp.float32

    ENCODER: ClassVar[type[nn.Module]] = HubertEncoder


def init_shapes(config: HubertConfig) -> dict[str, Any]:
    """The abstract parameter tree (nested dicts of `jax.ShapeDtypeStruct`), without making any weights."""
    return module_shapes(HubertModule(config))
