"""The two module kinds of the decoder core that flax.linen lacks: RMSNorm and GPT-2's transposed linear layer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_model.layers import add_bias, token_matmul
from flax_model.recompute import recomputed_with


class Conv1D(nn.Module):
    """A linear layer with HF Flax GPT-2's kernel layout: `kernel` [out, in], `bias` [out]."""

    features: int
    init_scale: float = 0.02
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(self.init_scale), (self.features, x.shape[-1]))
        y = token_matmul(x.astype(self.dtype), kernel.astype(self.dtype), kernel_in_axis=1)
        if self.use_bias:
            y = add_bias(y, self.param("bias", nn.initializers.zeros, (self.features,)))
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) times (offset + scale), computed in float32 as transformers does.

    `offset` 0 is Llama's RMSNorm (the normalised input cast back to the dtype, then scaled); 1 is Gemma's, whose
    stored weights are centred on 0 (scaled in float32, then cast).
    """

    epsilon: float = 1e-6
    offset: float = 0.0
    scale_name: str = "scale"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param(self.scale_name, init, (x.shape[-1],))
        # Recomputed from its input in the backward pass (JAX's linearisation keeps two float32 arrays of its size).
        return recomputed_with(_rms_norm, epsilon=self.epsilon, offset=self.offset, dtype=jnp.dtype(self.dtype))(
            x, scale)


def _rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, offset: float, dtype: Any) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + epsilon)
    if offset:
        return (h * (offset + scale.astype(jnp.float32))).astype(dtype)
    return scale.astype(dtype) * h.astype(dtype)

