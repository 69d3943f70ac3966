"""What every checkpoint reader shares: the tensor record, dtype tables, bounded error text, and reading a box
of a C-ordered tensor from byte ranges of a file without allocating more than the box.

Every reader treats its file as untrusted: no length read from a file is allocated or read before it has been
checked against the file's size (`parity_tests/test_fuzz_readers.py` fuzzes this).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import mmap
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import ml_dtypes
import numpy as np

from convert.base.errors import CheckpointError

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

_MAX_NDIM = 64  # numpy's own limit
_NUMPY_MAX_BYTES = np.iinfo(np.intp).max
_OWN_MAPPING_BYTES = 1 << 20

_brief_repr = reprlib.Repr()
_brief_repr.maxstring, _brief_repr.maxother, _brief_repr.maxlevel = 120, 60, 3


def brief(value: Any) -> str:
    """A repr short enough for a one-line error, whatever a corrupt file put there (bounded depth and length)."""
    return _brief_repr.repr(value)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def checked_shape(dims: Any, dtype: np.dtype) -> tuple[int, ...] | None:
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


def box_of(shape: tuple[int, ...], index: Index, what: str) -> tuple[tuple[int, int], ...]:
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


def read_box(path: Path, ranges: tuple[tuple[int, int], ...], info: TensorInfo,
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


