"""`convert.allocator.keep_freed_memory`: a large block freed by one thread is reused by the next allocation
without page faults (what a training step's temporaries need), and `convert.finetune` applies it when run as a
command. Each check runs in a fresh process: the settings are process-wide and must precede other threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = 256 << 20  # bytes: beyond glibc's largest mmap threshold (32 MB), as XLA's temporaries are
PAGES = BLOCK // 4096

# Allocates, touches and frees BLOCK twice in a new thread (XLA runs its programs on threads of its own) and prints
# the minor page faults of the second round. PREPARE runs first.
PROBE = """
import ctypes, json, resource, sys, threading
{prepare}
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc({block})
        ctypes.memset(block, 1, {block})
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps({{"applied": applied, "second_round_faults": faults[1]}}))
"""


def _probe(prepare: str, env: dict[str, str] | None = None) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE.format(prepare=prepare, block=BLOCK)], capture_output=True,
                          text=True, cwd=REPO, env={**environment, **(env or {})}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


def test_a_freed_large_block_is_reused_without_page_faults():
    kept = _probe("from convert.allocator import keep_freed_memory\napplied = keep_freed_memory()")
    default = _probe("applied = None")
    assert kept["applied"] is True
    # Without the settings every page of the block faults again (the control: the probe can see the difference).
    assert default["second_round_faults"] >= PAGES // 2, default
    assert kept["second_round_faults"] <= PAGES // 100, (
        f"{kept['second_round_faults']} page faults re-allocating a freed {BLOCK >> 20} MB block (of {PAGES} pages)")


def test_tunables_in_the_environment_are_left_to_stand():
    got = _probe("from convert.allocator import keep_freed_memory\napplied = keep_freed_memory()",
                 env={"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert got["applied"] is False


def test_the_finetune_command_applies_it_before_it_runs():
    # The command's entry point as `python -m convert.finetune --help` runs it, then the probe in that process.
    prepare = ("import runpy\nsys.argv = ['convert.finetune', '--help']\n"
               "try:\n    runpy.run_module('convert.finetune', run_name='__main__')\nexcept SystemExit:\n    pass\n"
               "applied = True")
    got = _probe(prepare)
    assert got["second_round_faults"] <= PAGES // 100, got
