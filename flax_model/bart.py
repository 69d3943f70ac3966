"""BART / mBART decoder as a causal LM with cross-attention, in pure flax.linen.

The param tree is HF's `FlaxBartForCausalLMModule`: `model/decoder/{embed_tokens, embed_positions,
layernorm_embedding, layers/<i>/..., layer_norm (mBART)}`, plus `lm_head/kernel` when the head is not tied
and `lm_head/bias` when the checkpoint had a non-zero `final_logits_bias`. BART layers are post-norm; mBART
layers are pre-norm and the decoder ends with `layer_norm`.

Decoding uses an explicit `DecoderCache`: `init_cache` projects the cross-attention keys/values once, and each
call writes the new self-attention keys/values at `cache.index` and returns the advanced cache.

Training (`deterministic=False`, a "dropout" rng): `dropout`, `attention_dropout`, `activation_dropout`, and
LayerDrop (`decoder_layerdrop`: one uniform draw per layer per call, `flax_model.layers.layer_drop`). Lookups
of the pad token pass no gradient to its embedding row, as torch's `padding_idx` in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.archs.bart import BartConfig
from flax_model.cache import DecoderCache, LayerCache
from flax_model.layers import (
    ACTIVATIONS,
    decoder_cross_mask,
    decoder_positions,
    decoder_self_mask,
    layer_drop,
    make_stack,
    map_stack,
    run_layers,
)

LAYER_NORM_EPS = 1e-5  # HF's BART uses torch.nn.LayerNorm's default

# ----------------------------------------------------------------------------------------------------------
# Modules


def _layer_norm(dtype: Any) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the one-pass form loses digits that 1e-5 parity needs.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False)


class BartAttention(nn.Module):
    """Multi-head attention; keys/values are projected by `project_kv` so that they can be cached."""

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.num_heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // cfg.decoder_attention_heads
        dense = lambda: nn.Dense(cfg.d_model, dtype=self.dtype,  # noqa: E731
                                 kernel_init=nn.initializers.normal(cfg.init_std))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()
        self.attention_dropout = nn.Dropout(rate=cfg.attention_dropout)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        # Heads first, the layout of the cache (see flax_model.cache.LayerCache).
        return x.reshape(*x.shape[:2], self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, N, T, H]

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys, values [B, N, S, H]."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def __call__(self, hidden: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """hidden [B, T, D], key/value [B, N, S, H], mask [B, 1, T, S] bool -> [B, T, D]."""
        query = self._split_heads(self.q_proj(hidden) * self.head_dim**-0.5)  # [B, N, T, H]
        scores = jnp.einsum("BNTH,BNSH->BNTS", query, key)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = self.attention_dropout(probs, deterministic=deterministic)
        out = jnp.einsum("BNTS,BNSH->BTNH", probs, value)
        return self.out_proj(out.reshape(hidden.shape))  # [B, T, D]


class BartDecoderLayer(nn.Module):
    """Self-attention, cross-attention and MLP blocks, each with a residual and a LayerNorm."""

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        dense = lambda n: nn.Dense(n, dtype=self.dtype, kernel_init=nn.initializers.normal(cfg.init_std))  # noqa: E731
        self.self_attn = BartAttention(cfg, self.dtype)
        self.self_attn_layer_norm = _layer_norm(self.dtype)
        self.encoder_attn = BartAttention(cfg, self.dtype)
        self.encoder_attn_layer_norm = _layer_norm(self.dtype)
        self.fc1 = dense(cfg.decoder_ffn_dim)
        self.fc2 = dense(cfg.d_model)
        self.final_layer_norm = _layer_norm(self.dtype)
        self.dropout = nn.Dropout(rate=cfg.dropout)
        self.activation_dropout = nn.Dropout(rate=cfg.activation_dropout)

    def _residual(self, norm: nn.Module, block: Callable[[jax.Array], jax.Array], x: jax.Array,
                  deterministic: bool) -> jax.Array:
        # mBART normalises each block's input; BART normalises after the residual sum.
        if self.config.is_mbart:
            return x + self.dropout(block(norm(x)), deterministic=deterministic)
        return norm(x + self.dropout(block(x), deterministic=deterministic))

    def init_layer_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array) -> LayerCache:
        cfg = self.config
        shape = (batch_size, cfg.decoder_attention_heads, max_length, cfg.d_model // cfg.decoder_attention_heads)
        cross_key, cross_value = self.encoder_attn.project_kv(encoder_hidden_states)  # [B, N, S, H]
        return LayerCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), cross_key, cross_value)

    def __call__(
        self,
        hidden: jax.Array,
        self_mask: jax.Array,
        encoder_hidden_states: jax.Array | None,
        cross_mask: jax.Array | None,
        layer_cache: LayerCache | None,
        index: jax.Array,
        deterministic: bool = True,
    ) -> tuple[jax.Array, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T, L]; cross_mask [B, 1, 1, S] -> ([B, T, D], new cache).

        In training (`deterministic=False`) LayerDrop may skip the layer: its input and cache pass through.
        """
        skip = layer_drop(self, self.config.decoder_layerdrop, deterministic)
        layer_input = hidden
        new_cache = None
        cross_kv = None
        if layer_cache is not None:
            cross_kv = (layer_cache.cross_keys, layer_cache.cross_values)  # [B, N, S, H]
        elif encoder_hidden_states is not None:
            cross_kv = self.encoder_attn.project_kv(encoder_hidden_states)

        def self_attention(x: jax.Array) -> jax.Array:
            nonlocal new_cache
            key, value = self.self_attn.project_kv(x)  # [B, N, T, H]
            if layer_cache is not None:
                at = (0, 0, index, 0)
                key = jax.lax.dynamic_update_slice(layer_cache.self_keys, key.astype(layer_cache.self_keys.dtype), at)
                value = jax.lax.dynamic_update_slice(layer_cache.self_values,
                                                     value.astype(layer_cache.self_values.dtype), at)
                new_cache = layer_cache.replace(self_keys=key, self_values=value)  # [B, N, L, H]
            return self.self_attn(x, key, value, self_mask, deterministic)

        def mlp(x: jax.Array) -> jax.Array:
            h = ACTIVATIONS[self.config.activation_function](self.fc1(x))
            return self.fc2(self.activation_dropout(h, deterministic=deterministic))

        hidden = self._residual(self.self_attn_layer_norm, self_attention, hidden, deterministic)
        if cross_kv is not None:
            cross = lambda x: self.encoder_attn(x, *cross_kv, cross_mask, deterministic)  # noqa: E731
            hidden = self._residual(self.encoder_attn_layer_norm, cross, hidden, deterministic)
        hidden = self._residual(self.final_layer_norm, mlp, hidden, deterministic)
        if skip is not False:
            hidden = jnp.where(skip, layer_input, hidden)
            if new_cache is not None:
                new_cache = jax.tree.map(lambda old, new: jnp.where(skip, old, new), layer_cache, new_cache)
        return hidden, new_cache


class BartDecoderLayers(nn.Module):
    """The layer stack; a module of its own so that layer 3 lives at `layers/3` (HF's Flax layout), or, scanned
    (`flax_model.layers.layer_scan`), the stacked params at `layers/...`."""

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layers = make_stack(self, lambda i, name: BartDecoderLayer(self.config, self.dtype, name=name),
                                 self.config.decoder_layers)

    def init_cache_layers(self, batch_size: int, max_length: int,
                          encoder_hidden_states: jax.Array) -> tuple[LayerCache, ...] | LayerCache:
        return map_stack(self.layers, self.config.decoder_layers,
                         lambda layer: layer.init_layer_cache(batch_size, max_length, encoder_hidden_states))

    def __call__(self, hidden: jax.Array, self_mask: jax.Array, encoder_hidden_states: jax.Array | None,
                 cross_mask: jax.Array | None, cache: DecoderCache | None,
                 deterministic: bool = True) -> tuple[jax.Array, tuple[LayerCache, ...] | LayerCache | None]:
        return run_layers(self.layers, self.config.decoder_layers, hidden, self_mask, encoder_hidden_states,
                          cross_mask, cache, deterministic)


class BartDecoder(nn.Module):
    """Token and position embeddings, `layernorm_embedding`, the layers, and (mBART) a final `layer_norm`."""

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, dtype=self.dtype)
        self.embed_positions = nn.Embed(cfg.max_position_embeddings + cfg.position_offset, cfg.d_model,
                                        embedding_init=init, dtype=self.dtype)
        self.layernorm_embedding = _layer_norm(self.dtype)
        self.layers = BartDecoderLayers(cfg, self.dtype)
        if cfg.is_mbart:
            self.layer_norm = _layer_norm(self.dtype)
        self.dropout = nn.Dropout(rate=cfg.dropout)

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
        layers = self.layers.init_cache_layers(batch_size, max_length, encoder_hidden_states)
        return DecoderCache(layers=layers, index=jnp.zeros((), jnp.int32),
                            encoder_mask=encoder_attention_mask.astype(bool))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Returns the final hidden states [B, T, D] and the advanced cache (None without one)."""
        batch, length = input_ids.shape
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        if key_length > self.config.max_position_embeddings:
            raise ValueError(f"{key_length} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = decoder_positions(start, length)  # [T]
        self_mask = decoder_self_mask(attention_mask, positions, batch, key_length)  # [B, 1, T, L]

        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask)  # [B, 1, 1, S]
        if cache is not None:
            encoder_hidden_states = None  # cross-attention reads the keys/values projected at init_cache

        hidden = self.embed_tokens(input_ids)
        if self.config.pad_token_id is not None:
            # torch's padding_idx (transformers' BART embedding): pad lookups pass no gradient to their row.
            pads = (input_ids == self.config.pad_token_id)[..., None]
            hidden = jnp.where(pads, jax.lax.stop_gradient(hidden), hidden)
        hidden = hidden * self.embed_scale
        hidden = hidden + self.embed_positions(positions + self.config.position_offset)[None]  # [B, T, D]
        hidden = self.dropout(self.layernorm_embedding(hidden), deterministic=deterministic)
        hidden, new_layers = self.layers(hidden, self_mask, encoder_hidden_states, cross_mask, cache, deterministic)
        if self.config.is_mbart:
            hidden = self.layer_norm(hidden)
        if cache is None:
            return hidden, None
        return hidden, cache.replace(layers=new_layers, index=cache.index + length)


class BartDecoderWrapper(nn.Module):
    """HF's wrapper, only there so that the param paths start with `model/decoder/`."""

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.decoder = BartDecoder(self.config, self.dtype)


class BartLMHead(nn.Module):
    """`lm_head/kernel` [D, V] when untied (tied heads reuse the token embedding), `lm_head/bias` [V] if any."""

    config: BartConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, tied_embedding: jax.Array | None) -> jax.Array:
        cfg = self.config
        if tied_embedding is None:
            kernel = self.param("kernel", nn.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size))
            logits = jnp.einsum("BTD,DV->BTV", hidden, kernel.astype(self.dtype))
        else:
            logits = jnp.einsum("BTD,VD->BTV", hidden, tied_embedding.astype(self.dtype))
        if cfg.lm_head_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (cfg.vocab_size,)).astype(self.dtype)
        return logits  # [B, T, V]


class BartForCausalLMModule(nn.Module):
    """BART / mBART decoder with cross-attention and an LM head (HF `FlaxBartForCausalLMModule` params).

    Attributes:
        config: the decoder config (`lm_head_bias` set by `convert.base.archs.bart.adapt_config`).
        dtype: the computation dtype (params stay float32).
    """

    config: BartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.model = BartDecoderWrapper(self.config, self.dtype)
        self.lm_head = BartLMHead(self.config, self.dtype)

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
        decoder = self.model.decoder
        hidden, cache = decoder(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, cache,
                                deterministic)
        tied = decoder.embed_tokens.embedding if self.config.tie_word_embeddings else None
        return self.lm_head(hidden, tied), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Call as `module.apply(params, B, L, encoder_out, encoder_mask, method="init_cache")`.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output.
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        return self.model.decoder.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)


def init_shapes(config: BartConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct, nothing allocated), cross-attention included.

    Args:
        config: the decoder config.
        dtype: the computation dtype (params are float32 whatever it is).
    """
    module = BartForCausalLMModule(config, dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    encoder_out = jnp.zeros((1, 1, config.d_model), dtype)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, encoder_hidden_states=encoder_out))
    return variables["params"]
