"""The decoder's key/value cache: an explicit pytree, passed into `decode` and returned from it."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerCache:
    """One decoder layer's cache.

    Self-attention keys/values are written at `DecoderCache.index`; cross-attention keys/values are
    projected from the encoder output once, at prefill, and only read afterwards.
    """

    key: jax.Array  # [B, L, N, H]
    value: jax.Array  # [B, L, N, H]
    cross_key: jax.Array  # [B, S, N, H]
    cross_value: jax.Array  # [B, S, N, H]


@flax.struct.dataclass
class DecoderCache:
    """All layers' caches, the number of positions written so far, and the encoder's padding mask."""

    layers: tuple[LayerCache, ...]
    index: jax.Array  # [] int32
    encoder_mask: jax.Array  # [B, S] bool, True where the encoder output is real

    @property
    def max_length(self) -> int:
        return self.layers[0].key.shape[1]


def reorder_cache(cache: DecoderCache, beam_index: jax.Array) -> DecoderCache:
    """Gathers every per-sequence array along the batch axis (beam search); `index` is shared."""
    take = lambda a: jnp.take(a, beam_index, axis=0)  # noqa: E731
    layers = tuple(LayerCache(*(take(x) for x in (c.key, c.value, c.cross_key, c.cross_value))) for c in cache.layers)
    return DecoderCache(layers=layers, index=cache.index, encoder_mask=take(cache.encoder_mask))
