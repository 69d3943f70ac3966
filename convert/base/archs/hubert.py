"""HuBERT (HF `HubertModel` and its task models): config, key table, source rules and spec.

transformers' HuBERT is wav2vec2 without the adapter, with an optional layer norm in the feature projection
(`feat_proj_layer_norm`) and, with `conv_pos_batch_norm`, a BatchNorm before a plain positional conv instead of
the weight norm. Task checkpoints (`HubertForCTC`, `HubertForSequenceClassification`) keep the encoder under
`hubert.`; their heads are dropped with the reason. HF never ported HuBERT to Flax: the Flax paths follow
DESIGN.md's canonical names (those of the wav2vec2 modules it shares, plus `.../batch_norm/{scale,bias,
running_mean,running_var}`; BatchNorm's integer step counter `num_batches_tracked` is dropped, see `_COUNTER`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.wav2vec2 import (
    FEATURE_ROWS,
    LAYER_ROWS,
    WEIGHT_NORM_POS_CONV_ROWS,
    Wav2Vec2FamilyConfig,
    conv,
    family_source_rules,
    norm,
    task_head_drops,
    weight_norm_renames,
)
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec


@dataclasses.dataclass(frozen=True)
class HubertConfig(Wav2Vec2FamilyConfig):
    """HF's `HubertConfig`: the wav2vec2 family's fields plus the layout and HuBERT's own options.

    HuBERT has no adapter: `add_adapter` is always False, whatever a config.json says (HF's `HubertModel`
    deletes it too).
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("hubert",)
    # transformers' HubertModel calls SpecAugment without the padding mask: masks span the padded length.
    SPEC_AUGMENT_USES_LENGTHS: ClassVar[bool] = False

    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: bool = False
    # Not a field of HF's HubertConfig, but its stable layers read it (attention adapters): refused when set.
    adapter_attn_dim: int | None = None

    add_adapter: ClassVar[bool] = False
    num_adapter_layers: ClassVar[int] = 0
    adapter_stride: ClassVar[int] = 1
    adapter_kernel_size: ClassVar[int] = 3
    output_hidden_size: ClassVar[None] = None

    @property
    def has_projection_layer_norm(self) -> bool:
        return self.feat_proj_layer_norm

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.adapter_attn_dim is not None:
            self._refuse(where, "adapter_attn_dim", self.adapter_attn_dim, "is not supported (attention adapters)")


# The BatchNorm variant of the positional conv: BatchNorm1d's parameters and buffers, then a plain conv.
_BATCH_NORM = "encoder.pos_conv_embed.batch_norm"
_FLAX_BATCH_NORM = "encoder/pos_conv_embed/batch_norm"
BATCH_NORM_POS_CONV_ROWS = (
    *norm(_BATCH_NORM, _FLAX_BATCH_NORM),
    Rule(f"{_BATCH_NORM}.running_mean", f"{_FLAX_BATCH_NORM}/running_mean", T.IDENTITY),
    Rule(f"{_BATCH_NORM}.running_var", f"{_FLAX_BATCH_NORM}/running_var", T.IDENTITY),
    *conv("encoder.pos_conv_embed.conv", "encoder/pos_conv_embed/conv")[:1],  # the bias row is shared
)

KEYMAP = KeyMap("hubert", (*FEATURE_ROWS, *WEIGHT_NORM_POS_CONV_ROWS, *BATCH_NORM_POS_CONV_ROWS, *LAYER_ROWS))


# BatchNorm1d's step counter: an integer buffer that changes the output only with momentum=None (a cumulative
# average), which transformers' BatchNorm1d does not use. Every parameter of the models is floating point, so it
# is neither a Flax leaf nor in the composed files (transformers then starts it at 0, as it would any counter).
_COUNTER = (r"(hubert\.)?encoder\.pos_conv_embed\.batch_norm\.num_batches_tracked\Z",
            "BatchNorm step counter; it changes nothing with transformers' momentum=0.1")


def source_rules(config: HubertConfig) -> SourceRules:
    """Raw checkpoint names -> `HubertModel` names; task heads and the BatchNorm counter dropped with why."""
    return family_source_rules(config, "hubert", task_head_drops("Hubert") + (_COUNTER,), weight_norm_renames())


SPEC = ArchSpec(
    name="hubert",
    role="encoder",
    config_class=HubertConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_class="flax_model.hubert:HubertModule",
    torch_class="torch_reference.hubert:HubertModel",
    fixtures="scripts.fixtures_hubert",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    buffers=(r".*\.batch_norm\.running_(mean|var)",),
    hf_classes=("HubertModel", "HubertForCTC", "HubertForSequenceClassification"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
