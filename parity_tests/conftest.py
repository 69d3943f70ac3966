"""Shared test fixtures: tiny seeded checkpoints generated once per test session."""

from __future__ import annotations

import functools
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

import jax
import pytest

# Programs compiled with `jax.jit` in the test processes use XLA's CPU code generation without its MLIR fusion
# emitters: for these tiny models it compiles about 2.5x faster (a composed pair's gradient 3.2 CPU-seconds instead
# of 8.2), the suite's largest cost. The results differ from the default emitters' by rounding only (reductions
# are summed in another order); docs/test_suite.md has the figures. What stays on XLA's default code generation:
# operations run one by one (the transformers and pre-core goldens compare those), the commands the tests start
# as processes (the CLI verification and check tests), the tests marked `default_emitters` (those comparing two
# compiled float32 programs for equality to the last bits), and every test with PARITY_DEFAULT_EMITTERS=1 set.
LEGACY_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
_plain_jit = jax.jit
_default_emitters = os.environ.get("PARITY_DEFAULT_EMITTERS") == "1"
_marked_default = False


class _Jit:
    """What `jax.jit(fun, **options)` gives in the test processes: called at the top level (no tracer among the
    arguments) it runs the program compiled with LEGACY_EMITTERS, unless the test keeps the defaults; called
    inside another transformation, the plain jit (XLA takes compiler options for top-level programs only)."""

    def __init__(self, fun, kwargs):
        self._plain = _plain_jit(fun, **kwargs)
        options = {**LEGACY_EMITTERS, **(kwargs.get("compiler_options") or {})}
        self._legacy = _plain_jit(fun, **{**kwargs, "compiler_options": options})

    def _target(self, args, kwargs):
        if _default_emitters or _marked_default:
            return self._plain
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return self._plain if traced else self._legacy

    def __call__(self, *args, **kwargs):
        return self._target(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._target(args, kwargs).lower(*args, **kwargs)

    def _cache_size(self) -> int:  # what convert.transcribe reports as compilations
        return self._plain._cache_size() + self._legacy._cache_size()

    def __getattr__(self, name):
        return getattr(self._plain, name)

    def __get__(self, instance, owner):  # a jitted method
        return self if instance is None else functools.partial(self, instance)


def _jit(fun=None, /, **kwargs):
    if fun is None:
        return lambda f: _Jit(f, dict(kwargs))
    return _Jit(fun, dict(kwargs))


_jit.__doc__ = _plain_jit.__doc__
jax.jit = _jit


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "default_emitters: the test's programs compile with XLA's default CPU code "
                                       "generation (it compares compiled float32 programs to the last bits)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures are set up: whether the programs they and the test compile keep the defaults."""
    global _marked_default
    _marked_default = item.get_closest_marker("default_emitters") is not None


from scripts import make_fixtures  # noqa: E402  (after jax.jit is replaced: modules jitting at import see it)


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
