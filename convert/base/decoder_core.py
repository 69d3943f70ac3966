"""What a text decoder computes, whatever family it comes from: one frozen description (`DecoderCore`).

Every decoder family's config produces a `DecoderCore` (`config.decoder_core()`); the one decoder of each
framework (`flax_model.decoder`, `torch_reference.decoder`) computes from it alone, and names its parameters from
the family's layout table (`convert.base.decoder_layout`). A decoder runs, for tokens at positions `p`:

    h = embed_tokens(ids) * embed_scale (+ token type 0) (+ embed_positions(p + position_offset))
    h = embed_norm(h), dropout
    each layer: the blocks of `block_order`, each a residual branch around
        self-attention | cross-attention | MLP, normalised before (pre_norm) or after the residual sum (post-norm);
        `post_block_norm` adds a norm on each block's output before the sum (Gemma 2)
    h = final_norm(h)                                   (the hidden states before the head)
    logits = head(head_transform(h)) (+ logits_bias), soft-capped by final_logit_softcap

Attention has `num_heads` query heads and `num_kv_heads` key/value heads (multi-head, grouped-query or
multi-query: query head n reads key/value head n // (num_heads // num_kv_heads), as transformers' `repeat_kv`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from convert.base.rope import RopeSettings, inverse_frequencies

Positions = Literal["learned", "rotary", "none"]
Norm = Literal["layer", "rms"]
Block = Literal["self_attn", "cross_attn", "mlp"]


@dataclasses.dataclass(frozen=True)
class DecoderCore:
    """A decoder's computation, family-independent.

    Sizes:
        vocab_size, hidden_size (D), num_layers, num_heads (N), head_dim (H), intermediate_size (the MLP's width);
        num_kv_heads (K, dividing N; None: N). Cross-attention has `cross_num_kv_heads` (None: N) and reads
        encoder states of width `hidden_size`.

    Embeddings:
        padding_idx: the token-embedding row whose lookups pass no gradient (torch's `padding_idx`), or None.
        embed_scale: the token embeddings are multiplied by it (BART's `scale_embedding`, Gemma's sqrt(D)).
        scale_inputs_embeds: the scale also applies to `inputs_embeds` given instead of ids (transformers 4's
            Gemma); otherwise `inputs_embeds` stand for the scaled token embeddings (BART; Gemma 2 in
            transformers 5, whose embedding module scales its lookups and leaves `inputs_embeds` as given).
        token_types: the rows of a token-type embedding, of which type 0 is added to every token (BERT's
            type_vocab_size); 0 for none.
        positions: "learned" (a table indexed by position + `position_offset`), "rotary" (`rope`), "none".
        max_positions: the most positions the decoder serves (learned tables: the rows past the offset); longer
            inputs are refused.
        position_offset: learned: position p uses row p + offset (BART's 2).
        position_rows: learned: the table's rows (None: max_positions + position_offset).
        position_padding_idx: learned: the row whose lookups pass no gradient (RoBERTa's padding position).
        rope: rotary: the inverse frequencies' recipe (`convert.base.rope`; computed once, in numpy, for both
            frameworks: `rope_frequencies()`).
        embed_norm: a norm after the embeddings (BART's `layernorm_embedding`, BERT's `embeddings.LayerNorm`).

    Norms:
        norm: "layer" (LayerNorm, with bias) or "rms" (RMSNorm, no bias); norm_eps.
        norm_offset: RMSNorm multiplies by (offset + weight): 1.0 for Gemma's zero-centred weights.

    Blocks:
        block_order: the residual blocks of a layer, in order; "cross_attn" runs only with an encoder output.
        pre_norm: normalise each block's input (GPT-2, mBART, Llama) rather than the residual sum (BART, BERT).
        post_block_norm: also normalise each block's output before the residual sum (Gemma 2's post norms).

    Attention:
        causal: self-attention sees no later position (False: both ways, BERT without `is_decoder`).
        qkv_bias, out_bias: biases of the query/key/value and output projections.
        qk_norm: a norm over each head's queries and keys (before the rotation), as Qwen 3 and Gemma 3.
        query_scale / score_scale / score_divisor: how scores are scaled (at most one is set; none: unscaled):
            the projected queries times `query_scale` (BART), the scores times `score_scale` (BERT, Llama), or
            the scores divided by `score_divisor` (GPT-2's rounding).
        scale_by_inverse_layer: also divide the scores by layer index + 1 (GPT-2's
            `scale_attn_by_inverse_layer_idx`).
        upcast_attention: compute the scores in float32 whatever the dtype (GPT-2's `reorder_and_upcast_attn`).
        attn_logit_softcap: scores become cap * tanh(scores / cap) before masking (Gemma 2).
        sliding_window: a query sees only the last `sliding_window` positions (itself included), in the layers
            `sliding_layers` marks (None: every layer); the others attend to every earlier position.
        cross_attention: the layers have cross-attention blocks (used when an encoder output is given).

    MLP:
        activation (a name of `convert.base.configs.ACTIVATIONS`), gated_mlp (down(act(gate(x)) * up(x)),
        SwiGLU / GeGLU; else down(act(up(x)))), mlp_bias.

    Head:
        final_norm: a norm after the last layer (mBART, GPT-2, Llama).
        head_transform: the activation of the prediction-head transform dense -> act -> norm (BERT, RoBERTa), or
            None for no transform.
        tie_word_embeddings: the vocabulary projection is the token embedding; otherwise the head's own kernel.
        logits_bias: a bias vector added to the logits (BART's `final_logits_bias`, BERT's `cls.predictions.bias`);
            an untied head whose layout gives it a bias of its own (`Kind.HEAD_WITH_BIAS`) uses that one instead
            (transformers 5's BERT and RoBERTa).
        final_logit_softcap: logits become cap * tanh(logits / cap) (Gemma 2).

    Training:
        embed_dropout (after the embeddings), residual_dropout (each block's output), attention_dropout (the
        attention probabilities), activation_dropout (inside the MLP), layerdrop (skip a whole layer).
        init_scale: the standard deviation of the initialiser (what the composer creates).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    num_kv_heads: int | None = None
    cross_num_kv_heads: int | None = None
    # Embeddings
    padding_idx: int | None = None
    embed_scale: float | None = None
    scale_inputs_embeds: bool = False
    token_types: int = 0
    positions: Positions = "learned"
    max_positions: int = 0
    position_offset: int = 0
    position_rows: int | None = None
    position_padding_idx: int | None = None
    rope: RopeSettings | None = None
    embed_norm: bool = False
    # Norms
    norm: Norm = "layer"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    # Blocks
    block_order: tuple[Block, ...] = ("self_attn", "cross_attn", "mlp")
    pre_norm: bool = True
    post_block_norm: bool = False
    # Attention
    causal: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False
    query_scale: float | None = None
    score_scale: float | None = None
    score_divisor: float | None = None
    scale_by_inverse_layer: bool = False
    upcast_attention: bool = False
    attn_logit_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    cross_attention: bool = False
    # MLP
    activation: str = "gelu"
    gated_mlp: bool = False
    mlp_bias: bool = True
    # Head
    final_norm: bool = False
    head_transform: str | None = None
    tie_word_embeddings: bool = True
    logits_bias: bool = False
    final_logit_softcap: float | None = None
    # Training
    embed_dropout: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    init_scale: float = 0.02

    def __post_init__(self) -> None:
        if self.num_heads % self.kv_heads or self.num_heads % self.cross_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of the key/value heads "
                             f"({self.kv_heads}, cross-attention {self.cross_kv_heads})")
        if sum(x is not None for x in (self.query_scale, self.score_scale, self.score_divisor)) > 1:
            raise ValueError("at most one of query_scale, score_scale, score_divisor may be set")
        if (self.positions == "rotary") != (self.rope is not None):
            raise ValueError("rotary positions need a rope, and a rope needs rotary positions")
        if self.sliding_layers is not None and len(self.sliding_layers) < self.num_layers:
            raise ValueError(f"sliding_layers names {len(self.sliding_layers)} layers, not {self.num_layers}")
        if set(self.block_order) - {"self_attn", "cross_attn", "mlp"} or len(set(self.block_order)) != len(
                self.block_order) or "self_attn" not in self.block_order or "mlp" not in self.block_order:
            raise ValueError(f"block_order={self.block_order!r}: self_attn, mlp and optionally cross_attn, once each")

    @property
    def kv_heads(self) -> int:
        """K, the self-attention's key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def cross_kv_heads(self) -> int:
        """The cross-attention's key/value heads."""
        return self.cross_num_kv_heads or self.num_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return True if self.sliding_layers is None else bool(self.sliding_layers[layer])

    @property
    def any_sliding(self) -> bool:
        return any(self.is_sliding(i) for i in range(self.num_layers))

    def check_call(self, length: int, key_length: int, cache: bool, encoder: bool, ids: bool, embeds: bool) -> None:
        """Refuses a call the decoder cannot run (both frameworks ask this before anything).

        Args:
            length: T, the new tokens; key_length: L, the key slots (the cache's, else T).
            cache, encoder, ids, embeds: whether a cache, an encoder output, ids and `inputs_embeds` were given.
        """
        if ids == embeds:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache and not self.causal:
            raise ValueError("a cache needs a causal decoder (the config has is_decoder=False)")
        if encoder and not self.cross_attention:
            raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=False")
        if self.positions == "learned" and key_length > self.max_positions:
            raise ValueError(f"{key_length} positions exceed the decoder's {self.max_positions}")

    def check_cache(self, max_length: int, encoder: bool) -> None:
        """Refuses a cache the decoder cannot use (`init_cache` in both frameworks)."""
        if not self.causal:
            raise ValueError("init_cache: a cache needs a causal decoder (the config has is_decoder=False)")
        if encoder and not self.cross_attention:
            raise ValueError("init_cache: encoder_hidden_states given, but the config has add_cross_attention=False")
        if self.positions == "learned" and max_length > self.max_positions:
            raise ValueError(f"init_cache: {max_length} positions exceed the decoder's {self.max_positions}")

    def rope_frequencies(self) -> tuple[np.ndarray, float]:
        """(inverse frequencies [head_dim // 2] float32, the factor cos and sin are scaled by) of the rotary
        embedding: the numbers both frameworks rotate by."""
        return _rope_frequencies(self.rope, self.head_dim)

    def has(self, slot: str) -> bool:
        """Whether a model of this description has the parameter(s) of a layout slot (see `SLOTS`)."""
        return SLOTS[slot](self)

    def linear_shape(self, slot: str) -> tuple[int, int, bool]:
        """(in features, out features, has a bias) of a projection slot."""
        d, q_width = self.hidden_size, self.num_heads * self.head_dim
        kv_width = {"self_attn": self.kv_heads * self.head_dim, "cross_attn": self.cross_kv_heads * self.head_dim}
        attention, _, part = slot.partition(".")
        if part in ("q", "k", "v", "qkv", "kv"):
            out = {"q": q_width, "k": kv_width[attention], "v": kv_width[attention], "kv": 2 * kv_width[attention],
                   "qkv": q_width + 2 * kv_width[attention]}[part]
            return d, out, self.qkv_bias
        if part == "o":
            return q_width, d, self.out_bias
        if slot in ("mlp.up", "mlp.gate"):
            return d, self.intermediate_size, self.mlp_bias
        if slot == "mlp.down":
            return self.intermediate_size, d, self.mlp_bias
        if slot == "head_transform":
            return d, d, True
        if slot == "head":
            return d, self.vocab_size, False
        raise KeyError(f"{slot!r} is not a projection")

    def norm_width(self, slot: str) -> int:
        """The width a norm slot normalises: a head (QK-norm) or the model."""
        return self.head_dim if slot.endswith(("q_norm", "k_norm")) else self.hidden_size

    def embedding_rows(self, slot: str) -> int:
        """The rows of an embedding slot."""
        if slot == "embed_tokens":
            return self.vocab_size
        if slot == "embed_positions":
            return self.position_rows if self.position_rows is not None else self.max_positions + self.position_offset
        if slot == "embed_token_types":
            return self.token_types
        raise KeyError(f"{slot!r} is not an embedding")


@functools.cache
def _rope_frequencies(rope: RopeSettings, head_dim: int) -> tuple[np.ndarray, float]:
    inv_freq, factor = inverse_frequencies(rope, head_dim)
    inv_freq.setflags(write=False)  # shared by every caller
    return inv_freq, factor


# The slots a decoder's parameters fill, each with when a model has it. A family's layout
# (`convert.base.decoder_layout.DecoderLayout`) names, for each slot it uses, the parameter's path in both frameworks.
# Attention projections come separate (q, k, v) or fused (GPT-2's qkv, and kv for cross-attention); a layout uses
# one form per attention.
_ALWAYS = lambda core: True  # noqa: E731
SLOTS = {
    # Top level
    "embed_tokens": _ALWAYS,
    "embed_positions": lambda core: core.positions == "learned",
    "embed_token_types": lambda core: core.token_types > 0,
    "embed_norm": lambda core: core.embed_norm,
    "layers": _ALWAYS,
    "final_norm": lambda core: core.final_norm,
    "head_transform": lambda core: core.head_transform is not None,
    "head_transform_norm": lambda core: core.head_transform is not None,
    "head": lambda core: not core.tie_word_embeddings,
    "logits_bias": lambda core: core.logits_bias,
    # Each layer
    **{f"self_attn.{p}": _ALWAYS for p in ("q", "k", "v", "qkv", "o")},
    "self_attn.q_norm": lambda core: core.qk_norm,
    "self_attn.k_norm": lambda core: core.qk_norm,
    "self_attn_norm": _ALWAYS,
    "self_attn_post_norm": lambda core: core.post_block_norm,
    **{f"cross_attn.{p}": lambda core: core.cross_attention for p in ("q", "k", "v", "kv", "o")},
    "cross_attn.q_norm": lambda core: core.cross_attention and core.qk_norm,
    "cross_attn.k_norm": lambda core: core.cross_attention and core.qk_norm,
    "cross_attn_norm": lambda core: core.cross_attention,
    "cross_attn_post_norm": lambda core: core.cross_attention and core.post_block_norm,
    "mlp.up": _ALWAYS,
    "mlp.gate": lambda core: core.gated_mlp,
    "mlp.down": _ALWAYS,
    "mlp_norm": _ALWAYS,
    "mlp_post_norm": lambda core: core.post_block_norm,
}
