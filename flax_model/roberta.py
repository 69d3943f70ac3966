"""RoBERTa as a causal LM with optional cross-attention, in pure flax.linen.

The param tree is HF's `FlaxRobertaForCausalLMModule`: `roberta/...` exactly as BERT's `bert/...` (the modules
are `flax_model.bert`'s), and the head `lm_head/{dense, layer_norm, bias}` plus, untied only,
`lm_head/decoder/{kernel,bias}`. What differs from BERT is the positions (`roberta_position_ids`) and the head's
fixed exact GELU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.archs.roberta import RobertaConfig
from flax_model.bert import BertModule, abstract_params, dense, layer_norm, vocabulary_logits
from flax_model.cache import DecoderCache
from flax_model.layers import ACTIVATIONS


def roberta_position_ids(input_ids: jax.Array, padding_idx: int, past_length: jax.Array | int = 0) -> jax.Array:
    """transformers' `create_position_ids_from_input_ids`: input_ids [B, T] -> position ids [B, T] int32.

    A pad token (`padding_idx`) sits at `padding_idx`; any other token at `padding_idx` + the count of non-pad
    tokens up to and including it in this call + `past_length` (the cached positions, pads among them counted).
    """
    real = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1, dtype=jnp.int32) + past_length) * real + padding_idx


class RobertaLMHead(nn.Module):
    """`dense`, exact GELU, `layer_norm`, then the vocabulary (`bias` [V]; untied: `decoder` kernel and bias)."""

    config: RobertaConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.dense = dense(cfg, cfg.hidden_size, self.dtype)
        self.layer_norm = layer_norm(cfg, self.dtype)
        self.bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
        if not cfg.tie_word_embeddings:
            self.decoder = dense(cfg, cfg.vocab_size, self.dtype)

    def __call__(self, hidden: jax.Array, tied_embedding: jax.Array | None) -> jax.Array:
        hidden = self.layer_norm(ACTIVATIONS["gelu"](self.dense(hidden)))  # RoBERTa's head ignores hidden_act
        return vocabulary_logits(self, hidden, tied_embedding)


class RobertaForCausalLMModule(nn.Module):
    """RoBERTa with an LM head and optional cross-attention (HF `FlaxRobertaForCausalLMModule` params).

    Attributes:
        config: the decoder config.
        dtype: the computation dtype (params stay float32).
    """

    config: RobertaConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.roberta = BertModule(self.config, self.dtype)
        self.lm_head = RobertaLMHead(self.config, self.dtype)

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
            input_ids: [B, T] token ids; pad tokens (`pad_token_id`) take the padding position, as in transformers.
            attention_mask: 1 for real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
            encoder_hidden_states: [B, S, D]; ignored with a cache (its keys/values were projected at init_cache).
            encoder_attention_mask: [B, S], 1 for real encoder frames; ignored with a cache.
            cache: from `init_cache` or a previous call; the tokens fill cache slots `cache.index + arange(T)`.
            deterministic: False applies dropout (needs a "dropout" rng).

        Returns:
            (logits [B, T, V], the advanced cache, or None without a cache).
        """
        pad = self.config.pad_token_id
        positions = roberta_position_ids(input_ids, pad, cache.index if cache is not None else 0)  # [B, T]
        hidden, cache = self.roberta(input_ids, positions, pad, attention_mask, encoder_hidden_states,
                                     encoder_attention_mask, cache, deterministic)
        tied = self.roberta.embeddings.word_embeddings.embedding if self.config.tie_word_embeddings else None
        return self.lm_head(hidden, tied), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array | None = None,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Call as `module.apply(params, B, L, encoder_out, encoder_mask, method="init_cache")`; see
        `flax_model.bert.BertForCausalLMModule.init_cache`.
        """
        return self.roberta.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)


def init_shapes(config: RobertaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct); cross-attention when configured."""
    return abstract_params(RobertaForCausalLMModule(config, dtype), config, dtype)
