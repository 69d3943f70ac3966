"""JAX's persistent compilation cache for a command: where it lives, and turning it on for the command's length.

A training step's compiled program (XLA:CPU: 10-15 s for wav2vec2-base + BART-base unrolled) is written to the
cache and read back by the next run with the same model, settings and batch shapes (a resumed or repeated
run): ~3 s instead. The default directory is JAX's own `JAX_COMPILATION_CACHE_DIR` where set, else
`$XDG_CACHE_HOME/speech-encdec-flax/xla/<machine>` (`~/.cache` without XDG_CACHE_HOME). A CPU executable is
machine code for the CPU that compiled it, and JAX's cache key does not name the CPU's instruction sets, so the
default directory has one folder per kind of CPU: a home directory shared by different machines does not hand
one machine's code to another.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from convert.base.errors import bad_argument
from convert.host_cpu import cpuinfo_lines

_FLAG = "--compile-cache"


def machine_tag() -> str:
    """`<arch>-<12 hex digits>`: the architecture and a hash of the CPU's model name and feature flags."""
    identity = (platform.processor() or "") + "".join(cpuinfo_lines())
    return f"{platform.machine() or 'unknown'}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def default_directory() -> Path:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "speech-encdec-flax" / "xla" / machine_tag()


def usable_directory(directory: str | os.PathLike[str]) -> Path:
    """`directory` where it can hold the cache (JAX creates it at its first write), else a usage error naming
    `--compile-cache`; nothing is created here."""
    path = Path(directory).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise bad_argument(_FLAG, path, f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise bad_argument(_FLAG, path, f"{existing} is not writable")
    return path


@contextlib.contextmanager
def persistent_cache(directory: Path | None) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` while the block runs (None: JAX's setting as it is);
    JAX's previous setting is restored after it."""
    if directory is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()  # JAX decides whether to use a cache once per process, at its first compile
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
