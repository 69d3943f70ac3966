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
# XLA's CPU code generation without its MLIR fusion emitters: for these tiny models it compiles about 2.5x faster
# (a composed pair's gradient 3.2 CPU-seconds instead of 8.2), compilation being the suite's largest cost. Results
# differ from the default emitters' by rounding only (reductions summed in another order; docs/test_suite.md).
# The tests marked `default_emitters` keep XLA's defaults, as users run them: the run leaves them out and
# test_default_emitters.py runs them in a pytest process of their own with PARITY_DEFAULT_EMITTERS=1, which also
# runs any test (all of them, without `-m`) with the defaults. Processes the tests start inherit the setting.
DEFAULT_EMITTERS = os.environ.get("PARITY_DEFAULT_EMITTERS") == "1"
if not DEFAULT_EMITTERS and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# Commands that keep a cache in the user's cache directory (convert.finetune's compiled programs) keep it in a
# directory of this process's own, removed at its end: the tests write nothing into the home directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="parity-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from scripts import make_fixtures  # noqa: E402

# Modules whose tests take 10-40 s each (training runs, several processes) and the default-emitters group: run
# first, so that the two workers do not end with one of them still in such a test while the other waits
# (pytest-xdist's worksteal balances the short tests that follow).
LONG_MODULES = ("test_default_emitters.py", "test_multiprocess.py", "test_mesh_training.py", "test_finetune.py",
                "test_ctc.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "default_emitters: runs with XLA's default CPU code generation, in the "
                                       "pytest process test_default_emitters.py starts (float32 equalities of two "
                                       "compiled programs, goldens recorded with the defaults, what users run)")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Long modules first; the `default_emitters` tests only where the defaults are on, and their runner only where
    they are not."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: the rest keep their order
    runner = lambda item: item.path.name == "test_default_emitters.py"
    marked = lambda item: item.get_closest_marker("default_emitters") is not None
    leave_out = runner if DEFAULT_EMITTERS else marked
    kept = [item for item in items if not leave_out(item)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if leave_out(item)])
        items[:] = kept


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


@pytest.fixture(params=["native", "upcast"])
def bfloat16_form(request: pytest.FixtureRequest) -> str:
    """Each form of bfloat16 products (`flax_model.layers.set_bfloat16_products`), set for the test's traces and
    restored after it."""
    from flax_model.layers import bfloat16_products_as

    with bfloat16_products_as(request.param):
        yield request.param
