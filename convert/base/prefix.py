"""The prefix composition (SLAM-ASR style): speech encoder -> frame stacking -> projector -> a decoder-only LM that
reads the projected audio where the prompt's `{audio}` stands. Its config, key table, prompt and directory layout.

    speech encoder [B, S, E] --stack K frames--> [B, S // K, K E] --projector--> [B, S // K, D]
    prompt "Transcribe: {audio}" -> [ids before] [audio embeddings] [ids after], then the transcript's tokens

The projector is `linear` (one Linear) or `mlp` (Linear, activation, Linear; SLAM-ASR's `EncoderProjectorConcat`
and Voxtral's projector are of this kind). Frames are stacked as SLAM-LLM does: K consecutive frames concatenated
into one vector (frame t's features first), the last `S mod K` frames dropped; an utterance of n real frames gives
n // K audio embeddings.

A composed directory (`convert.compose --mode prefix`):

    config.json          model_type "speech-prefix-lm": the projector and prompt fields, the token ids, and the
                         encoder's and decoder's configs (copies of the parts' own config.json)
    encoder/             the encoder in its own format (config.json, model.safetensors, flax_model.msgpack,
                         preprocessor_config.json): transformers loads it as `...Model`
    decoder/             the decoder likewise (its tokenizer and generation config too): `...ForCausalLM`
    projector.safetensors  the projector's weights, PyTorch names and layouts (`projector.linear_1.weight`, ...)

The prompt is tokenised once, when composing, with the decoder's tokenizer: each text piece on its own without
special tokens, the decoder's BOS first when its tokenizer adds one; the ids are stored in the config, so running
the model needs no tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from convert.base.configs import HFConfig
from convert.base.errors import CheckpointError, ConvertError, UnsupportedConfig, bad_argument
from convert.base.keymap import KeyMap, Rule, T
from convert.base.registry import config_from_hf_dict, spec_for

PREFIX_MODEL_TYPE = "speech-prefix-lm"
AUDIO_PLACEHOLDER = "{audio}"
PROJECTOR_TYPES = ("linear", "mlp")
PROJECTOR_ACTIVATIONS = ("gelu", "relu")
PROJECTOR_FILE = "projector.safetensors"
PARTS = ("encoder", "decoder")
# SLAM-LLM's ASR instruction, placed after the audio as SLAM-LLM places it.
DEFAULT_PROMPT = "{audio}Transcribe speech to text. "
# SLAM-ASR stacks 5 frames of a 50 Hz encoder (10 Hz into the LLM).
DEFAULT_STACK_FRAMES = 5
# The batch layout: each row's prefix is padded on the left, so that every row's text starts at the same column
# (batched generation appends one column for all rows); the transcript is padded on the right.
PADDING_SIDE = "left"


def split_prompt(prompt: str, param: str = "prompt") -> tuple[str, str]:
    """The text before and after the one `{audio}` of a prompt template (`{{` and `}}` stand for braces).

    Raises:
        UsageError: no `{audio}`, more than one, or another `{...}` field.
    """
    if not isinstance(prompt, str):
        raise bad_argument(param, prompt, "must be a string with {audio} in it")
    pieces = prompt.replace("{{", "\0").replace("}}", "\1").split(AUDIO_PLACEHOLDER)
    if len(pieces) != 2:
        raise bad_argument(param, repr(prompt), f"must hold {AUDIO_PLACEHOLDER} exactly once "
                           f"(found {len(pieces) - 1})")
    if any("{" in p or "}" in p for p in pieces):
        raise bad_argument(param, repr(prompt), f"holds a field other than {AUDIO_PLACEHOLDER} (write {{{{ and }}}} "
                           "for literal braces)")
    before, after = (p.replace("\0", "{").replace("\1", "}") for p in pieces)
    return before, after


def tokenize_prompt(prompt: str, encode: Callable[[str, bool], list[int]], bos_token_id: int | None
                    ) -> tuple[list[int], list[int]]:
    """The ids before and after the audio.

    Args:
        prompt: the template.
        encode: (text, add_special_tokens) -> ids (the decoder's tokenizer).
        bos_token_id: the decoder's BOS; put first when the tokenizer adds it to a text of its own (Llama's
            tokenizers do, GPT-2's does not).
    """
    before, after = split_prompt(prompt)
    adds_bos = bos_token_id is not None and encode("a", True)[:1] == [bos_token_id]
    return ([bos_token_id] if adds_bos else []) + (encode(before, False) if before else []), (
        encode(after, False) if after else [])


@dataclasses.dataclass(frozen=True)
class SpeechPrefixConfig(HFConfig):
    """The prefix composition's config.json.

    Attributes:
        encoder, decoder: the parts' configs (an `EncoderConfig`, a decoder-only `DecoderConfig`).
        projector_type: "linear" or "mlp".
        stack_frames: K, encoder frames stacked into one projector input.
        projector_hidden_size: the mlp's inner width (default: the decoder's width).
        projector_activation: the mlp's activation ("gelu" or "relu").
        prompt: the template, with `{audio}` once.
        prompt_ids_before, prompt_ids_after: its tokenised pieces (see the module docstring).
        eos_token_id: ends a transcript (labels end with it; generation stops at it).
        pad_token_id: fills padded positions (never attended to; the decoder's pad, else its eos).
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = (PREFIX_MODEL_TYPE,)
    POSITIVE: ClassVar[tuple[str, ...]] = ("stack_frames", "projector_hidden_size")

    encoder: Any = None
    decoder: Any = None
    projector_type: str = "linear"
    stack_frames: int = DEFAULT_STACK_FRAMES
    projector_hidden_size: int | None = None
    projector_activation: str = "gelu"
    prompt: str = DEFAULT_PROMPT
    prompt_ids_before: tuple[int, ...] = ()
    prompt_ids_after: tuple[int, ...] = ()
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> Self:
        if d.get("model_type") != PREFIX_MODEL_TYPE:
            raise UnsupportedConfig(f"{where}: model_type={d.get('model_type')!r} is not a prefix composition "
                                    f"(expected {PREFIX_MODEL_TYPE!r})")
        for part in PARTS:
            if not isinstance(d.get(part), Mapping):
                raise UnsupportedConfig(f"{where}: no '{part}' sub-config")
        own = {k: v for k, v in d.items() if k not in PARTS}
        config = super().from_hf_dict(own, where)
        return dataclasses.replace(
            config, raw=dict(d),
            encoder=config_from_hf_dict(d["encoder"], f"{where} (encoder)", role="encoder"),
            decoder=config_from_hf_dict(d["decoder"], f"{where} (decoder)", role="decoder"))

    def validate(self, where: str) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            self._refuse(where, "projector_type", self.projector_type, f"is not one of {', '.join(PROJECTOR_TYPES)}")
        if self.projector_activation not in PROJECTOR_ACTIVATIONS:
            self._refuse(where, "projector_activation", self.projector_activation,
                         f"is not one of {', '.join(PROJECTOR_ACTIVATIONS)}")
        try:
            split_prompt(self.prompt)
        except ConvertError as e:  # the argument's message, as the config file's
            raise UnsupportedConfig(f"{where}: {e}") from None

    def check_token_ids(self, where: str) -> None:
        """Every stored token id lies in the decoder's vocabulary."""
        vocab = self.decoder.vocab_size
        for name in ("prompt_ids_before", "prompt_ids_after"):
            bad = [i for i in getattr(self, name) if not 0 <= i < vocab]
            if bad:
                self._refuse(where, name, bad[0], f"is not a token id of the decoder (vocab_size={vocab})")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                self._refuse(where, name, value, f"is not a token id of the decoder (vocab_size={vocab})")

    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in super().to_hf_dict().items() if k not in PARTS}
        out.update(model_type=PREFIX_MODEL_TYPE, projector_type=self.projector_type, stack_frames=self.stack_frames,
                   projector_hidden_size=self.projector_hidden_size,
                   projector_activation=self.projector_activation, prompt=self.prompt,
                   prompt_ids_before=list(self.prompt_ids_before), prompt_ids_after=list(self.prompt_ids_after),
                   eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, padding_side=PADDING_SIDE,
                   encoder=self.encoder.to_hf_dict(), decoder=self.decoder.to_hf_dict())
        return out

    @property
    def ctc(self) -> None:
        """A prefix composition has no CTC head (what transcription asks of every composed config)."""
        return None

    @property
    def projector_input_size(self) -> int:
        return self.stack_frames * self.encoder.encoder_output_size

    @property
    def projector_inner_size(self) -> int:
        return self.projector_hidden_size or self.decoder.hidden_size

    def audio_lengths(self, frames: Any) -> Any:
        """Audio embeddings of utterances with `frames` encoder frames (ints or arrays): frames // K."""
        return frames // self.stack_frames

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids_before) + len(self.prompt_ids_after)


def prefix_generation_config(generation: Any, config: SpeechPrefixConfig) -> Any:
    """The LM's generation config for the prefix model: its eos (else the config's), and a start token (the LM's
    decoder start or bos, else the pad token) that only stands first in the returned sequences as a placeholder:
    the first step reads the prefix's last column instead."""
    changes = {}
    if generation.decoder_start_token_id is None and generation.bos_token_id is None:
        changes["decoder_start_token_id"] = config.pad_token_id
    if generation.eos_token_id is None:
        changes["eos_token_id"] = config.eos_token_id
    return dataclasses.replace(generation, **changes) if changes else generation


def projector_keymap(config: SpeechPrefixConfig) -> KeyMap:
    """The projector's PyTorch names (Voxtral's spelling, `projector.` in front) <-> Flax paths."""
    layers = ("linear_1",) if config.projector_type == "linear" else ("linear_1", "linear_2")
    return KeyMap("projector", tuple(
        rule for layer in layers for rule in (Rule(f"projector.{layer}.weight", f"projector/{layer}/kernel", T.LINEAR),
                                              Rule(f"projector.{layer}.bias", f"projector/{layer}/bias"))))


def projector_shapes(config: SpeechPrefixConfig) -> dict[str, tuple[int, ...]]:
    """The projector's Flax leaves and shapes (kernels [in, out])."""
    if config.projector_type == "linear":
        return {"projector/linear_1/kernel": (config.projector_input_size, config.decoder.hidden_size),
                "projector/linear_1/bias": (config.decoder.hidden_size,)}
    inner = config.projector_inner_size
    return {"projector/linear_1/kernel": (config.projector_input_size, inner), "projector/linear_1/bias": (inner,),
            "projector/linear_2/kernel": (inner, config.decoder.hidden_size),
            "projector/linear_2/bias": (config.decoder.hidden_size,)}


def prefix_keymap(config: SpeechPrefixConfig) -> KeyMap:
    """The whole model's table: each part's own table one level down (`encoder.`, `decoder.`), and the
    projector's. (On disk each part keeps its own names, in its own directory.)"""
    encoder = spec_for(config.encoder, role="encoder").keymap.prefixed("encoder.", "encoder/")
    decoder = spec_for(config.decoder, role="decoder").keymap.prefixed("decoder.", "decoder/")
    return encoder + decoder + projector_keymap(config)


def prefix_tied_keys(config: SpeechPrefixConfig) -> dict[str, str]:
    tied = spec_for(config.decoder, role="decoder").tied_keys(config.decoder)
    return {f"decoder.{k}": f"decoder.{v}" for k, v in tied.items()}


def read_prefix_config(directory: str | Path) -> SpeechPrefixConfig:
    """The config of a prefix-composed directory, checked against the parts' own config.json files.

    Raises:
        CheckpointError / UnsupportedConfig: a missing or unreadable file, or a part whose config.json differs
            from the copy in the top config.json.
    """
    directory = Path(directory)
    path = directory / "config.json"
    d = _read_json(path)
    config = SpeechPrefixConfig.from_hf_dict(d, str(path))
    config.check_token_ids(str(path))
    for part in PARTS:
        own = _read_json(directory / part / "config.json")
        if own != d[part]:
            differ = sorted(k for k in set(own) | set(d[part]) if own.get(k) != d[part].get(k))
            raise CheckpointError(f"{directory / part / 'config.json'}: differs from config.json's '{part}' "
                                  f"(fields: {', '.join(differ[:5])})")
    return config


def is_prefix_directory(directory: str | Path) -> bool:
    """Whether `directory/config.json` names the prefix composition (anything unreadable: False)."""
    try:
        return _read_json(Path(directory) / "config.json").get("model_type") == PREFIX_MODEL_TYPE
    except (CheckpointError, AttributeError):
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def not_prefix_model_file(name: str) -> bool:
    """Whether an entry of a prefix directory is not the model's own (what `save_pretrained(overwrite=True)` keeps:
    the model card, reports, anything else at the top level)."""
    return name not in ("config.json", PROJECTOR_FILE, *PARTS)


def part_directories(directory: str | Path) -> dict[str, Path]:
    return {part: Path(directory) / part for part in PARTS}


def files_directory(directory: str | Path, part: str) -> Path:
    """Where a model directory keeps a part's files (the decoder's tokenizer, the encoder's preprocessor config):
    the part's own directory in a prefix composition, the directory itself in a composed (cross-attention) one."""
    return Path(directory) / part if is_prefix_directory(directory) else Path(directory)


def concat_leaves(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Flat leaves of the whole model from each part's own flat leaves (`encoder/...`, `decoder/...`, the
    projector's paths as they are)."""
    out: dict[str, Any] = {}
    for part, leaves in parts.items():
        out.update(leaves if part == "projector" else {f"{part}/{k}": v for k, v in leaves.items()})
    return out


def split_leaves(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of `concat_leaves`: each part's own paths, and the projector's."""
    out: dict[str, dict[str, Any]] = {"encoder": {}, "decoder": {}, "projector": {}}
    for path, value in flat.items():
        head, _, rest = path.partition("/")
        if head == "projector":
            out["projector"][path] = value
        elif head in PARTS:
            out[head][rest] = value
        else:
            raise KeyError(f"{path}: not a leaf of a prefix composition")
    return out


__all__: Sequence[str] = (
    "AUDIO_PLACEHOLDER", "DEFAULT_PROMPT", "DEFAULT_STACK_FRAMES", "PADDING_SIDE", "PREFIX_MODEL_TYPE",
    "PROJECTOR_FILE", "PROJECTOR_TYPES", "SpeechPrefixConfig", "concat_leaves", "is_prefix_directory",
    "part_directories", "prefix_keymap", "prefix_tied_keys", "projector_keymap", "projector_shapes",
    "not_prefix_model_file", "read_prefix_config", "split_leaves", "split_prompt", "tokenize_prompt",
)
