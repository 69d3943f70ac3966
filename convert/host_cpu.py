"""What the host CPU is and whether it computes in bfloat16, from its flags in `/proc/cpuinfo`.

A bfloat16 training step multiplies bfloat16 operands with float32 sums, which XLA:CPU runs on the CPU's bfloat16
instructions where it has them (Intel AMX, AVX512_BF16 on Intel and AMD Zen 4) and emulates elsewhere, slower than
its float32 products (AVX2, e.g. an AMD Zen 3 host: 97 against 155 GFLOP/s for a [1996, 768] x [768, 3072]
product; `python scripts/bench_matmul.py`). Without those instructions the step computes its products upcast to
float32 (`flax_model.layers.set_bfloat16_products`: the same numbers up to the order of the sums).
"""

from __future__ import annotations

import dataclasses
import platform

from convert.base.errors import bad_argument

CPUINFO = "/proc/cpuinfo"
# The flags that name bfloat16 arithmetic, per architecture (`platform.machine()` on Linux, the only system with
# /proc/cpuinfo): x86's AMX tiles and AVX-512 dot products, Arm's BF16 extension (BFDOT, BFMMLA).
BFLOAT16_FLAGS = {"x86_64": ("amx_bf16", "avx512_bf16"), "aarch64": ("bf16",)}
CHOICES = ("auto", "native", "upcast")


def cpuinfo_lines(fields: tuple[str, ...] = ("model name", "flags", "Features")) -> list[str]:
    """The distinct lines of `/proc/cpuinfo` whose field is one of `fields` (empty where it cannot be read: not
    Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            return sorted({line for line in f if line.split(":")[0].strip() in fields})
    except OSError:
        return []


def cpu_flags() -> frozenset[str] | None:
    """The flags every processor has (x86's `flags`, Arm's `Features`); None where `/proc/cpuinfo` gives none."""
    sets = [frozenset(line.split(":", 1)[1].split()) for line in cpuinfo_lines(("flags", "Features"))]
    return frozenset.intersection(*sets) if sets else None


def has_bfloat16_arithmetic(flags: frozenset[str] | None = None, machine: str | None = None) -> bool | None:
    """Whether the CPU has bfloat16 arithmetic by its flags (`cpu_flags()` by default); None where that is not
    known (no flags read, or an architecture without an entry in `BFLOAT16_FLAGS`)."""
    flags = cpu_flags() if flags is None else flags
    names = BFLOAT16_FLAGS.get(machine or platform.machine())
    if flags is None or names is None:
        return None
    return any(name in flags for name in names)


@dataclasses.dataclass(frozen=True)
class Bfloat16Products:
    """How a bfloat16 step computes its products (`flax_model.layers.NATIVE` or `UPCAST`), and why."""

    form: str
    reason: str


def bfloat16_products(choice: str = "auto", *, platform_name: str = "cpu", param: str = "bfloat16_products",
                      flags: frozenset[str] | None = None, machine: str | None = None) -> Bfloat16Products:
    """The form of bfloat16 products for `choice` ("auto": by the device and the CPU's flags; "native", "upcast":
    as asked). An accelerator (`platform_name` other than "cpu") and a CPU whose flags are unknown keep the native
    form. A choice not in `CHOICES` is a usage error naming `param`."""
    if choice not in CHOICES:
        raise bad_argument(param, choice, f"is not one of {', '.join(CHOICES)}")
    if choice != "auto":
        return Bfloat16Products(choice, "as asked")
    if platform_name != "cpu":
        return Bfloat16Products("native", f"the {platform_name} device multiplies bfloat16")
    machine = machine or platform.machine()
    flags = cpu_flags() if flags is None else flags
    known = has_bfloat16_arithmetic(flags, machine)
    if known is None:
        return Bfloat16Products("native", "this CPU's bfloat16 arithmetic is not known from its flags")
    names = BFLOAT16_FLAGS[machine]
    if known:
        present = ", ".join(name for name in names if name in flags)
        return Bfloat16Products("native", f"this CPU has bfloat16 arithmetic: {present}")
    return Bfloat16Products("upcast", f"this CPU has no bfloat16 arithmetic: no {' or '.join(names)} flag")
