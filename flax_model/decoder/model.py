"""The decoder core's causal LM: embeddings, the layer stack, the final norm and the head, for every family.

`CausalLM(config)` computes what `config.decoder_core()` describes and names its parameters from the family's
layout (`type(config).LAYOUT`): HF's Flax param tree of the family (`model/decoder/...` for BART,
`transformer/...` for GPT-2, ...). Decoding uses an explicit `DecoderCache` (`flax_model/cache.py`): `init_cache`
projects the cross-attention keys/values once, and each call writes the new self-attention keys/values at
`cache.index` and returns the advanced cache.

Besides `__call__` (logits), `embed` gives the token embeddings that `inputs_embeds` stands for, `hidden_states`
the final hidden states before the head, and `logits` the head alone (run them with `apply(..., method=...)`).

Training (`deterministic=False`, a "dropout" rng): the core's dropouts and LayerDrop. Lookups of the padding rows
pass no gradient to them, as torch's `padding_idx`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import DecoderLayout, Kind
from flax_model.cache import DecoderCache
from flax_model.decoder.attention import dropout, rotary_angles, softcap
from flax_model.decoder.layer import LayerStack
from flax_model.decoder.masks import (
    decoder_cross_mask,
    decoder_positions,
    decoder_self_mask,
    key_padding,
    make_attention_mask,
)
from flax_model.decoder.tree import adopt, build_tree, lookup
from flax_model.layers import ACTIVATIONS, add_bias, token_matmul


def padding_row_without_gradient(vectors: jax.Array, ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """vectors [B, T, D] looked up for ids [B|1, T]: the lookups of `padding_idx` pass no gradient to the table,
    as torch's `nn.Embedding(padding_idx=...)` does."""
    if padding_idx is None:
        return vectors
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(vectors), vectors)


class CausalLM(nn.Module):
    """A decoder family's causal LM (with cross-attention when its config has it) on the decoder core.

    Attributes:
        config: the family's config (`decoder_core()` and the class's `LAYOUT`).
        dtype: the computation dtype (params stay float32).
    """

    config: Any
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.core: DecoderCore = self.config.decoder_core()
        self.layout: DecoderLayout = type(self.config).LAYOUT
        slots = self.layout.present(self.core, self.layout.top)
        adopt(self, build_tree(self.core, slots), self.core.init_scale, self.dtype,
              make_stack=lambda: LayerStack(self.core, self.layout, self.dtype))

    def slot(self, name: str) -> Any:
        return lookup(self, self.layout.slots[name].flax)

    # ------------------------------------------------------------------------------------------------------
    # Embeddings

    def position_ids(self, input_ids: jax.Array | None, length: int, start: jax.Array | int) -> jax.Array:
        """[B|1, T] rows of the learned position table for tokens at cache slots `start + arange(T)`.

        The core counts positions from the cache slot; a family that numbers them otherwise overrides this.
        """
        return decoder_positions(start, length)[None]

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D]: the token embeddings that `inputs_embeds` replaces."""
        core = self.core
        hidden = self.slot("embed_tokens")(input_ids)
        hidden = padding_row_without_gradient(hidden, input_ids, core.padding_idx)
        if core.embed_scale is not None and not core.scale_inputs_embeds:
            hidden = hidden * core.embed_scale
        return hidden

    def embeddings(self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None, start: jax.Array | int,
                   position_ids: jax.Array | None, deterministic: bool) -> jax.Array:
        core = self.core
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)  # [B, T, D]
        if core.embed_scale is not None and core.scale_inputs_embeds:
            hidden = hidden * jnp.asarray(core.embed_scale, hidden.dtype)
        if core.token_types:
            hidden = hidden + self.slot("embed_token_types").embedding[0].astype(self.dtype)  # every token is type 0
        if core.positions == "learned":
            ids = self.position_ids(input_ids, hidden.shape[1], start) if position_ids is None else position_ids
            table = self.slot("embed_positions")
            positions = padding_row_without_gradient(table(ids + core.position_offset), ids,
                                                     core.position_padding_idx)
            hidden = hidden + positions
        if core.embed_norm:
            hidden = self.slot("embed_norm")(hidden)
        return dropout(self, hidden, core.embed_dropout, deterministic)

    # ------------------------------------------------------------------------------------------------------
    # Forward

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """The final hidden states [B, T, D] (after the final norm, before the head) and the advanced cache.

        Arguments as `__call__`.
        """
        core = self.core
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        core.check_call(length, key_length, cache is not None, encoder_hidden_states is not None,
                        input_ids is not None, inputs_embeds is not None)

        slots = decoder_positions(start, length)  # [T]: the tokens' cache slots, which are their positions
        sliding_mask = None
        if not core.causal:  # transformers' BERT without is_decoder attends both ways
            self_mask = make_attention_mask(None, key_padding(attention_mask, batch, length))  # [B, 1, 1, T]
        elif core.any_sliding and all(core.is_sliding(i) for i in range(core.num_layers)):
            self_mask = decoder_self_mask(attention_mask, slots, batch, key_length, core.sliding_window)
        else:
            self_mask = decoder_self_mask(attention_mask, slots, batch, key_length)  # [B, 1, T, L]
            if core.any_sliding:
                sliding_mask = decoder_self_mask(attention_mask, slots, batch, key_length, core.sliding_window)
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask)  # [B, 1, 1, S]
        if cache is not None:
            encoder_hidden_states = None  # cross-attention reads the keys/values projected at init_cache
        rope = None
        if core.positions == "rotary":
            rope = rotary_angles(core, slots[None] if position_ids is None else position_ids)  # [B|1, T, H]

        hidden = self.embeddings(input_ids, inputs_embeds, start, position_ids, deterministic)  # [B, T, D]
        hidden, new_layers = self.slot("layers")(hidden, self_mask, sliding_mask, rope, encoder_hidden_states,
                                                 cross_mask, cache, deterministic)
        if core.final_norm:
            hidden = self.slot("final_norm")(hidden)
        if cache is None:
            return hidden, None
        return hidden, cache.replace(layers=new_layers, index=cache.index + length)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The head: hidden [B, T, D] -> logits [B, T, V]."""
        core = self.core
        if core.head_transform is not None:
            dense = self.slot("head_transform")
            hidden = self.slot("head_transform_norm")(ACTIVATIONS[core.head_transform](dense(hidden)))
        bias = self.slot("logits_bias") if core.logits_bias else None
        if core.tie_word_embeddings:
            embedding = self.slot("embed_tokens").embedding.astype(self.dtype)  # [V, D]
            logits = token_matmul(hidden, embedding, kernel_in_axis=1)
        else:
            slot = self.layout.slots["head"]
            head, names = self.slot("head"), dict(slot.flax_names)
            kernel = getattr(head, names.get("weight", "kernel")).astype(self.dtype)  # [D, V]
            logits = token_matmul(hidden.astype(self.dtype), kernel)
            if slot.kind is Kind.HEAD_WITH_BIAS:
                # An untied head's own bias (transformers 5); the logits bias is then unused.
                bias = getattr(head, names.get("bias", "bias"))
        if bias is not None:
            logits = add_bias(logits, bias)
        return softcap(logits, core.final_logit_softcap)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        cache: DecoderCache | None = None,
        deterministic: bool = True,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Next-token logits.

        Args:
            input_ids: [B, T] token ids; or `inputs_embeds` [B, T, D] in their place (what `embed` gives for ids).
            attention_mask: 1 for real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
            encoder_hidden_states: [B, S, D]; ignored with a cache (its keys/values were projected at init_cache).
                Without it, cross-attention is skipped (the decoder alone, as its causal-LM checkpoint computes).
            encoder_attention_mask: [B, S], 1 for real encoder frames; ignored with a cache.
            cache: from `init_cache` or a previous call; the tokens sit at positions `cache.index + arange(T)`.
                The caller keeps `cache.index + T <= max_length`: a traced index cannot be checked here.
            deterministic: False applies dropout and LayerDrop (needs a "dropout" rng).
            inputs_embeds: see `input_ids`.
            position_ids: [B|1, T], the tokens' positions in the position embedding (learned: the table's row less
                its offset; rotary: the angle) when not the family's own numbering (the cache slots for most). The
                masks always follow the cache slots.

        Returns:
            (logits [B, T, V], the advanced cache, or None without a cache).
        """
        hidden, cache = self.hidden_states(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                           cache, deterministic, inputs_embeds, position_ids)
        return self.logits(hidden), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array | None = None,
                   encoder_attention_mask: jax.Array | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Call as `module.apply(params, B, L, encoder_out, encoder_mask, method="init_cache")`.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output, or None: no cross-attention in the calls that use
                this cache (the cache's cross-attention arrays then have S = 0).
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        core = self.core
        core.check_cache(max_length, encoder_hidden_states is not None)
        if encoder_hidden_states is None:
            encoder_attention_mask = jnp.ones((batch_size, 0), dtype=bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], dtype=bool)
        layers = self.slot("layers").init_cache_layers(batch_size, max_length, encoder_hidden_states)
        return DecoderCache(layers=layers, index=jnp.zeros((), jnp.int32),
                            encoder_mask=encoder_attention_mask.astype(bool))


def init_shapes(config: Any, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct, nothing allocated); cross-attention when the
    config has it.

    Args:
        config: a decoder family's config.
        dtype: the computation dtype (params are float32 whatever it is).
    """
    core = config.decoder_core()
    module = CausalLM(config, dtype)  # a family's subclass (its own positions) has the same parameters
    ids = jnp.zeros((1, 1), jnp.int32)
    encoder_out = jnp.zeros((1, 1, core.hidden_size), dtype) if core.cross_attention else None
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, encoder_hidden_states=encoder_out))
    return variables["params"]
