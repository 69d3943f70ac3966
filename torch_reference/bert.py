"""Plain-PyTorch BERT as a causal LM with optional cross-attention (HF `BertLMHeadModel` keys).

The reference the Flax port is checked against. `state_dict()` keys equal transformers 5's `BertLMHeadModel`
(`bert.embeddings.*`, `bert.encoder.layer.<i>.*`, `cls.predictions.*`; no pooler). Tied heads share
`cls.predictions.decoder.weight` with the word embedding and `cls.predictions.decoder.bias` with
`cls.predictions.bias`; untied heads have their own decoder weight and bias, and the logits use that bias.
Layers are post-norm: self-attention, then (when `config.add_cross_attention` and an encoder output is given)
cross-attention, then the feed-forward block. `is_decoder` makes self-attention causal. Token type 0 everywhere.
`BertModel` takes the position ids from its caller, so that `torch_reference.roberta` reuses it.

Cached decoding keeps an explicit `DecoderCache` (mirroring `flax_model/cache.py`) whose cross-attention
keys/values are projected once, at `init_cache`. `.train()` turns on `hidden_dropout_prob` and
`attention_probs_dropout_prob`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.bert import BertConfig, BertLikeConfig
from torch_reference.layers import (
    ACTIVATIONS,
    DecoderCache,
    LayerCache,
    decoder_cross_mask,
    decoder_self_mask,
    make_attention_mask,
)

# ----------------------------------------------------------------------------------------------------------
# Modules


class BertEmbeddings(nn.Module):
    """Word + position + token type 0 embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertLikeConfig, position_padding_idx: int | None = None):
        super().__init__()
        self.config = config
        d = config.hidden_size
        # padding_idx only stops the pad row's gradient, as in transformers.
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d, padding_idx=position_padding_idx)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T], position_ids [B|1, T] -> [B, T, D]."""
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # every token is type 0
        hidden = hidden + self.position_embeddings(position_ids)
        return F.dropout(self.LayerNorm(hidden), p=self.config.hidden_dropout_prob, training=self.training)


class BertSelfAttention(nn.Module):
    """`query`, `key`, `value` projections and the attention itself."""

    def __init__(self, config: BertLikeConfig):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.config.num_attention_heads, self.config.head_dim)  # [B, T, N, H]

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> queries [B, T, N, H]."""
        return self._split_heads(self.query(x))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, D] -> keys, values [B, S, N, H]."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, T, N, H], key/value [B, S, N, H], mask [B, 1, T|1, S] bool -> context [B, T, D]."""
        cfg = self.config
        scores = torch.einsum("btnh,bsnh->bnts", query, key) * cfg.head_dim**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=cfg.attention_probs_dropout_prob, training=self.training)
        out = torch.einsum("bnts,bsnh->btnh", probs, value)
        return out.reshape(*out.shape[:2], cfg.hidden_size)


class BertResidualOutput(nn.Module):
    """`dense`, dropout, then `LayerNorm` of the sum with the block's input (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, config: BertLikeConfig, in_features: int):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(self.dense(hidden), p=self.config.hidden_dropout_prob, training=self.training)
        return self.LayerNorm(hidden + residual)


class BertAttention(nn.Module):
    """Self- or cross-attention (`self`) and its residual output (`output`)."""

    def __init__(self, config: BertLikeConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] (queries and residual), key/value [B, S, N, H] -> [B, T, D]."""
        return self.output(self.self(self.self.project_query(hidden), key, value, mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertLikeConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: BertLikeConfig):
        super().__init__()
        self.attention = BertAttention(config)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_mask: torch.Tensor | None,
        layer_cache: LayerCache | None,
        index: int,
    ) -> tuple[torch.Tensor, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T|1, L]; cross_kv [B, S, N, H] each -> ([B, T, D], new cache)."""
        new_cache = None
        key, value = self.attention.self.project_kv(hidden)  # [B, T, N, H]
        if layer_cache is not None:
            slots = torch.arange(index, index + hidden.shape[1])
            key = layer_cache.key.index_copy(1, slots, key)  # [B, L, N, H]
            value = layer_cache.value.index_copy(1, slots, value)
            new_cache = dataclasses.replace(layer_cache, key=key, value=value)
        hidden = self.attention(hidden, key, value, self_mask)
        if cross_kv is not None:
            hidden = self.crossattention(hidden, *cross_kv, cross_mask)
        return self.output(self.intermediate(hidden), hidden), new_cache


class BertEncoder(nn.Module):
    """HF's wrapper around the layer list (`encoder.layer.<i>`)."""

    def __init__(self, config: BertLikeConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertModel(nn.Module):
    """Embeddings and layers (HF's `bert` / `roberta` submodule, without the pooler)."""

    def __init__(self, config: BertLikeConfig, position_padding_idx: int | None = None):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, position_padding_idx)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        cache: DecoderCache | None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """Last hidden states [B, T, D] and the advanced cache; `position_ids` [B|1, T] index the position
        embedding, the self-attention mask is over cache slots `cache.index + arange(T)`."""
        cfg = self.config
        batch, length = input_ids.shape
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        if key_length > cfg.max_positions:
            raise ValueError(f"{key_length} positions exceed the decoder's {cfg.max_positions}")
        if start + length > key_length:
            raise ValueError(f"{length} new tokens at position {start} overflow a cache of {key_length} slots")
        if cfg.is_decoder:
            slots = torch.arange(start, start + length, device=input_ids.device)  # [T]
            self_mask = decoder_self_mask(attention_mask, slots, batch, key_length)  # [B, 1, T, L]
        elif cache is not None:
            raise ValueError("a cache needs a causal decoder (the config has is_decoder=False)")
        else:  # transformers' BERT without is_decoder attends both ways
            keys = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask
            self_mask = make_attention_mask(None, keys)  # [B, 1, 1, T]

        cross = cfg.add_cross_attention
        if encoder_hidden_states is not None and not cross:
            raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=False")
        # transformers skips cross-attention when no encoder output is given.
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask) if cross else None

        hidden = self.embeddings(input_ids, position_ids)  # [B, T, D]
        new_layers = []
        for i, layer in enumerate(self.encoder.layer):
            layer_cache = cache.layers[i] if cache is not None else None
            if cross_mask is None:
                cross_kv = None
            elif layer_cache is not None:
                cross_kv = (layer_cache.cross_key, layer_cache.cross_value)
            else:
                cross_kv = layer.crossattention.self.project_kv(encoder_hidden_states)
            hidden, new_layer_cache = layer(hidden, self_mask, cross_kv, cross_mask, layer_cache, start)
            new_layers.append(new_layer_cache)
        if cache is None:
            return hidden, None
        return hidden, DecoderCache(tuple(new_layers), start + length, cache.encoder_mask)

    @torch.no_grad()
    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: torch.Tensor | None = None,
                   encoder_attention_mask: torch.Tensor | None = None) -> DecoderCache:
        cfg = self.config
        if not cfg.is_decoder:
            raise ValueError("init_cache: a cache needs a causal decoder (the config has is_decoder=False)")
        if cfg.add_cross_attention != (encoder_hidden_states is not None):
            raise ValueError(f"init_cache: encoder_hidden_states must be given exactly when add_cross_attention "
                             f"(add_cross_attention={cfg.add_cross_attention})")
        if max_length > cfg.max_positions:
            raise ValueError(f"init_cache: {max_length} positions exceed the decoder's {cfg.max_positions}")
        dtype = self.embeddings.word_embeddings.weight.dtype
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        if encoder_hidden_states is None:
            encoder_attention_mask = torch.ones(batch_size, 0, dtype=torch.bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool)
        layers = []
        for layer in self.encoder.layer:
            empty = torch.zeros(batch_size, max_length, heads, head_dim, dtype=dtype)
            if encoder_hidden_states is None:
                no_cross = torch.zeros(batch_size, 0, heads, head_dim, dtype=dtype)
                cross_key, cross_value = no_cross, no_cross.clone()
            else:
                cross_key, cross_value = layer.crossattention.self.project_kv(encoder_hidden_states)  # [B, S, N, H]
            layers.append(LayerCache(empty, empty.clone(), cross_key, cross_value))
        return DecoderCache(tuple(layers), 0, encoder_attention_mask.bool())


class VocabularyProjection(nn.Module):
    """The end of BERT's and RoBERTa's heads: `decoder` (a linear layer onto the vocabulary) and `bias`.

    Tied: `decoder.weight` is the word embedding and `decoder.bias` is `bias`. Untied (transformers 5): both of
    `decoder`'s own, and `bias` unused.
    """

    def __init__(self, config: BertLikeConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.tie_word_embeddings:
            self.decoder.weight = word_embeddings.weight
            self.decoder.bias = self.bias


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertLikeConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class BertLMPredictionHead(VocabularyProjection):
    def __init__(self, config: BertLikeConfig, word_embeddings: nn.Embedding):
        super().__init__(config, word_embeddings)
        self.transform = BertPredictionHeadTransform(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    """HF's `cls` wrapper, only there so that the keys start with `cls.predictions.`."""

    def __init__(self, config: BertLikeConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)


class BertLMHeadModel(nn.Module):
    """BERT with a prediction head and optional cross-attention, HF `BertLMHeadModel` state_dict keys."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)

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
        start = cache.index if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]  # [1, T]
        hidden, cache = self.bert(input_ids, positions, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, cache)
        return self.cls.predictions(hidden), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: torch.Tensor | None = None,
                   encoder_attention_mask: torch.Tensor | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output; required with cross-attention, else must be None.
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        return self.bert.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)
