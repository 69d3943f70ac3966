"""Training data for fine-tuning: JSON-lines manifests, label tokenisation, and padded batches of few shapes.

A manifest line is `{"audio": PATH, "text": TRANSCRIPT}`; a relative PATH is relative to the manifest's directory.
Text becomes labels through the decoder's `tokenizer.json` (the `tokenizers` package), as transformers' speech
recognition examples make them: the tokenizer's ids with its special tokens, the decoder start token dropped when
the tokenizer puts it first (the model adds it when it shifts the labels), and the end-of-sequence token appended
when the tokenizer does not add one (so that generation learns to stop). Audio is read with `convert.base.audio`
(resampled to the model's rate) and normalised as the feature extractor does; batches group utterances of
similar length (`convert.base.batching`) and pad audio and labels to a few bucket lengths, so that a compiled train
step sees a few shapes. Padded label positions hold -100.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.audio import AudioBytes, FeatureExtractorConfig, audio_seconds, load_audio, prepare_batch
from convert.base.batching import Batch
from convert.base.errors import ConvertError
from convert.base.prefix import SpeechPrefixConfig
from convert.base.tokenizer_file import TOKENIZER_FILE, read_tokenizer
from convert.base.unicode_text import not_unicode

IGNORE_INDEX = -100


class DataError(ConvertError):
    """A manifest line, transcript or tokenizer that training cannot use."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One utterance of a manifest or dataset: its audio file (or its bytes, from a dataset), transcript, and where
    it was read (`file:line`, `dataset[split]:row`)."""

    audio: Path | AudioBytes
    text: str
    where: str


def read_examples(source: Any) -> list[Example]:
    """A manifest's examples, or a `convert.datasets_source.DatasetSource`'s rows."""
    from convert.datasets_source import DatasetSource, read_rows

    if isinstance(source, DatasetSource):
        return [Example(row.audio, row.text, row.where) for row in read_rows(source)]
    return read_manifest(source)


def read_manifest(path: str | Path) -> list[Example]:
    """Reads a JSON-lines manifest; blank lines are skipped.

    Raises:
        DataError: `FILE:LINE: what is wrong` for a missing file, bad JSON, a missing or non-string field, an
            audio file that does not exist, or a manifest without examples.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    examples = []
    try:
        # JSON lines end at "\n" only: str.splitlines would also split at characters a JSON string may hold
        # (U+2028, form feed, ...), which json.dumps(ensure_ascii=False) writes as they are.
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: not a JSON object (nested too deeply)") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: not a JSON object")
        for field in ("audio", "text"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise DataError(f"{where}: '{field}' must be a non-empty string")
            problem = not_unicode(item[field])
            if problem:
                raise DataError(f"{where}: '{field}' {problem}")
        audio = Path(item["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        if audio.is_dir():
            raise DataError(f"{where}: audio {audio}: is a directory, not an audio file")
        if not audio.is_file():
            raise DataError(f"{where}: audio {audio}: no such file")
        examples.append(Example(audio, item["text"], where))
    if not examples:
        raise DataError(f"{path}: the manifest holds no examples")
    return examples


class LabelTokenizer:
    """Text <-> label ids with the decoder's `tokenizer.json`.

    Args:
        directory: the model directory holding `tokenizer.json`.
        decoder_start_token_id: dropped when the tokenizer puts it first.
        eos_token_id: appended when the tokenizer does not end with it.
        vocab_size: the decoder's vocabulary; ids beyond it are refused.
        forced_bos_token_id: the token generation forces first (the generation config's `forced_bos_token_id`):
            put first when the tokenizer does not put it there, so that the model learns what it will be made to
            generate. BART's tokenizer adds `<s>` itself; a tokenizer without that post-processor does not, and
            a model trained without it then sees, after the forced `<s>`, a context it never saw in training.
    """

    def __init__(self, directory: str | Path, decoder_start_token_id: int | None, eos_token_id: int | None,
                 vocab_size: int, forced_bos_token_id: int | None = None, allow_unk: bool = False):
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{path}: no such file (training needs the decoder's tokenizer.json in the model "
                            "directory)")
        self.tokenizer = read_tokenizer(path, DataError)
        self.path = path
        self.start, self.eos, self.vocab_size = decoder_start_token_id, eos_token_id, vocab_size
        self.bos = forced_bos_token_id
        self.unk = unknown_token_id(self.tokenizer)
        self.allow_unk = allow_unk
        # Transcripts that held words the tokenizer maps to its unknown token (accepted with allow_unk=True).
        self.unknown: dict[str, Any] = {"utterances": 0, "tokens": 0, "words": {}}

    @classmethod
    def for_model(cls, directory: str | Path, model: Any, allow_unk: bool = False) -> LabelTokenizer:
        """The labels `model` (a composed Flax model) trains on: its start, end and vocabulary, and the token its
        generation config forces first."""
        from convert.base.generation_settings import model_generation_config

        config = model.config
        if isinstance(config, SpeechPrefixConfig):
            # The LM reads the transcript after the prompt: no start token (a BOS its tokenizer adds is dropped),
            # nothing forced.
            return cls(directory, getattr(config.decoder, "bos_token_id", None), config.eos_token_id,
                       config.decoder.vocab_size, None, allow_unk)
        return cls(directory, config.decoder_start_token_id, config.eos_token_id, config.decoder.vocab_size,
                   model_generation_config(model).forced_bos_token_id, allow_unk)

    def encode(self, text: str, where: str = "text") -> list[int]:
        """The label ids of a transcript.

        Raises:
            DataError: `where: ...` for a transcript with words the tokenizer maps to its unknown token (unless
                `allow_unk`, which counts them in `.unknown`), one that gives no token, or ids beyond the vocabulary.
        """
        encoding = self.tokenizer.encode(text)
        ids = list(encoding.ids)
        if self.unk is not None and self.unk in ids:
            words = _words_at(text, [o for i, o in zip(ids, encoding.offsets) if i == self.unk])
            if not self.allow_unk:
                unknown = self.tokenizer.id_to_token(self.unk)
                more = " ..." if len(words) > 5 else ""
                raise DataError(f"{where}: the transcript {text!r} has {len(words)} word(s) the tokenizer does not "
                                f"know: {', '.join(map(repr, words[:5]))}{more} (they would train as {unknown}; fix "
                                "the transcript, or pass allow_unk=True to train on them anyway)")
            self.unknown["utterances"] += 1
            self.unknown["tokens"] += ids.count(self.unk)
            for word in words:
                self.unknown["words"][word] = self.unknown["words"].get(word, 0) + 1
        if ids and self.start is not None and ids[0] == self.start:
            ids = ids[1:]
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        added = (self.eos is not None) + (self.bos is not None)
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        if len(ids) <= added:
            raise DataError(f"{where}: the transcript {text!r} gives no tokens")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"{where}: token id {bad[0]} is outside the decoder's vocabulary ({self.vocab_size}); "
                            f"is {self.path} the decoder's tokenizer?")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id a `tokenizers.Tokenizer` gives text it cannot encode (its model's `unk_token`, or a Unigram model's
    `unk_id`), or None when it has none (byte-level BPE encodes any text)."""
    model = json.loads(tokenizer.to_str()).get("model") or {}
    if isinstance(model.get("unk_id"), int):
        return model["unk_id"]
    token = model.get("unk_token")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _words_at(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """The whitespace-separated words of `text` that hold the character spans (distinct, in order)."""
    words: list[str] = []
    for start, end in spans:
        start, end = max(0, min(start, len(text))), max(0, min(max(end, start), len(text)))
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        while end < len(text) and not text[end].isspace():
            end += 1
        word = text[start:end].strip() or repr(text[start:end])
        if word not in words:
            words.append(word)
    return words


def sample_lengths(examples: Sequence[Example], sampling_rate: int) -> list[int]:
    """Each utterance's length in samples at `sampling_rate`, from the file headers (nothing is decoded)."""
    return [max(0, round(audio_seconds(e.audio) * sampling_rate)) for e in examples]


class AudioCache:
    """Waveforms read once (resampled to the model's rate) and kept: fine-tuning reads each file every epoch."""

    def __init__(self, sampling_rate: int):
        self.sampling_rate = sampling_rate
        self._waves: dict[Path | AudioBytes, np.ndarray] = {}

    def get(self, path: Path | AudioBytes) -> np.ndarray:
        if path not in self._waves:
            self._waves[path] = load_audio(path, self.sampling_rate)
        return self._waves[path]


def label_length_buckets(max_tokens: int, multiple: int = 8) -> int:
    """The padded label length: the longest label rounded up to a multiple (few distinct shapes)."""
    return int(np.ceil(max_tokens / multiple) * multiple)


def padded_labels(batch: Batch, labels: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """[B, length] int32: the batch's label rows padded with -100 (filler rows all -100)."""
    out = np.full((batch.batch_size, length), IGNORE_INDEX, np.int32)
    for row, index in enumerate(batch.indices):
        ids = list(labels[index])[:length]
        out[row, :len(ids)] = ids
    return out


def make_batch(batch: Batch, examples: Sequence[Example], labels: Sequence[Sequence[int]], audio: AudioCache,
               features: FeatureExtractorConfig, label_length: int) -> dict[str, Any]:
    """The arrays of one batch: `batch.batch_size` rows (rows past the items are silence with no label tokens).

    Returns:
        {"inputs" [B, N] float32 (or [B, S, F] feature frames, as the feature extractor makes them),
        "attention_mask" [B, N] / [B, S] int32 or None (as the feature extractor passes one),
        "labels" [B, L] int32 (-100 padding), "seconds" (real audio in the batch), "indices"}.
    """
    n, b = batch.padded_length, batch.batch_size
    out_labels = np.full((b, label_length), IGNORE_INDEX, np.int32)
    waves, seconds = [], 0.0
    for row, index in enumerate(batch.indices):
        waves.append(audio.get(examples[index].audio)[:n])
        seconds += len(waves[-1]) / audio.sampling_rate
        ids = list(labels[index])[:label_length]
        out_labels[row, :len(ids)] = ids
    waves += [np.zeros(n, np.float32)] * (b - len(waves))  # filler rows: silence, unmasked, no labels
    inputs, mask = prepare_batch(waves, features, n)
    return {"inputs": inputs, "attention_mask": mask, "labels": out_labels, "seconds": seconds,
            "indices": batch.indices}
