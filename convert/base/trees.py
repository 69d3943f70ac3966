"""Nested dicts of arrays (Flax param trees) and their flat form, `/`-joined path -> leaf, without importing Flax:
the base and the commands that only read or write files start without JAX."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class PathClash(ValueError):
    """Two leaves of a tree join to the same path (`{"a/b": x, "a": {"b": y}}`)."""

    def __init__(self, path: str):
        super().__init__(f"two leaves are named {path!r}")
        self.path = path


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`. Any Mapping is a node (an empty one contributes nothing), anything else
    a leaf; the order is the tree's, depth first. Two leaves that join to the same path raise PathClash rather
    than one hiding the other."""
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, path)
            elif path in flat:
                raise PathClash(path)
            else:
                flat[path] = value

    walk(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """The inverse of `flatten`: `{"a/b": x}` -> `{"a": {"b": x}}`. A path that is both a leaf and the prefix of
    another path is refused (ValueError)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split(sep)
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{path}: {part!r} is a leaf and a subtree")
            node = child
        if isinstance(node.get(name), dict):
            raise ValueError(f"{path}: a leaf and a subtree")
        node[name] = value
    return tree
