"""Frozen configs read from Hugging Face `config.json` files, for every architecture we implement.

Each config models the fields that change the computation and refuses settings it does not implement.
Every other field of the source dict is kept verbatim, so `to_hf_dict(from_hf_dict(d)) == d`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, TypeAlias

from convert.errors import CheckpointError, UnsupportedConfig

# Activation names we implement, in both flax_model and torch_reference.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh")


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """Base class: typed fields plus the untouched source dict (`raw`) for a lossless round trip."""

    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # HF names that differ from our field names: {hf_name: field_name}.
    ALIASES: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> Self:
        """Builds the config from a parsed `config.json`; `where` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            raise UnsupportedConfig(
                f"{where}: model_type={model_type!r} is not supported here (supported: {', '.join(cls.MODEL_TYPES)})"
            )
        names = {f.name: f for f in dataclasses.fields(cls) if f.name != "raw"}
        hf_to_field = {**{n: n for n in names}, **cls.ALIASES}
        values: dict[str, Any] = {}
        for hf_name, field_name in hf_to_field.items():
            if hf_name in d and field_name in names:
                value = d[hf_name]
                if isinstance(value, list):
                    value = tuple(value)
                values[field_name] = value
        try:
            config = cls(raw=dict(d), **values)
        except TypeError as e:  # pragma: no cover - dataclass rejects an argument
            raise UnsupportedConfig(f"{where}: {e}") from None
        config.validate(where)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        return cls.from_hf_dict(read_json(path), where=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The source dict with our fields written over it; fields left at their default are not added."""
        out = dict(self.raw)
        field_to_hf = {v: k for k, v in self.ALIASES.items()}
        for f in dataclasses.fields(self):
            if f.name == "raw":
                continue
            hf_name = field_to_hf.get(f.name, f.name)
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if hf_name in out or value != default:
                out[hf_name] = list(value) if isinstance(value, tuple) else value
        out.setdefault("model_type", self.MODEL_TYPES[0])
        return out

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (the raw dict follows, so `to_hf_dict` writes the change)."""
        return dataclasses.replace(self, **changes)

    def validate(self, where: str) -> None:
        """Raises UnsupportedConfig for settings we do not implement."""

    def _refuse(self, where: str, name: str, value: Any, why: str = "is not supported") -> None:
        raise UnsupportedConfig(f"{where}: {name}={value!r} {why}")

    def _check_activation(self, where: str, name: str) -> None:
        value = getattr(self, name)
        if value not in ACTIVATIONS:
            self._refuse(where, name, value, f"is not supported (supported: {', '.join(ACTIVATIONS)})")


# ----------------------------------------------------------------------------------------------------------
# wav2vec2


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config(HFConfig):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("wav2vec2",)

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    # SpecAugment: the masked_spec_embed parameter exists when either is > 0 (training only).
    mask_time_prob: float = 0.05
    mask_feature_prob: float = 0.0
    # Dropout rates (training only).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    adapter_attn_dim: int | None = None

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
    def has_masked_spec_embed(self) -> bool:
        return self.mask_time_prob > 0 or self.mask_feature_prob > 0

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
        if self.adapter_attn_dim is not None:
            self._refuse(where, "adapter_attn_dim", self.adapter_attn_dim, "is not supported (attention adapters)")
        if self.add_adapter and self.adapter_kernel_size != 3:
            # HF pads every adapter conv by 1, which only keeps lengths consistent for kernel 3.
            self._refuse(where, "adapter_kernel_size", self.adapter_kernel_size, "is not supported (only 3)")


# ----------------------------------------------------------------------------------------------------------
# Decoders


@dataclasses.dataclass(frozen=True)
class BartConfig(HFConfig):
    """BART's decoder (HF `BartForCausalLM`); mBART is the same code with pre-norm and a final layer norm."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bart", "mbart")

    model_type: str = "bart"
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    decoder_layers: int = 12
    decoder_attention_heads: int = 16
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    init_std: float = 0.02
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None
    # fairseq leftovers that HF's BART ignores; refused when set, since the weights would not match the code.
    normalize_before: bool = False
    add_final_layer_norm: bool = False
    # Ours: BartForConditionalGeneration's final_logits_bias, kept as a bias of the LM head when non-zero.
    lm_head_bias: bool = False

    @property
    def is_mbart(self) -> bool:
        return self.model_type == "mbart"

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_layers(self) -> int:
        return self.decoder_layers

    @property
    def num_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def init_scale(self) -> float:
        return self.init_std

    @property
    def max_positions(self) -> int:
        """How many positions the learned position embedding serves."""
        return self.max_position_embeddings

    @property
    def position_offset(self) -> int:
        # BART and mBART learned positions start at index 2 (a fairseq padding convention).
        return 2

    def validate(self, where: str) -> None:
        self._check_activation(where, "activation_function")
        if self.model_type == "bart":
            if self.normalize_before:
                self._refuse(where, "normalize_before", True)
            if self.add_final_layer_norm:
                self._refuse(where, "add_final_layer_norm", True)
        if self.d_model % self.decoder_attention_heads:
            self._refuse(where, "decoder_attention_heads", self.decoder_attention_heads, "does not divide d_model")
        if self.cross_attention_hidden_size not in (None, self.d_model):
            # BART's encoder_attn k/v projections take d_model wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported for BART (must equal d_model={self.d_model} or be unset)")


@dataclasses.dataclass(frozen=True)
class GPT2Config(HFConfig):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gpt2",)
    ALIASES: ClassVar[Mapping[str, str]] = {}

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def max_positions(self) -> int:
        """How many positions the learned position embedding serves."""
        return self.n_positions

    def validate(self, where: str) -> None:
        self._check_activation(where, "activation_function")
        if self.n_embd % self.n_head:
            self._refuse(where, "n_head", self.n_head, "does not divide n_embd")
        if self.cross_attention_hidden_size not in (None, self.n_embd):
            # GPT-2's cross-attention projects keys and values from n_embd wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported for GPT-2 (must equal n_embd={self.n_embd} or be unset)")


EncoderConfig: TypeAlias = Wav2Vec2Config
DecoderConfig: TypeAlias = BartConfig | GPT2Config

ENCODER_CONFIGS: dict[str, type[HFConfig]] = {"wav2vec2": Wav2Vec2Config}
DECODER_CONFIGS: dict[str, type[HFConfig]] = {"bart": BartConfig, "mbart": BartConfig, "gpt2": GPT2Config}


def encoder_config_from_hf_dict(d: Mapping[str, Any], where: str = "config.json") -> EncoderConfig:
    return _dispatch(ENCODER_CONFIGS, d, where, "encoder")  # type: ignore[return-value]


def decoder_config_from_hf_dict(d: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    return _dispatch(DECODER_CONFIGS, d, where, "decoder")  # type: ignore[return-value]


def _dispatch(registry: Mapping[str, type[HFConfig]], d: Mapping[str, Any], where: str, role: str) -> HFConfig:
    model_type = d.get("model_type")
    if model_type not in registry:
        raise UnsupportedConfig(
            f"{where}: model_type={model_type!r} is not a supported {role} (supported: {', '.join(registry)})"
        )
    return registry[model_type].from_hf_dict(d, where)


# ----------------------------------------------------------------------------------------------------------
# The composed model


@dataclasses.dataclass(frozen=True)
class SpeechEncoderDecoderConfig(HFConfig):
    """HF's `SpeechEncoderDecoderConfig`: an encoder and a decoder config plus the generation token ids."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("speech-encoder-decoder",)

    encoder: EncoderConfig = dataclasses.field(default_factory=Wav2Vec2Config)
    decoder: DecoderConfig = dataclasses.field(default_factory=BartConfig)
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> Self:
        if d.get("model_type") not in cls.MODEL_TYPES:
            raise UnsupportedConfig(
                f"{where}: model_type={d.get('model_type')!r} is not a composed model "
                "(expected 'speech-encoder-decoder')"
            )
        for part in ("encoder", "decoder"):
            if not isinstance(d.get(part), Mapping):
                raise UnsupportedConfig(f"{where}: no '{part}' sub-config")
        encoder = encoder_config_from_hf_dict(d["encoder"], f"{where} (encoder)")
        decoder = decoder_config_from_hf_dict(d["decoder"], f"{where} (decoder)")
        return cls(
            raw=dict(d),
            encoder=encoder,
            decoder=decoder,
            decoder_start_token_id=d.get("decoder_start_token_id"),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=d.get("eos_token_id"),
            is_encoder_decoder=d.get("is_encoder_decoder", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(
            model_type="speech-encoder-decoder",
            encoder=self.encoder.to_hf_dict(),
            decoder=self.decoder.to_hf_dict(),
            decoder_start_token_id=self.decoder_start_token_id,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            is_encoder_decoder=self.is_encoder_decoder,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        return out

    @property
    def has_projection(self) -> bool:
        """HF's rule: project when widths differ and the decoder has no cross_attention_hidden_size."""
        return (
            self.encoder.encoder_output_size != self.decoder.hidden_size
            and self.decoder.cross_attention_hidden_size is None
        )


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON object, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
