"""Streaming writers for safetensors and Flax msgpack files (optionally sharded).

Both writers learn every tensor's name, dtype and shape up front (the conversion plan knows them) and then
take the tensors one at a time, in that order, so a model is never held in memory whole. The bytes they
write equal `safetensors.numpy.save_file` and `flax.serialization.to_bytes` output for the same tensors.
A tensor may arrive as a strided view (a transposed kernel): it is copied out through a small staging
buffer in cache-sized tiles, never as a second full-size array.
"""

from __future__ import annotations

import json
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from convert.base.checkpoint import DTYPE_TO_SAFETENSORS
from convert.base.errors import ConvertError, UsageError

_MSGPACK_NDARRAY = 1  # flax.serialization's ext type code for arrays
_MSGPACK_MAX_LEAF = 2**30  # flax chunks leaves bigger than this
# safetensors lays tensors out by dtype (this order, widest first), then by name; we follow it so that our
# files are byte-identical to safetensors' own.
_SAFETENSORS_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3",
                            "F8_E5M2", "I8", "U8", "BOOL")
_STAGING_BYTES = 16 * 2**20  # the buffer strided (transposed) tensors are copied through on their way out
_TILE = 16  # elements of the last axis per tile: one 64-byte line of float32 per row of the source
_IN_FLIGHT_BYTES = 256 * 2**20  # tensors read ahead of the writer threads, at most (or one larger tensor)


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
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"max_shard_size={text!r}: not a size (use e.g. 2GB, 500MB, 1GiB, or a number of bytes)",
                         param="max_shard_size")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"max_shard_size={text}: is negative", param="max_shard_size")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"max_shard_size={text}: cannot read it as a size (use e.g. 2GB, 500MB, 1GiB)",
                         param="max_shard_size")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    size = int(number * base ** "_KMGT".index(unit or "_"))
    if size == 0 and number != 0:
        raise UsageError(f"max_shard_size={text}: is less than one byte (0 means no sharding)",
                         param="max_shard_size")
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
    """Writes one safetensors file: the header first (from the specs), then each tensor's bytes.

    The tensors may arrive in any order (that of `specs`); each lands at its offset in safetensors' own
    layout (by dtype, then name), so the file equals `safetensors.numpy.save_file` of the same tensors.
    """

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        self._offsets: dict[str, int] = {}
        offset = 0
        for spec in sorted(self._specs, key=_safetensors_order):
            header[spec.name] = {
                "dtype": _safetensors_dtype(spec, self.path),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self._offsets[spec.name] = offset
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes
        self._data_start = 8 + len(raw)
        self._file: BinaryIO = self.path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._staging = _Staging()
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._specs[self._next]
        _check(spec, name, array, self.path)
        position = self._data_start + self._offsets[name]
        if self._file.tell() != position:
            self._file.seek(position)
        _write_array(self._file, array, self._staging)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            raise ConvertError(f"{self.path}: {len(self._specs) - self._next} tensor(s) were never written")


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    """Writes a small set of in-memory tensors (name -> array) as one safetensors file (PyTorch's `{"format":
    "pt"}` metadata by default)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in sorted(arrays.items())]
    writer = SafetensorsWriter(path, specs, metadata={"format": "pt"} if metadata is None else metadata)
    for spec in specs:
        writer.write(spec.name, arrays[spec.name])
    writer.close()
    return Path(path)


def _safetensors_dtype(spec: TensorSpec, path: Path) -> str:
    dtype = np.dtype(spec.dtype)
    if dtype not in DTYPE_TO_SAFETENSORS:
        raise ConvertError(f"{path}: cannot store dtype {dtype} for {spec.name}")
    return DTYPE_TO_SAFETENSORS[dtype]


def _safetensors_order(spec: TensorSpec) -> tuple[int, str]:
    return _SAFETENSORS_DTYPE_ORDER.index(DTYPE_TO_SAFETENSORS.get(np.dtype(spec.dtype), "U8")), spec.name


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
        self._staging = _Staging()
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
        _write_array(self._file, array, self._staging)

    def _write_chunked(self, array: np.ndarray) -> None:
        # flax's layout for leaves over 1 GiB: {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}
        step = max(1, _MSGPACK_MAX_LEAF // array.dtype.itemsize)
        flat = np.ascontiguousarray(array).reshape(-1)  # a view unless the array is strided
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
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 2**16 else b"\xdf" + struct.pack(">I", n)


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


class _Staging:
    """A writer's reusable buffer for copying strided arrays out (allocated once, on first use)."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer[:nbytes]


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _write_array(f: BinaryIO, array: np.ndarray, staging: _Staging) -> None:
    """Writes `array`'s elements in C order. A C-contiguous array goes out directly from its memory; a strided
    one (a transposed view) through `staging`, a slab of rows at a time."""
    if array.size == 0:
        return
    if array.flags.c_contiguous:
        f.write(memoryview(array.reshape(-1).view(np.uint8)))
        return
    # Bit-exact copies through unsigned integers of the same width: numpy's native loops, also for bfloat16.
    bits = array.view(_UINT[array.dtype.itemsize]) if array.dtype.itemsize in _UINT else array
    row = bits[0].nbytes
    rows = max(1, _STAGING_BYTES // row)
    buffer = staging.get(min(rows, len(bits)) * row)
    for start in range(0, len(bits), rows):
        slab = bits[start:start + rows]
        out = buffer[:slab.nbytes].view(bits.dtype).reshape(slab.shape)
        _copy_tiled(out, slab)
        f.write(memoryview(buffer[:slab.nbytes]))


def _copy_tiled(out: np.ndarray, src: np.ndarray) -> None:
    """out[...] = src, in tiles along the last axis. For a transposed view, a tile of the last axis is a
    few contiguous rows of the source, so reads and writes both stay in cache: ~5x faster than one copy."""
    if src.ndim < 2:
        np.copyto(out, src)
        return
    for j in range(0, src.shape[-1], _TILE):
        np.copyto(out[..., j:j + _TILE], src[..., j:j + _TILE])


# ----------------------------------------------------------------------------------------------------------
# Sharded outputs in Hugging Face's layout


class ShardedWriter:
    """Writes `base.ext`, or `base-0000k-of-0000n.ext` shards plus HF's `<file>.index.json` when sharded.

    `kind` is "safetensors" (`model.safetensors`, the index as transformers' `save_pretrained` writes it:
    `metadata.total_parameters`, `metadata.total_size`, `weight_map` by PyTorch key) or "msgpack"
    (`flax_model.msgpack`, as transformers' `FlaxPreTrainedModel.save_pretrained`: `metadata.total_size`,
    `weight_map` by `/`-joined Flax path). Shards are split greedily in write order, so only one shard file
    is open at a time.
    """

    def __init__(self, directory: str | Path, kind: str, specs: Sequence[TensorSpec],
                 max_shard_size: int | None = None, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        base, ext = ("model", "safetensors") if kind == "safetensors" else ("flax_model", "msgpack")
        shards = split_shards(specs, max_shard_size)
        self._make = (lambda p, s: SafetensorsWriter(p, s, metadata)) if kind == "safetensors" else MsgpackWriter
        names = [f"{base}.{ext}" if len(shards) == 1 else f"{base}-{k + 1:05d}-of-{len(shards):05d}.{ext}"
                 for k in range(len(shards))]
        self._shards = [(self.directory / name, shard) for name, shard in zip(names, shards)]
        self._shard_of = {spec.name: k for k, shard in enumerate(shards) for spec in shard}
        self._left = [len(shard) for shard in shards]
        self._open: dict[int, SafetensorsWriter | MsgpackWriter] = {}
        self.files: list[Path] = [path for path, _ in self._shards]
        if len(shards) > 1:
            totals: dict[str, int] = {}
            if kind == "safetensors":
                totals["total_parameters"] = sum(int(np.prod(s.shape, dtype=np.int64)) for s in specs)
            totals["total_size"] = sum(s.nbytes for s in specs)
            weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
            index_path = self.directory / f"{base}.{ext}.index.json"
            index = {"metadata": totals, "weight_map": weight_map}
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.files.append(index_path)

    def write(self, name: str, array: np.ndarray) -> None:
        k = self._shard_of[name]
        if k not in self._open:
            self._open[k] = self._make(*self._shards[k])
        self._open[k].write(name, array)
        self._left[k] -= 1
        if not self._left[k]:
            self._open.pop(k).close()

    def close(self) -> None:
        for k, (path, shard) in enumerate(self._shards):
            if k in self._open:
                self._open.pop(k).close()  # raises, counting the tensors never written
            elif not shard:
                self._make(path, shard).close()  # a model without tensors still gets its (empty) file
            elif self._left[k] == len(shard):
                raise ConvertError(f"{path}: {len(shard)} tensor(s) were never written")


# ----------------------------------------------------------------------------------------------------------
# Writing several files at once


class WriteLanes:
    """Runs each writer in a thread of its own ("lane"), fed in order, with a bounded amount of data queued.

    While the lanes write tensor k (numpy copies and file writes release the GIL), the caller already reads
    and casts tensor k+1: reading, the Flax file and the PyTorch file overlap instead of adding up. At most
    `budget` bytes of tensors wait in the queues (or a single larger tensor). The first error of any lane
    is raised in the caller, at its next `submit` or at `close`.

    Use as a context manager: leaving it waits for every queued job; leaving it with an exception drops the
    jobs still queued.
    """

    def __init__(self, lanes: int, budget: int = _IN_FLIGHT_BYTES):
        self._budget = budget
        self._in_flight = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._cancelled = False
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(lanes)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"write-lane-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def submit(self, nbytes: int, jobs: Sequence[Callable[[], None]]) -> None:
        """Queues `jobs[i]` on lane i (one job per lane); blocks while the budget is spent."""
        with self._done:
            while self._in_flight and self._in_flight + nbytes > self._budget and self._error is None:
                self._done.wait()
            if self._error is not None:
                raise self._error
            self._in_flight += nbytes
        pending = [len(jobs)]  # lanes yet to finish this tensor; its bytes are released by the last one
        for q, job in zip(self._queues, jobs, strict=True):
            q.put((job, nbytes, pending))

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while (item := jobs.get()) is not None:
            job, nbytes, pending = item
            try:
                if self._error is None and not self._cancelled:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                with self._done:
                    self._error = self._error or e
            finally:
                item = job = None  # drop the tensor before waiting for the next one
                with self._done:
                    pending[0] -= 1
                    if not pending[0]:
                        self._in_flight -= nbytes
                    self._done.notify_all()

    def __enter__(self) -> WriteLanes:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cancelled = exc_type is not None
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None and exc_type is None:
            raise self._error
