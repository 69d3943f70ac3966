"""Small pieces shared by the reference architectures: activations, the decoder cache, attention masks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclasses.dataclass
class LayerCache:
    """One layer's cache in the projections' layout, [B, L, N, H]: the `key`, `value`, `cross_key` and
    `cross_value` views of `flax_model.cache.LayerCache` (which stores them heads first, for XLA)."""

    key: torch.Tensor  # [B, L, N, H]
    value: torch.Tensor  # [B, L, N, H]
    cross_key: torch.Tensor  # [B, S, N, H] ([B, 0, N, H] without cross-attention)
    cross_value: torch.Tensor  # [B, S, N, H]


@dataclasses.dataclass
class DecoderCache:
    """All layers' caches, the number of positions written so far, and the encoder's padding mask."""

    layers: tuple[LayerCache, ...]
    index: int
    encoder_mask: torch.Tensor  # [B, S] bool

    @property
    def max_length(self) -> int:
        return self.layers[0].key.shape[1]


def frame_mask(encoder_config: Any, attention_mask: torch.Tensor, num_frames: int,
               add_adapter: bool | None = None) -> torch.Tensor:
    """Which of an encoder's output frames hold real audio, from the sample-level mask: [B, N] -> [B, S] bool,
    True for the first `encoder_config.output_lengths(sum(attention_mask))` frames of each row."""
    lengths = encoder_config.output_lengths(attention_mask.sum(-1).long(), add_adapter)  # [B]
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def layer_drop(training: bool, rate: float) -> bool:
    """LayerDrop as transformers does it: in training, skip the layer when a fresh `torch.rand([])` < rate."""
    return training and rate > 0.0 and bool(torch.rand([]) < rate)


def make_causal_mask(query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
    """[T] absolute query positions, key length L -> [T, L] bool, True where the key is not in the future."""
    return torch.arange(key_length, device=query_positions.device)[None, :] <= query_positions[:, None]


def make_attention_mask(causal: torch.Tensor | None, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal [T, S] | None and key padding [B, S] -> [B, 1, T|1, S] bool (True = attend)."""
    mask = key_mask.bool()[:, None, None, :]
    return mask if causal is None else mask & causal[None, None]


def decoder_self_mask(attention_mask: torch.Tensor | None, positions: torch.Tensor, batch: int,
                      key_length: int) -> torch.Tensor:
    """Causal self-attention mask of T new tokens at `positions` [T] over L key slots -> [B, 1, T, L] bool.

    `attention_mask` marks real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
    """
    if attention_mask is None:
        attention_mask = torch.ones(batch, key_length, dtype=torch.bool, device=positions.device)
    elif attention_mask.shape[1] != key_length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions, expected {key_length} "
                         "(with a cache it covers every cache slot)")
    return make_attention_mask(make_causal_mask(positions, key_length), attention_mask)


def decoder_cross_mask(cache: DecoderCache | None, encoder_hidden_states: torch.Tensor | None,
                       encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-attention mask [B, 1, 1, S]: the cache's encoder mask, else the given one (all real by
    default), else None when there is no encoder output to attend to."""
    if cache is not None:
        return make_attention_mask(None, cache.encoder_mask)
    if encoder_hidden_states is None:
        return None
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool,
                                            device=encoder_hidden_states.device)
    return make_attention_mask(None, encoder_attention_mask)
