"""Keeps glibc's allocator from returning a training step's large buffers to the kernel between steps.

Each execution of a compiled XLA:CPU program allocates its temporaries (4.3 GB for a wav2vec2-base + BART-base
step on 4 x 10 s) and frees them when it ends. glibc serves any block over 32 MB with a fresh `mmap` and gives it
back with `munmap`, and every thread that XLA runs on has an arena of its own that cannot hold such a block, so
each step maps its buffers anew: every first touch of a 4 KiB page is a page fault, and the kernel zeroes the
page. Measured (`python scripts/bench_train.py`): 1.5 million faults and 4.2 CPU-seconds in the kernel per step.

`keep_freed_memory()` sets three of glibc's `mallopt` parameters: one arena for every thread (`M_ARENA_MAX` 1),
no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming of the heap's top (`M_TRIM_THRESHOLD` -1). Large
blocks then come from the heap, and a freed block is reused by the next step's allocation of the same size
without faults. The process keeps the memory it has used at its peak (its peak resident size is unchanged: the
step's peak is the same buffers). It must run before JAX starts its backend: threads that have an arena keep it.
`convert.finetune` calls it when run as a command; scripts that train through `flax_model.training` can call it
first thing. The same settings, for any program: `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=<bytes>` in the environment it starts with.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))


def keep_freed_memory() -> bool:
    """Applies the settings above to this process; True if glibc took all three. Does nothing (False) off Linux,
    with a C library that has no `mallopt` (musl), or where the environment already sets glibc's malloc tunables
    (`GLIBC_TUNABLES` naming `glibc.malloc.`): the user's choice stands."""
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    # glibc only (`gnu_get_libc_version`): musl's mallopt ignores the parameters
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(parameter, value) == 1 for parameter, value in SETTINGS])
