"""Writes the tiny, seeded Hugging Face-format checkpoints that the tests and the built-in sources use.

    python scripts/make_fixtures.py OUTDIR [--only NAME ...]

Every case is built from `torch_reference` with a fixed seed, so the same command writes the same bytes. The
cases are those of every registered architecture's fixture module (`ArchSpec.fixtures`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib  # noqa: E402

from convert.base.registry import SPECS  # noqa: E402


def cases_by_arch() -> dict[str, dict[str, Callable[[Path], object]]]:
    """Every registered architecture's fixture cases: {spec name: {case name: builder}}."""
    return {spec.name: importlib.import_module(spec.fixtures).CASES for spec in SPECS}


def in_heavy_pairs(encoder: str, decoder: str) -> bool:
    """Whether the encoder and decoder architectures (spec names) are paired in the heavy generic tests
    (`parity_tests/test_pairs.py`, `test_training.py`): all of them, unless the decoder's fixture module names the
    encoders it pairs with there (`HEAVY_ENCODERS`, possibly none); such a decoder composes with every encoder in a
    cheap test of its own."""
    from convert.base.registry import BY_NAME

    chosen = getattr(importlib.import_module(BY_NAME[decoder].fixtures), "HEAVY_ENCODERS", None)
    return chosen is None or encoder in chosen


CASES: dict[str, Callable[[Path], object]] = {name: build for cases in cases_by_arch().values()
                                              for name, build in cases.items()}


def build(name: str, root: str | Path) -> Path:
    """Builds case `name` under `root` (once; an existing directory is reused) and returns its path."""
    if name not in CASES:
        raise KeyError(f"unknown fixture {name!r} (known: {', '.join(sorted(CASES))})")
    directory = Path(root) / name
    if not (directory / "config.json").exists():
        CASES[name](directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="build only these cases")
    args = parser.parse_args(argv)
    for name in args.only or sorted(CASES):
        print(build(name, args.outdir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
