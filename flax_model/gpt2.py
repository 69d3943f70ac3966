"""GPT-2 as a causal LM with optional cross-attention, in pure flax.linen.

The param tree is HF's `FlaxGPT2LMHeadModule`: `transformer/{wte, wpe, h/<i>/..., ln_f}`, with each layer's
`crossattention` and `ln_cross_attn` when `config.add_cross_attention`, plus `lm_head/kernel` [D, V] when
the head is not tied. GPT-2's Conv1D kernels are stored (out, in), as HF's Flax port stored them, so that
existing `flax_model.msgpack` files load unchanged.

Decoding uses an explicit `DecoderCache`: `init_cache` projects the cross-attention keys/values once (HF's Flax
GPT-2 recomputed them from the encoder output at every step), and each call writes the new self-attention
keys/values at `cache.index` and returns the advanced cache.

Training (`deterministic=False`, a "dropout" rng): `embd_pdrop`, `attn_pdrop` and `resid_pdrop` as transformers
applies them. GPT-2 has no LayerDrop.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.archs.gpt2 import GPT2Config
from flax_model.cache import DecoderCache, LayerCache
from flax_model.layers import (
    ACTIVATIONS,
    decoder_cross_mask,
    decoder_positions,
    decoder_self_mask,
    make_stack,
    map_stack,
    run_layers,
)

# ----------------------------------------------------------------------------------------------------------
# Modules


def _layer_norm(config: GPT2Config, dtype: Any) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the one-pass form loses digits that 1e-5 parity needs.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, use_fast_variance=False)


class Conv1D(nn.Module):
    """GPT-2's linear layer with HF Flax's kernel layout: `kernel` [out, in], `bias` [out]."""

    features: int
    init_scale: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(self.init_scale), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("...I,OI->...O", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class GPT2Attention(nn.Module):
    """Self-attention (`c_attn` projects queries, keys, values) or cross-attention (`q_attn` the queries,
    `c_attn` the encoder output's keys and values); the projections are separate methods so that keys and
    values can be cached."""

    config: GPT2Config
    layer_idx: int
    is_cross_attention: bool = False
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        d = cfg.n_embd
        conv = lambda n: Conv1D(n, cfg.initializer_range, self.dtype)  # noqa: E731
        if self.is_cross_attention:
            self.c_attn = conv(2 * d)
            self.q_attn = conv(d)
        else:
            self.c_attn = conv(3 * d)
        self.c_proj = conv(d)
        self.attn_dropout = nn.Dropout(rate=cfg.attn_pdrop)
        self.resid_dropout = nn.Dropout(rate=cfg.resid_pdrop)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        # Heads first, the layout of the cache (see flax_model.cache.LayerCache).
        cfg = self.config
        return x.reshape(*x.shape[:2], cfg.n_head, cfg.n_embd // cfg.n_head).transpose(0, 2, 1, 3)  # [B, N, T, H]

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention: [B, T, D] -> queries, keys, values [B, N, T, H]."""
        query, key, value = jnp.split(self.c_attn(x), 3, axis=-1)
        return self._split_heads(query), self._split_heads(key), self._split_heads(value)

    def project_query(self, x: jax.Array) -> jax.Array:
        """Cross-attention: [B, T, D] -> queries [B, N, T, H]."""
        return self._split_heads(self.q_attn(x))

    def project_kv(self, encoder_hidden_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention: [B, S, D] -> keys, values [B, N, S, H]."""
        key, value = jnp.split(self.c_attn(encoder_hidden_states), 2, axis=-1)
        return self._split_heads(key), self._split_heads(value)

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                 deterministic: bool = True, layer_index: jax.Array | int | None = None) -> jax.Array:
        """query [B, N, T, H], key/value [B, N, S, H], mask [B, 1, T|1, S] bool -> [B, T, D].

        `layer_index` (traced in a scanned stack) overrides `layer_idx` for `scale_attn_by_inverse_layer_idx`.
        """
        cfg = self.config
        layer_index = self.layer_idx if layer_index is None else layer_index
        if cfg.reorder_and_upcast_attn:
            # HF computes these scores in float32 whatever the model's dtype.
            query, key = query.astype(jnp.float32), key.astype(jnp.float32)
        scores = jnp.einsum("BNTH,BNSH->BNTS", query, key)
        if cfg.scale_attn_weights:
            scores = scores / jnp.sqrt(jnp.asarray(query.shape[-1], scores.dtype))
        if cfg.scale_attn_by_inverse_layer_idx:
            # Python int or traced int32: both divide by the same float32 value.
            scores = scores / jnp.asarray(layer_index + 1, scores.dtype)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        out = jnp.einsum("BNTS,BNSH->BTNH", probs, value)
        out = self.c_proj(out.reshape(*out.shape[:2], cfg.n_embd))  # [B, T, D]
        return self.resid_dropout(out, deterministic=deterministic)


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.c_fc = Conv1D(cfg.inner_size, cfg.initializer_range, self.dtype)
        self.c_proj = Conv1D(cfg.n_embd, cfg.initializer_range, self.dtype)
        self.dropout = nn.Dropout(rate=cfg.resid_pdrop)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = ACTIVATIONS[self.config.activation_function](self.c_fc(x))  # [B, T, inner]
        return self.dropout(self.c_proj(h), deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-norm layer: self-attention, cross-attention (when configured and given), MLP."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.ln_1 = _layer_norm(cfg, self.dtype)
        self.attn = GPT2Attention(cfg, self.layer_idx, dtype=self.dtype)
        if cfg.add_cross_attention:
            self.crossattention = GPT2Attention(cfg, self.layer_idx, is_cross_attention=True, dtype=self.dtype)
            self.ln_cross_attn = _layer_norm(cfg, self.dtype)
        self.ln_2 = _layer_norm(cfg, self.dtype)
        self.mlp = GPT2MLP(cfg, self.dtype)

    def init_layer_cache(self, batch_size: int, max_length: int,
                         encoder_hidden_states: jax.Array | None) -> LayerCache:
        cfg = self.config
        heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        empty = jnp.zeros((batch_size, heads, max_length, head_dim), self.dtype)
        if encoder_hidden_states is None:
            no_cross = jnp.zeros((batch_size, heads, 0, head_dim), self.dtype)
            return LayerCache(empty, empty, no_cross, no_cross)
        cross_key, cross_value = self.crossattention.project_kv(encoder_hidden_states)  # [B, N, S, H]
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
        layer_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """hidden [B, T, D]; self_mask [B, 1, T, L]; cross_mask [B, 1, 1, S] | None -> ([B, T, D], new cache).

        Cross-attention runs when `cross_mask` is given, reading the cache's keys/values when there is a
        cache and projecting `encoder_hidden_states` otherwise. `layer_index` overrides `layer_idx` (a scanned
        stack passes it traced).
        """
        new_cache = None
        query, key, value = self.attn.project_qkv(self.ln_1(hidden))  # [B, N, T, H]
        if layer_cache is not None:
            at = (0, 0, index, 0)
            key = jax.lax.dynamic_update_slice(layer_cache.self_keys, key.astype(layer_cache.self_keys.dtype), at)
            value = jax.lax.dynamic_update_slice(layer_cache.self_values, value.astype(layer_cache.self_values.dtype),
                                                 at)
            new_cache = layer_cache.replace(self_keys=key, self_values=value)  # [B, N, L, H]
        hidden = hidden + self.attn(query, key, value, self_mask, deterministic, layer_index)
        if cross_mask is not None:
            if layer_cache is not None:
                cross_kv = (layer_cache.cross_keys, layer_cache.cross_values)  # [B, N, S, H]
            else:
                cross_kv = self.crossattention.project_kv(encoder_hidden_states)
            query = self.crossattention.project_query(self.ln_cross_attn(hidden))
            hidden = hidden + self.crossattention(query, *cross_kv, cross_mask, deterministic, layer_index)
        hidden = hidden + self.mlp(self.ln_2(hidden), deterministic)
        return hidden, new_cache


class GPT2BlockCollection(nn.Module):
    """The layer list; a module of its own so that layer 3 lives at `h/3` (HF's Flax layout)."""

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.blocks = make_stack(self, lambda i, name: GPT2Block(self.config, i, self.dtype, name=name),
                                 self.config.n_layer)

    def init_cache_layers(self, batch_size: int, max_length: int,
                          encoder_hidden_states: jax.Array | None) -> tuple[LayerCache, ...] | LayerCache:
        return map_stack(self.blocks, self.config.n_layer,
                         lambda b: b.init_layer_cache(batch_size, max_length, encoder_hidden_states))

    def __call__(self, hidden, self_mask, encoder_hidden_states, cross_mask, cache: DecoderCache | None,
                 deterministic: bool = True) -> tuple[jax.Array, tuple[LayerCache, ...] | LayerCache | None]:
        # The layer index scales the attention scores (`scale_attn_by_inverse_layer_idx`): a scanned block
        # gets it traced.
        return run_layers(self.blocks, self.config.n_layer, hidden, self_mask, encoder_hidden_states, cross_mask,
                          cache, deterministic, pass_layer_index=True)


class GPT2Model(nn.Module):
    """Embeddings, layers and the final layer norm (HF's `transformer` subtree)."""

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, dtype=self.dtype)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, dtype=self.dtype)
        self.drop = nn.Dropout(rate=cfg.embd_pdrop)
        self.h = GPT2BlockCollection(cfg, self.dtype)
        self.ln_f = _layer_norm(cfg, self.dtype)

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array | None,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        cfg = self.config
        if cfg.add_cross_attention != (encoder_hidden_states is not None):
            raise ValueError(f"init_cache: encoder_hidden_states must be given exactly when add_cross_attention "
                             f"(add_cross_attention={cfg.add_cross_attention})")
        if encoder_hidden_states is None:
            encoder_attention_mask = jnp.ones((batch_size, 0), dtype=bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
        layers = self.h.init_cache_layers(batch_size, max_length, encoder_hidden_states)
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
        positions = decoder_positions(start, length)  # [T]
        self_mask = decoder_self_mask(attention_mask, positions, batch, key_length)  # [B, 1, T, L]

        cross = self.config.add_cross_attention
        if encoder_hidden_states is not None and not cross:
            raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=False")
        # HF skips cross-attention when no encoder output is given.
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask) if cross else None
        if cache is not None:
            encoder_hidden_states = None  # cross-attention reads the keys/values projected at init_cache

        hidden = self.wte(input_ids) + self.wpe(positions)[None]  # [B, T, D]
        hidden = self.drop(hidden, deterministic=deterministic)
        hidden, new_layers = self.h(hidden, self_mask, encoder_hidden_states, cross_mask, cache, deterministic)
        hidden = self.ln_f(hidden)
        if cache is None:
            return hidden, None
        return hidden, cache.replace(layers=new_layers, index=cache.index + length)


class GPT2LMHeadModule(nn.Module):
    """GPT-2 with an LM head and optional cross-attention (HF `FlaxGPT2LMHeadModule` params).

    Attributes:
        config: the decoder config.
        dtype: the computation dtype (params stay float32).
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.transformer = GPT2Model(cfg, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                                    kernel_init=nn.initializers.normal(cfg.initializer_range))  # kernel [D, V]

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
            deterministic: False applies dropout (needs a "dropout" rng).

        Returns:
            (logits [B, T, V], the advanced cache, or None without a cache).
        """
        hidden, cache = self.transformer(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                         cache, deterministic)
        if self.config.tie_word_embeddings:
            embedding = self.transformer.wte.embedding.astype(self.dtype)  # [V, D]
            return jnp.einsum("BTD,VD->BTV", hidden, embedding), cache
        return self.lm_head(hidden), cache

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
        return self.transformer.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)


def init_shapes(config: GPT2Config, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct); cross-attention when configured."""
    module = GPT2LMHeadModule(config, dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    encoder_out = jnp.zeros((1, 1, config.n_embd), dtype) if config.add_cross_attention else None
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, encoder_hidden_states=encoder_out))
    return variables["params"]
