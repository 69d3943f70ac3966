"""Transcription at scale: many audio files through a composed model, batched by length so that the compiled
functions see a few padded shapes, with word and character error rates when references are given.

What `python -m convert.generate` runs (see there for the command line). The steps:

* Inputs: audio files, directories (every audio file below them, sorted), and JSON-lines manifests
  (`{"audio": PATH, "text": REFERENCE}`, `text` optional, a relative PATH relative to the manifest). Headers are
  read first (`convert.base.audio.audio_seconds`), so that a missing or unreadable file, or audio too long for the
  model, is refused before any model work.
* Length: the decoder writes at most `max_new_tokens` tokens per utterance (the model's generation config, or
  the caller's). At `tokens_per_second` tokens per second of speech (4 by default: a fast speaker's 3 words a
  second at about 1.3 subword tokens a word) that describes `max_new_tokens / tokens_per_second` seconds; longer
  audio is refused with that figure, and with how far `max_new_tokens` may go (the decoder's positions), unless
  `chunk_seconds` asks for chunks: windows of `chunk_seconds` overlapping by `chunk_overlap_seconds`, each
  transcribed as an utterance of its own; the chunks' tokens are joined where their overlaps agree best
  (`merge_overlapping`).
* Batches: utterances (or chunks) are grouped by length (`convert.base.batching`) into at most `buckets` padded
  lengths and batches of exactly `batch_size` rows (a partial batch is filled with copies of its first
  utterance, whose results are dropped), so that the Flax encoder compiles once per bucket and the search once
  per bucket and setting. Audio is read (`convert.base.audio.load_audio`: any format libsndfile reads, resampled
  with soxr, channels averaged) one batch at a time and normalised as the model's feature extractor does.
  Encoders without an attention mask (HF's convention for group-norm feature encoders) hear the padding: their
  transcripts depend on the bucket length, as in transformers' batched pipelines.
* Output: one `Transcription` per file (path, text, token ids, score, seconds of audio, reference), passed to
  `on_result` as each batch finishes; the report adds audio-seconds per second, the compilations, and WER / CER
  (jiwer, over the files that have a reference).
* CTC (a model with a CTC head, `convert.base.ctc`): `ctc_weight` decodes with one-pass joint CTC/attention beam
  search (`flax_model.generation.generate`); `decoder="ctc"` decodes with the CTC head alone (best path: each
  frame's most likely label, repeats merged, blanks removed; no decoder run, no length limit but the frames);
  `timestamps` adds each word's start and end in seconds, from the CTC alignment: the best path's frames with
  `decoder="ctc"`, else the Viterbi alignment of the transcript's tokens to the CTC head's output (one more
  encoder pass per batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.audio import (
    AudioBytes,
    AudioError,
    FeatureExtractorConfig,
    audio_seconds,
    default_feature_extractor,
    feature_extractor_config,
    load_audio,
    prepare_batch,
)
from convert.base.batching import bucket_boundaries, length_batches
from convert.base.errors import ConvertError, UsageError, bad_argument
from convert.base.generation_settings import GenerationSettings, model_generation_config, resolve_settings
from convert.base.prefix import files_directory, is_prefix_directory
from convert.base.tokenizer_file import TOKENIZER_FILE, read_tokenizer
from convert.base.unicode_text import not_unicode

FRAMEWORKS = ("flax", "torch")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64", ".opus")
DEFAULT_TOKENS_PER_SECOND = 4.0
DEFAULT_CHUNK_OVERLAP_SECONDS = 1.0


class TranscriptionError(ConvertError):
    """An input that transcription cannot use: a manifest line, an empty directory, audio too long or too short."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One input file: where it came from (`FILE:LINE` for a manifest line, `DATASET[SPLIT]:ROW` for a dataset
    row, whose audio may be bytes) and its reference, if any."""

    audio: Path | AudioBytes
    reference: str | None = None
    where: str = ""


@dataclasses.dataclass
class Transcription:
    """One file's result.

    Attributes:
        audio: the audio file.
        text: the decoded text without special tokens; None when the model has no `tokenizer.json`.
        token_ids: the start token, the generated tokens and the eos (when generation ended with one); chunked
            audio: the start token, then the chunks' tokens joined.
        score: beam search: the hypothesis' length-normalised log-probability; greedy search and sampling: the
            mean log-probability of the generated tokens (the mean over the chunks for chunked audio).
        seconds: the audio's duration.
        reference: the manifest's `text`, when given.
        chunks: how many chunks the audio was transcribed in (1: whole).
    """

    audio: str
    text: str | None
    token_ids: list[int]
    score: float
    seconds: float
    reference: str | None = None
    chunks: int = 1
    words: list[dict[str, Any]] | None = None  # with timestamps: [{"word", "start", "end"}] (seconds)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.reference is None:
            del out["reference"]
        if self.words is None:
            del out["words"]
        return out


@dataclasses.dataclass
class TranscriptionReport:
    """The whole run.

    Attributes:
        results: one per input file, in input order.
        audio_seconds: the audio transcribed.
        wall_seconds: from reading the first batch to the last result (model loading not included).
        audio_seconds_per_second: audio_seconds / wall_seconds.
        compilations: Flax: {"encoder": shapes the encoder compiled for, "search": traces of the generation
            loop} during this run; the reference compiles nothing.
        shapes: the distinct (rows, padded samples) batch shapes.
        wer, cer: word and character error rates over the files with a reference (None without references or
            without a tokenizer).
        references: how many files had a reference.
    """

    results: list[Transcription]
    audio_seconds: float
    wall_seconds: float
    audio_seconds_per_second: float
    compilations: dict[str, int]
    shapes: list[tuple[int, int]]
    wer: float | None
    cer: float | None
    references: int

    def summary(self) -> str:
        line = (f"transcribed {len(self.results)} file(s), {self.audio_seconds:.1f} s of audio in "
                f"{self.wall_seconds:.1f} s ({self.audio_seconds_per_second:.1f} audio-s/s); "
                f"{len(self.shapes)} padded shape(s)")
        if self.compilations:
            line += "; compilations: " + ", ".join(f"{k} {v}" for k, v in self.compilations.items())
        if self.wer is not None:
            line += f"; WER {100 * self.wer:.2f}%, CER {100 * self.cer:.2f}% over {self.references} reference(s)"
        return line


# ----------------------------------------------------------------------------------------------------------
# Inputs


def collect_inputs(audio: Iterable[str | Path] = (), manifests: Iterable[str | Path] = (),
                   datasets: Iterable[Any] = ()) -> list[Utterance]:
    """The utterances of audio files, directories (every audio file below, sorted), JSON-lines manifests and 🤗
    datasets splits (`convert.datasets_source.DatasetSource`; the text column, when present, as references).

    Raises:
        TranscriptionError / AudioError: a missing path, a directory without audio, a bad manifest line.
    """
    out: list[Utterance] = []
    for item in audio:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not found:
                raise TranscriptionError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this directory")
            out += [Utterance(p, None, str(p)) for p in found]
        elif not path.exists():
            raise AudioError(f"{path}: no such file")
        else:
            out.append(Utterance(path, None, str(path)))
    for manifest in manifests:
        out += read_manifest(manifest)
    for source in datasets:
        from convert.datasets_source import read_rows

        out += [Utterance(row.audio, row.text, row.where) for row in read_rows(source, require_text=False)]
    return out


def read_manifest(path: str | Path) -> list[Utterance]:
    """A JSON-lines manifest: `{"audio": PATH, "text": REFERENCE}` per line (`text` optional); blank lines skipped.

    Raises:
        TranscriptionError: `FILE:LINE: what is wrong`.
    """
    path = Path(path)
    if not path.is_file():
        raise TranscriptionError(f"{path}: no such manifest file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # JSON lines end at "\n" only (see training_data)
    except UnicodeDecodeError as e:
        raise TranscriptionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise TranscriptionError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise TranscriptionError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(item, Mapping) or not isinstance(item.get("audio"), str) or not item["audio"]:
            raise TranscriptionError(f'{where}: expected an object with an "audio" path (and an optional "text")')
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise TranscriptionError(f'{where}: "text" must be a string')
        for field in ("audio", "text"):
            problem = None if item.get(field) is None else not_unicode(item[field])
            if problem:
                raise TranscriptionError(f'{where}: "{field}" {problem}')
        audio = Path(item["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        if not audio.is_file():
            raise TranscriptionError(f"{where}: {audio}: no such audio file")
        out.append(Utterance(audio, text, where))
    if not out:
        raise TranscriptionError(f"{path}: the manifest lists no audio")
    return out


# ----------------------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Runner:
    """What transcription needs of a model: its config, one batch's generation, compile counts.

    `generate` returns each row's token ids and score; `align` (with timestamps) each row's CTC labels and their
    frames, given the rows' token ids; `decoder` is "attention" (ids: the start token, the tokens, the eos) or
    "ctc" (ids: the CTC labels)."""

    framework: str
    config: Any
    settings: GenerationSettings
    generate: Callable[[np.ndarray, np.ndarray | None, int], tuple[Any, np.ndarray]]
    compilations: Callable[[], dict[str, int]]
    decoder: str = "attention"
    align: Callable[[np.ndarray, np.ndarray | None, list[list[int]], list[str | None]], list[Any]] | None = None


DECODERS = ("attention", "ctc")


def make_runner(model: Any, generation_config: Any = None, seed: int = 0, *, ctc_weight: float | None = None,
                decoder: str = "attention", timestamps: bool = False, vocabulary: Any = None,
                **generation: Any) -> Runner:
    """A runner for a loaded `FlaxSpeechEncoderDecoderModel` or reference `SpeechEncoderDecoderModel`; the
    generation settings are resolved (and refused) here, before any audio is read. `ctc_weight`, `decoder="ctc"`
    and `timestamps` need the Flax model and a CTC head; `vocabulary` is the head's own (`CTCVocabulary`), if any,
    to align transcripts with."""
    check_decoding(ctc_weight, decoder, generation_config, generation)
    settings = resolve_settings(model.config, model_generation_config(model), generation_config, **generation)
    if settings.num_return_sequences != 1:  # blamed on where it was set (an argument, a generation config file)
        raise settings.refuse("num_return_sequences", settings.num_return_sequences,
                              "transcription writes one transcript per file")
    uses_ctc = ctc_weight is not None or decoder == "ctc" or timestamps
    if uses_ctc:
        name = "ctc_weight" if ctc_weight is not None else "decoder" if decoder == "ctc" else "timestamps"
        value = ctc_weight if ctc_weight is not None else decoder if decoder == "ctc" else timestamps
        if not hasattr(model, "module"):
            raise bad_argument(name, value, "needs framework=flax (the reference decodes with attention only)")
        if model.config.ctc is None:
            raise bad_argument(name, value, "needs a model with a CTC head (compose it with --ctc-head decoder)")
        if ctc_weight is not None and decoder == "ctc":
            raise bad_argument("ctc_weight", ctc_weight, "applies to joint decoding (decoder=attention), not to CTC "
                               "decoding alone")
        if ctc_weight is not None and settings.do_sample:  # set by a generation config (an argument is refused above)
            where = settings.origins.get("do_sample")
            raise bad_argument("ctc_weight", ctc_weight, "joint CTC/attention decoding is a beam search; it does not "
                               f"sample (do_sample=true{f' is set in {where}' if where else ''})")
        if ctc_weight is not None:
            from flax_model.generation import joint_setting

            joint_setting(model.config, settings, ctc_weight)  # refused here, before any audio is read
    if hasattr(model, "module") and decoder == "ctc":
        return _ctc_runner(model, settings, timestamps)
    if hasattr(model, "module"):  # Flax
        import jax

        from flax_model import generation as flax_generation

        # jax.jit's count of the shapes a function compiled (a private accessor; absent: counted as 0)
        compiled = lambda fn: int(getattr(fn, "_cache_size", lambda: 0)()) if fn is not None else 0  # noqa: E731
        prefix = hasattr(model.config, "prompt_length")  # a prefix composition: its own jitted functions

        def encoder_compilations() -> int:
            return compiled(model._compiled.get("prefix" if prefix else "encode"))

        def search_compilations() -> int:
            if not prefix:
                return sum(flax_generation.TRACES.values())
            return sum(compiled(fn) for key, fn in model._compiled.items()
                       if isinstance(key, tuple) and key[0] == "generate")

        start = search_compilations()
        encoder_start = encoder_compilations()
        key = jax.random.PRNGKey(seed)

        def run_flax(inputs, mask, batch_index):
            joint = {} if ctc_weight is None else {"ctc_weight": ctc_weight}
            out = model.generate(inputs, mask, generation_config=generation_config,
                                 prng_key=jax.random.fold_in(key, batch_index), **joint, **generation)
            return out.sequences, out.sequences_scores

        return Runner("flax", model.config, settings, run_flax,
                      lambda: {"encoder": encoder_compilations() - encoder_start,
                               "search": search_compilations() - start},
                      align=_aligner(model, vocabulary, settings) if timestamps else None)
    import torch

    generator = torch.Generator().manual_seed(seed)

    def run_torch(inputs, mask, batch_index):
        out = model.generate(torch.from_numpy(inputs), None if mask is None else torch.from_numpy(mask),
                             generation_config=generation_config, generator=generator, **generation)
        return out.sequences.numpy(), out.sequences_scores.numpy()

    return Runner("torch", model.config, settings, run_torch, dict)


def check_decoding(ctc_weight: float | None, decoder: str, generation_config: Any, generation: Mapping[str, Any]
                   ) -> None:
    """Refuses decoding arguments that are wrong by themselves or together, before any work: `ctc_weight` out of
    [0, 1] or with sampling, and generation settings with `decoder="ctc"` (the CTC head alone runs no search)."""
    from convert import cli

    cli.require_choice("decoder", decoder, DECODERS)
    cli.require_float("ctc_weight", ctc_weight, 0.0, 1.0, allow_none=True)
    if ctc_weight is not None and generation.get("do_sample"):
        raise bad_argument("ctc_weight", ctc_weight, "joint CTC/attention decoding is a beam search; it does not "
                           "sample (do_sample=True)")
    if decoder == "ctc":
        given = {name: value for name, value in generation.items() if value is not None}
        if generation_config is not None:  # shown as the file it was read from (the command's), else its type
            origins = {where for where in getattr(generation_config, "origins", {}).values() if where}
            given = {"generation_config": origins.pop() if len(origins) == 1 else type(generation_config).__name__,
                     **given}
        for name, value in given.items():
            raise bad_argument(name, value, "applies to attention decoding, not to decoding with the CTC head alone "
                               "(decoder ctc)")


def _ctc_runner(model: Any, settings: GenerationSettings, timestamps: bool) -> Runner:
    """CTC decoding alone: the best path of the CTC head's output (no decoder). The score is the best path's mean
    log-probability per frame."""
    from convert.base.ctc import greedy_collapse

    blank = model.config.ctc.blank_id
    spans: dict[int, list[Any]] = {}

    def run_ctc(inputs, mask, batch_index):
        logits, frame_mask = model.ctc_logits(inputs, mask)
        best, best_scores = _best_path(logits)
        lengths = np.asarray(frame_mask).sum(axis=1)
        rows, scores = [], []
        spans.clear()
        for row, length in enumerate(lengths):
            labels, frames = greedy_collapse(best[row], int(length), blank)
            rows.append(labels)
            spans[row] = frames
            scores.append(float(best_scores[row, :int(length)].mean()) if length else 0.0)
        return rows, np.asarray(scores, np.float32)

    def align(inputs, mask, ids, texts):  # the best path's own frames, from the batch just decoded
        return [(labels, spans[row]) for row, labels in enumerate(ids)]

    fn = lambda: int(getattr(model._compiled.get("ctc_only"), "_cache_size", lambda: 0)())
    start = fn()
    return Runner("flax", model.config, settings, run_ctc, lambda: {"encoder": fn() - start}, decoder="ctc",
                  align=align if timestamps else None)


def _best_path(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's most likely label and its log-probability, [B, S] each (computed on the device)."""
    from flax_model.ctc import best_path

    labels, log_probs = best_path(logits)
    return np.asarray(labels), np.asarray(log_probs)


def _aligner(model: Any, vocabulary: Any, settings: GenerationSettings) -> Callable[..., list[Any]]:
    """Timestamps for attention or joint decoding: the transcript's CTC labels (its tokens without the special
    ones; for a head with its own vocabulary, the text in its characters) aligned to the CTC head's output by
    Viterbi; None for a row whose labels cannot be aligned (more labels than frames, a character the head lacks)."""
    from convert.base.ctc import CTCError, forced_align
    from flax_model.ctc import label_log_probs

    config = model.config
    special = config.special_token_ids | {settings.decoder_start_token_id, settings.forced_bos_token_id,
                                          *settings.eos_token_ids}

    def align(inputs, mask, ids, texts):
        rows = []
        for row_ids, text in zip(ids, texts):
            if config.ctc.shares_decoder_vocabulary:
                rows.append([t for t in row_ids if t not in special])
            else:
                try:
                    rows.append(None if text is None or vocabulary is None else vocabulary.encode(text))
                except CTCError:
                    rows.append(None)
        logits, frame_mask = model.ctc_logits(inputs, mask)
        width = max(8, -(-max(len(r or ()) for r in rows) // 8) * 8)  # a few shapes: multiples of 8
        columns = np.full((logits.shape[0], width + 1), config.ctc.blank_id, np.int32)  # filler rows: blanks
        for r, labels in enumerate(rows):
            columns[r, 1:1 + len(labels or ())] = labels or ()
        picked = np.asarray(label_log_probs(logits, columns))  # [B, S, 1 + width]
        lengths = np.asarray(frame_mask).sum(axis=1)
        out = []
        for r, labels in enumerate(rows):
            if labels is None:
                out.append(None)
                continue
            local = picked[r, :int(lengths[r]), :1 + len(labels)]
            spans = forced_align(local, list(range(1, 1 + len(labels))), 0)
            out.append(None if spans is None else (labels, spans))
        return out

    return align


def load_model(model: str | Path, framework: str = "flax", revision: str | None = None,
               mesh: Any = None, scan_layers: bool = False) -> tuple[Any, Path]:
    """A composed model (directory or Hub repo id) in one framework, and its directory. `mesh` (Flax only): a
    `jax.sharding.Mesh` or its text ("data=2,fsdp=4") to load the params sharded on and split batches over.
    `scan_layers` (Flax only): run the identical layers with `nn.scan` (compiles faster, same tokens)."""
    from convert.base.hub import resolve_source

    if framework not in FRAMEWORKS:
        raise bad_argument("framework", framework, f"is not one of {', '.join(FRAMEWORKS)}")
    if mesh is not None and framework != "flax":
        raise bad_argument("mesh", mesh, f"needs framework=flax (the {framework} reference runs on one device)")
    if scan_layers and framework != "flax":
        raise bad_argument("scan_layers", scan_layers, f"needs framework=flax (the {framework} reference runs "
                           "its layers one by one)")
    if isinstance(mesh, str):
        from flax_model.sharding import mesh_from_flag

        mesh = mesh_from_flag(mesh)
    directory = resolve_source(str(model), revision, what="model").path
    if is_prefix_directory(directory):
        if mesh is not None or scan_layers:
            raise bad_argument("mesh" if mesh is not None else "scan_layers", mesh or scan_layers,
                               "is not supported for a prefix composition (it runs on one device, layers unrolled)")
        if framework == "flax":
            from flax_model.prefix import FlaxSpeechPrefixModel

            return FlaxSpeechPrefixModel.from_pretrained(directory), directory
        from torch_reference.prefix import SpeechPrefixModel

        return SpeechPrefixModel.from_pretrained(directory), directory
    if framework == "flax":
        from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

        return FlaxSpeechEncoderDecoderModel.from_pretrained(directory, mesh=mesh, scan_layers=scan_layers), directory
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

    return SpeechEncoderDecoderModel.from_pretrained(directory), directory


def load_tokenizer(directory: Path | None) -> Any:
    """The decoder's `tokenizer.json` (the `tokenizers` package), or None when the directory has none."""
    if directory is None or not (directory / TOKENIZER_FILE).is_file():
        return None
    return read_tokenizer(directory / TOKENIZER_FILE)


# ----------------------------------------------------------------------------------------------------------
# Transcription


@dataclasses.dataclass(frozen=True)
class _Item:
    """One row of work: an utterance, or one chunk of it (samples [start, stop) at the model's rate)."""

    utterance: int
    chunk: int
    start: int
    stop: int  # from the header's length; the utterance's last item reads to the end of the file
    last: bool


def transcribe(
    model: str | Path | Any,
    audio: Sequence[str | Path] = (),
    *,
    manifests: Sequence[str | Path] = (),
    datasets: Sequence[Any] = (),
    framework: str = "flax",
    revision: str | None = None,
    batch_size: int = 8,
    buckets: int = 4,
    chunk_seconds: float | None = None,
    chunk_overlap_seconds: float | None = None,
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
    seed: int = 0,
    progress: bool = True,
    on_result: Callable[[Transcription], None] | None = None,
    generation_config: Any = None,
    model_dir: str | Path | None = None,
    feature_extractor: FeatureExtractorConfig | None = None,
    mesh: Any = None,
    scan_layers: bool = False,
    max_memory: str | int | None = None,
    ctc_weight: float | None = None,
    decoder: str = "attention",
    timestamps: bool = False,
    **generation: Any,
) -> TranscriptionReport:
    """Transcribes audio files, directories and manifests with a composed model.

    Args:
        model: a composed checkpoint directory or Hub repo id, or a loaded Flax / reference model.
        audio: audio files and directories (every audio file below a directory).
        manifests: JSON-lines manifests (`{"audio": PATH, "text": REFERENCE}`).
        datasets: 🤗 datasets splits (`convert.datasets_source.DatasetSource`), their text column as references.
        framework: "flax" (jit-compiled) or "torch" (the eager reference); for a path or repo id.
        revision: the Hub revision, for a repo id.
        batch_size: rows per batch (every batch has exactly this many).
        buckets: the most distinct padded lengths.
        chunk_seconds: transcribe audio longer than this many seconds in overlapping chunks of this length
            (None: audio too long for the model is refused).
        chunk_overlap_seconds: how much consecutive chunks overlap (None: 1.0); only with `chunk_seconds`.
        tokens_per_second: the speech rate assumed to bound how much audio `max_new_tokens` can describe.
        seed: seeds sampling (`do_sample=True`).
        progress: show a progress bar (on stderr, when it is a terminal).
        on_result: called with each file's result as soon as its batch (or its last chunk) is done.
        generation_config: a GenerationConfig-like object over the model's own.
        model_dir: for a loaded model, the directory holding its `tokenizer.json` and
            `preprocessor_config.json` (None: no text, HF's feature-extractor defaults).
        feature_extractor: how audio is normalised, over what the model's directory says.
        mesh: for a path or repo id (Flax): a `jax.sharding.Mesh` or its text ("data=2,fsdp=4") to load the
            params sharded on; each batch's rows are split over `data` (`load_model`).
        scan_layers: for a path or repo id (Flax): run the identical layers with `nn.scan` (`load_model`).
        max_memory: the memory the run may use ("64GB", or bytes) instead of what the machine has: a batch whose
            estimate (`flax_model.memory`) exceeds it is refused before anything is compiled.
        ctc_weight: joint CTC/attention beam search with this lambda (a CTC head over the decoder's vocabulary).
        decoder: "attention" (the decoder's search) or "ctc" (the CTC head alone, best path).
        timestamps: each result gets `words`: [{"word", "start", "end"}] in seconds, from the CTC alignment.
        generation: generation settings by transformers' names (num_beams, max_new_tokens, ...).

    Returns:
        The report, with one `Transcription` per file in input order.

    Raises:
        ConvertError: one line naming the file, manifest line or parameter that is wrong.
    """
    from convert import cli

    cli.require_int("batch_size", batch_size, 1)
    cli.require_int("buckets", buckets, 1)
    cli.require_float("tokens_per_second", tokens_per_second, 0.0, low_inclusive=False)
    cli.require_int("seed", seed, 0, 2**32 - 1)
    from convert.base.resources import parse_memory

    max_memory = parse_memory(max_memory)
    if chunk_seconds is not None:
        cli.require_float("chunk_seconds", chunk_seconds, 0.0, low_inclusive=False)
        chunk_overlap_seconds = DEFAULT_CHUNK_OVERLAP_SECONDS if chunk_overlap_seconds is None else \
            cli.require_float("chunk_overlap_seconds", chunk_overlap_seconds, 0.0, chunk_seconds / 2)
    elif chunk_overlap_seconds is not None:
        raise bad_argument("chunk_overlap_seconds", chunk_overlap_seconds, "applies only with chunk_seconds=...")
    check_decoding(ctc_weight, decoder, generation_config, generation)  # before the model is loaded
    if timestamps and chunk_seconds is not None:
        raise bad_argument("timestamps", timestamps, "is not available with chunk_seconds (chunks are joined by "
                           "their tokens, not their times)")
    utterances = collect_inputs(audio, manifests, datasets)
    if not utterances:
        raise UsageError("audio=[]: no audio given (pass audio files, directories or manifests)", param="audio")

    directory = None if model_dir is None else Path(model_dir)
    if isinstance(model, str | Path):
        model, directory = load_model(model, framework, revision, mesh, scan_layers)
    vocabulary = load_ctc_vocabulary(directory, model.config)
    runner = make_runner(model, generation_config, seed, ctc_weight=ctc_weight, decoder=decoder,
                         timestamps=timestamps, vocabulary=vocabulary, **generation)
    tokenizer = load_tokenizer(None if directory is None else files_directory(directory, "decoder"))
    decode_text = text_decoder(tokenizer, vocabulary if runner.decoder == "ctc" else None)
    decode_labels = text_decoder(tokenizer, vocabulary)  # the CTC labels' text (timestamps)
    features = feature_extractor or (feature_extractor_config(files_directory(directory, "encoder"),
                                                              runner.config.encoder) if directory
                                     else default_feature_extractor(runner.config.encoder))
    rate = features.sampling_rate

    # Headers first: every file's duration, and whether it fits.
    seconds = [audio_seconds(u.audio) for u in utterances]
    # The decoder describes so much audio; CTC decoding alone is bounded by the frames only.
    limit = runner.settings.max_new_tokens / tokens_per_second if runner.decoder == "attention" else math.inf
    # What bounds one pass, for a refusal's message only (a prefix composition's takes a search: made when needed).
    capacity = lambda: _capacity(runner, tokens_per_second)  # noqa: E731
    if hasattr(runner.config, "prompt_length"):  # a prefix composition: the audio takes decoder positions too
        limit = min(limit, _prefix_seconds(runner.config, runner.settings.max_new_tokens, features))
        capacity = lambda: _prefix_capacity(runner, features,  # noqa: E731
                                            tokens_per_second if runner.decoder == "attention" else None)
    if chunk_seconds is not None and chunk_seconds > limit:
        most = distinct_seconds(chunk_seconds, limit)[1]
        raise bad_argument("chunk_seconds", chunk_seconds, f"is longer than the {most} s one pass can transcribe "
                           f"({capacity()})")
    items = []
    for i, (u, s) in enumerate(zip(utterances, seconds)):
        samples = round(s * rate)
        if chunk_seconds is None or s <= chunk_seconds:
            if s > limit:
                shown, most = distinct_seconds(s, limit)
                raise TranscriptionError(
                    f"{u.where}: {shown} s of audio is longer than the {most} s this model can transcribe in one "
                    f"pass ({capacity()}); transcribe it in overlapping chunks with "
                    "chunk_seconds (--chunk-seconds)")
            items.append(_Item(i, 0, 0, samples, True))
        else:
            bounds = chunk_bounds(samples, rate, chunk_seconds, chunk_overlap_seconds)
            items += [_Item(i, k, a, b, k == len(bounds) - 1) for k, (a, b) in enumerate(bounds)]
    needed = features.min_samples(runner.config.encoder)
    for item in items:
        if item.stop - item.start < needed:
            u = utterances[item.utterance]
            raise AudioError(f"{u.where}: {item.stop - item.start} samples is too short for the encoder (it needs at "
                             f"least {needed})")

    lengths = [it.stop - it.start for it in items]
    # Boundaries on tenths of a second; exact lengths for encoders that hear the padding (no attention mask), so
    # that the longest utterance of a bucket is not padded at all (as transformers pads to the longest).
    multiple = max(1, rate // 10) if features.return_attention_mask else 1
    boundaries = bucket_boundaries(min(lengths), max(lengths), count=buckets, multiple=multiple)
    batches = length_batches(lengths, batch_size, boundaries)
    if hasattr(model, "module"):  # Flax: the longest bucket's batch must fit before anything is compiled or read
        _check_memory(model, runner, items, utterances, lengths, batches, features, rate, max_memory)
    chunks_of = [0] * len(utterances)
    for item in items:
        chunks_of[item.utterance] += 1
    pieces: dict[int, dict[int, tuple[list[int], float]]] = {}
    results: list[Transcription | None] = [None] * len(utterances)
    eos = set(runner.settings.eos_token_ids) if runner.decoder == "attention" else set()
    start_token = runner.settings.decoder_start_token_id if runner.decoder == "attention" else None
    seconds_per_frame = None
    if timestamps:
        from convert.base.ctc import frame_seconds

        seconds_per_frame = frame_seconds(lambda n: runner.config.encoder.output_lengths(features.input_length(n)),
                                          rate)
    words_of: dict[int, list[dict[str, Any]] | None] = {}
    shapes: set[tuple[int, int]] = set()

    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=round(sum(seconds), 1), unit="audio-s", desc="transcribing", file=sys.stderr, leave=False,
              disable=not cli.show_progress(progress), bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s "
              "[{elapsed}<{remaining}, {rate_fmt}]") as bar:
        waveform_cache: dict[int, np.ndarray] = {}
        for batch_index, batch in enumerate(batches):
            waveforms = []
            for j in batch.indices:
                item = items[j]
                if item.utterance not in waveform_cache:
                    waveform_cache[item.utterance] = load_audio(utterances[item.utterance].audio, rate)
                waveforms.append(waveform_cache[item.utterance][item.start:None if item.last else item.stop])
            inputs, mask = pad_batch(waveforms, features, batch.padded_length, batch.batch_size)
            shapes.add(inputs.shape)
            sequences, scores = runner.generate(inputs, mask, batch_index)
            ids_of = [trim(np.asarray(sequences[row]).tolist(), eos) for row in range(len(batch.indices))]
            if runner.align is not None:
                alignments = runner.align(inputs, mask, ids_of, [decode_text(ids) for ids in ids_of])
                for row, j in enumerate(batch.indices):
                    words_of[items[j].utterance] = None if alignments[row] is None else word_timestamps(
                        *alignments[row], decode_labels, seconds_per_frame)
            done_seconds = 0.0
            for row, j in enumerate(batch.indices):
                item = items[j]
                ids = ids_of[row]
                pieces.setdefault(item.utterance, {})[item.chunk] = (ids, float(scores[row]))
                if len(pieces[item.utterance]) == chunks_of[item.utterance]:
                    waveform_cache.pop(item.utterance, None)
                    u = utterances[item.utterance]
                    result = assemble(u, seconds[item.utterance], pieces.pop(item.utterance), decode_text,
                                      start_token, eos)
                    if timestamps:
                        result.words = words_of.pop(item.utterance, None)
                    results[item.utterance] = result
                    done_seconds += result.seconds
                    if on_result is not None:
                        on_result(result)
            bar.update(round(done_seconds, 1))
    wall = time.perf_counter() - started
    total = float(sum(seconds))
    wer, cer, references = error_rates(results)
    compilations = runner.compilations()
    return TranscriptionReport(results=list(results), audio_seconds=total, wall_seconds=wall,
                               audio_seconds_per_second=total / wall if wall > 0 else math.inf,
                               compilations=compilations, shapes=sorted(shapes), wer=wer, cer=cer,
                               references=references)


def _check_memory(model: Any, runner: Runner, items: Sequence[_Item], utterances: Sequence[Utterance],
                  lengths: Sequence[int], batches: Sequence[Any], features: FeatureExtractorConfig, rate: int,
                  max_memory: int | None) -> None:
    """Refuses a transcription whose largest batch cannot fit in memory (`flax_model.memory`), naming the batch
    size when one utterance per batch would fit, else the longest file."""
    from convert.base.resources import memory_budget, refuse_if_too_large, refuse_parameters_beyond
    from flax_model.memory import device_memory, generation_estimate, tree_bytes

    device = device_memory()
    budget = memory_budget(max_memory, device * (1 if model.mesh is None else model.mesh.size) if device else None)
    refuse_parameters_beyond(tree_bytes(model.params), budget)
    longest = max(batches, key=lambda b: b.padded_length)
    rows, samples, masked = longest.batch_size, longest.padded_length, features.return_attention_mask
    steps = features.input_length(samples)  # the encoder's input: samples, or feature frames
    # One utterance of the longest bucket first: if even that cannot fit, the audio is to blame, else the batch.
    alone = generation_estimate(model.module, model.params, 1, steps, runner.settings, masked, budget.bytes)
    index = max(range(len(items)), key=lambda i: lengths[i])
    refuse_if_too_large(alone.bytes, f"{utterances[items[index].utterance].where}: {lengths[index] / rate:.1f} s of "
                        f"audio in one pass (its largest array: {alone.largest})", budget,
                        "transcribe it in shorter chunks with chunk_seconds=...")
    if rows > 1:
        estimate = generation_estimate(model.module, model.params, rows, steps, runner.settings, masked,
                                       budget.bytes)
        refuse_if_too_large(estimate.bytes, f"batch_size={rows}: a batch of {rows} utterances padded to "
                            f"{samples / rate:.1f} s (its largest array: {estimate.largest})", budget,
                            "lower batch_size=...", param="batch_size")


def _prefix_seconds(config: Any, max_new_tokens: int, features: FeatureExtractorConfig) -> float:
    """The longest audio (seconds) whose prefix of a prefix composition (its prompt and audio columns) leaves room for
    `max_new_tokens` in the decoder's positions (`flax_model.prefix`'s generate: columns - 1 + new tokens)."""
    room = config.decoder.max_positions + 1 - max_new_tokens

    def fits(samples: int) -> bool:
        frames = config.encoder.output_lengths(features.input_length(samples))
        return config.prompt_length + int(config.audio_lengths(frames)) <= room

    low, high = 0, features.sampling_rate
    while fits(high):  # doubling, then bisecting: the columns grow with the samples
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low / features.sampling_rate


def _prefix_capacity(runner: Runner, features: FeatureExtractorConfig, tokens_per_second: float | None) -> str:
    """What bounds a prefix composition's pass: its prompt and audio take the decoder's positions before the tokens
    it writes, and (attention decoding) max_new_tokens bounds the speech they can describe; then the longest audio
    any max_new_tokens allows, and with which."""
    config, tokens = runner.config, runner.settings.max_new_tokens
    positions = config.decoder.max_positions
    described = math.inf if tokens_per_second is None else tokens / tokens_per_second

    def reach(n: int) -> float:  # the longest audio one pass with max_new_tokens=n transcribes
        room = _prefix_seconds(config, n, features)
        return room if tokens_per_second is None else min(n / tokens_per_second, room)

    best = 1
    if tokens_per_second is not None:  # the speech n tokens describe grows with n, the room the prefix leaves shrinks
        low, high = 1, positions
        while high - low > 1:
            middle = (low + high) // 2
            fits = middle / tokens_per_second <= _prefix_seconds(config, middle, features)
            low, high = (middle, high) if fits else (low, middle)
        best = max((low, high), key=reach)
    what = (f"max_new_tokens={tokens} at {tokens_per_second:g} tokens per second of speech describe {described:.1f} s"
            f"; " if tokens_per_second is not None else "")
    return (f"{what}its prompt and audio take the decoder's positions before the {tokens} tokens it may write, "
            f"{positions} in all; at most {reach(best):.1f} s fits, with max_new_tokens={best} (--max-new-tokens)")


def _capacity(runner: Runner, tokens_per_second: float) -> str:
    positions = runner.config.decoder.max_positions
    return (f"max_new_tokens={runner.settings.max_new_tokens} at {tokens_per_second:g} tokens per second of speech; "
            f"the decoder's {positions} positions allow up to {(positions - 1) / tokens_per_second:.1f} s with "
            f"max_new_tokens={positions - 1} (--max-new-tokens)")


def distinct_seconds(longer: float, limit: float) -> tuple[str, str]:
    """`longer` and `limit` (longer > limit) as texts that read differently: one decimal, or as many more as it takes
    (rounding is monotonic, so the first text then reads larger)."""
    for places in range(1, 10):
        texts = f"{longer:.{places}f}", f"{limit:.{places}f}"
        if texts[0] != texts[1]:
            return texts
    return repr(float(longer)), repr(float(limit))


def chunk_bounds(samples: int, rate: int, chunk_seconds: float, overlap_seconds: float) -> list[tuple[int, int]]:
    """[start, stop) sample ranges of overlapping windows covering `samples`; the last ends at `samples`."""
    size = max(1, round(chunk_seconds * rate))
    step = max(1, size - round(overlap_seconds * rate))
    bounds, start = [], 0
    while True:
        stop = min(start + size, samples)
        bounds.append((start, stop))
        if stop >= samples:
            return bounds
        start += step


def pad_batch(waveforms: Sequence[np.ndarray], features: FeatureExtractorConfig, length: int,
              rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The encoder's inputs for waveforms padded to `length` samples in `rows` rows (extra rows repeat the first):
    normalised waveforms or log-mel frames, as the feature extractor makes them (`prepare_batch`).

    With an attention mask each utterance is normalised over its own samples (the padding is masked); without
    one, each row is padded first and normalised whole, as transformers' feature extractor does."""
    # A header's estimate (MP3) may fall short: prepare_batch pads to the longer of the two.
    inputs, mask = prepare_batch(waveforms, features, length)
    extra = rows - inputs.shape[0]
    if extra > 0:
        inputs = np.concatenate([inputs, np.repeat(inputs[:1], extra, axis=0)])
        mask = None if mask is None else np.concatenate([mask, np.repeat(mask[:1], extra, axis=0)])
    return inputs, mask


def load_ctc_vocabulary(directory: Path | None, config: Any) -> Any:
    """The CTC head's own vocabulary (`ctc_vocab.json`), or None (no head, or one over the decoder's vocabulary)."""
    head = getattr(config, "ctc", None)
    if head is None or head.shares_decoder_vocabulary or directory is None:
        return None
    from convert.base.ctc import CTCVocabulary

    return CTCVocabulary.read(directory / head.vocabulary, head)


def text_decoder(tokenizer: Any, vocabulary: Any) -> Callable[[list[int]], str | None]:
    """ids -> text: with a CTC vocabulary's ids, its decoding; else the decoder's tokenizer without special tokens
    (None without a tokenizer)."""
    if vocabulary is not None:
        return vocabulary.decode
    if tokenizer is None:
        return lambda ids: None
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def word_timestamps(labels: list[int], spans: list[tuple[int, int]], decode: Callable[[list[int]], str | None],
                    seconds_per_frame: float) -> list[dict[str, Any]] | None:
    """`convert.base.ctc.word_timestamps`, or None without a tokenizer to spell the words."""
    from convert.base.ctc import word_timestamps as words

    if decode([]) is None:
        return None
    return words(labels, spans, decode, seconds_per_frame)


def trim(ids: list[int], eos: set[int]) -> list[int]:
    """The start token and the generated tokens up to the first eos (kept); later padding goes."""
    for i in range(1, len(ids)):
        if ids[i] in eos:
            return ids[:i + 1]
    return ids


def assemble(u: Utterance, seconds: float, chunks: dict[int, tuple[list[int], float]],
             decode: Callable[[list[int]], str | None], start_token: int | None, eos: set[int]) -> Transcription:
    """One file's result from its chunk(s). `start_token` None: the ids are CTC labels (no start or end token)."""
    if len(chunks) == 1:
        ids, score = chunks[0]
    else:
        skip = 0 if start_token is None else 1
        bodies = []
        for k in sorted(chunks):
            tokens = chunks[k][0][skip:]
            bodies.append(tokens[:-1] if tokens and tokens[-1] in eos else tokens)
        merged = bodies[0]
        for body in bodies[1:]:
            merged = merge_overlapping(merged, body)
        last = chunks[max(chunks)][0]
        ids = ([] if start_token is None else [start_token]) + merged + (
            [last[-1]] if len(last) > 1 and last[-1] in eos else [])
        score = float(np.mean([s for _, s in chunks.values()]))
    return Transcription(str(u.audio), decode(ids), ids, score, seconds, u.reference, len(chunks))


def merge_overlapping(left: list[int], right: list[int]) -> list[int]:
    """Joins the tokens of two chunks whose audio overlaps: the end of `left` and the start of `right` describe
    the same stretch. Every alignment of a suffix of `left` with a prefix of `right` is scored by the fraction of
    equal tokens (at least two equal); the best (the longer on a tie) is cut in its middle: `left`'s tokens up
    to the middle, `right`'s after. Without such an alignment the two are concatenated."""
    best, best_overlap = 0.0, 0
    for overlap in range(1, min(len(left), len(right)) + 1):
        equal = sum(a == b for a, b in zip(left[len(left) - overlap:], right[:overlap]))
        if equal >= 2 and equal / overlap >= best:
            best, best_overlap = equal / overlap, overlap
    if not best_overlap:
        return left + right
    half = best_overlap // 2
    return left[:len(left) - best_overlap + half] + right[half:]


def error_rates(results: Sequence[Transcription | None]) -> tuple[float | None, float | None, int]:
    """(WER, CER, count) over the results with a non-empty reference and a text; (None, None, 0) without any."""
    pairs = [(r.reference, r.text) for r in results
             if r is not None and r.reference is not None and r.reference.strip() and r.text is not None]
    if not pairs:
        return None, None, 0
    import jiwer

    references, hypotheses = [p[0] for p in pairs], [p[1] for p in pairs]
    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses)), len(pairs)
