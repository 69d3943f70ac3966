"""Verification of a prefix-composed directory (`convert.compose --mode prefix`): each part's two weight files agree
bit for bit, and the Flax model's logits pass `convert.verify.judge_logits` against the PyTorch reference run in
float32 and float64, on a seeded padded batch (two utterances of different lengths, a few text tokens).

Only the real columns (not the left padding) are judged. The float64 run converts the whole reference to
float64 (`.double()`): twice the model's float32 memory (unlike the cross-attention mode's module-by-module run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.checkpoint import Checkpoint
from convert.base.prefix import part_directories, read_prefix_config
from convert.base.registry import spec_for
from convert.verify import DEFAULT_FACTOR, compare_checkpoints, judge_logits

VERIFY_SECONDS = 1.0
TEXT_TOKENS = 4


def prefix_inputs(config: Any, seed: int = 0, seconds: float = VERIFY_SECONDS) -> dict[str, np.ndarray]:
    """Two utterances (the second 60% as long, right-padded; samples, or feature frames for an encoder that reads
    features) and text ids [2, TEXT_TOKENS]; shorter than `seconds` when the decoder's positions cannot hold that
    much audio."""
    from convert.base.configs import encoder_input_shape

    rng = np.random.default_rng(seed)
    encoder = config.encoder
    n = max(int(encoder.inputs_per_second * seconds), 8 * encoder.min_input_length)

    def fits(steps: int) -> bool:
        audio = int(config.audio_lengths(encoder.output_lengths(steps)))
        return config.prompt_length + audio + TEXT_TOKENS <= config.decoder.max_positions

    while not fits(n) and n > 2 * encoder.min_input_length:
        n = max(n // 2, 2 * encoder.min_input_length)
    audio = rng.standard_normal(encoder_input_shape(encoder, 2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int32)
    mask[1, int(n * 0.6):] = 0
    audio[1, int(n * 0.6):] = 0.0
    ids = rng.integers(0, config.decoder.vocab_size, (2, TEXT_TOKENS)).astype(np.int64)
    return {"inputs": audio, "attention_mask": mask, "text_ids": ids}


def part_comparisons(directory: Path, config: Any) -> dict[str, dict[str, Any]]:
    """Each part's `flax_model.msgpack` against its `model.safetensors` (`convert.verify.compare_checkpoints`)."""
    comparisons = {}
    for part, path in part_directories(directory).items():
        flax_file = Checkpoint(path, prefer=("flax_model.msgpack",))
        torch_file = Checkpoint(path, prefer=("model.safetensors",))
        keymap = spec_for(getattr(config, part), role=part).keymap
        comparisons[part] = compare_checkpoints(flax_file, torch_file, keymap)
    return comparisons


def float32_model(directory: Path) -> Any:
    """The directory's Flax model with float32 parameters, whatever dtype its files store (as the reference holds
    them: a bfloat16 composition's weights, exactly, in float32)."""
    import jax
    import jax.numpy as jnp

    from flax_model.prefix import FlaxSpeechPrefixModel

    model = FlaxSpeechPrefixModel.from_pretrained(directory)
    model.params = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                model.params)
    return model


def judged_logits(directory: Path, batch: dict[str, np.ndarray], factor: float,
                  greedy: Callable[[Any, Any, Any], Any] | None = None) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Flax's float32 logits on `batch` (inputs, attention_mask, text_ids) judged against the reference's float32
    and float64 runs, on the real columns; the reference is loaded, run and released first, each model loaded once.

    `greedy(model, inputs, attention_mask)`, if given, runs on the float32 reference and then on the Flax model
    while each is loaded (`convert.check`'s token comparison); its two results follow the judgement, else ()."""
    import torch

    from torch_reference.prefix import SpeechPrefixModel

    names = ("inputs", "attention_mask", "text_ids")
    reference = SpeechPrefixModel.from_pretrained(directory)
    torch_batch = [torch.from_numpy(batch[k]) for k in names]
    extra = () if greedy is None else (greedy(reference, *torch_batch[:2]),)
    with torch.no_grad():
        ref32, mask = reference(*torch_batch)
        ref64, _ = reference.double()(torch_batch[0].double(), *torch_batch[1:])
    del reference
    flax_model = float32_model(directory)
    flax32, flax_mask = flax_model(*(batch[k] for k in names))
    if greedy is not None:
        extra += (greedy(flax_model, batch["inputs"], batch["attention_mask"]),)
    del flax_model
    real = mask.numpy()
    if not np.array_equal(np.asarray(flax_mask), real):
        return {"passed": False, "reason": "Flax and the reference lay the batch out differently",
                "flax_error": float("inf"), "reference_error": float("nan"), "bound": float("nan"), "factor": factor,
                "logit_scale": float("nan"), "max_abs_logits_diff": float("inf"), "where": None}, extra
    return judge_logits(np.asarray(flax32)[real][None], ref32.numpy()[real][None], ref64.numpy()[real][None],
                        factor), extra


def verify_prefix_directory(directory: str | Path, factor: float = DEFAULT_FACTOR, seed: int = 0,
                            seconds: float = VERIFY_SECONDS) -> dict[str, Any]:
    """Both weight files of each part bit-equal, and Flax's logits judged against the reference's.

    Returns:
        `judge_logits`'s figures on the real columns, plus "seed", "weight_files_identical", "differing_tensors"
        and "passed".
    """
    directory = Path(directory)
    config = read_prefix_config(directory)
    differing = [f"{part}/{name}" for part, files in part_comparisons(directory, config).items()
                 for name in files["mismatched"] + files["missing"]]
    judgement, _ = judged_logits(directory, prefix_inputs(config, seed, seconds), factor)
    return {**judgement, "seed": seed, "weight_files_identical": not differing,
            "differing_tensors": differing[:20], "passed": not differing and judgement["passed"]}
