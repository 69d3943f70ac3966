"""BERT as a causal text decoder: config, key table (HF `BertLMHeadModel` <-> HF `FlaxBertForCausalLMModule`), spec.

Source checkpoints may be `BertLMHeadModel`, `BertForMaskedLM`, `BertForPreTraining` or `BertModel` (no `bert.`
prefix). What a causal decoder has no use for is dropped with the reason: the pooler, the next-sentence head
(`cls.seq_relationship`), the position-id buffer older transformers versions saved. Old checkpoints (e.g. the
original `bert-base-uncased` files) spell LayerNorm parameters `gamma` / `beta`; they are renamed.

The prediction head follows transformers 5. Tied (`tie_word_embeddings`, the default): `cls.predictions.decoder`
shares the word embedding and `cls.predictions.bias`, so files hold only `cls.predictions.bias`. Untied: the
decoder is a plain linear layer with its own `cls.predictions.decoder.bias`, which is the bias the logits get;
`cls.predictions.bias` is then a parameter transformers keeps but never reads (we keep it too, for the round trip).
An untied checkpoint written before transformers 5 lacks `cls.predictions.decoder.bias` and is refused as missing
a tensor (transformers 5 would silently start it at zero).

A `BertModel` checkpoint has no prediction head. transformers' `from_pretrained` (and therefore
`SpeechEncoderDecoderModel.from_encoder_decoder_pretrained`) starts the missing transform at random and the bias
at zero while the decoder stays tied to the word embedding; the composer does the same (`initializable`, drawn
from the seed with `initializer_range`, listed as initialised in the compose report), so the composed decoder
needs fine-tuning as its cross-attention does. Loading a `BertModel` directory on its own (not composing) is
refused as missing the head.

Cross-attention (`crossattention`) is created by the composer when the source has none, as for GPT-2.
Reused by `convert.base.archs.roberta` (transformers' RoBERTa is BERT "Copied from" with other positions and head).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.configs import HFConfig
from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import CROSS_ATTENTION_SLOTS, DecoderLayout, Kind, Slot
from convert.base.keymap import SourceRules
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BertLikeConfig(HFConfig):
    """The fields and rules BERT and RoBERTa share (HF's `BertConfig` / `RobertaConfig`); not registered itself,
    so that a RoBERTa config is never taken for a BERT one."""

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "cross_attention_hidden_size",
    )
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("hidden_dropout_prob", "attention_probs_dropout_prob")

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    cross_attention_hidden_size: int | None = None
    # transformers 4 also had relative_key(_query) position embeddings; transformers 5 dropped them.
    position_embedding_type: str = "absolute"

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def max_positions(self) -> int:
        """How many decoder positions the learned position embedding serves."""
        return self.max_position_embeddings

    @property
    def has_cross_attention(self) -> bool:
        return self.add_cross_attention

    def as_cross_attending_decoder(self) -> BertLikeConfig:
        return self.replace(is_decoder=True, add_cross_attention=True)

    @property
    def position_padding_idx(self) -> int | None:
        """The position row whose lookups pass no gradient (RoBERTa's padding position)."""
        return None

    @property
    def head_activation(self) -> str:
        """The prediction-head transform's activation."""
        return self.hidden_act

    def decoder_core(self) -> DecoderCore:
        """Post-norm layers, word + token type 0 + learned position embeddings and their LayerNorm, a prediction
        head (dense, activation, LayerNorm) before the vocabulary; causal only with `is_decoder`."""
        return DecoderCore(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, head_dim=self.head_dim, intermediate_size=self.intermediate_size,
            padding_idx=self.pad_token_id, token_types=self.type_vocab_size, positions="learned",
            max_positions=self.max_positions, position_rows=self.max_position_embeddings,
            position_padding_idx=self.position_padding_idx, embed_norm=True, norm="layer",
            norm_eps=self.layer_norm_eps, pre_norm=False, causal=self.is_decoder, score_scale=self.head_dim**-0.5,
            cross_attention=self.add_cross_attention, activation=self.hidden_act,
            head_transform=self.head_activation, tie_word_embeddings=self.tie_word_embeddings, logits_bias=True,
            embed_dropout=self.hidden_dropout_prob, residual_dropout=self.hidden_dropout_prob,
            attention_dropout=self.attention_probs_dropout_prob, init_scale=self.initializer_range)

    def validate(self, where: str) -> None:
        self._check_activation(where, "hidden_act")
        if self.position_embedding_type != "absolute":
            self._refuse(where, "position_embedding_type", self.position_embedding_type,
                         "is not supported (only 'absolute', as in transformers 5)")
        if self.hidden_size % self.num_attention_heads:
            self._refuse(where, "num_attention_heads", self.num_attention_heads, "does not divide hidden_size")
        if self.add_cross_attention and not self.is_decoder:
            # transformers refuses to build this model: cross-attention layers need a causal decoder.
            self._refuse(where, "add_cross_attention", True, "needs is_decoder=true")
        if self.cross_attention_hidden_size not in (None, self.hidden_size):
            # The cross-attention key/value projections take hidden_size wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported (must equal hidden_size={self.hidden_size} or be unset)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            self._refuse(where, "pad_token_id", self.pad_token_id, f"is not a token id (vocab_size={self.vocab_size})")


@dataclasses.dataclass(frozen=True)
class BertConfig(BertLikeConfig):
    """HF's `BertConfig` for `BertLMHeadModel`: absolute positions, token type 0, post-norm layers."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bert",)
    LAYOUT: ClassVar[DecoderLayout]  # where the decoder core's parameters sit (below)


# ----------------------------------------------------------------------------------------------------------
# Layout (HF `BertLMHeadModel` <-> HF `FlaxBertForCausalLMModule`) and key table


def embedding_slots(model: str) -> tuple[Slot, ...]:
    """The embeddings of the base model held under `model` (`bert`, `roberta`)."""
    return (
        Slot("embed_tokens", f"{model}.embeddings.word_embeddings", f"{model}/embeddings/word_embeddings",
             Kind.EMBED),
        Slot("embed_positions", f"{model}.embeddings.position_embeddings", f"{model}/embeddings/position_embeddings",
             Kind.EMBED),  # [max_position_embeddings, D]
        Slot("embed_token_types", f"{model}.embeddings.token_type_embeddings",
             f"{model}/embeddings/token_type_embeddings", Kind.EMBED),  # [type_vocab_size, D]; only type 0 is used
        Slot("embed_norm", f"{model}.embeddings.LayerNorm", f"{model}/embeddings/LayerNorm", Kind.LAYER_NORM),
        Slot("layers", f"{model}.encoder.layer", f"{model}/encoder/layer", Kind.STACK),
    )


def _attention(module: str, core: str) -> tuple[Slot, ...]:
    """Self- or cross-attention (`self`) and its residual output (`output`, post-norm)."""
    return (
        *(Slot(f"{core}.{slot}", f"{module}.self.{proj}", f"{module}/self/{proj}", Kind.LINEAR)
          for slot, proj in (("q", "query"), ("k", "key"), ("v", "value"))),
        Slot(f"{core}.o", f"{module}.output.dense", f"{module}/output/dense", Kind.LINEAR),
        Slot(f"{core}_norm", f"{module}.output.LayerNorm", f"{module}/output/LayerNorm", Kind.LAYER_NORM),
    )


# A layer, shared with RoBERTa: self-attention, cross-attention (add_cross_attention only), feed-forward.
LAYER_SLOTS = (
    *_attention("attention", "self_attn"),
    *_attention("crossattention", "cross_attn"),
    Slot("mlp.up", "intermediate.dense", "intermediate/dense", Kind.LINEAR),
    Slot("mlp.down", "output.dense", "output/dense", Kind.LINEAR),
    Slot("mlp_norm", "output.LayerNorm", "output/LayerNorm", Kind.LAYER_NORM),
)

LAYOUT = DecoderLayout("bert", top=(
    *embedding_slots("bert"),
    # Untied heads only: their own [V, D] weight and [V] bias (transformers 5 reads this bias, not the one below).
    Slot("head", "cls.predictions.decoder", "cls/predictions/decoder", Kind.HEAD_WITH_BIAS),
    Slot("logits_bias", "cls.predictions.bias", "cls/predictions/bias", Kind.VECTOR),  # [V]: the bias when tied
    Slot("head_transform", "cls.predictions.transform.dense", "cls/predictions/transform/dense", Kind.LINEAR),
    Slot("head_transform_norm", "cls.predictions.transform.LayerNorm", "cls/predictions/transform/LayerNorm",
         Kind.LAYER_NORM),
), layer=LAYER_SLOTS, base_model="bert", head_module="cls")
BertConfig.LAYOUT = LAYOUT  # the config names its layout: the models build from `config` alone
KEYMAP = LAYOUT.keymap()

# The cross-attention the composer creates for a source pretrained without it, and (a BertModel source has no
# prediction head; transformers would start it like this too, see the docstring) the head's transform and bias.
CROSS_ATTENTION = [s for s in CROSS_ATTENTION_SLOTS if s in LAYOUT.slots]
INITIALIZABLE: tuple[str, ...] = LAYOUT.flax_patterns(
    CROSS_ATTENTION + ["head_transform", "head_transform_norm", "logits_bias"])

_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"

# Source rules shared with RoBERTa (`model` is the base model's attribute name).
POOLER_WHY = "the pooler feeds sentence-level heads only; a causal LM has none"
POSITION_IDS_WHY = "position-id buffer saved by older transformers versions, not a weight"


def base_model_renames(model: str) -> tuple[tuple[str, str], ...]:
    """`BertModel`-style checkpoints carry no prefix; old ones spell LayerNorm parameters gamma / beta."""
    return (
        (r"^(embeddings|encoder|pooler)\.", rf"{model}.\1."),
        (r"LayerNorm\.gamma\Z", "LayerNorm.weight"),
        (r"LayerNorm\.beta\Z", "LayerNorm.bias"),
    )


def base_model_drops(model: str) -> tuple[tuple[str, str], ...]:
    return ((rf"({model}\.)?pooler\.", POOLER_WHY), (rf"({model}\.)?embeddings\.position_ids\Z", POSITION_IDS_WHY))


def head_rules(config: BertLikeConfig, head: str, word_embeddings: str) -> SourceRules:
    """Tied heads: the decoder weight duplicates the word embedding and its bias the head's `bias` (files of
    transformers < 5 may hold only `decoder.bias`, which then is the bias)."""
    if not config.tie_word_embeddings:
        return SourceRules()
    return SourceRules(
        renames=((rf"^{head}decoder\.bias\Z", f"{head}bias"),),
        drops=((rf"{head}decoder\.weight\Z", f"tied to {word_embeddings}"),),
    )


def source_rules(config: BertConfig) -> SourceRules:
    """Raw BERT checkpoint names (`BertLMHeadModel`, `BertForMaskedLM`, `BertForPreTraining`, `BertModel`) ->
    `BertLMHeadModel` names."""
    return SourceRules(
        renames=base_model_renames("bert"),
        drops=(*base_model_drops("bert"),
               (r"cls\.seq_relationship\.", "BertForPreTraining's next-sentence head; a causal LM has no use for it")),
    ) + head_rules(config, "cls.predictions.", _WORD_EMBEDDINGS)


def flax_source_rules(config: BertConfig) -> SourceRules:
    """Raw Flax msgpack paths (`FlaxBert{ForCausalLM,ForMaskedLM,ForPreTraining,Model}`) -> our Flax paths.

    HF's Flax heads never had an untied decoder bias: such a checkpoint is refused as missing it.
    """
    return SourceRules(
        renames=((r"^(embeddings|encoder|pooler)/", r"bert/\1/"),),
        drops=((r"(bert/)?pooler/", POOLER_WHY),
               (r"cls/seq_relationship/", "BertForPreTraining's next-sentence head; a causal LM has no use for it")),
    )


def tied_keys(config: BertConfig) -> dict[str, str]:
    """The head's decoder weight and bias share the word embedding and `cls.predictions.bias` when tied."""
    return LAYOUT.tied_keys(config.decoder_core())


SPEC = ArchSpec(
    name="bert",
    role="decoder",
    config_class=BertConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    initializable=INITIALIZABLE,
    groups=(("cross-attention", LAYOUT.module_patterns(CROSS_ATTENTION)),),
    flax_class="flax_model.decoder:CausalLM",
    torch_class="torch_reference.decoder:CausalLM",
    fixtures="scripts.fixtures_bert",
    layer_stack=("num_hidden_layers", "bert/encoder/layer/"),
    hf_classes=("BertLMHeadModel", "BertForMaskedLM", "BertForPreTraining", "BertModel"),
)
