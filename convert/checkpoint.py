"""Reading Hugging Face checkpoint directories, one tensor at a time.

A directory holds `config.json` and weights in one of these forms (the first one present wins):
`model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json`, `flax_model.msgpack`, `flax_model.msgpack.index.json`.

safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
each tensor is read with one `readinto` when asked for, so a file is never loaded whole; Flax msgpack files
likewise (their structure is walked once, skipping the array data). `.bin` files go through
`torch.load(weights_only=True, mmap=True)`; a pickle that needs more than tensors is refused.

`Checkpoint.get_slice(key, index)` reads one box of a tensor (a slice per dimension) and nothing else: the
rows of the box are contiguous byte ranges of the file (one read when the box is itself one range, one read
per row otherwise), so that a process of a sharded load reads only the shards its devices hold.
`Checkpoint.bytes_read` counts the tensor bytes read so far.

Every reader treats its file as untrusted: whatever is corrupt or absurd in it (a length field beyond the end
of the file, a shape that does not match its bytes, nesting without end, a shard name that leaves the
directory) ends in a one-line `CheckpointError` naming the file, and no length read from a file is allocated
or read before it has been checked against the file's size (`parity_tests/test_fuzz_readers.py` fuzzes this).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TypeAlias

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
_MAX_NDIM = 64  # numpy's own limit
# A Flax parameter tree is about a dozen msgpack levels deep: 64 is far beyond any real file, and far within
# Python's recursion limit, which the walker would otherwise meet on a corrupt one.
_MAX_DEPTH = 64
_NUMPY_MAX_BYTES = np.iinfo(np.intp).max

_brief_repr = reprlib.Repr()
_brief_repr.maxstring, _brief_repr.maxother, _brief_repr.maxlevel = 120, 60, 3


def _brief(value: Any) -> str:
    """A repr short enough for a one-line error, whatever a corrupt file put there (bounded depth and length)."""
    return _brief_repr.repr(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _checked_shape(dims: Any, dtype: np.dtype) -> tuple[int, ...] | None:
    """`dims` as a shape numpy can allocate, or None when it is not a list of at most 64 non-negative ints.

    Bools and floats are refused rather than converted (`int(2.5)`, `int(inf)`); zeros count as ones in the
    extent checked against numpy's size limit, as numpy counts them.
    """
    if not isinstance(dims, (list, tuple)) or len(dims) > _MAX_NDIM:
        return None
    if not all(type(d) is int and d >= 0 for d in dims):
        return None
    if math.prod(max(d, 1) for d in dims) * dtype.itemsize > _NUMPY_MAX_BYTES:
        return None
    return tuple(dims)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # exact: np.prod in int64 wraps around


Index: TypeAlias = tuple[slice, ...]


def _box(shape: tuple[int, ...], index: Index, what: str) -> tuple[tuple[int, int], ...]:
    """(start, stop) per dimension of a box given as slices (missing trailing ones select everything)."""
    if not isinstance(index, tuple) or len(index) > len(shape):
        raise ValueError(f"{what}: index {index!r} is not a tuple of at most {len(shape)} slices")
    box = []
    for dim, s in zip(shape, index + (slice(None),) * (len(shape) - len(index))):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"{what}: index {index!r} is not a tuple of slices with step 1")
        start, stop, _ = s.indices(dim)
        box.append((start, max(start, stop)))
    return tuple(box)


def _box_runs(shape: tuple[int, ...], box: tuple[tuple[int, int], ...]) -> tuple[int, Iterator[int]]:
    """The box as contiguous runs of the C-ordered tensor: (elements per run, first element of each run).

    The dimensions after the last partly selected one are read whole, so each run spans them; the box is one
    run when every dimension before that one selects a single index.
    """
    ndim = len(shape)
    partial = max((d for d in range(ndim) if box[d] != (0, shape[d])), default=-1)
    if partial < 0:
        return math.prod(shape), iter((0,))
    inner = math.prod(shape[partial + 1:])
    run = (box[partial][1] - box[partial][0]) * inner
    strides = [math.prod(shape[d + 1:]) for d in range(partial)]
    first = box[partial][0] * inner
    outer = [range(a, b) for a, b in box[:partial]]
    return run, (first + sum(i * s for i, s in zip(rows, strides)) for rows in itertools.product(*outer))


def _pread(fd: int, ranges: tuple[tuple[int, int], ...], start: int, out: memoryview) -> int:
    """Fills `out` from byte `start` of a tensor whose bytes lie in `ranges` ((file offset, nbytes), in order);
    returns the bytes read (short only when the file is)."""
    done = 0
    for offset, nbytes in ranges:
        if start >= nbytes:
            start -= nbytes
            continue
        want = min(nbytes - start, len(out) - done)
        while want:
            got = os.preadv(fd, [out[done:done + want]], offset + start)
            if got <= 0:
                return done
            done, start, want = done + got, start + got, want - got
        if done == len(out):
            break
        start = 0
    return done


def _read_box(path: Path, ranges: tuple[tuple[int, int], ...], info: TensorInfo,
              box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The box of a tensor stored C-ordered in `ranges` of the file `path`, read run by run."""
    out = new_array(tuple(b - a for a, b in box), info.dtype)
    if out.size == 0:
        return out
    run, firsts = _box_runs(info.shape, box)
    size = info.dtype.itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        for k, first in enumerate(firsts):
            chunk = view[k * run * size:(k + 1) * run * size]
            if _pread(fd, ranges, first * size, chunk) != len(chunk):
                raise CheckpointError(f"{path}: truncated file (short read of {info.key!r})")
    finally:
        os.close(fd)
    return out


class _SafetensorsFile:
    """One parsed safetensors file: its header, checked against the file size; data read per tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.bytes_read = 0
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n} "
                                      f"does not fit in {size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            # ValueError: JSONDecodeError, and integers past Python's 4300-digit conversion limit.
            raise self._corrupt("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._corrupt(f"__metadata__ is {_brief(metadata)}, not a map of strings")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self.entries: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        data_size = size - self.data_start
        for key, spec in header.items():
            if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
                raise self._corrupt(f"bad header entry for {_brief(key)}")
            code, dims, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
                raise self._corrupt(f"{_brief(key)} has dtype {_brief(code)}, not one of "
                                    f"{', '.join(SAFETENSORS_DTYPES)}")
            dtype = SAFETENSORS_DTYPES[code]
            shape = _checked_shape(dims, dtype)
            if shape is None:
                raise self._corrupt(f"{_brief(key)} has shape {_brief(dims)}, not a list of sizes")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
                raise self._corrupt(f"{_brief(key)} has data_offsets {_brief(offsets)}, not [begin, end]")
            begin, end = offsets
            info = TensorInfo(key, shape, dtype, path)
            if end - begin != info.nbytes or begin < 0:
                raise self._corrupt(f"{_brief(key)}: {end - begin} bytes for shape {list(shape)} {code}")
            if end > data_size:
                raise CheckpointError(f"{path}: truncated safetensors file ({_brief(key)} ends at byte {end} of the "
                                      f"data, the file holds {data_size})")
            self.entries[key] = info
            self._offsets[key] = (begin, end)

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt safetensors file ({why})")

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
        self.bytes_read += got
        return out

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        begin, end = self._offsets[key]
        out = _read_box(self.path, ((self.data_start + begin, end - begin),), self.entries[key], box)
        self.bytes_read += out.nbytes
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
        self.bytes_read += info.nbytes
        return out.reshape(info.shape)


class _TorchBinFile:
    """A `pytorch_model.bin` loaded with `weights_only=True` (memory-mapped where the zip format allows)."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        self.bytes_read = 0
        size = path.stat().st_size
        with path.open("rb") as f:
            self._mapped = f.read(4) == b"PK\x03\x04"  # torch's own test for its zip format
        try:
            if self._mapped:
                _check_zip_storages(path, size)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                # Legacy (pre-1.6, non-zip) files cannot be memory-mapped. They are unpickled from memory: reading
                # a length field from a file object would allocate the whole claimed length before the read.
                data = path.read_bytes()
                _check_legacy_storages(path, data)
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused by torch's weights-only unpickler (weights_only=True): "
                                  f"{_unpickling_reason(e)}") from None
        except Exception as e:
            # torch's zip reader and unpickler raise whatever a corrupt file leads them into (RuntimeError,
            # IndexError, KeyError, AssertionError, struct.error, ...): each of them means a bad file here.
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({_first_line(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a state dict of tensors (a {type(state).__name__})")
        self.entries = {}
        for key, tensor in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: not a state dict of tensors (the key {_brief(key)} is not a string)")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: not a state dict of tensors ({_brief(key)} is a "
                                      f"{type(tensor).__name__})")
            if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type != "cpu":
                raise CheckpointError(f"{path}: tensor {_brief(key)} is not a dense tensor ({tensor.layout}, "
                                      f"{tensor.device.type})")
            info = TensorInfo(key, tuple(tensor.shape), _torch_dtype_to_numpy(tensor.dtype, path, key), path)
            # A view may repeat its storage (stride 0): a copy of it must still fit in what the file holds.
            if info.nbytes > size:
                raise CheckpointError(f"{path}: tensor {_brief(key)} of shape {list(info.shape)} claims "
                                      f"{info.nbytes} bytes, more than the file's {size}")
            self.entries[key] = info
        self.state = state

    def read(self, key: str) -> np.ndarray:
        return self.read_box(key, tuple((0, n) for n in self.entries[key].shape))

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """A copy of the box; of a memory-mapped file only the pages under the box are read (page granularity:
        `bytes_read` counts the box's bytes)."""
        import torch

        whole, info = self.state[key].detach(), self.entries[key]
        tensor = whole[tuple(slice(a, b) for a, b in box)]
        out = new_array(tuple(tensor.shape), info.dtype)  # a copy in our own memory, so that the mapped pages can go
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own: copy the bits
            np.copyto(out.view(np.int16), tensor.view(torch.int16).numpy())
        else:
            np.copyto(out, tensor.numpy())
        if self._mapped:
            _release_mapped_pages(whole)
        self.bytes_read += out.nbytes
        return out


def _storage_claims(path: Path, stream: io.BytesIO, size: int) -> dict[Any, int]:
    """The bytes each storage claims, by storage key, from a torch.save pickle, allocating none of them.

    torch allocates (legacy format) or maps (zip format) each storage at the size its pickle claims, and only
    then meets the data, so the claims are read first: through torch's weights-only unpickler, with storages
    on the meta device, stopping once they add up to more than the file's `size`.
    """
    import torch
    from torch import _weights_only_unpickler

    claimed: dict[Any, int] = {}

    def persistent_load(saved_id: Any) -> Any:
        # ("storage", storage type, key, location, numel), plus view metadata in the legacy format.
        typename, storage_type, key, _, numel, *_ = saved_id
        if typename not in ("storage", b"storage") or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (a storage reference is "
                                  f"{_brief(saved_id)})")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        claimed[key] = max(claimed.get(key, 0), numel * torch._utils._element_size(dtype))
        if sum(claimed.values()) > size:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (its storages claim "
                                  f"{sum(claimed.values())} bytes, the file holds {size})")
        storage = torch.UntypedStorage(claimed[key], device="meta")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(stream, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    unpickler.load()
    return claimed


def _check_zip_storages(path: Path, size: int) -> None:
    """Refuses a zip whose entries claim more than the file holds (torch allocates a record's claimed size to
    read it: data.pkl is read whole), or whose pickle claims a storage larger than its record: a memory-mapped
    load takes the claimed length from the mapping without a check, reading the bytes that follow."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            for entry in entries:
                claimed = max(entry.file_size, entry.compress_size)
                if claimed > size or entry.header_offset > size:
                    raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (zip entry "
                                          f"{_brief(entry.filename)} claims {claimed} bytes in a {size}-byte file)")
            # torch names the records of one archive "<archive>/data.pkl", "<archive>/data/<key>", ...
            prefix = entries[0].filename.split("/", 1)[0] + "/" if entries else ""
            pickled = archive.read(prefix + "data.pkl")
    except CheckpointError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, but also KeyError, OSError, ValueError, EOFError
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (not a readable torch.save zip "
                              f"archive: {_first_line(e)})") from None
    records = {entry.filename: entry.file_size for entry in entries}
    for key, nbytes in _storage_claims(path, io.BytesIO(pickled), size).items():
        held = records.get(f"{prefix}data/{key}")
        if held is None or nbytes > held:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (storage {_brief(key)} claims "
                                  f"{nbytes} bytes, its record holds {held or 0})")


def _check_legacy_storages(path: Path, data: bytes) -> None:
    """Refuses a legacy-format file whose storages claim more bytes than it holds, or that stores no data for
    a storage its pickle uses (torch would hand out that storage uninitialised)."""
    import torch
    from torch import _weights_only_unpickler

    stream = io.BytesIO(data)
    try:
        magic = _weights_only_unpickler.load(stream, encoding="utf-8")
    except Exception:
        magic = None
    if magic != torch.serialization.MAGIC_NUMBER:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor its legacy "
                              f"format)")
    for _ in range(2):  # the protocol version and system info that precede the state dict
        _weights_only_unpickler.load(stream, encoding="utf-8")
    claimed = _storage_claims(path, stream, len(data))
    stored = _weights_only_unpickler.load(stream, encoding="utf-8")  # the keys of the storages whose data follows
    stored_keys = {key for key in stored if isinstance(key, str)} if isinstance(stored, list) else set()
    missing = [key for key in claimed if key not in stored_keys]
    if missing:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (no data for storage "
                              f"{_brief(missing[0])})")


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
        self.bytes_read = 0
        size = path.stat().st_size
        self._leaves: dict[str, _ArrayRef | np.ndarray] = {}
        try:
            with path.open("rb") as f:
                tree = _MsgpackIndex(f, size).value()
                if f.tell() != size:
                    raise _CorruptMsgpack(f"{size - f.tell()} bytes after the tree")
            if isinstance(tree, dict) and set(tree) == {"params"} and isinstance(tree["params"], dict):
                tree = tree["params"]
            if not isinstance(tree, dict):
                raise _CorruptMsgpack(f"a {type(tree).__name__}, not a Flax parameter tree")
            _flatten_tree(tree, "", self._leaves)
        except _CorruptMsgpack as e:
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file ({e})") from None
        except EOFError:
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file (ends early)") from None
        self.entries = {k: TensorInfo(k, tuple(v.shape), np.dtype(v.dtype), path) for k, v in self._leaves.items()}

    def read(self, key: str) -> np.ndarray:
        leaf = self._leaves[key]
        if isinstance(leaf, np.ndarray):  # a scalar kept from the walk
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
        self.bytes_read += position
        return out

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        leaf = self._leaves[key]
        if isinstance(leaf, np.ndarray):  # a scalar kept from the walk
            return leaf[tuple(slice(a, b) for a, b in box)].copy()
        out = _read_box(self.path, leaf.chunks, self.entries[key], box)
        self.bytes_read += out.nbytes
        return out


@dataclasses.dataclass(frozen=True)
class _ArrayRef:
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
    """Reads msgpack values from a file, except array data: ndarray ext values become `_ArrayRef`s.

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
                raise _CorruptMsgpack(f"a map key is {_brief(key)}, not a string")
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
            shape = _checked_shape(dims, dtype)
            if shape is None:
                raise _CorruptMsgpack(f"an array's shape is {_brief(dims)}, not a list of sizes")
            t = self._read(1)[0]
            if not 0xC4 <= t <= 0xC6:
                raise _CorruptMsgpack("an array's data is not binary")
            nbytes = self._uint(1 << (t - 0xC4))
            offset = self._f.tell()
            if offset + nbytes != start + n or nbytes != math.prod(shape) * dtype.itemsize:
                raise _CorruptMsgpack(f"an array of shape {list(shape)} {name} holds {nbytes} bytes")
            self._f.seek(offset + nbytes)
            return _ArrayRef(shape, dtype, ((offset, nbytes),))
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
    def _unchunk(d: dict) -> _ArrayRef:
        shape_map, chunk_map = d.get("shape"), d.get("chunks")
        try:
            dims = [shape_map[str(i)] for i in range(len(shape_map))]  # type: ignore[index, arg-type]
            chunks = [chunk_map[str(i)] for i in range(len(chunk_map))]  # type: ignore[index, arg-type]
        except (KeyError, TypeError):
            raise _CorruptMsgpack("a chunked array without its shape or chunks") from None
        if not chunks or not all(isinstance(c, _ArrayRef) and c.dtype == chunks[0].dtype for c in chunks):
            raise _CorruptMsgpack("a chunked array with mixed chunks")
        dtype = chunks[0].dtype
        shape = _checked_shape(dims, dtype)
        if shape is None:
            raise _CorruptMsgpack(f"a chunked array's shape is {_brief(dims)}, not a list of sizes")
        ranges = tuple(r for c in chunks for r in c.chunks)
        if sum(n for _, n in ranges) != math.prod(shape) * dtype.itemsize:
            raise _CorruptMsgpack(f"a chunked array of shape {list(shape)} holds the wrong number of bytes")
        return _ArrayRef(shape, dtype, ranges)


def _dtype_from_name(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in _FLAX_DTYPES:
        raise _CorruptMsgpack(f"an array's dtype is {_brief(name)}, not one of {', '.join(_FLAX_DTYPES)}")
    return _FLAX_DTYPES[name]


def _flatten_tree(tree: dict, prefix: str, out: dict[str, Any]) -> None:
    """`/`-joined paths of the leaves, as flax.traverse_util.flatten_dict (empty subtrees vanish).

    Leaves are arrays or numbers; two paths that join to the same name ("a/b" and "a" > "b") are refused
    rather than one silently hiding the other.
    """
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten_tree(value, path + "/", out)
            continue
        if path in out:
            raise _CorruptMsgpack(f"two leaves are named {_brief(path)}")
        if isinstance(value, _ArrayRef):
            out[path] = value
        elif type(value) in (bool, int, float, complex):
            out[path] = np.asarray(value)
        else:
            raise _CorruptMsgpack(f"the leaf {_brief(path)} is a {type(value).__name__}, not an array or number")


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
    """The informative sentence of torch's weights_only refusal, on one line.

    torch's message opens with advice to retry with weights_only=False (with ANSI codes) and closes with a link
    to the documentation; the reason lies between ("Trying to load unsupported GLOBAL posix.system ...",
    "WeightsUnpickler error: Unsupported operand 238").
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    text = re.sub(r".*WeightsUnpickler error:", "", text, flags=re.DOTALL)
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return " ".join(lines)[:300] or "unpickling error"


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

    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array 1-d
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
        self.config: dict[str, Any] = _read_json(config_path)
        name = next((n for n in prefer if (self.directory / n).is_file()), None)
        if name is None:
            raise CheckpointError(f"{self.directory}: no weight file (looked for {', '.join(prefer)})")
        self.format = "safetensors" if "safetensors" in name else "pytorch" if "bin" in name else "flax"
        opener = {"safetensors": _SafetensorsFile, "pytorch": _TorchBinFile, "flax": _FlaxMsgpackFile}[self.format]
        index_map: dict[str, Path] = {}
        if name.endswith(".index.json"):
            index_map = self._shards(self.directory / name)
            self.weight_files = list(dict.fromkeys(index_map.values()))
        else:
            self.weight_files = [self.directory / name]
        self._files = {}
        self._where: dict[str, Any] = {}
        for path in self.weight_files:
            f = opener(path)
            self._files[path] = f
            for key in f.entries:
                if key in self._where:
                    raise CheckpointError(f"{path}: tensor {_brief(key)} is also in {self._where[key].path}")
                self._where[key] = f
        for key, path in index_map.items():
            if key not in self._where or self._where[key].path != path:
                raise CheckpointError(f"{self.directory / name}: lists {_brief(key)} in shard {path.name!r}, "
                                      f"which does not hold it")

    def _shards(self, index_path: Path) -> dict[str, Path]:
        """The index's weight map as key -> shard path, each shard checked to be a file of this directory."""
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
        roots = _shard_roots(self.directory)
        paths: dict[str, Path] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index_path}: the shard of {_brief(key)} is {_brief(shard)}, not a file name")
            if shard not in paths:
                paths[shard] = self._shard_path(index_path, shard, roots)
        return {key: paths[shard] for key, shard in weight_map.items()}

    def _shard_path(self, index_path: Path, shard: str, roots: list[Path]) -> Path:
        # An index is data from the checkpoint's author: it may only name files of this directory.
        posix = PurePosixPath(shard)
        if (not shard or "\0" in shard or "\\" in shard or posix.is_absolute() or PurePath(shard).is_absolute()
                or ".." in posix.parts or posix == PurePosixPath(".")):
            raise CheckpointError(f"{index_path}: names shard {_brief(shard)}, which is not a file name in "
                                  f"{self.directory}")
        path = self.directory / shard
        try:
            found, real = path.is_file(), path.resolve()
        except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop
            found, real = False, path
        if not found:
            raise CheckpointError(f"{index_path}: names shard {shard!r}, which is missing")
        if not any(real.is_relative_to(root) for root in roots):
            raise CheckpointError(f"{index_path}: names shard {shard!r}, a link that leads out of {self.directory} "
                                  f"(to {real})")
        return path

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

    def byte_range(self, key: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) of a tensor stored as one run of bytes in its file, C-ordered in its dtype
        (for a memory map of it); None when it is not (a chunked msgpack array, a pickled checkpoint)."""
        source = self._where[key]
        if isinstance(source, _SafetensorsFile):
            begin, end = source._offsets[key]
            return source.path, source.data_start + begin, end - begin
        leaf = getattr(source, "_leaves", {}).get(key)
        if isinstance(leaf, _ArrayRef) and len(leaf.chunks) == 1:
            return source.path, *leaf.chunks[0]
        return None

    def get_slice(self, key: str, index: Index, dtype: np.dtype | None = None) -> np.ndarray:
        """Reads one box of a tensor, `tensor[index]`, reading only its bytes.

        Args:
            key: the tensor's name.
            index: one slice (step 1) per leading dimension; dimensions left out are read whole.
            dtype: cast to this dtype (numpy's rounding) after reading; None keeps the stored dtype, bit-exact.

        Returns:
            A new array of the box's shape.
        """
        source = self._where[key]
        box = _box(source.entries[key].shape, index, f"{source.path}: {key}")
        array = source.read_box(key, box)
        if dtype is None or array.dtype == np.dtype(dtype):
            return array
        cast = new_array(array.shape, np.dtype(dtype))
        np.copyto(cast, array, casting="unsafe")
        return cast

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from the weight files so far (headers and msgpack structure not counted)."""
        return sum(f.bytes_read for f in self._files.values())

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)

    @property
    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._where)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def _read_json(path: Path) -> dict[str, Any]:
    """`read_json`, also refusing JSON nested past the parser's recursion limit, or with integers longer than
    Python converts (4300 digits), with the same one-line error."""
    try:
        return read_json(path)
    except (RecursionError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(e)})") from None


def _shard_roots(directory: Path) -> list[Path]:
    """Where the files of `directory` may really lie: in it or, for a snapshot of huggingface_hub's cache
    (`models--OWNER--NAME/snapshots/<commit>/`), in its repository's `blobs/`, which the snapshot links to."""
    real = directory.resolve()
    for folder in (real, *real.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
            return [real, repo / "blobs"]
    return [real]


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Opens a local checkpoint directory (see the module docstring for the files it looks for)."""
    return Checkpoint(directory)


def file_size(path: str | Path) -> int:
    return os.stat(path).st_size
