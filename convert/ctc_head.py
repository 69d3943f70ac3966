"""What `convert.compose` does about a CTC head (hybrid CTC/attention; `convert.base.ctc` has the head itself).

* `--ctc-head auto` (the default): an encoder from a `...ForCTC` checkpoint keeps its head (`lm_head`, copied bit
  for bit) as the composed model's `ctc_head`, with its own vocabulary (the encoder's `vocab.json`, or
  `--ctc-vocab FILE`) and its config's CTC settings (`pad_token_id` as the blank, `ctc_loss_reduction`,
  `ctc_zero_infinity`, `final_dropout`). Without a vocabulary the head is dropped as before, with that reason.
  Any other encoder gets no head, or, with `--ctc-vocab FILE`, a new one over that vocabulary.
* `--ctc-head decoder`: a new head over the decoder's vocabulary (what joint CTC/attention decoding needs), blank =
  the decoder's pad token; a `...ForCTC` head is dropped with that reason.
* `--ctc-head none`: no head; a `...ForCTC` head is dropped as before.

A new head is initialised as transformers initialises `Wav2Vec2ForCTC.lm_head`: the kernel from N(0, the
encoder's `initializer_range`), the bias 0 (seeded by `--seed` and the name, as everything compose creates), with
the loss settings ESPnet's hybrid recipes use: reduction "mean" (each utterance's loss per target token, which
puts it on the scale of the decoder's per-token cross-entropy), `zero_infinity` on, no dropout before the head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from convert.base.configs import read_json
from convert.base.ctc import DECODER_VOCABULARY, VOCAB_FILE, CTCError, CTCHeadConfig, CTCVocabulary
from convert.base.errors import UsageError, bad_argument
from convert.base.keymap import Entry, T

MODES = ("auto", "decoder", "none")
# Wav2Vec2CTCTokenizer's defaults, for a vocabulary whose tokenizer_config.json does not say.
TOKENIZER_DEFAULTS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                      "word_delimiter_token": "|", "do_lower_case": False}


@dataclasses.dataclass
class CTCPlan:
    """The composed model's CTC head, decided from names, shapes and configs.

    Attributes:
        head: the `ctc` config section, or None for no head.
        kept: the source tensors that become the head (`lm_head.weight` -> `ctc_head/kernel`, ...); empty for a
            new head.
        vocabulary: token -> id, written to `ctc_vocab.json` (a head with its own vocabulary).
        note: one line saying what was done, for the summary and the report.
        drop_reason: why a `...ForCTC` head that is not kept was dropped (replaces the source rules' reason).
    """

    head: CTCHeadConfig | None
    kept: list[Entry]
    vocabulary: dict[str, int] | None
    note: str
    drop_reason: str | None = None


def check_arguments(mode: str, vocab: str | Path | None) -> None:
    """Refuses, before anything is read, a mode that does not exist or a vocabulary the mode cannot use."""
    if mode not in MODES:
        raise bad_argument("ctc_head", mode, f"is not one of {', '.join(MODES)}")
    if vocab is None:
        return
    if mode != "auto":
        raise bad_argument("ctc_vocab", vocab, f"applies to ctc_head=auto only (a head with its own vocabulary), "
                           f"not ctc_head={mode}")
    if not Path(vocab).is_file():
        raise bad_argument("ctc_vocab", vocab, "no such file (a CTC tokenizer's vocab.json)")


def plan_ctc_head(encoder: Any, config: Any, mode: str, vocab: str | Path | None) -> CTCPlan:
    """Decides the composed model's CTC head (see the module docstring).

    Args:
        encoder: compose's encoder `Source` (checkpoint, spec, config, path).
        config: the composed config (without a head yet).
        mode: "auto", "decoder" or "none".
        vocab: `--ctc-vocab`, a CTC tokenizer's `vocab.json` (its `tokenizer_config.json` beside it, if any).
    """
    keys = _head_keys(encoder)
    name = encoder.arch.ctc_head
    if mode == "none":
        reason = "CTC head of a ...ForCTC checkpoint; --ctc-head none" if keys else None
        return CTCPlan(None, [], None, "no CTC head (--ctc-head none)", reason)
    if mode == "decoder":
        if config.pad_token_id is None:
            raise UsageError("ctc_head=decoder: the composed model has no pad_token_id to use as the CTC blank; "
                             "pass pad_token_id=...", param="ctc_head")
        head = CTCHeadConfig(vocab_size=config.decoder.vocab_size, blank_id=config.pad_token_id,
                             vocabulary=DECODER_VOCABULARY, source="initialised")
        reason = ("CTC head of a ...ForCTC checkpoint; replaced by a new head over the decoder's vocabulary "
                  "(--ctc-head decoder)") if keys else None
        return CTCPlan(head, [], None, f"new CTC head over the decoder's vocabulary ({head.vocab_size} labels, "
                                       f"blank = pad id {head.blank_id})", reason)
    vocab_path = Path(vocab) if vocab is not None else encoder.path / "vocab.json"
    if keys:
        if not vocab_path.is_file():
            reason = ("CTC head of a ...ForCTC checkpoint; dropped: no vocab.json beside it (pass --ctc-vocab FILE "
                      "to keep it, or --ctc-head decoder for a new head over the decoder's vocabulary)")
            return CTCPlan(None, [], None, "no CTC head: the encoder's CTC head has no vocabulary file", reason)
        weight, bias = keys
        labels = encoder.checkpoint.info(weight).shape
        vocab_size = labels[0] if encoder.checkpoint.format != "flax" else labels[1]
        raw = encoder.checkpoint.config
        settings = _tokenizer_settings(vocab_path)
        head = _checked(vocab_path, CTCHeadConfig(
            vocab_size=int(vocab_size), blank_id=_int(raw.get("pad_token_id", 0), "pad_token_id", encoder),
            loss_reduction=raw.get("ctc_loss_reduction", "sum"),
            zero_infinity=bool(raw.get("ctc_zero_infinity", False)),
            dropout=float(raw.get("final_dropout", 0.1)), vocabulary=VOCAB_FILE, source="encoder", **settings),
            f"{encoder.path / 'config.json'} (its CTC settings)")
        linear = T.LINEAR if encoder.checkpoint.format != "flax" else T.IDENTITY
        kept = [_entry(encoder, weight, "ctc_head/kernel", linear), _entry(encoder, bias, "ctc_head/bias", T.IDENTITY)]
        return CTCPlan(head, kept, _read_tokens(vocab_path), f"CTC head kept from the encoder's {name} "
                       f"({head.vocab_size} labels, vocabulary {vocab_path.name})")
    if vocab is None:
        return CTCPlan(None, [], None, "no CTC head")
    tokens = _read_tokens(vocab_path)
    settings = _tokenizer_settings(vocab_path)
    pad = _read_json(vocab_path.parent / "tokenizer_config.json").get("pad_token", TOKENIZER_DEFAULTS["pad_token"])
    if pad not in tokens:
        raise CTCError(f"{vocab_path}: has no pad token {pad!r} to use as the CTC blank")
    head = _checked(vocab_path, CTCHeadConfig(vocab_size=max(tokens.values()) + 1, blank_id=tokens[pad],
                                              vocabulary=VOCAB_FILE, source="initialised", **settings),
                    str(vocab_path))
    return CTCPlan(head, [], tokens, f"new CTC head over {vocab_path} ({head.vocab_size} labels)")


def _head_keys(encoder: Any) -> tuple[str, str] | None:
    """The source keys of a `...ForCTC` head (weight, bias), or None."""
    name = encoder.arch.ctc_head
    if name is None:
        return None
    if encoder.checkpoint.format == "flax":
        weight, bias = f"{name}/kernel", f"{name}/bias"
    else:
        weight, bias = f"{name}.weight", f"{name}.bias"
    return (weight, bias) if weight in encoder.checkpoint and bias in encoder.checkpoint else None


def _entry(encoder: Any, key: str, target: str, transform: T) -> Entry:
    shape = tuple(encoder.checkpoint.info(key).shape)
    return Entry(key, target, transform, shape, transform.flax_shape(shape))


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _read_tokens(path: Path) -> dict[str, int]:
    tokens = _read_json(path)
    if not tokens or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in tokens.values()):
        raise CTCError(f"{path}: not a CTC vocabulary (a JSON object of token -> non-negative id)")
    return tokens


def _tokenizer_settings(vocab_path: Path) -> dict[str, Any]:
    """Wav2Vec2CTCTokenizer's settings from the `tokenizer_config.json` beside the vocabulary."""
    config = {**TOKENIZER_DEFAULTS, **{k: v for k, v in _read_json(vocab_path.parent / "tokenizer_config.json").items()
                                       if k in TOKENIZER_DEFAULTS and v is not None}}
    special = tuple(str(config[k]) for k in ("pad_token", "unk_token", "bos_token", "eos_token")
                    if isinstance(config[k], str))
    return {"word_delimiter_token": config["word_delimiter_token"], "do_lower_case": bool(config["do_lower_case"]),
            "unk_token": config["unk_token"], "special_tokens": special}


def _checked(vocab_path: Path, head: CTCHeadConfig, where: str) -> CTCHeadConfig:
    """The head, read back through the config's own checks (errors naming `where`), and its vocabulary against
    it."""
    head = CTCHeadConfig.from_dict(head.to_dict(), where)
    CTCVocabulary(_read_tokens(vocab_path), head, str(vocab_path))
    return head


def _int(value: Any, name: str, encoder: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CTCError(f"{encoder.path / 'config.json'}: {name}={value!r} is not an integer (the CTC blank)")
    return value
