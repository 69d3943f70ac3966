"""wav2vec2 (HF `Wav2Vec2Model` and its task models): config, key table, source rules and spec.

Key table: HF `Wav2Vec2Model` state_dict keys <-> HF `FlaxWav2Vec2Module` param paths. Task checkpoints
(`Wav2Vec2ForCTC`, `...ForPreTraining`, `...ForSequenceClassification`, `...ForXVector`) keep the encoder under
`wav2vec2.`; their heads are dropped with the reason.

transformers' HuBERT, WavLM and data2vec-audio are "Copied from wav2vec2" with changes; what they share lives
here and is imported by their spec modules: the config base `Wav2Vec2FamilyConfig`, the key-table rows of the
shared modules (`feature_rows`, `layer_rows`, ...) and the task-head drops (`task_head_drops`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from convert.base.configs import HFConfig
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Wav2Vec2FamilyConfig(HFConfig):
    """The fields the wav2vec2 family's HF configs share: conv feature encoder, transformer, SpecAugment, dropout.

    Not registered itself. Each architecture's config adds the fields its HF config class has (layout, adapter,
    positional embedding) and answers the rest as properties, so that a field HF's class does not read (say
    `add_adapter` in a HuBERT config.json) is not read here either. The modules ask every config for
    `feat_extract_norm`, `do_stable_layer_norm`, `add_adapter`, `num_adapter_layers`, `adapter_stride`,
    `adapter_kernel_size`, `output_hidden_size` and `has_projection_layer_norm`.
    """

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim", "conv_stride",
        "conv_kernel", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "mask_time_length",
        "mask_feature_length",
    )
    PROBABILITIES: ClassVar[tuple[str, ...]] = (
        "mask_time_prob", "mask_feature_prob", "hidden_dropout", "attention_dropout", "activation_dropout",
        "feat_proj_dropout", "layerdrop",
    )
    # Whether transformers' model passes the frame mask to SpecAugment (per-utterance lengths); HuBERT does not.
    SPEC_AUGMENT_USES_LENGTHS: ClassVar[bool] = True
    # The conv feature encoder reads raw 16 kHz samples (`convert.base.configs.EncoderConfig`).
    input_kind: ClassVar[str] = "waveform"
    input_feature_size: ClassVar[int] = 1
    inputs_per_second: ClassVar[float] = 16000.0

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    # SpecAugment (training only): the masked_spec_embed parameter exists when either probability is > 0.
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    # Dropout rates and LayerDrop (training only).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1

    @property
    def encoder_output_size(self) -> int:
        """Width of the encoder output: the adapter's `output_hidden_size` when set, else `hidden_size`."""
        return self.output_hidden_size or self.hidden_size

    def output_lengths(self, lengths: Any, add_adapter: bool | None = None) -> Any:
        """Frames the conv feature encoder (and, with `add_adapter`, the adapter) makes of `lengths` samples.

        Plain integer arithmetic, so `lengths` may be an int or a numpy, jax or torch integer array.

        Args:
            lengths: sample counts, [B] or an int.
            add_adapter: count the adapter's strided convs too; defaults to `add_adapter` of the config.
        """
        add_adapter = self.add_adapter if add_adapter is None else add_adapter
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            lengths = (lengths - kernel) // stride + 1
        if add_adapter:
            # Each adapter conv has kernel 3 and padding 1, which shortens like a kernel-1 conv.
            for _ in range(self.num_adapter_layers):
                lengths = (lengths - 1) // self.adapter_stride + 1
        return lengths

    @property
    def min_input_length(self) -> int:
        """The fewest samples that make one frame (the conv feature encoder's receptive field)."""
        length = 1
        for kernel, stride in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            length = (length - 1) * stride + kernel
        return length

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def returns_attention_mask(self) -> bool:
        """HF's feature extractors pass a padding mask to layer-norm feature encoders only."""
        return self.feat_extract_norm == "layer"

    @property
    def has_masked_spec_embed(self) -> bool:
        return self.mask_time_prob > 0 or self.mask_feature_prob > 0

    @property
    def has_projection_layer_norm(self) -> bool:
        """Whether the feature projection starts with a layer norm (HuBERT may leave it out)."""
        return True

    def validate(self, where: str) -> None:
        if self.feat_extract_norm not in ("group", "layer"):
            self._refuse(where, "feat_extract_norm", self.feat_extract_norm,
                         "is not supported (supported: group, layer)")
        self._check_activation(where, "hidden_act")
        self._check_activation(where, "feat_extract_activation")
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
            self._refuse(where, "conv_dim", self.conv_dim, "must have as many entries as conv_stride and conv_kernel")
        if self.hidden_size % self.num_attention_heads:
            self._refuse(where, "num_attention_heads", self.num_attention_heads, "does not divide hidden_size")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            self._refuse(where, "num_conv_pos_embedding_groups", self.num_conv_pos_embedding_groups,
                         "does not divide hidden_size")
        if self.add_adapter and self.adapter_kernel_size != 3:
            # HF pads every adapter conv by 1, which only keeps lengths consistent for kernel 3.
            self._refuse(where, "adapter_kernel_size", self.adapter_kernel_size, "is not supported (only 3)")
        if not self.add_adapter and self.output_hidden_size not in (None, self.hidden_size):
            # Only the adapter changes the width; HF would still size enc_to_dec_proj from output_hidden_size.
            self._refuse(where, "output_hidden_size", self.output_hidden_size,
                         f"is not supported without add_adapter (the encoder outputs hidden_size={self.hidden_size})")


# The adapter's fields, in the configs that have them (wav2vec2, WavLM, data2vec-audio).
ADAPTER_POSITIVE = ("adapter_kernel_size", "adapter_stride", "num_adapter_layers", "output_hidden_size")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config(Wav2Vec2FamilyConfig):
    """HF's `Wav2Vec2Config`: the fields that change the computation (training ones included)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("wav2vec2",)
    POSITIVE: ClassVar[tuple[str, ...]] = Wav2Vec2FamilyConfig.POSITIVE + ADAPTER_POSITIVE

    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    adapter_attn_dim: int | None = None

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.adapter_attn_dim is not None:
            self._refuse(where, "adapter_attn_dim", self.adapter_attn_dim, "is not supported (attention adapters)")


# ----------------------------------------------------------------------------------------------------------
# Key table


def linear(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.LINEAR),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


def conv(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/kernel", T.CONV),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


def norm(torch_module: str, flax_module: str) -> tuple[Rule, ...]:
    return (Rule(f"{torch_module}.weight", f"{flax_module}/scale", T.NORM),
            Rule(f"{torch_module}.bias", f"{flax_module}/bias", T.IDENTITY))


LAYER = "encoder.layers.{i}"
FLAX_LAYER = "encoder/layers/{i}"

# Conv feature encoder (the norm is a GroupNorm on layer 0 only or a LayerNorm on every layer), feature
# projection and SpecAugment's mask vector.
FEATURE_ROWS = (
    *conv("feature_extractor.conv_layers.{i}.conv", "feature_extractor/conv_layers/{i}/conv"),
    *norm("feature_extractor.conv_layers.{i}.layer_norm", "feature_extractor/conv_layers/{i}/layer_norm"),
    *norm("feature_projection.layer_norm", "feature_projection/layer_norm"),
    *linear("feature_projection.projection", "feature_projection/projection"),
    Rule("masked_spec_embed", "masked_spec_embed", T.IDENTITY),
)

# The weight-normalised positional conv; HF's Flax module keeps PyTorch's [C, C/groups, K] v and [1, 1, K] g.
WEIGHT_NORM_POS_CONV_ROWS = (
    Rule("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder/pos_conv_embed/conv/weight_g",
         T.WEIGHT_NORM),
    Rule("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder/pos_conv_embed/conv/weight_v",
         T.WEIGHT_NORM),
    Rule("encoder.pos_conv_embed.conv.bias", "encoder/pos_conv_embed/conv/bias", T.IDENTITY),
)

# The encoder's layer norm and its transformer layers (attention, feed-forward, two layer norms).
LAYER_ROWS = (
    *norm("encoder.layer_norm", "encoder/layer_norm"),
    *(rule for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
      for rule in linear(f"{LAYER}.attention.{proj}", f"{FLAX_LAYER}/attention/{proj}")),
    *norm(f"{LAYER}.layer_norm", f"{FLAX_LAYER}/layer_norm"),
    *linear(f"{LAYER}.feed_forward.intermediate_dense", f"{FLAX_LAYER}/feed_forward/intermediate_dense"),
    *linear(f"{LAYER}.feed_forward.output_dense", f"{FLAX_LAYER}/feed_forward/output_dense"),
    *norm(f"{LAYER}.final_layer_norm", f"{FLAX_LAYER}/final_layer_norm"),
)

ADAPTER_ROWS = (
    *linear("adapter.proj", "adapter/proj"),
    *norm("adapter.proj_layer_norm", "adapter/proj_layer_norm"),
    *conv("adapter.layers.{i}.conv", "adapter/layers/{i}/conv"),
)

KEYMAP = KeyMap("wav2vec2", (*FEATURE_ROWS, *WEIGHT_NORM_POS_CONV_ROWS, *LAYER_ROWS, *ADAPTER_ROWS))


def task_head_drops(model: str) -> tuple[tuple[str, str], ...]:
    """Parameters of HF's task heads around a family encoder (`model` is the class prefix, e.g. "Wav2Vec2"),
    named as they are once the base-model prefix is stripped."""
    unused = "the encoder does not use it"
    return (
        (r"lm_head\.", f"CTC head of {model}ForCTC; {unused}"),
        (r"projector\.", f"classification head ({model}ForSequenceClassification/ForXVector); {unused}"),
        (r"classifier\.", (f"classification head ({model}ForSequenceClassification/ForAudioFrameClassification); "
                          f"{unused}")),
        (r"layer_weights\Z", f"weighted layer sum of a classification head; {unused}"),
        (r"tdnn\.", f"x-vector TDNN head of {model}ForXVector; {unused}"),
        (r"feature_extractor\.(weight|bias)\Z", f"x-vector projection of {model}ForXVector; {unused}"),
        (r"objective\.", f"x-vector AMSoftmax loss of {model}ForXVector; {unused}"),
    )


_PRETRAINING_HEADS = (
    (r"quantizer\.", "codebook quantizer of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_q\.", "quantizer projection of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
    (r"project_hid\.", "output projection of Wav2Vec2ForPreTraining; used only by the pre-training loss"),
)

SPEC_EMBED_UNUSED = "SpecAugment embedding (training only); this config has mask_time_prob=0 and mask_feature_prob=0"


def weight_norm_renames(prefix: str = "") -> tuple[tuple[str, str], ...]:
    """torch.nn.utils.weight_norm's spelling of the positional conv, from before parametrizations.weight_norm."""
    return (
        (rf"\A{prefix}(encoder\.pos_conv_embed\.conv)\.weight_g\Z", r"\1.parametrizations.weight.original0"),
        (rf"\A{prefix}(encoder\.pos_conv_embed\.conv)\.weight_v\Z", r"\1.parametrizations.weight.original1"),
    )


def family_source_rules(config: Wav2Vec2FamilyConfig, prefix: str, heads: tuple[tuple[str, str], ...],
                        renames: tuple[tuple[str, str], ...] = ()) -> SourceRules:
    """Raw checkpoint names -> base-model names: strip the task models' `prefix` (e.g. "hubert"), apply
    `renames`, drop `heads` and, without SpecAugment, the unused `masked_spec_embed`."""
    drops = heads
    if not config.has_masked_spec_embed:
        drops += ((rf"({prefix}\.)?masked_spec_embed\Z", SPEC_EMBED_UNUSED),)
    return SourceRules(renames=((rf"\A{prefix}\.", ""), *renames), drops=drops)


def source_rules(config: Wav2Vec2Config) -> SourceRules:
    """Raw checkpoint names -> `Wav2Vec2Model` names; task heads dropped with why."""
    return family_source_rules(config, "wav2vec2", task_head_drops("Wav2Vec2") + _PRETRAINING_HEADS,
                               weight_norm_renames())


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
        drops += ((r"(wav2vec2/)?masked_spec_embed\Z", SPEC_EMBED_UNUSED),)
    return SourceRules(renames=((r"\Awav2vec2/", ""),), drops=drops)


SPEC = ArchSpec(
    name="wav2vec2",
    role="encoder",
    config_class=Wav2Vec2Config,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    flax_class="flax_model.wav2vec2:Wav2Vec2Module",
    torch_class="torch_reference.wav2vec2:Wav2Vec2Model",
    fixtures="scripts.fixtures_wav2vec2",
    layer_stack=("num_hidden_layers", "encoder/layers/"),
    hf_classes=("Wav2Vec2Model", "Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining", "Wav2Vec2ForSequenceClassification",
                "Wav2Vec2ForAudioFrameClassification", "Wav2Vec2ForXVector"),
    ctc_head="lm_head",  # ...ForCTC's CTC head (transformers' name), kept by compose when asked
)
