"""Checks that a composed checkpoint is right: both weight files agree, and Flax matches the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convert.checkpoint import Checkpoint
from convert.composed import SpeechEncoderDecoderConfig, composed_keymap


def compare_weight_files(directory: str | Path) -> dict[str, Any]:
    """Compares `flax_model.msgpack` with `model.safetensors` tensor by tensor through the key table.

    Returns:
        {"tensors": n, "max_abs_diff": float, "mismatched": [keys], "missing": [keys]} (bit-exact means
        max_abs_diff == 0 and no mismatches).
    """
    directory = Path(directory)
    flax = Checkpoint(directory, prefer=("flax_model.msgpack", "flax_model.msgpack.index.json"))
    torch_side = Checkpoint(directory, prefer=("model.safetensors", "model.safetensors.index.json"))
    config = SpeechEncoderDecoderConfig.from_hf_dict(flax.config, str(directory / "config.json"))
    keymap = composed_keymap(config)
    mismatched, missing = [], []
    max_diff = 0.0
    seen = set()
    for path in flax.keys():
        found = keymap.to_torch(path)
        if found is None or found[0] not in torch_side:
            missing.append(path)
            continue
        key, transform = found
        seen.add(key)
        a = transform.to_torch(flax.get(path), contiguous=False)
        b = torch_side.get(key)
        if a.shape != b.shape or a.dtype != b.dtype or not _same_bits(a, b):
            mismatched.append(key)
            if a.shape == b.shape:
                diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.size else 0.0
                max_diff = max(max_diff, float(diff))
            else:
                max_diff = float("inf")
    missing.extend(k for k in torch_side.keys() if k not in seen)
    return {"tensors": len(seen), "max_abs_diff": max_diff, "mismatched": mismatched, "missing": missing}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included) without copying either array."""
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if bits is None:
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def seeded_inputs(config: SpeechEncoderDecoderConfig, seed: int = 0, seconds: float = 1.0,
                  decoder_length: int = 8) -> dict[str, np.ndarray]:
    """A padded batch of 2 utterances (the second 60% as long) and decoder ids starting with the start token."""
    rng = np.random.default_rng(seed)
    n = max(int(16000 * seconds), 8 * config.encoder.min_input_length)
    audio = rng.standard_normal((2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int32)
    mask[1, int(n * 0.6):] = 0
    audio[1, int(n * 0.6):] = 0.0
    vocab = config.decoder.vocab_size
    ids = rng.integers(0, vocab, (2, decoder_length)).astype(np.int64)
    ids[:, 0] = config.decoder_start_token_id
    return {"inputs": audio, "attention_mask": mask, "decoder_input_ids": ids}


def load_both(directory: str | Path) -> tuple[Any, Any]:
    """The Flax model (from its msgpack when present) and the PyTorch reference (from safetensors when
    present), both in float32 whatever the saved dtype."""
    return load_flax(directory), load_torch(directory)


def load_flax(directory: str | Path) -> Any:
    """The Flax model in float32 (from its msgpack when present)."""
    import jax.numpy as jnp
    from flax import traverse_util

    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    params, model.params = traverse_util.flatten_dict(model.params, sep="/"), None
    converted = 0
    for path in params:  # leaf by leaf, so that a bfloat16 model is not held next to its float32 copy
        if params[path].dtype != jnp.float32:
            params[path] = params[path].astype(jnp.float32)
            converted += 1
            if converted % 32 == 0:  # the freed half-size buffers cannot hold float32 ones: return them
                params[path].block_until_ready()
                release_free_memory()
    model.params = traverse_util.unflatten_dict(params, sep="/")
    return model


def load_torch(directory: str | Path) -> Any:
    """The PyTorch reference in float32 (from safetensors when present)."""
    from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

    return torch_from_pretrained(directory)[0].float().eval()


def logits_difference(flax_model: Any, torch_model: Any, batch: dict[str, np.ndarray]) -> float:
    """max |Δlogits| between the two models on one batch (teacher forcing)."""
    return float(np.max(np.abs(flax_logits(flax_model, batch) - torch_logits(torch_model, batch))))


def flax_logits(flax_model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(flax_model(**batch).logits)


def torch_logits(torch_model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    mask = batch.get("attention_mask")
    with torch.no_grad():
        return torch_model(
            torch.from_numpy(batch["inputs"]), None if mask is None else torch.from_numpy(mask),
            torch.from_numpy(batch["decoder_input_ids"]),
        ).logits.numpy()


def release_free_memory() -> None:
    """Hands the heap's free pages back to the system (glibc keeps freed blocks of a few MB otherwise, and
    the PyTorch model loaded next would come on top of the Flax model just freed)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to do
        pass


def verify_directory(directory: str | Path, tolerance: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Both weight files agree bit for bit, and Flax logits match the reference within `tolerance`.

    The two models are loaded one after the other, never side by side: the check needs the memory of one
    float32 model, not two.
    """
    import gc

    files = compare_weight_files(directory)
    flax_model = load_flax(directory)
    batch = seeded_inputs(flax_model.config, seed)
    expected = flax_logits(flax_model, batch)
    del flax_model
    gc.collect()
    release_free_memory()
    diff = float(np.max(np.abs(expected - torch_logits(load_torch(directory), batch))))
    passed = not files["mismatched"] and not files["missing"] and diff <= tolerance
    return {
        "max_abs_logits_diff": diff,
        "tolerance": tolerance,
        "seed": seed,
        "weight_files_identical": not files["mismatched"] and not files["missing"],
        "passed": passed,
    }
