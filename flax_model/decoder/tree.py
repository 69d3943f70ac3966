"""Flax module trees built from a decoder layout: the core's parameters at the family's nested names.

`build_tree(core, slots)` turns a layout's rows into a nested, hashable description; `adopt(owner, tree, ...)`
creates it inside a module's `setup`: every path segment but the last becomes a `Node` (a module that only holds
named children), the last the slot's module (`nn.Dense`, `nn.LayerNorm`, ...) or raw parameters. So
`model/decoder/embed_tokens` is `Node "model" -> Node "decoder" -> nn.Embed "embed_tokens"`, reached with
`lookup(owner, "model/decoder/embed_tokens")`. The layer stack is one of the tree's leaves (`make_stack`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import Kind, Slot
from flax_model.decoder.modules import Conv1D, RMSNorm
from flax_model.layers import Dense, LayerNorm

PARAM = "param"  # a raw parameter (a vocabulary projection's kernel and bias)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """What one slot creates (hashable, so that a module can hold it).

    Attributes:
        slot: the core slot (for messages).
        kind: the layout's `Kind`, or `PARAM`.
        shape: embeddings (rows, width); projections (out features,); norms (width,); heads (D, V); vectors and
            raw parameters their shape.
        use_bias: projections: whether there is a bias.
        eps, offset: norms' epsilon and RMSNorm's weight offset.
        normal_init: a raw parameter drawn from N(0, init_scale) (else zeros).
        flax_names: the kind's Flax parameter renames.
    """

    slot: str
    kind: Kind | str
    shape: tuple[int, ...]
    use_bias: bool = True
    eps: float = 0.0
    offset: float = 0.0
    normal_init: bool = False
    flax_names: tuple[tuple[str, str], ...] = ()


Tree = tuple[tuple[str, Any], ...]  # ((name, Leaf | Tree), ...) in creation order


def leaf(core: DecoderCore, slot: Slot) -> Leaf:
    """What a slot holds, sized from the core."""
    kind = slot.kind
    make = functools.partial(Leaf, slot.slot, kind, flax_names=slot.flax_names)
    if kind is Kind.EMBED:
        return make((core.embedding_rows(slot.slot), core.hidden_size))
    if kind in (Kind.LINEAR, Kind.CONV1D):
        _, out, bias = core.linear_shape(slot.slot)
        return make((out,), use_bias=bias)
    if kind in (Kind.LAYER_NORM, Kind.RMS_NORM):
        return make((core.norm_width(slot.slot),), eps=core.norm_eps, offset=core.norm_offset)
    if kind in (Kind.HEAD, Kind.HEAD_WITH_BIAS):
        return make((core.hidden_size, core.vocab_size))
    if kind in (Kind.VECTOR, Kind.ROW):
        return make((core.vocab_size,))
    return make(())


def build_tree(core: DecoderCore, slots: Iterable[Slot]) -> Tree:
    """The nested description of `slots` (each slot's `flax` path split at `/`)."""
    root: dict[str, Any] = {}

    def place(path: str, value: Leaf) -> None:
        *parents, name = path.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: {part} holds a slot's parameters, it cannot also be a container")
        if name in node:
            raise ValueError(f"{path}: two slots at the same path")
        node[name] = value

    for slot in slots:
        value = leaf(core, slot)
        if slot.kind in (Kind.HEAD, Kind.HEAD_WITH_BIAS):  # raw parameters, beside which a logits bias may sit
            for name, param in _head_params(value):
                place(f"{slot.flax}/{name}", param)
        else:
            place(slot.flax, value)

    def freeze(node: dict[str, Any]) -> Tree:
        return tuple((k, freeze(v) if isinstance(v, dict) else v) for k, v in node.items())

    return freeze(root)


class Node(nn.Module):
    """A module that only holds named children (one level of HF's nested names)."""

    tree: Tree
    init_scale: float
    dtype: Any = jnp.float32
    make_stack: Callable[[], nn.Module] | None = None

    def setup(self) -> None:
        adopt(self, self.tree, self.init_scale, self.dtype, self.make_stack)


def adopt(owner: nn.Module, tree: Tree, init_scale: float, dtype: Any,
          make_stack: Callable[[], nn.Module] | None = None) -> None:
    """Creates `tree`'s children as attributes of `owner` (call from its `setup`).

    Args:
        owner: the module the tree hangs from.
        tree: from `build_tree`.
        init_scale: the standard deviation of kernels and embeddings drawn at `init`.
        dtype: the computation dtype of the modules.
        make_stack: builds the module at the tree's STACK leaf.
    """
    for name, child in tree:
        if hasattr(type(owner), name):
            raise ValueError(f"{type(owner).__name__}: a layout names a child {name!r}, which is one of its methods")
        if isinstance(child, tuple):
            value = Node(child, init_scale, dtype, make_stack)
        elif child.kind is Kind.STACK:
            value = make_stack()
        elif child.kind in (Kind.VECTOR, Kind.ROW, PARAM):
            init = nn.initializers.normal(init_scale) if child.normal_init else nn.initializers.zeros
            value = owner.param(name, init, child.shape)
        else:
            value = _module(child, init_scale, dtype)
        setattr(owner, name, value)


def _head_params(child: Leaf) -> Tree:
    """A vocabulary projection's raw `kernel` [D, V] (and `bias` [V])."""
    names = dict(child.flax_names)
    d, vocab = child.shape
    params: list[tuple[str, Leaf]] = [(names.get("weight", "kernel"), Leaf(child.slot, PARAM, (d, vocab),
                                                                           normal_init=True))]
    if child.kind is Kind.HEAD_WITH_BIAS:
        params.append((names.get("bias", "bias"), Leaf(child.slot, PARAM, (vocab,))))
    return tuple(params)


def _module(child: Leaf, init_scale: float, dtype: Any) -> nn.Module:
    init = nn.initializers.normal(init_scale)
    names = dict(child.flax_names)
    if child.kind is Kind.EMBED:
        return nn.Embed(*child.shape, embedding_init=init, dtype=dtype)
    if child.kind is Kind.LINEAR:
        return Dense(child.shape[0], use_bias=child.use_bias, dtype=dtype, kernel_init=init)
    if child.kind is Kind.CONV1D:
        return Conv1D(child.shape[0], init_scale, child.use_bias, dtype)
    if child.kind is Kind.LAYER_NORM:
        if names:
            raise ValueError(f"{child.slot}: a LayerNorm's Flax parameters are `scale` and `bias`, not renamed")
        return LayerNorm(epsilon=child.eps, dtype=dtype)  # two-pass variance: the one-pass form loses digits
    if child.kind is Kind.RMS_NORM:
        return RMSNorm(child.eps, child.offset, names.get("weight", "scale"), dtype)
    raise ValueError(f"{child.slot}: kind {child.kind} has no module")


def lookup(owner: nn.Module, flax_path: str) -> Any:
    """The module or parameter at `flax_path` below `owner`."""
    return functools.reduce(getattr, flax_path.split("/"), owner)
