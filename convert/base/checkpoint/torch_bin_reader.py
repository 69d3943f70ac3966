"""The `pytorch_model.bin` reader: `torch.load(weights_only=True)`, memory-mapped where the zip format allows; a
pickle that needs more than tensors is refused, and every storage's claimed size is checked against the file
before torch allocates or maps it."""

from __future__ import annotations

import functools
import io
import mmap
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import convert.base.checkpoint.tensors as tensors
from convert.base.checkpoint.tensors import TensorInfo, brief, first_line
from convert.base.errors import CheckpointError


class TorchBinFile:
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
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({first_line(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a state dict of tensors (a {type(state).__name__})")
        self.entries = {}
        for key, tensor in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: not a state dict of tensors (the key {brief(key)} is not a string)")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: not a state dict of tensors ({brief(key)} is a "
                                      f"{type(tensor).__name__})")
            if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type != "cpu":
                raise CheckpointError(f"{path}: tensor {brief(key)} is not a dense tensor ({tensor.layout}, "
                                      f"{tensor.device.type})")
            info = TensorInfo(key, tuple(tensor.shape), _torch_dtype_to_numpy(tensor.dtype, path, key), path)
            # A view may repeat its storage (stride 0): a copy of it must still fit in what the file holds.
            if info.nbytes > size:
                raise CheckpointError(f"{path}: tensor {brief(key)} of shape {list(info.shape)} claims "
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
        out = tensors.new_array(tuple(tensor.shape), info.dtype)  # a copy in our own memory, so that the mapped pages can go
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
                                  f"{brief(saved_id)})")
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
                                          f"{brief(entry.filename)} claims {claimed} bytes in a {size}-byte file)")
            # torch names the records of one archive "<archive>/data.pkl", "<archive>/data/<key>", ...
            prefix = entries[0].filename.split("/", 1)[0] + "/" if entries else ""
            pickled = archive.read(prefix + "data.pkl")
    except CheckpointError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, but also KeyError, OSError, ValueError, EOFError
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (not a readable torch.save zip "
                              f"archive: {first_line(e)})") from None
    records = {entry.filename: entry.file_size for entry in entries}
    for key, nbytes in _storage_claims(path, io.BytesIO(pickled), size).items():
        held = records.get(f"{prefix}data/{key}")
        if held is None or nbytes > held:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (storage {brief(key)} claims "
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
                              f"{brief(missing[0])})")


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


