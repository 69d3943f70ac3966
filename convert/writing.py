"""Streaming writers for safetensors and Flax msgpack files (optionally sharded), and atomic output dirs.

Both writers learn every tensor's name, dtype and shape up front (the conversion plan knows them) and then
take the tensors one at a time, in that order, so a model is never held in memory whole. The bytes they
write equal `safetensors.numpy.save_file` and `flax.serialization.to_bytes` output for the same tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from convert.checkpoint import DTYPE_TO_SAFETENSORS
from convert.errors import ConvertError

_MSGPACK_NDARRAY = 1  # flax.serialization's ext type code for arrays
_MSGPACK_MAX_LEAF = 2**30  # flax chunks leaves bigger than this


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name (a PyTorch key or a `/`-joined Flax path), dtype and shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def parse_size(text: str | int | None) -> int | None:
    """'2GB' -> 2 * 10**9, '500MiB' -> 500 * 2**20, '0'/None -> None (no sharding)."""
    if text is None or text == 0:
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size: cannot read {text!r} (use e.g. 2GB, 500MB, 1GiB)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    size = int(number * base ** "_KMGT".index(unit or "_"))
    return size or None


def split_shards(specs: Sequence[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """Greedy split in order: a new shard starts when the next tensor would overflow the current one."""
    if not max_shard_size:
        return [list(specs)]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


# ----------------------------------------------------------------------------------------------------------
# safetensors


class SafetensorsWriter:
    """Writes one safetensors file: the header first (from the specs), then each tensor's bytes in order."""

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for spec in self._specs:
            dtype = np.dtype(spec.dtype)
            if dtype not in DTYPE_TO_SAFETENSORS:
                raise ConvertError(f"{self.path}: cannot store dtype {dtype} for {spec.name}")
            header[spec.name] = {
                "dtype": DTYPE_TO_SAFETENSORS[dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes
        self._file: BinaryIO = self.path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._specs[self._next]
        _check(spec, name, array, self.path)
        _write_array(self._file, array)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            raise ConvertError(f"{self.path}: {len(self._specs) - self._next} tensor(s) were never written")


# ----------------------------------------------------------------------------------------------------------
# Flax msgpack


class MsgpackWriter:
    """Writes a nested Flax param dict in flax.serialization's msgpack format, one leaf at a time.

    The leaves arrive in the order of `specs`; their `/`-joined paths define the nesting. Maps are written
    in first-seen order, so the specs must list each subtree contiguously (sorted paths do).
    """

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec]):
        self.path = Path(path)
        self._specs = list(specs)
        self._tree = _nest([s.name for s in self._specs])
        self._file: BinaryIO = self.path.open("wb")
        self._events = self._walk(self._tree, "")
        self._next = 0
        self._advance()

    def _walk(self, tree: dict, prefix: str) -> Iterator[str]:
        self._file.write(_map_header(len(tree)))
        for key, sub in tree.items():
            self._file.write(_str(key))
            path = prefix + key
            if sub is None:
                yield path
            else:
                yield from self._walk(sub, path + "/")

    def _advance(self) -> None:
        self._expect = next(self._events, None)

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._specs[self._next]
        _check(spec, name, array, self.path)
        if name != self._expect:
            raise ConvertError(f"{self.path}: the leaves of one subtree must be written together ({name})")
        array = np.asarray(array)
        if array.nbytes > _MSGPACK_MAX_LEAF:
            self._write_chunked(array)
        else:
            self._write_leaf(array)
        self._next += 1
        self._advance()

    def _write_leaf(self, array: np.ndarray) -> None:
        # flax: ExtType(1, packb((shape, dtype.name, bytes))) -- written here without copying the bytes.
        head = b"\x93" + _pack_int_list(array.shape) + _str(array.dtype.name) + _bin_header(array.nbytes)
        self._file.write(_ext_header(len(head) + array.nbytes, _MSGPACK_NDARRAY) + head)
        _write_array(self._file, array)

    def _write_chunked(self, array: np.ndarray) -> None:
        # flax's layout for leaves over 1 GiB: {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}
        step = max(1, _MSGPACK_MAX_LEAF // array.dtype.itemsize)
        flat = array.reshape(-1)
        starts = range(0, flat.size, step)
        self._file.write(_map_header(3) + _str("__msgpack_chunked_array__") + b"\xc3")
        self._file.write(_str("shape") + _map_header(len(array.shape)))
        for i, d in enumerate(array.shape):
            self._file.write(_str(str(i)) + _int(d))
        self._file.write(_str("chunks") + _map_header(len(starts)))
        for i, start in enumerate(starts):
            self._file.write(_str(str(i)))
            self._write_leaf(flat[start:start + step])

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            raise ConvertError(f"{self.path}: {len(self._specs) - self._next} tensor(s) were never written")


def _nest(paths: Sequence[str]) -> dict:
    tree: dict = {}
    for path in paths:
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if node is None:
                raise ConvertError(f"{path}: a leaf is also a subtree")
        node[leaf] = None
    return tree


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 2**16 else b"\xdf" + struct.pack(">I", n)


def _str(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    if n < 32:
        return bytes([0xA0 | n]) + b
    if n < 2**8:
        return b"\xd9" + bytes([n]) + b
    if n < 2**16:
        return b"\xda" + struct.pack(">H", n) + b
    return b"\xdb" + struct.pack(">I", n) + b


def _int(v: int) -> bytes:
    if 0 <= v < 128:
        return bytes([v])
    if 0 <= v < 2**8:
        return b"\xcc" + bytes([v])
    if 0 <= v < 2**16:
        return b"\xcd" + struct.pack(">H", v)
    if 0 <= v < 2**32:
        return b"\xce" + struct.pack(">I", v)
    return b"\xcf" + struct.pack(">Q", v)


def _pack_int_list(values: Sequence[int]) -> bytes:
    n = len(values)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    return head + b"".join(_int(int(v)) for v in values)


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + bytes([n])
    if n < 2**16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def _ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n < 2**8:
        return b"\xc7" + bytes([n, code])
    if n < 2**16:
        return b"\xc8" + struct.pack(">H", n) + bytes([code])
    return b"\xc9" + struct.pack(">I", n) + bytes([code])


def _check(spec: TensorSpec, name: str, array: np.ndarray, path: Path) -> None:
    if name != spec.name:
        raise ConvertError(f"{path}: expected tensor {spec.name}, got {name}")
    if np.dtype(array.dtype) != np.dtype(spec.dtype) or tuple(array.shape) != tuple(spec.shape):
        raise ConvertError(f"{path}: {name} is {array.dtype}{list(array.shape)}, "
                           f"expected {np.dtype(spec.dtype)}{list(spec.shape)}")


def _write_array(f: BinaryIO, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if array.size:
        f.write(memoryview(array.reshape(-1).view(np.uint8)))


# ----------------------------------------------------------------------------------------------------------
# Sharded outputs in Hugging Face's layout


class ShardedWriter:
    """Writes `base.ext`, or `base-0000k-of-0000n.ext` shards plus HF's `<file>.index.json` when sharded.

    `kind` is "safetensors" (`model.safetensors`) or "msgpack" (`flax_model.msgpack`).
    """

    def __init__(self, directory: str | Path, kind: str, specs: Sequence[TensorSpec],
                 max_shard_size: int | None = None, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        base, ext = ("model", "safetensors") if kind == "safetensors" else ("flax_model", "msgpack")
        shards = split_shards(specs, max_shard_size)
        make = (lambda p, s: SafetensorsWriter(p, s, metadata)) if kind == "safetensors" else MsgpackWriter
        self.files: list[Path] = []
        self._writers: dict[str, SafetensorsWriter | MsgpackWriter] = {}
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            name = f"{base}.{ext}" if len(shards) == 1 else f"{base}-{k + 1:05d}-of-{len(shards):05d}.{ext}"
            writer = make(self.directory / name, shard)
            self.files.append(self.directory / name)
            for spec in shard:
                self._writers[spec.name] = writer
                weight_map[spec.name] = name
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            index_path = self.directory / f"{base}.{ext}.index.json"
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.files.append(index_path)

    def write(self, name: str, array: np.ndarray) -> None:
        self._writers[name].write(name, array)

    def close(self) -> None:
        for writer in dict.fromkeys(self._writers.values()):
            writer.close()


# ----------------------------------------------------------------------------------------------------------
# Atomic output directories


class _Interrupted(BaseException):
    """Raised from SIGTERM/SIGHUP so that a killed run cleans up like Ctrl-C does."""


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `target`; on success it replaces `target` in one rename.

    A failure or an interrupt (Ctrl-C, SIGTERM) removes the temporary directory, leaving `target` as it
    was. An existing non-empty `target` is refused unless `overwrite`.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ConvertError(f"--output {target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConvertError(f"--output {target}: directory exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def on_signal(signum, frame):  # noqa: ARG001
        raise _Interrupted(signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for s in previous:
            signal.signal(s, on_signal)
    except ValueError:  # not the main thread: leave handlers alone
        previous = {}
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except _Interrupted as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
