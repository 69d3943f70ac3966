"""GPT-2 decoder: config, key table (HF `GPT2LMHeadModel` <-> HF `FlaxGPT2LMHeadModule`), spec.

GPT-2's Conv1D stores its weight (in, out) and HF's Flax GPT-2 kept its kernels (out, in), so every Conv1D
row is a transpose (`T.LINEAR`) just like a `nn.Linear` row. Source checkpoints may be `GPT2LMHeadModel`
(`transformer.h.0...`) or `GPT2Model` without the prefix (the official `gpt2` repository stores `h.0...`,
`wte.weight`); both are accepted. Old transformers versions saved the causal-mask buffers `attn.bias` /
`attn.masked_bias`, which are dropped. GPT-2 checkpoints have no cross-attention: the composer initialises it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from convert.base.configs import HFConfig
from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import CROSS_ATTENTION_SLOTS, DecoderLayout, Kind, Slot
from convert.base.keymap import SourceRules
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class GPT2Config(HFConfig):
    """HF's `GPT2Config` (GPT2LMHeadModel), with cross-attention when composed."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gpt2",)
    LAYOUT: ClassVar[DecoderLayout]  # where the decoder core's parameters sit (below)
    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                                           "cross_attention_hidden_size")
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def max_positions(self) -> int:
        """How many positions the learned position embedding serves."""
        return self.n_positions

    @property
    def has_cross_attention(self) -> bool:
        return self.add_cross_attention

    def as_cross_attending_decoder(self) -> GPT2Config:
        return self.replace(is_decoder=True, add_cross_attention=True)

    def decoder_core(self) -> DecoderCore:
        """Pre-norm layers with fused query/key/value projections, learned positions, a final `ln_f`; scores divided
        by sqrt(head_dim) (and the layer index + 1 with `scale_attn_by_inverse_layer_idx`)."""
        head_dim = self.n_embd // self.n_head
        return DecoderCore(
            vocab_size=self.vocab_size, hidden_size=self.n_embd, num_layers=self.n_layer, num_heads=self.n_head,
            head_dim=head_dim, intermediate_size=self.inner_size, positions="learned", max_positions=self.n_positions,
            norm="layer", norm_eps=self.layer_norm_epsilon, pre_norm=True, final_norm=True,
            score_divisor=math.sqrt(head_dim) if self.scale_attn_weights else None,
            scale_by_inverse_layer=self.scale_attn_by_inverse_layer_idx,
            upcast_attention=self.reorder_and_upcast_attn, cross_attention=self.add_cross_attention,
            activation=self.activation_function, tie_word_embeddings=self.tie_word_embeddings,
            embed_dropout=self.embd_pdrop, residual_dropout=self.resid_pdrop, attention_dropout=self.attn_pdrop,
            init_scale=self.initializer_range)

    def validate(self, where: str) -> None:
        self._check_activation(where, "activation_function")
        if self.n_embd % self.n_head:
            self._refuse(where, "n_head", self.n_head, "does not divide n_embd")
        if self.cross_attention_hidden_size not in (None, self.n_embd):
            # GPT-2's cross-attention projects keys and values from n_embd wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported for GPT-2 (must equal n_embd={self.n_embd} or be unset)")


# ----------------------------------------------------------------------------------------------------------
# Layout (HF `GPT2LMHeadModel` <-> HF `FlaxGPT2LMHeadModule`) and key table

LAYOUT = DecoderLayout("gpt2", top=(
    Slot("embed_tokens", "transformer.wte", "transformer/wte", Kind.EMBED),  # [V, D]
    Slot("embed_positions", "transformer.wpe", "transformer/wpe", Kind.EMBED),  # [n_positions, D]
    Slot("layers", "transformer.h", "transformer/h", Kind.STACK),
    Slot("final_norm", "transformer.ln_f", "transformer/ln_f", Kind.LAYER_NORM),
    Slot("head", "lm_head", "lm_head", Kind.HEAD),  # a plain nn.Linear [V, D]; untied heads only
), layer=(
    Slot("self_attn_norm", "ln_1", "ln_1", Kind.LAYER_NORM),
    Slot("self_attn.qkv", "attn.c_attn", "attn/c_attn", Kind.CONV1D),  # [D, 3D]: queries, keys, values side by side
    Slot("self_attn.o", "attn.c_proj", "attn/c_proj", Kind.CONV1D),
    Slot("cross_attn.kv", "crossattention.c_attn", "crossattention/c_attn", Kind.CONV1D),  # [D, 2D]: keys, values
    Slot("cross_attn.q", "crossattention.q_attn", "crossattention/q_attn", Kind.CONV1D),
    Slot("cross_attn.o", "crossattention.c_proj", "crossattention/c_proj", Kind.CONV1D),
    Slot("cross_attn_norm", "ln_cross_attn", "ln_cross_attn", Kind.LAYER_NORM),  # add_cross_attention only
    Slot("mlp_norm", "ln_2", "ln_2", Kind.LAYER_NORM),
    Slot("mlp.up", "mlp.c_fc", "mlp/c_fc", Kind.CONV1D),
    Slot("mlp.down", "mlp.c_proj", "mlp/c_proj", Kind.CONV1D),
))
GPT2Config.LAYOUT = LAYOUT  # the config names its layout: the models build from `config` alone
KEYMAP = LAYOUT.keymap()

_CROSS_ATTENTION = [s for s in CROSS_ATTENTION_SLOTS if s in LAYOUT.slots]
# Flax paths the composer may initialise: GPT-2 checkpoints are pretrained without cross-attention.
INITIALIZABLE: tuple[str, ...] = LAYOUT.flax_patterns(_CROSS_ATTENTION)

_WTE = "transformer.wte.weight"
_MASK_BUFFERS = r"(transformer\.)?h\.\d+\.(attn|crossattention)\.(bias|masked_bias)\Z"


def source_rules(config: GPT2Config) -> SourceRules:
    """Raw GPT-2 checkpoint names (`GPT2LMHeadModel` or prefix-less `GPT2Model`) -> `GPT2LMHeadModel` names."""
    drops = [(_MASK_BUFFERS, "causal-mask buffer saved by old transformers versions, not a weight")]
    if config.tie_word_embeddings:
        drops.append((r"lm_head\.weight\Z", f"tied to {_WTE}"))
    return SourceRules(
        renames=((r"^(wte|wpe|h|ln_f)\.", r"transformer.\1."),),  # GPT2Model checkpoints carry no prefix
        drops=tuple(drops),
    )


def flax_source_rules(config: GPT2Config) -> SourceRules:
    """Raw Flax msgpack paths (`FlaxGPT2LMHeadModel` or prefix-less `FlaxGPT2Model`) -> our Flax paths."""
    return SourceRules(renames=((r"^(wte|wpe|h|ln_f)/", r"transformer/\1/"),))


def tied_keys(config: GPT2Config) -> dict[str, str]:
    """{"lm_head.weight": the token embedding} when the LM head is tied, else {}."""
    return LAYOUT.tied_keys(config.decoder_core())


SPEC = ArchSpec(
    name="gpt2",
    role="decoder",
    config_class=GPT2Config,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    initializable=INITIALIZABLE,
    groups=(("cross-attention", LAYOUT.module_patterns(_CROSS_ATTENTION)),),
    causal_lm=True,
    fan_in_fan_out=LAYOUT.in_out_weights(),  # Conv1D: [in, out]
    flax_class="flax_model.decoder:CausalLM",
    torch_class="torch_reference.decoder:CausalLM",
    fixtures="scripts.fixtures_gpt2",
    layer_stack=("n_layer", "transformer/h/"),
    hf_classes=("GPT2LMHeadModel", "GPT2Model"),
)
