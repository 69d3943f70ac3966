"""The generation config (transformers' `generation_config.json`), read, checked and resolved into the settings of
one `generate` call, shared by the Flax search, the PyTorch reference and the composer (no jax or torch here).

Where the settings come from, lowest priority first, as in transformers 5's `generate`:

1. transformers' global defaults (`GLOBAL_DEFAULTS`: at most 20 new tokens, greedy, top_k 50 when sampling, ...);
2. the model's generation config: its `generation_config.json`, else what `config.json` says
   (`GenerationConfig.from_model_config`: the top level, then the decoder's sub-config for what is still unset);
3. a `GenerationConfig`-like object passed to `generate` (its unset fields fall through to 2);
4. keyword arguments of `generate`.

`resolve_settings` turns the merged config into `GenerationSettings`: lengths counted in new tokens (the decoder's
start token is the whole prompt, so `max_length` = 1 + `max_new_tokens`), eos ids as a tuple, and every value
checked against the model (vocabulary, decoder positions). A setting of transformers' `GenerationConfig` that
this toolkit does not implement is refused by name (`GenerationConfigError`, one line) unless it holds its no-op
value; an unknown key in a `generation_config.json` is refused too, never ignored.

Deliberate differences from transformers (documented in the README's Generation section):
* token ids outside the vocabulary (eos, pad, forced, suppressed, bad words) are refused; transformers ignores
  some of them silently;
* `max_new_tokens` beyond the decoder's learned positions is refused; transformers warns and then fails inside
  the model;
* custom (unknown) entries of a `generation_config.json` are refused; transformers keeps and ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from convert.base.errors import UnsupportedConfig, UsageError

GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILE = "config.json"
# The transformers version whose semantics the settings follow (written into composed generation configs).
TRANSFORMERS_VERSION = "5.24.0"


class GenerationConfigError(UnsupportedConfig, ValueError):
    """A generation config file (or object) holds a setting that is malformed, out of range, or not implemented;
    one line naming the file and the setting."""


class GenerationArgumentError(UsageError, ValueError):
    """An argument of `generate` (or a setting the model cannot honour) is malformed, out of range, or not
    implemented; one line `name=value: why`, the parameter in `.param`."""


# Where a setting came from when no file or argument set it: transformers' global defaults.
DEFAULT = "the default"


def setting_error(where: str | None, key: str, value: Any, why: str) -> UsageError | UnsupportedConfig:
    """The error for setting `key`: about an argument (`where` None), a default (`DEFAULT`: no argument or file
    set it), or a file/object named `where`."""
    shown = _shown(value)
    if where is None:
        return GenerationArgumentError(f"{key}={shown}: {why}", param=key)
    if where == DEFAULT:
        return GenerationArgumentError(f"{key}={shown} ({DEFAULT}: no generation config or argument sets it): {why} "
                                       f"(pass {key}=...)")
    return GenerationConfigError(f"{where}: {key}={shown}: {why}")


def _where(origin: str | None) -> str:
    return "as an argument" if origin is None else f"in {origin}"


def _shown(value: Any) -> str:
    try:
        return value if isinstance(value, str) else json.dumps(to_json_value(value))
    except (TypeError, ValueError):
        return repr(value)


# transformers' `GenerationConfig._get_default_generation_params()`: what an unset field means.
GLOBAL_DEFAULTS: Mapping[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
}

# Fields of transformers' GenerationConfig that this toolkit does not implement, with the values that leave
# generation unchanged (accepted); any other value is refused by name.
NOT_IMPLEMENTED: Mapping[str, tuple[Any, ...]] = {
    "max_time": (None,),
    "stop_strings": (None,),
    "use_mtp": (None, False),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "sequence_bias": (None,),
    "token_healing": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "low_memory": (None, False),
    "penalty_alpha": (None, 0.0),
    "dola_layers": (None,),
    "diversity_penalty": (None, 0.0),
    "num_beam_groups": (None, 1),
    "constraints": (None,),
    "force_words_ids": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "output_logits": (None, False),
}

# Fields that change nothing this toolkit computes (caching, compilation, assisted decoding without an assistant,
# metadata): accepted with any value and kept for the round trip.
NO_EFFECT: tuple[str, ...] = (
    "transformers_version", "_from_model_config", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size", "continuous_batching_config",
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "assistant_ensemble_weight",
    "speculation_type",
)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The generation settings this toolkit implements, as in transformers' `generation_config.json`.

    Every field is None when unset: an unset field falls back to the next source (see the module docstring).
    `extra` keeps the accepted fields that change nothing here (metadata, cache options), for the round trip.
    `origins` records where each set field was read (a file, an object's name; None: an argument of `generate`),
    so that an error names the culprit.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    early_stopping: bool | str | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    num_return_sequences: int | None = None
    output_scores: bool | None = None
    return_dict_in_generate: bool | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    origins: Mapping[str, str | None] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = GENERATION_CONFIG_FILE) -> Self:
        """Reads a `generation_config.json` dict; unknown and not-implemented settings are refused by name."""
        if not isinstance(d, Mapping):
            raise GenerationConfigError(f"{where}: expected a JSON object")
        values, extra = {}, {}
        for key, value in d.items():
            if key in FIELDS:
                values[key] = check_value(key, value, where)
            elif key in NOT_IMPLEMENTED:
                refuse_not_implemented(key, value, where)
            elif key in NO_EFFECT:
                extra[key] = value
            else:
                raise GenerationConfigError(f"{where}: {key} is not a generation setting transformers 5 knows "
                                            f"(custom entries are not supported)")
        return cls(**values, extra=extra, origins=dict.fromkeys(values, where))

    def origin(self, name: str) -> str | None:
        """Where setting `name` was read (a file or an object's name), None for an argument, `DEFAULT` if unset."""
        if getattr(self, name) is None:
            return DEFAULT
        return self.origins.get(name, "generation_config")

    def attributed(self, where: str) -> GenerationConfig:
        """This config with `where` recorded as the origin of every set field that has none."""
        missing = {name: where for name in FIELDS if getattr(self, name) is not None and name not in self.origins}
        return dataclasses.replace(self, origins={**self.origins, **missing}) if missing else self

    @classmethod
    def from_model_config(cls, d: Mapping[str, Any], where: str = CONFIG_FILE) -> Self:
        """The generation settings a model's `config.json` holds, as transformers' `from_model_config` reads them:
        the top level's, then, for what is still unset, the decoder sub-config's (`decoder`, `generator` or
        `text_config`, the first present). Keys that are not generation settings are model settings: skipped."""
        config = cls._from_flat_model_config(d, where)
        sub = next((d[name] for name in ("decoder", "generator", "text_config") if isinstance(d.get(name), Mapping)),
                   None)
        if sub is not None:
            fallback = cls._from_flat_model_config(sub, f"{where} (decoder)")
            config = config.merged_over(fallback)
        return config

    @classmethod
    def _from_flat_model_config(cls, d: Mapping[str, Any], where: str) -> Self:
        values = {}
        for key, value in d.items():
            if value is None or key == "_from_model_config":
                continue
            if key in FIELDS:
                values[key] = check_value(key, value, where)
            elif key in NOT_IMPLEMENTED:
                refuse_not_implemented(key, value, where)
        # transformers' backward compatibility for old BART configs.
        if d.get("force_bos_token_to_be_generated") is True and "forced_bos_token_id" not in values:
            values["forced_bos_token_id"] = values.get("bos_token_id")
        return cls(**values, origins={k: where for k, v in values.items() if v is not None})

    @classmethod
    def from_object(cls, obj: Any, where: str = "generation_config") -> Self:
        """A `GenerationConfig` from one of ours, a mapping, or any object with `to_dict()` (e.g. transformers'
        GenerationConfig, whose unset fields are None)."""
        if isinstance(obj, GenerationConfig):
            return obj
        if isinstance(obj, Mapping):
            d = dict(obj)
        elif callable(getattr(obj, "to_dict", None)):
            d = {k: v for k, v in obj.to_dict().items() if not k.startswith("_") or k == "_from_model_config"}
        else:
            raise GenerationConfigError(f"{where}: {type(obj).__name__} is not a generation config (expected a "
                                        "GenerationConfig, a dict, or an object with to_dict())")
        d = {k: v for k, v in d.items() if v is not None}
        return cls.from_hf_dict(d, where)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Self:
        """The model's generation config: `generation_config.json` when the directory has one, else from
        `config.json` (what transformers' `from_pretrained` does)."""
        directory = Path(directory)
        path = directory / GENERATION_CONFIG_FILE
        if path.is_file():
            return cls.from_hf_dict(read_json_object(path), str(path))
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            return cls()
        return cls.from_model_config(read_json_object(config_path), str(config_path))

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' on-disk form: the set fields (lists for tuples) and the kept extras, keys sorted."""
        out: dict[str, Any] = dict(self.extra)
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = to_json_value(value)
        return dict(sorted(out.items()))

    def merged_over(self, base: GenerationConfig) -> GenerationConfig:
        """This config with its unset fields taken from `base`."""
        values = {name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                  for name in FIELDS}
        origins = {name: (self if getattr(self, name) is not None else base).origins[name] for name in FIELDS
                   if name in (self.origins if getattr(self, name) is not None else base.origins)}
        return GenerationConfig(**values, extra={**base.extra, **self.extra}, origins=origins)

    def updated(self, where: str | None = None, **settings: Any) -> GenerationConfig:
        """This config with `settings` (keyword arguments of `generate`; None leaves a field as it is) applied."""
        unknown = sorted(set(settings) - set(FIELDS))
        for key in unknown:
            if key in NOT_IMPLEMENTED:
                refuse_not_implemented(key, settings[key], where)
        unknown = [k for k in unknown if k not in NOT_IMPLEMENTED]
        if unknown:
            raise setting_error(where, unknown[0], settings[unknown[0]], "is not a generation setting")
        checked = {k: check_value(k, v, where) for k, v in settings.items() if k in FIELDS and v is not None}
        return dataclasses.replace(self, **checked, origins={**self.origins, **dict.fromkeys(checked, where)})

    def __repr__(self) -> str:
        return f"GenerationConfig({self.to_hf_dict()})"

    def write(self, directory: str | Path) -> Path:
        """Writes `generation_config.json` into `directory`."""
        path = Path(directory) / GENERATION_CONFIG_FILE
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return path


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationConfig)
                                if f.name not in ("extra", "origins"))

_INTS_AT_LEAST = {"max_length": 1, "max_new_tokens": 1, "min_length": 0, "min_new_tokens": 0, "num_beams": 1,
                  "top_k": 0, "no_repeat_ngram_size": 0, "num_return_sequences": 1}
_TOKEN_IDS = ("bos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id")
_TOKEN_ID_LISTS = ("eos_token_id", "forced_eos_token_id")  # an id or a list of ids
_TOKEN_TUPLES = ("suppress_tokens", "begin_suppress_tokens")
_BOOLS = ("do_sample", "output_scores", "return_dict_in_generate")


def check_value(key: str, value: Any, where: str | None) -> Any:
    """`value` checked for the type and range of setting `key` (lists become tuples); one-line error naming it
    (and the file `where`; None: an argument)."""
    def bad(why: str) -> UsageError | UnsupportedConfig:
        return setting_error(where, key, value, why)

    if key in _INTS_AT_LEAST:
        if not is_int(value) or value < _INTS_AT_LEAST[key]:
            raise bad(f"must be an integer >= {_INTS_AT_LEAST[key]}")
        return int(value)
    if key in _TOKEN_IDS:
        if not is_int(value) or value < 0:
            raise bad("must be a token id (an integer >= 0)")
        return int(value)
    if key in _TOKEN_ID_LISTS:
        if is_int(value) and value >= 0:
            return int(value)
        if is_sequence(value) and value and all(is_int(v) and v >= 0 for v in value):
            return tuple(int(v) for v in value)
        raise bad("must be a token id or a non-empty list of token ids (integers >= 0)")
    if key in _TOKEN_TUPLES:
        if is_sequence(value) and all(is_int(v) and v >= 0 for v in value):
            return tuple(int(v) for v in value)
        raise bad("must be a list of token ids (integers >= 0)")
    if key == "bad_words_ids":
        if (is_sequence(value) and value
                and all(is_sequence(s) and s and all(is_int(v) and v >= 0 for v in s) for s in value)):
            return tuple(tuple(int(v) for v in s) for s in value)
        raise bad("must be a non-empty list of non-empty lists of token ids")
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if key == "early_stopping":
        if value is True or value is False or value == "never":
            return value
        raise bad("must be true, false or \"never\"")
    if key in ("temperature", "repetition_penalty"):
        if not is_number(value) or not value > 0:
            raise bad("must be a finite number > 0")
        return float(value)
    if key == "top_p":
        if not is_number(value) or not 0.0 <= value <= 1.0:
            raise bad("must be a number in [0, 1]")
        return float(value)
    if key == "length_penalty":
        if not is_number(value):
            raise bad("must be a finite number")
        return float(value)
    raise AssertionError(f"no check for {key}")  # every field has one


def refuse_not_implemented(key: str, value: Any, where: str | None) -> None:
    if not any(value is v or (type(value) is type(v) and value == v) or (is_number(value) and is_number(v)
                                                                           and value == v)
               for v in NOT_IMPLEMENTED[key]):
        raise setting_error(where, key, value, "is not implemented by this toolkit (leave it unset)")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [to_json_value(v) for v in value]
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file's top-level object; a key given twice is refused (JSON readers silently keep the last)."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise GenerationConfigError(f"{path}: {key} is set twice ({_shown(seen[key])} and {_shown(value)}); "
                                            "keep one")
            seen[key] = value
        return seen

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerationConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------------------------------------
# The settings of one call


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The resolved settings of one `generate` call; lengths count new tokens (after the start token).

    Attributes:
        max_new_tokens: the most tokens generated after the start token (transformers' max_length - 1).
        min_new_tokens: eos is forbidden while fewer tokens have been generated (0 without eos ids).
        num_beams, do_sample, early_stopping, length_penalty, num_return_sequences: as transformers.
        decoder_start_token_id: the first decoder input.
        eos_token_ids: the end-of-sequence ids (empty: generation runs to `max_new_tokens`).
        pad_token_id: what finished rows are filled with (pad, else the first eos id); None without either.
        beam_fill_token_id: what shorter beam-search outputs are padded with (transformers' `pad or eos[0]`,
            which takes eos[0] when pad is 0, and -1 without eos ids).
        forced_bos_token_id: the first generated token, when set.
        forced_eos_token_ids: the token(s) forced at the last position allowed (`max_new_tokens`), when set.
        repetition_penalty: 1.0 is off.
        no_repeat_ngram_size: 0 is off.
        bad_words_ids: forbidden token sequences (those that are a single eos id removed, as transformers does).
        suppress_tokens, begin_suppress_tokens: None when the processor is absent.
        begin_index: the sequence length (start token included) at which `begin_suppress_tokens` apply.
        temperature, top_k, top_p: sampling warpers (1.0 / 0 / 1.0 are off); only with `do_sample`.
        min_tokens_to_keep: what top-k / top-p always keep (beam sampling keeps one more than the eos ids).
        output_scores: return each step's processed scores.
        prompt_length: the decoder prompt's tokens, the start token included (1: the start token alone; a plain
            prompt passed as `decoder_input_ids`). The processors count it as transformers does: `min_length`,
            `max_length` and the repetition, n-gram and bad-word processors see the whole sequence, `min_new_tokens`
            and `max_new_tokens` the generated tokens only.
        origins: where each setting was set (`GenerationConfig.origin`: a file or object, None for an argument,
            `DEFAULT`), so that a later refusal (`refuse`) names the culprit.
    """

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    early_stopping: bool | str
    length_penalty: float
    num_return_sequences: int
    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    beam_fill_token_id: int
    forced_bos_token_id: int | None
    forced_eos_token_ids: tuple[int, ...]
    repetition_penalty: float
    no_repeat_ngram_size: int
    bad_words_ids: tuple[tuple[int, ...], ...]
    suppress_tokens: tuple[int, ...] | None
    begin_suppress_tokens: tuple[int, ...] | None
    begin_index: int
    temperature: float
    top_k: int
    top_p: float
    min_tokens_to_keep: int
    output_scores: bool
    prompt_length: int = 1
    origins: Mapping[str, str | None] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def refuse(self, name: str, value: Any, why: str) -> UsageError | UnsupportedConfig:
        """The error about setting `name` (a caller's rule, e.g. transcription's one sequence per file), blaming
        where it was set: an argument, the file or object that set it, or the default."""
        return setting_error(self.origins.get(name, DEFAULT), name, value, why)

    @property
    def mode(self) -> str:
        """"greedy", "sample", "beam_search" or "beam_sample"."""
        if self.num_beams == 1:
            return "sample" if self.do_sample else "greedy"
        return "beam_sample" if self.do_sample else "beam_search"

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_temperature(self) -> bool:
        return self.do_sample and self.temperature != 1.0

    @property
    def uses_top_k(self) -> bool:
        return self.do_sample and self.top_k != 0

    @property
    def uses_top_p(self) -> bool:
        return self.do_sample and self.top_p < 1.0

    @property
    def beams_to_keep(self) -> int:
        """Candidates ranked per utterance and step in beam search: enough that K survive even if all eos ids
        are among them (transformers' `max(2, 1 + n_eos) * num_beams`)."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams

    @property
    def rows_per_input(self) -> int:
        """Rows of the output per input utterance."""
        return self.num_return_sequences

    @property
    def static(self) -> tuple:
        """What a compiled search depends on; length_penalty, min_new_tokens, repetition_penalty, temperature
        and top_p are passed in traced (changing their values does not compile again)."""
        return (self.max_new_tokens, self.num_beams, self.do_sample, self.early_stopping, self.num_return_sequences,
                self.decoder_start_token_id, self.eos_token_ids, self.pad_token_id, self.beam_fill_token_id,
                self.forced_bos_token_id, self.forced_eos_token_ids, self.uses_repetition_penalty,
                self.no_repeat_ngram_size, self.bad_words_ids, self.suppress_tokens, self.begin_suppress_tokens,
                self.begin_index, self.uses_temperature, self.top_k if self.uses_top_k else 0, self.uses_top_p,
                self.min_tokens_to_keep, self.output_scores, self.prompt_length)

    @property
    def traced(self) -> dict[str, float | int]:
        """The values passed to a compiled search as arguments."""
        return {"length_penalty": self.length_penalty, "min_new_tokens": self.min_new_tokens,
                "repetition_penalty": self.repetition_penalty, "temperature": self.temperature, "top_p": self.top_p}


def resolve_with_prompt(model_config: Any, model_generation: GenerationConfig | None, generation_config: Any,
                        batch: int, decoder_input_ids: Any = None, **kwargs: Any
                        ) -> tuple[GenerationSettings, np.ndarray]:
    """The settings of a `generate` call and its decoder prompt [B, P] int32 (`decoder_prompt`; [B, 1] start tokens
    without `decoder_input_ids`)."""
    settings = resolve_settings(model_config, model_generation, generation_config, **kwargs)
    if decoder_input_ids is None:
        return settings, np.full((batch, 1), settings.decoder_start_token_id, np.int32)
    prompt = decoder_prompt(decoder_input_ids, settings.decoder_start_token_id, batch, model_config.decoder.vocab_size)
    if prompt.shape[1] > 1:
        settings = resolve_settings(model_config, model_generation, generation_config, prompt_length=prompt.shape[1],
                                    **kwargs)
    return settings, prompt


def decoder_prompt(decoder_input_ids: Any, start_token_id: int, batch: int, vocab_size: int) -> np.ndarray:
    """A plain decoder prompt as transformers' encoder-decoder `generate` takes it: [B, P] (or [P], the same prompt
    for every utterance) token ids, the start token put first unless every row already begins with it.

    Raises:
        GenerationArgumentError: naming `decoder_input_ids`, for anything but non-empty integer ids of the
            vocabulary, one row per utterance.
    """
    def refuse(why: str) -> GenerationArgumentError:
        return GenerationArgumentError(f"decoder_input_ids: {why}", param="decoder_input_ids")

    try:
        ids = np.asarray(decoder_input_ids)
    except (TypeError, ValueError):
        raise refuse("is not an array of token ids (rows of equal length)") from None
    if ids.dtype.kind not in "iu":
        raise refuse(f"holds {ids.dtype} values, not integer token ids (rows of equal length)")
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (batch, ids.shape[0]))
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise refuse(f"has shape {list(ids.shape)}; expected [batch, tokens] or [tokens], not empty")
    if ids.shape[0] != batch:
        raise refuse(f"has {ids.shape[0]} rows for {batch} utterances")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise refuse(f"holds ids outside the decoder's vocabulary (vocab_size={vocab_size})")
    ids = ids.astype(np.int32)
    if np.all(ids[:, 0] != start_token_id):  # transformers prepends the start token only then
        ids = np.concatenate([np.full((batch, 1), start_token_id, np.int32), ids], axis=1)
    return ids


def model_generation_config(model: Any) -> GenerationConfig:
    """The generation config a model carries (`model.generation_config`, set by `from_pretrained`), else the one
    its config implies (transformers' `from_model_config`)."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        return GenerationConfig.from_object(config)
    return GenerationConfig.from_model_config(model.config.to_hf_dict())


def resolve_settings(model_config: Any, model_generation: GenerationConfig | None = None,
                     generation_config: Any = None, *, prompt_length: int = 1, **kwargs: Any) -> GenerationSettings:
    """The settings of one `generate` call.

    Args:
        model_config: the composed config (vocabulary, decoder positions, token ids).
        model_generation: the model's generation config (priority below `generation_config` and `kwargs`); None
            takes what the composed config implies (transformers' `from_model_config`).
        generation_config: a GenerationConfig-like object passed to `generate`, or None.
        prompt_length: the decoder prompt's tokens, the start token included (`decoder_input_ids`).
        kwargs: keyword arguments of `generate` (transformers' names); None unsets the model's value.

    Raises:
        GenerationConfigError: a setting of a file or object that is malformed, not implemented, or impossible for
            this model, naming the file (or object) and the setting.
        GenerationArgumentError: the same for an argument (or a default no file sets), naming the argument.
    """
    config = (GenerationConfig() if generation_config is None
              else GenerationConfig.from_object(generation_config).attributed("generation_config"))
    config = config.updated(**kwargs)
    if model_generation is None:
        model_generation = GenerationConfig.from_model_config(model_config.to_hf_dict(), "the model's config")
    config = config.merged_over(model_generation.attributed("the model's generation config"))
    # A keyword argument set to None unsets the model's value, as transformers' `generation_config.update` does
    # (e.g. forced_bos_token_id=None turns the processor off; num_beams=None means the global default).
    config = dataclasses.replace(config, **{k: None for k, v in kwargs.items() if v is None and k in FIELDS})

    def get(name: str) -> Any:
        value = getattr(config, name)
        return GLOBAL_DEFAULTS.get(name) if value is None else value

    vocab = model_config.decoder.vocab_size

    def refuse(name: str, value: Any, why: str) -> UsageError | UnsupportedConfig:
        """The error about setting `name`, blaming where it was set (an argument, a file, or the default)."""
        return setting_error(config.origin(name), name, value, why)

    model_origins = set(model_generation.origins.values()) | {"the model's generation config"}

    def rank(origin: str | None) -> int:
        """The priority of where a setting came from: an argument, a config passed to generate, the model's."""
        return 3 if origin is None else 1 if origin in model_origins else 2

    def set_one(*names: str) -> str:
        """The first of `names` that is set (the setting a derived value comes from), else the last."""
        return next((n for n in names if getattr(config, n) is not None), names[-1])

    # Lengths: max_length counts the decoder prompt (the start token, and a plain prompt after it).
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    elif config.max_length is None:
        max_new = GLOBAL_DEFAULTS["max_length"]  # transformers: the default max_length counts new tokens only
    else:
        max_length = config.max_length
        if max_length <= prompt_length:
            raise refuse("max_length", max_length, f"leaves no room after the decoder prompt ({prompt_length} "
                                                   "tokens with the start token; set max_new_tokens)")
        max_new = max_length - prompt_length
    positions = model_config.decoder.max_positions
    if max_new + prompt_length > positions:
        length = "max_length" if config.max_new_tokens is None and config.max_length is not None else "max_new_tokens"
        shown = max_new + prompt_length if length == "max_length" else max_new
        prompted = f" with the {prompt_length}-token prompt" if prompt_length > 1 else ""
        raise refuse(length, shown, f"needs {max_new + prompt_length} decoder positions{prompted}; the decoder has "
                                    f"{positions}")

    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    if start is None:
        raise GenerationArgumentError("decoder_start_token_id=null: no decoder_start_token_id or bos_token_id in "
                                      "the model's generation config; pass one", param="decoder_start_token_id")
    eos = config.eos_token_id
    eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    beam_fill = (pad or eos_ids[0]) if eos_ids else -1  # transformers' `pad_token_id or eos_token_id[0]`

    for name, value in ((set_one("decoder_start_token_id", "bos_token_id"), start),
                        (set_one("pad_token_id", "eos_token_id"), pad),
                        ("forced_bos_token_id", config.forced_bos_token_id)):
        if value is not None and value >= vocab:
            raise refuse(name, value, f"is not a token id of the decoder (vocab_size={vocab})")
    for name, value in (("eos_token_id", eos), ("forced_eos_token_id", config.forced_eos_token_id),
                        ("suppress_tokens", config.suppress_tokens),
                        ("begin_suppress_tokens", config.begin_suppress_tokens)):
        listed = () if value is None else ((value,) if isinstance(value, int) else value)
        if any(v >= vocab for v in listed):
            raise refuse(name, to_json_value(value), f"holds ids outside the decoder's vocabulary (vocab_size={vocab})")
    for sequence in config.bad_words_ids or ():
        if any(v >= vocab for v in sequence):
            raise refuse("bad_words_ids", list(sequence), f"holds ids outside the decoder's vocabulary "
                                                          f"(vocab_size={vocab})")

    num_beams, do_sample = get("num_beams"), get("do_sample")
    returns = get("num_return_sequences")
    if returns > 1 and num_beams == 1 and not do_sample:
        raise refuse("num_return_sequences", returns, "needs do_sample=True or num_beams > 1 (greedy search returns "
                                                      "one sequence)")
    if num_beams > 1 and returns > num_beams:
        raise refuse("num_return_sequences", returns, f"must be at most num_beams={num_beams}")
    forced_eos = config.forced_eos_token_id
    forced_eos_ids = () if forced_eos is None else ((forced_eos,) if isinstance(forced_eos, int) else forced_eos)
    if config.suppress_tokens is not None:
        for name, forced in (("forced_bos_token_id", () if config.forced_bos_token_id is None
                              else (config.forced_bos_token_id,)), ("forced_eos_token_id", forced_eos_ids)):
            if forced and set(forced) <= set(config.suppress_tokens):
                shown = _shown(forced if len(forced) > 1 else forced[0])
                why = "every token would be forbidden at the forcing step"
                # The culprit is the setting of the higher priority (it came last: an argument over a file passed
                # to generate over the model's own); the other is named with where it was set.
                forced_from, suppress_from = config.origin(name), config.origin("suppress_tokens")
                if rank(suppress_from) > rank(forced_from):
                    raise refuse("suppress_tokens", config.suppress_tokens,
                                 f"holds {name}={shown} (set {_where(forced_from)}): {why}")
                elsewhere = f" (set {_where(suppress_from)})" if suppress_from != forced_from else ""
                raise refuse(name, to_json_value(forced if len(forced) > 1 else forced[0]),
                             f"is also in suppress_tokens{elsewhere}: {why}")

    if eos_ids:
        if config.min_new_tokens is not None:
            min_new = config.min_new_tokens
        else:
            min_new = max(0, get("min_length") - prompt_length)
    else:
        min_new = 0  # transformers adds the min-length processors only with eos ids
    bad_words = []
    for sequence in config.bad_words_ids or ():
        if not (len(sequence) == 1 and sequence[0] in eos_ids) and sequence not in bad_words:
            bad_words.append(sequence)
    # transformers: begin_suppress_tokens apply at the first generated token, one later when forced_bos_token_id
    # takes it (it acts on a prompt of the start token alone).
    forced_bos = config.forced_bos_token_id if prompt_length == 1 else None
    begin_index = prompt_length + (1 if forced_bos is not None else 0)
    min_keep = (len(eos_ids) + 1 if eos_ids else 2) if num_beams > 1 else 1
    return GenerationSettings(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        num_beams=num_beams,
        do_sample=do_sample,
        early_stopping=get("early_stopping"),
        length_penalty=get("length_penalty"),
        num_return_sequences=returns,
        decoder_start_token_id=start,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        beam_fill_token_id=beam_fill,
        forced_bos_token_id=forced_bos,
        forced_eos_token_ids=tuple(forced_eos_ids),
        repetition_penalty=get("repetition_penalty"),
        no_repeat_ngram_size=get("no_repeat_ngram_size"),
        bad_words_ids=tuple(bad_words),
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        begin_index=begin_index,
        temperature=get("temperature"),
        top_k=get("top_k"),
        top_p=get("top_p"),
        min_tokens_to_keep=min_keep,
        output_scores=get("output_scores"),
        prompt_length=prompt_length,
        origins={name: config.origin(name) for name in FIELDS},
    )


# ----------------------------------------------------------------------------------------------------------
# Composition


def decoder_generation_config(directory: str | Path, decoder_config: Mapping[str, Any]) -> GenerationConfig:
    """A decoder source's generation settings: its `generation_config.json`, else its `config.json`'s."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if path.is_file():
        return GenerationConfig.from_hf_dict(read_json_object(path), str(path))
    return GenerationConfig._from_flat_model_config(decoder_config, str(Path(directory) / CONFIG_FILE))


def composed_generation_config(decoder: GenerationConfig, model_config: Any,
                               eos_token_id: int | None = None) -> GenerationConfig:
    """The composed model's generation config: the decoder's settings, with the composed config's start and pad
    ids (and its eos id where the decoder's settings have none, or when `eos_token_id` overrides it), checked
    against the composed model.

    Raises:
        GenerationConfigError: a decoder setting that does not fit the composed model.
    """
    eos = eos_token_id if eos_token_id is not None else (
        decoder.eos_token_id if decoder.eos_token_id is not None else model_config.eos_token_id)
    composed = "the composed config"
    origins = {**decoder.origins, "decoder_start_token_id": composed, "pad_token_id": composed}
    if eos_token_id is not None or decoder.eos_token_id is None:
        origins["eos_token_id"] = composed
    config = dataclasses.replace(
        decoder, decoder_start_token_id=model_config.decoder_start_token_id, pad_token_id=model_config.pad_token_id,
        eos_token_id=eos, extra={"transformers_version": TRANSFORMERS_VERSION}, origins=origins)
    resolve_settings(model_config, config)  # refuses what the composed model cannot honour
    return config
