"""What the bad-input tests compare before and after a run: each input file's SHA-256, and a listing of a tree.

Hashing every file of a workspace twice per case cost the bad-input catalogues most of their time (~800 files,
142 cases). A digest is kept with the file's identity and times (device, inode, size, mtime, ctime) and reused
while they are unchanged: any write moves ctime, which no call can set back. A file whose ctime was within a
second of the hashing is hashed again every time, since a write in the same clock tick could leave its times
as they were.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

_SAME_TICK_NS = 1_000_000_000
_digests: dict[str, tuple[tuple[int, ...], int, str]] = {}


def sha256(path: Path) -> str:
    key = str(path)
    st = os.stat(key)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _digests.get(key)
    if cached is not None and cached[0] == identity and st.st_ctime_ns < cached[1] - _SAME_TICK_NS:
        return cached[2]
    hashed_at = time.time_ns()
    with open(key, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    _digests[key] = (identity, hashed_at, digest)
    return digest


def listing(root: Path, directory_times: bool = True) -> dict[str, tuple]:
    """Every path under `root` (links not followed) with its kind, size, modification time and link target.
    `directory_times=False`: a directory's size and time are left out (they move when a run's exclusive claim
    beside an output comes and goes, leaving nothing)."""
    out = {}
    base = len(str(root)) + 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            timed = directory_times or not stat.S_ISDIR(st.st_mode)
            out[path[base:]] = (st.st_mode >> 12, st.st_size if timed else None, st.st_mtime_ns if timed else None,
                                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
    return out
