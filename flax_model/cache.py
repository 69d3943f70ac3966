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

    The arrays are stored heads first, [B, N, L, H], the layout attention contracts in place. A decode step
    on the [B, L, N, H] layout made XLA (CPU) transpose every layer's whole cache at every step, which was
    most of a step's time with 10 s of audio. `key`, `value`, `cross_key` and `cross_value` are the
    [B, L, N, H] views (the projections' own layout, as in `torch_reference`).
    """

    self_keys: jax.Array  # [B, N, L, H]
    self_values: jax.Array  # [B, N, L, H]
    cross_keys: jax.Array  # [B, N, S, H]
    cross_values: jax.Array  # [B, N, S, H]

    @property
    def key(self) -> jax.Array:
        """Self-attention keys, [B, L, N, H]."""
        return self.self_keys.transpose(0, 2, 1, 3)

    @property
    def value(self) -> jax.Array:
        """Self-attention values, [B, L, N, H]."""
        return self.self_values.transpose(0, 2, 1, 3)

    @property
    def cross_key(self) -> jax.Array:
        """Cross-attention keys, [B, S, N, H]."""
        return self.cross_keys.transpose(0, 2, 1, 3)

    @property
    def cross_value(self) -> jax.Array:
        """Cross-attention values, [B, S, N, H]."""
        return self.cross_values.transpose(0, 2, 1, 3)


@flax.struct.dataclass
class DecoderCache:
    """All layers' caches, the number of positions written so far, and the encoder's padding mask."""

    layers: tuple[LayerCache, ...]
    index: jax.Array  # [] int32
    encoder_mask: jax.Array  # [B, S] bool, True where the encoder output is real

    @property
    def max_length(self) -> int:
        return self.layers[0].self_keys.shape[2]


def reorder_cache(cache: DecoderCache, beam_index: jax.Array, cross: bool = True) -> DecoderCache:
    """Gathers every per-sequence array along the batch axis (beam search); `index` is shared.

    Args:
        cache: the cache, batch B.
        beam_index: [B'] the row of `cache` each new row comes from.
        cross: also gather the cross-attention keys/values and the encoder mask. Beam search passes False
            when beams only move within their utterance, whose rows hold the same cross-attention arrays:
            that saves copying them at every step.
    """
    take = lambda a: jnp.take(a, beam_index, axis=0)  # noqa: E731
    keep = take if cross else (lambda a: a)
    layers = tuple(LayerCache(take(c.self_keys), take(c.self_values), keep(c.cross_keys), keep(c.cross_values))
                   for c in cache.layers)
    return DecoderCache(layers=layers, index=cache.index, encoder_mask=keep(cache.encoder_mask))
