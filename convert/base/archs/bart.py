"""BART / mBART decoders: config, key table (HF `BartForCausalLM` <-> HF `FlaxBartForCausalLMModule`), spec.

Source checkpoints may also be `BartForConditionalGeneration` or `BartModel` (with or without the `model.`
prefix) and their mBART twins: the text encoder is dropped, `model.shared.weight` stands in for the decoder's
token embedding (transformers 5 stores only it when embeddings are tied), and a non-zero `final_logits_bias`
becomes the LM head's bias.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np

from convert.base.configs import HFConfig
from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import CROSS_ATTENTION_SLOTS, DecoderLayout, Kind, Slot
from convert.base.keymap import SourceRules
from convert.base.spec import ArchSpec

LAYER_NORM_EPS = 1e-5  # HF's BART uses torch.nn.LayerNorm's default

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BartConfig(HFConfig):
    """BART's decoder (HF `BartForCausalLM`); mBART is the same code with pre-norm and a final layer norm."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bart", "mbart")
    LAYOUT: ClassVar[DecoderLayout]  # where the decoder core's parameters sit (below)
    POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "max_position_embeddings", "d_model", "decoder_layers", "decoder_attention_heads",
        "decoder_ffn_dim", "cross_attention_hidden_size",
    )
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("dropout", "attention_dropout", "activation_dropout",
                                                "decoder_layerdrop")

    model_type: str = "bart"
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    decoder_layers: int = 12
    decoder_attention_heads: int = 16
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    init_std: float = 0.02
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    decoder_layerdrop: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None
    # fairseq leftovers that HF's BART ignores; refused when set, since the weights would not match the code.
    normalize_before: bool = False
    add_final_layer_norm: bool = False
    # Ours: BartForConditionalGeneration's final_logits_bias, kept as a bias of the LM head when non-zero.
    lm_head_bias: bool = False

    @property
    def is_mbart(self) -> bool:
        return self.model_type == "mbart"

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_layers(self) -> int:
        return self.decoder_layers

    @property
    def num_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def init_scale(self) -> float:
        return self.init_std

    @property
    def max_positions(self) -> int:
        """How many positions the learned position embedding serves."""
        return self.max_position_embeddings

    @property
    def position_offset(self) -> int:
        # BART and mBART learned positions start at index 2 (a fairseq padding convention).
        return 2

    @property
    def has_cross_attention(self) -> bool:
        # Every BART / mBART decoder layer has encoder_attn weights, used when an encoder output is given.
        return True

    def as_cross_attending_decoder(self) -> BartConfig:
        return self.replace(is_decoder=True, add_cross_attention=True)

    def decoder_core(self) -> DecoderCore:
        """BART: post-norm layers, learned positions from row 2, `layernorm_embedding`; mBART: pre-norm layers
        and a final `layer_norm`. Every layer has cross-attention (used when an encoder output is given)."""
        head_dim = self.d_model // self.decoder_attention_heads
        return DecoderCore(
            vocab_size=self.vocab_size, hidden_size=self.d_model, num_layers=self.decoder_layers,
            num_heads=self.decoder_attention_heads, head_dim=head_dim, intermediate_size=self.decoder_ffn_dim,
            padding_idx=self.pad_token_id, embed_scale=math.sqrt(self.d_model) if self.scale_embedding else None,
            positions="learned", max_positions=self.max_position_embeddings, position_offset=self.position_offset,
            embed_norm=True, norm="layer", norm_eps=LAYER_NORM_EPS, pre_norm=self.is_mbart, final_norm=self.is_mbart,
            query_scale=head_dim**-0.5, cross_attention=True, activation=self.activation_function,
            tie_word_embeddings=self.tie_word_embeddings, logits_bias=self.lm_head_bias,
            embed_dropout=self.dropout, residual_dropout=self.dropout, attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout, layerdrop=self.decoder_layerdrop, init_scale=self.init_std)

    def validate(self, where: str) -> None:
        self._check_activation(where, "activation_function")
        if self.model_type == "bart":
            if self.normalize_before:
                self._refuse(where, "normalize_before", True)
            if self.add_final_layer_norm:
                self._refuse(where, "add_final_layer_norm", True)
        if self.d_model % self.decoder_attention_heads:
            self._refuse(where, "decoder_attention_heads", self.decoder_attention_heads, "does not divide d_model")
        if self.cross_attention_hidden_size not in (None, self.d_model):
            # BART's encoder_attn k/v projections take d_model wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported for BART (must equal d_model={self.d_model} or be unset)")


# ----------------------------------------------------------------------------------------------------------
# Layout (HF `BartForCausalLM` <-> HF `FlaxBartForCausalLMModule`) and key table


def _attention(name: str, core: str) -> tuple[Slot, ...]:
    """BART's attention modules, in the order its module registers them (keys, values, queries, output)."""
    return tuple(Slot(f"{core}.{slot}", f"{name}.{proj}", f"{name}/{proj}", Kind.LINEAR)
                 for slot, proj in (("k", "k_proj"), ("v", "v_proj"), ("q", "q_proj"), ("o", "out_proj")))


LAYOUT = DecoderLayout("bart", top=(
    Slot("embed_tokens", "model.decoder.embed_tokens", "model/decoder/embed_tokens", Kind.EMBED),
    Slot("embed_positions", "model.decoder.embed_positions", "model/decoder/embed_positions", Kind.EMBED),
    Slot("layers", "model.decoder.layers", "model/decoder/layers", Kind.STACK),
    Slot("embed_norm", "model.decoder.layernorm_embedding", "model/decoder/layernorm_embedding", Kind.LAYER_NORM),
    Slot("final_norm", "model.decoder.layer_norm", "model/decoder/layer_norm", Kind.LAYER_NORM),  # mBART only
    Slot("head", "lm_head", "lm_head", Kind.HEAD),  # untied heads only (a tied one is the token embedding)
    # BartForConditionalGeneration's [1, V] buffer; kept as the LM head's bias when it is not all zeros.
    Slot("logits_bias", "final_logits_bias", "lm_head/bias", Kind.ROW),
), layer=(
    *_attention("self_attn", "self_attn"),
    Slot("self_attn_norm", "self_attn_layer_norm", "self_attn_layer_norm", Kind.LAYER_NORM),
    *_attention("encoder_attn", "cross_attn"),
    Slot("cross_attn_norm", "encoder_attn_layer_norm", "encoder_attn_layer_norm", Kind.LAYER_NORM),
    Slot("mlp.up", "fc1", "fc1", Kind.LINEAR),
    Slot("mlp.down", "fc2", "fc2", Kind.LINEAR),
    Slot("mlp_norm", "final_layer_norm", "final_layer_norm", Kind.LAYER_NORM),
))
BartConfig.LAYOUT = LAYOUT  # the config names its layout: the models build from `config` alone
KEYMAP = LAYOUT.keymap()

_EMBED_TOKENS = "model.decoder.embed_tokens.weight"
_FINAL_LOGITS_BIAS = "final_logits_bias"


def source_rules(config: BartConfig) -> SourceRules:
    """Raw BART / mBART checkpoint names -> `BartForCausalLM` names, for a config passed through `adapt_config`."""
    drops = [(r"(model\.)?encoder\.", "the text encoder is not used (a speech encoder takes its place)")]
    if config.tie_word_embeddings:
        drops.append((r"lm_head\.weight\Z", f"tied to {_EMBED_TOKENS}"))
    if not config.lm_head_bias:
        drops.append((rf"{_FINAL_LOGITS_BIAS}\Z", "all zeros (adds nothing to the logits)"))
    return SourceRules(
        renames=(
            (r"^(decoder|encoder|shared)\.", r"model.\1."),  # BartModel checkpoints carry no `model.` prefix
            (r"^model\.shared\.weight\Z", _EMBED_TOKENS),  # duplicates the decoder embedding, or stands in for it
        ),
        drops=tuple(drops),
    )


def flax_source_rules(config: BartConfig) -> SourceRules:
    """Raw Flax msgpack paths (`FlaxBart{ForCausalLM,ForConditionalGeneration,Model}`) -> our Flax paths.

    HF's Flax seq2seq modules keep the token embedding once, as `model/shared`, and the text encoder beside
    the decoder.
    """
    return SourceRules(
        renames=(
            (r"^(decoder|encoder|shared)/", r"model/\1/"),
            (r"^model/shared/embedding\Z", "model/decoder/embed_tokens/embedding"),
        ),
        drops=((r"(model/)?encoder/", "the text encoder is not used (a speech encoder takes its place)"),),
    )


def tied_keys(config: BartConfig) -> dict[str, str]:
    """{"lm_head.weight": the decoder embedding} when the LM head is tied, else {}."""
    return LAYOUT.tied_keys(config.decoder_core())


def adapt_config(config: BartConfig, checkpoint: Any) -> BartConfig:
    """Sets `lm_head_bias` when the checkpoint has a non-zero `final_logits_bias` (or a Flax `lm_head/bias`)."""
    if config.lm_head_bias:
        return config
    if "lm_head/bias" in checkpoint:
        return config.replace(lm_head_bias=True)
    if _FINAL_LOGITS_BIAS in checkpoint and np.any(checkpoint.get(_FINAL_LOGITS_BIAS)):
        return config.replace(lm_head_bias=True)
    return config


SPEC = ArchSpec(
    name="bart",
    role="decoder",
    config_class=BartConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    adapt_config=adapt_config,
    flax_class="flax_model.decoder:CausalLM",
    torch_class="torch_reference.decoder:CausalLM",
    fixtures="scripts.fixtures_bart",
    layer_stack=("decoder_layers", "model/decoder/layers/"),
    buffers=("final_logits_bias",),
    groups=(("cross-attention", LAYOUT.module_patterns(s for s in CROSS_ATTENTION_SLOTS if s in LAYOUT.slots)),),
    hf_classes=("BartForCausalLM", "BartForConditionalGeneration", "BartModel", "MBartForCausalLM",
                "MBartForConditionalGeneration", "MBartModel"),
)
