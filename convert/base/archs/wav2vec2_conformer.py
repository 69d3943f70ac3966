"""wav2vec2-conformer (HF `Wav2Vec2ConformerModel` and its task models): config, key table, source rules and spec.

transformers' wav2vec2-conformer keeps wav2vec2's feature encoder, feature projection, SpecAugment embedding and
adapter, and replaces the transformer layers by conformer blocks: a half-step feed-forward, self-attention with
rotary or relative (Transformer-XL) position embeddings or none (`position_embeddings_type`), a convolution module
(pointwise conv + GLU, depthwise conv, BatchNorm, activation, pointwise conv), a second half-step feed-forward and a
final layer norm. The encoder's layer norm comes after the blocks.

Two facts of transformers' classes that the key table keeps: the encoder builds wav2vec2's weight-normalised
positional conv (`encoder.pos_conv_embed`) but its forward never calls it, so the weights are carried (read, written,
never used); and the rotary embedding's frequencies are a persistent buffer (`encoder.embed_positions.inv_freq`),
carried like a weight and used as stored. Buffers (BatchNorm running statistics, `inv_freq`) are never trained.

Task checkpoints (`Wav2Vec2ConformerForCTC`, `...ForPreTraining`, `...ForSequenceClassification`,
`...ForAudioFrameClassification`, `...ForXVector`) keep the encoder under `wav2vec2_conformer.`; their heads are
dropped with the reason, as are the BatchNorm step counters (`num_batches_tracked`, see `convert.base.archs.hubert`).
HF never ported the conformer to Flax: the Flax paths follow DESIGN.md's canonical names.
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
    WEIGHT_NORM_POS_CONV_ROWS,
    Wav2Vec2FamilyConfig,
    family_source_rules,
    linear,
    norm,
    task_head_drops,
    weight_norm_renames,
)
from convert.base.configs import HFConfig
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec

POSITION_EMBEDDINGS = ("relative", "rotary", None)


@dataclasses.dataclass(frozen=True)
class Wav2Vec2ConformerConfig(Wav2Vec2FamilyConfig):
    """HF's `Wav2Vec2ConformerConfig`: the wav2vec2 family's fields, the adapter and the conformer's own.

    It has no layer-norm layout option (the blocks are what they are; HF's class does not read
    `do_stable_layer_norm`); the feature encoder's norm follows `feat_extract_norm` as in wav2vec2.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("wav2vec2-conformer",)
    POSITIVE: ClassVar[tuple[str, ...]] = (Wav2Vec2FamilyConfig.POSITIVE + ADAPTER_POSITIVE
                                           + ("conv_depthwise_kernel_size", "rotary_embedding_base",
                                              "max_source_positions"))
    PROBABILITIES: ClassVar[tuple[str, ...]] = Wav2Vec2FamilyConfig.PROBABILITIES + ("conformer_conv_dropout",)

    feat_extract_norm: str = "group"
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    position_embeddings_type: str | None = "relative"
    rotary_embedding_base: int = 10000
    # Only sizes transformers' precomputed table of relative positions; longer inputs extend it, same values.
    max_source_positions: int = 5000
    conv_depthwise_kernel_size: int = 31
    conformer_conv_dropout: float = 0.1

    do_stable_layer_norm: ClassVar[bool] = False

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, where: str) -> None:
        super().validate(where)
        check_conformer_blocks(self, where, POSITION_EMBEDDINGS)


def check_conformer_blocks(config: HFConfig, where: str, position_embeddings: tuple[str | None, ...]) -> None:
    """Refuses what conformer blocks cannot compute (wav2vec2-conformer's and w2v-BERT's, whose blocks transformers
    copies from it): another `position_embeddings_type`, an even depthwise kernel (transformers pads it for the
    same length, which only odd kernels keep), an odd rotary head, an odd width with the sinusoid table."""
    kind = config.position_embeddings_type
    if kind not in position_embeddings:
        names = ", ".join("null" if k is None else k for k in position_embeddings)
        config._refuse(where, "position_embeddings_type", kind, f"is not supported (supported: {names})")
    if config.conv_depthwise_kernel_size % 2 == 0:
        config._refuse(where, "conv_depthwise_kernel_size", config.conv_depthwise_kernel_size,
                       "must be odd (same padding)")
    if kind == "rotary" and config.head_size % 2:
        config._refuse(where, "num_attention_heads", config.num_attention_heads,
                       f"gives an odd head size ({config.head_size}); rotary embeddings rotate pairs of channels")
    if kind == "relative" and config.hidden_size % 2:
        config._refuse(where, "hidden_size", config.hidden_size,
                       "must be even with relative position embeddings (sine/cosine pairs)")


# ----------------------------------------------------------------------------------------------------------
# Key table

_ATTN = f"{LAYER}.self_attn"
_FLAX_ATTN = f"{FLAX_LAYER}/self_attn"
_CONV = f"{LAYER}.conv_module"
_FLAX_CONV = f"{FLAX_LAYER}/conv_module"


def _feed_forward(name: str) -> tuple[Rule, ...]:
    return (*norm(f"{LAYER}.{name}_layer_norm", f"{FLAX_LAYER}/{name}_layer_norm"),
            *linear(f"{LAYER}.{name}.intermediate_dense", f"{FLAX_LAYER}/{name}/intermediate_dense"),
            *linear(f"{LAYER}.{name}.output_dense", f"{FLAX_LAYER}/{name}/output_dense"))


def _bias_free_conv(torch_module: str, flax_module: str) -> Rule:
    return Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.CONV)


# One conformer block; the relative-position rows (linear_pos, pos_bias_u/v) exist only with relative embeddings.
BLOCK_ROWS = (
    *_feed_forward("ffn1"),
    *norm(f"{LAYER}.self_attn_layer_norm", f"{FLAX_LAYER}/self_attn_layer_norm"),
    *(rule for proj in ("linear_q", "linear_k", "linear_v", "linear_out")
      for rule in linear(f"{_ATTN}.{proj}", f"{_FLAX_ATTN}/{proj}")),
    Rule(f"{_ATTN}.linear_pos.weight", f"{_FLAX_ATTN}/linear_pos/kernel", T.LINEAR),
    Rule(f"{_ATTN}.pos_bias_u", f"{_FLAX_ATTN}/pos_bias_u", T.IDENTITY),
    Rule(f"{_ATTN}.pos_bias_v", f"{_FLAX_ATTN}/pos_bias_v", T.IDENTITY),
    *norm(f"{_CONV}.layer_norm", f"{_FLAX_CONV}/layer_norm"),
    _bias_free_conv(f"{_CONV}.pointwise_conv1", f"{_FLAX_CONV}/pointwise_conv1"),
    _bias_free_conv(f"{_CONV}.depthwise_conv", f"{_FLAX_CONV}/depthwise_conv"),
    *norm(f"{_CONV}.batch_norm", f"{_FLAX_CONV}/batch_norm"),
    Rule(f"{_CONV}.batch_norm.running_mean", f"{_FLAX_CONV}/batch_norm/running_mean", T.IDENTITY),
    Rule(f"{_CONV}.batch_norm.running_var", f"{_FLAX_CONV}/batch_norm/running_var", T.IDENTITY),
    _bias_free_conv(f"{_CONV}.pointwise_conv2", f"{_FLAX_CONV}/pointwise_conv2"),
    *_feed_forward("ffn2"),
    *norm(f"{LAYER}.final_layer_norm", f"{FLAX_LAYER}/final_layer_norm"),
)

KEYMAP = KeyMap("wav2vec2_conformer", (
    *FEATURE_ROWS,
    # Built by transformers' encoder, never called by its forward (see the module docstring).
    *WEIGHT_NORM_POS_CONV_ROWS,
    Rule("encoder.embed_positions.inv_freq", "encoder/embed_positions/inv_freq", T.IDENTITY),
    *norm("encoder.layer_norm", "encoder/layer_norm"),
    *BLOCK_ROWS,
    *ADAPTER_ROWS,
))

_PREFIX = "wav2vec2_conformer"
_PRETRAINING_HEADS = tuple(
    (rf"{name}\.", f"{what} of Wav2Vec2ConformerForPreTraining; used only by the pre-training loss")
    for name, what in (("quantizer", "codebook quantizer"), ("project_q", "quantizer projection"),
                       ("project_hid", "output projection")))
# BatchNorm1d's integer step counter changes the output only with momentum=None, which transformers does not use.
_COUNTER = (rf"({_PREFIX}\.)?encoder\.layers\.\d+\.conv_module\.batch_norm\.num_batches_tracked\Z",
            "BatchNorm step counter; it changes nothing with transformers' momentum=0.1")


def source_rules(config: Wav2Vec2ConformerConfig) -> SourceRules:
    """Raw checkpoint names -> `Wav2Vec2ConformerModel` names; task heads and BatchNorm counters dropped with why."""
    heads = task_head_drops("Wav2Vec2Conformer") + _PRETRAINING_HEADS + (_COUNTER,)
    return family_source_rules(config, _PREFIX, heads, weight_norm_renames())


SPEC = ArchSpec(
    name="wav2vec2_conformer",
    role="encoder",
    config_class=Wav2Vec2ConformerConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_class="flax_model.wav2vec2_conformer:Wav2Vec2ConformerModule",
    torch_class="torch_reference.wav2vec2_conformer:Wav2Vec2ConformerModel",
    fixtures="scripts.fixtures_wav2vec2_conformer",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    buffers=(r".*\.batch_norm\.running_(mean|var)", r"encoder\.embed_positions\.inv_freq"),
    hf_classes=("Wav2Vec2ConformerModel", "Wav2Vec2ConformerForCTC", "Wav2Vec2ConformerForPreTraining",
                "Wav2Vec2ConformerForSequenceClassification", "Wav2Vec2ConformerForAudioFrameClassification",
                "Wav2Vec2ConformerForXVector"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
