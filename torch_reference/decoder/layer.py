"""One decoder layer of the core in the reference (mirroring `flax_model/decoder/layer.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import DecoderLayout
from torch_reference.cache import LayerCache
from torch_reference.decoder.attention import attend, rotate, split_heads
from torch_reference.decoder.tree import adopt, lookup
from torch_reference.layers import ACTIVATIONS


class DecoderLayer(nn.Module):
    """One layer: its blocks (`core.block_order`), each a residual branch with its norm(s); parameters at the
    layout's keys relative to the layer."""

    def __init__(self, core: DecoderCore, layout: DecoderLayout, index: int):
        super().__init__()
        self.core, self.layout, self.index = core, layout, index
        adopt(self, core, layout.present(core, layout.layer))

    def slot(self, name: str) -> Any:
        return lookup(self, self.layout.slots[name].torch)

    def has(self, name: str) -> bool:
        return name in self.layout.slots and self.core.has(name)

    # ------------------------------------------------------------------------------------------------------
    # Projections

    def project_queries(self, attention: str, x: torch.Tensor, fused: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] -> queries [B, T, N, H] of `attention` ("self_attn" or "cross_attn"); `fused` is the output of
        a fused query/key/value projection of x, when the layout has one."""
        core = self.core
        query = fused[..., :core.num_heads * core.head_dim] if fused is not None else self.slot(f"{attention}.q")(x)
        if core.query_scale is not None:
            query = query * core.query_scale
        query = split_heads(query, core.num_heads)
        if self.has(f"{attention}.q_norm"):
            query = self.slot(f"{attention}.q_norm")(query)
        return query

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention: [B, T, D] -> queries [B, T, N, H], keys, values [B, T, K, H] (keys and values first)."""
        if self.has("self_attn.qkv"):
            fused = self.slot("self_attn.qkv")(x)
            return (self.project_queries("self_attn", x, fused), *self.project_kv("self_attn", x, fused))
        key, value = self.project_kv("self_attn", x)
        return self.project_queries("self_attn", x), key, value

    def project_kv(self, attention: str, x: torch.Tensor, fused: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, D] -> keys, values [B, S, K, H] of `attention` (before any rotation); `fused` as in
        `project_queries`."""
        core = self.core
        heads = core.kv_heads if attention == "self_attn" else core.cross_kv_heads
        width = heads * core.head_dim
        if fused is not None:
            key, value = fused[..., core.num_heads * core.head_dim:].split(width, dim=-1)
        elif self.has(f"{attention}.kv"):
            key, value = self.slot(f"{attention}.kv")(x).split(width, dim=-1)
        else:
            key, value = self.slot(f"{attention}.k")(x), self.slot(f"{attention}.v")(x)
        key, value = split_heads(key, heads), split_heads(value, heads)
        if self.has(f"{attention}.k_norm"):
            key = self.slot(f"{attention}.k_norm")(key)
        return key, value

    # ------------------------------------------------------------------------------------------------------
    # Blocks

    def residual_block(self, block: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x plus `fn`'s output, normalised before (pre-norm) or after the sum (post-norm)."""
        core = self.core
        norm = self.slot(f"{block}_norm")
        out = fn(norm(x)) if core.pre_norm else fn(x)
        if core.post_block_norm:
            out = self.slot(f"{block}_post_norm")(out)
        out = F.dropout(out, p=core.residual_dropout, training=self.training)
        return x + out if core.pre_norm else norm(x + out)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.core
        act = ACTIVATIONS[core.activation]
        if core.gated_mlp:
            h = act(self.slot("mlp.gate")(x)) * self.slot("mlp.up")(x)
        else:
            h = act(self.slot("mlp.up")(x))
        return self.slot("mlp.down")(F.dropout(h, p=core.activation_dropout, training=self.training))

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_mask: torch.Tensor | None,
        layer_cache: LayerCache | None,
        index: int,
    ) -> tuple[torch.Tensor, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T|1, L]; rope (cos, sin) [T, H]; cross_kv keys/values [B, S, K, H]
        (None: no cross-attention) -> ([B, T, D], the new layer cache or None)."""
        core = self.core
        new_cache = None

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            nonlocal new_cache
            query, key, value = self.project_qkv(x)  # [B, T, N, H], [B, T, K, H]
            if rope is not None:
                query, key = rotate(query, *rope), rotate(key, *rope)
            if layer_cache is not None:
                slots = torch.arange(index, index + x.shape[1])
                key = layer_cache.key.index_copy(1, slots, key.to(layer_cache.key.dtype))  # [B, L, K, H]
                value = layer_cache.value.index_copy(1, slots, value.to(layer_cache.value.dtype))
                new_cache = dataclasses.replace(layer_cache, key=key, value=value)
            out = attend(core, query, key, value, self_mask, self.training, self.index)
            return self.slot("self_attn.o")(out)

        def cross_attention(x: torch.Tensor) -> torch.Tensor:
            query = self.project_queries("cross_attn", x)
            out = attend(core, query, *cross_kv, cross_mask, self.training, self.index)
            return self.slot("cross_attn.o")(out)

        for block in core.block_order:
            if block == "self_attn":
                hidden = self.residual_block(block, self_attention, hidden)
            elif block == "cross_attn" and cross_kv is not None:
                hidden = self.residual_block(block, cross_attention, hidden)
            elif block == "mlp":
                hidden = self.residual_block(block, self.feed_forward, hidden)
        return hidden, new_cache
