"""The XLA setting a training command starts with: its programs ordered for memory rather than concurrency.

XLA:CPU orders each compiled program by default so that independent operations can run at once. In the scanned
training step's gradient that put the zero-filled buffers of the stacked residuals and gradients before the frozen
feature encoder, whose full-rate activations were then live beside them: the program's peak. Ordered for memory
(`--xla_cpu_enable_concurrency_optimized_scheduler=false`), XLA's temporaries for wav2vec2-base + BART-base
(`python scripts/bench_train.py --memory-only --xla-order ...`) at 4 x 10 s and 8 x 15 s: scan + bfloat16 1.98 ->
1.32 GB and 5.50 -> 4.68 GB, bfloat16 1.49 -> 1.26 and 4.47 -> 4.34, scan 2.73 -> 2.62, scan + remat 0.53 -> 0.46,
at the same step time; but float32 unrolled 2.26 -> 2.29 and 7.62 -> 8.21, remat 0.58 -> 0.60. So the order
applies to scanned or bfloat16 steps (`memory_ordered`). XLA reads the flag from `XLA_FLAGS` once, when JAX starts
its backend, and not as a per-program compiler option: the setting is process-wide and must come first.
`convert.finetune` applies it when run as a command with `--scan-layers` or `--dtype bfloat16`; scripts that
train through `flax_model.training` can call `order_for_memory()` before their first JAX computation, or set the
flag in `XLA_FLAGS` themselves.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
FIRST_JAXLIB = (0, 10)  # the release it was measured with; XLA stops at a flag it does not know


def _jaxlib_version() -> tuple[int, ...]:
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def memory_ordered(scan_layers: bool, dtype: str) -> bool:
    """Whether a training step of these settings runs with its programs ordered for memory (the figures above)."""
    return scan_layers or dtype == "bfloat16"


def order_for_memory() -> bool:
    """Adds `FLAG=false` to this process's `XLA_FLAGS`; True if added. Leaves `XLA_FLAGS` as it is (False) where it
    already names the flag (the user's choice stands) or where jaxlib is older than `FIRST_JAXLIB`. Takes effect
    only if JAX has not started its backend yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or _jaxlib_version() < FIRST_JAXLIB:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}=false".strip()
    return True
