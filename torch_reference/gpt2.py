"""Plain-PyTorch GPT-2 as a causal LM with optional cross-attention (HF `GPT2LMHeadModel` keys).

The reference the Flax port is checked against. `state_dict()` keys equal HF's `GPT2LMHeadModel`
(`transformer.*`, `lm_head.weight`); the causal-mask buffers old versions saved (`attn.bias`,
`attn.masked_bias`) are not state here. Layers are pre-norm: self-attention, then (when
`config.add_cross_attention` and an encoder output is given) cross-attention, then the MLP, each on its own
residual branch. Cached decoding keeps an explicit `DecoderCache` (mirroring `flax_model/cache.py`) whose
cross-attention keys/values are projected once, at `init_cache`. `.train()` turns on `embd_pdrop`, `attn_pdrop`
and `resid_pdrop`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.gpt2 import GPT2Config
from torch_reference.layers import (
    ACTIVATIONS,
    DecoderCache,
    LayerCache,
    decoder_cross_mask,
    decoder_self_mask,
)

# ----------------------------------------------------------------------------------------------------------
# Modules


class Conv1D(nn.Module):
    """GPT-2's linear layer: `x @ weight + bias` with the weight stored (in, out), transposed from nn.Linear."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).normal_(std=std))  # [in, out]
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    """Self-attention (`c_attn` projects queries, keys, values) or cross-attention (`q_attn` the queries,
    `c_attn` the encoder output's keys and values)."""

    def __init__(self, config: GPT2Config, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        d, std = config.n_embd, config.initializer_range
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.head_dim = d // config.n_head
        if is_cross_attention:
            self.c_attn = Conv1D(d, 2 * d, std)
            self.q_attn = Conv1D(d, d, std)
        else:
            self.c_attn = Conv1D(d, 3 * d, std)
        self.c_proj = Conv1D(d, d, std)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention: [B, T, D] -> queries, keys, values [B, T, N, H]."""
        return tuple(self._split_heads(p) for p in self.c_attn(x).split(self.config.n_embd, dim=2))

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention: [B, T, D] -> queries [B, T, N, H]."""
        return self._split_heads(self.q_attn(x))

    def project_kv(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention: [B, S, D] -> keys, values [B, S, N, H]."""
        key, value = self.c_attn(encoder_hidden_states).split(self.config.n_embd, dim=2)
        return self._split_heads(key), self._split_heads(value)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, T, N, H], key/value [B, S, N, H], mask [B, 1, T|1, S] bool -> [B, T, D]."""
        cfg = self.config
        if cfg.reorder_and_upcast_attn:
            # HF computes these scores in float32 whatever the model's dtype.
            query, key = query.float(), key.float()
        scores = torch.einsum("btnh,bsnh->bnts", query, key)
        if cfg.scale_attn_weights:
            scores = scores / math.sqrt(self.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scores = scores / float(self.layer_idx + 1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        probs = F.dropout(probs, p=cfg.attn_pdrop, training=self.training)
        out = torch.einsum("bnts,bsnh->btnh", probs, value)  # [B, T, N, H]
        out = self.c_proj(out.reshape(*out.shape[:2], cfg.n_embd))
        return F.dropout(out, p=cfg.resid_pdrop, training=self.training)  # [B, T, D]


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.c_fc = Conv1D(config.n_embd, config.inner_size, config.initializer_range)
        self.c_proj = Conv1D(config.inner_size, config.n_embd, config.initializer_range)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(self.act(self.c_fc(x))), p=self.config.resid_pdrop, training=self.training)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        if config.add_cross_attention:
            self.crossattention = GPT2Attention(config, layer_idx, is_cross_attention=True)
            self.ln_cross_attn = nn.LayerNorm(d, eps=eps)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_mask: torch.Tensor | None,
        layer_cache: LayerCache | None,
        index: int,
    ) -> tuple[torch.Tensor, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T, L]; cross_kv [B, S, N, H] each -> ([B, T, D], new cache)."""
        new_cache = None
        query, key, value = self.attn.project_qkv(self.ln_1(hidden))  # [B, T, N, H]
        if layer_cache is not None:
            length = hidden.shape[1]
            key = layer_cache.key.index_copy(1, torch.arange(index, index + length), key)  # [B, L, N, H]
            value = layer_cache.value.index_copy(1, torch.arange(index, index + length), value)
            new_cache = dataclasses.replace(layer_cache, key=key, value=value)
        hidden = hidden + self.attn(query, key, value, self_mask)
        if cross_kv is not None:
            query = self.crossattention.project_query(self.ln_cross_attn(hidden))
            hidden = hidden + self.crossattention(query, *cross_kv, cross_mask)
        hidden = hidden + self.mlp(self.ln_2(hidden))
        return hidden, new_cache


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        with torch.no_grad():
            self.wte.weight.normal_(std=config.initializer_range)
            self.wpe.weight.normal_(std=config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        cache: DecoderCache | None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        batch, length = input_ids.shape
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        positions = torch.arange(start, start + length, device=input_ids.device)  # [T]
        self_mask = decoder_self_mask(attention_mask, positions, batch, key_length)  # [B, 1, T, L]

        cross = self.config.add_cross_attention
        if encoder_hidden_states is not None and not cross:
            raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=False")
        # HF skips cross-attention when no encoder output is given.
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask) if cross else None

        hidden = self.wte(input_ids) + self.wpe(positions)[None]  # [B, T, D]
        hidden = F.dropout(hidden, p=self.config.embd_pdrop, training=self.training)
        new_layers = []
        for i, block in enumerate(self.h):
            layer_cache = cache.layers[i] if cache is not None else None
            if cross_mask is None:
                cross_kv = None
            elif layer_cache is not None:
                cross_kv = (layer_cache.cross_key, layer_cache.cross_value)
            else:
                cross_kv = block.crossattention.project_kv(encoder_hidden_states)
            hidden, new_layer_cache = block(hidden, self_mask, cross_kv, cross_mask, layer_cache, start)
            new_layers.append(new_layer_cache)
        hidden = self.ln_f(hidden)
        if cache is None:
            return hidden, None
        return hidden, DecoderCache(tuple(new_layers), start + length, cache.encoder_mask)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with an LM head and optional cross-attention, HF `GPT2LMHeadModel` state_dict keys."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """Next-token logits.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: 1 for real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
            encoder_hidden_states: [B, S, D]; ignored with a cache (its keys/values were projected at init_cache).
            encoder_attention_mask: [B, S], 1 for real encoder frames; ignored with a cache.
            cache: from `init_cache` or a previous call; the tokens sit at positions `cache.index + arange(T)`.

        Returns:
            (logits [B, T, V], the advanced cache or None).
        """
        hidden, cache = self.transformer(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                         cache)
        return self.lm_head(hidden), cache

    @torch.no_grad()
    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output; required with cross-attention, else must be None.
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        cfg = self.config
        heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        if cfg.add_cross_attention != (encoder_hidden_states is not None):
            raise ValueError(f"init_cache: encoder_hidden_states must be given exactly when add_cross_attention "
                             f"(add_cross_attention={cfg.add_cross_attention})")
        dtype = self.transformer.wte.weight.dtype
        if encoder_hidden_states is None:
            encoder_attention_mask = torch.ones(batch_size, 0, dtype=torch.bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool)
        layers = []
        for block in self.transformer.h:
            empty = torch.zeros(batch_size, max_length, heads, head_dim, dtype=dtype)
            if encoder_hidden_states is None:
                no_cross = torch.zeros(batch_size, 0, heads, head_dim, dtype=dtype)
                cross_key, cross_value = no_cross, no_cross.clone()
            else:
                cross_key, cross_value = block.crossattention.project_kv(encoder_hidden_states)  # [B, S, N, H]
            layers.append(LayerCache(empty, empty.clone(), cross_key, cross_value))
        return DecoderCache(tuple(layers), 0, encoder_attention_mask.bool())
