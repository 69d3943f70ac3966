"""Compose a speech encoder and a text decoder into one speech encoder-decoder checkpoint.

    python -m convert.compose --encoder SRC --decoder SRC --output DIR [options]

SRC is a local checkpoint directory, a Hugging Face Hub repo id, or a built-in name (`wav2vec2`, `bart`,
`gpt2`: tiny checkpoints shipped in the package, for trying the tool offline). Every source weight is
copied bit for bit; only what neither source has (the encoder->decoder projection, GPT-2's
cross-attention) is initialised, from `--seed`. Tensors stream from the sources to the outputs one at a
time. The output directory appears only when everything, including the verification, succeeded.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: run as `python -m`, a Ctrl-C during the imports below exits 130 too

import dataclasses
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convert.base.composed import COMPOSE_REPORT, SpeechEncoderDecoderConfig
from convert.base.errors import ConvertError, KeyMapError, UnsupportedConfig, UsageError, bad_argument, with_param
from convert.base.generation_settings import composed_generation_config, decoder_generation_config
from convert.base.keymap import Entry, Plan
from convert.base.params import plan_source, save_params, subtree
from convert.base.registry import model_types, spec_for
from convert.base.resources import human_bytes, memory_budget, parse_memory, refuse_if_too_large
from convert.base.outputs import atomic_directory, check_output_location
from convert.base.writing import TensorSpec, parse_size
from convert.base.prefix import DEFAULT_PROMPT, DEFAULT_STACK_FRAMES, PROJECTOR_ACTIVATIONS, PROJECTOR_TYPES
from convert.sources import (  # noqa: F401 - re-exported: part of convert.compose's API
    BUILTIN_DIR,
    BUILTIN_SOURCES,
    BUILTINS,
    DECODER_EXTRA_FILES,
    DEFAULT_FACTOR,
    DTYPES,
    ENCODER_EXTRA_FILES,
    INIT_RULES,
    MAX_SEED,
    ComposeResult,
    Source,
    VerificationFailed,
    check_arguments,
    check_extra_files,
    init_leaf,
    is_float,
    local_path,
    open_source,
    stream_leaves,
)

REPORT_FILE = COMPOSE_REPORT















def compose_config(
    encoder: Source,
    decoder: Source,
    decoder_start_token_id: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> SpeechEncoderDecoderConfig:
    """The composed config: the decoder becomes a cross-attending decoder; token ids from it (arguments win)."""
    dec = decoder.config
    enc_width = encoder.config.encoder_output_size
    cross = dec.cross_attention_hidden_size
    if cross is not None and cross != enc_width:
        raise UnsupportedConfig(
            f"decoder={decoder.spec}: cross_attention_hidden_size={cross} differs from the encoder's output "
            f"width {enc_width}; the decoder cannot attend to this encoder", param="decoder"
        )
    vocab = dec.vocab_size
    for name, value in (("decoder_start_token_id", decoder_start_token_id), ("pad_token_id", pad_token_id),
                        ("eos_token_id", eos_token_id)):
        if value is not None and not 0 <= value < vocab:
            raise bad_argument(name, value, f"is not a token id of the decoder (its vocab_size is {vocab}: "
                                            f"0 to {vocab - 1})")
    dec = dec.as_cross_attending_decoder()
    start = _first(decoder_start_token_id, dec.decoder_start_token_id, dec.bos_token_id)
    eos = _first(eos_token_id, dec.eos_token_id)
    pad = _first(pad_token_id, dec.pad_token_id, eos)
    if start is None:
        raise UnsupportedConfig(f"decoder={decoder.spec}: no decoder_start_token_id or bos_token_id in its "
                                "config; pass decoder_start_token_id=...", param="decoder")
    raw = {"architectures": ["SpeechEncoderDecoderModel"], "model_type": "speech-encoder-decoder"}
    config = SpeechEncoderDecoderConfig(
        raw=raw, encoder=encoder.config, decoder=dec,
        decoder_start_token_id=start, pad_token_id=pad, eos_token_id=eos,
    )
    try:
        config.validate(str(decoder.path / "config.json"))  # ids taken from the decoder's config
    except ConvertError as e:
        raise with_param(e, "decoder", decoder.spec) from None
    return config


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


@dataclasses.dataclass
class Layout:
    """Where every leaf of the composed Flax tree comes from."""

    specs: list[TensorSpec]  # every leaf, in write order (sorted paths), in the output dtype
    sources: dict[str, tuple[Source, Entry]]  # leaf -> (source, entry)
    initialised: list[str]  # leaves drawn from the seed
    plans: dict[str, Plan]  # role -> plan


def plan_layout(config: SpeechEncoderDecoderConfig, encoder: Source, decoder: Source, dtype: np.dtype,
                ctc: Any = None) -> Layout:
    """Decides, from names and shapes only, which source tensor fills each leaf and which are initialised.

    `ctc` (a `convert.ctc_head.CTCPlan`) adds the CTC head: the encoder's kept `lm_head` tensors, or a new head.

    Raises:
        KeyMapError: a source tensor that fits nowhere, a wrong shape, or a leaf that neither source has
            and that is not ours to initialise.
    """
    # Deferred: it imports jax, which --help and early errors do not need.
    from flax_model.speech_encoder_decoder import param_shapes

    expected = param_shapes(config)
    sources: dict[str, tuple[Source, Entry]] = {}
    plans: dict[str, Plan] = {}
    initialisable = {"encoder": [], "decoder": [], "projection": [r"enc_to_dec_proj/"]}
    for src in (encoder, decoder):
        prefix = f"{src.role}/"
        try:
            plan = plan_source(src.checkpoint, src.arch, src.config, subtree(expected, prefix), prefix)
        except ConvertError as e:
            raise type(e)(f"{src.role}={src.spec}: {_brief_problems(str(e))}", param=src.role) from None
        plans[src.role] = plan
        initialisable[src.role] = [prefix + p for p in src.arch.initializable]
        for entry in plan.entries:
            info = src.checkpoint.info(entry.source)
            if not is_float(info.dtype):
                # Every weight of these models is floating point: an integer tensor here is not a weight.
                raise KeyMapError(f"{src.role}={src.spec}: tensor {entry.source} in {Path(info.file).name} is "
                                  f"{np.dtype(info.dtype).name}, but {entry.target} is a floating-point weight",
                                  param=src.role)
            sources[entry.target] = (src, entry)
    if ctc is not None and config.ctc is not None:
        for entry in ctc.kept:
            if tuple(expected[entry.target]) != tuple(entry.target_shape):
                raise KeyMapError(f"encoder={encoder.spec}: tensor {entry.source} has shape {list(entry.source_shape)}, "
                                  f"not the CTC head's {list(expected[entry.target])}", param="encoder")
            sources[entry.target] = (encoder, entry)
        kept = {e.source for e in ctc.kept}
        plans["encoder"].dropped = [(k, why) for k, why in plans["encoder"].dropped if k not in kept]
        plans["encoder"].entries = plans["encoder"].entries + ctc.kept
        if not ctc.kept:
            initialisable["ctc"] = [r"ctc_head/"]
    if ctc is not None and ctc.drop_reason:
        head = set(_ctc_keys(encoder))
        plans["encoder"].dropped = [(k, ctc.drop_reason if k in head else why) for k, why in plans["encoder"].dropped]
    initialised, problems = [], []
    allowed = [re.compile(p) for group in initialisable.values() for p in group]
    for path in sorted(set(expected) - set(sources)):
        if any(r.match(path) for r in allowed):
            initialised.append(path)
        else:
            problems.append(path)
    if problems:
        role = "encoder" if problems[0].startswith("encoder/") else "decoder"
        spec = encoder.spec if role == "encoder" else decoder.spec
        raise KeyMapError(f"{role}={spec}: {len(problems)} tensor(s) the model needs are missing: "
                          + ", ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""), param=role)
    specs = []
    for path in sorted(expected):
        specs.append(TensorSpec(path, dtype, tuple(expected[path])))  # every leaf is a float weight
    return Layout(specs, sources, initialised, plans)


def memory_needed(specs: Sequence[TensorSpec], verify: bool) -> tuple[int, str]:
    """At least what a compose holds at once, and what for. Composing streams one tensor at a time (read, cast,
    written to both files: about twice the largest); the verification loads the Flax model in float32, maps the
    reference's weights from the written file, and converts one module at a time to float64."""
    largest = max((math.prod(s.shape) for s in specs), default=0)
    elements = sum(math.prod(s.shape) for s in specs)
    streaming = 2 * largest * max((s.dtype.itemsize for s in specs), default=4)
    if not verify:
        return streaming, "to stream into the two weight files"
    written = sum(s.nbytes for s in specs)
    return max(streaming, 4 * elements + written + 2 * 8 * largest), ("to verify (the Flax model in float32, the "
                                                                        "reference mapped from the written file)")


def _brief_problems(message: str, limit: int = 3) -> str:
    """A key-table error lists every problem, separated by "; ": keep the first few and count the rest."""
    parts = message.split("; ")
    if len(parts) <= limit:
        return message
    return "; ".join(parts[:limit]) + f"; and {len(parts) - limit} more"






def _ctc_keys(encoder: Source) -> tuple[str, ...]:
    name = encoder.arch.ctc_head
    if name is None:
        return ()
    sep = "/" if encoder.checkpoint.format == "flax" else "."
    return tuple(f"{name}{sep}{leaf}" for leaf in (("kernel", "bias") if sep == "/" else ("weight", "bias")))




def compose(
    encoder: str,
    decoder: str,
    output: str | Path,
    *,
    encoder_revision: str | None = None,
    decoder_revision: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    verify: bool = True,
    verify_factor: float = DEFAULT_FACTOR,
    max_shard_size: str | int | None = None,
    decoder_start_token_id: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    progress: bool = True,
    log: TextIO | None = None,
    command: str | None = None,
    max_memory: str | int | None = None,
    ctc_head: str = "auto",
    ctc_vocab: str | Path | None = None,
) -> ComposeResult:
    """Composes `encoder` and `decoder` into a speech encoder-decoder checkpoint written to `output`.

    Args:
        encoder, decoder: a local directory, a Hub repo id, or a built-in name.
        output: the directory to create, atomically. It may not be, contain or lie inside a source or the
            Hugging Face cache, nor be or contain the current or home directory.
        encoder_revision, decoder_revision: Hub revisions for repo-id sources.
        seed: seeds the initialisation of what neither source has (0 to 2**32 - 1).
        dtype: "float32", "bfloat16" or "float16" for the saved floating-point weights.
        overwrite: replace an existing non-empty `output`, only if this toolkit wrote it (it holds
            `compose_report.json`).
        verify: reload the output and judge Flax against the PyTorch reference (see `convert.verify`).
        verify_factor: how many times the float32 reference's own error (against its float64 run) Flax's
            error may be.
        max_shard_size: e.g. "2GB": shard both weight files above this size.
        decoder_start_token_id, pad_token_id, eos_token_id: override the decoder config's ids.
        progress: show progress bars (on stderr, when it is a terminal).
        log: where the summary goes (stdout by default).
        command: the command line, recorded in the model card.
        max_memory: the memory the run may use ("64GB", or bytes) instead of what the machine has; a compose
            estimated to need more is refused before anything is written (`memory_needed`).
        ctc_head: the CTC head (hybrid CTC/attention; `convert.ctc_head`): "auto" keeps a `...ForCTC` encoder's
            head when its vocabulary is found (or a new head over `ctc_vocab`), "decoder" creates one over the
            decoder's vocabulary, "none" has none.
        ctc_vocab: a CTC tokenizer's `vocab.json`: the kept head's vocabulary, or a new head's.

    Returns:
        The output directory and the report (also written to `output/compose_report.json`).

    Raises:
        UsageError: an argument is invalid by itself (checked before anything is read).
        ConvertError: one line naming the parameter, file or tensor and what is wrong; nothing is written.
    """
    log = log or sys.stdout
    started = time.perf_counter()
    out_dtype, seed, verify_factor = check_arguments(
        seed, dtype, verify_factor, decoder_start_token_id=decoder_start_token_id, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, overwrite=overwrite, verify=verify, progress=progress,
        encoder_revision=encoder_revision, decoder_revision=decoder_revision)
    from convert.ctc_head import check_arguments as check_ctc_arguments
    from convert.ctc_head import plan_ctc_head

    check_ctc_arguments(ctc_head, ctc_vocab)
    shard_bytes = parse_size(max_shard_size)
    max_memory = parse_memory(max_memory)
    if not isinstance(output, (str, Path)) or not str(output).strip():
        raise bad_argument("output", repr(output), "is not a directory path")
    output = Path(output)
    # Before any source is read: the output's own rules, and its relation to the local sources named.
    local = [(f"the {role} source", p) for role, p in (("encoder", local_path(encoder, "encoder")),
                                                       ("decoder", local_path(decoder, "decoder"))) if p]
    check_output_location(output, overwrite=overwrite, sources=[*local, BUILTIN_SOURCES])
    cli.set_interrupt_note(f"nothing was written to {output}")
    enc = open_source(encoder, "encoder", encoder_revision)
    dec = open_source(decoder, "decoder", decoder_revision)
    sources = [("the encoder source", enc.path), ("the decoder source", dec.path), BUILTIN_SOURCES]
    check_output_location(output, overwrite=overwrite, sources=sources)
    check_extra_files(enc, dec)
    config = compose_config(enc, dec, decoder_start_token_id, pad_token_id, eos_token_id)
    ctc = plan_ctc_head(enc, config, ctc_head, ctc_vocab)
    config = dataclasses.replace(config, ctc=ctc.head)
    try:  # the decoder's generation settings travel (generation_config.json, else its config.json)
        generation = composed_generation_config(decoder_generation_config(dec.path, dec.checkpoint.config), config,
                                                eos_token_id)
    except ConvertError as e:
        raise with_param(e, "decoder", decoder) from None
    layout = plan_layout(config, enc, dec, out_dtype, ctc)
    std = float(config.decoder.init_scale)
    # The CTC head is the encoder's (transformers initialises Wav2Vec2ForCTC.lm_head from the encoder's config).
    std_of = lambda path: float(config.encoder.init_scale) if path.startswith("ctc_head/") else std
    rules = _decoder_init_rules(dec)
    total = sum(s.nbytes for s in layout.specs)
    needed, what = memory_needed(layout.specs, verify)
    budget = memory_budget(max_memory)
    refuse_if_too_large(needed, f"the composed model ({sum(math.prod(s.shape) for s in layout.specs) / 1e6:,.1f}M "
                        f"parameters, {human_bytes(total)} in {dtype}) {what}", budget,
                        "pass verify=False to compose without it" if verify else "")
    leaves = lambda: stream_leaves(layout.specs, layout.sources, dtype, progress,  # noqa: E731
                                   lambda spec: init_leaf(spec.name, spec.shape, std_of(spec.name), seed, spec.dtype,
                                                          rules))

    with atomic_directory(output, overwrite=overwrite, sources=sources, needed_bytes=2 * total) as tmp:
        save_params(tmp, config, leaves, layout.specs, max_shard_size=shard_bytes)
        generation.write(tmp)
        copied = _copy_extra_files(enc, dec, tmp)
        if ctc.vocabulary is not None:
            from convert.base.ctc import VOCAB_FILE

            (tmp / VOCAB_FILE).write_text(json.dumps(ctc.vocabulary, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
            copied.append(VOCAB_FILE)
        verification = None
        if verify:
            from convert.verify import verify_directory

            verification = verify_directory(tmp, factor=verify_factor, seed=seed)
        report = _report(config, enc, dec, layout, seed, std, dtype, verification, copied, command, ctc)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _write_card(tmp, report)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        report["files"] = sizes
        report["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if verification is not None and not verification["passed"]:
            raise VerificationFailed(f"verification failed: {_verification_problem(verification)}; nothing was "
                                     f"written to {output}")
    cli.set_interrupt_note(f"{output} was written completely")
    _summary(report, output, log)
    return ComposeResult(output, report)


















def _verification_problem(v: dict[str, Any]) -> str:
    from convert.verify import describe_judgement

    if not v["weight_files_identical"]:
        return (f"flax_model.msgpack and model.safetensors differ in {len(v['differing_tensors'])} tensor(s), "
                f"e.g. {v['differing_tensors'][0]}")
    return f"{v['reason']}: {describe_judgement(v)}"




def _copy_extra_files(enc: Source, dec: Source, target: Path) -> list[str]:
    copied = []
    for src, names in ((dec, DECODER_EXTRA_FILES), (enc, ENCODER_EXTRA_FILES)):
        for name in names:
            if (src.path / name).is_file():
                shutil.copyfile(src.path / name, target / name)
                copied.append(name)
    return copied


def _source_report(src: Source, plan: Plan) -> dict[str, Any]:
    from convert.model_card import read_license

    return {
        "source": src.spec,
        "repo_id": src.repo_id,
        "revision": src.revision,
        "builtin": src.path.parent == BUILTIN_DIR,
        "model_type": src.checkpoint.model_type,
        "format": src.checkpoint.format,
        "license": read_license(src.path),
        "loaded": [[e.source, e.target] for e in plan.entries],
        "dropped": [[k, why] for k, why in plan.dropped],
    }


def _decoder_init_rules(dec: Source) -> tuple[tuple[str, str], ...]:
    """The decoder architecture's own initialisers (`ArchSpec.init_rules`), over the composed model's paths."""
    return tuple((f"decoder/{pattern}", kind) for pattern, kind in dec.arch.init_rules)


def _report(config, enc, dec, layout, seed, std, dtype, verification, copied, command, ctc=None) -> dict[str, Any]:
    count = lambda names: int(sum(np.prod(s.shape, dtype=np.int64) for s in layout.specs if s.name in names))  
    loaded = set(layout.sources)
    initialised = set(layout.initialised)
    dropped = sum(
        int(np.prod(src.checkpoint.info(k).shape, dtype=np.int64))
        for src in (enc, dec) for k, _ in layout.plans[src.role].dropped
    )
    return {
        "encoder": _source_report(enc, layout.plans["encoder"]),
        "decoder": _source_report(dec, layout.plans["decoder"]),
        "initialised": layout.initialised,
        "init": {"seed": seed, "std": std, "rules": [list(r) for r in (*_decoder_init_rules(dec), *INIT_RULES)]},
        "dtype": dtype,
        "token_ids": {
            "decoder_start_token_id": config.decoder_start_token_id,
            "pad_token_id": config.pad_token_id,
            "eos_token_id": config.eos_token_id,
        },
        "parameters": {"loaded": count(loaded), "initialised": count(initialised), "dropped": dropped},
        "tensors": {"loaded": len(loaded), "initialised": len(initialised),
                    "dropped": sum(len(p.dropped) for p in layout.plans.values())},
        "copied_files": copied,
        "ctc": {"head": None if config.ctc is None else config.ctc.to_dict(),
                "note": None if ctc is None else ctc.note,
                "init_std": float(config.encoder.init_scale) if config.ctc is not None else None},
        "verification": verification,
        "transformers": transformers_compatibility(config),
        "command": command,
    }


def transformers_compatibility(config: SpeechEncoderDecoderConfig) -> dict[str, Any]:
    """Whether transformers' `SpeechEncoderDecoderModel` can load and run what compose writes, and if not, why.

    transformers decides from the configs' `hidden_size`/`output_hidden_size` fields, not from what the encoder
    really outputs: it projects when `output_hidden_size` (default `hidden_size`) differs from the decoder's
    width (and the decoder has no `cross_attention_hidden_size`), but builds the projection as
    Linear(`hidden_size`, decoder width); and it requires `cross_attention_hidden_size == hidden_size`. This
    toolkit projects from the encoder's real output width (`encoder_output_size`). And a decoder family whose
    transformers class has no cross-attention (`ArchSpec.hf_cross_attention`: Llama, Qwen2, ...) cannot run in it.

    Returns:
        {"loads": bool, "reason": str | None, "ignored": what transformers loads without using: the CTC head's
        tensors and the config's `ctc` section, which its SpeechEncoderDecoderModel has no place for}.
    """
    ignored = [] if config.ctc is None else ["ctc_head.weight", "ctc_head.bias", "config.json: ctc"]
    decoder = spec_for(config.decoder, role="decoder")
    if not decoder.hf_cross_attention:
        lm = decoder.hf_class(config.decoder.to_hf_dict()["model_type"])
        return {"loads": False, "ignored": ignored, "reason": (
            f"transformers has no cross-attending {lm}: its SpeechEncoderDecoderModel builds the decoder without the "
            f"cross-attention (it reports those weights unexpected) and its forward pass fails; `python -m "
            f"convert.extract DIR --part decoder --output llm` writes the decoder without its cross-attention, which "
            f"transformers' {lm} loads")}
    raw = config.encoder.to_hf_dict()
    hidden = raw.get("hidden_size")
    their_out = raw.get("output_hidden_size", hidden)
    width = config.encoder.encoder_output_size
    dec_width = config.decoder.hidden_size
    cross = config.decoder.cross_attention_hidden_size
    reason = None
    if cross is not None and cross != hidden:
        reason = (f"transformers requires the decoder's cross_attention_hidden_size ({cross}) to equal the encoder "
                  f"config's hidden_size ({hidden})")
    elif cross is None:
        they_project = their_out != dec_width
        if they_project != config.has_projection:
            reason = (f"transformers {'adds' if they_project else 'expects no'} an encoder-to-decoder projection "
                      f"(it compares output_hidden_size={their_out} with the decoder width {dec_width}), but the "
                      f"encoder outputs {width} features, so {'none' if not config.has_projection else 'one'} "
                      "was written")
        elif they_project and hidden != width:
            reason = (f"transformers builds enc_to_dec_proj from the encoder config's hidden_size ({hidden}) "
                      f"while the encoder outputs {width} features (its adapter's output_hidden_size), so it "
                      f"refuses the projection's weights [{dec_width}, {width}]")
    return {"loads": reason is None, "reason": reason, "ignored": ignored}


def _write_card(directory: Path, report: dict[str, Any]) -> None:
    from convert.model_card import card_info_from_report, render_model_card

    (directory / "README.md").write_text(render_model_card(card_info_from_report(report)))


def _summary(report: dict[str, Any], output: Path, log: TextIO) -> None:
    p, t = report["parameters"], report["tensors"]
    size = sum(report["files"].values())
    print(f"wrote {output} ({_human(size)}) in {report['seconds']:.1f} s", file=log)
    print(f"  loaded      {p['loaded']:>12,} parameters in {t['loaded']} tensors", file=log)
    print(f"  initialised {p['initialised']:>12,} parameters in {t['initialised']} tensors "
          f"(seed {report['init']['seed']}, std {report['init']['std']})", file=log)
    print(f"  dropped     {p['dropped']:>12,} parameters in {t['dropped']} tensors "
          f"(see {REPORT_FILE})", file=log)
    v = report["verification"]
    if v is not None:
        print(f"  verified    max |Δlogits| from a float64 reference run: Flax {v['flax_error']:.2e}, float32 "
              f"reference {v['reference_error']:.2e} (Flax may be up to {v['bound']:.2e}, {v['factor']:g} x); "
              f"Flax vs reference {v['max_abs_logits_diff']:.2e}", file=log)
    else:
        print("  not verified: Flax was not compared with the PyTorch reference", file=log)
    ctc = report.get("ctc") or {}
    if ctc.get("head"):
        print(f"  CTC head    {ctc['note']}; transformers' SpeechEncoderDecoderModel ignores it (it reports "
              "ctc_head.weight and ctc_head.bias as unexpected)", file=log)
    t = report.get("transformers") or {}
    if t and not t["loads"]:
        print(f"  transformers cannot load this model: {t['reason']}; this toolkit's Flax model and PyTorch "
              "reference load and run it", file=log)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------------------------------
# CLI


MODES = ("cross-attention", "prefix")
# The flags of the prefix mode (argparse names), passed to `compose_prefix` by the same names.
PREFIX_FLAGS = ("projector", "stack_frames", "projector_hidden_size", "projector_activation", "prompt")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m convert.compose",
        description="Compose a pretrained speech encoder and a pretrained text decoder into one speech\n"
        "encoder-decoder checkpoint (Flax msgpack + PyTorch safetensors, HF layouts).",
        epilog="SRC: a local checkpoint directory, a Hub repo id (owner/name), or a built-in tiny checkpoint\n"
        f"(encoder: {', '.join(BUILTINS['encoder'])}; decoder: {', '.join(BUILTINS['decoder'])}).\n\n"
        f"example: python -m convert.compose --encoder {BUILTINS['encoder'][0]} --decoder "
        f"{BUILTINS['decoder'][0]} --output out\n\n"
        "exit status: 0 written, 1 error (nothing written), 2 usage error, 130 interrupted.",
    )
    p.add_argument("--encoder", required=True, metavar="SRC",
                   help=f"speech encoder checkpoint ({', '.join(model_types('encoder'))})")
    p.add_argument("--decoder", required=True, metavar="SRC",
                   help=f"text decoder checkpoint ({', '.join(model_types('decoder'))})")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="directory to write (created atomically; never a source, the current or the home directory)")
    p.add_argument("--encoder-revision", metavar="REV", help="Hub revision of --encoder (branch, tag, commit)")
    p.add_argument("--decoder-revision", metavar="REV", help="Hub revision of --decoder (branch, tag, commit)")
    p.add_argument("--seed", type=int, default=0, help=f"seed for the weights neither source has (0 to {MAX_SEED})")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--max-shard-size", metavar="SIZE", help="shard the weight files above SIZE (e.g. 2GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it exists and is not empty; only a directory this toolkit wrote "
                   "(one holding compose_report.json) is ever replaced")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the output and comparing Flax with the PyTorch reference")
    p.add_argument("--verify-factor", type=float, default=DEFAULT_FACTOR, metavar="F",
                   help="the verification passes when Flax's max |Δlogits| from a float64 reference run is at most "
                   "F times the float32 reference's own")
    p.add_argument("--decoder-start-token-id", type=int, metavar="ID", help="override the decoder's start token id")
    p.add_argument("--pad-token-id", type=int, metavar="ID", help="override the pad token id")
    p.add_argument("--eos-token-id", type=int, metavar="ID", help="override the end-of-sequence token id")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the run may use, e.g. 64GB (default: what the machine has); a compose estimated to "
                   "need more is refused before anything is written")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they are drawn only when stderr is a terminal)")
    ctc = p.add_argument_group("CTC head (hybrid CTC/attention)")
    ctc.add_argument("--ctc-head", choices=("auto", "decoder", "none"), default="auto",
                     help="auto: keep a ...ForCTC encoder's CTC head (lm_head) when its vocab.json is found; "
                     "decoder: a new head over the decoder's vocabulary (joint CTC/attention decoding); none")
    ctc.add_argument("--ctc-vocab", metavar="FILE",
                     help="a CTC tokenizer's vocab.json: the kept head's vocabulary, or a new head over it")
    prefix = p.add_argument_group("Prefix mode (--mode prefix: encoder -> projector -> a decoder-only LM's prompt)")
    prefix.add_argument("--mode", choices=MODES, default=MODES[0],
                        help="cross-attention: the decoder attends to the encoder output (SpeechEncoderDecoderModel); "
                        "prefix: stacked, projected encoder frames stand where the prompt's {audio} is")
    prefix.add_argument("--projector", choices=PROJECTOR_TYPES, help="linear, or mlp (Linear, activation, Linear) "
                        "(default: linear)")
    prefix.add_argument("--stack-frames", type=int, metavar="K",
                        help=f"encoder frames stacked into one projector input (default: {DEFAULT_STACK_FRAMES})")
    prefix.add_argument("--projector-hidden-size", type=int, metavar="N",
                        help="the mlp's inner width (default: the decoder's width)")
    prefix.add_argument("--projector-activation", choices=PROJECTOR_ACTIVATIONS, help="the mlp's activation "
                        "(default: gelu)")
    prefix.add_argument("--prompt", metavar="TEMPLATE",
                        help=f"the prompt, {{audio}} where the audio goes (default: {DEFAULT_PROMPT!r})")
    hub = p.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the output to this Hub repo")
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    hub.add_argument("--commit-message", metavar="MSG", help="commit message for the upload")
    hub.add_argument("--dry-run", action="store_true",
                     help="with --push-to-hub: show what would be uploaded, upload nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli.run_command(lambda: _run(args, argv), parser)


def _run(args: Any, argv: Sequence[str] | None) -> int:
    if args.dry_run and not args.push_to_hub:
        raise UsageError("dry_run=True: needs push_to_hub", param="dry_run")
    if (args.private or args.commit_message is not None) and not args.push_to_hub:
        raise UsageError(f"{'private=True' if args.private else 'commit_message'}: applies only with push_to_hub")
    if args.push_to_hub:
        from convert.base.hub import validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except ConvertError as e:
            raise UsageError(str(with_param(e, "push_to_hub", args.push_to_hub)), param="push_to_hub") from None
    command = "python -m convert.compose " + " ".join(sys.argv[1:] if argv is None else argv)
    prefix_flags = {name: getattr(args, name) for name in PREFIX_FLAGS if getattr(args, name) is not None}
    if args.mode == "prefix":
        if args.ctc_vocab is not None or args.ctc_head == "decoder":
            raise bad_argument("ctc_vocab" if args.ctc_vocab is not None else "ctc_head",
                               args.ctc_vocab or args.ctc_head, "applies to the cross-attention mode only")
        if args.decoder_start_token_id is not None:
            raise bad_argument("decoder_start_token_id", args.decoder_start_token_id, "applies to the "
                               "cross-attention mode only (the prefix mode starts from the prompt)")
        from convert.compose_prefix import compose_prefix

        result = compose_prefix(
            args.encoder, args.decoder, args.output, **prefix_flags,
            encoder_revision=args.encoder_revision, decoder_revision=args.decoder_revision,
            seed=args.seed, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify,
            verify_factor=args.verify_factor, max_shard_size=args.max_shard_size, pad_token_id=args.pad_token_id,
            eos_token_id=args.eos_token_id, progress=args.progress, command=command, max_memory=args.max_memory)
    elif prefix_flags:
        name, value = next(iter(prefix_flags.items()))
        raise bad_argument(name, value, "applies to the prefix mode only")
    else:
        result = compose(
            args.encoder, args.decoder, args.output,
            encoder_revision=args.encoder_revision, decoder_revision=args.decoder_revision,
            seed=args.seed, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify,
            verify_factor=args.verify_factor, max_shard_size=args.max_shard_size,
            decoder_start_token_id=args.decoder_start_token_id, pad_token_id=args.pad_token_id,
            eos_token_id=args.eos_token_id, progress=args.progress, command=command, max_memory=args.max_memory,
            ctc_head=args.ctc_head, ctc_vocab=args.ctc_vocab,
        )
    if args.push_to_hub:
        from convert.push import push_to_hub

        cli.set_interrupt_note(f"the composed model is safe in {result.output}; the upload may not have completed")
        try:
            push_to_hub(result.output, args.push_to_hub, private=args.private,
                        commit_message=args.commit_message, dry_run=args.dry_run)
        except ConvertError as e:
            raise type(e)(f"{e} (the composed model is safe in {result.output})", param=e.param) from None
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
