"""Reference module trees built from a decoder layout: the core's parameters at the family's PyTorch keys.

`adopt(owner, core, slots, make_stack)` registers, in the layout's order, every slot below `owner`: each dotted
segment but the last becomes a `Node` (a module that only holds named children), the last the slot's module
(`nn.Linear`, `nn.LayerNorm`, ...), parameter or buffer. Registration order is the layout's, so `state_dict()`
lists the keys as transformers' module does (the fixture scripts draw their weights in that order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import Kind, Slot
from torch_reference.decoder.modules import Conv1D, RMSNorm


class Node(nn.Module):
    """A module that only holds named children (one level of HF's nested names)."""


def _module(core: DecoderCore, slot: Slot, make_stack: Callable[[], nn.Module] | None) -> nn.Module:
    kind = slot.kind
    if kind is Kind.EMBED:
        padding = {"embed_tokens": core.padding_idx, "embed_positions": core.position_padding_idx}.get(slot.slot)
        return nn.Embedding(core.embedding_rows(slot.slot), core.hidden_size, padding_idx=padding)
    if kind is Kind.LINEAR:
        return nn.Linear(*core.linear_shape(slot.slot))
    if kind is Kind.CONV1D:
        in_features, out_features, bias = core.linear_shape(slot.slot)
        return Conv1D(in_features, out_features, core.init_scale, bias)
    if kind is Kind.LAYER_NORM:
        return nn.LayerNorm(core.norm_width(slot.slot), eps=core.norm_eps)
    if kind is Kind.RMS_NORM:
        return RMSNorm(core.norm_width(slot.slot), core.norm_eps, core.norm_offset)
    if kind in (Kind.HEAD, Kind.HEAD_WITH_BIAS):
        return nn.Linear(core.hidden_size, core.vocab_size, bias=kind is Kind.HEAD_WITH_BIAS)
    if kind is Kind.STACK:
        return make_stack()
    raise ValueError(f"{slot.slot}: kind {kind} has no module")


def adopt(owner: nn.Module, core: DecoderCore, slots: Iterable[Slot],
          make_stack: Callable[[], nn.Module] | None = None,
          containers: Mapping[str, Callable[[], Node]] | None = None) -> None:
    """Registers `slots` below `owner`, in order (see the module docstring).

    Args:
        make_stack: builds the STACK slot's module.
        containers: {dotted path: factory} of containers that are not a plain `Node`.
    """
    containers = containers or {}
    for slot in slots:
        *parents, name = slot.torch.split(".")
        if hasattr(type(owner), (parents or [name])[0]):
            raise ValueError(f"{type(owner).__name__}: a layout names a child {(parents or [name])[0]!r}, which is "
                             "one of its methods")
        parent = owner
        for depth, part in enumerate(parents):
            if part not in parent._modules:
                parent.add_module(part, containers.get(".".join(parents[:depth + 1]), Node)())
            parent = parent._modules[part]
        if slot.kind is Kind.VECTOR:
            parent.register_parameter(name, nn.Parameter(torch.zeros(core.vocab_size)))
        elif slot.kind is Kind.ROW:
            parent.register_buffer(name, torch.zeros(1, core.vocab_size))
        else:
            parent.add_module(name, _module(core, slot, make_stack))


def lookup(owner: nn.Module, key: str) -> Any:
    """The module, parameter or buffer at dotted `key` below `owner`."""
    return functools.reduce(getattr, key.split("."), owner)


def tie(owner: nn.Module, tied: dict[str, str]) -> None:
    """Makes each parameter `key` of `tied` the very parameter at its source key (shared storage)."""
    for key, source in tied.items():
        module, _, name = key.rpartition(".")
        setattr(lookup(owner, module), name, lookup(owner, source))
