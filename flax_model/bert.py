"""BERT as a causal LM with optional cross-attention, in pure flax.linen.

The param tree is HF's `FlaxBertForCausalLMModule`: `bert/embeddings/{word,position,token_type}_embeddings`,
`bert/embeddings/LayerNorm`, `bert/encoder/layer/<i>/{attention,crossattention}/{self/{query,key,value},
output/{dense,LayerNorm}}`, `.../intermediate/dense`, `.../output/{dense,LayerNorm}`, and the head
`cls/predictions/{transform/{dense,LayerNorm}, bias}` plus, untied only, `cls/predictions/decoder/{kernel,bias}`
(HF's Flax head had no decoder bias; transformers 5's untied head reads one, so it is `decoder/bias` here).

Layers are post-norm. `is_decoder` makes self-attention causal (transformers' BertLMHeadModel is bidirectional
without it, and then has no cache). Token type 0 everywhere. `BertModule` (embeddings and layers) takes the
embeddings' position ids from its caller, so that `flax_model.roberta` reuses it with RoBERTa's positions.

Decoding uses an explicit `DecoderCache`: `init_cache` projects the cross-attention keys/values once, and each
call writes the new self-attention keys/values at `cache.index` and returns the advanced cache.

Training (`deterministic=False`, a "dropout" rng): `hidden_dropout_prob` (embeddings, each block's output) and
`attention_probs_dropout_prob`; BERT has no LayerDrop. Lookups of the pad token pass no gradient to the
embedding row, as torch's `padding_idx` (`padding_row_without_gradient`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.archs.bert import BertConfig, BertLikeConfig
from flax_model.cache import DecoderCache, LayerCache
from flax_model.layers import (
    ACTIVATIONS,
    decoder_cross_mask,
    decoder_positions,
    decoder_self_mask,
    make_attention_mask,
    make_stack,
    map_stack,
    run_layers,
)

# ----------------------------------------------------------------------------------------------------------
# Modules


def layer_norm(config: BertLikeConfig, dtype: Any) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the one-pass form loses digits that 1e-5 parity needs.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False)


def dense(config: BertLikeConfig, features: int, dtype: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(config.initializer_range))


def padding_row_without_gradient(vectors: jax.Array, ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """vectors [B, T, D] looked up for ids [B, T]: the lookups of `padding_idx` pass no gradient to the table,
    as torch's `nn.Embedding(padding_idx=...)` does (transformers' word and RoBERTa position embeddings)."""
    if padding_idx is None:
        return vectors
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(vectors), vectors)


class BertEmbeddings(nn.Module):
    """Word + position + token type 0 embeddings, then LayerNorm and dropout."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        embed = lambda n: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,  # noqa: E731
                                   embedding_init=nn.initializers.normal(cfg.initializer_range))
        self.word_embeddings = embed(cfg.vocab_size)
        self.position_embeddings = embed(cfg.max_position_embeddings)
        self.token_type_embeddings = embed(cfg.type_vocab_size)
        self.LayerNorm = layer_norm(cfg, self.dtype)
        self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array, position_padding_idx: int | None,
                 deterministic: bool = True) -> jax.Array:
        """input_ids [B, T], position_ids [B|1, T] -> [B, T, D]."""
        words = padding_row_without_gradient(self.word_embeddings(input_ids), input_ids, self.config.pad_token_id)
        positions = padding_row_without_gradient(self.position_embeddings(position_ids), position_ids,
                                                 position_padding_idx)
        token_type = self.token_type_embeddings.embedding[0].astype(self.dtype)  # [D]: every token is type 0
        hidden = words + token_type + positions
        return self.dropout(self.LayerNorm(hidden), deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """`query`, `key`, `value` projections and the attention itself; keys/values are projected by `project_kv`
    so that they can be cached (cross-attention's once, at `init_cache`)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.query = dense(cfg, cfg.hidden_size, self.dtype)
        self.key = dense(cfg, cfg.hidden_size, self.dtype)
        self.value = dense(cfg, cfg.hidden_size, self.dtype)
        self.dropout = nn.Dropout(rate=cfg.attention_probs_dropout_prob)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        # Heads first, the layout of the cache (see flax_model.cache.LayerCache).
        cfg = self.config
        return x.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.head_dim).transpose(0, 2, 1, 3)  # [B, N, T, H]

    def project_query(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> queries [B, N, T, H]."""
        return self._split_heads(self.query(x))

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys, values [B, N, S, H]."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x))

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """query [B, N, T, H], key/value [B, N, S, H], mask [B, 1, T|1, S] bool -> context [B, T, D]."""
        scores = jnp.einsum("BNTH,BNSH->BNTS", query, key) * self.config.head_dim**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = self.dropout(probs, deterministic=deterministic)
        out = jnp.einsum("BNTS,BNSH->BTNH", probs, value)
        return out.reshape(*out.shape[:2], self.config.hidden_size)  # [B, T, D]


class BertResidualOutput(nn.Module):
    """`dense`, dropout, then `LayerNorm` of the sum with the block's input (HF's BertSelfOutput / BertOutput)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.dense = dense(cfg, cfg.hidden_size, self.dtype)
        self.LayerNorm = layer_norm(cfg, self.dtype)
        self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

    def __call__(self, hidden: jax.Array, residual: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(hidden), deterministic=deterministic) + residual)


class BertAttention(nn.Module):
    """Self- or cross-attention (`self`) and its residual output (`output`)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.self = BertSelfAttention(self.config, self.dtype)
        self.output = BertResidualOutput(self.config, self.dtype)

    def __call__(self, hidden: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """hidden [B, T, D] (queries and residual), key/value [B, N, S, H] -> [B, T, D]."""
        context = self.self(self.self.project_query(hidden), key, value, mask, deterministic)
        return self.output(context, hidden, deterministic)


class BertIntermediate(nn.Module):
    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.dense = dense(self.config, self.config.intermediate_size, self.dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.config.hidden_act](self.dense(hidden))  # [B, T, intermediate_size]


class BertLayer(nn.Module):
    """Self-attention, cross-attention (when configured and given), feed-forward; each post-norm."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.attention = BertAttention(cfg, self.dtype)
        if cfg.add_cross_attention:
            self.crossattention = BertAttention(cfg, self.dtype)
        self.intermediate = BertIntermediate(cfg, self.dtype)
        self.output = BertResidualOutput(cfg, self.dtype)

    def init_layer_cache(self, batch_size: int, max_length: int,
                         encoder_hidden_states: jax.Array | None) -> LayerCache:
        cfg = self.config
        empty = jnp.zeros((batch_size, cfg.num_attention_heads, max_length, cfg.head_dim), self.dtype)
        if encoder_hidden_states is None:
            no_cross = jnp.zeros((batch_size, cfg.num_attention_heads, 0, cfg.head_dim), self.dtype)
            return LayerCache(empty, empty, no_cross, no_cross)
        cross_key, cross_value = self.crossattention.self.project_kv(encoder_hidden_states)  # [B, N, S, H]
        return LayerCache(empty, empty, cross_key, cross_value)

    def __call__(
        self,
        hidden: jax.Array,
        self_mask: jax.Array,
        encoder_hidden_states: jax.Array | None,
        cross_mask: jax.Array | None,
        layer_cache: LayerCache | None,
        index: jax.Array | int,
        deterministic: bool = True,
    ) -> tuple[jax.Array, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T|1, L]; cross_mask [B, 1, 1, S] | None -> ([B, T, D], new cache).

        Cross-attention runs when `cross_mask` is given, reading the cache's keys/values when there is a
        cache and projecting `encoder_hidden_states` otherwise.
        """
        new_cache = None
        key, value = self.attention.self.project_kv(hidden)  # [B, N, T, H]
        if layer_cache is not None:
            at = (0, 0, index, 0)
            key = jax.lax.dynamic_update_slice(layer_cache.self_keys, key.astype(layer_cache.self_keys.dtype), at)
            value = jax.lax.dynamic_update_slice(layer_cache.self_values, value.astype(layer_cache.self_values.dtype),
                                                 at)
            new_cache = layer_cache.replace(self_keys=key, self_values=value)  # [B, N, L, H]
        hidden = self.attention(hidden, key, value, self_mask, deterministic)
        if cross_mask is not None:
            if layer_cache is not None:
                cross_kv = (layer_cache.cross_keys, layer_cache.cross_values)  # [B, N, S, H]
            else:
                cross_kv = self.crossattention.self.project_kv(encoder_hidden_states)
            hidden = self.crossattention(hidden, *cross_kv, cross_mask, deterministic)
        hidden = self.output(self.intermediate(hidden), hidden, deterministic)
        return hidden, new_cache


class BertLayerCollection(nn.Module):
    """The layer list; a module of its own so that layer 3 lives at `encoder/layer/3` (HF's Flax layout)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layers = make_stack(self, lambda i, name: BertLayer(self.config, self.dtype, name=name),
                                 self.config.num_hidden_layers)

    def init_cache_layers(self, batch_size: int, max_length: int,
                          encoder_hidden_states: jax.Array | None) -> tuple[LayerCache, ...] | LayerCache:
        return map_stack(self.layers, self.config.num_hidden_layers,
                         lambda layer: layer.init_layer_cache(batch_size, max_length, encoder_hidden_states))

    def __call__(self, hidden, self_mask, encoder_hidden_states, cross_mask, cache: DecoderCache | None,
                 deterministic: bool = True) -> tuple[jax.Array, tuple[LayerCache, ...] | LayerCache | None]:
        return run_layers(self.layers, self.config.num_hidden_layers, hidden, self_mask, encoder_hidden_states,
                          cross_mask, cache, deterministic)


class BertEncoder(nn.Module):
    """HF's wrapper around the layer list (the `encoder` of `bert/encoder/layer/<i>`; no speech encoder)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layer = BertLayerCollection(self.config, self.dtype)


class BertModule(nn.Module):
    """Embeddings and layers (HF's `bert` / `roberta` subtree, without the pooler)."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(self.config, self.dtype)
        self.encoder = BertEncoder(self.config, self.dtype)

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array | None,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        cfg = self.config
        if not cfg.is_decoder:
            raise ValueError("init_cache: a cache needs a causal decoder (the config has is_decoder=False)")
        if cfg.add_cross_attention != (encoder_hidden_states is not None):
            raise ValueError(f"init_cache: encoder_hidden_states must be given exactly when add_cross_attention "
                             f"(add_cross_attention={cfg.add_cross_attention})")
        if max_length > cfg.max_positions:
            raise ValueError(f"init_cache: {max_length} positions exceed the decoder's {cfg.max_positions}")
        if encoder_hidden_states is None:
            encoder_attention_mask = jnp.ones((batch_size, 0), dtype=bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
        layers = self.encoder.layer.init_cache_layers(batch_size, max_length, encoder_hidden_states)
        return DecoderCache(layers=layers, index=jnp.zeros((), jnp.int32),
                            encoder_mask=encoder_attention_mask.astype(bool))

    def __call__(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        position_padding_idx: int | None,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Returns the last hidden states [B, T, D] and the advanced cache (None without one).

        `position_ids` [B|1, T] index the position embedding (the caller's scheme); the self-attention mask is
        over cache slots `cache.index + arange(T)` whatever the scheme.
        """
        cfg = self.config
        batch, length = input_ids.shape
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        if key_length > cfg.max_positions:
            raise ValueError(f"{key_length} positions exceed the decoder's {cfg.max_positions}")
        if cfg.is_decoder:
            self_mask = decoder_self_mask(attention_mask, decoder_positions(start, length), batch, key_length)
        elif cache is not None:
            raise ValueError("a cache needs a causal decoder (the config has is_decoder=False)")
        else:  # transformers' BERT without is_decoder attends both ways
            keys = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask
            self_mask = make_attention_mask(None, keys)  # [B, 1, 1, T]

        cross = cfg.add_cross_attention
        if encoder_hidden_states is not None and not cross:
            raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=False")
        # transformers skips cross-attention when no encoder output is given.
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask) if cross else None
        if cache is not None:
            encoder_hidden_states = None  # cross-attention reads the keys/values projected at init_cache

        hidden = self.embeddings(input_ids, position_ids, position_padding_idx, deterministic)  # [B, T, D]
        hidden, new_layers = self.encoder.layer(hidden, self_mask, encoder_hidden_states, cross_mask, cache,
                                                deterministic)
        if cache is None:
            return hidden, None
        return hidden, cache.replace(layers=new_layers, index=cache.index + length)


class BertPredictionHeadTransform(nn.Module):
    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.dense = dense(self.config, self.config.hidden_size, self.dtype)
        self.LayerNorm = layer_norm(self.config, self.dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.LayerNorm(ACTIVATIONS[self.config.hidden_act](self.dense(hidden)))


def vocabulary_logits(module: nn.Module, hidden: jax.Array, tied_embedding: jax.Array | None) -> jax.Array:
    """The head's last step, shared with RoBERTa: hidden [B, T, D] -> logits [B, T, V].

    Tied: the word embedding and the head's `bias`. Untied: the head's own `decoder` (kernel and bias), as
    transformers 5 computes it (its `bias` is then unused).
    """
    if tied_embedding is None:
        return module.decoder(hidden)
    logits = jnp.einsum("BTD,VD->BTV", hidden, tied_embedding.astype(module.dtype))
    return logits + module.bias.astype(module.dtype)


class BertLMPredictionHead(nn.Module):
    """`transform`, `bias` [V] and, untied only, `decoder` (kernel [D, V], bias [V])."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.transform = BertPredictionHeadTransform(cfg, self.dtype)
        self.bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
        if not cfg.tie_word_embeddings:
            self.decoder = dense(cfg, cfg.vocab_size, self.dtype)

    def __call__(self, hidden: jax.Array, tied_embedding: jax.Array | None) -> jax.Array:
        return vocabulary_logits(self, self.transform(hidden), tied_embedding)


class BertOnlyMLMHead(nn.Module):
    """HF's `cls` wrapper, only there so that the param paths start with `cls/predictions/`."""

    config: BertLikeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.predictions = BertLMPredictionHead(self.config, self.dtype)


class BertForCausalLMModule(nn.Module):
    """BERT with a prediction head and optional cross-attention (HF `FlaxBertForCausalLMModule` params).

    Attributes:
        config: the decoder config.
        dtype: the computation dtype (params stay float32).
    """

    config: BertConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.bert = BertModule(self.config, self.dtype)
        self.cls = BertOnlyMLMHead(self.config, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Next-token logits.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: 1 for real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
            encoder_hidden_states: [B, S, D]; ignored with a cache (its keys/values were projected at init_cache).
            encoder_attention_mask: [B, S], 1 for real encoder frames; ignored with a cache.
            cache: from `init_cache` or a previous call; the tokens sit at positions `cache.index + arange(T)`.
                The caller keeps `cache.index + T <= max_length`: a traced index cannot be checked here.
            deterministic: False applies dropout (needs a "dropout" rng).

        Returns:
            (logits [B, T, V], the advanced cache, or None without a cache).
        """
        start = cache.index if cache is not None else 0
        positions = decoder_positions(start, input_ids.shape[1])[None]  # [1, T]
        hidden, cache = self.bert(input_ids, positions, None, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, cache, deterministic)
        tied = self.bert.embeddings.word_embeddings.embedding if self.config.tie_word_embeddings else None
        return self.cls.predictions(hidden, tied), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array | None = None,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Call as `module.apply(params, B, L, encoder_out, encoder_mask, method="init_cache")`.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output; required with cross-attention, else must be None
                (the cache's cross-attention arrays then have S = 0).
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        return self.bert.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)


def abstract_params(module: nn.Module, config: BertLikeConfig, dtype: Any) -> dict[str, Any]:
    """The abstract param tree of a BERT-family causal LM module (cross-attention when configured)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    encoder_out = jnp.zeros((1, 1, config.hidden_size), dtype) if config.add_cross_attention else None
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, encoder_hidden_states=encoder_out))
    return variables["params"]


def init_shapes(config: BertConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct); cross-attention when configured."""
    return abstract_params(BertForCausalLMModule(config, dtype), config, dtype)
