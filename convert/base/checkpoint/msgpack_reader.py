"""The `flax_model.msgpack` reader (flax.serialization's format), indexed without loading it: the msgpack structure
is walked once, skipping over array data and recording where each array's bytes lie."""

from __future__ import annotations

import dataclasses
import io
import struct
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import convert.base.checkpoint.tensors as tensors
from convert.base.checkpoint.tensors import TensorInfo, brief, checked_shape, read_box
from convert.base.errors import CheckpointError
from convert.base.trees import PathClash, flatten

# A Flax parameter tree is about a dozen msgpack levels deep: 64 is far beyond any real file, and far within
# Python's recursion limit, which the walker would otherwise meet on a corrupt one.
_MAX_DEPTH = 64


class FlaxMsgpackFile:
    """A `flax_model.msgpack` (flax.serialization's format), indexed without loading it.

    The msgpack structure is walked once, skipping over array data and recording where each array's bytes
    lie (flax stores an array as ext type 1 holding `(shape, dtype name, raw bytes)`, and splits arrays over
    1 GiB into `__msgpack_chunked_array__` maps); a tensor is then read with one `readinto` per chunk.
    """

    def __init__(self, path: Path):
        self.path = path
        self.bytes_read = 0
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                tree = _MsgpackIndex(f, size).value()
                if f.tell() != size:
                    raise _CorruptMsgpack(f"{size - f.tell()} bytes after the tree")
            if isinstance(tree, dict) and set(tree) == {"params"} and isinstance(tree["params"], dict):
                tree = tree["params"]
            if not isinstance(tree, dict):
                raise _CorruptMsgpack(f"a {type(tree).__name__}, not a Flax parameter tree")
            self._leaves: dict[str, ArrayRef | np.ndarray] = _flat_leaves(tree)
        except _CorruptMsgpack as e:
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file ({e})") from None
        except EOFError:
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file (ends early)") from None
        self.entries = {k: TensorInfo(k, tuple(v.shape), np.dtype(v.dtype), path) for k, v in self._leaves.items()}

    def read(self, key: str) -> np.ndarray:
        leaf = self._leaves[key]
        if isinstance(leaf, np.ndarray):  # a scalar kept from the walk
            return leaf.copy()
        out = tensors.new_array(leaf.shape, leaf.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with self.path.open("rb") as f:
            position = 0
            for offset, nbytes in leaf.chunks:
                f.seek(offset)
                if f.readinto(view[position:position + nbytes]) != nbytes:
                    raise CheckpointError(f"{self.path}: truncated msgpack file (short read of {key!r})")
                position += nbytes
        self.bytes_read += position
        return out

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        leaf = self._leaves[key]
        if isinstance(leaf, np.ndarray):  # a scalar kept from the walk
            return leaf[tuple(slice(a, b) for a, b in box)].copy()
        out = read_box(self.path, leaf.chunks, self.entries[key], box)
        self.bytes_read += out.nbytes
        return out


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """Where an array's bytes lie in a msgpack file: (offset, nbytes) per chunk, in order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[tuple[int, int], ...]


class _CorruptMsgpack(Exception):
    pass


# The dtypes flax writes for parameters (numpy's and ml_dtypes' names, as `dtype.name` gives them). A name is
# looked up here, never handed to np.dtype: that would also accept "O" (object arrays), "f4,f4" or ">f4".
_FLAX_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t) for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
        np.float16, np.float32, np.float64, np.complex64, np.complex128,
        *(getattr(ml_dtypes, name) for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                 "float8_e5m2fnuz", "float8_e4m3b11fnuz", "int4", "uint4")
          if hasattr(ml_dtypes, name)),
    )
}


class _MsgpackIndex:
    """Reads msgpack values from a file, except array data: ndarray ext values become `ArrayRef`s.

    Every length and count is checked against the bytes left before anything is read or built, and nesting is
    bounded, so that a corrupt file is reported rather than exhausting memory or the stack.
    """

    _CHUNKED = "__msgpack_chunked_array__"

    def __init__(self, f: Any, size: int, depth: int = 0):
        self._f = f
        self._size = size
        self._depth = depth

    def _left(self) -> int:
        return self._size - self._f.tell()

    def _read(self, n: int) -> bytes:
        # Checked first: a buffered read allocates all of `n` up front, and `n` may be 2**32 - 1.
        if n > self._left():
            raise EOFError
        data = self._f.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "big")

    def value(self) -> Any:
        if self._depth >= _MAX_DEPTH:
            raise _CorruptMsgpack(f"nested deeper than {_MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._value()
        finally:
            self._depth -= 1

    def _value(self) -> Any:
        t = self._read(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if t <= 0x8F:
            return self._map(t & 0x0F)
        if t <= 0x9F:
            return self._list(t & 0x0F)
        if t <= 0xBF:
            return self._str(t & 0x1F)
        fixed = {0xC0: None, 0xC2: False, 0xC3: True}
        if t in fixed:
            return fixed[t]
        if 0xC4 <= t <= 0xC6:  # bin 8/16/32
            return self._read(self._uint(1 << (t - 0xC4)))
        if 0xC7 <= t <= 0xC9:  # ext 8/16/32
            n = self._uint(1 << (t - 0xC7))
            return self._ext(self._read(1)[0], n)
        if t == 0xCA:
            return struct.unpack(">f", self._read(4))[0]
        if t == 0xCB:
            return struct.unpack(">d", self._read(8))[0]
        if 0xCC <= t <= 0xCF:
            return self._uint(1 << (t - 0xCC))
        if 0xD0 <= t <= 0xD3:
            return int.from_bytes(self._read(1 << (t - 0xD0)), "big", signed=True)
        if 0xD4 <= t <= 0xD8:  # fixext 1/2/4/8/16
            return self._ext(self._read(1)[0], 1 << (t - 0xD4))
        if 0xD9 <= t <= 0xDB:
            return self._str(self._uint(1 << (t - 0xD9)))
        if t in (0xDC, 0xDD):
            return self._list(self._uint(2 if t == 0xDC else 4))
        if t in (0xDE, 0xDF):
            return self._map(self._uint(2 if t == 0xDE else 4))
        raise _CorruptMsgpack(f"byte 0x{t:02x} is not a msgpack type")

    def _str(self, n: int) -> str:
        try:
            return self._read(n).decode()
        except UnicodeDecodeError:
            raise _CorruptMsgpack("a string is not UTF-8") from None

    def _list(self, n: int) -> list:
        if n > self._left():  # every item takes at least one byte
            raise _CorruptMsgpack(f"an array of {n} items in {self._left()} bytes")
        return [self.value() for _ in range(n)]

    def _map(self, n: int) -> Any:
        if 2 * n > self._left():  # every entry takes at least two bytes
            raise _CorruptMsgpack(f"a map of {n} entries in {self._left()} bytes")
        out = {}
        for _ in range(n):
            key = self.value()
            if not isinstance(key, str):  # flax writes string keys only (and restores with strict_map_key)
                raise _CorruptMsgpack(f"a map key is {brief(key)}, not a string")
            out[key] = self.value()
        return self._unchunk(out) if self._CHUNKED in out else out

    def _ext(self, code: int, n: int) -> Any:
        start = self._f.tell()
        if n > self._left():
            raise EOFError
        if code in (1, 3):  # flax's ndarray and numpy scalar: packb((shape, dtype name, data))
            if self._read(1) != b"\x93":
                raise _CorruptMsgpack("an array is not (shape, dtype, data)")
            dims, name = self.value(), self.value()
            dtype = _dtype_from_name(name)
            shape = checked_shape(dims, dtype)
            if shape is None:
                raise _CorruptMsgpack(f"an array's shape is {brief(dims)}, not a list of sizes")
            t = self._read(1)[0]
            if not 0xC4 <= t <= 0xC6:
                raise _CorruptMsgpack("an array's data is not binary")
            nbytes = self._uint(1 << (t - 0xC4))
            offset = self._f.tell()
            if offset + nbytes != start + n or nbytes != math.prod(shape) * dtype.itemsize:
                raise _CorruptMsgpack(f"an array of shape {list(shape)} {name} holds {nbytes} bytes")
            self._f.seek(offset + nbytes)
            return ArrayRef(shape, dtype, ((offset, nbytes),))
        data = self._read(n)
        if code == 2:  # flax's native complex: packb((real, imag))
            return self._complex(data)
        raise _CorruptMsgpack(f"unknown ext type {code}")

    def _complex(self, data: bytes) -> complex:
        inner = _MsgpackIndex(io.BytesIO(data), len(data), self._depth)
        try:
            parts = inner.value()
        except EOFError:
            parts = None
        if inner._left() or not (isinstance(parts, list) and len(parts) == 2
                                 and all(type(p) in (int, float) for p in parts)):
            raise _CorruptMsgpack("a complex number is not (real, imag)")
        return complex(*parts)

    @staticmethod
    def _unchunk(d: dict) -> ArrayRef:
        shape_map, chunk_map = d.get("shape"), d.get("chunks")
        try:
            dims = [shape_map[str(i)] for i in range(len(shape_map))]  # type: ignore[index, arg-type]
            chunks = [chunk_map[str(i)] for i in range(len(chunk_map))]  # type: ignore[index, arg-type]
        except (KeyError, TypeError):
            raise _CorruptMsgpack("a chunked array without its shape or chunks") from None
        if not chunks or not all(isinstance(c, ArrayRef) and c.dtype == chunks[0].dtype for c in chunks):
            raise _CorruptMsgpack("a chunked array with mixed chunks")
        dtype = chunks[0].dtype
        shape = checked_shape(dims, dtype)
        if shape is None:
            raise _CorruptMsgpack(f"a chunked array's shape is {brief(dims)}, not a list of sizes")
        ranges = tuple(r for c in chunks for r in c.chunks)
        if sum(n for _, n in ranges) != math.prod(shape) * dtype.itemsize:
            raise _CorruptMsgpack(f"a chunked array of shape {list(shape)} holds the wrong number of bytes")
        return ArrayRef(shape, dtype, ranges)


def _dtype_from_name(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in _FLAX_DTYPES:
        raise _CorruptMsgpack(f"an array's dtype is {brief(name)}, not one of {', '.join(_FLAX_DTYPES)}")
    return _FLAX_DTYPES[name]


def _flat_leaves(tree: dict) -> dict[str, Any]:
    """`/`-joined paths of the leaves (`convert.base.trees.flatten`: empty subtrees vanish, two paths that join to
    the same name, "a/b" and "a" > "b", are refused rather than one silently hiding the other). Leaves are arrays or
    numbers."""
    try:
        flat = flatten(tree)
    except PathClash as e:
        raise _CorruptMsgpack(f"two leaves are named {brief(e.path)}") from None
    for path, value in flat.items():
        if type(value) in (bool, int, float, complex):
            flat[path] = np.asarray(value)
        elif not isinstance(value, ArrayRef):
            raise _CorruptMsgpack(f"the leaf {brief(path)} is a {type(value).__name__}, not an array or number")
    return flat


