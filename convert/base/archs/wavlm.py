"""WavLM (HF `WavLMModel` and its task models): config, key table, source rules and spec.

transformers' WavLM is wav2vec2 with gated relative position bias: layer 0's attention holds a bucketed
relative-position embedding (`rel_attn_embed`, [num_buckets, heads]) whose bias every layer reuses, scaled per
head and frame by a gate computed from the layer's input (`gru_rel_pos_linear`, `gru_rel_pos_const`). Both
layouts and the adapter are wav2vec2's. Task checkpoints (`WavLMForCTC`, `...ForSequenceClassification`,
`...ForAudioFrameClassification`, `...ForXVector`) keep the encoder under `wavlm.`; their heads are dropped
with the reason.

HF never ported WavLM to Flax. The Flax paths follow DESIGN.md's canonical names with one exception: layer 0's
`encoder.layers.0.attention.rel_attn_embed.weight` is `encoder/rel_attn_embed/embedding`, beside the stack
rather than inside layer 0, so that every layer of the stack has the same parameters (the composed model's
shapes are traced from one layer and repeated, and the layers are rematerialised alike).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.wav2vec2 import (
    ADAPTER_POSITIVE,
    ADAPTER_ROWS,
    FEATURE_ROWS,
    FLAX_LAYER,
    LAYER,
    LAYER_ROWS,
    WEIGHT_NORM_POS_CONV_ROWS,
    Wav2Vec2FamilyConfig,
    family_source_rules,
    linear,
    task_head_drops,
    weight_norm_renames,
)
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec


@dataclasses.dataclass(frozen=True)
class WavLMConfig(Wav2Vec2FamilyConfig):
    """HF's `WavLMConfig`: the wav2vec2 family's fields, the layout, the adapter and the position buckets."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("wavlm",)
    POSITIVE: ClassVar[tuple[str, ...]] = (Wav2Vec2FamilyConfig.POSITIVE + ADAPTER_POSITIVE
                                           + ("num_buckets", "max_bucket_distance"))

    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    num_buckets: int = 320
    max_bucket_distance: int = 800

    def validate(self, where: str) -> None:
        super().validate(where)
        # Relative positions below num_buckets // 4 get a bucket each; larger ones share log-spaced buckets up to
        # max_bucket_distance, which needs at least one exact bucket and a distance beyond them.
        if self.num_buckets < 4:
            self._refuse(where, "num_buckets", self.num_buckets, "must be at least 4")
        if self.max_bucket_distance <= self.num_buckets // 4:
            self._refuse(where, "max_bucket_distance", self.max_bucket_distance,
                         f"must exceed num_buckets // 4 = {self.num_buckets // 4}")


KEYMAP = KeyMap("wavlm", (
    *FEATURE_ROWS,
    *WEIGHT_NORM_POS_CONV_ROWS,
    *LAYER_ROWS,
    Rule(f"{LAYER}.attention.gru_rel_pos_const", f"{FLAX_LAYER}/attention/gru_rel_pos_const", T.IDENTITY),
    *linear(f"{LAYER}.attention.gru_rel_pos_linear", f"{FLAX_LAYER}/attention/gru_rel_pos_linear"),
    # Layer 0's embedding, shared by the stack (see the module docstring).
    Rule("encoder.layers.0.attention.rel_attn_embed.weight", "encoder/rel_attn_embed/embedding", T.EMBED),
    *ADAPTER_ROWS,
))


def source_rules(config: WavLMConfig) -> SourceRules:
    """Raw checkpoint names -> `WavLMModel` names; task heads dropped with why."""
    return family_source_rules(config, "wavlm", task_head_drops("WavLM"), weight_norm_renames())


SPEC = ArchSpec(
    name="wavlm",
    role="encoder",
    config_class=WavLMConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_class="flax_model.wavlm:WavLMModule",
    torch_class="torch_reference.wavlm:WavLMModel",
    fixtures="scripts.fixtures_wavlm",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    hf_classes=("WavLMModel", "WavLMForCTC", "WavLMForSequenceClassification", "WavLMForAudioFrameClassification",
                "WavLMForXVector"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
