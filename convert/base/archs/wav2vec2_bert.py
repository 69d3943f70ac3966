"""w2v-BERT 2.0 (HF `Wav2Vec2BertModel` and its task models): config, key table, source rules and spec.

The first encoder here that takes features instead of raw audio: `SeamlessM4TFeatureExtractor`'s log-mel frames,
pairs of 80-bin frames stacked into 160 values (`feature_projection_input_dim`), go through a feature projection
(LayerNorm + Linear) straight into conformer blocks. There is no conv feature encoder, so the encoder's input steps
are its frames: `output_lengths` is the identity without the adapter. The blocks differ from wav2vec2-conformer's:
Shaw's `relative_key` position embeddings by default (a learned embedding per query-key distance, clamped to
`left_max_position_embeddings` / `right_max_position_embeddings`; `relative`, `rotary` and none are also allowed),
a causal depthwise convolution followed by a LayerNorm (`depthwise_layer_norm`) instead of a BatchNorm, every norm
at `layer_norm_eps`, and no layer norm after the stack. An optional feed-forward (`intermediate_ffn`, ReLU, added at
half weight) may precede the adapter, whose layers each subsample by a strided conv + GLU on the residual path and
on the attention path, attend with the subsampled padding mask, and end with a feed-forward.

Task checkpoints (`Wav2Vec2BertForCTC`, `...ForSequenceClassification`, `...ForAudioFrameClassification`,
`...ForXVector`) keep the encoder under `wav2vec2_bert.`; their heads are dropped with the reason. HF never ported
the model to Flax: the Flax paths follow DESIGN.md's canonical names. transformers keeps the rotary frequencies and
the relative sinusoid table as non-persistent buffers (never in a checkpoint): both are computed from the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from convert.base.archs.wav2vec2 import family_source_rules, linear, norm, task_head_drops
from convert.base.archs.wav2vec2_conformer import check_conformer_blocks
from convert.base.configs import HFConfig
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec

POSITION_EMBEDDINGS = ("relative_key", "relative", "rotary", None)


@dataclasses.dataclass(frozen=True)
class Wav2Vec2BertConfig(HFConfig):
    """HF's `Wav2Vec2BertConfig`: the fields that change the computation (training ones included)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("wav2vec2-bert",)
    POSITIVE: ClassVar[tuple[str, ...]] = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "feature_projection_input_dim",
        "mask_time_length", "mask_feature_length", "adapter_kernel_size", "adapter_stride", "num_adapter_layers",
        "output_hidden_size", "conv_depthwise_kernel_size", "rotary_embedding_base", "max_source_positions",
    )
    PROBABILITIES: ClassVar[tuple[str, ...]] = (
        "mask_time_prob", "mask_feature_prob", "hidden_dropout", "attention_dropout", "activation_dropout",
        "feat_proj_dropout", "layerdrop", "conformer_conv_dropout",
    )
    # The encoder reads feature frames (DESIGN.md, "What the composed model asks of an encoder").
    input_kind: ClassVar[str] = "features"
    # Frames per second of 16 kHz audio with SeamlessM4TFeatureExtractor's defaults (10 ms hop, 2 frames stacked):
    # only sizes seeded inputs (verification, tests), never the extractor's arithmetic.
    inputs_per_second: ClassVar[float] = 50.0

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    feature_projection_input_dim: int = 160
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # SpecAugment (training only): masked_spec_embed exists when either probability is > 0.
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    # Dropout rates and LayerDrop (training only); transformers' defaults, which differ from wav2vec2's.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1
    conformer_conv_dropout: float = 0.1
    # The conformer blocks.
    position_embeddings_type: str | None = "relative_key"
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8
    rotary_embedding_base: int = 10000
    # Only sizes transformers' precomputed relative table; longer inputs extend it with the same values.
    max_source_positions: int = 5000
    conv_depthwise_kernel_size: int = 31
    # The adapter and the feed-forward before it.
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 1
    adapter_act: str = "relu"
    use_intermediate_ffn_before_adapter: bool = False
    output_hidden_size: int | None = None

    @property
    def input_feature_size(self) -> int:
        """F, the values per input frame (`feature_projection_input_dim`: mel bins x stacked frames)."""
        return self.feature_projection_input_dim

    @property
    def encoder_output_size(self) -> int:
        """Width of the encoder output: the adapter's `output_hidden_size` when set, else `hidden_size`."""
        return (self.output_hidden_size or self.hidden_size) if self.add_adapter else self.hidden_size

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def adapter_head_size(self) -> int:
        return self.encoder_output_size // self.num_attention_heads

    def output_lengths(self, lengths: Any, add_adapter: bool | None = None) -> Any:
        """Output frames made of `lengths` feature frames: the same number, then the adapter's subsampling.

        transformers counts each adapter conv with padding `adapter_kernel_size // 2` (the conv itself pads by
        `adapter_stride // 2`; `validate` refuses configs where the two differ). Plain integer arithmetic on ints
        or numpy, jax or torch integer arrays.
        """
        add_adapter = self.add_adapter if add_adapter is None else add_adapter
        for _ in range(self.num_adapter_layers if add_adapter else 0):
            lengths = self.subsampled_lengths(lengths)
        return lengths

    def subsampled_lengths(self, lengths: Any) -> Any:
        """Frames one adapter layer makes of `lengths` frames (transformers' count, see `output_lengths`)."""
        pad = self.adapter_kernel_size // 2
        return (lengths + 2 * pad - self.adapter_kernel_size) // self.adapter_stride + 1

    @property
    def min_input_length(self) -> int:
        """One feature frame makes one output frame (the adapter's padded convs keep at least one)."""
        return 1

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def returns_attention_mask(self) -> bool:
        return True

    @property
    def has_masked_spec_embed(self) -> bool:
        return self.mask_time_prob > 0 or self.mask_feature_prob > 0

    def validate(self, where: str) -> None:
        self._check_activation(where, "hidden_act")
        self._check_activation(where, "adapter_act")
        if self.hidden_size % self.num_attention_heads:
            self._refuse(where, "num_attention_heads", self.num_attention_heads, "does not divide hidden_size")
        for name in ("left_max_position_embeddings", "right_max_position_embeddings"):
            if getattr(self, name) < 0:
                self._refuse(where, name, getattr(self, name), "must be at least 0")
        check_conformer_blocks(self, where, POSITION_EMBEDDINGS)
        if self.use_intermediate_ffn_before_adapter and not self.add_adapter:
            self._refuse(where, "use_intermediate_ffn_before_adapter", True, "needs add_adapter (as in transformers)")
        if not self.add_adapter and self.output_hidden_size not in (None, self.hidden_size):
            # Only the adapter changes the width; transformers would still size enc_to_dec_proj from it.
            self._refuse(where, "output_hidden_size", self.output_hidden_size,
                         f"is not supported without add_adapter (the encoder outputs hidden_size={self.hidden_size})")
        if self.add_adapter:
            if self.encoder_output_size % self.num_attention_heads:
                self._refuse(where, "output_hidden_size", self.encoder_output_size,
                             f"is not divisible by num_attention_heads={self.num_attention_heads} (adapter attention)")
            if self.adapter_kernel_size // 2 != self.adapter_stride // 2:
                # The conv pads stride // 2 while transformers' lengths and masks assume kernel // 2.
                self._refuse(where, "adapter_stride", self.adapter_stride,
                             f"is not supported with adapter_kernel_size={self.adapter_kernel_size}: transformers "
                             "pads the conv by stride // 2 but counts its frames with kernel // 2")


# ----------------------------------------------------------------------------------------------------------
# Key table

LAYER = "encoder.layers.{i}"
FLAX_LAYER = "encoder/layers/{i}"
ADAPTER_LAYER = "adapter.layers.{i}"
FLAX_ADAPTER_LAYER = "adapter/layers/{i}"


def _conv(torch_module: str, flax_module: str, bias: bool = False) -> tuple[Rule, ...]:
    kernel = (Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.CONV),)
    return kernel + ((Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY),) if bias else ())


def _feed_forward(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (*linear(f"{torch_module}.intermediate_dense", f"{flax_module}/intermediate_dense"),
            *linear(f"{torch_module}.output_dense", f"{flax_module}/output_dense"))


def _attention(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return tuple(rule for proj in ("linear_q", "linear_k", "linear_v", "linear_out")
                 for rule in linear(f"{torch_module}.{proj}", f"{flax_module}/{proj}"))


_ATTN, _FLAX_ATTN = f"{LAYER}.self_attn", f"{FLAX_LAYER}/self_attn"
_CONV, _FLAX_CONV = f"{LAYER}.conv_module", f"{FLAX_LAYER}/conv_module"

# One conformer block; the position rows exist only for their position_embeddings_type.
BLOCK_ROWS = (
    *norm(f"{LAYER}.ffn1_layer_norm", f"{FLAX_LAYER}/ffn1_layer_norm"),
    *_feed_forward(f"{LAYER}.ffn1", f"{FLAX_LAYER}/ffn1"),
    *norm(f"{LAYER}.self_attn_layer_norm", f"{FLAX_LAYER}/self_attn_layer_norm"),
    *_attention(_ATTN, _FLAX_ATTN),
    Rule(f"{_ATTN}.distance_embedding.weight", f"{_FLAX_ATTN}/distance_embedding/embedding", T.EMBED),
    Rule(f"{_ATTN}.linear_pos.weight", f"{_FLAX_ATTN}/linear_pos/kernel", T.LINEAR),
    Rule(f"{_ATTN}.pos_bias_u", f"{_FLAX_ATTN}/pos_bias_u", T.IDENTITY),
    Rule(f"{_ATTN}.pos_bias_v", f"{_FLAX_ATTN}/pos_bias_v", T.IDENTITY),
    *norm(f"{_CONV}.layer_norm", f"{_FLAX_CONV}/layer_norm"),
    *_conv(f"{_CONV}.pointwise_conv1", f"{_FLAX_CONV}/pointwise_conv1"),
    *_conv(f"{_CONV}.depthwise_conv", f"{_FLAX_CONV}/depthwise_conv"),
    *norm(f"{_CONV}.depthwise_layer_norm", f"{_FLAX_CONV}/depthwise_layer_norm"),
    *_conv(f"{_CONV}.pointwise_conv2", f"{_FLAX_CONV}/pointwise_conv2"),
    *norm(f"{LAYER}.ffn2_layer_norm", f"{FLAX_LAYER}/ffn2_layer_norm"),
    *_feed_forward(f"{LAYER}.ffn2", f"{FLAX_LAYER}/ffn2"),
    *norm(f"{LAYER}.final_layer_norm", f"{FLAX_LAYER}/final_layer_norm"),
)

ADAPTER_ROWS = (
    *linear("adapter.proj", "adapter/proj"),
    *norm("adapter.proj_layer_norm", "adapter/proj_layer_norm"),
    *norm(f"{ADAPTER_LAYER}.residual_layer_norm", f"{FLAX_ADAPTER_LAYER}/residual_layer_norm"),
    *_conv(f"{ADAPTER_LAYER}.residual_conv", f"{FLAX_ADAPTER_LAYER}/residual_conv", bias=True),
    *norm(f"{ADAPTER_LAYER}.self_attn_layer_norm", f"{FLAX_ADAPTER_LAYER}/self_attn_layer_norm"),
    *_conv(f"{ADAPTER_LAYER}.self_attn_conv", f"{FLAX_ADAPTER_LAYER}/self_attn_conv", bias=True),
    *_attention(f"{ADAPTER_LAYER}.self_attn", f"{FLAX_ADAPTER_LAYER}/self_attn"),
    *norm(f"{ADAPTER_LAYER}.ffn_layer_norm", f"{FLAX_ADAPTER_LAYER}/ffn_layer_norm"),
    *_feed_forward(f"{ADAPTER_LAYER}.ffn", f"{FLAX_ADAPTER_LAYER}/ffn"),
)

KEYMAP = KeyMap("wav2vec2_bert", (
    *norm("feature_projection.layer_norm", "feature_projection/layer_norm"),
    *linear("feature_projection.projection", "feature_projection/projection"),
    Rule("masked_spec_embed", "masked_spec_embed", T.IDENTITY),
    *BLOCK_ROWS,
    *_feed_forward("intermediate_ffn", "intermediate_ffn"),
    *ADAPTER_ROWS,
))

def source_rules(config: Wav2Vec2BertConfig) -> SourceRules:
    """Raw checkpoint names -> `Wav2Vec2BertModel` names; task heads dropped with why."""
    return family_source_rules(config, "wav2vec2_bert", task_head_drops("Wav2Vec2Bert"))


SPEC = ArchSpec(
    name="wav2vec2_bert",
    role="encoder",
    config_class=Wav2Vec2BertConfig,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_class="flax_model.wav2vec2_bert:Wav2Vec2BertModule",
    torch_class="torch_reference.wav2vec2_bert:Wav2Vec2BertModel",
    fixtures="scripts.fixtures_wav2vec2_bert",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    hf_classes=("Wav2Vec2BertModel", "Wav2Vec2BertForCTC", "Wav2Vec2BertForSequenceClassification",
                "Wav2Vec2BertForAudioFrameClassification", "Wav2Vec2BertForXVector"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
