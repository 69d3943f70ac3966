"""`convert.xla_settings`: which training steps run with XLA ordering their programs for memory, that a user's own
setting stands, and that `convert.finetune` applies the order, as a command, where it should. What the order saves
is a benchmark figure (`python scripts/bench_train.py --memory-only --xla-order memory|default`): on the tiny
fixtures the programs' peaks do not move."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.xla_settings import FLAG, memory_ordered, order_for_memory

REPO = Path(__file__).resolve().parent.parent


def test_scanned_or_bfloat16_steps_are_ordered_for_memory():
    assert memory_ordered(True, "float32") and memory_ordered(False, "bfloat16") and memory_ordered(True, "bfloat16")
    assert not memory_ordered(False, "float32")


def test_a_users_own_setting_stands(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FLAG}=true")
    assert order_for_memory() is False
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}=true"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert order_for_memory() is True
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}=false"


@pytest.mark.parametrize(("flags", "ordered"), [(["--scan-layers"], True), (["--dtype", "bfloat16"], True), ([], False)])
def test_the_finetune_command_orders_for_memory_before_it_runs(tmp_path, flags, ordered):
    # The command's entry point as `python -m convert.finetune ...` runs it (it stops at its inputs' check: no
    # evaluation manifest); then the environment its process is left with.
    argv = ["convert.finetune", "--model", str(tmp_path / "missing"), "--train", str(tmp_path / "t.jsonl"),
            "--output", str(tmp_path / "out"), *flags]
    code = (f"import os, runpy, sys\nsys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('convert.finetune', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint(repr(os.environ.get('XLA_FLAGS', '')))")
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[-2] == "exit 2" and done.stderr.startswith("error: eval:"), (done.stdout, done.stderr[-500:])
    assert lines[-1] == (repr(f"{FLAG}=false") if ordered else "''"), lines
