"""RoBERTa as a causal text decoder: config, key table (HF `RobertaForCausalLM` <-> HF
`FlaxRobertaForCausalLMModule`), spec.

transformers' RoBERTa is BERT (its modules are "Copied from" BERT) with two differences, which is all this file
adds to `convert.base.archs.bert`:

* Positions come from the token ids (fairseq's `make_positions`): a pad token (`input_ids == pad_token_id`) sits
  at position `pad_token_id`, every other token at `pad_token_id + 1 +` the number of non-pad tokens before it in
  the call, plus the number of cached positions in incremental decoding. So `max_position_embeddings` rows serve
  `max_position_embeddings - pad_token_id - 1` decoder positions.
* The LM head is `lm_head.{dense, layer_norm, decoder, bias}` with an exact GELU whatever `hidden_act` says.
  Tied and untied heads behave as BERT's (see `convert.base.archs.bert`).

Sources: `RobertaForCausalLM`, `RobertaForMaskedLM` and `RobertaModel` (no prefix, no head: the composer
starts the head as transformers would).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.bert import (
    CROSS_ATTENTION,
    LAYER_SLOTS,
    BertLikeConfig,
    base_model_drops,
    base_model_renames,
    embedding_slots,
    head_rules,
)
from convert.base.decoder_layout import DecoderLayout, Kind, Slot
from convert.base.keymap import SourceRules
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertLikeConfig):
    """HF's `RobertaConfig` for `RobertaForCausalLM`: BERT's fields with RoBERTa's token ids."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("roberta",)
    LAYOUT: ClassVar[DecoderLayout]  # where the decoder core's parameters sit (below)

    vocab_size: int = 50265
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    @property
    def position_padding_idx(self) -> int | None:
        return self.pad_token_id

    @property
    def head_activation(self) -> str:
        return "gelu"  # RoBERTa's head ignores hidden_act

    @property
    def max_positions(self) -> int:
        """Decoder positions: rows `0..pad_token_id` of the position embedding are never a real token's."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def validate(self, where: str) -> None:
        if self.pad_token_id is None:
            self._refuse(where, "pad_token_id", None, "is required: RoBERTa's positions are counted from it")
        super().validate(where)
        if self.max_positions < 1:
            self._refuse(where, "max_position_embeddings", self.max_position_embeddings,
                         f"leaves no position after the padding offset (pad_token_id={self.pad_token_id})")


# ----------------------------------------------------------------------------------------------------------
# Layout (HF `RobertaForCausalLM` <-> HF `FlaxRobertaForCausalLMModule`) and key table

LAYOUT = DecoderLayout("roberta", top=(
    *embedding_slots("roberta"),
    Slot("head", "lm_head.decoder", "lm_head/decoder", Kind.HEAD_WITH_BIAS),  # untied heads only
    Slot("logits_bias", "lm_head.bias", "lm_head/bias", Kind.VECTOR),  # [V]: the logits' bias when tied
    Slot("head_transform", "lm_head.dense", "lm_head/dense", Kind.LINEAR),
    Slot("head_transform_norm", "lm_head.layer_norm", "lm_head/layer_norm", Kind.LAYER_NORM),
), layer=LAYER_SLOTS, base_model="roberta", head_module="lm_head")
RobertaConfig.LAYOUT = LAYOUT  # the config names its layout: the models build from `config` alone
KEYMAP = LAYOUT.keymap()

INITIALIZABLE: tuple[str, ...] = LAYOUT.flax_patterns(
    # The cross-attention, and (a RobertaModel source has no LM head; transformers would start it like this too)
    # the head's transform and bias.
    CROSS_ATTENTION + ["head_transform", "head_transform_norm", "logits_bias"])

_WORD_EMBEDDINGS = "roberta.embeddings.word_embeddings.weight"


def source_rules(config: RobertaConfig) -> SourceRules:
    """Raw RoBERTa checkpoint names (`RobertaForCausalLM`, `RobertaForMaskedLM`, `RobertaModel`) ->
    `RobertaForCausalLM` names."""
    return SourceRules(renames=base_model_renames("roberta"), drops=base_model_drops("roberta")) + head_rules(
        config, "lm_head.", _WORD_EMBEDDINGS)


def flax_source_rules(config: RobertaConfig) -> SourceRules:
    """Raw Flax msgpack paths (`FlaxRoberta{ForCausalLM,ForMaskedLM,Model}`) -> our Flax paths."""
    return SourceRules(
        renames=((r"^(embeddings|encoder|pooler)/", r"roberta/\1/"),),
        drops=((r"(roberta/)?pooler/", "the pooler feeds sentence-level heads only; a causal LM has none"),),
    )


def tied_keys(config: RobertaConfig) -> dict[str, str]:
    """The head's decoder weight and bias share the word embedding and `lm_head.bias` when tied."""
    return LAYOUT.tied_keys(config.decoder_core())


SPEC = ArchSpec(
    name="roberta",
    role="decoder",
    config_class=RobertaConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    initializable=INITIALIZABLE,
    groups=(("cross-attention", LAYOUT.module_patterns(CROSS_ATTENTION)),),
    flax_class="flax_model.roberta:RobertaForCausalLMModule",
    torch_class="torch_reference.roberta:RobertaForCausalLM",
    fixtures="scripts.fixtures_roberta",
    layer_stack=("num_hidden_layers", "roberta/encoder/layer/"),
    hf_classes=("RobertaForCausalLM", "RobertaForMaskedLM", "RobertaModel"),
)
