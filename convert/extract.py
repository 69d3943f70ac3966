"""Extract one part of a composed model as a checkpoint of its own, in the part's transformers format.

    python -m convert.extract DIR --part decoder|encoder --output OUT [--overwrite] [--max-shard-size SIZE]

DIR is a directory `convert.compose` (or `save_pretrained`, or `convert.finetune`) wrote. OUT gets the part's
`config.json` (its sub-config of DIR's, naming the transformers class that reads it), `model.safetensors` with the
part's own key names (the composed keys without `decoder.` / `encoder.`, tensors copied bit for bit, tied
weights left out as transformers saves them), and the part's tokenizer or feature-extractor files. transformers'
`AutoModelForCausalLM.from_pretrained(OUT)` (a decoder) or `AutoModel.from_pretrained(OUT)` (an encoder) reads
it. What transformers' class of the part has no place for is left out and listed with the reason: always
`enc_to_dec_proj` (it belongs to neither part), and the cross-attention of a decoder family whose transformers
class has none (`ArchSpec.hf_cross_attention`), which the composer created (the part's config then reads as its
source's did). The output appears atomically, as compose's does, and is never written over an input.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: run as `python -m`, a Ctrl-C during the imports below exits 130 too

import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convert.base.checkpoint import CONFIG, Checkpoint
from convert.base.composed import SpeechEncoderDecoderConfig, composed_keymap, read_any_config
from convert.base.errors import ConvertError, UnsupportedConfig, bad_argument
from convert.base.keymap import T
from convert.base.registry import spec_for
from convert.base.spec import ArchSpec
from convert.base.outputs import TOOLKIT_MARKER, atomic_directory, check_output_location
from convert.base.writing import ShardedWriter, TensorSpec, parse_size
from convert.sources import DECODER_EXTRA_FILES, ENCODER_EXTRA_FILES

PARTS = ("decoder", "encoder")
_EXTRA_FILES = {"decoder": DECODER_EXTRA_FILES, "encoder": ENCODER_EXTRA_FILES}
_PROJECTION = "enc_to_dec_proj."


@dataclasses.dataclass
class ExtractResult:
    output: Path
    report: dict[str, Any]


def extract(
    directory: str | Path,
    part: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int | None = None,
    log: TextIO | None = None,
) -> ExtractResult:
    """Writes the `part` ("decoder" or "encoder") of the composed model in `directory` to `output`.

    Args:
        directory: a composed model's directory (config.json of `model_type` "speech-encoder-decoder").
        part: "decoder" or "encoder".
        output: the directory to create, atomically (the rules of `convert.compose`'s output: never a source,
            the current or the home directory; an existing one only with `overwrite`, only if this toolkit wrote it).
        overwrite: replace an existing non-empty `output` that this toolkit wrote.
        max_shard_size: e.g. "2GB": shard `model.safetensors` above this size.
        log: where the summary goes (stdout by default).

    Returns:
        The output directory and the report (also written to `output/compose_report.json`, the marker of a
        directory this toolkit wrote).

    Raises:
        UsageError: an argument is invalid by itself (checked before anything is read).
        ConvertError: one line naming the file, field or tensor; nothing is written.
    """
    log = log or sys.stdout
    part = cli.require_choice("part", part, PARTS)
    if not isinstance(overwrite, bool):
        raise bad_argument("overwrite", overwrite, "is not True or False")
    shard_bytes = parse_size(max_shard_size)
    for name, value in (("directory", directory), ("output", output)):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise bad_argument(name, repr(value), "is not a directory path")
    directory, output = Path(directory), Path(output)
    sources = [("the composed model", directory)]
    check_output_location(output, overwrite=overwrite, sources=sources)
    cli.set_interrupt_note(f"nothing was written to {output}")
    from convert.base.prefix import is_prefix_directory

    if is_prefix_directory(directory):
        raise UnsupportedConfig(f"{directory}: a prefix composition keeps its {part} as a checkpoint of its own, in "
                                f"{directory / part} (transformers loads that directory as it is)", param="directory")
    checkpoint = Checkpoint(directory)
    where = str(directory / CONFIG)
    config = read_any_config(checkpoint.config, where)
    if not isinstance(config, SpeechEncoderDecoderConfig):
        raise UnsupportedConfig(f"{where}: model_type={checkpoint.config.get('model_type')!r} is not a composed "
                                "model (extract reads what convert.compose wrote)", param="directory")
    part_config = getattr(config, part)
    spec = spec_for(part_config, where, role=part)
    keep_cross = part == "encoder" or spec.hf_cross_attention
    out_config = part_config if keep_cross else part_config.as_causal_lm()
    hf_class = spec.hf_class(out_config.to_hf_dict()["model_type"])
    tensors, left_out = _plan(checkpoint, config, part, spec, hf_class, keep_cross)
    specs = [TensorSpec(key, info.dtype, info.shape) for key, (_, _, info) in tensors.items()]
    total = sum(s.nbytes for s in specs)

    with atomic_directory(output, overwrite=overwrite, sources=sources, needed_bytes=total) as tmp:
        (tmp / CONFIG).write_text(json.dumps({**out_config.to_hf_dict(), "architectures": [hf_class]}, indent=2)
                                  + "\n")
        writer = ShardedWriter(tmp, "safetensors", specs, shard_bytes, metadata={"format": "pt"})
        for key, (source, transform, _) in tensors.items():
            array = checkpoint.get(source)
            writer.write(key, transform.to_torch(array, contiguous=False) if transform is not None else array)
            del array
        writer.close()
        copied = [name for name in _EXTRA_FILES[part] if (directory / name).is_file()]
        for name in copied:
            shutil.copyfile(directory / name, tmp / name)
        report = {
            "written_by": "speech-encdec-flax",
            "extracted_from": str(directory),
            "part": part,
            "transformers_class": hf_class,
            "tensors": len(tensors),
            "parameters": int(sum(int(np.prod(s.shape, dtype=np.int64)) for s in specs)),
            "left_out": [[key, why] for key, why in left_out],
            "copied_files": copied,
        }
        (tmp / TOOLKIT_MARKER).write_text(json.dumps(report, indent=2) + "\n")
    cli.set_interrupt_note(f"{output} was written completely")
    _summary(report, output, total, log)
    return ExtractResult(output, report)


def _plan(checkpoint: Checkpoint, config: SpeechEncoderDecoderConfig, part: str, spec: ArchSpec, hf_class: str,
          keep_cross: bool) -> tuple[dict[str, tuple[str, T | None, Any]], list[tuple[str, str]]]:
    """{part key: (source key, transform to PyTorch's layout or None, TensorInfo in the part's layout)} and the
    (composed key, why) of what is left out."""
    prefix = f"{part}."
    keymap = composed_keymap(config)
    cross = [re.compile(p) for p in spec.initializable] if not keep_cross else []
    tensors: dict[str, tuple[str, T | None, Any]] = {}
    left_out: list[tuple[str, str]] = []
    where = str(checkpoint.directory)
    for source in checkpoint.keys():
        if checkpoint.format == "flax":
            mapped = keymap.to_torch(source)
            if mapped is None:
                raise ConvertError(f"{where}: tensor {source} is not a parameter of the composed model's key table",
                                   param="directory")
            key, transform = mapped
        else:
            key, transform = source, None
            if keymap.to_flax(key) is None:
                raise ConvertError(f"{where}: tensor {key} is not a parameter of the composed model's key table",
                                   param="directory")
        if key.startswith(_PROJECTION):
            left_out.append((key, "the encoder-to-decoder projection belongs to neither part"))
            continue
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        flax_path = spec.keymap.to_flax(local)
        if cross and flax_path is not None and any(p.match(flax_path[0]) for p in cross):
            left_out.append((key, f"cross-attention, which transformers' {hf_class} does not have"))
            continue
        info = checkpoint.info(source)
        if transform is not None:
            info = dataclasses.replace(info, shape=transform.torch_shape(info.shape))
        tensors[local] = (source, transform, info)
    if not tensors:
        raise ConvertError(f"{where}: no {part} tensors (no key starts with {prefix!r})", param="directory")
    return tensors, left_out


def _summary(report: dict[str, Any], output: Path, total: int, log: TextIO) -> None:
    print(f"wrote {output}: the {report['part']} of {report['extracted_from']} as {report['transformers_class']} "
          f"({report['parameters']:,} parameters in {report['tensors']} tensors, {total / 1e6:.1f} MB)", file=log)
    for key, why in report["left_out"][:3]:
        print(f"  left out {key}: {why}", file=log)
    if len(report["left_out"]) > 3:
        print(f"  ... and {len(report['left_out']) - 3} more left out (see {TOOLKIT_MARKER})", file=log)
    loader = "AutoModelForCausalLM" if report["part"] == "decoder" else "AutoModel"
    print(f"  load it with transformers.{loader}.from_pretrained({str(output)!r})", file=log)


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m convert.extract",
        description="Write one part of a composed speech encoder-decoder (its text decoder or its speech encoder)\n"
        "as a checkpoint of its own, in the part's transformers format.",
        epilog="example: python -m convert.extract asr --part decoder --output llm\n\n"
        "exit status: 0 written, 1 error (nothing written), 2 usage error, 130 interrupted.",
    )
    p.add_argument("directory", metavar="DIR", help="a composed model's directory")
    p.add_argument("--part", required=True, choices=PARTS, help="which part to write")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="directory to write (created atomically; never DIR, the current or the home directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists and is not empty; only a directory this toolkit wrote is replaced")
    p.add_argument("--max-shard-size", metavar="SIZE", help="shard model.safetensors above SIZE (e.g. 2GB)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int:
        extract(args.directory, args.part, args.output, overwrite=args.overwrite,
                max_shard_size=args.max_shard_size)
        return cli.EXIT_OK

    return cli.run_command(work, parser)


if __name__ == "__main__":
    cli.run(main)
