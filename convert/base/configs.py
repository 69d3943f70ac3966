"""The base of every config read from a Hugging Face `config.json`, and the protocols the composed model needs.

An architecture's config (in `convert/base/archs/<name>.py`) is a frozen dataclass deriving from `HFConfig`: it
models the fields that change the computation, checks their types and ranges, refuses settings it does not
implement, and keeps every other field of the source dict verbatim, so that `to_hf_dict(from_hf_dict(d)) == d`.

`EncoderConfig` and `DecoderConfig` are what the composed model, the composer, generation and training may ask
of an architecture's config; no shared code asks which architecture it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np

from convert.base.errors import CheckpointError, UnsupportedConfig

# The largest size or count a config may give (int32, the models' integer type).
MAX_SIZE = 2**31 - 1

# Activation names we implement, in both flax_model and torch_reference.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh")


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """Base class: typed fields plus the untouched source dict (`raw`) for a lossless round trip.

    Subclasses list their `model_type`s, HF names that differ from field names (`ALIASES`), fields that must be
    at least 1 (`POSITIVE`) and probabilities that must lie in [0, 1] (`PROBABILITIES`). Every field's value is
    checked against its annotation when read, so that a `null` or a string where a number belongs is a one-line
    error naming the field rather than a failure deep inside a model.
    """

    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # HF names that differ from our field names: {hf_name: field_name}.
    ALIASES: ClassVar[Mapping[str, str]] = {}
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    PROBABILITIES: ClassVar[tuple[str, ...]] = ()

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
        hints = _field_types(cls)
        values: dict[str, Any] = {}
        for hf_name, field_name in hf_to_field.items():
            if hf_name in d and field_name in names:
                value = _checked(d[hf_name], hints[field_name], where, hf_name)
                if isinstance(value, list):
                    value = tuple(value)
                values[field_name] = value
        config = cls(raw=dict(d), **values)
        config._check_ranges(where)
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
        """Raises UnsupportedConfig for settings we do not implement (subclasses add their rules)."""

    def _check_ranges(self, where: str) -> None:
        field_to_hf = {v: k for k, v in self.ALIASES.items()}
        for name in self.POSITIVE:
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if value is not None and any(v < 1 for v in values):
                self._refuse(where, field_to_hf.get(name, name), value, "must be at least 1")
            if value is not None and any(v > MAX_SIZE for v in values):
                # Sizes and token ids are int32 in the models (JAX's default integer): a larger one cannot be built.
                self._refuse(where, field_to_hf.get(name, name), value, f"must be at most {MAX_SIZE} (2**31 - 1)")
        for name in self.PROBABILITIES:
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                self._refuse(where, field_to_hf.get(name, name), value, "must be a probability in [0, 1]")

    def _refuse(self, where: str, name: str, value: Any, why: str = "is not supported") -> None:
        raise UnsupportedConfig(f"{where}: {name}={value!r} {why}")

    def _check_activation(self, where: str, name: str) -> None:
        value = getattr(self, name)
        if value not in ACTIVATIONS:
            self._refuse(where, name, value, f"is not supported (supported: {', '.join(ACTIVATIONS)})")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(value: Any, hint: Any, where: str, name: str) -> Any:
    """`value` if it fits the annotation `hint` (int, float, bool, str, tuple[X, ...], X | None, Any)."""
    if _fits(value, hint):
        return value
    raise UnsupportedConfig(f"{where}: {name}={json.dumps(value)[:60]} is not {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    names = {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, str(hint))


# ----------------------------------------------------------------------------------------------------------
# What the composed model needs of its parts


@runtime_checkable
class EncoderConfig(Protocol):
    """A speech encoder's config, as the composed model, compose, generation and training use it.

    The encoder's input is either a raw waveform, `[B, N]` samples (`input_kind` "waveform": the wav2vec2 family's
    conv feature encoder), or feature frames, `[B, S, F]` (`input_kind` "features": w2v-BERT's stacked log-mel
    frames, F = `input_feature_size`). Its attention mask `[B, N]` / `[B, S]` counts the same input steps, and
    `output_lengths` and `min_input_length` are in those steps; the feature extractor (`convert.base.audio`) turns
    audio into them.

    Attributes:
        input_kind: "waveform" or "features".
        input_feature_size: F, the values per input frame of a feature encoder (1 for a waveform).
        inputs_per_second: input steps per second of 16 kHz audio (nominal; sizes seeded inputs only).
        encoder_output_size: the width D of the encoder's output (after any adapter).
        min_input_length: the fewest input steps (samples or frames) that make one output frame.
        init_scale: standard deviation of the encoder's weight initialiser.
        returns_attention_mask: whether HF's feature extractor passes a padding mask to this encoder by default
            (group-norm feature encoders are run without one: HF normalises padded rows whole instead).
    """

    input_kind: str
    input_feature_size: int
    inputs_per_second: float
    encoder_output_size: int
    min_input_length: int
    init_scale: float
    returns_attention_mask: bool

    def output_lengths(self, lengths: Any, add_adapter: bool | None = None) -> Any:
        """Output frames made of `lengths` input steps (int or integer array), including any adapter."""


INPUT_KINDS = ("waveform", "features")


def encoder_input_shape(config: EncoderConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of `batch` encoder inputs of `length` steps: [B, N] samples or [B, S, F] feature frames."""
    if config.input_kind == "waveform":
        return (batch, length)
    return (batch, length, config.input_feature_size)


def seeded_encoder_inputs(config: EncoderConfig, lengths: Any, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch of standard-normal encoder inputs (zeros where padded) and its attention mask.

    Args:
        config: the encoder config (its input kind decides the shape).
        lengths: each row's length in input steps; the batch is as long as the longest.
        rng: a `numpy.random.Generator`.

    Returns:
        (inputs [B, N] or [B, S, F] float32, attention_mask [B, N|S] int32).
    """
    shape = encoder_input_shape(config, len(lengths), max(lengths))
    inputs = np.zeros(shape, np.float32)
    mask = np.zeros(shape[:2], np.int32)
    for row, length in enumerate(lengths):
        inputs[row, :length] = rng.standard_normal((length, *shape[2:]))
        mask[row, :length] = 1
    return inputs, mask


@runtime_checkable
class DecoderConfig(Protocol):
    """A text decoder's config, as the composed model, compose, generation and training use it.

    Attributes:
        hidden_size: the decoder's width (the width cross-attention takes unless `cross_attention_hidden_size`).
        num_layers, num_heads: the layer stack's depth and attention heads.
        max_positions: how many positions the decoder can describe (learned position embeddings).
        vocab_size: the LM head's width.
        init_scale: standard deviation of the weight initialiser (used for what the composer creates).
        cross_attention_hidden_size: the encoder width cross-attention accepts, or None for `hidden_size`.
        has_cross_attention: whether this config's model has cross-attention weights (a plain language model
            may not; `as_cross_attending_decoder()` adds them).
        decoder_start_token_id, bos_token_id, eos_token_id, pad_token_id: token ids from the decoder's config.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    vocab_size: int
    init_scale: float
    cross_attention_hidden_size: int | None
    has_cross_attention: bool
    decoder_start_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def as_cross_attending_decoder(self) -> DecoderConfig:
        """The same decoder configured with cross-attention (`is_decoder`, `add_cross_attention`)."""

    def decoder_core(self) -> Any:
        """What the decoder computes, as a `convert.base.decoder_core.DecoderCore`; the config class's `LAYOUT`
        (a `convert.base.decoder_layout.DecoderLayout`) says where its parameters sit. The models of both
        frameworks are built from these two alone."""


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON object, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _refuse_constant(name: str) -> Any:
    # json accepts NaN and Infinity, which no HF config holds and which would flow silently into a model.
    raise ValueError(f"{name} is not a number JSON allows")
