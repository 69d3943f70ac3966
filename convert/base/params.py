"""Moving whole parameter sets between checkpoints on disk and Flax trees, for any supported architecture.

`plan_source` maps a source checkpoint (PyTorch or Flax names) onto a Flax subtree. `load_params` /
`save_params` read and write complete models (composed or single-architecture directories). The Flax leaves a
model must have come from the caller (`shapes_of`): this module sits below the models and never imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.checkpoint import CONFIG, FLAX_MSGPACK, WEIGHT_FILES, Checkpoint
from convert.base.composed import (  # noqa: F401 - composed_keymap, tied_keys_for: part of this module's API
    SpeechEncoderDecoderConfig,
    composed_keymap,
    composed_tied_keys,
    keymap_for,
    read_any_config,
    tied_keys_for,
)
from convert.base.configs import HFConfig
from convert.base.errors import KeyMapError, UnsupportedConfig, bad_argument
from convert.base.keymap import Entry, Plan, SourceRules, T, check_missing, plan_flax_to_torch, plan_torch_to_flax
from convert.base.outputs import atomic_directory
from convert.base.registry import spec_for
from convert.base.spec import ArchSpec
from convert.base.stacking import layer_stacks
from convert.base.trees import flatten, unflatten
from convert.base.writing import ShardedWriter, TensorSpec, WriteLanes

Shapes = dict[str, tuple[int, ...]]
# The Flax leaves a config's model has: `/`-joined path -> shape. The models layer provides it
# (flax_model.speech_encoder_decoder.param_shapes, or a reference module's state dict through the key table).
ShapesOf = Callable[[HFConfig], Shapes]


def read_config(checkpoint: Checkpoint) -> HFConfig:
    """The typed config of a checkpoint directory (composed or a single architecture)."""
    return read_any_config(checkpoint.config, str(checkpoint.directory / CONFIG))


def subtree(shapes: Shapes, prefix: str) -> Shapes:
    return {k: v for k, v in shapes.items() if k.startswith(prefix)}


def plan_source(
    checkpoint: Checkpoint,
    arch: ArchSpec,
    config: HFConfig,
    expected: Shapes,
    flax_prefix: str = "",
) -> Plan:
    """Maps one source checkpoint onto the Flax leaves `expected` (already under `flax_prefix`).

    PyTorch-format sources go through the architecture's source rules and key table; Flax-format sources
    (`flax_model.msgpack`) only through its Flax source rules, since their names already are Flax paths.
    Every source key is mapped or dropped with a reason; shapes are checked against `expected`.
    """
    where = str(checkpoint.directory)
    if checkpoint.format == "flax":
        canonical, dropped = arch.flax_source_rules(config).canonicalize(checkpoint.keys())
        return _identity_plan(checkpoint, {flax_prefix + k: v for k, v in canonical.items()}, dropped, expected,
                              config)
    km = arch.keymap.prefixed("", flax_prefix) if flax_prefix else arch.keymap
    return plan_torch_to_flax(km, checkpoint.shapes(), expected, arch.source_rules(config), where,
                              hint=functools.partial(size_fields, config))


def read_entry(checkpoint: Checkpoint, entry: Entry) -> np.ndarray:
    """A source tensor in the Flax layout of its target (bit-exact: only transposes and reshapes)."""
    return entry.transform.to_flax(checkpoint.get(entry.source))


# ----------------------------------------------------------------------------------------------------------
# Whole models


@dataclasses.dataclass
class Loaded:
    config: HFConfig
    params: dict[str, Any]  # nested, numpy leaves
    plan: Plan


def load_params(directory: str | Path, shapes_of: ShapesOf, dtype: np.dtype | None = None,
                prefer: tuple[str, ...] = WEIGHT_FILES) -> Loaded:
    """Reads a checkpoint directory (composed or single-architecture) into a nested Flax param dict.

    Args:
        directory: the checkpoint directory.
        shapes_of: the Flax leaves (path -> shape) the model of a config has; every one must be loaded.
        dtype: cast floating-point leaves to this dtype.
        prefer: weight files in order of preference.

    Raises:
        CheckpointError / KeyMapError / UnsupportedConfig: one line naming the file and the problem,
            including any parameter the config needs that the weights lack.
    """
    checkpoint = Checkpoint(directory, prefer=prefer)
    config, plan = plan_checkpoint(checkpoint, shapes_of)
    flat = {}
    for entry in plan.entries:
        array = read_entry(checkpoint, entry)
        flat[entry.target] = array.astype(dtype) if dtype is not None and _is_float(array) else array
    return Loaded(config, unflatten(flat), plan)


def plan_checkpoint(checkpoint: Checkpoint, shapes_of: ShapesOf) -> tuple[HFConfig, Plan]:
    """The config of a checkpoint directory and the plan that puts its tensors on the model's Flax leaves (every
    leaf the config needs, shapes checked; no tensor is read).

    Raises:
        KeyMapError / UnsupportedConfig: as `load_params`.
    """
    config = read_config(checkpoint)
    if isinstance(config, SpeechEncoderDecoderConfig):
        check_layer_counts(checkpoint, config)
        expected = shapes_of(config)
        if checkpoint.format == "flax":
            plan = _identity_plan(checkpoint, {k: k for k in checkpoint.keys()}, [], expected, config)
        else:
            plan = plan_torch_to_flax(composed_keymap(config), checkpoint.shapes(), expected,
                                      _tied_drops(composed_tied_keys(config)), str(checkpoint.directory),
                                      hint=functools.partial(size_fields, config))
    else:
        arch = spec_for(config)
        config = arch.adapt_config(config, checkpoint)
        check_layer_counts(checkpoint, config)
        expected = shapes_of(config)
        plan = plan_source(checkpoint, arch, config, expected)
    check_missing(plan, where=str(checkpoint.directory))
    return config, plan


def _flax_paths(checkpoint: Checkpoint, config: HFConfig) -> dict[str, str]:
    """Checkpoint key -> the Flax path it fills (keys that fill none are left out); names only, nothing read."""
    keys = checkpoint.keys()
    if isinstance(config, SpeechEncoderDecoderConfig):
        if checkpoint.format == "flax":
            return {k: k for k in keys}
        keymap = composed_keymap(config)
        found = {k: keymap.to_flax(k) for k in keys}
        return {k: v[0] for k, v in found.items() if v is not None}
    arch = spec_for(config)
    if checkpoint.format == "flax":
        canonical, _ = arch.flax_source_rules(config).canonicalize(keys)
        return {src: path for path, src in canonical.items()}
    canonical, _ = arch.source_rules(config).canonicalize(keys)
    found = {src: arch.keymap.to_flax(name) for name, src in canonical.items()}
    return {k: v[0] for k, v in found.items() if v is not None}


def check_layer_counts(checkpoint: Checkpoint, config: HFConfig) -> None:
    """Refuses a config whose layer counts differ from the layers the checkpoint's tensors hold, from names and
    shapes alone: a model is never traced or built for a count the weights cannot fill (a `decoder_layers` of
    10**9 over a 2-layer checkpoint would otherwise be planned layer by layer until memory runs out).

    Raises:
        UnsupportedConfig: `DIR/config.json: <field>=<count>: the checkpoint holds <n> layer(s) of that stack`.
    """
    paths = _flax_paths(checkpoint, config)
    for prefix, count in layer_stacks(config).items():
        layers: set[int] = set()
        stacked = None  # the leading axis of a leaf in the stacked layout (`save_pretrained(stacked=True)`)
        for key, path in paths.items():
            rest = path[len(prefix):] if path.startswith(prefix) else None
            if not rest:
                continue
            index = re.match(r"(\d+)/", rest)
            if index:
                layers.add(int(index.group(1)))
            else:
                shape = checkpoint.info(key).shape
                stacked = shape[0] if shape else 0
        found = stacked if stacked is not None else (max(layers) + 1 if layers else 0)
        if found != count:
            part = next((p for p in ("encoder", "decoder") if prefix.startswith(p + "/")), None) \
                if isinstance(config, SpeechEncoderDecoderConfig) else None
            sub = config if part is None else getattr(config, part)
            field = (spec_for(sub) if part is None else spec_for(sub, role=part)).layer_stack[0]
            name = {v: k for k, v in type(sub).ALIASES.items()}.get(field, field)
            files = ", ".join(p.name for p in checkpoint.weight_files)
            held = f"{found} layer(s) of that stack ({prefix}0 to {found - 1})" if found else \
                f"no layer of that stack ({prefix}N)"
            raise UnsupportedConfig(f"{checkpoint.directory / CONFIG}: {'' if part is None else part + '.'}{name}="
                                    f"{count} does not match the weights: {files} hold {held}")


def size_fields(config: HFConfig, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    """The config fields that set the dimensions in which a tensor's shape differs from the one the config
    asks for, as a hint for a shape mismatch (` (config: vocab_size=1000000000)`); empty when none is found."""
    if len(expected) != len(found):
        return ""
    values = {e for e, f in zip(expected, found) if e != f}
    fields = []
    parts = ({"encoder.": config.encoder, "decoder.": config.decoder}
             if isinstance(config, SpeechEncoderDecoderConfig) else {"": config})
    for part, sub in parts.items():
        hf = {v: k for k, v in type(sub).ALIASES.items()}
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if type(value) is int and value in values:
                fields.append(f"{part}{hf.get(f.name, f.name)}={value}")
    return f" (config: {', '.join(fields)})" if fields else ""


def _identity_plan(checkpoint: Checkpoint, canonical: Mapping[str, str], dropped, expected: Shapes,
                   config: HFConfig | None = None) -> Plan:
    problems, entries = [], []
    for name, src in canonical.items():
        shape = checkpoint.info(src).shape
        if name not in expected:
            problems.append(f"{src}: not a parameter of this config's model")
        elif tuple(expected[name]) != tuple(shape):
            hint = "" if config is None else size_fields(config, tuple(expected[name]), tuple(shape))
            problems.append(f"{src}: shape {list(shape)} does not match the config (expected {list(expected[name])})"
                            + hint)
        else:
            entries.append(Entry(src, name, T.IDENTITY, shape, shape))
    if problems:
        raise KeyMapError(f"{checkpoint.directory}: " + "; ".join(problems))
    return Plan(entries, list(dropped), sorted(set(expected) - {e.target for e in entries}))


def _tied_drops(tied: Mapping[str, str]) -> SourceRules:
    return SourceRules(drops=tuple(("^" + re.escape(k) + "$", f"tied to {v}") for k, v in tied.items()))


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def params_to_torch_state(config: HFConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The PyTorch state (HF key names, PyTorch layouts) of a Flax param tree; tied keys are left out."""
    flat = flatten(params)
    plan = plan_flax_to_torch(keymap_for(config), {k: np.shape(v) for k, v in flat.items()})
    return {e.target: e.transform.to_torch(np.asarray(flat[e.source])) for e in plan.entries}


def save_params(
    directory: str | Path,
    config: HFConfig,
    leaves: Mapping[str, np.ndarray] | Callable[[], Iterator[tuple[str, np.ndarray]]],
    specs: list[TensorSpec] | None = None,
    max_shard_size: int | None = None,
    formats: tuple[str, ...] = ("flax", "safetensors"),
) -> list[Path]:
    """Writes `config.json`, the Flax msgpack and the PyTorch safetensors weights into an existing directory.

    Args:
        directory: where to write (the caller makes it atomic).
        config: the model's config.
        leaves: `/`-joined Flax path -> array, or a callable returning an iterator of (path, array) in
            `specs` order (to stream a large model through without holding it). Arrays may be strided
            views (e.g. a PyTorch kernel's transpose); nothing is copied whole.
        specs: the Flax leaves' names/dtypes/shapes in write order (needed when `leaves` is a callable).
        max_shard_size: bytes per shard; None writes single files.
        formats: which weight files to write.

    Returns:
        The files written.
    """
    directory = Path(directory)
    if specs is None:
        assert isinstance(leaves, Mapping)
        specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in sorted(leaves.items())]
    iterate = leaves if callable(leaves) else (lambda: ((s.name, np.asarray(leaves[s.name])) for s in specs))
    plan = plan_flax_to_torch(keymap_for(config), {s.name: s.shape for s in specs})
    to_torch = {e.source: e for e in plan.entries}
    torch_specs = [TensorSpec(to_torch[s.name].target, s.dtype, to_torch[s.name].target_shape) for s in specs]
    (directory / CONFIG).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    writers = []
    if "flax" in formats:
        writers.append(("flax", ShardedWriter(directory, "msgpack", specs, max_shard_size)))
    if "safetensors" in formats:
        writers.append(("torch", ShardedWriter(directory, "safetensors", torch_specs, max_shard_size,
                                               metadata={"format": "pt"})))
    with WriteLanes(len(writers)) as lanes:  # one thread per file; the next leaves are read meanwhile
        for name, array in iterate():
            jobs = []
            for kind, writer in writers:
                if kind == "flax":
                    jobs.append(functools.partial(writer.write, name, array))
                else:
                    entry = to_torch[name]
                    # A view: the writer copies strided tensors out in tiles (and for a leaf that is itself
                    # a transposed view of a PyTorch-layout source, this is that source again: no copy).
                    jobs.append(functools.partial(writer.write, entry.target,
                                                  entry.transform.to_torch(array, contiguous=False)))
            lanes.submit(array.nbytes, jobs)
            del array, jobs
    files = [directory / CONFIG]
    for _, writer in writers:
        writer.close()
        files.extend(writer.files)
    return files


def save_flax_msgpack(directory: str | Path, leaves: Mapping[str, np.ndarray],
                      max_shard_size: int | None = None) -> list[Path]:
    """Writes the Flax msgpack of `leaves` (`/`-joined path -> array) as they are, without the key table: for
    trees outside HF's layout, such as the stacked layers of a scanned model (`convert.base.stacking`).

    Returns:
        The files written.
    """
    specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in sorted(leaves.items())]
    writer = ShardedWriter(Path(directory), "msgpack", specs, max_shard_size)
    for spec in specs:
        writer.write(spec.name, np.asarray(leaves[spec.name]))
    writer.close()
    return list(writer.files)


# ----------------------------------------------------------------------------------------------------------
# save_pretrained's directory (both frameworks)

# The files a model's save_pretrained owns: its config, generation config and weights in every format this toolkit
# reads (single files, shards and shard indexes). Every other file of a directory it updates is kept.
MODEL_FILES = re.compile(r"(generation_)?config\.json|(model|flax_model|pytorch_model)(-\d+-of-\d+)?"
                         r"\.(safetensors|msgpack|bin)(\.index\.json)?")
_FORMAT_OF = {"safetensors": "safetensors", "msgpack": "flax"}


def is_model_file(name: str) -> bool:
    """Whether `save_pretrained` owns a file of this name (it replaces or removes it when it updates a directory)."""
    return MODEL_FILES.fullmatch(name) is not None


def weight_formats(directory: str | Path) -> tuple[str, ...]:
    """The formats ("flax", "safetensors") whose weight files `directory` holds (none when it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return ()
    found = {_FORMAT_OF.get(m.group(4)) for p in directory.iterdir() if (m := MODEL_FILES.fullmatch(p.name))}
    return tuple(f for f in ("flax", "safetensors") if f in found)


@contextlib.contextmanager
def pretrained_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """The temporary directory a model's `save_pretrained` writes into, published atomically as `directory`.

    A new or empty directory is created. An existing one needs `overwrite=True` and must have been written by this
    toolkit (`convert.base.outputs.check_output_location`); then only the model's own files (`is_model_file`) are
    replaced: the others (tokenizer, preprocessor, model card, reports, anything else) are carried over untouched,
    and stale weight files of the old model are not. The directory is never the Hugging Face cache, the current or
    the home directory.
    """
    if not isinstance(overwrite, bool):
        raise bad_argument("overwrite", overwrite, "is not True or False")
    with atomic_directory(directory, overwrite=overwrite, param="directory",
                          keep=lambda name: not is_model_file(name)) as tmp:
        yield tmp


__all__ = [
    "FLAX_MSGPACK", "Loaded", "composed_keymap", "composed_tied_keys", "keymap_for", "load_params",
    "params_to_torch_state", "plan_checkpoint", "plan_source", "read_config", "read_entry", "save_flax_msgpack",
    "save_params", "tied_keys_for", "is_model_file", "pretrained_directory", "weight_formats",
]
