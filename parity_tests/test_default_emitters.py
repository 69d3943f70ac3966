"""The tests marked `default_emitters`, with XLA's default CPU code generation: the run compiles with XLA's legacy
CPU emitters (conftest.py) and leaves these out; this test runs them in a pytest process of its own with
PARITY_DEFAULT_EMITTERS=1 (one process: the two workers keep the rest of the suite)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_emitter_tests_pass_with_xlas_defaults():
    env = {**os.environ, "PARITY_DEFAULT_EMITTERS": "1"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_cpu_use_fusion_emitters" not in f)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                             "-m", "default_emitters", "parity_tests"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 4 and "skipped" not in summary, summary
