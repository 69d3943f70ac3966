"""Checkpoint reading: one module per weight format (`safetensors_reader`, `torch_bin_reader`, `msgpack_reader`),
what they share (`tensors`), and the directory that picks one and follows shard indexes (`directory`)."""

from convert.base.checkpoint.directory import (
    CONFIG,
    FLAX_FIRST,
    FLAX_MSGPACK,
    FLAX_MSGPACK_INDEX,
    PYTORCH_BIN,
    PYTORCH_BIN_INDEX,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    WEIGHT_FILES,
    Checkpoint,
    file_size,
    open_checkpoint,
    read_json,
)
from convert.base.checkpoint.tensors import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, TensorInfo, new_array
from convert.base.checkpoint.torch_bin_reader import numpy_to_torch, torch_to_numpy

__all__ = [
    "CONFIG", "DTYPE_TO_SAFETENSORS", "FLAX_FIRST", "FLAX_MSGPACK", "FLAX_MSGPACK_INDEX", "PYTORCH_BIN",
    "PYTORCH_BIN_INDEX", "SAFETENSORS", "SAFETENSORS_DTYPES", "SAFETENSORS_INDEX", "WEIGHT_FILES", "Checkpoint",
    "TensorInfo", "file_size", "new_array", "numpy_to_torch", "open_checkpoint", "read_json", "torch_to_numpy",
]
