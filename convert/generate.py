"""Transcribe audio with a composed speech encoder-decoder: files, directories or JSON-lines manifests, batched by
length, one JSON line per file.

    python -m convert.generate --model DIR --audio FILE|DIR [...] [--manifest FILE.jsonl ...] [--output OUT.jsonl]
        [--batch-size 8] [--buckets 4] [--chunk-seconds S] [--mesh data=2,fsdp=4]
        [generation flags: --num-beams N --max-new-tokens N ...]

DIR is a composed checkpoint directory (from `convert.compose`) or a Hub repo id. Generation follows the model's
`generation_config.json` (what transformers' `generate` would do); every generation flag overrides one setting of
it. Each output line is `{"audio", "text", "token_ids", "score", "seconds"}` (plus `"reference"` from a manifest,
`"chunks"`, and `"words"` with `--timestamps`), in the order the batches finish; a summary (audio-seconds per second, compilations, WER and CER
when the manifest gives references) goes to stderr. The work is `convert.transcribe.transcribe`.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: run as `python -m`, a Ctrl-C during the imports below exits 130 too

import errno
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from convert.base.errors import OutputError, UsageError, bad_argument
from convert.finetune_output import ADAPTER_DIR
from convert.base.outputs import atomic_file, check_output_file, input_sources
from convert.transcribe import (
    DEFAULT_TOKENS_PER_SECOND,
    FRAMEWORKS,
    Transcription,
    TranscriptionReport,
    collect_inputs,
    transcribe,
)

# Generation flags: transformers' setting names (the flag is the name with dashes); None leaves the model's value.
GENERATION_FLAGS: dict[str, tuple[Any, str]] = {
    "num_beams": (int, "beam width; 1 is greedy search or sampling"),
    "max_new_tokens": (int, "most tokens generated per utterance (the model's max_length - 1 otherwise, 20 by default)"),
    "min_new_tokens": (int, "forbid the end-of-sequence tokens before this many tokens"),
    "length_penalty": (float, "beam search: divide log-probabilities by length ** X"),
    "no_repeat_ngram_size": (int, "never repeat an n-gram of this size"),
    "repetition_penalty": (float, "penalise tokens already in the sequence (1.0: off)"),
    "temperature": (float, "sampling: divide the logits by X"),
    "top_k": (int, "sampling: keep the K most likely tokens (0: off; transformers' default 50)"),
    "top_p": (float, "sampling: keep the most likely tokens whose probability reaches P"),
    "forced_bos_token_id": (int, "force this token first (e.g. a translation model's target language)"),
    "decoder_start_token_id": (int, "the decoder's first input token"),
    "pad_token_id": (int, "what finished rows are padded with"),
}
LIST_FLAGS: dict[str, str] = {
    "eos_token_id": "end-of-sequence token id(s)",
    "forced_eos_token_id": "token id(s) forced at the last position allowed",
    "suppress_tokens": "token ids never generated",
    "begin_suppress_tokens": "token ids not generated first",
}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m convert.generate",
        description="Transcribe audio files, directories or JSON-lines manifests with a composed speech "
        "encoder-decoder, batched by length; one JSON line per file.",
        epilog="Output lines: {\"audio\", \"text\", \"token_ids\", \"score\", \"seconds\", \"chunks\"} (+ \"reference\" "
        "from a manifest). Audio: anything libsndfile reads (WAV, FLAC, OGG, MP3, ...), resampled to the model's "
        "rate, channels averaged. Example: python -m convert.generate --model asr --manifest test.jsonl "
        "--num-beams 4 --output test.out.jsonl",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="composed checkpoint directory (from convert.compose) or Hub repo id")
    p.add_argument("--audio", nargs="+", default=[], metavar="PATH",
                   help="audio files and directories (every audio file below a directory)")
    p.add_argument("--manifest", nargs="+", default=[], metavar="FILE", dest="manifests",
                   help='JSON-lines manifests: {"audio": PATH, "text": optional reference} per line; a relative '
                   "PATH is relative to the manifest")
    p.add_argument("--output", metavar="FILE",
                   help="write the JSON lines here instead of stdout (it appears complete, or not at all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file (never one the run reads)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="flax",
                   help="flax (jit-compiled) or torch (the eager PyTorch reference)")
    p.add_argument("--revision", metavar="REV", help="Hub revision of --model (branch, tag, commit)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="utterances per batch")
    p.add_argument("--buckets", type=int, default=4, metavar="N",
                   help="most distinct padded lengths (each compiles once)")
    p.add_argument("--chunk-seconds", type=float, metavar="S",
                   help="transcribe audio longer than S seconds in overlapping S-second chunks (default: refuse "
                   "audio too long for the model)")
    p.add_argument("--chunk-overlap-seconds", type=float, metavar="S",
                   help="overlap of consecutive chunks (with --chunk-seconds; default: 1.0)")
    p.add_argument("--tokens-per-second", type=float, default=DEFAULT_TOKENS_PER_SECOND, metavar="X",
                   help="speech rate assumed to bound the audio max_new_tokens can describe")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of sampling (--do-sample)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="run sharded over every device, e.g. data=2,fsdp=4 (axes data, fsdp, model; the product of "
                   "the sizes is the device count): params split over fsdp/model, each batch's rows over data")
    p.add_argument("--scan-layers", action="store_true",
                   help="run the identical encoder and decoder layers with nn.scan (Flax): compiles faster, same "
                   "tokens")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the run may use, e.g. 64GB (default: what the machine has); a batch estimated to need "
                   "more is refused before any work")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("generation (each flag overrides the model's generation_config.json)")
    g.add_argument("--generation-config", metavar="FILE",
                   help="a generation_config.json to use over the model's")
    g.add_argument("--do-sample", action="store_true", default=None, help="sample instead of searching")
    g.add_argument("--early-stopping", choices=("true", "false", "never"),
                   help="beam search's stopping rule (transformers' early_stopping)")
    for name, (kind, text) in GENERATION_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N" if kind is int else "X", help=text)
    for name, text in LIST_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=int, nargs="+", metavar="ID", help=text)
    g.add_argument("--bad-words-ids", metavar="JSON", help="token sequences never generated, e.g. '[[12], [7, 9]]'")
    from convert.datasets_source import add_arguments

    add_arguments(p.add_argument_group("data from 🤗 datasets (a split, beside or instead of files)"),
                  (("--split", "test", "the split to transcribe"),), "the references (used when present)")
    c = p.add_argument_group("CTC (a model with a CTC head)")
    c.add_argument("--ctc-weight", type=float, metavar="X",
                   help="one-pass joint CTC/attention beam search: each step scores (1 - X) attention + X CTC prefix "
                   "score (0 to 1; the head must share the decoder's vocabulary)")
    c.add_argument("--decoder", choices=("attention", "ctc"), default="attention",
                   help="ctc: decode with the CTC head alone (best path; the decoder does not run)")
    c.add_argument("--timestamps", action="store_true",
                   help='add "words": [{"word", "start", "end"}] (seconds) from the CTC alignment')
    return p


def generation_options(args: Any) -> dict[str, Any]:
    """The generation settings the flags set (only those given)."""
    options = {name: getattr(args, name) for name in (*GENERATION_FLAGS, *LIST_FLAGS)
               if getattr(args, name) is not None}
    if args.do_sample:
        options["do_sample"] = True
    if args.early_stopping is not None:
        options["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    if args.bad_words_ids is not None:
        try:
            options["bad_words_ids"] = json.loads(args.bad_words_ids)
        except json.JSONDecodeError as e:
            raise bad_argument("bad_words_ids", args.bad_words_ids, f"is not JSON ({e.msg})") from None
    return options


def read_generation_config(path: str | None) -> Any:
    if path is None:
        return None
    from convert.base.generation_settings import GenerationConfig, read_json_object

    if not Path(path).is_file():
        raise bad_argument("generation_config", path, "no such file")
    return GenerationConfig.from_hf_dict(read_json_object(Path(path)), path)


def run(args: Any, out: TextIO, log: TextIO) -> TranscriptionReport:
    mesh = None
    if args.mesh is not None:
        from flax_model.sharding import mesh_from_flag

        if args.framework != "flax":
            raise bad_argument("mesh", args.mesh, f"needs framework=flax (the {args.framework} reference runs on "
                               "one device)")

        mesh = mesh_from_flag(args.mesh)  # a bad value is refused before any work
    from convert.datasets_source import given_without_dataset

    stray = given_without_dataset(args)
    if stray is not None:
        raise bad_argument(stray, True if stray == "streaming" else getattr(args, stray), "applies to --dataset")
    if not args.audio and not args.manifests and args.dataset is None:
        raise UsageError("audio=[]: no audio given (pass --audio files or directories, --manifest, or --dataset)",
                         param="audio")
    if args.output is not None:
        check_output_file(args.output, overwrite=args.overwrite)  # before anything is read
    elif args.overwrite:
        raise UsageError("overwrite=True: applies only with output", param="overwrite")
    datasets = []
    if args.dataset is not None:
        from convert.datasets_source import source_from_arguments

        datasets.append(source_from_arguments(args, args.split))
    options = generation_options(args)
    generation_config = read_generation_config(args.generation_config)

    def run_to(stream: TextIO) -> TranscriptionReport:
        def write(result: Transcription) -> None:
            try:
                stream.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
                stream.flush()
            except BrokenPipeError:
                raise
            except OSError as e:
                if args.output is not None:
                    raise  # atomic_file names --output
                raise OutputError(f"{stream_name(stream)}: cannot be written ({e.strerror or type(e).__name__}"
                                  f"{': the disk is full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''})"
                                  ) from None

        return transcribe(args.model, args.audio, manifests=args.manifests, datasets=datasets,
                          framework=args.framework,
                          revision=args.revision, batch_size=args.batch_size, buckets=args.buckets,
                          chunk_seconds=args.chunk_seconds, chunk_overlap_seconds=args.chunk_overlap_seconds,
                          tokens_per_second=args.tokens_per_second, seed=args.seed, progress=args.progress,
                          on_result=write, generation_config=generation_config, mesh=mesh,
                          scan_layers=args.scan_layers, max_memory=args.max_memory,
                          ctc_weight=args.ctc_weight, decoder=args.decoder, timestamps=args.timestamps, **options)

    if args.output is None:
        report = run_to(out)
    else:
        # The output is never what the run reads: the model, an audio file, a manifest, the generation config.
        utterances = collect_inputs(args.audio, args.manifests)
        sources = [*input_sources("the model", [args.model]),
                   *input_sources("an audio file being read", [u.audio for u in utterances]),
                   *input_sources("a manifest being read", args.manifests),
                   *input_sources("a dataset being read", [args.dataset] * bool(
                       args.dataset and Path(args.dataset).exists())),
                   *input_sources("the generation config being read", [args.generation_config] * bool(
                       args.generation_config))]
        with atomic_file(args.output, args.overwrite, sources=sources) as tmp, \
                tmp.open("w", encoding="utf-8") as handle:
            report = run_to(handle)
    print(report.summary(), file=log)
    adapter = Path(args.model) / ADAPTER_DIR
    if adapter.is_dir():  # `convert.finetune --lora-export adapter` wrote the base weights and this adapter
        print(f"note: {adapter} holds a LoRA adapter that was not applied: these transcripts are the base weights' "
              "(fine-tune with --lora-export merged for a model with the adapter in its weights)", file=log)
    return report


def stream_name(stream: TextIO) -> str:
    """The file a stream writes to (what standard output was redirected to), for messages."""
    try:
        return os.readlink(f"/proc/self/fd/{stream.fileno()}")
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return "standard output"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int:
        run(args, sys.stdout, sys.stderr)
        return cli.EXIT_OK

    return cli.run_command(work, parser)


if __name__ == "__main__":
    cli.run(main)
