"""The composed model's config and key table: HF's `SpeechEncoderDecoderConfig` over any registered encoder and
decoder, and the composed key table (the two parts' tables one level down, plus `enc_to_dec_proj`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self

from convert.base.configs import DecoderConfig, EncoderConfig, HFConfig
from convert.base.ctc import CONFIG_KEY as CTC_KEY
from convert.base.ctc import FLAX_MODULE as CTC_FLAX
from convert.base.ctc import TORCH_MODULE as CTC_TORCH
from convert.base.ctc import CTCHeadConfig
from convert.base.errors import UnsupportedConfig
from convert.base.keymap import KeyMap, Rule, T
from convert.base.prefix import SpeechPrefixConfig, prefix_keymap
from convert.base.registry import config_from_hf_dict, spec_for

COMPOSED_MODEL_TYPE = "speech-encoder-decoder"
# Files of a composed directory besides config.json and the weights.
COMPOSE_REPORT = "compose_report.json"  # written by convert.compose; marks a directory this toolkit wrote
GENERATION_CONFIG = "generation_config.json"
# eos before pad: a pad id missing from a config is the eos id, and an error names where the value came from.
_TOKEN_IDS = ("decoder_start_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class SpeechEncoderDecoderConfig(HFConfig):
    """HF's `SpeechEncoderDecoderConfig`: an encoder and a decoder config plus the generation token ids."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = (COMPOSED_MODEL_TYPE,)

    encoder: Any = None  # EncoderConfig
    decoder: Any = None  # DecoderConfig
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    ctc: CTCHeadConfig | None = None  # the CTC head over the encoder output (hybrid CTC/attention), if any

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> Self:
        if d.get("model_type") not in cls.MODEL_TYPES:
            raise UnsupportedConfig(
                f"{where}: model_type={d.get('model_type')!r} is not a composed model "
                f"(expected {COMPOSED_MODEL_TYPE!r})"
            )
        for part in ("encoder", "decoder"):
            if not isinstance(d.get(part), Mapping):
                raise UnsupportedConfig(f"{where}: no '{part}' sub-config")
        for name in _TOKEN_IDS:
            value = d.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UnsupportedConfig(f"{where}: {name}={value!r} is not an integer or null")
        for name in ("is_encoder_decoder", "tie_word_embeddings"):
            if not isinstance(d.get(name, False), bool):
                raise UnsupportedConfig(f"{where}: {name}={d[name]!r} is not a boolean")
        config = cls(
            raw=dict(d),
            encoder=config_from_hf_dict(d["encoder"], f"{where} (encoder)", role="encoder"),
            decoder=config_from_hf_dict(d["decoder"], f"{where} (decoder)", role="decoder"),
            decoder_start_token_id=d.get("decoder_start_token_id"),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=d.get("eos_token_id"),
            is_encoder_decoder=d.get("is_encoder_decoder", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            ctc=None if d.get(CTC_KEY) is None else CTCHeadConfig.from_dict(d[CTC_KEY], where),
        )
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        vocab = self.decoder.vocab_size
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                self._refuse(where, name, value, f"is not a token id of the decoder (vocab_size={vocab})")
        if self.ctc is not None and self.ctc.shares_decoder_vocabulary and self.ctc.vocab_size != vocab:
            self._refuse(where, f"{CTC_KEY}.vocab_size", self.ctc.vocab_size,
                         f"differs from the decoder's vocab_size={vocab}, whose vocabulary the CTC head speaks")

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(
            model_type=COMPOSED_MODEL_TYPE,
            encoder=self.encoder.to_hf_dict(),
            decoder=self.decoder.to_hf_dict(),
            decoder_start_token_id=self.decoder_start_token_id,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            is_encoder_decoder=self.is_encoder_decoder,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        out.pop(CTC_KEY, None)
        if self.ctc is not None:
            out[CTC_KEY] = self.ctc.to_dict()
        return out

    @property
    def has_projection(self) -> bool:
        """HF's rule: project when widths differ and the decoder has no cross_attention_hidden_size."""
        return (
            self.encoder.encoder_output_size != self.decoder.hidden_size
            and self.decoder.cross_attention_hidden_size is None
        )

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids that are not words (decoder start, pad, eos, the decoder's bos): CTC targets over the decoder's
        vocabulary leave them out, and joint decoding scores them as CTC-neutral (eos: the end)."""
        ids = (self.decoder_start_token_id, self.pad_token_id, self.eos_token_id, self.decoder.bos_token_id)
        return frozenset(i for i in ids if i is not None)

    @property
    def encoder_config(self) -> EncoderConfig:
        return self.encoder

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.decoder


PROJECTION_KEYMAP = KeyMap("enc_to_dec_proj", (
    Rule("enc_to_dec_proj.weight", "enc_to_dec_proj/kernel", T.LINEAR),
    Rule("enc_to_dec_proj.bias", "enc_to_dec_proj/bias"),
))


# The CTC head over the encoder output (not in transformers' SpeechEncoderDecoderModel; see convert.base.ctc).
CTC_HEAD_KEYMAP = KeyMap(CTC_FLAX, (
    Rule(f"{CTC_TORCH}.weight", f"{CTC_FLAX}/kernel", T.LINEAR),
    Rule(f"{CTC_TORCH}.bias", f"{CTC_FLAX}/bias"),
))


def composed_keymap(config: SpeechEncoderDecoderConfig) -> KeyMap:
    """The composed model's table: PyTorch `SpeechEncoderDecoderModel` keys <-> HF Flax paths (plus the CTC head
    when the config has one)."""
    encoder = spec_for(config.encoder, role="encoder").keymap.prefixed("encoder.", "encoder/")
    decoder = spec_for(config.decoder, role="decoder").keymap.prefixed("decoder.", "decoder/")
    table = encoder + decoder + PROJECTION_KEYMAP
    return table + CTC_HEAD_KEYMAP if config.ctc is not None else table


def composed_tied_keys(config: SpeechEncoderDecoderConfig) -> dict[str, str]:
    """Tied PyTorch keys of the composed model: the decoder's, one level down (`decoder.`)."""
    tied = spec_for(config.decoder, role="decoder").tied_keys(config.decoder)
    return {f"decoder.{k}": f"decoder.{v}" for k, v in tied.items()}


def non_trainable_paths(config: SpeechEncoderDecoderConfig, flax_paths: Iterable[str]) -> frozenset[str]:
    """The Flax paths among `flax_paths` that transformers keeps as buffers (`ArchSpec.buffers`: a logits bias,
    BatchNorm running statistics), which training leaves unchanged."""
    keymap = keymap_for(config)
    parts = {"encoder.": spec_for(config.encoder, role="encoder"), "decoder.": spec_for(config.decoder, role="decoder")}
    found = set()
    for path in flax_paths:
        mapped = keymap.to_torch(path)
        if mapped is None:
            continue
        key = mapped[0]
        for prefix, spec in parts.items():
            if key.startswith(prefix) and spec.is_buffer(key[len(prefix):]):
                found.add(path)
    return frozenset(found)


# The composed model's named groups of parameters (`convert.finetune --train-only`), besides each part's own
# (`ArchSpec.groups`, one level down).
COMPOSED_GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": (r"encoder/.*",),
    "decoder": (r"decoder/.*",),
    "projector": (r"enc_to_dec_proj/.*", r"projector/.*"),  # the cross-attention mode's; the prefix mode's
}


def train_groups(config: SpeechEncoderDecoderConfig) -> dict[str, tuple[str, ...]]:
    """Group name -> regexes of the composed model's Flax paths (whole-path matches): `encoder`, `decoder`,
    `projector` (`enc_to_dec_proj`, which exists only when the widths differ; the prefix composition's projector)
    and the parts' own groups (a decoder's `cross-attention`). `config`: either composition's."""
    groups = dict(COMPOSED_GROUPS)
    for part in ("encoder", "decoder"):
        for name, regexes in spec_for(getattr(config, part), role=part).groups:
            groups[name] = groups.get(name, ()) + tuple(f"{part}/{regex}" for regex in regexes)
    return groups


def group_predicate(groups: Mapping[str, tuple[str, ...]], names: Iterable[str], param: str = "train_only"):
    """Path -> whether the `/`-joined Flax path belongs to one of the named groups.

    Raises:
        UsageError: a name that is not a group (the message lists the groups there are).
    """
    from convert.base.errors import bad_argument

    names = tuple(names)
    unknown = [n for n in names if n not in groups]
    if unknown or not names:
        raise bad_argument(param, ",".join(names), f"{', '.join(unknown) or 'no group'}: not a group of this model "
                           f"(groups: {', '.join(sorted(groups))})")
    patterns = [re.compile(regex) for n in names for regex in groups[n]]
    return lambda path: any(p.fullmatch(path) for p in patterns)


def stores_in_out(config: SpeechEncoderDecoderConfig):
    """PyTorch key -> whether that linear weight of the composed model is stored (in, out) (`ArchSpec.fan_in_fan_out`,
    one level down)."""
    parts = {f"{part}.": spec_for(getattr(config, part), role=part) for part in ("encoder", "decoder")}

    def stored_in_out(key: str) -> bool:
        return any(key.startswith(prefix) and spec.stores_in_out(key[len(prefix):]) for prefix, spec in parts.items())

    return stored_in_out


def keymap_for(config: HFConfig) -> KeyMap:
    """The key table of a composed (either mode) or single-architecture config."""
    if isinstance(config, SpeechEncoderDecoderConfig):
        return composed_keymap(config)
    if isinstance(config, SpeechPrefixConfig):
        return prefix_keymap(config)
    return spec_for(config).keymap


def tied_keys_for(config: HFConfig) -> dict[str, str]:
    if isinstance(config, SpeechEncoderDecoderConfig):
        return composed_tied_keys(config)
    return spec_for(config).tied_keys(config)


def read_any_config(d: Mapping[str, Any], where: str = "config.json") -> HFConfig:
    """The typed config of a composed or single-architecture `config.json`."""
    if d.get("model_type") == COMPOSED_MODEL_TYPE:
        return SpeechEncoderDecoderConfig.from_hf_dict(d, where)
    return config_from_hf_dict(d, where)
