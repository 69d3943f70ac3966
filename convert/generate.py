"""Transcribe WAV files with a composed speech encoder-decoder.

    python -m convert.generate --model DIR --audio FILE.wav [FILE.wav ...] [--num-beams N] [--max-new-tokens N]

DIR is a composed checkpoint directory (from `convert.compose`) or a Hub repo id. Each WAV file (16 kHz mono,
or whatever rate DIR's `preprocessor_config.json` names; several channels are averaged) is normalised as the
encoder's feature extractor would, and the model generates greedily or with beam search. For each file the
command prints the token ids and, when DIR holds the decoder's `tokenizer.json`, the text.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: run as `python -m`, a Ctrl-C from here on exits 130 with one line (convert.cli)

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convert.audio import feature_extractor_config, load_audio, prepare_batch
from convert.errors import CheckpointError, ConvertError

TOKENIZER_FILE = "tokenizer.json"
FRAMEWORKS = ("flax", "torch")


class GenerationError(ConvertError):
    """Generation options the model cannot honour (e.g. more new tokens than decoder positions)."""


@dataclasses.dataclass
class Transcription:
    """One utterance's result.

    Attributes:
        audio: the WAV file.
        token_ids: the start token, the generated tokens and the eos (when generation ended with one).
        text: the decoded text without special tokens; None when the model has no `tokenizer.json`.
        score: the beam's length-normalised log-probability (beam search); None for greedy search.
    """

    audio: str
    token_ids: list[int]
    text: str | None
    score: float | None


def transcribe(
    model: str | Path,
    audio: Sequence[str | Path],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    revision: str | None = None,
    framework: str = "flax",
) -> list[Transcription]:
    """Transcribes WAV files with a composed model, in one padded batch.

    Args:
        model: a composed checkpoint directory or a Hub repo id.
        audio: WAV files.
        num_beams: 1 for greedy search, else the beam width.
        max_new_tokens: the most tokens generated per utterance.
        min_new_tokens: the end-of-sequence token is forbidden before this many tokens.
        length_penalty: beam search's length normalisation exponent.
        revision: the Hub revision, for a repo id.
        framework: "flax" (jit-compiled) or "torch" (the eager PyTorch reference).

    Returns:
        One `Transcription` per file, in order.

    Raises:
        ConvertError: one line naming the file or option that is wrong.
    """
    from convert.hub import resolve_source

    if framework not in FRAMEWORKS:
        raise GenerationError(f"--framework {framework}: not one of {', '.join(FRAMEWORKS)}")
    if not audio:
        raise GenerationError("no audio files given")
    directory = resolve_source(str(model), revision, what="model").path
    run = _load(directory, framework)
    features = feature_extractor_config(directory, run.config.encoder)
    waveforms = [load_audio(path, features.sampling_rate) for path in audio]
    inputs, mask = prepare_batch(waveforms, features)
    _check_length(run.config, audio, waveforms)
    try:
        out = run.generate(inputs, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, length_penalty=length_penalty)
    except ValueError as e:  # options checked by generate (token budget, beam width, ids)
        raise GenerationError(f"{directory}: {e}") from None
    sequences = np.asarray(out.sequences).tolist()
    scores = None if out.scores is None else np.asarray(out.scores).tolist()
    tokenizer = _tokenizer(directory)
    results = []
    for i, path in enumerate(audio):
        ids = _trim(sequences[i], run.config.eos_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
        results.append(Transcription(str(path), ids, text, None if scores is None else scores[i]))
    return results


@dataclasses.dataclass
class _Runner:
    config: Any
    generate: Any


def _load(directory: Path, framework: str) -> _Runner:
    if framework == "flax":
        from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

        model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
        return _Runner(model.config, model.generate)
    import torch

    from torch_reference.speech_encoder_decoder import from_pretrained

    model, _ = from_pretrained(directory)

    def generate(inputs, mask, **options):
        return model.generate(torch.from_numpy(inputs), None if mask is None else torch.from_numpy(mask), **options)

    return _Runner(model.config, generate)


def _check_length(config: Any, paths: Sequence[str | Path], waveforms: Sequence[np.ndarray]) -> None:
    """Refuses audio too short for the encoder to make one frame."""
    from convert.audio import AudioError

    needed = config.encoder.min_input_length
    for path, w in zip(paths, waveforms):
        if len(w) < needed:
            raise AudioError(f"{path}: {len(w)} samples is too short for the encoder (it needs at least {needed})")


def _trim(ids: list[int], eos: int | None) -> list[int]:
    """The start token and the generated tokens up to the first eos (kept); later padding goes."""
    if eos is not None and eos in ids[1:]:
        return ids[:ids.index(eos, 1) + 1]
    return ids


def _tokenizer(directory: Path) -> Any:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: not a tokenizers file ({str(e).splitlines()[0]})") from None


def print_transcriptions(results: Sequence[Transcription], as_json: bool, out: TextIO) -> None:
    """One line of ids per file (and one of text with a tokenizer), or one JSON object per file."""
    for r in results:
        if as_json:
            print(json.dumps(dataclasses.asdict(r)), file=out)
            continue
        print(f"{r.audio}\tids\t{' '.join(map(str, r.token_ids))}", file=out)
        if r.text is not None:
            print(f"{r.audio}\ttext\t{r.text}", file=out)


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(  # one-line usage errors, exit 2, defaults shown (convert.cli)
        prog="python -m convert.generate",
        description="Transcribe WAV files with a composed speech encoder-decoder (greedy or beam search).",
        epilog="Output: for each file, a line 'FILE<TAB>ids<TAB>ID ID ...' (the start token, the generated "
        "tokens and the end-of-sequence token) and, when DIR has tokenizer.json, 'FILE<TAB>text<TAB>TEXT' "
        "(special tokens skipped). Audio: WAV (integer PCM 8/16/24/32-bit or float 32/64-bit) at the model's "
        "sample rate (16 kHz unless preprocessor_config.json says otherwise); several channels are averaged. "
        "Example: python -m convert.generate --model out --audio speech.wav --num-beams 4",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="composed checkpoint directory (from convert.compose) or Hub repo id")
    p.add_argument("--audio", required=True, nargs="+", metavar="FILE", help="WAV file(s), transcribed as one batch")
    p.add_argument("--num-beams", type=int, default=1, metavar="N", help="beam width; 1 is greedy search (default)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="most tokens generated per file (default 64)")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                   help="forbid the end-of-sequence token before N tokens (default 0)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="X",
                   help="beam search: divide log-probabilities by length ** X (default 1.0)")
    p.add_argument("--revision", metavar="REV", help="Hub revision of --model (branch, tag, commit)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="flax",
                   help="flax (jit-compiled, default) or torch (the eager PyTorch reference)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per file: audio, token_ids, text, score")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = transcribe(args.model, args.audio, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty,
                             revision=args.revision, framework=args.framework)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_transcriptions(results, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
