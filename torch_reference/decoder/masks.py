"""A decoder's attention masks (mirroring `flax_model/decoder/masks.py`)."""

from __future__ import annotations

import torch

from torch_reference.cache import DecoderCache


def make_causal_mask(query_positions: torch.Tensor, key_length: int, window: int | None = None) -> torch.Tensor:
    """[T] absolute query positions, key length L -> [T, L] bool, True where the key is not in the future (and,
    with a `window`, is one of the query's last `window` positions, itself included)."""
    keys = torch.arange(key_length, device=query_positions.device)[None, :]
    mask = keys <= query_positions[:, None]
    if window is not None:
        mask = mask & (keys > query_positions[:, None] - window)
    return mask


def make_attention_mask(causal: torch.Tensor | None, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal [T, S] | None and key padding [B, S] -> [B, 1, T|1, S] bool (True = attend)."""
    mask = key_mask.bool()[:, None, None, :]
    return mask if causal is None else mask & causal[None, None]


def key_padding(attention_mask: torch.Tensor | None, batch: int, key_length: int) -> torch.Tensor:
    """The decoder's real tokens over L key slots ([B, T] without a cache, [B, L] with one), all real when None."""
    if attention_mask is None:
        return torch.ones(batch, key_length, dtype=torch.bool)
    if attention_mask.shape[1] != key_length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions, expected {key_length} "
                         "(with a cache it covers every cache slot)")
    return attention_mask


def decoder_self_mask(attention_mask: torch.Tensor | None, positions: torch.Tensor, batch: int, key_length: int,
                      window: int | None = None) -> torch.Tensor:
    """Causal self-attention mask of T new tokens at `positions` [T] over L key slots -> [B, 1, T, L] bool."""
    keys = key_padding(attention_mask, batch, key_length)
    return make_attention_mask(make_causal_mask(positions, key_length, window), keys)


def decoder_cross_mask(cache: DecoderCache | None, encoder_hidden_states: torch.Tensor | None,
                       encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-attention mask [B, 1, 1, S]: the cache's encoder mask, else the given one (all real by default), else
    None when there is no encoder output to attend to (no states given, or a cache made without them)."""
    if cache is not None:
        return make_attention_mask(None, cache.encoder_mask) if cache.encoder_mask.shape[1] else None
    if encoder_hidden_states is None:
        return None
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool,
                                            device=encoder_hidden_states.device)
    return make_attention_mask(None, encoder_attention_mask)
