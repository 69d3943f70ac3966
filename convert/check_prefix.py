"""`convert.check` on a prefix composition (`convert.compose --mode prefix`): the same four checks as on a
cross-attention one, over the layout's files.

- each part's `flax_model.msgpack` and `model.safetensors` (in `encoder/` and `decoder/`) and `projector.safetensors`
  are there;
- each part's two weight files hold the same tensors, bit for bit;
- Flax's logits on the real columns of a padded batch (audio prefix, then a few seeded text tokens) are judged
  against the reference's float64 run (`convert.verify_prefix.judged_logits`);
- greedy generation gives the same tokens in both.

Both weight files of each part are required (`--format both`): each framework reads the part's own file first,
Flax the msgpack and the reference the safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.errors import bad_argument
from convert.base.prefix import PROJECTOR_FILE, part_directories, read_prefix_config
from convert.greedy_check import greedy_sequences, tokens_check

PART_FILES = ("flax_model.msgpack", "model.safetensors")


def prefix_checks(directory: Path, weights: str, factor: float, audio: Sequence[str | Path], max_new_tokens: int,
                  seed: int, max_memory: int | None) -> list[dict[str, Any]]:
    """The checks of `convert.check.check` for a prefix-composed `directory`, in its result's form.

    Raises:
        UsageError: `weights` other than "both".
        ConvertError: an unreadable file or config, audio the decoder's positions cannot hold, a model beyond
            `max_memory`.
    """
    if weights != "both":
        raise bad_argument("weights", weights, "a prefix composition is checked with both weight files of each part "
                           "(each framework reads its own)")
    config = read_prefix_config(directory)
    from convert.sources import check_part_files

    parts = part_directories(directory)
    check_part_files(parts["encoder"], config.encoder, parts["decoder"], config.decoder.vocab_size)
    files = _files_check(directory)
    if not files["passed"]:
        return [files]
    if max_memory is not None:
        _refuse_beyond(directory, config, max_memory)
    from convert.verify_prefix import judged_logits

    same = _same_weights_check(directory, config)
    batch = _inputs(directory, config, audio, seed)
    judgement, (torch_tokens, flax_tokens) = judged_logits(
        directory, batch, factor, greedy=lambda model, inputs, mask: greedy_sequences(model.generate, inputs, mask,
                                                                                      max_new_tokens))
    return [
        files, same,
        {"name": "max |Δlogits| Flax vs float64 reference", "value": judgement["flax_error"],
         "limit": judgement["bound"], **judgement},
        tokens_check(flax_tokens, torch_tokens, max_new_tokens),
    ]


def _files_check(directory: Path) -> dict[str, Any]:
    wanted = [f"{part}/{name}" for part in part_directories(directory) for name in PART_FILES] + [PROJECTOR_FILE]
    missing = [name for name in wanted if not (directory / name).is_file()]
    return {"name": "weight files present", "value": "present" if not missing else f"missing {', '.join(missing)}",
            "limit": "both files of each part, and the projector's", "passed": not missing, "missing": missing,
            "found": [name for name in wanted if name not in missing]}


def _same_weights_check(directory: Path, config: Any) -> dict[str, Any]:
    from convert.verify_prefix import part_comparisons

    tensors, largest, differing = 0, 0.0, []
    for part, files in part_comparisons(directory, config).items():
        tensors += files["tensors"]
        largest = max(largest, files["max_abs_diff"])
        differing += [{**d, "tensor": f"{part}/{d['tensor']}"} for d in files["differences"]]
    return {"name": "flax_model.msgpack == model.safetensors",
            "value": "identical" if not differing else f"{len(differing)} differ (max |Δ| {largest:.3e})",
            "limit": "bit-exact", "passed": not differing, "tensors": tensors, "max_abs_diff": largest,
            "differing": differing}


def _inputs(directory: Path, config: Any, audio: Sequence[str | Path], seed: int) -> dict[str, np.ndarray]:
    """The seeded batch of `convert.verify_prefix`, or the audio files with its text tokens."""
    from convert.verify_prefix import prefix_inputs

    batch = prefix_inputs(config, seed)
    if not audio:
        return batch
    from convert.base.audio import AudioError, audio_seconds, feature_extractor_config, files_batch

    inputs, mask = files_batch(audio, feature_extractor_config(directory / "encoder", config.encoder), config.encoder)
    text = np.repeat(batch["text_ids"][:1], len(audio), axis=0)
    columns = config.prompt_length + int(config.audio_lengths(config.encoder.output_lengths(inputs.shape[1])))
    if columns + text.shape[1] > config.decoder.max_positions:
        longest = max(audio, key=lambda p: audio_seconds(Path(p)))
        raise AudioError(f"{longest}: its prefix of {columns} columns and {text.shape[1]} text tokens exceed the "
                         f"decoder's {config.decoder.max_positions} positions (check with a shorter file)")
    return {"inputs": inputs, "attention_mask": np.ones(inputs.shape[:2], np.int32) if mask is None else mask,
            "text_ids": text}


def _refuse_beyond(directory: Path, config: Any, max_memory: int) -> None:
    """A model whose float32 parameters alone exceed `max_memory` is refused before anything is loaded."""
    from convert.base.resources import memory_budget, refuse_parameters_beyond
    from flax_model.memory import device_memory
    from flax_model.prefix import param_shapes

    parameters = sum(int(np.prod(shape)) for shape in param_shapes(config).values())
    refuse_parameters_beyond(4 * parameters, memory_budget(max_memory, device_memory()), f"model={directory}")
