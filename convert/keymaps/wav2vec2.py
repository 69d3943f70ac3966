"""wav2vec2 key table: HF `Wav2Vec2Model` state_dict keys <-> HF `FlaxWav2Vec2Module` param paths."""

from __future__ import annotations

from typing import Any

from convert.configs import Wav2Vec2Config
from convert.keymap import KeyMap, Rule, SourceRules, T


def _linear(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.LINEAR),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


def _conv(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.CONV),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


def _norm(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/scale", T.NORM),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


_LAYER = "encoder.layers.{i}"
_FLAX_LAYER = "encoder/layers/{i}"

KEYMAP = KeyMap("wav2vec2", (
    # Conv feature encoder; the norm is a GroupNorm (layer 0 only) or a LayerNorm (every layer).
    *_conv("feature_extractor.conv_layers.{i}.conv", "feature_extractor/conv_layers/{i}/conv"),
    *_norm("feature_extractor.conv_layers.{i}.layer_norm", "feature_extractor/conv_layers/{i}/layer_norm"),
    *_norm("feature_projection.layer_norm", "feature_projection/layer_norm"),
    *_linear("feature_projection.projection", "feature_projection/projection"),
    Rule("masked_spec_embed", "masked_spec_embed", T.IDENTITY),
    # Weight norm: HF's Flax module keeps PyTorch's [C, C/groups, K] v and [1, 1, K] g.
    Rule("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder/pos_conv_embed/conv/weight_g",
         T.WEIGHT_NORM),
    Rule("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder/pos_conv_embed/conv/weight_v",
         T.WEIGHT_NORM),
    Rule("encoder.pos_conv_embed.conv.bias", "encoder/pos_conv_embed/conv/bias", T.IDENTITY),
    *_norm("encoder.layer_norm", "encoder/layer_norm"),
    *_linear(f"{_LAYER}.attention.q_proj", f"{_FLAX_LAYER}/attention/q_proj"),
    *_linear(f"{_LAYER}.attention.k_proj", f"{_FLAX_LAYER}/attention/k_proj"),
    *_linear(f"{_LAYER}.attention.v_proj", f"{_FLAX_LAYER}/attention/v_proj"),
    *_linear(f"{_LAYER}.attention.out_proj", f"{_FLAX_LAYER}/attention/out_proj"),
    *_norm(f"{_LAYER}.layer_norm", f"{_FLAX_LAYER}/layer_norm"),
    *_linear(f"{_LAYER}.feed_forward.intermediate_dense", f"{_FLAX_LAYER}/feed_forward/intermediate_dense"),
    *_linear(f"{_LAYER}.feed_forward.output_dense", f"{_FLAX_LAYER}/feed_forward/output_dense"),
    *_norm(f"{_LAYER}.final_layer_norm", f"{_FLAX_LAYER}/final_layer_norm"),
    *_linear("adapter.proj", "adapter/proj"),
    *_norm("adapter.proj_layer_norm", "adapter/proj_layer_norm"),
    *_conv("adapter.layers.{i}.conv", "adapter/layers/{i}/conv"),
))

# Parameters of HF's task heads around the encoder (the names follow the `wav2vec2.` prefix strip).
_HEADS = (
    (r"lm_head\.", "CTC head of Wav2Vec2ForCTC; the encoder does not use it"),
    (r"quantizer\.", "codebook quantizer of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_q\.", "quantizer projection of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_hid\.", "output projection of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"projector\.", "classification head (Wav2Vec2ForSequenceClassification/ForXVector); the encoder does not use it"),
    (r"classifier\.", "classification head (Wav2Vec2ForSequenceClassification/ForAudioFrameClassification); "
                      "the encoder does not use it"),
    (r"layer_weights\Z", "weighted layer sum of a classification head; the encoder does not use it"),
    (r"tdnn\.", "x-vector TDNN head of Wav2Vec2ForXVector; the encoder does not use it"),
    (r"feature_extractor\.(weight|bias)\Z", "x-vector projection of Wav2Vec2ForXVector; the encoder does not use it"),
    (r"objective\.", "x-vector AMSoftmax loss of Wav2Vec2ForXVector; the encoder does not use it"),
)

_RENAMES = (
    # Task models keep the encoder under `wav2vec2.`.
    (r"\Awav2vec2\.", ""),
    # torch.nn.utils.weight_norm's spelling, from before parametrizations.weight_norm.
    (r"\A(encoder\.pos_conv_embed\.conv)\.weight_g\Z", r"\1.parametrizations.weight.original0"),
    (r"\A(encoder\.pos_conv_embed\.conv)\.weight_v\Z", r"\1.parametrizations.weight.original1"),
)


_SPEC_EMBED_UNUSED = "SpecAugment embedding (training only); this config has mask_time_prob=0 and mask_feature_prob=0"


def source_rules(config: Wav2Vec2Config) -> SourceRules:
    """Raw checkpoint names -> `Wav2Vec2Model` names; task heads dropped with why."""
    drops = _HEADS
    if not config.has_masked_spec_embed:
        drops += ((r"(wav2vec2\.)?masked_spec_embed\Z", _SPEC_EMBED_UNUSED),)
    return SourceRules(renames=_RENAMES, drops=drops)


# HF's Flax task models (FlaxWav2Vec2ForCTC, FlaxWav2Vec2ForPreTraining) and their heads.
_FLAX_HEADS = (
    (r"lm_head/", "CTC head of FlaxWav2Vec2ForCTC; the encoder does not use it"),
    (r"quantizer/", "codebook quantizer of FlaxWav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_q/", "quantizer projection of FlaxWav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_hid/", "output projection of FlaxWav2Vec2ForPreTraining; used only by the pre-training loss"),
)


def flax_source_rules(config: Wav2Vec2Config) -> SourceRules:
    """Raw `flax_model.msgpack` paths -> `FlaxWav2Vec2Module` paths; task heads dropped with why.

    HF's Flax module always has `masked_spec_embed`; it is dropped when this config has no SpecAugment.
    """
    drops = _FLAX_HEADS
    if not config.has_masked_spec_embed:
        drops += ((r"(wav2vec2/)?masked_spec_embed\Z", _SPEC_EMBED_UNUSED),)
    return SourceRules(renames=((r"\Awav2vec2/", ""),), drops=drops)


def tied_keys(config: Wav2Vec2Config) -> dict[str, str]:
    """The encoder shares no storage between parameters."""
    return {}


# The encoder has no parameter a composer may create when a checkpoint lacks it.
INITIALIZABLE: tuple[str, ...] = ()


def adapt_config(config: Wav2Vec2Config, checkpoint: Any) -> Wav2Vec2Config:
    """No data-dependent config fixes for wav2vec2."""
    return config
