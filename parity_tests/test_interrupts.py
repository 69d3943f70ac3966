"""Ctrl-C (and SIGTERM) at several moments of each command: exit 130, one line, nothing left behind, promptly.

Each test starts `python -m convert.<command>` and sends the signal at a moment it can observe from outside,
without hooks in the code under test:
- "imports": as soon as the interrupt guard is installed (the process catches SIGTERM: bit 15 of `SigCgt` in
  /proc/PID/status), i.e. while the command still imports numpy, huggingface_hub, jax and torch;
- "writing": when compose's temporary output directory appears;
- "jax": once JAX's native library is mapped into the process (`libjax_common.so` in /proc/PID/maps), plus a
  moment: loading the model or compiling it with XLA, inside native code;
- "verifying": when compose has copied the tokenizer next to the weights, i.e. it verifies (loads, compiles);
- "uploading": when push is blocked in a network call (the runner's socket functions block and leave a mark).
A signal the process never saw would prove nothing: every test asserts the process was still running when it
was sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 240  # seconds a moment may take to come on a loaded 2-core machine
PROMPT = 30  # seconds from the signal to the exit, at most (imports and compilations are not waited for)

# Runs a command with every network call blocked forever after leaving a mark (for "uploading").
_BLOCKED_NETWORK_RUNNER = """\
import pathlib, runpy, socket, sys, time
mark = pathlib.Path(sys.argv[1])
def block(*args, **kwargs):
    mark.touch()
    while True:
        time.sleep(1)
socket.getaddrinfo = block
socket.create_connection = block
socket.socket.connect = block
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _has_jax(pid: int) -> bool:
    try:
        return "libjax_common" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _start(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0,
                    sig: signal.Signals = signal.SIGINT) -> tuple[str, str, float]:
    """Waits for `ready()`, then `delay` seconds, sends `sig`; returns (stdout, stderr, seconds to exit)."""
    deadline = time.monotonic() + DEADLINE
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended before the moment came (exit {proc.returncode}): {err[-2000:]}")
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the command ended before the signal"
    proc.send_signal(sig)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not end after the signal")
    return out, err, time.monotonic() - sent


def _assert_interrupted(proc: subprocess.Popen, err: str, seconds: float, note: str | None = None) -> None:
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("interrupted"), repr(err)
    assert "Traceback" not in err
    if note is not None:
        assert note in err, repr(err)
    assert seconds <= PROMPT, f"{seconds:.1f} s from the signal to the exit"


def _compose(out: Path) -> list[str]:
    return [sys.executable, "-m", "convert.compose", "--encoder", "wav2vec2", "--decoder", "gpt2", "--output",
            str(out)]


# ----------------------------------------------------------------------------------------------------------
# compose


@pytest.mark.parametrize("moment", ["imports", "writing", "verifying"])
def test_compose_interrupted_leaves_nothing(moment, tmp_path):
    out = tmp_path / "new" / "out"  # its parent too is created by the run, and must go
    proc = _start(_compose(out), REPO)
    if moment == "imports":
        ready = lambda: _catches_sigterm(proc.pid)
    elif moment == "writing":
        ready = lambda: any((tmp_path / "new").glob(".out.partial-*"))
    else:
        ready = lambda: any((tmp_path / "new").glob(".out.partial-*/tokenizer.json"))
    _, err, seconds = _interrupt_when(proc, ready, delay=0.3 if moment == "verifying" else 0.0)
    _assert_interrupted(proc, err, seconds, None if moment == "imports" else f"nothing was written to {out}")
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_compose_sigterm_while_writing_cleans_up_too(tmp_path):
    out = tmp_path / "out"
    proc = _start(_compose(out), REPO)
    _, err, seconds = _interrupt_when(proc, lambda: any(tmp_path.glob(".out.partial-*")), sig=signal.SIGTERM)
    _assert_interrupted(proc, err, seconds, f"nothing was written to {out}")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# check and generate (on a composed model)


@pytest.fixture(scope="module")
def model(composed_dir) -> Path:
    return composed_dir("w2v_group_adapter", "bart_cg")  # shared with the check and compose tests


def _wav(path: Path) -> Path:
    samples = (np.random.default_rng(0).standard_normal(8000) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(samples.tobytes())
    return path


@pytest.mark.parametrize("moment", ["imports", "jax"])
def test_check_interrupted_exits_130_with_one_line(moment, model, tmp_path):
    proc = _start([sys.executable, "-m", "convert.check", str(model)], tmp_path)
    ready = (lambda: _catches_sigterm(proc.pid)) if moment == "imports" else (lambda: _has_jax(proc.pid))
    out, err, seconds = _interrupt_when(proc, ready, delay=0.5 if moment == "jax" else 0.0)
    _assert_interrupted(proc, err, seconds)
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("moment", ["imports", "jax"])
def test_generate_interrupted_exits_130_with_one_line(moment, model, tmp_path):
    wav = _wav(tmp_path / "a.wav")
    proc = _start([sys.executable, "-m", "convert.generate", "--model", str(model), "--audio", str(wav),
                   "--num-beams", "2"], tmp_path)
    ready = (lambda: _catches_sigterm(proc.pid)) if moment == "imports" else (lambda: _has_jax(proc.pid))
    out, err, seconds = _interrupt_when(proc, ready, delay=0.5 if moment == "jax" else 0.0)
    _assert_interrupted(proc, err, seconds)
    assert out == "" and [p.name for p in tmp_path.iterdir()] == ["a.wav"]


# ----------------------------------------------------------------------------------------------------------
# push


def test_push_interrupted_during_imports(model, tmp_path):
    proc = _start([sys.executable, "-m", "convert.push", str(model), "me/model", "--dry-run"], tmp_path)
    out, err, seconds = _interrupt_when(proc, lambda: _catches_sigterm(proc.pid))
    _assert_interrupted(proc, err, seconds)
    assert out == ""


def test_push_interrupted_while_uploading_says_so(model, tmp_path):
    mark = tmp_path / "connecting"
    proc = _start([sys.executable, "-c", _BLOCKED_NETWORK_RUNNER, str(mark), "convert.push", str(model), "me/model"],
                  tmp_path, env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_NotARealToken0123456789abcdef",
                                 "HF_HOME": str(tmp_path / "hf")})
    _, err, seconds = _interrupt_when(proc, mark.exists)
    _assert_interrupted(proc, err, seconds, "the upload to me/model may or may not have completed")
    assert "hf_NotARealToken" not in err
