"""The safetensors reader: an 8-byte header length, a JSON header, raw little-endian data; each tensor read with
one `readinto` when asked for (or cast in chunks on the way in), so a file is never loaded whole.

The header is held to what the safetensors library checks: each tensor's byte length is its dtype's size times its
shape, and the tensors, in offset order, tile the data exactly (no shared, overlapping or skipped bytes, nothing
after the last one). A file the library refuses is refused here too (`parity_tests/test_fuzz_readers.py`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

import convert.base.checkpoint.tensors as tensors
from convert.base.checkpoint.tensors import SAFETENSORS_DTYPES, TensorInfo, brief, checked_shape, read_box
from convert.base.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024
_CAST_CHUNK_BYTES = 4 << 20


class SafetensorsFile:
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
            raise self._corrupt(f"__metadata__ is {brief(metadata)}, not a map of strings")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self.entries: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        data_size = size - self.data_start
        for key, spec in header.items():
            if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
                raise self._corrupt(f"bad header entry for {brief(key)}")
            code, dims, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
                raise self._corrupt(f"{brief(key)} has dtype {brief(code)}, not one of "
                                    f"{', '.join(SAFETENSORS_DTYPES)}")
            dtype = SAFETENSORS_DTYPES[code]
            shape = checked_shape(dims, dtype)
            if shape is None:
                raise self._corrupt(f"{brief(key)} has shape {brief(dims)}, not a list of sizes")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
                raise self._corrupt(f"{brief(key)} has data_offsets {brief(offsets)}, not [begin, end]")
            begin, end = offsets
            info = TensorInfo(key, shape, dtype, path)
            if end - begin != info.nbytes or begin < 0:
                raise self._corrupt(f"{brief(key)}: {end - begin} bytes for shape {list(shape)} {code}")
            if end > data_size:
                raise CheckpointError(f"{path}: truncated safetensors file ({brief(key)} ends at byte {end} of the "
                                      f"data, the file holds {data_size})")
            self.entries[key] = info
            self._offsets[key] = (begin, end)
        self._check_layout(data_size)

    def _check_layout(self, data_size: int) -> None:
        """The tensors tile the data exactly, as the safetensors library requires: in offset order each begins
        where the one before ends (the first at 0), and the last ends where the file does. Otherwise two tensors
        could share bytes, a shifted header could read its neighbour's bytes, or bytes could hide after the end."""
        position, previous = 0, None
        for key, (begin, end) in sorted(self._offsets.items(), key=lambda item: item[1]):
            if begin < position:
                raise self._corrupt(f"{brief(key)} (bytes {begin}..{end} of the data) overlaps {brief(previous)}, "
                                    f"which ends at byte {position}")
            if begin > position:
                after = f"after {brief(previous)}, which ends at byte {position}" if previous is not None else \
                    "at the start of the data"
                raise self._corrupt(f"{begin - position} byte(s) belong to no tensor {after} ({brief(key)} begins "
                                    f"at byte {begin})")
            position, previous = end, key
        if position != data_size:
            raise self._corrupt(f"{data_size - position} trailing byte(s) after the last tensor (the tensors cover "
                                f"{position} of the {data_size} bytes of data)")

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt safetensors file ({why})")

    def read(self, key: str, dtype: np.dtype | None = None) -> np.ndarray:
        info, (begin, end) = self.entries[key], self._offsets[key]
        if dtype is not None and np.dtype(dtype) != info.dtype:
            return self._read_cast(key, np.dtype(dtype))
        out = tensors.new_array(info.shape, info.dtype)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated safetensors file (short read of {key!r})")
        self.bytes_read += got
        return out

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        begin, end = self._offsets[key]
        out = read_box(self.path, ((self.data_start + begin, end - begin),), self.entries[key], box)
        self.bytes_read += out.nbytes
        return out

    def _read_cast(self, key: str, dtype: np.dtype) -> np.ndarray:
        """Reads a tensor in chunks through one small buffer, casting each chunk into the output: the
        full-size array in the stored dtype is never made (half the memory traffic of read-then-astype)."""
        info, (begin, _) = self.entries[key], self._offsets[key]
        out = tensors.new_array(info.shape, dtype).reshape(-1)
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


