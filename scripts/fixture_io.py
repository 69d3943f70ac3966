"""Writing small Hugging Face-format checkpoint directories from reference state dicts (for fixtures)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def save_hf_checkpoint(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    fmt: str = "safetensors",
    shards: int = 1,
    omit: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
) -> Path:
    """Writes `config.json` and the weights the way `save_pretrained` lays them out.

    Args:
        directory: created if needed.
        state_dict: canonical HF key names -> tensors.
        config: the HF config dict.
        fmt: "safetensors" or "bin".
        shards: > 1 writes `model-0000k-of-0000n.*` files plus HF's `*.index.json`.
        omit: keys left out of the file (tied weights, as HF's safe serialization does).
        rename: {key: stored_key} to write old spellings (e.g. weight-norm `weight_g`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    omit = set(omit)
    rename = dict(rename or {})
    tensors = {rename.get(k, k): v.detach().clone().contiguous() for k, v in state_dict.items() if k not in omit}
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    if shards <= 1:
        _write(tensors, directory / f"{base}.{ext}", fmt)
        return directory
    keys = list(tensors)
    size = -(-len(keys) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"{base}-{k + 1:05d}-of-{shards:05d}.{ext}"
        part = {key: tensors[key] for key in keys[k * size:(k + 1) * size]}
        _write(part, directory / name, fmt)
        weight_map.update({key: name for key in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def _write(tensors: Mapping[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(dict(tensors), str(path), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(dict(tensors), path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
