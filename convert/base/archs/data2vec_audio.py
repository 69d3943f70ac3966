"""data2vec-audio (HF `Data2VecAudioModel` and its task models): config, key table, source rules and spec.

transformers' data2vec-audio is wav2vec2 with a layer-norm feature encoder, the post-norm layout, and instead of
the weight-normalised positional conv a stack of `num_conv_pos_embeddings` plain grouped convs of kernel
`conv_pos_kernel_size`, each followed by a parameter-free layer norm and the activation. The adapter is
wav2vec2's. Task checkpoints (`Data2VecAudioForCTC`, `...ForSequenceClassification`,
`...ForAudioFrameClassification`, `...ForXVector`) keep the encoder under `data2vec_audio.`; their heads are
dropped with the reason. HF never ported it to Flax: the Flax paths follow DESIGN.md's canonical names.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.wav2vec2 import (
    ADAPTER_POSITIVE,
    ADAPTER_ROWS,
    FEATURE_ROWS,
    LAYER_ROWS,
    Wav2Vec2FamilyConfig,
    conv,
    family_source_rules,
    task_head_drops,
)
from convert.base.keymap import KeyMap, SourceRules
from convert.base.spec import ArchSpec


@dataclasses.dataclass(frozen=True)
class Data2VecAudioConfig(Wav2Vec2FamilyConfig):
    """HF's `Data2VecAudioConfig`: the wav2vec2 family's fields, the adapter and the positional conv stack.

    It has no layout options: the feature encoder is always layer-normed and the layers post-norm, whatever a
    config.json says (HF's classes do not read `feat_extract_norm` or `do_stable_layer_norm`).
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("data2vec-audio",)
    POSITIVE: ClassVar[tuple[str, ...]] = (Wav2Vec2FamilyConfig.POSITIVE + ADAPTER_POSITIVE
                                           + ("conv_pos_kernel_size",))

    # Here the number of positional conv layers, not a kernel size.
    num_conv_pos_embeddings: int = 5
    conv_pos_kernel_size: int = 19
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None

    feat_extract_norm: ClassVar[str] = "layer"
    do_stable_layer_norm: ClassVar[bool] = False


KEYMAP = KeyMap("data2vec_audio", (
    *FEATURE_ROWS,
    *conv("encoder.pos_conv_embed.layers.{j}.conv", "encoder/pos_conv_embed/layers/{j}/conv"),
    *LAYER_ROWS,
    *ADAPTER_ROWS,
))


def source_rules(config: Data2VecAudioConfig) -> SourceRules:
    """Raw checkpoint names -> `Data2VecAudioModel` names; task heads dropped with why."""
    return family_source_rules(config, "data2vec_audio", task_head_drops("Data2VecAudio"))


SPEC = ArchSpec(
    name="data2vec_audio",
    role="encoder",
    config_class=Data2VecAudioConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_class="flax_model.data2vec_audio:Data2VecAudioModule",
    torch_class="torch_reference.data2vec_audio:Data2VecAudioModel",
    fixtures="scripts.fixtures_data2vec_audio",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    hf_classes=("Data2VecAudioModel", "Data2VecAudioForCTC", "Data2VecAudioForSequenceClassification",
                "Data2VecAudioForAudioFrameClassification", "Data2VecAudioForXVector"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
