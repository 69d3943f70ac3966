"""Declarative key tables: one per architecture, read in both directions (PyTorch <-> Flax).

A row is `Rule(torch_template, flax_template, transform)`. Templates name layer indices with `{i}`, `{j}`
(digits only); every other character matches literally. `KeyMap.to_flax` / `KeyMap.to_torch` look a key up
in either direction. `SourceRules` put a raw source checkpoint's names into the canonical PyTorch names the
table speaks (strip `wav2vec2.`, old weight-norm spellings, tied duplicates) and say why other keys are
dropped. `plan_torch_to_flax` and `plan_flax_to_torch` map whole key sets, collect every problem (unmapped
keys, wrong shapes, missing targets) and raise them once.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np

from convert.base.errors import KeyMapError

Shape = tuple[int, ...]


class T(enum.Enum):
    """How a tensor is laid out differently in the two frameworks."""

    IDENTITY = "identity"  # biases, raw parameters
    EMBED = "embed"  # nn.Embedding.weight <-> nn.Embed.embedding
    NORM = "norm"  # LayerNorm/GroupNorm weight <-> scale (a rename only)
    WEIGHT_NORM = "weight_norm"  # weight-norm g and v: same layout in both (HF's Flax keeps torch's)
    LINEAR = "linear"  # torch [out, in] <-> flax [in, out]; GPT-2 Conv1D [in, out] <-> HF Flax [out, in]
    CONV = "conv"  # torch Conv1d [out, in/groups, k] <-> flax Conv [k, in/groups, out]
    ROW = "row"  # torch [1, N] <-> flax [N] (BART's final_logits_bias as the LM head's bias)

    def to_flax(self, a: np.ndarray, contiguous: bool = True) -> np.ndarray:
        """`a` in the Flax layout; `contiguous=False` returns a strided view instead of a copy (the writers
        in convert.base.writing copy views out block by block, faster than one strided copy and without a
        second full-size array)."""
        if self is T.LINEAR:
            return np.ascontiguousarray(a.T) if contiguous else a.T
        if self is T.CONV:
            a = np.transpose(a, (2, 1, 0))
            return np.ascontiguousarray(a) if contiguous else a
        if self is T.ROW:
            return a.reshape(-1)
        return a

    def to_torch(self, a: np.ndarray, contiguous: bool = True) -> np.ndarray:
        if self is T.ROW:
            return a.reshape(1, -1)
        # The transposes are their own inverse.
        return self.to_flax(a, contiguous)

    def flax_shape(self, shape: Shape) -> Shape:
        shape = tuple(shape)
        if self is T.LINEAR:
            return shape[::-1]
        if self is T.CONV:
            return (shape[2], shape[1], shape[0])
        if self is T.ROW:
            return shape[1:]
        return shape

    def torch_shape(self, shape: Shape) -> Shape:
        if self is T.ROW:
            return (1, *shape)
        return self.flax_shape(shape)

    def expected_ndim(self, side: str) -> int | None:
        """The rank this kind of weight must have on `side` ("torch" or "flax"), None if any."""
        if self is T.ROW:
            return 2 if side == "torch" else 1
        return {T.LINEAR: 2, T.CONV: 3, T.EMBED: 2}.get(self)


_PLACEHOLDER = re.compile(r"\{([a-z])\}")


def _compile(template: str, sep: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>\\d+)" for k, p in enumerate(parts))
    return re.compile(pattern + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row: a PyTorch key template, the Flax path template (`/`-separated) and the layout transform."""

    torch: str
    flax: str
    transform: T = T.IDENTITY

    def __post_init__(self) -> None:
        if set(_PLACEHOLDER.findall(self.torch)) != set(_PLACEHOLDER.findall(self.flax)):
            raise ValueError(f"placeholders differ between {self.torch!r} and {self.flax!r}")

    @cached_property
    def _torch_re(self) -> re.Pattern[str]:
        return _compile(self.torch, ".")

    @cached_property
    def _flax_re(self) -> re.Pattern[str]:
        return _compile(self.flax, "/")

    def match_torch(self, key: str) -> str | None:
        m = self._torch_re.match(key)
        return self.flax.format(**m.groupdict()) if m else None

    def match_flax(self, path: str) -> str | None:
        m = self._flax_re.match(path)
        return self.torch.format(**m.groupdict()) if m else None

    def prefixed(self, torch_prefix: str, flax_prefix: str) -> Rule:
        return Rule(torch_prefix + self.torch, flax_prefix + self.flax, self.transform)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """An architecture's key table. `to_flax`/`to_torch` return (name, transform) or None when unmapped."""

    name: str
    rules: tuple[Rule, ...]

    def to_flax(self, torch_key: str) -> tuple[str, T] | None:
        for rule in self.rules:
            path = rule.match_torch(torch_key)
            if path is not None:
                return path, rule.transform
        return None

    def to_torch(self, flax_path: str) -> tuple[str, T] | None:
        for rule in self.rules:
            key = rule.match_flax(flax_path)
            if key is not None:
                return key, rule.transform
        return None

    def prefixed(self, torch_prefix: str, flax_prefix: str) -> KeyMap:
        """The same table one level down, e.g. under `decoder.` / `decoder/` in the composed model."""
        return KeyMap(self.name, tuple(r.prefixed(torch_prefix, flax_prefix) for r in self.rules))

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(f"{self.name}+{other.name}", self.rules + other.rules)


@dataclasses.dataclass(frozen=True)
class SourceRules:
    """How raw checkpoint names become canonical names: ordered regex renames, then drops with reasons.

    A rename whose result is already a key of the source is a duplicate (e.g. BART's `model.shared.weight`
    next to `model.decoder.embed_tokens.weight`) and is dropped with that reason.
    """

    renames: tuple[tuple[str, str], ...] = ()
    drops: tuple[tuple[str, str], ...] = ()

    def __add__(self, other: SourceRules) -> SourceRules:
        return SourceRules(self.renames + other.renames, self.drops + other.drops)

    def canonicalize(self, keys: Iterable[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Returns ({canonical_key: source_key}, [(dropped_source_key, why)])."""
        keys = list(keys)
        present = set(keys)
        canonical: dict[str, str] = {}
        dropped: list[tuple[str, str]] = []
        for key in keys:
            why = self._drop_reason(key)
            if why is not None:
                dropped.append((key, why))
                continue
            name = key
            for pattern, repl in self.renames:
                name = re.sub(pattern, repl, name)
            if name != key and name in present:
                dropped.append((key, f"duplicate of {name}"))
                continue
            if name in canonical:
                dropped.append((key, f"duplicate of {canonical[name]}"))
                continue
            canonical[name] = key
        # Drops may name canonical keys too (e.g. a tied lm_head reached through a rename).
        for name in list(canonical):
            why = self._drop_reason(name)
            if why is not None:
                dropped.append((canonical.pop(name), why))
        return canonical, dropped

    def _drop_reason(self, key: str) -> str | None:
        for pattern, why in self.drops:
            if re.match(pattern, key):
                return why
        return None


@dataclasses.dataclass
class Entry:
    """One tensor moved between layouts."""

    source: str  # the key as stored in the source
    target: str  # the key or path in the target layout
    transform: T
    source_shape: Shape
    target_shape: Shape


@dataclasses.dataclass
class Plan:
    """Everything a conversion will do, decided from names and shapes alone (no tensor is read)."""

    entries: list[Entry]
    dropped: list[tuple[str, str]]  # (source key, why)
    missing: list[str]  # expected targets that no source key provides

    def by_target(self) -> dict[str, Entry]:
        return {e.target: e for e in self.entries}


def plan_torch_to_flax(
    keymap: KeyMap,
    source_shapes: Mapping[str, Shape],
    expected: Mapping[str, Shape] | None = None,
    source_rules: SourceRules = SourceRules(),
    where: str = "checkpoint",
    hint: Callable[[Shape, Shape], str] | None = None,
) -> Plan:
    """Maps every source key to a Flax path, checking each shape against `expected` when given; `hint(expected,
    found)` adds to a wrong shape's message (e.g. the config fields behind the dimensions that differ).

    Raises:
        KeyMapError: listing every unmapped key, wrong shape and unexpected target at once.
    """
    canonical, dropped = source_rules.canonicalize(source_shapes)
    return _plan(
        {name: (src, tuple(source_shapes[src])) for name, src in canonical.items()},
        dropped, keymap.to_flax, lambda t, s: t.flax_shape(s), expected, where, "torch", hint,
    )


def plan_flax_to_torch(
    keymap: KeyMap,
    flax_shapes: Mapping[str, Shape],
    expected: Mapping[str, Shape] | None = None,
    where: str = "Flax params",
) -> Plan:
    """Maps every Flax path (`/`-joined) to a PyTorch key, checking shapes against `expected` when given."""
    items = {path: (path, tuple(shape)) for path, shape in flax_shapes.items()}
    return _plan(items, [], keymap.to_torch, lambda t, s: t.torch_shape(s), expected, where, "flax")


def _plan(items, dropped, lookup, convert_shape, expected, where, source_side, hint=None) -> Plan:
    entries: list[Entry] = []
    problems: list[str] = []
    unmapped: list[str] = []
    for name, (src, shape) in items.items():
        found = lookup(name)
        if found is None:
            unmapped.append(src if src == name else f"{src} (as {name})")
            continue
        target, transform = found
        ndim = transform.expected_ndim(source_side)
        if ndim is not None and len(shape) != ndim:
            problems.append(f"{src}: shape {list(shape)} is not {ndim}-D as a {transform.value} weight must be")
            continue
        target_shape = convert_shape(transform, shape)
        if expected is not None:
            if target not in expected:
                problems.append(f"{src}: maps to {target}, which this config's model does not have")
                continue
            if tuple(expected[target]) != target_shape:
                problems.append(f"{src}: shape {list(shape)} does not match the config (expected "
                                f"{list(expected[target])} for {target})"
                                + (hint(tuple(expected[target]), target_shape) if hint else ""))
                continue
        entries.append(Entry(src, target, transform, shape, target_shape))
    if unmapped:
        problems.insert(0, f"{len(unmapped)} unmapped key(s): {', '.join(sorted(unmapped)[:20])}"
                        + (" ..." if len(unmapped) > 20 else ""))
    if problems:
        raise KeyMapError(f"{where}: " + "; ".join(problems))
    loaded = {e.target for e in entries}
    missing = sorted(set(expected or ()) - loaded)
    return Plan(entries, list(dropped), missing)


def check_missing(plan: Plan, allowed: Sequence[str] = (), where: str = "checkpoint") -> list[str]:
    """Returns the missing targets that match one of the `allowed` regexes; raises for any other."""
    allowed_re = [re.compile(p) for p in allowed]
    ok = [m for m in plan.missing if any(r.match(m) for r in allowed_re)]
    bad = [m for m in plan.missing if m not in ok]
    if bad:
        raise KeyMapError(
            f"{where}: {len(bad)} tensor(s) the model needs are missing: {', '.join(bad[:20])}"
            + (" ..." if len(bad) > 20 else "")
        )
    return ok
