"""One decoder layer of the core, and the stack of them (unrolled or scanned, `flax_model.layers.make_stack`).

A layer runs the residual blocks of `core.block_order`: self-attention (writing its keys/values into the layer's
cache), cross-attention (over keys/values projected once at `init_cache`, or from the encoder output without a
cache) and the MLP. Its parameters sit at the family layout's names (`flax_model.decoder.tree`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import DecoderLayout
from flax_model.cache import DecoderCache, LayerCache, slice_start
from flax_model.decoder.attention import attend, dropout, layer_flags, rotate, split_heads
from flax_model.decoder.tree import adopt, build_tree, lookup
from flax_model.layer_calls import stack_index
from flax_model.layers import ACTIVATIONS, layer_drop, make_stack, map_stack, run_stack, run_unless_dropped


class DecoderLayer(nn.Module):
    """One layer: its blocks, each a residual branch with its norm(s) (pre- or post-norm, optional post-block norm).

    Attributes:
        core: what the layer computes.
        layout: where its parameters sit (`layout.layer`, relative to the layer).
        dtype: the computation dtype.
    """

    core: DecoderCore
    layout: DecoderLayout
    dtype: Any = jnp.float32

    def setup(self) -> None:
        slots = self.layout.present(self.core, self.layout.layer)
        adopt(self, build_tree(self.core, slots), self.core.init_scale, self.dtype)

    def slot(self, name: str) -> Any:
        return lookup(self, self.layout.slots[name].flax)

    def has(self, name: str) -> bool:
        return name in self.layout.slots and self.core.has(name)

    # ------------------------------------------------------------------------------------------------------
    # Projections

    def project_queries(self, attention: str, x: jax.Array, fused: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> queries [B, N, T, H] of `attention` ("self_attn" or "cross_attn"); `fused` is the output of
        a fused query/key/value projection of x, when the layout has one."""
        core = self.core
        query = fused[..., :core.num_heads * core.head_dim] if fused is not None else self.slot(f"{attention}.q")(x)
        if core.query_scale is not None:
            query = query * core.query_scale
        query = split_heads(query, core.num_heads)
        if self.has(f"{attention}.q_norm"):
            query = self.slot(f"{attention}.q_norm")(query)
        return query

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention: [B, T, D] -> queries [B, N, T, H], keys, values [B, K, T, H] (keys and values first, the
        order in which the decoders before the core computed them)."""
        if self.has("self_attn.qkv"):
            fused = self.slot("self_attn.qkv")(x)
            return (self.project_queries("self_attn", x, fused), *self.project_kv("self_attn", x, fused))
        key, value = self.project_kv("self_attn", x)
        return self.project_queries("self_attn", x), key, value

    def project_kv(self, attention: str, x: jax.Array, fused: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys, values [B, K, S, H] of `attention` (before any rotation); `fused` as in
        `project_queries`."""
        core = self.core
        heads = core.kv_heads if attention == "self_attn" else core.cross_kv_heads
        width = heads * core.head_dim
        if fused is not None:
            fused = fused[..., core.num_heads * core.head_dim:]
            key, value = fused[..., :width], fused[..., width:]
        elif self.has(f"{attention}.kv"):
            fused = self.slot(f"{attention}.kv")(x)
            key, value = fused[..., :width], fused[..., width:]
        else:
            key, value = self.slot(f"{attention}.k")(x), self.slot(f"{attention}.v")(x)
        key, value = split_heads(key, heads), split_heads(value, heads)
        if self.has(f"{attention}.k_norm"):
            key = self.slot(f"{attention}.k_norm")(key)
        return key, value

    def init_layer_cache(self, batch_size: int, max_length: int,
                         encoder_hidden_states: jax.Array | None) -> LayerCache:
        """Empty self-attention keys/values [B, K, L, H]; cross-attention keys/values projected once (S = 0
        without an encoder output)."""
        core = self.core
        empty = jnp.zeros((batch_size, core.kv_heads, max_length, core.head_dim), self.dtype)
        if encoder_hidden_states is None:
            no_cross = jnp.zeros((batch_size, core.cross_kv_heads, 0, core.head_dim), self.dtype)
            return LayerCache(empty, empty, no_cross, no_cross)
        return LayerCache(empty, empty, *self.project_kv("cross_attn", encoder_hidden_states))

    # ------------------------------------------------------------------------------------------------------
    # Blocks

    def residual_block(self, block: str, fn: Any, x: jax.Array, deterministic: bool) -> jax.Array:
        """x plus `fn`'s output, normalised before (pre-norm) or after the sum (post-norm)."""
        core = self.core
        norm = self.slot(f"{block}_norm")
        if core.pre_norm:
            out = fn(norm(x))
        else:
            out = fn(x)
        if core.post_block_norm:
            out = self.slot(f"{block}_post_norm")(out)
        out = dropout(self, out, core.residual_dropout, deterministic)
        return x + out if core.pre_norm else norm(x + out)

    def feed_forward(self, x: jax.Array, deterministic: bool) -> jax.Array:
        core = self.core
        act = ACTIVATIONS[core.activation]
        if core.gated_mlp:
            h = act(self.slot("mlp.gate")(x)) * self.slot("mlp.up")(x)
        else:
            h = act(self.slot("mlp.up")(x))
        return self.slot("mlp.down")(dropout(self, h, core.activation_dropout, deterministic))

    def __call__(
        self,
        hidden: jax.Array,
        self_mask: jax.Array,
        sliding_mask: jax.Array | None,
        rope_cos: jax.Array | None,
        rope_sin: jax.Array | None,
        encoder_hidden_states: jax.Array | None,
        cross_mask: jax.Array | None,
        layer_cache: LayerCache | None,
        index: jax.Array | int,
        deterministic: bool = True,
        layer_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, LayerCache | None]:
        """One layer.

        Args:
            hidden: [B, T, D].
            self_mask: [B, 1, T|1, L] bool; `sliding_mask` the same within the sliding window (None: no layer
                slides).
            rope_cos, rope_sin: [T, H] rotary angles of the tokens' positions, or None.
            encoder_hidden_states: [B, S, D] when cross-attention runs without a cache.
            cross_mask: [B, 1, 1, S], or None: no cross-attention in this call.
            layer_cache: this layer's cache, or None.
            index: the cache slot of the first token.
            layer_index: the layer's index (traced in a scanned stack).

        Returns:
            (hidden [B, T, D], the new layer cache or None). In training, LayerDrop may skip the layer: its input
            and cache pass through, and it computes nothing (`run_unless_dropped`).
        """
        skip = layer_drop(self, self.core.layerdrop, deterministic)
        return run_unless_dropped(skip, self, lambda layer, carry: layer.blocks(
            *carry, self_mask, sliding_mask, rope_cos, rope_sin, encoder_hidden_states, cross_mask, index,
            deterministic, layer_index), (hidden, layer_cache))

    def blocks(self, hidden: jax.Array, layer_cache: LayerCache | None, self_mask: jax.Array,
               sliding_mask: jax.Array | None, rope_cos: jax.Array | None, rope_sin: jax.Array | None,
               encoder_hidden_states: jax.Array | None, cross_mask: jax.Array | None, index: jax.Array | int,
               deterministic: bool, layer_index: jax.Array | int) -> tuple[jax.Array, LayerCache | None]:
        """The layer's blocks (`__call__` without LayerDrop); the new cache is `layer_cache` updated, or None."""
        core = self.core
        new_cache = None
        if sliding_mask is not None:  # some layers slide, others not
            if isinstance(layer_index, int):
                self_mask = sliding_mask if core.is_sliding(layer_index) else self_mask
            else:
                self_mask = jnp.where(jnp.asarray(layer_flags(core))[layer_index], sliding_mask, self_mask)

        def self_attention(x: jax.Array) -> jax.Array:
            nonlocal new_cache
            query, key, value = self.project_qkv(x)  # [B, N, T, H], [B, K, T, H]
            if rope_cos is not None:
                query, key = rotate(query, rope_cos, rope_sin), rotate(key, rope_cos, rope_sin)
            if layer_cache is not None:
                at = slice_start(0, 0, index, 0)
                key = jax.lax.dynamic_update_slice(layer_cache.self_keys, key.astype(layer_cache.self_keys.dtype), at)
                value = jax.lax.dynamic_update_slice(layer_cache.self_values,
                                                     value.astype(layer_cache.self_values.dtype), at)
                new_cache = layer_cache.replace(self_keys=key, self_values=value)  # [B, K, L, H]
            out = attend(self, core, query, key, value, self_mask, deterministic, layer_index, self.dtype)
            return self.slot("self_attn.o")(out)

        cross_kv = None
        if cross_mask is not None:
            if layer_cache is not None:
                cross_kv = (layer_cache.cross_keys, layer_cache.cross_values)  # [B, K, S, H]
            else:
                cross_kv = self.project_kv("cross_attn", encoder_hidden_states)

        def cross_attention(x: jax.Array) -> jax.Array:
            query = self.project_queries("cross_attn", x)
            out = attend(self, core, query, *cross_kv, cross_mask, deterministic, layer_index, self.dtype)
            return self.slot("cross_attn.o")(out)

        for block in core.block_order:
            if block == "self_attn":
                hidden = self.residual_block(block, self_attention, hidden, deterministic)
            elif block == "cross_attn" and cross_mask is not None:
                hidden = self.residual_block(block, cross_attention, hidden, deterministic)
            elif block == "mlp":
                hidden = self.residual_block(block, lambda x: self.feed_forward(x, deterministic), hidden, deterministic)
        return hidden, new_cache


class LayerStack(nn.Module):
    """The layers, a module of its own so that layer 3 lives at `<stack>/3` (HF's Flax layout), or, scanned, the
    stacked params at `<stack>/...`."""

    core: DecoderCore
    layout: DecoderLayout
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layers = make_stack(self, lambda i, name: DecoderLayer(self.core, self.layout, self.dtype, name=name),
                                 self.core.num_layers)

    def init_cache_layers(self, batch_size: int, max_length: int,
                          encoder_hidden_states: jax.Array | None) -> tuple[LayerCache, ...] | LayerCache:
        return map_stack(self.layers, self.core.num_layers,
                         lambda layer: layer.init_layer_cache(batch_size, max_length, encoder_hidden_states))

    def __call__(self, hidden: jax.Array, self_mask: jax.Array, sliding_mask: jax.Array | None,
                 rope: tuple[jax.Array, jax.Array] | None, encoder_hidden_states: jax.Array | None,
                 cross_mask: jax.Array | None, cache: DecoderCache | None, deterministic: bool = True
                 ) -> tuple[jax.Array, tuple[LayerCache, ...] | LayerCache | None]:
        """Runs the layers in order, each on its own slice of the cache; hidden [B, T, D]."""
        index = cache.index if cache is not None else 0
        cos, sin = rope if rope is not None else (None, None)

        def step(layer: nn.Module, i: Any, hidden: jax.Array, layer_cache: LayerCache | None,
                 encoder_hidden_states: jax.Array | None):
            return layer(hidden, self_mask, sliding_mask, cos, sin, encoder_hidden_states, cross_mask, layer_cache,
                         index, deterministic, layer_index=stack_index(i))

        hidden, new_layers = run_stack(self.layers, self.core.num_layers, step, hidden,
                                       cache.layers if cache is not None else None, shared=(encoder_hidden_states,))
        return hidden, (new_layers if cache is not None else None)
