"""How much memory the machine has, and refusing work that cannot fit in it before any of it is built.

The estimates themselves come from the models (`flax_model.memory`: the largest array a compiled function makes,
read from its traced program, plus the parameters it holds); this module compares them with what the machine
has: the physical memory (`os.sysconf`), or less when a cgroup limits this process (v1 or v2), or, when JAX
runs on an accelerator, that device's memory. `max_memory` (`--max-memory`) replaces the figure, e.g. to allow
for swap, or to keep a run well below the machine's size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from convert.base.errors import ConvertError, UsageError
from convert.base.writing import parse_size


class ResourceError(ConvertError):
    """The work asked for needs more memory than the machine (or `max_memory`) allows."""


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def parse_memory(value: str | int | None, param: str = "max_memory") -> int | None:
    """'64GB' / '500MiB' / a number of bytes -> bytes; None stays None (use what the machine has)."""
    if value is None:
        return None
    try:
        size = parse_size(value)
    except UsageError as e:
        raise UsageError(str(e).replace("max_shard_size", param).replace(" (0 means no sharding)", ""),
                         param=param) from None
    if not size:
        raise UsageError(f"{param}={value}: must be more than 0 bytes", param=param)
    return size


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`), if any."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    candidates = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        group = group.lstrip("/")
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / group / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / group / "memory.limit_in_bytes")
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "unlimited" 2**63 rounded to pages
            limits.append(int(text))
    return min(limits) if limits else None


def host_memory() -> int:
    """The physical memory, or the cgroup's limit when lower (bytes)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a run may use: `bytes`, and where the figure comes from (for the message)."""

    bytes: int
    source: str

    def describe(self) -> str:
        return f"{human_bytes(self.bytes)} {self.source}"


def memory_budget(max_memory: int | None = None, device_bytes: int | None = None) -> Budget:
    """The memory a run may use: `max_memory` when given, else the accelerator's (`device_bytes`, when JAX runs
    on one), else the host's."""
    if max_memory is not None:
        return Budget(max_memory, "allowed")
    if device_bytes:
        return Budget(device_bytes, "the accelerator has")
    limit = _cgroup_limit()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if limit and limit < total:
        return Budget(limit, "this process's cgroup allows")
    return Budget(total, "this machine has")


def refuse_if_too_large(needed: int, what: str, budget: Budget, hint: str = "", param: str | None = None) -> None:
    """Raises ResourceError(`what needs at least N of memory, more than the M this machine has (hint, or pass
    max_memory=... to try anyway)`) when the estimate exceeds the budget. `what` starts with the culprit (a file,
    a manifest line, or `param=value` when an argument is to blame, `param` then naming it)."""
    if needed > budget.bytes:
        advice = f"{hint}, or pass" if hint else "pass"
        raise ResourceError(f"{what} needs at least {human_bytes(needed)} of memory, more than the "
                            f"{budget.describe()} ({advice} max_memory=... to try anyway)", param=param)


def refuse_parameters_beyond(params_bytes: int, budget: Budget, model: str = "the model") -> None:
    """Refuses a model whose parameters alone exceed the budget (whatever the input, nothing could run)."""
    param = model.split("=", 1)[0] if "=" in model else None
    refuse_if_too_large(params_bytes, f"{model}: holding its parameters", budget, param=param)
