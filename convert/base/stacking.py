"""Converting param trees between HF's per-layer layout and the stacked layout of scanned layers.

HF's layout keeps layer i of a stack at `<stack prefix><i>/<leaf>` (`ArchSpec.layer_stack`, e.g.
`model/decoder/layers/3/fc1/kernel`). A model whose identical layers run in one `nn.scan` keeps one leaf per
layer-leaf name at `<stack prefix><leaf>` with a leading layer axis (`model/decoder/layers/fc1/kernel`
[layers, D, F]). Both directions only stack and index arrays: the conversion is bit-exact.

The trees here are flat (`/`-joined path -> array); arrays may be numpy or jax (pass `jnp.stack` as `stack`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from convert.base.composed import SpeechEncoderDecoderConfig
from convert.base.configs import HFConfig
from convert.base.errors import UnsupportedConfig
from convert.base.prefix import SpeechPrefixConfig
from convert.base.registry import spec_for

# Stack prefix -> number of layers.
Stacks = dict[str, int]


def layer_stacks(config: HFConfig) -> Stacks:
    """The layer stacks of a composed model (under `encoder/` and `decoder/`) or of a single architecture."""
    if isinstance(config, SpeechEncoderDecoderConfig | SpeechPrefixConfig):
        stacks = {}
        for part in ("encoder", "decoder"):
            sub = getattr(config, part)
            spec = spec_for(sub, role=part)
            stacks[f"{part}/{spec.layer_stack[1]}"] = spec.num_layers(sub)
        return stacks
    spec = spec_for(config)
    return {spec.layer_stack[1]: spec.num_layers(config)}


def _split(path: str, stacks: Stacks) -> tuple[str, int, str] | None:
    """`<prefix><i>/<rest>` -> (prefix, i, rest); None for a path outside every stack."""
    for prefix in stacks:
        if path.startswith(prefix):
            match = re.fullmatch(r"(\d+)/(.+)", path[len(prefix):])
            if match:
                return prefix, int(match.group(1)), match.group(2)
    return None


def layer_of(path: str, stacks: Stacks) -> tuple[str, int] | None:
    """(the stacked leaf that holds per-layer `path`, the layer's index), or None outside every stack."""
    split = _split(path, stacks)
    return None if split is None else (split[0] + split[2], split[1])


def _stack_of(path: str, stacks: Stacks) -> str | None:
    """The prefix of the stack that stacked leaf `path` belongs to, or None when `path` is not a stacked leaf."""
    for prefix in stacks:
        rest = path[len(prefix):]
        if path.startswith(prefix) and rest and not re.match(r"\d+/", rest):
            return prefix
    return None


def stack_size(path: str, stacks: Stacks) -> int | None:
    """The number of layers of stacked leaf `path`, or None when `path` is not a stacked leaf."""
    prefix = _stack_of(path, stacks)
    return None if prefix is None else stacks[prefix]


def stacked_predicate(predicate: Callable[[str], bool], stacks: Stacks) -> Callable[[str], bool]:
    """A predicate over per-layer paths as one over stacked paths: a stacked leaf gets its layers' answer.

    Raises (when called):
        UnsupportedConfig: the layers of a stacked leaf answer differently (the stacked layout cannot hold that).
    """
    def stacked(path: str) -> bool:
        layers = stack_size(path, stacks)
        if layers is None:
            return predicate(path)
        answers = {bool(predicate(layer_path(path, stacks, i))) for i in range(layers)}
        if len(answers) > 1:
            raise UnsupportedConfig(f"params: the layers of {path} are not all frozen or all trained: they cannot "
                                    "be stacked for scanned layers")
        return answers.pop()

    return stacked


def layer_path(path: str, stacks: Stacks, layer: int = 0) -> str | None:
    """The per-layer path of layer `layer` of stacked leaf `path`, or None when `path` is not a stacked leaf."""
    prefix = _stack_of(path, stacks)
    return None if prefix is None else f"{prefix}{layer}/{path[len(prefix):]}"


def stack_params(flat: Mapping[str, Any], stacks: Stacks, stack: Callable[[list[Any]], Any] = np.stack,
                 consume: bool = False) -> dict[str, Any]:
    """Per-layer flat tree -> stacked flat tree (leaves outside the stacks are kept as they are).

    Args:
        flat: `/`-joined path -> array.
        stacks: from `layer_stacks`.
        stack: joins the layers' arrays along a new leading axis.
        consume: empty `flat` (a dict) as the stacked leaves are made, so that each layer's arrays can be freed
            once stacked: a load then holds the model once plus one stacked leaf, not twice.

    Raises:
        UnsupportedConfig: a stack whose layers do not all have the same leaves, or not `stacks[prefix]` of them.
    """
    out: dict[str, Any] = {}
    grouped: dict[str, dict[int, Any]] = {}
    for path in list(flat):
        value = flat.pop(path) if consume else flat[path]  # type: ignore[attr-defined]
        split = _split(path, stacks)
        if split is None:
            out[path] = value
        else:
            prefix, i, rest = split
            grouped.setdefault(prefix + rest, {})[i] = value
        del value
    for path in list(grouped):
        layers = grouped.pop(path)
        prefix = next(p for p in stacks if path.startswith(p))
        if sorted(layers) != list(range(stacks[prefix])):
            raise UnsupportedConfig(f"params: {path} is held by layers {sorted(layers)}, expected 0..{stacks[prefix] - 1}")
        out[path] = stack([layers[i] for i in range(stacks[prefix])])
        del layers
    return out


def unstack_params(flat: Mapping[str, Any], stacks: Stacks) -> dict[str, Any]:
    """Stacked flat tree -> per-layer flat tree; each layer's leaf is an index into the stacked array (a view
    for numpy arrays).

    Raises:
        UnsupportedConfig: a stacked leaf whose leading axis is not the stack's number of layers.
    """
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if layer_path(path, stacks) is None:
            out[path] = value
            continue
        prefix = next(p for p in stacks if path.startswith(p))
        count = stacks[prefix]
        if not np.shape(value) or np.shape(value)[0] != count:
            raise UnsupportedConfig(f"params: stacked leaf {path} has shape {list(np.shape(value))}, expected a "
                                    f"leading axis of {count} layers")
        rest = path[len(prefix):]
        for i in range(count):
            out[f"{prefix}{i}/{rest}"] = value[i]
    return out


def stacked_shapes(shapes: Mapping[str, tuple[int, ...]], stacks: Stacks) -> dict[str, tuple[int, ...]]:
    """The shapes of the stacked tree of a per-layer tree's `shapes`."""
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in shapes.items():
        split = _split(path, stacks)
        if split is None:
            out[path] = tuple(shape)
        else:
            out[split[0] + split[2]] = (stacks[split[0]], *shape)
    return out


def is_stacked(paths: Any, stacks: Stacks) -> bool:
    """Whether a tree's paths (any iterable of `/`-joined paths) are in the stacked layout: some leaf sits
    directly under a stack prefix."""
    return any(layer_path(path, stacks) is not None for path in paths)
