"""Shared test fixtures: tiny seeded checkpoints generated once per test session."""

from __future__ import annotations

import os
import sys

# Compiled bytecode is kept (in the __pycache__ folders git ignores) even where the environment says not to write
# it (PYTHONDONTWRITEBYTECODE): otherwise each worker, and each command a test starts as a process, compiles this
# repository's ~70 modules again (~1.3 s a process) and pytest rewrites every test file's asserts again.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Eight simulated CPU devices for the mesh tests (parity_tests/test_mesh.py), set before JAX starts its backend;
# every other test keeps running on the first device.
MESH_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={MESH_DEVICES}").strip()
# The tiny test models spend far longer compiling than running: XLA's CPU backend optimisations cost about a
# fifth of each compilation and buy nothing measurable at these sizes. (Tolerances are unchanged.)
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

from collections.abc import Callable
from pathlib import Path

import pytest

from scripts import make_fixtures


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def fixture_dir(fixtures_root: Path) -> Callable[[str], Path]:
    """`fixture_dir("name")` builds (once) and returns the directory of a checkpoint from make_fixtures."""
    return lambda name: make_fixtures.build(name, fixtures_root)


@pytest.fixture(scope="session")
def composed_dir(fixture_dir: Callable[[str], Path], fixtures_root: Path) -> Callable[..., Path]:
    """`composed_dir("w2v_group", "bart_cg", seed=0, dtype="float32")` composes two fixtures (once per session)
    with `convert.compose.compose` (verification off: tests check parity themselves)."""
    import io

    from convert.compose import compose

    def build(encoder: str, decoder: str, seed: int = 0, dtype: str = "float32") -> Path:
        out = fixtures_root / "composed" / f"{encoder}+{decoder}+{seed}+{dtype}"
        if not (out / "config.json").exists():
            compose(str(fixture_dir(encoder)), str(fixture_dir(decoder)), out, seed=seed, dtype=dtype,
                    verify=False, progress=False, log=io.StringIO())
        return out

    return build
