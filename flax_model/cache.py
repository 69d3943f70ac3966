"""The decoder's key/value cache: an explicit pytree, passed into `decode` and returned from it."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def slice_start(*indices) -> tuple[jax.Array, ...]:
    """Start indices for `jax.lax.dynamic_update_slice`, all int32: Python ints become int64 in JAX's 64-bit mode,
    and the positions it is given are int32."""
    return tuple(jnp.asarray(i, jnp.int32) for i in indices)


@flax.struct.dataclass
class LayerCache:
    """One decoder layer's cache.

    Self-attention keys/values are written at `DecoderCache.index`; cross-attention keys/values are
    projected from the encoder output once, at prefill, and only read afterwards.

    The arrays are stored heads first, [B, K, L, H] with K the key/value heads (fewer than the query heads N under
    grouped-query attention), the layout attention contracts in place. A decode step on the [B, L, K, H] layout
    made XLA (CPU) transpose every layer's whole cache at every step, which was most of a step's time with 10 s of
    audio. `key`, `value`, `cross_key` and `cross_value` are the [B, L, K, H] views (the projections' own layout,
    as in `torch_reference`). Without an encoder output the cross-attention arrays have S = 0.
    """

    self_keys: jax.Array  # [B, K, L, H]
    self_values: jax.Array  # [B, K, L, H]
    cross_keys: jax.Array  # [B, K, S, H]
    cross_values: jax.Array  # [B, K, S, H]

    @property
    def key(self) -> jax.Array:
        """Self-attention keys, [B, L, K, H]."""
        return self.self_keys.transpose(0, 2, 1, 3)

    @property
    def value(self) -> jax.Array:
        """Self-attention values, [B, L, K, H]."""
        return self.self_values.transpose(0, 2, 1, 3)

    @property
    def cross_key(self) -> jax.Array:
        """Cross-attention keys, [B, S, K, H]."""
        return self.cross_keys.transpose(0, 2, 1, 3)

    @property
    def cross_value(self) -> jax.Array:
        """Cross-attention values, [B, S, K, H]."""
        return self.cross_values.transpose(0, 2, 1, 3)


@flax.struct.dataclass
class DecoderCache:
    """All layers' caches, the number of positions written so far, and the encoder's padding mask.

    `layers` is a tuple of per-layer caches, or, for a model with scanned layers (`flax_model.layers.layer_scan`),
    one `LayerCache` whose arrays have a leading layer axis ([layers, B, K, L, H]) that the scan runs over.
    """

    layers: tuple[LayerCache, ...] | LayerCache
    index: jax.Array  # [] int32
    encoder_mask: jax.Array  # [B, S] bool, True where the encoder output is real

    @property
    def stacked(self) -> bool:
        """Whether the layers' caches are one stacked `LayerCache` (scanned layers)."""
        return isinstance(self.layers, LayerCache)

    @property
    def max_length(self) -> int:
        first = self.layers if self.stacked else self.layers[0]
        return first.self_keys.shape[-2]


def reorder_cache(cache: DecoderCache, beam_index: jax.Array, cross: bool = True) -> DecoderCache:
    """Gathers every per-sequence array along the batch axis (beam search); `index` is shared.

    Args:
        cache: the cache, batch B.
        beam_index: [B'] the row of `cache` each new row comes from.
        cross: also gather the cross-attention keys/values and the encoder mask. Beam search passes False
            when beams only move within their utterance, whose rows hold the same cross-attention arrays:
            that saves copying them at every step.
    """
    def gather(axis: int, cross: bool):
        take = lambda a: jnp.take(a, beam_index, axis=axis)  # noqa: E731
        keep = take if cross else (lambda a: a)
        return lambda c: LayerCache(take(c.self_keys), take(c.self_values), keep(c.cross_keys), keep(c.cross_values))

    if cache.stacked:  # [layers, B, ...]: the batch is the second axis
        layers = gather(1, cross)(cache.layers)
    else:
        layers = tuple(map(gather(0, cross), cache.layers))
    encoder_mask = jnp.take(cache.encoder_mask, beam_index, axis=0) if cross else cache.encoder_mask
    return DecoderCache(layers=layers, index=cache.index, encoder_mask=encoder_mask)
