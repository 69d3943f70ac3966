"""The prefix composition (`python -m convert.compose --mode prefix`): a speech encoder, a projector and a
decoder-only LM, written as `convert.base.prefix` lays it out (each part in its own transformers format).

Every source weight is copied bit for bit (cast only when `dtype` asks), streamed one tensor at a time as in the
cross-attention mode; only the projector is initialised (from `seed`, with the decoder's initialiser scale:
kernels N(0, std), biases 0). The prompt is tokenised with the decoder's `tokenizer.json`. The output appears
atomically, after verification (the Flax model against the PyTorch reference on a seeded input) unless
`verify=False`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convert import cli
from convert.base.composed import COMPOSE_REPORT
from convert.base.errors import CheckpointError, ConvertError, KeyMapError, UnsupportedConfig, bad_argument, with_param
from convert.base.generation_settings import decoder_generation_config
from convert.base.keymap import check_missing
from convert.base.params import plan_source, save_params
from convert.base.prefix import (
    DEFAULT_PROMPT,
    DEFAULT_STACK_FRAMES,
    PREFIX_MODEL_TYPE,
    PROJECTOR_ACTIVATIONS,
    PROJECTOR_TYPES,
    SpeechPrefixConfig,
    projector_shapes,
    split_prompt,
    tokenize_prompt,
)
from convert.base.prefix_io import write_projector
from convert.base.resources import human_bytes, memory_budget, parse_memory, refuse_if_too_large
from convert.base.outputs import atomic_directory, check_output_location
from convert.base.tokenizer_file import read_tokenizer
from convert.base.writing import TensorSpec, parse_size
from convert.sources import (
    BUILTIN_SOURCES,
    DECODER_EXTRA_FILES,
    DEFAULT_FACTOR,
    ENCODER_EXTRA_FILES,
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


def prefix_config(encoder: Source, decoder: Source, projector: str, stack_frames: int,
                  projector_hidden_size: int | None, projector_activation: str, prompt: str,
                  eos_token_id: int | None, pad_token_id: int | None, tokenizer: Any = None) -> SpeechPrefixConfig:
    """The composed config: the parts' configs unchanged, the projector, the tokenised prompt and the ids.
    `tokenizer`: the decoder's, when the caller has read it (`check_extra_files`).

    Raises:
        UnsupportedConfig: a decoder that is not a language model on its own, or one without a tokenizer.json
            (the prompt is tokenised with it) or an eos token.
    """
    if not decoder.arch.causal_lm:
        from convert.base.registry import specs

        lms = ", ".join(s.name for s in specs("decoder") if s.causal_lm)
        raise UnsupportedConfig(f"decoder={decoder.spec}: {decoder.arch.name} is not a decoder-only language model; "
                                f"the prefix mode takes one of: {lms}", param="decoder")
    path = decoder.path / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedConfig(f"decoder={decoder.spec}: no tokenizer.json (the prefix mode tokenises the prompt "
                                "with the decoder's tokenizer)", param="decoder")
    if tokenizer is None:
        tokenizer = read_tokenizer(path, CheckpointError, decoder.config.vocab_size,
                                   where=f"decoder={decoder.spec}: {path.name}", param="decoder")
    dec = decoder.config
    before, after = tokenize_prompt(prompt, lambda text, specials: tokenizer.encode(
        text, add_special_tokens=specials).ids, getattr(dec, "bos_token_id", None))
    eos = eos_token_id if eos_token_id is not None else dec.eos_token_id
    if eos is None:
        raise UnsupportedConfig(f"decoder={decoder.spec}: no eos_token_id in its config; pass eos_token_id=...",
                                param="decoder")
    pad = next(v for v in (pad_token_id, getattr(dec, "pad_token_id", None), eos) if v is not None)
    config = SpeechPrefixConfig(
        raw={"architectures": ["SpeechPrefixLM"], "model_type": PREFIX_MODEL_TYPE}, encoder=encoder.config,
        decoder=dec, projector_type=projector, stack_frames=stack_frames, projector_hidden_size=projector_hidden_size,
        projector_activation=projector_activation, prompt=prompt, prompt_ids_before=tuple(before),
        prompt_ids_after=tuple(after), eos_token_id=eos, pad_token_id=pad)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < dec.vocab_size:
            raise bad_argument(name, value, f"is not a token id of the decoder (its vocab_size is {dec.vocab_size})")
    try:
        config.check_token_ids(str(decoder.path / "config.json"))
    except ConvertError as e:
        raise with_param(e, "decoder", decoder.spec) from None
    return config


def _part_layout(src: Source, dtype: np.dtype) -> tuple[list[TensorSpec], dict[str, Any]]:
    """Which source tensor fills each of a part's own leaves (all of them: a part has nothing to initialise).

    Raises:
        KeyMapError: a tensor that fits nowhere, a wrong shape, a missing tensor, cross-attention in a decoder.
    """
    from convert.base.registry import spec_for
    from flax_model.speech_encoder_decoder import param_shapes

    expected = param_shapes(src.config)
    if src.role == "decoder":
        import re

        groups = dict(spec_for(src.config, role="decoder").groups).get("cross-attention", ())
        if any(re.fullmatch(g, p) for g in groups for p in expected):
            raise UnsupportedConfig(f"decoder={src.spec}: its config adds cross-attention; the prefix mode takes the "
                                    "language model without it", param="decoder")
    try:
        plan = plan_source(src.checkpoint, src.arch, src.config, expected)
        check_missing(plan, where=str(src.path))
    except ConvertError as e:
        raise type(e)(f"{src.role}={src.spec}: {e}", param=src.role) from None
    entries = {e.target: e for e in plan.entries}
    for entry in plan.entries:
        info = src.checkpoint.info(entry.source)
        if not is_float(info.dtype):
            raise KeyMapError(f"{src.role}={src.spec}: tensor {entry.source} is {np.dtype(info.dtype).name}, but "
                              f"{entry.target} is a floating-point weight", param=src.role)
    return [TensorSpec(path, dtype, tuple(expected[path])) for path in sorted(expected)], {"entries": entries,
                                                                                          "plan": plan}


def compose_prefix(
    encoder: str,
    decoder: str,
    output: str | Path,
    *,
    projector: str = "linear",
    stack_frames: int = DEFAULT_STACK_FRAMES,
    projector_hidden_size: int | None = None,
    projector_activation: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    encoder_revision: str | None = None,
    decoder_revision: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    verify: bool = True,
    verify_factor: float = DEFAULT_FACTOR,
    max_shard_size: str | int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    progress: bool = True,
    log: TextIO | None = None,
    command: str | None = None,
    max_memory: str | int | None = None,
) -> ComposeResult:
    """Composes `encoder`, a projector and the decoder-only LM `decoder` into `output` (see the module docstring).

    Args:
        encoder, decoder: a local directory, a Hub repo id, or a built-in name; the decoder must be a causal LM
            with a `tokenizer.json`.
        output: the directory to create, atomically (the same rules as `convert.compose.compose`).
        projector: "linear" or "mlp".
        stack_frames: K, encoder frames stacked into one projector input (SLAM-ASR: 5 on a 50 Hz encoder).
        projector_hidden_size: the mlp's inner width (default: the decoder's width); mlp only.
        projector_activation: the mlp's activation, "gelu" (Voxtral, the default) or "relu" (SLAM-ASR); mlp only.
        prompt: the template; `{audio}` marks where the audio embeddings go.
        pad_token_id, eos_token_id: override the decoder's ids.
        max_memory: refuse before writing anything when the estimate exceeds it (default: the machine's memory).
        The others: as `convert.compose.compose`.

    Returns:
        The output directory and the report (also in `output/compose_report.json`).

    Raises:
        UsageError: an argument is invalid by itself (checked before anything is read).
        ConvertError: one line naming the parameter, file or tensor and what is wrong; nothing is written.
    """
    log = log or sys.stdout
    started = time.perf_counter()
    out_dtype, seed, verify_factor = check_arguments(
        seed, dtype, verify_factor, pad_token_id=pad_token_id, eos_token_id=eos_token_id, overwrite=overwrite,
        verify=verify, progress=progress, encoder_revision=encoder_revision, decoder_revision=decoder_revision)
    cli.require_choice("projector", projector, PROJECTOR_TYPES)
    if projector_activation is not None:
        cli.require_choice("projector_activation", projector_activation, PROJECTOR_ACTIVATIONS)
    cli.require_int("stack_frames", stack_frames, 1, 4096)
    cli.require_int("projector_hidden_size", projector_hidden_size, 1, 2**31 - 1, allow_none=True)
    if projector != "mlp":  # the linear projector has no hidden layer: its settings would be recorded and unused
        for name, value in (("projector_hidden_size", projector_hidden_size),
                            ("projector_activation", projector_activation)):
            if value is not None:
                raise bad_argument(name, value, f"applies to projector=mlp only (this projector is {projector})")
    projector_activation = projector_activation or "gelu"
    split_prompt(prompt)
    shard_bytes = parse_size(max_shard_size)
    budget = memory_budget(parse_memory(max_memory))
    if not isinstance(output, (str, Path)) or not str(output).strip():
        raise bad_argument("output", repr(output), "is not a directory path")
    output = Path(output)
    local = [(f"the {role} source", p) for role, p in (("encoder", local_path(encoder, "encoder")),
                                                       ("decoder", local_path(decoder, "decoder"))) if p]
    check_output_location(output, overwrite=overwrite, sources=[*local, BUILTIN_SOURCES])
    cli.set_interrupt_note(f"nothing was written to {output}")
    enc = open_source(encoder, "encoder", encoder_revision)
    dec = open_source(decoder, "decoder", decoder_revision)
    sources = [("the encoder source", enc.path), ("the decoder source", dec.path), BUILTIN_SOURCES]
    check_output_location(output, overwrite=overwrite, sources=sources)
    tokenizer = check_extra_files(enc, dec)
    config = prefix_config(enc, dec, projector, stack_frames, projector_hidden_size, projector_activation, prompt,
                           eos_token_id, pad_token_id, tokenizer)
    try:
        generation = decoder_generation_config(dec.path, dec.checkpoint.config)
    except ConvertError as e:
        raise with_param(e, "decoder", decoder) from None
    layouts = {src.role: (src, *_part_layout(src, out_dtype)) for src in (enc, dec)}
    std = float(config.decoder.init_scale)
    projector_elements = [math.prod(shape) for shape in projector_shapes(config).values()]
    shapes = [s.shape for _, specs, _ in layouts.values() for s in specs] + list(projector_shapes(config).values())
    total = (sum(s.nbytes for _, specs, _ in layouts.values() for s in specs)
             + sum(projector_elements) * out_dtype.itemsize)
    elements = sum(math.prod(shape) for shape in shapes)
    largest = max(math.prod(shape) for shape in shapes)
    # Streaming holds about two copies of the largest tensor; the verification the reference in float32 and
    # float64 (`convert.verify_prefix`), then the Flax model in float32.
    needed = 16 * elements if verify else 2 * largest * max(out_dtype.itemsize, 4)
    refuse_if_too_large(needed, f"the composed model ({elements / 1e6:,.1f}M parameters, {human_bytes(total)} in "
                        f"{dtype}) {'to verify' if verify else 'to stream into the weight files'}", budget,
                        "pass verify=False to compose without it" if verify else "")
    projector_leaves = {path: init_leaf(path, shape, std, seed, out_dtype)
                        for path, shape in projector_shapes(config).items()}

    with atomic_directory(output, overwrite=overwrite, sources=sources, needed_bytes=2 * total) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        copied = []
        for role, (src, specs, layout) in layouts.items():
            part = tmp / role
            part.mkdir()
            entries = layout["entries"]
            sourced = {path: (src, entries[path]) for path in entries}
            save_params(part, src.config, lambda: stream_leaves(specs, sourced, dtype, progress),
                        specs, max_shard_size=shard_bytes)
            for name in DECODER_EXTRA_FILES if role == "decoder" else ENCODER_EXTRA_FILES:
                if (src.path / name).is_file():
                    shutil.copyfile(src.path / name, part / name)
                    copied.append(f"{role}/{name}")
        generation.write(tmp / "decoder")
        write_projector(tmp, config, projector_leaves)
        verification = None
        if verify:
            from convert.verify_prefix import verify_prefix_directory

            verification = verify_prefix_directory(tmp, factor=verify_factor, seed=seed)
        report = {
            "mode": "prefix",
            "encoder": {"source": enc.spec, "repo_id": enc.repo_id, "revision": enc.revision,
                        "model_type": enc.checkpoint.model_type,
                        "dropped": [[k, why] for k, why in layouts["encoder"][2]["plan"].dropped]},
            "decoder": {"source": dec.spec, "repo_id": dec.repo_id, "revision": dec.revision,
                        "model_type": dec.checkpoint.model_type,
                        "dropped": [[k, why] for k, why in layouts["decoder"][2]["plan"].dropped]},
            "projector": {"type": projector, "stack_frames": stack_frames, "input_size": config.projector_input_size,
                          "hidden_size": config.projector_inner_size if projector == "mlp" else None,
                          "activation": projector_activation if projector == "mlp" else None,
                          "parameters": int(sum(v.size for v in projector_leaves.values()))},
            "initialised": sorted(projector_leaves),
            "init": {"seed": seed, "std": std},
            "prompt": {"template": prompt, "ids_before": list(config.prompt_ids_before),
                       "ids_after": list(config.prompt_ids_after)},
            "token_ids": {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id},
            "dtype": dtype,
            "parameters": {role: int(sum(np.prod(s.shape, dtype=np.int64) for s in specs))
                           for role, (_, specs, _) in layouts.items()},
            "copied_files": copied,
            "verification": verification,
            "transformers": {"loads": True, "reason": None,
                             "how": "encoder/ and decoder/ each load with their own transformers class; "
                                    "the projector is projector.safetensors"},
            "command": command,
        }
        report["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / COMPOSE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report))
        if verification is not None and not verification["passed"]:
            raise VerificationFailed(f"verification failed: {verification['reason']}; nothing was written to "
                                     f"{output}")
    cli.set_interrupt_note(f"{output} was written completely")
    p = report["parameters"]
    print(f"wrote {output} in {report['seconds']:.1f} s: encoder {p['encoder']:,} and decoder {p['decoder']:,} "
          f"parameters copied, projector ({projector}, K={stack_frames}) {report['projector']['parameters']:,} "
          f"initialised (seed {seed})", file=log)
    if verification is None:
        print("  not verified: Flax was not compared with the PyTorch reference", file=log)
    else:
        print(f"  verified    Flax vs reference max |Δlogits| {verification['max_abs_logits_diff']:.2e}", file=log)
    unknown = _unknown_prompt_tokens(tokenizer, config)
    if unknown:
        print(f"  note: {unknown} of the prompt's {len(config.prompt_ids_before) + len(config.prompt_ids_after)} "
              "tokens are the decoder tokenizer's unknown token: the LM reads no instruction there (pass a --prompt "
              "in words its tokenizer knows)", file=log)
    return ComposeResult(output, report)


def _unknown_prompt_tokens(tokenizer: Any, config: SpeechPrefixConfig) -> int:
    """How many of the prompt's token ids are the decoder tokenizer's unknown token (0 when it has none)."""
    from convert.training_data import unknown_token_id

    unk = unknown_token_id(tokenizer)
    return 0 if unk is None else [*config.prompt_ids_before, *config.prompt_ids_after].count(unk)


def model_card(report: dict[str, Any]) -> str:
    """A short model card for the prefix composition."""
    p = report["projector"]
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: automatic-speech-recognition",
        "tags: [speech-prefix-lm, automatic-speech-recognition, jax, flax]", "---", "",
        "# Speech encoder + projector + decoder-only LM (prefix composition)", "",
        f"Composed with `convert.compose --mode prefix` from `{report['encoder']['source']}` (encoder) and "
        f"`{report['decoder']['source']}` (decoder). The projector ({p['type']}, {p['stack_frames']} frames "
        f"stacked, {p['parameters']:,} parameters) is untrained: fine-tune before use "
        "(`convert.finetune --train-only projector`).", "",
        f"Prompt: `{report['prompt']['template']}` (the audio embeddings stand where `{{audio}}` is).", "",
        "## How to load", "",
        "```python\nfrom transformers import AutoModel, AutoModelForCausalLM\n\n"
        "encoder = AutoModel.from_pretrained(\"path/to/this/directory/encoder\")\n"
        "llm = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory/decoder\")\n"
        "# projector weights: safetensors.torch.load_file(\"path/to/this/directory/projector.safetensors\")\n```", "",
        "## How it was made", "", f"```bash\n{report['command'] or 'python -m convert.compose --mode prefix ...'}\n```",
        ""])
