"""The decoder's key/value cache in the reference: an explicit object, passed into `decode` and returned from it.

It mirrors `flax_model/cache.py` in the projections' layout, [B, L, K, H] (K key/value heads), where Flax stores the
same arrays heads first ([B, K, L, H], the layout XLA contracts in place): `LayerCache.key` here is Flax's
`LayerCache.key` view.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LayerCache:
    """One layer's cache: self-attention keys/values written at `DecoderCache.index`, and cross-attention
    keys/values projected from the encoder output once, at `init_cache`."""

    key: torch.Tensor  # [B, L, K, H]
    value: torch.Tensor  # [B, L, K, H]
    cross_key: torch.Tensor  # [B, S, K, H] ([B, 0, K, H] without cross-attention)
    cross_value: torch.Tensor  # [B, S, K, H]


@dataclasses.dataclass
class DecoderCache:
    """All layers' caches, the number of positions written so far, and the encoder's padding mask."""

    layers: tuple[LayerCache, ...]
    index: int
    encoder_mask: torch.Tensor  # [B, S] bool

    @property
    def max_length(self) -> int:
        return self.layers[0].key.shape[1]
