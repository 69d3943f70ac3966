"""The decoder core's causal LM in plain PyTorch: the reference `flax_model.decoder` is checked against.

`CausalLM(config)` computes what `config.decoder_core()` describes, with `state_dict()` keys (and their order)
those of the family's transformers class (`BartForCausalLM`, `GPT2LMHeadModel`, ...), from the family's layout
(`type(config).LAYOUT`). A tied head shares the token embedding (and its bias the logits bias), as transformers'.
Cached decoding keeps an explicit `DecoderCache` (`torch_reference/cache.py`) whose cross-attention keys/values are
projected once, at `init_cache`. `.train()` turns on the core's dropouts and LayerDrop (`torch.rand` per layer,
as transformers).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import DecoderLayout, Kind
from torch_reference.cache import DecoderCache, LayerCache
from torch_reference.decoder.attention import rotary_angles, softcap
from torch_reference.decoder.layer import DecoderLayer
from torch_reference.decoder.masks import decoder_cross_mask, decoder_self_mask, key_padding, make_attention_mask
from torch_reference.decoder.tree import Node, adopt, lookup, tie
from torch_reference.layers import ACTIVATIONS, layer_drop


class BaseModel(Node):
    """The container transformers calls the base model (`layout.base_model`), callable as the old references'
    base models were: `(input_ids, position_ids=None, attention_mask=None, encoder_hidden_states=None,
    encoder_attention_mask=None, cache=None) -> (hidden states [B, T, D], cache)`."""

    def __init__(self, owner: weakref.ref):
        super().__init__()
        self._owner = owner  # a weak reference: the model holds this node, not the other way round

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, cache: DecoderCache | None = None
                ) -> tuple[torch.Tensor, DecoderCache | None]:
        return self._owner().hidden_states(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                           cache, position_ids=position_ids)


class Head(Node):
    """A container holding the whole LM head (`layout.head_module`), callable: hidden states -> logits."""

    def __init__(self, owner: weakref.ref):
        super().__init__()
        self._owner = owner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._owner().logits(hidden)


class CausalLM(nn.Module):
    """A decoder family's causal LM (with cross-attention when its config has it) on the decoder core."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.core: DecoderCore = config.decoder_core()
        self.layout: DecoderLayout = type(config).LAYOUT
        core, layout = self.core, self.layout
        # transformers' module always has its head; a tied one shares the token embedding's storage.
        slots = [s for s in layout.top if core.has(s.slot) or s.slot == "head"]
        owner = weakref.ref(self)
        containers = {path: functools.partial(cls, owner) for path, cls in ((layout.base_model, BaseModel),
                                                                              (layout.head_module, Head)) if path}
        adopt(self, core, slots, lambda: nn.ModuleList(DecoderLayer(core, layout, i) for i in range(core.num_layers)),
              containers)
        tie(self, layout.tied_keys(core))

    def slot(self, name: str) -> Any:
        return lookup(self, self.layout.slots[name].torch)

    # ------------------------------------------------------------------------------------------------------
    # Embeddings

    def position_ids(self, input_ids: torch.Tensor | None, length: int, start: int) -> torch.Tensor:
        """[B|1, T] rows of the learned position table for tokens at cache slots `start + arange(T)`."""
        return torch.arange(start, start + length)[None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, D]: the token embeddings that `inputs_embeds` replaces."""
        core = self.core
        hidden = self.slot("embed_tokens")(input_ids)
        if core.embed_scale is not None and not core.scale_inputs_embeds:
            hidden = hidden * core.embed_scale
        return hidden

    def embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, start: int,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        core = self.core
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        if core.embed_scale is not None and core.scale_inputs_embeds:
            hidden = hidden * torch.tensor(core.embed_scale, dtype=hidden.dtype)
        if core.token_types:
            hidden = hidden + self.slot("embed_token_types").weight[0]  # every token is type 0
        if core.positions == "learned":
            ids = self.position_ids(input_ids, hidden.shape[1], start) if position_ids is None else position_ids
            hidden = hidden + self.slot("embed_positions")(ids + core.position_offset)
        if core.embed_norm:
            hidden = self.slot("embed_norm")(hidden)
        return F.dropout(hidden, p=core.embed_dropout, training=self.training)

    # ------------------------------------------------------------------------------------------------------
    # Forward

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """The final hidden states [B, T, D] (after the final norm, before the head) and the advanced cache.

        Arguments as `forward`; `position_ids` [B|1, T] override the tokens' positions in the position embedding
        (learned: the table's row less its offset; rotary: the angle), which by default are the family's numbering
        (the cache slots `cache.index + arange(T)` for most). The masks always follow the cache slots.
        """
        core = self.core
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        start = cache.index if cache is not None else 0
        key_length = cache.max_length if cache is not None else length
        core.check_call(length, key_length, cache is not None, encoder_hidden_states is not None,
                        input_ids is not None, inputs_embeds is not None)
        if start + length > key_length:
            raise ValueError(f"{length} new tokens at position {start} overflow a cache of {key_length} slots")

        slots = torch.arange(start, start + length)  # [T]: the tokens' cache slots, which are their positions
        if not core.causal:  # transformers' BERT without is_decoder attends both ways
            full = make_attention_mask(None, key_padding(attention_mask, batch, length))  # [B, 1, 1, T]
            sliding = None
        else:
            full = decoder_self_mask(attention_mask, slots, batch, key_length)  # [B, 1, T, L]
            sliding = (decoder_self_mask(attention_mask, slots, batch, key_length, core.sliding_window)
                       if core.any_sliding else None)
        cross_mask = decoder_cross_mask(cache, encoder_hidden_states, encoder_attention_mask)  # [B, 1, 1, S]
        rope = None
        if core.positions == "rotary":
            rope = rotary_angles(core, slots[None] if position_ids is None else position_ids)  # [B|1, T, H]

        hidden = self.embeddings(input_ids, inputs_embeds, start, position_ids)  # [B, T, D]
        new_layers = []
        for i, layer in enumerate(self.slot("layers")):
            layer_cache = cache.layers[i] if cache is not None else None
            if layer_drop(self.training, core.layerdrop):  # the layer's input and cache pass through
                new_layers.append(layer_cache)
                continue
            if cross_mask is None:
                cross_kv = None
            elif layer_cache is not None:
                cross_kv = (layer_cache.cross_key, layer_cache.cross_value)
            else:
                cross_kv = layer.project_kv("cross_attn", encoder_hidden_states)
            self_mask = sliding if core.is_sliding(i) else full
            hidden, new_layer_cache = layer(hidden, self_mask, rope, cross_kv, cross_mask, layer_cache, start)
            new_layers.append(new_layer_cache)
        if core.final_norm:
            hidden = self.slot("final_norm")(hidden)
        if cache is None:
            return hidden, None
        return hidden, DecoderCache(tuple(new_layers), start + length, cache.encoder_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: hidden [B, T, D] -> logits [B, T, V] (a tied head's weight is the token embedding)."""
        core = self.core
        if core.head_transform is not None:
            dense = self.slot("head_transform")
            hidden = self.slot("head_transform_norm")(ACTIVATIONS[core.head_transform](dense(hidden)))
        logits = self.slot("head")(hidden)
        if core.logits_bias and self.layout.slots["head"].kind is not Kind.HEAD_WITH_BIAS:
            logits = logits + self.slot("logits_bias")
        return softcap(logits, core.final_logit_softcap)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """Next-token logits.

        Args:
            input_ids: [B, T] token ids; or `inputs_embeds` [B, T, D] in their place (what `embed` gives for ids).
            attention_mask: 1 for real decoder tokens: [B, T] without a cache, [B, L] (every cache slot) with one.
            encoder_hidden_states: [B, S, D]; ignored with a cache (its keys/values were projected at init_cache).
            encoder_attention_mask: [B, S], 1 for real encoder frames; ignored with a cache.
            cache: from `init_cache` or a previous call; the tokens sit at positions `cache.index + arange(T)`.
            position_ids: [B|1, T], the tokens' positions in the position embedding, if not the family's own.

        Returns:
            (logits [B, T, V], the advanced cache or None).
        """
        hidden, cache = self.hidden_states(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                           cache, inputs_embeds, position_ids)
        return self.logits(hidden), cache

    @torch.no_grad()
    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: torch.Tensor | None = None,
                   encoder_attention_mask: torch.Tensor | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected.

        Args:
            batch_size: B.
            max_length: L, the most positions the cache will hold.
            encoder_hidden_states: [B, S, D] encoder output, or None: no cross-attention with this cache.
            encoder_attention_mask: [B, S], 1 for real frames; None means all real.
        """
        core = self.core
        core.check_cache(max_length, encoder_hidden_states is not None)
        dtype = self.slot("embed_tokens").weight.dtype
        if encoder_hidden_states is None:
            encoder_attention_mask = torch.ones(batch_size, 0, dtype=torch.bool)
        elif encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool)
        layers = []
        for layer in self.slot("layers"):
            empty = torch.zeros(batch_size, max_length, core.kv_heads, core.head_dim, dtype=dtype)
            if encoder_hidden_states is None:
                no_cross = torch.zeros(batch_size, 0, core.cross_kv_heads, core.head_dim, dtype=dtype)
                cross_key, cross_value = no_cross, no_cross.clone()
            else:
                cross_key, cross_value = layer.project_kv("cross_attn", encoder_hidden_states)  # [B, S, K, H]
            layers.append(LayerCache(empty, empty.clone(), cross_key, cross_value))
        return DecoderCache(tuple(layers), 0, encoder_attention_mask.bool())
