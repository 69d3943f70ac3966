"""A sha256 manifest of a directory's files, written when the directory is complete and checked before it is read.

Training checkpoints (orbax) carry no checksum of their data: a flipped byte in a data file restores silently as
another weight. `write_manifest` records every file's size and sha256 next to them (`MANIFEST`, written to a
temporary name and renamed); `check_manifest` refuses a directory whose files differ from it in any way (a file
changed, truncated, missing or added), naming the file, before anything in it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from convert.base.errors import CheckpointError

MANIFEST = "sha256_manifest.json"
_CHUNK = 1 << 20


def _files(directory: Path) -> list[str]:
    """Every file below `directory` but the manifest, as sorted `/`-joined relative paths (links not followed)."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            relative = (Path(root) / name).relative_to(directory).as_posix()
            if relative != MANIFEST:
                out.append(relative)
    return sorted(out)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Records the size and sha256 of every file below `directory` in `directory/MANIFEST` (atomically).

    Raises:
        OSError: the manifest cannot be written (the caller names the directory).
    """
    directory = Path(directory)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in _files(directory)}
    target = directory / MANIFEST
    temporary = directory / f".{MANIFEST}.tmp"
    try:
        with temporary.open("w") as f:
            json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def check_manifest(directory: str | Path) -> int:
    """Refuses `directory` unless its files are exactly those its manifest lists, with the same sizes and sha256.

    Returns:
        The number of files checked.

    Raises:
        CheckpointError: `DIRECTORY: ...` naming the manifest's problem or the first file that differs.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (the checkpoint was not completely saved, or not by this "
                              "toolkit): its data cannot be verified")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and type(v.get("bytes")) is int and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{directory}: {MANIFEST} is corrupt: the checkpoint cannot be verified") from None
    present = _files(directory)
    extra = sorted(set(present) - set(files))
    missing = sorted(set(files) - set(present))
    if missing:
        raise CheckpointError(f"{directory}: {missing[0]} is missing ({len(missing)} file(s) listed in {MANIFEST} "
                              "are gone): the checkpoint is incomplete")
    if extra:
        raise CheckpointError(f"{directory}: {extra[0]} was not there when the checkpoint was saved "
                              f"({len(extra)} file(s) not in {MANIFEST})")
    for name in present:
        expected, file = files[name], directory / name
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{directory}: {name} holds {size} bytes, {expected['bytes']} when saved: the "
                                  "checkpoint is corrupt")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{directory}: {name} differs from its sha256 at save: the checkpoint is corrupt")
    return len(present)
