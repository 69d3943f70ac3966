"""Plain-PyTorch BART / mBART decoder as a causal LM with cross-attention (HF `BartForCausalLM` keys).

The reference the Flax port is checked against. `state_dict()` keys equal HF's `BartForCausalLM`
(`model.decoder.*`, `lm_head.weight`) plus `final_logits_bias` when `config.lm_head_bias`. BART layers are
post-norm; mBART layers are pre-norm and the decoder ends with `layer_norm`. Cached decoding keeps an explicit
`DecoderCache` (mirroring `flax_model/cache.py`) whose cross-attention keys/values are projected once.
`.train()` turns on dropout, attention and activation dropout and LayerDrop (`decoder_layerdrop`, `torch.rand`
per layer as transformers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.bart import BartConfig
from torch_reference.layers import (
    ACTIVATIONS,
    DecoderCache,
    LayerCache,
    decoder_cross_mask,
    decoder_self_mask,
    layer_drop,
)

LAYER_NORM_EPS = 1e-5  # HF's BART uses nn.LayerNorm's default


# ----------------------------------------------------------------------------------------------------------
# Modules


class BartAttention(nn.Module):
    """Multi-head attention; keys/values are projected separately so that they can be cached."""

    def __init__(self, config: BartConfig):
        super().__init__()
        d = config.d_model
        self.num_heads = config.decoder_attention_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, D] -> keys, values [B, S, N, H]."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def forward(self, hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], key/value [B, S, N, H], mask [B, 1, T, S] bool -> [B, T, D]."""
        query = self._split_heads(self.q_proj(hidden) * self.scaling)  # [B, T, N, H]
        scores = torch.einsum("btnh,bsnh->bnts", query, key)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        out = torch.einsum("bnts,bsnh->btnh", probs, value)
        return self.out_proj(out.reshape(*hidden.shape))


class BartDecoderLayer(nn.Module):
    """Self-attention, cross-attention and MLP blocks, each with a residual and a LayerNorm."""

    def __init__(self, config: BartConfig):
        super().__init__()
        d = config.d_model
        self.pre_norm = config.is_mbart
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACTIVATIONS[config.activation_function]
        self.self_attn = BartAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.encoder_attn = BartAttention(config)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def _residual(self, norm: nn.LayerNorm, block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        # mBART normalises each block's input; BART normalises after the residual sum.
        if self.pre_norm:
            return x + F.dropout(block(norm(x)), p=self.dropout, training=self.training)
        return norm(x + F.dropout(block(x), p=self.dropout, training=self.training))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.activation(self.fc1(x)), p=self.activation_dropout, training=self.training)
        return self.fc2(h)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
        layer_cache: LayerCache | None,
        index: int,
    ) -> tuple[torch.Tensor, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T, L]; cross_mask [B, 1, 1, S] -> ([B, T, D], new cache)."""
        new_cache = None
        cross_kv = None
        if layer_cache is not None:
            cross_kv = (layer_cache.cross_key, layer_cache.cross_value)
        elif encoder_hidden_states is not None:
            cross_kv = self.encoder_attn.project_kv(encoder_hidden_states)

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            nonlocal new_cache
            key, value = self.self_attn.project_kv(x)  # [B, T, N, H]
            if layer_cache is not None:
                t = x.shape[1]
                key = torch.cat([layer_cache.key[:, :index], key, layer_cache.key[:, index + t:]], dim=1)
                value = torch.cat([layer_cache.value[:, :index], value, layer_cache.value[:, index + t:]], dim=1)
                new_cache = dataclasses.replace(layer_cache, key=key, value=value)  # [B, L, N, H]
            return self.self_attn(x, key, value, self_mask)

        hidden = self._residual(self.self_attn_layer_norm, self_attention, hidden)
        if cross_kv is not None:
            cross = lambda x: self.encoder_attn(x, *cross_kv, cross_mask)
            hidden = self._residual(self.encoder_attn_layer_norm, cross, hidden)
        hidden = self._residual(self.final_layer_norm, self._mlp, hidden)
        return hidden, new_cache


class BartLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions; row `p + 2` holds position `p` (fairseq kept rows 0 and 1 for padding)."""

    def __init__(self, config: BartConfig):
        self.offset = config.position_offset
        super().__init__(config.max_position_embeddings + self.offset, config.d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.offset)


class BartDecoder(nn.Module):
    """Token and position embeddings, `layernorm_embedding`, the layers, and (mBART) a final `layer_norm`."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        # padding_idx only stops the pad row's gradient, as in HF.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.embed_positions = BartLearnedPositionalEmbedding(config)
        self.layers = nn.ModuleList([BartDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS) if config.is_mbart else None

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
        if key_length > self.config.max_position_embeddings:
            raise ValueError(f"{key_length} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if start + length > key_length:
            raise ValueError(f"{length} new tokens at position {start} overflow a cache of {key_length} slots")
        positions = torch.arange(start, start + length, device=input_ids.device)  # [T]
        self_mask = decoder_self_mask(attention_mask, positions, batch, key_length)  # [B, 1, T, L]

        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask)  # [B, 1, 1, S]
        if cache is not None:
            encoder_hidden_states = None  # cross-attention reads the keys/values projected at init_cache

        hidden = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions)[None]
        hidden = F.dropout(self.layernorm_embedding(hidden), p=self.dropout, training=self.training)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if layer_drop(self.training, self.config.decoder_layerdrop):  # the layer's input and cache pass through
                new_layers.append(layer_cache)
                continue
            hidden, new_layer_cache = layer(hidden, self_mask, encoder_hidden_states, cross_mask, layer_cache, start)
            new_layers.append(new_layer_cache)
        if self.layer_norm is not None:
            hidden = self.layer_norm(hidden)
        if cache is None:
            return hidden, None
        return hidden, DecoderCache(tuple(new_layers), start + length, cache.encoder_mask)


class BartDecoderWrapper(nn.Module):
    """HF's wrapper, only there so that the keys start with `model.decoder.`."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.decoder = BartDecoder(config)


class BartForCausalLM(nn.Module):
    """BART / mBART decoder with cross-attention and an LM head, HF `BartForCausalLM` state_dict keys."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.model = BartDecoderWrapper(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        if config.lm_head_bias:
            # BartForConditionalGeneration keeps this as a [1, V] buffer; so do we, for the same key and shape.
            self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))

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
        hidden, cache = self.model.decoder(input_ids, attention_mask, encoder_hidden_states,
                                           encoder_attention_mask, cache)
        logits = self.lm_head(hidden)
        if self.config.lm_head_bias:
            logits = logits + self.final_logits_bias
        return logits, cache

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output.
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        cfg = self.config
        heads, head_dim = cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool,
                                                device=encoder_hidden_states.device)
        dtype, device = encoder_hidden_states.dtype, encoder_hidden_states.device
        layers = []
        for layer in self.model.decoder.layers:
            empty = torch.zeros(batch_size, max_length, heads, head_dim, dtype=dtype, device=device)
            cross_key, cross_value = layer.encoder_attn.project_kv(encoder_hidden_states)
            layers.append(LayerCache(empty, empty.clone(), cross_key, cross_value))
        return DecoderCache(tuple(layers), 0, encoder_attention_mask.bool())
