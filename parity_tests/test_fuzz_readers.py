"""Fuzzing of the checkpoint readers: corrupt input is refused with a one-line `CheckpointError`, never crashes.

Each fuzz test starts from small valid files written here (`safetensors.numpy.save`, save_file's bytes,
`flax.serialization.msgpack_serialize`, `torch.save`, a JSON shard index) or builds files field by field, then
truncates them, flips bits, overwrites and inserts bytes, and plants absurd length fields (a header length of
2**63, msgpack map/array/bin counts of 2**32 - 1, shapes with huge or negative dims, nesting thousands deep).
Every case must end in one of two ways:

* a `CheckpointError` whose message is one line that starts with the path of a file of the checkpoint, or
* a checkpoint that opens and whose every `.get(key)` returns an array of the declared shape and dtype, equal
  bit for bit to what the format's reference reader (safetensors, flax, torch) gives when that one accepts
  the file too.

Any other exception fails the test. So does an allocation the file cannot justify: `new_array` must never be
asked for more bytes than the file holding the tensor has, and the peak of Python's traced allocations
(tracemalloc, which also sees numpy's buffers) while opening and reading must stay under
`ALLOCATION_SLACK_BYTES` plus 16 times the checkpoint's size (an over-read such as `f.read(2**32)` allocates
its whole length up front).

Examples per fuzz test (derandomized, so that CI runs the same cases every time):

    test_mutated_safetensors_is_refused_or_read_whole        EXAMPLES_SAFETENSORS_MUTATED = 300
    test_crafted_safetensors_header_is_refused_or_read_whole  EXAMPLES_SAFETENSORS_CRAFTED = 300
    test_mutated_msgpack_is_refused_or_read_whole            EXAMPLES_MSGPACK_MUTATED = 300
    test_crafted_msgpack_is_refused_or_read_whole            EXAMPLES_MSGPACK_CRAFTED = 300
    test_mutated_bin_is_refused_or_read_whole                EXAMPLES_BIN_MUTATED = 200
    test_crafted_shard_index_is_refused_or_read_whole        EXAMPLES_INDEX_CRAFTED = 300
    test_mutated_shard_index_is_refused_or_read_whole        EXAMPLES_INDEX_MUTATED = 150

    safetensors 600, Flax msgpack 600, PyTorch .bin 200, shard indexes 450: 1850 examples in all
    (EXAMPLES_TOTAL), plus the explicit `@example` cases and the example-based tests below.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import ml_dtypes
import msgpack
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import serialization, traverse_util
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from convert.base.checkpoint import tensors as checkpoint_tensors
from convert.base.checkpoint import SAFETENSORS_DTYPES, Checkpoint, torch_to_numpy
from convert.base.errors import CheckpointError

EXAMPLES_SAFETENSORS_MUTATED = 300
EXAMPLES_SAFETENSORS_CRAFTED = 300
EXAMPLES_MSGPACK_MUTATED = 300
EXAMPLES_MSGPACK_CRAFTED = 300
EXAMPLES_BIN_MUTATED = 200
EXAMPLES_INDEX_CRAFTED = 300
EXAMPLES_INDEX_MUTATED = 150
EXAMPLES_TOTAL = (EXAMPLES_SAFETENSORS_MUTATED + EXAMPLES_SAFETENSORS_CRAFTED + EXAMPLES_MSGPACK_MUTATED
                  + EXAMPLES_MSGPACK_CRAFTED + EXAMPLES_BIN_MUTATED + EXAMPLES_INDEX_CRAFTED + EXAMPLES_INDEX_MUTATED)

ALLOCATION_SLACK_BYTES = 16 << 20

# torch warns about the pickle protocol byte of a corrupt legacy file before it fails on it: noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


def _fuzz(max_examples: int) -> settings:
    # No example database: the runs are derandomized, and a .hypothesis folder would land in the work tree.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


# Lengths, counts and dims that overflow 32- and 64-bit fields, numpy's intp, or a float's exact integers.
ABSURD_INTS = (2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
# What a msgpack count or length field (at most 32 bits) can claim beyond the bytes that follow it.
ABSURD_COUNTS = (2**16 - 1, 2**16, 2**31, 2**32 - 1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
DIMS = st.one_of(st.integers(0, 4), st.integers(-3, -1), st.sampled_from(ABSURD_INTS), st.just(10**40),
                 st.floats(), st.booleans(), st.text(max_size=2), st.none(), st.lists(st.integers(0, 2), max_size=2))


# ---------------------------------------------------------------------------------------------------------------
# The property every case must satisfy


def _replace(path: Path, data: bytes) -> None:
    """Writes through a new inode: a checkpoint still open from an earlier example keeps its own (mapped) file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _only_weight_file(directory: Path, name: str, data: bytes) -> Path:
    """Makes `name`, holding `data`, the one weight file of `directory`."""
    for other in ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack"):
        if other != name:
            (directory / other).unlink(missing_ok=True)
    _replace(directory / name, data)
    return directory / name


def _event(name: str) -> None:
    if currently_in_test_context():  # the example-based tests share the checker
        event(name)


@contextlib.contextmanager
def _recorded_new_array() -> Iterator[list[int]]:
    """Every size `new_array` is asked for, in bytes."""
    requests: list[int] = []
    real = checkpoint_tensors.new_array

    def recording(shape, dtype):
        requests.append(math.prod(shape) * np.dtype(dtype).itemsize)
        return real(shape, dtype)

    with mock.patch.object(checkpoint_tensors, "new_array", recording):
        yield requests


def _refused_or_read_whole(directory: Path, named: list[Path]) -> tuple[Checkpoint, dict[str, np.ndarray]] | None:
    """Opens `directory` and reads every tensor: None when a one-line CheckpointError naming one of `named`
    refused it, else the checkpoint and its arrays. Fails on any other exception, and on allocations beyond
    what the files justify."""
    files = [p for p in directory.iterdir() if p.is_file()]
    budget = ALLOCATION_SLACK_BYTES + 16 * sum(p.stat().st_size for p in files)
    tracemalloc.start()
    try:
        with _recorded_new_array() as requests:
            try:
                ckpt = Checkpoint(directory)
                arrays = {}
                for key in ckpt.keys():
                    info, before = ckpt.info(key), len(requests)
                    array = ckpt.get(key)
                    assert array.shape == info.shape and array.dtype == info.dtype, (key, array.shape, info)
                    held = info.file.stat().st_size
                    assert all(n <= held for n in requests[before:]), f"{key}: new_array({requests[before:]}) " \
                                                                       f"for a {held}-byte file"
                    arrays[key] = array
                result = ckpt, arrays
                _event("read whole")
            except CheckpointError as e:
                message = str(e)
                assert "\n" not in message, message
                assert any(message.startswith(f"{p}:") for p in named), message
                result = None
                # The kind of refusal, for --hypothesis-show-statistics: "corrupt safetensors file (...".
                _event("refused: " + re.sub(r"[(:'\"\d].*", "", message.split(": ", 1)[-1]).strip())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget, f"peak traced allocation {peak} bytes for {budget - ALLOCATION_SLACK_BYTES} of files"
    return result


def _same_arrays(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert set(ours) == set(reference), (sorted(ours), sorted(reference))
    for key, value in reference.items():
        value = np.asarray(value)
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, (key, ours[key], value)
        assert ours[key].tobytes() == value.tobytes(), key


@st.composite
def _mutated(draw, data: bytes, hot: tuple[int, int] | None = None, tokens: tuple[bytes, ...] = (),
             length_first: bool = False) -> bytes:
    """`data` after 1-3 random edits; positions favour the `hot` range, and byte 0 when the format starts with a
    length field (`length_first`)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        end = len(buf)
        positions = [st.just(0)] if length_first else []
        positions.append(st.integers(0, end))
        if hot is not None and hot[0] < min(hot[1], end):
            positions.append(st.integers(hot[0], min(hot[1], end) - 1))
        pos = draw(st.one_of(positions))
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "absurd", "token"]))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip" and pos < end:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[pos:pos + len(chunk)] = chunk
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif kind == "absurd":
            width, order = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from(["little", "big"]))
            value = draw(st.sampled_from(ABSURD_INTS)) % 2 ** (8 * width)
            buf[pos:pos + width] = value.to_bytes(width, order)
        elif kind == "token" and tokens:
            token = draw(st.sampled_from(tokens))
            buf[pos:pos + len(token)] = token
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------------------
# safetensors


def _valid_safetensors() -> bytes:
    rng = np.random.default_rng(0)
    tensors = {
        "encoder.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "encoder.bias": rng.standard_normal(4).astype(np.float16),
        "head.weight": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "steps": np.array(7, np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 5), np.uint8),
    }
    return safetensors.numpy.save(tensors, metadata={"format": "pt"})


VALID_SAFETENSORS = _valid_safetensors()
SAFETENSORS_HEADER_END = 8 + struct.unpack("<Q", VALID_SAFETENSORS[:8])[0]


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_single")
    (directory / "config.json").write_text("{}")
    return directory


def _check_safetensors(directory: Path, data: bytes) -> tuple[Checkpoint, dict] | None:
    path = _only_weight_file(directory, "model.safetensors", data)
    result = _refused_or_read_whole(directory, [path])
    if result is None:
        return None
    ckpt, arrays = result
    assert ckpt.format == "safetensors" and ckpt.weight_files == [path]
    # The cast path reads through its own scratch buffer: it must agree with the plain read.
    for key, array in arrays.items():
        assert np.array_equal(ckpt.get(key, np.float64), array.astype(np.float64), equal_nan=True), key
    # What this reader accepts, the safetensors library accepts too (offsets contiguous and covering the data,
    # byte lengths, JSON), with the same values: no file whose tensors the library would refuse is read here.
    # (Read through torch, which holds every dtype here, float8 included; numpy has no float8.)
    try:
        reference = safetensors.torch.load_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises its own error types
        pytest.fail(f"read a file the safetensors library refuses ({e}): {data[:300]!r}")
    assert set(arrays) == set(reference), (sorted(arrays), sorted(reference))
    for key, tensor in reference.items():
        assert arrays[key].shape == tuple(tensor.shape), (key, arrays[key].shape, tensor.shape)
        dtype = str(tensor.dtype).removeprefix("torch.")
        assert str(arrays[key].dtype) == dtype, (key, arrays[key].dtype, dtype)
        assert arrays[key].tobytes() == tensor.reshape(-1).view(torch.uint8).numpy().tobytes(), key
    return result


@_fuzz(EXAMPLES_SAFETENSORS_MUTATED)
@given(data=_mutated(VALID_SAFETENSORS, hot=(8, SAFETENSORS_HEADER_END), length_first=True,
                     tokens=(b'"shape":[4294967296,4294967296]', b'"shape":[-1,-4]', b'[[[[[[[[',
                             b'"data_offsets":[0,18446744073709551615]', b"1e999", b"-0", b"NaN")))
@example(data=struct.pack("<Q", 2**63) + VALID_SAFETENSORS[8:])
@example(data=struct.pack("<Q", 2**64 - 1) + VALID_SAFETENSORS[8:])
@example(data=VALID_SAFETENSORS[:7])
@example(data=VALID_SAFETENSORS[:SAFETENSORS_HEADER_END])
@example(data=VALID_SAFETENSORS)
def test_mutated_safetensors_is_refused_or_read_whole(single_dir, data):
    _check_safetensors(single_dir, data)


def _header_bytes(header: object) -> bytes:
    return json.dumps(header).encode()


@st.composite
def _safetensors_files(draw) -> bytes:
    """A header built entry by entry, each either consistent with the data or lying in some field."""
    header: dict[str, object] = {}
    data = bytearray()
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["w", "layer.0.bias", "é", "", "__metadata__"])) + str(i)
        code = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize
        begin = len(data)
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
        spec: dict[str, object] = {"dtype": code, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        lie = draw(st.sampled_from(["none", "none", "dtype", "shape", "offsets", "shift", "share", "drop", "entry"]))
        if lie == "shift":  # the right length at the wrong place: a neighbour's bytes, or bytes of none
            shift = draw(st.sampled_from([-4, -2, -1, 1, 2, 4]))
            spec["data_offsets"] = [begin + shift, begin + nbytes + shift]
        elif lie == "share" and begin >= nbytes:  # another tensor's bytes (the one before, when as long)
            spec["data_offsets"] = [begin - nbytes, begin]
        elif lie == "dtype":
            spec["dtype"] = draw(st.sampled_from(["U16", "F4", "f32", "", "O"]) | JSON_VALUES)
        elif lie == "shape":
            spec["shape"] = draw(st.lists(DIMS, max_size=4) | DIMS | JSON_VALUES)
        elif lie == "offsets":
            offset = st.integers(-5, 300) | st.sampled_from(ABSURD_INTS) | st.floats() | st.text(max_size=1)
            spec["data_offsets"] = draw(st.lists(offset, max_size=3) | JSON_VALUES)
        elif lie == "drop":
            del spec[draw(st.sampled_from(sorted(spec)))]
        elif lie == "entry":
            spec = draw(JSON_VALUES)  # type: ignore[assignment]
        header[name] = spec
    metadata = draw(st.sampled_from(["absent", "strings", "other"]))
    if metadata == "strings":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    elif metadata == "other":
        header["__metadata__"] = draw(JSON_VALUES)
    raw = _header_bytes(header) + b" " * draw(st.integers(0, 7))
    length = draw(st.sampled_from(["exact", "exact", "absurd", "near"]))
    n = len(raw) if length == "exact" else draw(st.sampled_from(ABSURD_INTS)) if length == "absurd" \
        else max(0, len(raw) + draw(st.integers(-4, 4)))
    tail = bytes(data) + draw(st.binary(max_size=4))
    if draw(st.booleans()):
        tail = tail[:draw(st.integers(0, len(tail)))]
    return struct.pack("<Q", n) + raw + tail


def _with_length(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


@_fuzz(EXAMPLES_SAFETENSORS_CRAFTED)
@given(data=_safetensors_files())
@example(data=_with_length(b"[" * 100_000 + b"]" * 100_000))  # json's recursion
@example(data=_with_length(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'))
@example(data=_with_length(b'{"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}') + b"\0" * 4)
@example(data=_with_length(_header_bytes({"w": {"dtype": "F32", "shape": [2**32, 2**32],
                                               "data_offsets": [0, 0]}})))
@example(data=_with_length(_header_bytes({"w": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}))
     + b"\0" * 4)
@example(data=_with_length(_header_bytes({"w": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}})))
@example(data=_with_length(_header_bytes({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}))
     + b"\0" * 4)
@example(data=_with_length(_header_bytes({"__metadata__": ["not", "a", "map"]})))
@example(data=_with_length(b"\xff\xfe{\x00}\x00"))
# Two tensors sharing one byte range; offsets shifted by 4 bytes; bytes after the last tensor; a gap.
@example(data=_with_length(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})) + b"\1" * 8)
@example(data=_with_length(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                                          "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})) + b"\1" * 12)
@example(data=_with_length(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})) + b"\1" * 5)
@example(data=_with_length(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                          "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})) + b"\1" * 12)
def test_crafted_safetensors_header_is_refused_or_read_whole(single_dir, data):
    _check_safetensors(single_dir, data)


# ---------------------------------------------------------------------------------------------------------------
# Flax msgpack


def _flax_tree() -> dict:
    rng = np.random.default_rng(1)
    return {"params": {
        "encoder": {"kernel": rng.standard_normal((3, 2)).astype(np.float32),
                    "bias": rng.standard_normal(2).astype(np.float16)},
        "lm_head": {"kernel": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16)},
        "scale": np.float32(2.5),  # a numpy scalar: flax's ext type 3
        "steps": 7,  # a plain msgpack int
        "ids": np.arange(10, dtype=np.int32),
    }}


def _chunked_msgpack(tree: dict, chunk_bytes: int) -> bytes:
    """flax's own chunking of big arrays (`__msgpack_chunked_array__`), at a size small enough to test."""
    with mock.patch.object(serialization, "MAX_CHUNK_SIZE", chunk_bytes):
        return serialization.msgpack_serialize(tree)


VALID_MSGPACK = serialization.msgpack_serialize(_flax_tree())
VALID_MSGPACK_CHUNKED = _chunked_msgpack(_flax_tree(), 16)
assert b"__msgpack_chunked_array__" in VALID_MSGPACK_CHUNKED
# Length fields a mutation plants in the middle of a msgpack stream: map32, array32, bin32, str32 and ext32
# headers that claim 2**32 - 1 entries or bytes, and nesting that never closes.
MSGPACK_TOKENS = (b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                  b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\x91" * 16, b"\x81\xa1a" * 8,
                  b"\xa6object", b"\xa1O", b"\xa5f4,f4", b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff")


def _check_msgpack(directory: Path, data: bytes) -> tuple[Checkpoint, dict] | None:
    path = _only_weight_file(directory, "flax_model.msgpack", data)
    result = _refused_or_read_whole(directory, [path])
    if result is None:
        return None
    ckpt, arrays = result
    assert ckpt.format == "flax" and ckpt.weight_files == [path]
    try:
        tree = serialization.msgpack_restore(data)
        if isinstance(tree, dict) and set(tree) == {"params"}:
            tree = tree["params"]
        reference = traverse_util.flatten_dict(tree, sep="/")
    except Exception:  # flax's own reader refuses it (or builds something that is not a tree)
        return result
    _same_arrays(arrays, reference)
    return result


@_fuzz(EXAMPLES_MSGPACK_MUTATED)
@given(data=st.sampled_from([VALID_MSGPACK, VALID_MSGPACK_CHUNKED]).flatmap(
    lambda valid: _mutated(valid, tokens=MSGPACK_TOKENS)))
@example(data=b"")
@example(data=VALID_MSGPACK)
@example(data=VALID_MSGPACK_CHUNKED)
@example(data=b"\xdf\xff\xff\xff\xff" + VALID_MSGPACK[1:])
@example(data=b"\x81\xa6params\xdd\xff\xff\xff\xff")
def test_mutated_msgpack_is_refused_or_read_whole(single_dir, data):
    _check_msgpack(single_dir, data)


def _counted(fix: int, codes: tuple[int, int, int], n: int, fix_max: int = 15) -> bytes:
    """A msgpack map/array/bin header declaring `n` (fixmap/fixarray when it fits)."""
    if fix and n <= fix_max:
        return bytes([fix | n])
    for code, width in zip(codes, (1, 2, 4) if codes[0] in (0xC4, 0xC7) else (2, 4, 4)):
        if n < 2 ** (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise ValueError(n)


def _map_header(n: int) -> bytes:
    return _counted(0x80, (0xDE, 0xDF, 0xDF), n)


def _array_header(n: int) -> bytes:
    return _counted(0x90, (0xDC, 0xDD, 0xDD), n)


def _bin(data: bytes, declared: int | None = None) -> bytes:
    return _counted(0, (0xC4, 0xC5, 0xC6), len(data) if declared is None else declared) + data


def _ext(code: int, payload: bytes, declared: int | None = None) -> bytes:
    n = len(payload) if declared is None else declared
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = bytes([fixed[n]]) if n in fixed else _counted(0, (0xC7, 0xC8, 0xC9), n)
    return head + bytes([code & 0xFF]) + payload


def _packed(value: object) -> bytes:
    try:
        return msgpack.packb(value)
    except (OverflowError, TypeError, ValueError):  # an int beyond 64 bits: say it is nil instead
        return b"\xc0"


FLAX_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8", "int64", "uint8", "bool", "complex64",
                    "float8_e4m3fn")
BAD_DTYPE_NAMES = ("object", "O", "U8", "S3", "V8", "f4,f4", ">f4", "<f4", "M8[s]", "(2,)f4", "__class__",
                   "finfo", "float128", "")


@st.composite
def _msgpack_arrays(draw) -> bytes:
    """flax's ndarray ext value: (shape, dtype name, raw bytes), consistent or lying about one part."""
    name = draw(st.sampled_from(FLAX_DTYPE_NAMES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    nbytes = math.prod(shape) * np.dtype(getattr(ml_dtypes, name, None) or name).itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    lie = draw(st.sampled_from(["none", "none", "shape", "dtype", "data", "ext", "layout"]))
    shape_bytes, name_bytes, data_bytes, declared = _packed(shape), _packed(name), _bin(raw), None
    if lie == "shape":
        shape_bytes = _packed(draw(st.lists(DIMS, max_size=4) | DIMS))
    elif lie == "dtype":
        name_bytes = _packed(draw(st.sampled_from(BAD_DTYPE_NAMES) | st.integers() | st.none()))
    elif lie == "data":
        data_bytes = _bin(raw, draw(st.sampled_from(ABSURD_COUNTS) | st.integers(0, nbytes + 4)))
    elif lie == "ext":
        declared = draw(st.sampled_from(ABSURD_COUNTS) | st.integers(0, 64))
    elif lie == "layout":
        return _ext(draw(st.sampled_from([1, 3])), _array_header(draw(st.integers(0, 4))) + shape_bytes + data_bytes)
    code = draw(st.sampled_from([1, 1, 3]))
    return _ext(code, b"\x93" + shape_bytes + name_bytes + data_bytes, declared)


MSGPACK_SCALARS = st.one_of(
    st.integers(-2**63, 2**64 - 1).map(_packed), st.floats().map(_packed), st.booleans().map(_packed),
    st.text(max_size=3).map(_packed), st.binary(max_size=3).map(_packed), st.just(b"\xc0"),
    st.tuples(st.floats(), st.floats()).map(lambda c: _ext(2, _packed(c))),  # flax's complex
    st.binary(max_size=9).map(lambda b: _ext(2, b)),  # a complex that is not (real, imag)
    st.tuples(st.integers(-128, 127), st.binary(max_size=5)).map(lambda t: _ext(*t)),
    st.just(b"\xc1"),  # never used by msgpack
)


@st.composite
def _msgpack_maps(draw, children) -> bytes:
    items = draw(st.lists(st.tuples(st.text(max_size=4).map(_packed) | MSGPACK_SCALARS, children), max_size=4))
    declared = len(items) if draw(st.integers(0, 3)) else draw(st.sampled_from(ABSURD_COUNTS) | st.integers(0, 6))
    return _map_header(declared) + b"".join(k + v for k, v in items)


@st.composite
def _msgpack_lists(draw, children) -> bytes:
    items = draw(st.lists(children, max_size=4))
    declared = len(items) if draw(st.integers(0, 3)) else draw(st.sampled_from(ABSURD_COUNTS) | st.integers(0, 6))
    return _array_header(declared) + b"".join(items)


@st.composite
def _msgpack_chunked(draw, children) -> bytes:
    """flax's `__msgpack_chunked_array__` map, with shape and chunks that may not add up."""
    shape = draw(st.lists(st.integers(0, 3), max_size=2) | st.lists(DIMS, max_size=2))
    chunks = draw(st.lists(_msgpack_arrays() | children, max_size=3))
    body = {b"__msgpack_chunked_array__": b"\xc3",
            b"shape": _map_header(len(shape)) + b"".join(_packed(str(i)) + _packed(d) for i, d in enumerate(shape)),
            b"chunks": _map_header(len(chunks)) + b"".join(_packed(str(i)) + c for i, c in enumerate(chunks))}
    keep = draw(st.lists(st.sampled_from(sorted(body)), unique=True, min_size=1))
    return _map_header(len(keep)) + b"".join(_packed(k.decode()) + body[k] for k in keep)


def _msgpack_trees(leaves):
    return st.recursive(leaves, lambda children: _msgpack_maps(children) | _msgpack_lists(children)
                        | _msgpack_chunked(children), max_leaves=6)


@st.composite
def _msgpack_files(draw) -> bytes:
    leaves = _msgpack_arrays() | MSGPACK_SCALARS
    body = draw(_msgpack_maps(_msgpack_trees(leaves)) | _msgpack_trees(leaves))
    if draw(st.integers(0, 3)) == 0:
        body = _map_header(1) + _packed("params") + body
    return body + draw(st.just(b"") | st.binary(max_size=3))


@_fuzz(EXAMPLES_MSGPACK_CRAFTED)
@given(data=_msgpack_files())
@example(data=b"\x91" * 200_000 + b"\x00")  # nesting that a recursive walker cannot follow
@example(data=b"\x81\xa1a" * 100_000 + b"\x00")
@example(data=_map_header(2**32 - 1) + _packed("a") + _packed(1))
@example(data=_map_header(1) + _packed("a") + _array_header(2**32 - 1) + b"\x00")
@example(data=_map_header(1) + _packed("a") + _bin(b"x", 2**32 - 1))
@example(data=_map_header(1) + _packed("a") + b"\xdb\xff\xff\xff\xffabc")
@example(data=_map_header(1) + _packed("a") + _ext(1, b"\x93" + _packed([-1, -4]) + _packed("float32")
                                                   + _bin(b"\0" * 16)))
@example(data=_map_header(1) + _packed("a") + _ext(1, b"\x93" + _packed([2**40, 0]) + _packed("float32")
                                                   + _bin(b"")))
@example(data=_map_header(1) + _packed("a") + _ext(1, b"\x93" + _packed([2.0]) + _packed("float32")
                                                   + _bin(b"\0" * 8)))
@example(data=_map_header(1) + _packed("a") + _ext(1, b"\x93" + _packed([2]) + _packed("O") + _bin(b"\0" * 16)))
@example(data=_map_header(1) + _packed("a") + _ext(1, b"\x93" + _packed([1]) + _packed("__class__")
                                                   + _bin(b"\0" * 8)))
@example(data=_map_header(1) + _packed("params") + _ext(1, b"\x93" + _packed([1]) + _packed("float32")
                                                        + _bin(b"\0" * 4)))
@example(data=_map_header(1) + _packed("a") + _ext(2, _packed(["1j"])))
@example(data=_map_header(1) + _packed("a") + _ext(2, _packed([[1], {"a": 1}])))
@example(data=_map_header(1) + _packed("a") + _ext(2, b"\x91" * 5000 + b"\x00"))
@example(data=_map_header(1) + _packed("a") + _array_header(2) + _packed([1]) + _packed([1, 2]))
@example(data=_map_header(1) + _packed(1) + _packed(1.0))
@example(data=_map_header(2) + _packed("a/b") + _packed(1) + _packed("a") + _map_header(1) + _packed("b")
         + _packed(2))
def test_crafted_msgpack_is_refused_or_read_whole(single_dir, data):
    _check_msgpack(single_dir, data)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch .bin


def _torch_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    embed = torch.randn(3, 2, generator=generator)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: one storage, two names
        "row": embed[1],  # a view at an offset into that storage
        "norm.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }


def _saved(state: dict, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Where data.pkl's bytes lie in a torch.save zip: the mutations aim there."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    return _record_span(data, info)


def _with_crcs_fixed(data: bytes) -> bytes:
    """The zip with each central directory CRC-32 recomputed: an edit of a record's bytes (of the same length)
    then reaches the readers behind the CRC check, as a deliberately crafted file would."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
    entry = out.find(b"PK\x01\x02")
    for info in entries:  # central directory records, in order: CRC-32 at +16
        start = _record_span(data, info)[0]
        out[entry + 16:entry + 20] = struct.pack("<I", zlib.crc32(data[start:start + info.compress_size]))
        entry = out.find(b"PK\x01\x02", entry + 4)
    return bytes(out)


def _record_span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


VALID_BIN = _saved(_torch_state())
VALID_BIN_LEGACY = _saved(_torch_state(), legacy=True)
PICKLE_TOKENS = (b"X\xff\xff\xff\xff", b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff", b"(" * 64, b"]" * 64, b"R",
                 b"K\xff", b"J\xff\xff\xff\x7f", b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f")


@st.composite
def _pickle_edits(draw) -> bytes:
    """VALID_BIN with its data.pkl edited in place (same length) and the CRCs made to match."""
    start, end = _pickle_span(VALID_BIN)
    pickled = bytearray(VALID_BIN[start:end])
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(pickled) - 1))
        patch = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(PICKLE_TOKENS)
                     | st.sampled_from(ABSURD_INTS).map(lambda v: (v % 2**32).to_bytes(4, "little")))
        pickled[pos:pos + len(patch)] = patch[:len(pickled) - pos]
    return _with_crcs_fixed(VALID_BIN[:start] + bytes(pickled) + VALID_BIN[end:])


BIN_FILES = st.one_of(_mutated(VALID_BIN, hot=_pickle_span(VALID_BIN), tokens=PICKLE_TOKENS),
                      _mutated(VALID_BIN_LEGACY, hot=(0, len(VALID_BIN_LEGACY) // 2), tokens=PICKLE_TOKENS),
                      _pickle_edits())


def _check_bin(directory: Path, data: bytes) -> tuple[Checkpoint, dict] | None:
    path = _only_weight_file(directory, "pytorch_model.bin", data)
    result = _refused_or_read_whole(directory, [path])
    if result is None:
        return None
    ckpt, arrays = result
    assert ckpt.format == "pytorch" and ckpt.weight_files == [path]
    # Only once ours accepted it: torch's own eager load allocates whatever the pickle claims.
    reference = torch.load(path, map_location="cpu", weights_only=True)
    _same_arrays(arrays, {k: torch_to_numpy(v) for k, v in reference.items()})
    return result


@_fuzz(EXAMPLES_BIN_MUTATED)
@given(data=BIN_FILES)
@example(data=VALID_BIN)
@example(data=VALID_BIN_LEGACY)
@example(data=VALID_BIN[:100])
@example(data=VALID_BIN_LEGACY[:-3])
@example(data=b"")
def test_mutated_bin_is_refused_or_read_whole(single_dir, data):
    _check_bin(single_dir, data)


class _CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bin_pickle_calling_os_system_is_refused(single_dir, tmp_path):
    marker = tmp_path / "pwned"
    data = _saved({"weight": torch.ones(2), "payload": _CallsSystem(marker)})
    assert b"system" in data  # the pickle really names os.system (posix.system)
    path = _only_weight_file(single_dir, "pytorch_model.bin", data)
    with pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    assert "refused" in message and "weights_only" in message and "system" in message, message
    assert not marker.exists()


def test_bin_view_claiming_more_than_the_file_is_refused(single_dir):
    """A stride-0 view of one float, 2**40 long: its storage fits in the file, a copy of it would not."""
    path = _only_weight_file(single_dir, "pytorch_model.bin", _saved({"huge": torch.zeros(1).expand(2**40)}))
    with _recorded_new_array() as requests, pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir).get("huge")
    assert str(error.value).startswith(f"{path}:") and "huge" in str(error.value), error.value
    assert requests == []


class _ClaimedStorage:
    """A stand-in that `_legacy_bin`'s pickler writes as a storage reference (a persistent id)."""


class _Tensor:
    def __init__(self, storage: _ClaimedStorage, numel: int):
        self.storage, self.numel = storage, numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, {})


def _legacy_bin(claimed: int, stored: int, stored_keys: tuple[str, ...] = ("0",)) -> bytes:
    """A legacy (pre-zip) torch.save file whose storage "0" claims `claimed` float32 elements, followed by
    `stored` elements of data for each of `stored_keys`."""
    from torch import serialization as ts

    buffer = io.BytesIO()
    for header in (ts.MAGIC_NUMBER, ts.PROTOCOL_VERSION, {"protocol_version": ts.PROTOCOL_VERSION,
                                                         "little_endian": True,
                                                         "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buffer, protocol=2)
    storage = _ClaimedStorage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return "storage", torch.FloatStorage, "0", "cpu", claimed, None
            return None

    Pickler(buffer, protocol=2).dump({"w": _Tensor(storage, min(claimed, 4))})
    pickle.dump(list(stored_keys), buffer, protocol=2)
    for _ in stored_keys:
        buffer.write(struct.pack("<q", stored) + b"\0" * 4 * stored)
    return buffer.getvalue()


def test_legacy_bin_is_read_and_one_claiming_more_storage_than_the_file_is_refused(single_dir):
    path = _only_weight_file(single_dir, "pytorch_model.bin", _legacy_bin(4, 4))
    # The hand-written format is right: torch and we read it.
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(4))
    assert np.array_equal(Checkpoint(single_dir).get("w"), np.zeros(4, np.float32))
    _replace(path, _legacy_bin(2**40, 4))
    with pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:") and "storage" in message, message


def test_legacy_bin_without_data_for_a_storage_is_refused(single_dir):
    """torch hands out a storage that no data was stored for uninitialised: whatever the heap held."""
    path = _only_weight_file(single_dir, "pytorch_model.bin", _legacy_bin(4, 0, stored_keys=()))
    assert torch.load(path, weights_only=True)["w"].shape == (4,)  # torch itself does not mind
    with pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:") and "no data for storage '0'" in message, message


def test_bin_storage_claiming_more_than_its_zip_record_is_refused(single_dir):
    """A memory-mapped load takes the claimed length from the mapping: the tensor would read the zip headers
    that follow its record."""
    data = bytearray(_saved({"w": torch.arange(4, dtype=torch.float32)}))
    numel = data.find(b"K\x04", data.find(b"cpuq"))  # the storage's element count, a BININT1 after its location
    assert numel > 0
    data[numel:numel + 2] = b"K\xff"
    path = _only_weight_file(single_dir, "pytorch_model.bin", _with_crcs_fixed(bytes(data)))
    assert torch.load(path, weights_only=True, mmap=True)["w"].shape == (4,)  # torch itself does not mind
    with pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    assert "storage '0' claims 1020 bytes, its record holds 16" in message, message


def test_bin_zip_entry_claiming_more_than_the_file_is_refused(single_dir):
    """A central directory entry whose uncompressed size is 2**32 - 1: torch would allocate that for data.pkl."""
    data = bytearray(VALID_BIN)
    entry, patched = data.find(b"PK\x01\x02"), 0
    while entry >= 0:  # a central directory record: uncompressed size at +24, name length at +28, name at +46
        (name_length,) = struct.unpack("<H", data[entry + 28:entry + 30])
        if data[entry + 46:entry + 46 + name_length].endswith(b"data.pkl"):
            data[entry + 24:entry + 28] = b"\xff\xff\xff\xff"
            patched += 1
        entry = data.find(b"PK\x01\x02", entry + 4)
    assert patched == 1
    path = _only_weight_file(single_dir, "pytorch_model.bin", bytes(data))
    with pytest.raises(CheckpointError) as error:
        Checkpoint(single_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    assert "zip entry 'archive/data.pkl' claims 4294967295 bytes" in message, message


# ---------------------------------------------------------------------------------------------------------------
# Sharded indexes

INDEX_KINDS = {
    "safetensors": ("model.safetensors.index.json", "model-{:05d}-of-00002.safetensors"),
    "pytorch": ("pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-00002.bin"),
    "flax": ("flax_model.msgpack.index.json", "flax_model-{:05d}-of-00002.msgpack"),
}


def _shard_bytes(kind: str, tensors: dict[str, np.ndarray]) -> bytes:
    if kind == "safetensors":
        return safetensors.numpy.save(tensors)
    if kind == "pytorch":
        return _saved({k: torch.from_numpy(v) for k, v in tensors.items()})
    return serialization.msgpack_serialize(traverse_util.unflatten_dict(tensors, sep="/"))


def _shard_layout(kind: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    sep = "/" if kind == "flax" else "."
    names = [sep.join(("decoder", "layers", str(i), "kernel" if kind == "flax" else "weight")) for i in range(4)]
    tensors = {name: rng.standard_normal((2, 2)).astype(np.float32) for name in names}
    return [dict(list(tensors.items())[:2]), dict(list(tensors.items())[2:])]


def _weight_map(kind: str) -> dict[str, str]:
    """The right weight map for `_shard_layout(kind)`: key -> shard file name."""
    shard = INDEX_KINDS[kind][1]
    return {k: shard.format(i) for i, tensors in enumerate(_shard_layout(kind), start=1) for k in tensors}


@pytest.fixture(scope="module")
def index_dirs(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint directory per index kind: two valid shards; beside it, valid shards it must not reach."""
    root = tmp_path_factory.mktemp("fuzz_index")
    out = {}
    for kind, (index_name, shard_name) in INDEX_KINDS.items():
        directory, outside = root / kind, root / f"{kind}-outside"
        directory.mkdir()
        outside.mkdir()
        (directory / "config.json").write_text("{}")
        for i, tensors in enumerate(_shard_layout(kind), start=1):
            data = _shard_bytes(kind, tensors)
            (directory / shard_name.format(i)).write_bytes(data)
            (outside / shard_name.format(i)).write_bytes(data)
        suffix = shard_name.rsplit(".", 1)[1]
        (directory / f"link-out.{suffix}").symlink_to(outside / shard_name.format(1))
        (directory / f"link-in.{suffix}").symlink_to(shard_name.format(1))
        out[kind] = directory
    return out


def _escapes(kind: str, directory: Path) -> list[str]:
    shard = INDEX_KINDS[kind][1].format(1)
    suffix = shard.rsplit(".", 1)[1]
    return [f"../{kind}-outside/{shard}", str(directory.parent / f"{kind}-outside" / shard),
            f"./../{kind}-outside/{shard}", f"sub/../../{kind}-outside/{shard}", f"link-out.{suffix}"]


def _weight_map_values(kind: str) -> st.SearchStrategy:
    shard = INDEX_KINDS[kind][1]
    suffix = shard.rsplit(".", 1)[1]
    inside = [shard.format(1), shard.format(2), f"./{shard.format(2)}", f"link-in.{suffix}"]
    odd = ["", ".", "/", "..", "a\x00b", f"missing.{suffix}", "config.json", INDEX_KINDS[kind][0], "\\..\\x"]
    return st.one_of(st.sampled_from(inside), st.sampled_from(odd), st.sampled_from(range(5)).map(
        lambda i: f"<escape {i}>"), JSON_VALUES)


@st.composite
def _index_documents(draw, kind: str) -> object:
    keys = list(_weight_map(kind))
    weight_map = _weight_map(kind) if draw(st.booleans()) else {}
    edits = draw(st.lists(st.tuples(st.sampled_from(keys) | st.text(max_size=3), _weight_map_values(kind)),
                          max_size=3))
    weight_map.update(edits)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2)):
        weight_map.pop(key, None)
    shape = draw(st.sampled_from(["map", "map", "map", "no weight_map", "other weight_map", "other index"]))
    if shape == "map":
        return {"metadata": {"total_size": 64}, "weight_map": weight_map}
    if shape == "no weight_map":
        return {"metadata": draw(JSON_VALUES)}
    if shape == "other weight_map":
        return {"weight_map": draw(JSON_VALUES)}
    return draw(JSON_VALUES)


def _resolve_escapes(document: object, kind: str, directory: Path) -> object:
    """The `<escape i>` placeholders drawn by the strategy, made into real paths out of `directory`."""
    escapes = _escapes(kind, directory)
    if isinstance(document, dict) and isinstance(document.get("weight_map"), dict):
        return {**document, "weight_map": {
            k: escapes[int(v[8])] if isinstance(v, str) and v.startswith("<escape ") else v
            for k, v in document["weight_map"].items()}}
    return document


def _check_index(directory: Path, kind: str, text: bytes) -> tuple[Checkpoint, dict] | None:
    index_path = directory / INDEX_KINDS[kind][0]
    _replace(index_path, text)
    named = [index_path, directory / "config.json"] + sorted(p for p in directory.iterdir() if p.is_file())
    result = _refused_or_read_whole(directory, named)
    if result is not None:
        ckpt = result[0]
        root = directory.resolve()
        assert all(p.resolve().is_relative_to(root) for p in ckpt.weight_files), ckpt.weight_files
    return result


@_fuzz(EXAMPLES_INDEX_CRAFTED)
@given(case=st.sampled_from(sorted(INDEX_KINDS)).flatmap(lambda kind: st.tuples(st.just(kind),
                                                                                _index_documents(kind))))
def test_crafted_shard_index_is_refused_or_read_whole(index_dirs, case):
    kind, document = case
    directory = index_dirs[kind]
    document = _resolve_escapes(document, kind, directory)
    result = _check_index(directory, kind, json.dumps(document).encode())
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    escapes = _escapes(kind, directory)
    if isinstance(weight_map, dict) and any(isinstance(v, str) and v in escapes for v in weight_map.values()):
        assert result is None, f"{weight_map} reaches out of {directory}"
    if result is not None:
        ckpt, _ = result
        assert isinstance(weight_map, dict) and weight_map
        for key, shard in weight_map.items():  # every key the index lists is in the shard it names
            assert key in ckpt and ckpt.info(key).file == directory / shard, (key, shard)


@pytest.mark.parametrize("kind", sorted(INDEX_KINDS))
@pytest.mark.parametrize("escape", range(5), ids=["dotdot", "absolute", "dot-dotdot", "sub-dotdot", "symlink"])
def test_weight_map_escaping_the_directory_is_refused_naming_the_index(index_dirs, kind, escape):
    directory = index_dirs[kind]
    index_name = INDEX_KINDS[kind][0]
    layout = _weight_map(kind)
    assert _check_index(directory, kind, json.dumps({"weight_map": layout}).encode()) is not None
    first = next(iter(layout))
    layout[first] = _escapes(kind, directory)[escape]  # a valid shard, but outside the directory
    _replace(directory / index_name, json.dumps({"weight_map": layout}).encode())
    with pytest.raises(CheckpointError) as error:
        Checkpoint(directory)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{directory / index_name}:"), message


@pytest.mark.parametrize("weight_map", [["a"], "model.safetensors", {"w": 3}, {"w": None}, {"w": ["x"]}, {}],
                         ids=["list", "string", "int-value", "null-value", "list-value", "empty"])
def test_malformed_weight_map_is_refused_naming_the_index(index_dirs, weight_map):
    directory = index_dirs["safetensors"]
    index_path = directory / INDEX_KINDS["safetensors"][0]
    _replace(index_path, json.dumps({"weight_map": weight_map}).encode())
    with pytest.raises(CheckpointError) as error:
        Checkpoint(directory)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{index_path}:"), message


def test_key_listed_in_the_index_but_absent_from_its_shard_is_refused(index_dirs):
    directory = index_dirs["safetensors"]
    index_name, shard = INDEX_KINDS["safetensors"]
    layout = _weight_map("safetensors")
    first = next(iter(layout))
    for wrong in ({**layout, "not.in.any.shard": shard.format(1)}, {**layout, first: shard.format(2)}):
        _replace(directory / index_name, json.dumps({"weight_map": wrong}).encode())
        with pytest.raises(CheckpointError) as error:
            Checkpoint(directory)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{directory / index_name}:"), message


def _valid_index(kind: str) -> bytes:
    return json.dumps({"metadata": {"total_size": 64}, "weight_map": _weight_map(kind)}, indent=2).encode()


INDEX_TOKENS = (b"../", b"/etc/passwd", b"\\u0000", b"[[[[[[[[", b"1e999", b"9" * 5000)


@_fuzz(EXAMPLES_INDEX_MUTATED)
@given(case=st.sampled_from(sorted(INDEX_KINDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), _mutated(_valid_index(kind), tokens=INDEX_TOKENS))))
@example(case=("safetensors", b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
@example(case=("flax", b'{"weight_map": {"a": "x"}, "metadata": ' + b"9" * 5000 + b"}"))
@example(case=("pytorch", _valid_index("pytorch")))
def test_mutated_shard_index_is_refused_or_read_whole(index_dirs, case):
    kind, text = case
    _check_index(index_dirs[kind], kind, text)


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_read(tmp_path):
    """huggingface_hub's cache links snapshot files to ../../blobs: those shards are not escapes."""
    repo = tmp_path / "models--owner--name"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (snapshot / "config.json").write_text("{}")
    shard = INDEX_KINDS["safetensors"][1]
    layout = {}
    for i, tensors in enumerate(_shard_layout("safetensors"), start=1):
        (blobs / f"blob{i}").write_bytes(_shard_bytes("safetensors", tensors))
        (snapshot / shard.format(i)).symlink_to(os.path.relpath(blobs / f"blob{i}", snapshot))
        layout.update({k: shard.format(i) for k in tensors})
    (snapshot / INDEX_KINDS["safetensors"][0]).write_text(json.dumps({"weight_map": layout}))
    ckpt = Checkpoint(snapshot)
    expected = {k: v for shard_tensors in _shard_layout("safetensors") for k, v in shard_tensors.items()}
    _same_arrays({k: ckpt.get(k) for k in ckpt.keys()}, expected)
    # ...but a link that leaves the repository's blobs is still an escape.
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes((blobs / "blob1").read_bytes())
    (snapshot / shard.format(1)).unlink()
    (snapshot / shard.format(1)).symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=re.escape(str(snapshot / INDEX_KINDS["safetensors"][0]))):
        Checkpoint(snapshot)


# ---------------------------------------------------------------------------------------------------------------


def test_valid_base_files_read_bit_exactly_under_the_guards(single_dir, index_dirs):
    """The starting points of the fuzzing are accepted and read exactly: the fuzz cases are not all refusals."""
    assert _check_safetensors(single_dir, VALID_SAFETENSORS) is not None
    for data in (VALID_MSGPACK, VALID_MSGPACK_CHUNKED):
        _, arrays = _check_msgpack(single_dir, data)
        _same_arrays(arrays, traverse_util.flatten_dict(_flax_tree()["params"], sep="/"))
    for data in (VALID_BIN, VALID_BIN_LEGACY):
        _, arrays = _check_bin(single_dir, data)
        _same_arrays(arrays, {k: torch_to_numpy(v) for k, v in _torch_state().items()})
    for kind, directory in index_dirs.items():
        _, arrays = _check_index(directory, kind, _valid_index(kind))
        _same_arrays(arrays, {k: v for shard in _shard_layout(kind) for k, v in shard.items()})


def test_docstring_quotes_the_example_counts():
    """The counts the module docstring (and the README) quote are the ones hypothesis runs."""
    doc = __doc__ or ""
    for test, constant in EXAMPLES_BY_TEST.items():
        value = globals()[constant]
        assert globals()[test]._hypothesis_internal_use_settings.max_examples == value, test
        assert re.search(rf"{test}\s+{constant} = {value}\n", doc), test
    assert sum(globals()[c] for c in EXAMPLES_BY_TEST.values()) == EXAMPLES_TOTAL
    assert re.search(rf"\b{EXAMPLES_TOTAL} examples in all\s+\(EXAMPLES_TOTAL\)", doc)
    per_reader = dict(re.findall(r"(safetensors|Flax msgpack|PyTorch \.bin|shard indexes) (\d+)", doc))
    assert {k: int(v) for k, v in per_reader.items()} == {
        "safetensors": EXAMPLES_SAFETENSORS_MUTATED + EXAMPLES_SAFETENSORS_CRAFTED,
        "Flax msgpack": EXAMPLES_MSGPACK_MUTATED + EXAMPLES_MSGPACK_CRAFTED,
        "PyTorch .bin": EXAMPLES_BIN_MUTATED,
        "shard indexes": EXAMPLES_INDEX_CRAFTED + EXAMPLES_INDEX_MUTATED,
    }, per_reader


EXAMPLES_BY_TEST = {
    "test_mutated_safetensors_is_refused_or_read_whole": "EXAMPLES_SAFETENSORS_MUTATED",
    "test_crafted_safetensors_header_is_refused_or_read_whole": "EXAMPLES_SAFETENSORS_CRAFTED",
    "test_mutated_msgpack_is_refused_or_read_whole": "EXAMPLES_MSGPACK_MUTATED",
    "test_crafted_msgpack_is_refused_or_read_whole": "EXAMPLES_MSGPACK_CRAFTED",
    "test_mutated_bin_is_refused_or_read_whole": "EXAMPLES_BIN_MUTATED",
    "test_crafted_shard_index_is_refused_or_read_whole": "EXAMPLES_INDEX_CRAFTED",
    "test_mutated_shard_index_is_refused_or_read_whole": "EXAMPLES_INDEX_MUTATED",
}
