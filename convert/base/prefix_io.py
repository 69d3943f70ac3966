"""Reading and writing a prefix composition's directory (`convert.base.prefix` has its layout): each part a
single-architecture checkpoint directory of its own (`convert.base.params`), the projector in
`projector.safetensors`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from convert.base.configs import HFConfig
from convert.base.errors import CheckpointError
from convert.base.prefix import (
    PROJECTOR_FILE,
    SpeechPrefixConfig,
    concat_leaves,
    part_directories,
    projector_keymap,
    projector_shapes,
    read_prefix_config,
    split_leaves,
)


def save_prefix_params(directory: str | Path, config: SpeechPrefixConfig, leaves: Mapping[str, Any],
                       formats: tuple[str, ...] = ("flax", "safetensors")) -> list[Path]:
    """Writes a prefix composition's config.json and weights into an existing directory (the caller makes it
    atomic): each part in its own directory (`save_params`, its own names), the projector in
    `projector.safetensors`. `leaves` maps the whole model's `/`-joined Flax paths to arrays.

    Returns:
        The files written.
    """
    from convert.base.params import save_params

    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    files = [directory / "config.json"]
    parts = split_leaves(leaves)
    for part, part_dir in part_directories(directory).items():
        part_dir.mkdir(exist_ok=True)
        files += save_params(part_dir, getattr(config, part), parts[part], formats=formats)
    return [*files, write_projector(directory, config, parts["projector"])]


def write_projector(directory: str | Path, config: SpeechPrefixConfig, leaves: Mapping[str, Any]) -> Path:
    """Writes `projector.safetensors` (PyTorch names and layouts) from the projector's Flax leaves."""
    import numpy as np

    from convert.base.writing import write_safetensors

    keymap = projector_keymap(config)
    tensors = {}
    for path, value in leaves.items():
        mapped = keymap.to_torch(path)
        if mapped is None:
            raise KeyError(f"{path}: not a projector leaf")
        tensors[mapped[0]] = mapped[1].to_torch(np.asarray(value))
    return write_safetensors(Path(directory) / PROJECTOR_FILE, tensors)


def load_prefix_params(directory: str | Path, shapes_of: Callable[[HFConfig], dict[str, tuple[int, ...]]],
                       dtype: Any = None, prefer: tuple[str, ...] | None = None
                       ) -> tuple[SpeechPrefixConfig, dict[str, Any]]:
    """Reads a prefix-composed directory: (its config, the whole model's flat leaves by `/`-joined Flax path).

    Args:
        directory: the composed directory.
        shapes_of: the Flax leaves a single architecture's config has (the models layer provides it).
        dtype: cast floating-point leaves to it.
        prefer: each part's weight files in order of preference (`convert.base.checkpoint`).

    Raises:
        CheckpointError / KeyMapError / UnsupportedConfig: one line naming the file and what is wrong.
    """
    from flax import traverse_util

    from convert.base.checkpoint import WEIGHT_FILES
    from convert.base.checkpoint.safetensors_reader import SafetensorsFile
    from convert.base.params import load_params

    directory = Path(directory)
    config = read_prefix_config(directory)
    parts: dict[str, dict[str, Any]] = {}
    for part, part_dir in part_directories(directory).items():
        loaded = load_params(part_dir, shapes_of, dtype, prefer=prefer or WEIGHT_FILES)
        parts[part] = traverse_util.flatten_dict(loaded.params, sep="/")
    path = directory / PROJECTOR_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    weights = SafetensorsFile(path)
    keymap, expected = projector_keymap(config), projector_shapes(config)
    projector: dict[str, Any] = {}
    for key in sorted(weights.entries):
        mapped = keymap.to_flax(key)
        if mapped is None:
            raise CheckpointError(f"{path}: {key} is not a weight of a {config.projector_type} projector")
        flax_path, transform = mapped
        shape = transform.flax_shape(weights.entries[key].shape)
        if shape != expected[flax_path]:
            raise CheckpointError(f"{path}: {key} has shape {list(weights.entries[key].shape)}, expected "
                                  f"{list(transform.torch_shape(expected[flax_path]))}")
        array = transform.to_flax(weights.read(key))
        projector[flax_path] = array.astype(dtype) if dtype is not None else array
    missing = sorted(set(expected) - set(projector))
    if missing:
        raise CheckpointError(f"{path}: lacks {keymap.to_torch(missing[0])[0]}")
    return config, concat_leaves({**parts, "projector": projector})
