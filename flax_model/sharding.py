"""Parameters and batches on a `jax.sharding.Mesh`: partition specs from the architectures' rules, sharded
loading that reads only each process's shards, and generation with the batch split over `data`.

The mesh axes are MaxText's: `data` (the batch is split over it), `fsdp` (every large parameter is split over
it) and, optionally, `model` (tensor parallelism). A mesh may have any subset of them; a missing axis counts as
size 1. The rules (`convert.base.spec`: a regex over the `/`-joined Flax path -> mesh axes per dimension, first match
wins) become `PartitionSpec`s here:

* a dimension is split over its axes only when the product of their sizes divides it; otherwise that
  dimension is replicated (e.g. a vocabulary of 50265 over 8 devices), and the other dimensions keep their
  split;
* axes of size 1, and axes the mesh does not have, are left out;
* a leaf that no rule matches is replicated;
* a stacked leaf of scanned layers (`convert.base.stacking`: a leading layer axis) is split as its layer 0 would be,
  the layer axis not split.

`load_sharded` places every leaf with `jax.make_array_from_callback`: the callback gets the index (one slice per
dimension, in the Flax layout) of the box a local device holds, maps it through the key table's layout
transform onto the stored tensor (a `T.LINEAR` Flax kernel is the transpose of the PyTorch weight, so its box
is the transposed box there) and reads just that box (`Checkpoint.get_slice`). A box that several local devices
hold is read once. No process ever holds a whole-model host copy: its host memory peaks at the shards its own
devices hold plus one leaf's boxes in flight.

In a multi-process run (`jax.distributed.initialize`) every process calls the same functions with the same
arguments, as JAX's multi-controller model asks.

The commands' `--mesh data=2,fsdp=4` is `mesh_from_flag`; saving a sharded model gathers it leaf by leaf
(`gathered_leaves`), every process contributing its shards and process 0 writing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from convert.base.checkpoint import FLAX_FIRST, Checkpoint
from convert.base.composed import CTC_HEAD_KEYMAP, PROJECTION_KEYMAP, SpeechEncoderDecoderConfig
from convert.base.configs import HFConfig
from convert.base.errors import bad_argument
from convert.base.keymap import Entry, Plan, T
from convert.base.params import ShapesOf, keymap_for, plan_checkpoint
from convert.base.registry import spec_for
from convert.base.spec import (
    MESH_AXES,
    DimAxes,
    PartitionRule,
    ShardingError,
    check_partition_rules,
    default_partition_rules,
    prefixed_rules,
)
from convert.base.stacking import Stacks, layer_path, layer_stacks

# ----------------------------------------------------------------------------------------------------------
# Rules -> PartitionSpecs


def partition_rules(config: HFConfig) -> tuple[PartitionRule, ...]:
    """The rules of a composed model (the encoder's under `encoder/`, the decoder's under `decoder/`, and
    `enc_to_dec_proj` and the CTC head) or of a single architecture."""
    if isinstance(config, SpeechEncoderDecoderConfig):
        encoder = spec_for(config.encoder, role="encoder").partitioning
        decoder = spec_for(config.decoder, role="decoder").partitioning
        return (prefixed_rules(encoder, "encoder/") + prefixed_rules(decoder, "decoder/")
                + default_partition_rules(PROJECTION_KEYMAP) + default_partition_rules(CTC_HEAD_KEYMAP))
    return spec_for(config).partitioning


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with `AxisType.Auto` (sharding propagation decides the layout of every
    intermediate result). `jax.make_mesh` makes `Explicit` axes by default, which would ask every operation of
    the model for an output sharding; the model code is written for propagation, as HF's and MaxText's are.

    Raises:
        ShardingError: an axis this toolkit does not know.
    """
    mesh_sizes(mesh)
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """The mesh's axis sizes, refusing axes this toolkit does not know (most likely a misspelling).

    Raises:
        ShardingError: naming the axis.
    """
    for name in mesh.axis_names:
        if name not in MESH_AXES:
            raise ShardingError(f"mesh: axis {name!r} is not one of {', '.join(MESH_AXES)} (axes: "
                                f"{', '.join(map(str, mesh.axis_names))})")
    return dict(mesh.shape)


def _names(axes: DimAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def partition_spec(path: str, shape: tuple[int, ...], rules: tuple[PartitionRule, ...],
                   sizes: Mapping[str, int]) -> PartitionSpec:
    """The `PartitionSpec` of one leaf: the first rule whose regex matches the whole path, reduced to the
    dimensions the mesh divides (see the module docstring).

    Raises:
        ShardingError: the matching rule names more dimensions than the leaf has.
    """
    match = next(((regex, axes) for regex, axes in rules if re.fullmatch(regex, path)), None)
    if match is None:
        return PartitionSpec()
    regex, axes = match
    if len(axes) > len(shape):
        raise ShardingError(f"{path}: partition rule {regex!r} splits {len(axes)} dimensions of a leaf of shape "
                            f"{list(shape)}")
    dims: list[DimAxes] = []
    for size, dim_axes in zip(shape, axes):
        names = tuple(n for n in _names(dim_axes) if sizes.get(n, 1) > 1)
        split = math.prod(sizes[n] for n in names)
        dims.append(None if not names or size % split else names[0] if len(names) == 1 else names)
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def leaf_partition_spec(path: str, shape: tuple[int, ...], rules: tuple[PartitionRule, ...],
                        sizes: Mapping[str, int], stacks: Stacks) -> PartitionSpec:
    """`partition_spec`, also for the stacked leaves of `stacks` (the per-layer rule, the layer axis unsplit)."""
    first = layer_path(path, stacks)
    if first is not None and len(shape) >= 1:
        return PartitionSpec(None, *partition_spec(first, tuple(shape[1:]), rules, sizes))
    return partition_spec(path, shape, rules, sizes)


def param_shardings(config: HFConfig, shapes: Mapping[str, tuple[int, ...]], mesh: Mesh,
                    rules: tuple[PartitionRule, ...] | None = None) -> dict[str, NamedSharding]:
    """`/`-joined Flax path -> `NamedSharding` of every leaf, from the config's rules or `rules`."""
    mesh = auto_mesh(mesh)
    sizes = mesh_sizes(mesh)
    if rules is None:
        rules = partition_rules(config)
    else:
        check_partition_rules(tuple(rules), "rules")
    stacks = layer_stacks(config)
    return {path: NamedSharding(mesh, leaf_partition_spec(path, tuple(shape), rules, sizes, stacks))
            for path, shape in shapes.items()}


# ----------------------------------------------------------------------------------------------------------
# Sharded loading


@dataclasses.dataclass
class ShardedLoad:
    """What `load_sharded` returns.

    Attributes:
        config: the checkpoint's config.
        params: nested dict of `jax.Array`s placed on the mesh.
        plan: which stored tensor each leaf came from.
        bytes_read: tensor bytes this process read from the weight files.
    """

    config: HFConfig
    params: dict[str, Any]
    plan: Plan
    bytes_read: int


def load_sharded(
    directory: str | Path,
    mesh: Mesh,
    shapes_of: ShapesOf,
    dtype: Any = None,
    rules: tuple[PartitionRule, ...] | None = None,
    prefer: tuple[str, ...] = FLAX_FIRST,
) -> ShardedLoad:
    """Reads a checkpoint directory straight into sharded `jax.Array`s, each process reading only the boxes
    its devices hold.

    Args:
        directory: a composed or single-architecture checkpoint directory (any weight format; safetensors and
            Flax msgpack files are read box by box, `.bin` files through their memory map).
        mesh: a mesh whose axes are among `data`, `fsdp`, `model`.
        shapes_of: the Flax leaves (path -> shape) of a config's model
            (`flax_model.speech_encoder_decoder.param_shapes`).
        dtype: cast floating-point leaves to this dtype while reading; None keeps the stored dtypes.
        rules: partition rules to use instead of the architectures' (`convert.base.spec.PartitionRule`).
        prefer: weight files in order of preference.

    Raises:
        CheckpointError / KeyMapError / UnsupportedConfig: as `convert.base.params.load_params`.
        ShardingError: an unknown mesh axis or a bad rule.
    """
    mesh = auto_mesh(mesh)
    sizes = mesh_sizes(mesh)
    checkpoint = Checkpoint(directory, prefer=prefer)
    config, plan = plan_checkpoint(checkpoint, shapes_of)
    if rules is None:
        rules = partition_rules(config)
    else:
        check_partition_rules(tuple(rules), "rules")
    flat = {}
    stacks = layer_stacks(config)
    for entry in plan.entries:
        sharding = NamedSharding(mesh, leaf_partition_spec(entry.target, entry.target_shape, rules, sizes, stacks))
        flat[entry.target] = _place(checkpoint, entry, sharding, dtype)
    return ShardedLoad(config, traverse_util.unflatten_dict(flat, sep="/"), plan, checkpoint.bytes_read)


def source_index(transform: T, index: tuple[slice, ...]) -> tuple[slice, ...]:
    """The box of the stored (PyTorch-layout) tensor that holds the box `index` of the Flax-layout leaf."""
    if transform is T.LINEAR:  # flax [a, b] = torch [b, a]
        return index[::-1]
    if transform is T.CONV:  # flax [k, in, out] = torch [out, in, k]
        return index[::-1]
    if transform is T.ROW:  # flax [N] = torch [1, N]
        return (slice(0, 1), *index)
    return index


def _place(checkpoint: Checkpoint, entry: Entry, sharding: NamedSharding, dtype: Any) -> jax.Array:
    """One leaf as a global `jax.Array`; the callback runs once per local device, a box read once."""
    stored = checkpoint.info(entry.source).dtype
    cast = dtype if dtype is not None and (np.issubdtype(stored, np.floating) or stored.name == "bfloat16") else None
    shape = entry.target_shape
    boxes: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        box = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if box not in boxes:
            flax_index = tuple(slice(a, b) for a, b in box)
            stored_box = checkpoint.get_slice(entry.source, source_index(entry.transform, flax_index), cast)
            boxes[box] = entry.transform.to_flax(stored_box, contiguous=False)
        return boxes[box]

    return jax.make_array_from_callback(shape, sharding, read)


# ----------------------------------------------------------------------------------------------------------
# Batches and generation


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the `data` axis (replicated when the mesh has none)."""
    return NamedSharding(mesh, PartitionSpec("data") if mesh_sizes(mesh).get("data", 1) > 1 else PartitionSpec())


def pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    """`array` with rows appended, copies of its last row, up to a multiple of `multiple` rows.

    Copies of a real row rather than zeros: they run the same computation (an all-padding utterance is not
    a valid input) and finish when that row does, so they never make a greedy or beam search run longer.
    """
    rows = array.shape[0]
    padded = -(-rows // multiple) * multiple
    return array if padded == rows else array[np.minimum(np.arange(padded), rows - 1)]


def shard_batch(mesh: Mesh, array: Any, sharding: NamedSharding | None = None) -> jax.Array:
    """A global array of the host array `array` (the whole batch, the same on every process), its rows split
    over the `data` axis (or as `sharding` says); each process places only its rows. The row count must be a
    multiple of the data axis size (see `pad_rows`)."""
    array = np.asarray(array)
    sharding = batch_sharding(mesh) if sharding is None else sharding
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# Training splits the batch over every data-parallel axis, MaxText's convention: `fsdp` is data parallelism whose
# weights (and optimiser state) are split too, gathered where a layer uses them; rows only over `data` would
# make the devices of one fsdp group all compute the same rows.
TRAIN_BATCH_AXES = ("data", "fsdp")


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over `data` x `fsdp` (the axes the mesh has with size > 1; replicated when none)."""
    sizes = mesh_sizes(mesh)
    axes = tuple(a for a in TRAIN_BATCH_AXES if sizes.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def train_batch_rows(mesh: Mesh) -> int:
    """How many parts a training batch's rows are split into (its row count must be a multiple)."""
    sizes = mesh_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in TRAIN_BATCH_AXES)


def generate_on_mesh(model: Any, generate: Callable[..., Any], inputs: Any, attention_mask: Any = None,
                     **kwargs: Any) -> Any:
    """`generate(model, inputs, attention_mask, **kwargs)` with the batch split over `model.mesh`'s `data` axis.

    The batch is padded to a multiple of the data axis size with copies of its last utterance, and the padding
    rows are dropped from every array of the result whose first dimension is a multiple of the padded batch
    (rows utterance-major: with several rows per utterance, e.g. beams or returned sequences, the padding
    utterances' rows come last).

    Args:
        model: a model loaded with a mesh (`FlaxSpeechEncoderDecoderModel.from_pretrained(..., mesh=...)`).
        generate: the single-device generation function (`flax_model.generation.generate`).
        inputs: [B, N] float host array, the whole batch (the same on every process).
        attention_mask: [B, N] host array or None.
        **kwargs: passed to `generate` unchanged.
    """
    mesh = model.mesh
    inputs = np.asarray(inputs, np.float32)
    rows = inputs.shape[0]
    multiple = mesh_sizes(mesh).get("data", 1)
    inputs = shard_batch(mesh, pad_rows(inputs, multiple))
    if attention_mask is not None:
        attention_mask = shard_batch(mesh, pad_rows(np.asarray(attention_mask, np.int32), multiple))
    out = generate(model, inputs, attention_mask, **kwargs)
    padded = inputs.shape[0]
    if padded == rows:
        return out
    changes = {}
    for field in dataclasses.fields(out):
        value = getattr(out, field.name)
        if isinstance(value, np.ndarray) and value.ndim and value.shape[0] % padded == 0:
            changes[field.name] = value[:rows * (value.shape[0] // padded)]
    return dataclasses.replace(out, **changes)


class ReplicatedResults(dict):
    """A model's cache of compiled functions (`name -> function`) whose functions return their results
    replicated over the mesh.

    In a multi-process run an array split over devices of several processes cannot be read by any of them
    (`np.asarray` refuses); replicated results can be read by every process, as a single-process caller
    would. Functions are wrapped as they are stored, so code that compiles into the cache needs no change.
    """

    def __init__(self, mesh: Mesh):
        super().__init__()
        self._replicate = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __setitem__(self, key: Any, fn: Callable[..., Any]) -> None:
        @functools.wraps(fn)
        def replicated(*args: Any, **kwargs: Any) -> Any:
            return self._replicate(fn(*args, **kwargs))

        super().__setitem__(key, replicated)


def on_mesh(model: Any, mesh: Mesh) -> Any:
    """Marks a model whose params were placed on `mesh`: `model.mesh` is set, and in a multi-process run its
    compiled functions return replicated results (`ReplicatedResults`). Returns the model."""
    mesh = auto_mesh(mesh)
    model.mesh = mesh
    if jax.process_count() > 1:
        model._compiled = ReplicatedResults(mesh)
    return model


# ----------------------------------------------------------------------------------------------------------
# The commands' --mesh


def parse_mesh(text: str, param: str = "mesh") -> dict[str, int]:
    """`"data=2,fsdp=4"` -> `{"data": 2, "fsdp": 4}` (axes among data, fsdp, model, each once, sizes >= 1).

    Raises:
        UsageError: `mesh=<text>: <what is wrong>` (a command prints it as `--mesh <text>: ...`, exit 2).
    """
    sizes: dict[str, int] = {}
    for item in str(text).split(","):
        name, sep, size = item.strip().partition("=")
        name, size = name.strip(), size.strip()
        if not sep or not name or not size:
            raise bad_argument(param, text, f"{item.strip()!r} is not AXIS=SIZE (e.g. data=2,fsdp=4)")
        if name not in MESH_AXES:
            raise bad_argument(param, text, f"axis {name!r} is not one of {', '.join(MESH_AXES)}")
        if name in sizes:
            raise bad_argument(param, text, f"axis {name!r} is given twice")
        if not size.isdigit() or int(size) < 1:
            raise bad_argument(param, text, f"the size of {name!r} must be a positive integer, not {size!r}")
        sizes[name] = int(size)
    return sizes


def mesh_from_flag(text: str, param: str = "mesh", devices: list[Any] | None = None) -> Mesh:
    """The mesh a command's `--mesh data=2,fsdp=4` asks for, over every device JAX sees (all processes'),
    laid out by `jax.make_mesh` (which knows the accelerators' topology), with Auto axes.

    Raises:
        UsageError: a malformed value, or sizes whose product is not the number of devices.
    """
    sizes = parse_mesh(text, param)
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        raise bad_argument(param, text, f"the axis sizes multiply to {math.prod(sizes.values())}, but there are "
                           f"{len(devices)} devices (their product must equal the device count)")
    shape, names = tuple(sizes.values()), tuple(sizes)
    axis_types = (AxisType.Auto,) * len(names)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, names, axis_types=axis_types)
    return Mesh(np.array(devices).reshape(shape), names, axis_types=axis_types)


# ----------------------------------------------------------------------------------------------------------
# Training and saving


def gathered_in_training(config: HFConfig, shardings: Mapping[str, NamedSharding]) -> frozenset[str]:
    """The split leaves a training step must gather whole where they are used: weight-norm convolution kernels
    (HF's positional conv embedding, a grouped convolution).

    XLA's SPMD partitioner (jax 0.10) aborts the process compiling the gradient of a grouped convolution whose
    kernel is split (`convolution_handler.cc`: "new_input_batch_size % new_output_batch_size == 0"); forward
    passes partition it fine. Gathering at use is what FSDP does with every weight anyway: the leaf stays split
    in memory and in the optimiser state, and its gradient is split again on the way out.

    Args:
        config: the model's config (its key table says which leaves are weight-norm kernels).
        shardings: `/`-joined path -> the leaf's sharding.
    """
    keymap = keymap_for(config)
    out = set()
    for path, sharding in shardings.items():
        mapped = keymap.to_torch(path)
        if mapped is not None and mapped[1] is T.WEIGHT_NORM and not sharding.is_fully_replicated:
            out.add(path)
    return frozenset(out)


def gathered(leaf: Any) -> np.ndarray:
    """The whole value of one leaf as a host array. A leaf split over several processes' devices is
    all-gathered (a collective: every process must call this for the same leaf at the same point)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def gathered_leaves(flat: Mapping[str, Any], order: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, whole host array) for the leaves of `flat` in `order`, one at a time: a sharded model is saved
    without a whole-model host copy. Every process must iterate to the end (each leaf is a collective)."""
    for path in order:
        yield path, gathered(flat[path])


def is_writer() -> bool:
    """Whether this process writes shared outputs (process 0; always true in a single-process run)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
