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
    LINEAR,
    NORM,
    BertLikeConfig,
    base_model_drops,
    base_model_renames,
    cross_attention_initializable,
    encoder_rules,
    head_rules,
    rows,
)
from convert.base.keymap import KeyMap, Rule, SourceRules
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertLikeConfig):
    """HF's `RobertaConfig` for `RobertaForCausalLM`: BERT's fields with RoBERTa's token ids."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("roberta",)

    vocab_size: int = 50265
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

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
# Key table

_HEAD = ("lm_head.", "lm_head/")
KEYMAP = KeyMap("roberta", (
    *encoder_rules("roberta"),
    *rows(_HEAD, "dense", LINEAR),
    *rows(_HEAD, "layer_norm", NORM),
    Rule("lm_head.bias", "lm_head/bias"),  # [V]: the logits' bias when tied
    *rows(_HEAD, "decoder", LINEAR),  # untied heads only
))

INITIALIZABLE: tuple[str, ...] = (
    *cross_attention_initializable("roberta"),
    # A RobertaModel source has no LM head; transformers would start it like this too.
    r"lm_head/(dense/(kernel|bias)|layer_norm/(scale|bias)|bias)\Z",
)

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
    if not config.tie_word_embeddings:
        return {}
    return {"lm_head.decoder.weight": _WORD_EMBEDDINGS, "lm_head.decoder.bias": "lm_head.bias"}


SPEC = ArchSpec(
    name="roberta",
    role="decoder",
    config_class=RobertaConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    initializable=INITIALIZABLE,
    groups=(("cross-attention", (r"roberta/encoder/layer/\d+/crossattention/.*",)),),
    flax_class="flax_model.roberta:RobertaForCausalLMModule",
    torch_class="torch_reference.roberta:RobertaForCausalLM",
    fixtures="scripts.fixtures_roberta",
    layer_stack=("num_hidden_layers", "roberta/encoder/layer/"),
    hf_classes=("RobertaForCausalLM", "RobertaForMaskedLM", "RobertaModel"),
)
