"""Shared test fixtures: tiny seeded checkpoints generated once per test session."""

from __future__ import annotations

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
