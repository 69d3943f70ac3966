"""Reading Hugging Face checkpoint directories, one tensor at a time.

A directory holds `config.json` and weights in one of these forms (the first one present wins):
`model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json`, `flax_model.msgpack`, `flax_model.msgpack.index.json`. Each format has its own
reader module (`safetensors_reader`, `torch_bin_reader`, `msgpack_reader`); this module picks one, follows shard
indexes, and offers one interface over all of them.

`Checkpoint.get_slice(key, index)` reads one box of a tensor (a slice per dimension) and nothing else: the
rows of the box are contiguous byte ranges of the file (one read when the box is itself one range, one read
per row otherwise), so that a process of a sharded load reads only the shards its devices hold.
`Checkpoint.bytes_read` counts the tensor bytes read so far.

Whatever is corrupt or absurd in a directory (a length field beyond the end of a file, a shape that does not
match its bytes, nesting without end, a shard name that leaves the directory) ends in a one-line
`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

import convert.base.checkpoint.tensors as tensors
from convert.base.checkpoint.msgpack_reader import ArrayRef, FlaxMsgpackFile
from convert.base.checkpoint.safetensors_reader import SafetensorsFile
from convert.base.checkpoint.tensors import Index, TensorInfo, box_of, brief, first_line
from convert.base.checkpoint.torch_bin_reader import TorchBinFile
from convert.base.configs import read_json
from convert.base.errors import CheckpointError

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
        opener = {"safetensors": SafetensorsFile, "pytorch": TorchBinFile, "flax": FlaxMsgpackFile}[self.format]
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
                    raise CheckpointError(f"{path}: tensor {brief(key)} is also in {self._where[key].path}")
                self._where[key] = f
        for key, path in index_map.items():
            if key not in self._where or self._where[key].path != path:
                raise CheckpointError(f"{self.directory / name}: lists {brief(key)} in shard {path.name!r}, "
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
                raise CheckpointError(f"{index_path}: the shard of {brief(key)} is {brief(shard)}, not a file name")
            if shard not in paths:
                paths[shard] = self._shard_path(index_path, shard, roots)
        return {key: paths[shard] for key, shard in weight_map.items()}

    def _shard_path(self, index_path: Path, shard: str, roots: list[Path]) -> Path:
        # An index is data from the checkpoint's author: it may only name files of this directory.
        posix = PurePosixPath(shard)
        if (not shard or "\0" in shard or "\\" in shard or posix.is_absolute() or PurePath(shard).is_absolute()
                or ".." in posix.parts or posix == PurePosixPath(".")):
            raise CheckpointError(f"{index_path}: names shard {brief(shard)}, which is not a file name in "
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
        if isinstance(source, SafetensorsFile):
            return source.read(key, dtype)
        array = source.read(key)
        return array if dtype is None or array.dtype == np.dtype(dtype) else array.astype(dtype)

    def byte_range(self, key: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) of a tensor stored as one run of bytes in its file, C-ordered in its dtype
        (for a memory map of it); None when it is not (a chunked msgpack array, a pickled checkpoint)."""
        source = self._where[key]
        if isinstance(source, SafetensorsFile):
            begin, end = source._offsets[key]
            return source.path, source.data_start + begin, end - begin
        leaf = getattr(source, "_leaves", {}).get(key)
        if isinstance(leaf, ArrayRef) and len(leaf.chunks) == 1:
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
        box = box_of(source.entries[key].shape, index, f"{source.path}: {key}")
        array = source.read_box(key, box)
        if dtype is None or array.dtype == np.dtype(dtype):
            return array
        cast = tensors.new_array(array.shape, np.dtype(dtype))
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
        raise CheckpointError(f"{path}: not valid JSON ({first_line(e)})") from None


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
