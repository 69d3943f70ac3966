"""The composed model's CTC head (hybrid CTC/attention): its config section, its vocabulary, and the host-side
pieces of CTC decoding (greedy collapse, Viterbi forced alignment, word timestamps), in numpy.

The head is a linear layer over the speech encoder's output (after any adapter, before `enc_to_dec_proj`), as
transformers' `Wav2Vec2ForCTC.lm_head`. It lives beside the encoder and decoder as `ctc_head.weight` /
`ctc_head.bias` (PyTorch) and `ctc_head/kernel` / `ctc_head/bias` (Flax); its settings are the `ctc` section of
the composed `config.json`. transformers' `SpeechEncoderDecoderModel` has no such head: it loads the model and
reports the two tensors as unexpected (and keeps the `ctc` section as an unused config attribute).

The head speaks either the decoder's vocabulary (`vocabulary: "decoder"`: CTC targets are the decoder's label
tokens without their special tokens, and joint CTC/attention decoding is possible) or its own, a character
vocabulary kept from a `...ForCTC` checkpoint in `ctc_vocab.json` (Wav2Vec2CTCTokenizer's `vocab.json`; its
tokenizer settings in the section), for CTC training and CTC decoding alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.errors import ConvertError, UnsupportedConfig

CONFIG_KEY = "ctc"  # the section of the composed config.json
VOCAB_FILE = "ctc_vocab.json"  # a head's own vocabulary, beside config.json
DECODER_VOCABULARY = "decoder"
REDUCTIONS = ("mean", "sum")
# Flax and PyTorch names of the head in the composed model.
FLAX_MODULE = "ctc_head"
TORCH_MODULE = "ctc_head"
# log(0) in the prefix scores and alignments: finite, so that 0 x log(0) is 0 (a weight of 0 switches a score off
# exactly) and differences of impossible scores are not NaN (ESPnet's CTCPrefixScore uses -1e10 alike).
LOG_ZERO = -1e10


class CTCError(ConvertError):
    """A CTC head, vocabulary or transcript that cannot be used."""


@dataclasses.dataclass(frozen=True)
class CTCHeadConfig:
    """The `ctc` section of a composed `config.json`.

    Attributes:
        vocab_size: the head's outputs (blank included).
        blank_id: the blank label: transformers' `Wav2Vec2ForCTC` uses the encoder config's `pad_token_id`; a head
            over the decoder's vocabulary uses the decoder's pad token.
        loss_reduction: "mean" (each utterance's loss divided by its target length, then averaged over the batch)
            or "sum" (summed over the batch): `ctc_loss_reduction`, as `torch.nn.functional.ctc_loss`.
        zero_infinity: an utterance whose target cannot be aligned (more labels and repeats than frames) adds 0
            to the loss instead of infinity (`ctc_zero_infinity`).
        dropout: dropout on the encoder output before the head in training (`final_dropout`).
        vocabulary: "decoder" (the decoder's tokenizer and ids) or `ctc_vocab.json` (the head's own).
        word_delimiter_token, do_lower_case, unk_token, special_tokens: Wav2Vec2CTCTokenizer's settings for an
            own vocabulary (`do_lower_case`: the vocabulary is upper case, text is upper-cased on the way in and
            lower-cased on the way out).
        source: where the weights came from ("encoder": a `...ForCTC` checkpoint's `lm_head`; "initialised").
    """

    vocab_size: int
    blank_id: int
    loss_reduction: str = "mean"
    zero_infinity: bool = True
    dropout: float = 0.0
    vocabulary: str = DECODER_VOCABULARY
    word_delimiter_token: str | None = None
    do_lower_case: bool = False
    unk_token: str | None = None
    special_tokens: tuple[str, ...] = ()
    source: str = "initialised"

    @property
    def shares_decoder_vocabulary(self) -> bool:
        return self.vocabulary == DECODER_VOCABULARY

    @classmethod
    def from_dict(cls, d: Any, where: str = "config.json") -> CTCHeadConfig:
        """Reads and checks the section; every problem is one line naming `where` and the field."""
        if not isinstance(d, Mapping):
            raise UnsupportedConfig(f"{where}: {CONFIG_KEY}={json.dumps(d)[:60]} is not an object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UnsupportedConfig(f"{where}: {CONFIG_KEY}.{unknown[0]} is not a CTC head setting (known: "
                                    f"{', '.join(known)})")
        for name in ("vocab_size", "blank_id"):
            if name not in d:
                raise UnsupportedConfig(f"{where}: {CONFIG_KEY}.{name} is missing")
        values = dict(d)
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "vocab_size": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
            "blank_id": (_is_int, "an integer"),
            "loss_reduction": (lambda v: v in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}"),
            "zero_infinity": (lambda v: isinstance(v, bool), "a boolean"),
            "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
            "vocabulary": (lambda v: v in (DECODER_VOCABULARY, VOCAB_FILE), f"'{DECODER_VOCABULARY}' or '{VOCAB_FILE}'"),
            "word_delimiter_token": (lambda v: v is None or isinstance(v, str), "a string or null"),
            "do_lower_case": (lambda v: isinstance(v, bool), "a boolean"),
            "unk_token": (lambda v: v is None or isinstance(v, str), "a string or null"),
            "special_tokens": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                               "a list of strings"),
            "source": (lambda v: isinstance(v, str), "a string"),
        }
        for name, value in values.items():
            ok, what = checks[name]
            if not ok(value):
                raise UnsupportedConfig(f"{where}: {CONFIG_KEY}.{name}={json.dumps(value)[:60]} is not {what}")
        values["special_tokens"] = tuple(values.get("special_tokens", ()))
        config = cls(**values)
        if not 0 <= config.blank_id < config.vocab_size:
            raise UnsupportedConfig(f"{where}: {CONFIG_KEY}.blank_id={config.blank_id} is not a label of the head "
                                    f"(vocab_size={config.vocab_size})")
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["special_tokens"] = list(self.special_tokens)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------------
# An own (character) vocabulary, as transformers' Wav2Vec2CTCTokenizer reads and writes text


class CTCVocabulary:
    """Text <-> the ids of a head's own vocabulary (`ctc_vocab.json`, Wav2Vec2CTCTokenizer's `vocab.json`).

    Encoding: upper-cased when `do_lower_case`, spaces become the word delimiter, one token per character; a
    character the vocabulary lacks is refused (transformers maps it to the unknown token silently). Decoding:
    the blank and the special tokens are skipped, the delimiter becomes a space, and the text is lower-cased
    when `do_lower_case`.
    """

    def __init__(self, tokens: Mapping[str, int], head: CTCHeadConfig, where: str = VOCAB_FILE):
        self.ids = dict(tokens)
        self.tokens = {i: t for t, i in self.ids.items()}
        self.head = head
        self.where = where
        bad = [t for t, i in self.ids.items() if not (_is_int(i) and 0 <= i < head.vocab_size)]
        if bad:
            raise CTCError(f"{where}: token {bad[0]!r} has id {self.ids[bad[0]]!r}, not an output of the CTC head "
                           f"(vocab_size={head.vocab_size})")
        self.skipped = {head.blank_id} | {self.ids[t] for t in head.special_tokens if t in self.ids}

    @classmethod
    def read(cls, path: str | Path, head: CTCHeadConfig) -> CTCVocabulary:
        from convert.base.configs import read_json

        return cls(read_json(path), head, str(path))

    def encode(self, text: str, where: str = "text") -> list[int]:
        if self.head.do_lower_case:
            text = text.upper()
        delimiter = self.head.word_delimiter_token
        text = " ".join(text.split())
        ids = []
        for char in text:
            token = delimiter if char == " " and delimiter is not None else char
            if token not in self.ids:
                raise CTCError(f"{where}: the character {char!r} of {text!r} is not in the CTC head's vocabulary "
                               f"({self.where})")
            ids.append(self.ids[token])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if i in self.skipped or i not in self.tokens:
                continue
            token = self.tokens[i]
            pieces.append(" " if token == self.head.word_delimiter_token else token)
        text = " ".join("".join(pieces).split())
        return text.lower() if self.head.do_lower_case else text


# ----------------------------------------------------------------------------------------------------------
# Decoding on the host


def frame_seconds(frames_of: Callable[[int], int], sampling_rate: int) -> float:
    """Seconds between two encoder output frames, from `frames_of` (audio samples -> output frames): the samples a
    frame advances by (the product of the strides), over the rate."""
    long = 1 << 24
    return round(long / int(frames_of(long))) / sampling_rate


def alignment_frames(labels: Sequence[int]) -> int:
    """The fewest frames a CTC alignment of `labels` needs: one per label, one more between two equal labels."""
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))


def greedy_collapse(frame_ids: np.ndarray, length: int, blank: int) -> tuple[list[int], list[tuple[int, int]]]:
    """CTC best-path decoding of one utterance: the argmax label of each of its `length` frames, repeats merged,
    blanks removed. Returns the labels and each label's frames [start, end)."""
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    previous = None
    for t in range(length):
        label = int(frame_ids[t])
        if label != previous and label != blank:
            labels.append(label)
            spans.append((t, t + 1))
        elif label == previous and label != blank:
            spans[-1] = (spans[-1][0], t + 1)
        previous = label
    return labels, spans


def forced_align(log_probs: np.ndarray, labels: Sequence[int], blank: int) -> list[tuple[int, int]] | None:
    """The most likely CTC alignment (Viterbi) of `labels` to `log_probs` [T, V] (one utterance's real frames).

    Returns each label's frames [start, end): where it is emitted (repeats of it included), or None when the
    labels cannot be aligned to so few frames.
    """
    frames = log_probs.shape[0]
    states = [blank]
    for label in labels:
        states += [int(label), blank]
    s_count = len(states)
    emit = log_probs[:, states].astype(np.float64)  # [T, S]
    score = np.full(s_count, -np.inf)
    score[0] = emit[0, 0]
    if s_count > 1:
        score[1] = emit[0, 1]
    back = np.zeros((frames, s_count), np.int8)  # how far back the best predecessor is (0, 1 or 2)
    skip_ok = np.zeros(s_count, bool)
    for s in range(2, s_count):
        skip_ok[s] = states[s] != blank and states[s] != states[s - 2]
    for t in range(1, frames):
        stay = score
        step = np.concatenate([[-np.inf], score[:-1]])
        skip = np.where(skip_ok, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        options = np.stack([stay, step, skip])
        back[t] = np.argmax(options, axis=0)
        score = options[back[t], np.arange(s_count)] + emit[t]
    ends = [s_count - 1] + ([s_count - 2] if s_count > 1 else [])
    end = max(ends, key=lambda s: score[s])
    if not np.isfinite(score[end]) or score[end] <= LOG_ZERO / 2:
        return None
    path = [end]
    for t in range(frames - 1, 0, -1):
        path.append(path[-1] - int(back[t, path[-1]]))
    path.reverse()
    spans: list[list[int]] = [[-1, -1] for _ in labels]
    for t, s in enumerate(path):
        if s % 2 == 1:
            k = s // 2
            if spans[k][0] < 0:
                spans[k][0] = t
            spans[k][1] = t + 1
    return [(a, b) for a, b in spans]


def word_timestamps(labels: Sequence[int], spans: Sequence[tuple[int, int]], decode: Callable[[list[int]], str],
                    seconds_per_frame: float) -> list[dict[str, Any]]:
    """Words with their start and end in seconds, from each label's frames.

    A label belongs to the word that the text decoded up to and including it ends in (labels that decode to
    nothing, e.g. special tokens, belong to none): this works for word-level, BPE and character vocabularies
    alike. A word spans its labels' frames: from the first frame of its first label to the end of its last.
    """
    words = decode(list(labels)).split()
    bounds: list[list[int] | None] = [None] * len(words)
    previous = ""
    for k in range(len(labels)):
        text = decode(list(labels[:k + 1]))
        if text == previous:
            continue
        previous = text
        index = len(text.split()) - 1
        if not 0 <= index < len(words):
            continue
        start, end = spans[k]
        if bounds[index] is None:
            bounds[index] = [start, end]
        else:
            bounds[index] = [min(bounds[index][0], start), max(bounds[index][1], end)]
    out = []
    for word, bound in zip(words, bounds):
        if bound is None:
            continue
        out.append({"word": word, "start": round(bound[0] * seconds_per_frame, 3),
                    "end": round(bound[1] * seconds_per_frame, 3)})
    return out
