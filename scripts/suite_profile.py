"""Where the test suite's time goes: a pytest plugin that records, per test, its wall time and JAX's tracing,
lowering and XLA compilation seconds (jax.monitoring's duration events), and a summary of the records.

    python -m pytest -q -n 2 parity_tests -p scripts.suite_profile      # one JSON line per test, per worker,
                                                                        # in $SUITE_PROFILE_DIR (default /tmp/suite-profile)
    python scripts/suite_profile.py [DIR]                                # totals per file and the costliest tests

Compilations in processes a test starts (the CLI tests) are not seen: such tests show wall time without compile
time, and the CPU seconds of those processes (`children_cpu`); `cpu` is the test process's own (all its
threads). Findings: docs/test_suite.md.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import pytest

DIR = Path(os.environ.get("SUITE_PROFILE_DIR", "/tmp/suite-profile"))
EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "compile": "/jax/core/compile/backend_compile_duration"}

_totals: collections.Counter = collections.Counter()
_out = None


def _listener(event: str, duration: float, **_: object) -> None:
    _totals[event] += duration


def pytest_configure(config) -> None:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = dict(_totals)
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    yield
    _record(item, time.perf_counter() - start, before, time.process_time() - cpu, _children_cpu() - children)


def _children_cpu() -> float:
    """CPU seconds of the child processes this worker has waited for (the commands the CLI tests run)."""
    t = os.times()
    return t.children_user + t.children_system


def _record(item, wall: float, before: dict[str, float], cpu: float, children: float) -> None:
    global _out
    if _out is None:
        DIR.mkdir(parents=True, exist_ok=True)
        _out = (DIR / f"worker-{os.getpid()}.jsonl").open("a")
    row = {"test": item.nodeid, "wall": round(wall, 4)}
    row.update({name: round(_totals[event] - before.get(event, 0.0), 4) for name, event in EVENTS.items()})
    row["cpu"], row["children_cpu"] = round(cpu, 4), round(children, 4)
    _out.write(json.dumps(row) + "\n")
    _out.flush()


def summarize(directory: Path) -> None:
    rows = [json.loads(line) for path in sorted(directory.glob("worker-*.jsonl")) for line in path.open()]
    if not rows:
        raise SystemExit(f"error: {directory}: no worker-*.jsonl records")
    keys = ("wall", *EVENTS, "cpu", "children_cpu")
    print(json.dumps({"tests": len(rows), **{k: round(sum(r.get(k, 0.0) for r in rows), 1) for k in keys}}))
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        per_file[r["test"].split("::")[0]].update({k: r.get(k, 0.0) for k in keys})
    for name, c in sorted(per_file.items(), key=lambda x: -x[1]["wall"])[:20]:
        print(json.dumps({"file": name, **{k: round(c[k], 1) for k in keys}}))
    for r in sorted(rows, key=lambda r: -r["wall"])[:20]:
        print(json.dumps(r))


if __name__ == "__main__":
    summarize(Path(sys.argv[1]) if len(sys.argv) > 1 else DIR)
