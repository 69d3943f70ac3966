"""Reading Hugging Face checkpoint directories, one tensor at a time.

A directory holds `config.json` and weights in one of these forms (the first one present wins):
`model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json`, `flax_model.msgpack`, `flax_model.msgpack.index.json`.

safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
each tensor is read with one `readinto` when asked for, so a file is never loaded whole. `.bin` files go
through `torch.load(weights_only=True, mmap=True)`; a pickle that needs more than tensors is refused.
"""

from __future__ import annotations

import dataclasses
import json
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

    def read(self, key: str) -> np.ndarray:
        info, (begin, end) = self.entries[key], self._offsets[key]
        out = np.empty(info.shape, dtype=info.dtype)
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated safetensors file (short read of {key!r})")
        return out


class _TorchBinFile:
    """A `pytorch_model.bin` loaded with `weights_only=True` (memory-mapped where the zip format allows)."""

    def __init__(self, path: Path):
        import pickle

        import torch

        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) pickles cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
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
        return torch_to_numpy(self.state[key])


class _FlaxMsgpackFile:
    """A `flax_model.msgpack` (flax.serialization format): read whole, then flattened to `/`-joined paths."""

    def __init__(self, path: Path):
        from flax import serialization, traverse_util

        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as e:  # msgpack raises many types for bad bytes
            raise CheckpointError(f"{path}: truncated or corrupt msgpack file ({type(e).__name__})") from None
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path}: not a Flax parameter tree")
        if set(tree) == {"params"}:
            tree = tree["params"]
        flat = traverse_util.flatten_dict(tree, sep="/")
        self.arrays = {k: np.asarray(v) for k, v in flat.items()}
        self.entries = {k: TensorInfo(k, v.shape, v.dtype, path) for k, v in self.arrays.items()}

    def read(self, key: str) -> np.ndarray:
        return self.arrays[key]


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

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor (bit-exact, in its stored dtype)."""
        return self._where[key].read(key)

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
