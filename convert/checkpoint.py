"""Reading Hugging Face checkpoint directories, one tensor at a time.

A directory holds `config.json` and weights in one of these forms (the first one present wins):
`model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json`, `flax_model.msgpack`, `flax_model.msgpack.index.json`.

safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
each tensor is read with one `readinto` when asked for, so a file is never loaded whole; Flax msgpack files
likewise (their structure is walked once, skipping the array data). `.bin` files go through
`torch.load(weights_only=True, mmap=True)`; a pickle that needs more than tensors is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.configs import read_json
from convert.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
FLAX_MSGPACK_INDEX = "flax_model.msgpack.index.json"
CONFIG = "config.json"

WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX, FLAX_MSGPACK, FLAX_MSGPACK_INDEX)
# The Flax model class reads its own format first, as HF's Flax classes did.
FLAX_FIRST = (FLAX_MSGPACK, FLAX_MSGPACK_INDEX, SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class _SafetensorsFile:
    """One parsed safetensors file: its header, checked against the file size; data read per tensor."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n} "
                                      f"does not fit in {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        data_size = size - self.data_start
        for key, spec in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                begin, end = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors file (bad header entry for {key!r})") from None
            info = TensorInfo(key, shape, dtype, path)
            if end - begin != info.nbytes or begin < 0:
                raise CheckpointError(f"{path}: corrupt safetensors file ({key!r}: {end - begin} bytes for shape "
                                      f"{list(shape)} {spec['dtype']})")
            if end > data_size:
                raise CheckpointError(f"{path}: truncated safetensors file ({key!r} ends at byte {end} of the "
                                      f"data, the file holds {data_size})")
            self.entries[key] = info
            self._offsets[key] = (begin, end)

    def read(self, key: str, dtype: np.dtype | None = None) -> np.ndarray:
        info, (begin, end) = self.entries[key], self._offsets[key]
        if dtype is not None and np.dtype(dtype) != info.dtype:
            return self._read_cast(key, np.dtype(dtype))
        out = new_array(info.shape, info.dtype)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated safetensors file (short read of {key!r})")
        return out

    def _read_cast(self, key: str, dtype: np.dtype) -> np.ndarray:
        """Reads a tensor in chunks through one small buffer, casting each chunk into the output: the
        full-size array in the stored dtype is never made (half the memory traffic of read-then-astype)."""
        info, (begin, _) = self.entries[key], self._offsets[key]
        out = new_array(info.shape, dtype).reshape(-1)
        step = max(1, _CAST_CHUNK_BYTES // info.dtype.itemsize)
        scratch = np.empty(min(step, out.size), info.dtype)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            for start in range(0, out.size, step):
                chunk = scratch[:min(step, out.size - start)]
                if f.readinto(memoryview(chunk.view(np.uint8))) != chunk.nbytes:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (short read of {key!r})")
                np.copyto(out[start:start + chunk.size], chunk, casting="unsafe")
        return out.reshape(info.shape)


class _TorchBinFile:
    """A `pytorch_model.bin` loaded with `weights_only=True` (memory-mapped where the zip format allows)."""

    def __init__(self, path: Path):
        import pickle

        import torch

        self.path = path
        self._mapped = True
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) pickles cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
                self._mapped = False
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused: the pickle needs more than tensors to load "
                                  f"(weights_only=True): {_unpickling_reason(e)}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({first})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self.state = state
        self.entries = {
            k: TensorInfo(k, tuple(v.shape), _torch_dtype_to_numpy(v.dtype, path, k), path) for k, v in state.items()
        }

    def read(self, key: str) -> np.ndarray:
        tensor = self.state[key]
        out = np.array(torch_to_numpy(tensor))  # a copy in our own memory, so that the mapped pages can go
        if self._mapped:
            _release_mapped_pages(tensor)
        return out


def _release_mapped_pages(tensor: Any) -> None:
    """Unmaps the file pages a memory-mapped tensor was read from (MADV_DONTNEED).

    The whole `.bin` stays mapped while the checkpoint is open, and every page read would otherwise stay in
    this process's resident set: a conversion would end up holding the source file. The mapping is private
    and never written, so a page dropped here is simply read from the file again if it is needed again.
    """
    import ctypes

    storage = tensor.untyped_storage()
    begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return
    try:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), getattr(mmap, "MADV_DONTNEED", 4))
    except (AttributeError, OSError):  # no madvise on this platform: the pages stay, nothing is wrong
        pass


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


class _FlaxMsgpackFile:
    """A `flax_model.msgpack` (flax.serialization's format), indexed without loading it.

    The msgpack structure is walked once, skipping over array data and recording where each array's bytes
    lie (flax stores an array as ext type 1 holding `(shape, dtype name, raw bytes)`, and splits arrays over
    1 GiB into `__msgpack_chunked_array__` maps); a tensor is then read with one `readinto` per chunk.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                tree = _MsgpackIndex(f, size).value()
                if f.tell() != size:
                    raise _CorruptMsgpack(f"{size - f.tell()} bytes after the tree")
        except (_CorruptMsgpack, EOFError, UnicodeDecodeError, ValueError, TypeError) as e:
            why = str(e) if isinstance(e, _CorruptMsgpack) else "ends early" if isinstance(e, EOFError) \
                else type(e).__name__
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file ({why})") from None
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path}: not a Flax parameter tree")
        if set(tree) == {"params"}:
            tree = tree["params"]
        self._leaves: dict[str, _ArrayRef | np.ndarray] = {}
        _flatten_tree(tree, "", self._leaves)
        self.entries = {k: TensorInfo(k, tuple(v.shape), np.dtype(v.dtype), path) for k, v in self._leaves.items()}

    def read(self, key: str) -> np.ndarray:
        leaf = self._leaves[key]
        if isinstance(leaf, np.ndarray):  # a scalar or other small leaf, kept from the walk
            return leaf.copy()
        out = new_array(leaf.shape, leaf.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with self.path.open("rb") as f:
            position = 0
            for offset, nbytes in leaf.chunks:
                f.seek(offset)
                if f.readinto(view[position:position + nbytes]) != nbytes:
                    raise CheckpointError(f"{self.path}: truncated msgpack file (short read of {key!r})")
                position += nbytes
        return out


@dataclasses.dataclass(frozen=True)
class _ArrayRef:
    """Where an array's bytes lie in a msgpack file: (offset, nbytes) per chunk, in order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[tuple[int, int], ...]


class _CorruptMsgpack(Exception):
    pass


class _MsgpackIndex:
    """Reads msgpack values from a file, except array data: ndarray ext values become `_ArrayRef`s."""

    _CHUNKED = "__msgpack_chunked_array__"

    def __init__(self, f: Any, size: int):
        self._f = f
        self._size = size

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "big")

    def value(self) -> Any:
        t = self._read(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if t <= 0x8F:
            return self._map(t & 0x0F)
        if t <= 0x9F:
            return [self.value() for _ in range(t & 0x0F)]
        if t <= 0xBF:
            return self._read(t & 0x1F).decode()
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
            return self._read(self._uint(1 << (t - 0xD9))).decode()
        if t in (0xDC, 0xDD):
            return [self.value() for _ in range(self._uint(2 if t == 0xDC else 4))]
        if t in (0xDE, 0xDF):
            return self._map(self._uint(2 if t == 0xDE else 4))
        raise _CorruptMsgpack(f"byte 0x{t:02x} is not a msgpack type")

    def _map(self, n: int) -> Any:
        out = {}
        for _ in range(n):
            key = self.value()
            out[key] = self.value()
        return self._unchunk(out) if self._CHUNKED in out else out

    def _ext(self, code: int, n: int) -> Any:
        start = self._f.tell()
        if start + n > self._size:
            raise EOFError
        if code in (1, 3):  # flax's ndarray and numpy scalar: packb((shape, dtype name, data))
            if self._read(1) != b"\x93":
                raise _CorruptMsgpack("an array is not (shape, dtype, data)")
            shape, name = tuple(self.value()), self.value()
            t = self._read(1)[0]
            if not 0xC4 <= t <= 0xC6:
                raise _CorruptMsgpack("an array's data is not binary")
            nbytes = self._uint(1 << (t - 0xC4))
            offset = self._f.tell()
            dtype = _dtype_from_name(name)
            if offset + nbytes != start + n or nbytes != math.prod(shape) * dtype.itemsize:
                raise _CorruptMsgpack(f"an array of shape {list(shape)} {name} holds {nbytes} bytes")
            self._f.seek(offset + nbytes)
            return _ArrayRef(shape, dtype, ((offset, nbytes),))
        data = self._read(n)
        if code == 2:  # flax's native complex: packb((real, imag))
            import msgpack

            return np.asarray(complex(*msgpack.unpackb(data)))
        raise _CorruptMsgpack(f"unknown ext type {code}")

    @staticmethod
    def _unchunk(d: dict) -> _ArrayRef:
        try:
            shape = tuple(d["shape"][str(i)] for i in range(len(d["shape"])))
            chunks = [d["chunks"][str(i)] for i in range(len(d["chunks"]))]
        except (KeyError, TypeError):
            raise _CorruptMsgpack("a chunked array without its shape or chunks") from None
        if not chunks or not all(isinstance(c, _ArrayRef) and c.dtype == chunks[0].dtype for c in chunks):
            raise _CorruptMsgpack("a chunked array with mixed chunks")
        dtype = chunks[0].dtype
        ranges = tuple(r for c in chunks for r in c.chunks)
        if sum(n for _, n in ranges) != math.prod(shape) * dtype.itemsize:
            raise _CorruptMsgpack(f"a chunked array of shape {list(shape)} holds the wrong number of bytes")
        return _ArrayRef(shape, dtype, ranges)


def _dtype_from_name(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise _CorruptMsgpack("an array's dtype is not a name")
    try:
        return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    except TypeError:
        raise _CorruptMsgpack(f"unknown dtype {name!r}") from None


def _flatten_tree(tree: dict, prefix: str, out: dict[str, Any]) -> None:
    """`/`-joined paths of the leaves, as flax.traverse_util.flatten_dict (empty subtrees vanish)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten_tree(value, path + "/", out)
        else:
            out[path] = value if isinstance(value, _ArrayRef) else np.asarray(value)


_OWN_MAPPING_BYTES = 1 << 20
_CAST_CHUNK_BYTES = 4 << 20


def new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array for a tensor read from disk; a large one in its own anonymous memory map.

    Tensors are read, used and freed one after another. Through malloc, freed tensor buffers of a few MB
    stay in the heap (glibc raises its mmap threshold as big blocks come and go) and mix with what stays
    (a JAX or PyTorch model being filled), so that a model load could peak at twice the model's size. A
    mapping of its own goes back to the system the moment the array is freed.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _OWN_MAPPING_BYTES:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, nbytes)
    if hasattr(memory, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults, as numpy's own allocator asks for
    return np.frombuffer(memory, dtype).reshape(shape)


def _unpickling_reason(error: Exception) -> str:
    """The informative sentence of torch's weights_only refusal.

    Its first line is advice to retry with weights_only=False (with ANSI codes); the reason follows it.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)", text, flags=re.MULTILINE)
    if m:
        return m.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unpickling error"


def torch_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as numpy without changing a bit (bfloat16 through a uint16 view)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray) -> Any:
    """A numpy array as a torch tensor without changing a bit."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_dtype_to_numpy(dtype: Any, path: Path, key: str) -> np.dtype:
    import torch

    table = {
        torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
        torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
        torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    }
    if dtype not in table:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
    return np.dtype(table[dtype])


class Checkpoint:
    """A Hugging Face checkpoint directory: its config and lazily read tensors.

    Attributes:
        directory: the directory.
        config: the parsed `config.json`.
        format: "safetensors", "pytorch" or "flax" (key names are PyTorch-style for the first two and
            `/`-joined Flax paths for the last).
        weight_files: the weight files, in shard order.
    """

    def __init__(self, directory: str | Path, prefer: tuple[str, ...] = WEIGHT_FILES):
        self.directory = Path(directory)
        if not self.directory.exists():
            raise CheckpointError(f"{self.directory}: no such directory")
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        config_path = self.directory / CONFIG
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: no config.json in the checkpoint directory")
        self.config: dict[str, Any] = read_json(config_path)
        name = next((n for n in prefer if (self.directory / n).is_file()), None)
        if name is None:
            raise CheckpointError(f"{self.directory}: no weight file (looked for {', '.join(prefer)})")
        self.format = "safetensors" if "safetensors" in name else "pytorch" if "bin" in name else "flax"
        opener = {"safetensors": _SafetensorsFile, "pytorch": _TorchBinFile, "flax": _FlaxMsgpackFile}[self.format]
        if name.endswith(".index.json"):
            self.weight_files = self._shards(self.directory / name)
        else:
            self.weight_files = [self.directory / name]
        self._files = {}
        self._where: dict[str, Any] = {}
        for path in self.weight_files:
            f = opener(path)
            self._files[path] = f
            for key in f.entries:
                if key in self._where:
                    raise CheckpointError(f"{path}: tensor {key!r} is also in {self._where[key].path}")
                self._where[key] = f

    def _shards(self, index_path: Path) -> list[Path]:
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not (self.directory / shard).is_file():
                raise CheckpointError(f"{index_path}: names shard {shard!r}, which is missing")
        self._index_map = weight_map
        return [self.directory / s for s in shards]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].entries[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.info(k).shape for k in self._where}

    def get(self, key: str, dtype: np.dtype | None = None) -> np.ndarray:
        """Reads one tensor: bit-exact in its stored dtype, or cast to `dtype` (numpy's rounding) on the way."""
        source = self._where[key]
        if isinstance(source, _SafetensorsFile):
            return source.read(key, dtype)
        array = source.read(key)
        return array if dtype is None or array.dtype == np.dtype(dtype) else array.astype(dtype)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)

    @property
    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._where)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Opens a local checkpoint directory (see the module docstring for the files it looks for)."""
    return Checkpoint(directory)


def file_size(path: str | Path) -> int:
    return os.stat(path).st_size
