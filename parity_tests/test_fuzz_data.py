"""Fuzzing of what training and transcription read besides the weights: resumed checkpoints and manifests.

As `test_fuzz_readers.py` does for the weight files, each test starts from valid input or builds it field by
field, then corrupts it, and every case must end in one of two ways:

* a one-line error (`CheckpointError` / `DataError` / `TranscriptionError`) naming the file: for a checkpoint, the
  step directory; for a manifest, the manifest, with the line (`FILE:N:`) when one line is to blame; or
* a result the input justifies: a checkpoint whose every byte is the one saved restores to the saved state, bit
  for bit; a manifest is read into examples each of which is the JSON object on the line its `where` names, with
  an audio file that exists and (for training) a non-blank transcript.

Any other exception fails the test. Examples per fuzz test (derandomized, so that CI runs the same cases):

    test_mutated_checkpoint_is_refused_or_restored_exactly    EXAMPLES_CHECKPOINT_MUTATED = 120
    test_crafted_manifest_is_refused_or_read_as_written       EXAMPLES_MANIFEST_CRAFTED = 200
    test_mutated_manifest_is_refused_or_read_as_written       EXAMPLES_MANIFEST_MUTATED = 150

    checkpoints 120, manifests 350 (each read by both readers): 470 examples in all (EXAMPLES_TOTAL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from convert.base.errors import CheckpointError, ConvertError
from convert.base.integrity import MANIFEST

EXAMPLES_CHECKPOINT_MUTATED = 120
EXAMPLES_MANIFEST_CRAFTED = 200
EXAMPLES_MANIFEST_MUTATED = 150
EXAMPLES_TOTAL = EXAMPLES_CHECKPOINT_MUTATED + EXAMPLES_MANIFEST_CRAFTED + EXAMPLES_MANIFEST_MUTATED


def _fuzz(max_examples: int) -> settings:
    # No example database: the runs are derandomized, and a .hypothesis folder would land in the work tree.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _one_line(error: BaseException, starts: tuple[str, ...]) -> str:
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(starts), (message, starts)
    return message


# ---------------------------------------------------------------------------------------------------------------
# Resumed checkpoints: every byte of the step directory is checked before orbax reads any of it


@flax.struct.dataclass
class _State:
    step: Any
    params: Any
    moments: Any


def _state(step: int) -> _State:
    rng = np.random.default_rng(step)
    return _State(jnp.asarray(step, jnp.int32), {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
                                   "b": jnp.asarray(rng.standard_normal(32), jnp.bfloat16)},
                  (jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), jnp.zeros((3,), jnp.int32)))


class _Saved:
    """The checkpoint directory and the bytes of every file of step 4 as saved (a short repr for hypothesis)."""

    def __init__(self, directory: Path, files: dict[str, bytes]):
        self.directory, self.files = directory, files

    def __repr__(self) -> str:
        return f"_Saved({self.directory})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> _Saved:
    """Checkpoints of steps 2 and 4, and the bytes of every file of step 4 as saved."""
    from convert.train_checkpoints import checkpoint_manager, save_checkpoint

    directory = tmp_path_factory.mktemp("fuzz_checkpoints") / "ck"
    manager = checkpoint_manager(directory)
    for step in (2, 4):
        save_checkpoint(manager, _state(step), {"loss": [[step, 0.5]]})
    step = directory / "4"
    return _Saved(directory, {p.relative_to(step).as_posix(): p.read_bytes() for p in sorted(step.rglob("*"))
                              if p.is_file()})


def _put_back(step: Path, files: dict[str, bytes]) -> None:
    for path in sorted(step.rglob("*"), reverse=True):
        relative = path.relative_to(step).as_posix()
        if path.is_file() and relative not in files:
            path.unlink()
        elif path.is_dir() and not any(name.startswith(relative + "/") for name in files):
            shutil.rmtree(path)
    for name, data in files.items():
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        if not (step / name).is_file() or (step / name).read_bytes() != data:
            (step / name).write_bytes(data)


@st.composite
def _checkpoint_edits(draw, names: tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """1-3 edits of step 4's files: (kind, file, argument)."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "overwrite", "truncate", "append", "delete", "add", "rename",
                                     "manifest"]))
        name = draw(st.sampled_from(names))
        if kind in ("flip", "overwrite", "truncate"):
            edits.append((kind, name, (draw(st.floats(0, 1, exclude_max=True)), draw(st.binary(min_size=1,
                                                                                                 max_size=8)))))
        elif kind == "add":
            edits.append((kind, draw(st.sampled_from(["x.bin", "state/extra", "state/d/0", MANIFEST + ".tmp"])),
                          draw(st.binary(max_size=8))))
        elif kind == "manifest":
            edits.append((kind, MANIFEST, draw(st.sampled_from(["null", "[]", '{"files": {}}', '{"files": []}',
                                                                 '{"files": {"a": {"bytes": 1}}}', "{", ""]))))
        else:
            edits.append((kind, name, draw(st.binary(max_size=4))))
    return edits


def _apply(step: Path, edits: list[tuple[str, str, Any]]) -> None:
    for kind, name, arg in edits:
        path = step / name
        if kind == "add":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(arg)
            continue
        if kind == "manifest":
            path.write_text(arg)
            continue
        if not path.is_file():
            continue
        data = bytearray(path.read_bytes())
        if kind == "delete":
            path.unlink()
        elif kind == "rename":
            os.replace(path, path.with_name(path.name + ".moved"))
        elif kind == "append":
            path.write_bytes(bytes(data) + (arg or b"\0"))
        elif data:
            position = int(arg[0] * len(data))
            if kind == "flip":
                data[position] ^= 1 << (arg[1][0] % 8)
            elif kind == "overwrite":
                data[position:position + len(arg[1])] = arg[1]
            else:
                del data[position:]
            path.write_bytes(bytes(data))


def _same_tree(a: Any, b: Any) -> bool:
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes(),
        a, b)))


def _checkpoint_file_names() -> tuple[str, ...]:
    # The names orbax writes for a state like `_state` (which data files exist depends on orbax): the fixture's are
    # used at run time; these only seed the strategy, every one is looked up in the saved directory.
    return ("_CHECKPOINT_METADATA", MANIFEST, "state/_METADATA", "state/manifest.ocdbt", "meta/metadata",
            "state/ocdbt.process_0/manifest.ocdbt", "DATA", "DATA", "DATA")


@_fuzz(EXAMPLES_CHECKPOINT_MUTATED)
@given(edits=_checkpoint_edits(_checkpoint_file_names()))
@example(edits=[])
@example(edits=[("flip", "DATA", (0.5, b"\x01"))])
@example(edits=[("overwrite", "DATA", (0.0, b"\0" * 8))])
@example(edits=[("delete", MANIFEST, b"")])
@example(edits=[("add", "state/extra", b"")])
def test_mutated_checkpoint_is_refused_or_restored_exactly(saved, edits):
    from convert.train_checkpoints import checkpoint_manager, restore_checkpoint

    directory, files = saved.directory, saved.files
    step = directory / "4"
    data = sorted((n for n in files if n.startswith("state/") and "/d/" in n), key=lambda n: -len(files[n]))
    edits = [(kind, data[0] if name == "DATA" else name, arg) for kind, name, arg in edits]
    try:
        _apply(step, edits)
        now = {p.relative_to(step).as_posix(): p.read_bytes() for p in sorted(step.rglob("*")) if p.is_file()}
        try:
            state, meta = restore_checkpoint(checkpoint_manager(directory), _state(0), directory)
        except CheckpointError as e:
            assert now != files, f"an untouched checkpoint was refused: {e}"
            _one_line(e, (f"{step}:",))
            event("refused: " + re.sub(r"^[^:]*: ", "", str(e)).split(" (")[0][:40])
            return
        assert now == files, f"a changed checkpoint was restored: {sorted(set(now) ^ set(files))}"
        assert _same_tree(state, _state(4)) and meta == {"loss": [[4, 0.5]]}
        event("restored")
    finally:
        _put_back(step, files)


# ---------------------------------------------------------------------------------------------------------------
# Manifests: both readers (training's and transcription's), the same JSON lines


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_manifests")
    for name in ("a.wav", "b c.wav", "é.wav"):
        (directory / name).write_bytes(b"RIFF")  # only existence is read here
    (directory / "sub").mkdir()
    return directory


AUDIO = st.sampled_from(["a.wav", "a.wav", "a.wav", "b c.wav", "é.wav", "missing.wav", "sub", "", " ", "../a.wav",
                         "/nonexistent.wav"])
TEXT = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["one two", "   ", "\u2028x", "a\tb", "\ufeffhi"]))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=3), children, max_size=3), max_leaves=6)


@st.composite
def _manifest_lines(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["good"] * 6 + ["fields", "json", "blank", "junk", "deep"]))
        if kind == "good":
            item: dict[str, Any] = {"audio": draw(AUDIO), "text": draw(TEXT)}
            if draw(st.booleans()):
                item["extra"] = draw(JSON_VALUES)
            lines.append(json.dumps(item, ensure_ascii=draw(st.booleans())))
        elif kind == "fields":
            item = {draw(st.sampled_from(["audio", "text", "Audio"])): draw(JSON_VALUES | AUDIO)
                    for _ in range(draw(st.integers(0, 3)))}
            lines.append(json.dumps(item))
        elif kind == "json":
            lines.append(json.dumps(draw(JSON_VALUES)))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", "  ", "\t", "\r"])))
        elif kind == "junk":
            lines.append(draw(st.text(max_size=20)).replace("\n", " "))
        else:
            depth = draw(st.sampled_from([10, 5000, 100_000]))
            lines.append('{"audio": "a.wav", "text": ' + "[" * depth + "]" * depth + "}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


def _read_both(path: Path) -> None:
    """Reads `path` with both manifest readers; each refuses with its one line or reads what is written."""
    from convert.training_data import DataError
    from convert.training_data import read_manifest as read_training
    from convert.transcribe import TranscriptionError
    from convert.transcribe import read_manifest as read_transcription

    raw = path.read_bytes()
    for reader, error in ((read_training, DataError), (read_transcription, TranscriptionError)):
        try:
            examples = reader(path)
        except error as e:
            message = _one_line(e, (f"{path}:",))
            assert "Traceback" not in message
            event(f"{reader.__module__}: refused")
            continue
        except ConvertError as e:  # another of the toolkit's errors would still be one line, but not this one
            pytest.fail(f"{reader.__module__}: {type(e).__name__}: {e}")
        lines = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        assert examples, "an empty manifest was accepted"
        for read in examples:
            match = re.fullmatch(re.escape(str(path)) + r":(\d+)", read.where)
            assert match, read.where
            item = json.loads(lines[int(match.group(1)) - 1])
            assert isinstance(item, dict) and isinstance(item["audio"], str) and item["audio"]
            audio = Path(item["audio"])
            assert read.audio == (audio if audio.is_absolute() else path.parent / audio)
            assert read.audio.is_file(), read.audio
            text = read.text if reader is read_training else read.reference
            assert text == item.get("text"), (text, item)
            if reader is read_training:
                assert isinstance(text, str) and text.strip(), text
        readable = [n for n, line in enumerate(lines, 1) if line.strip()]
        assert [int(e.where.rsplit(":", 1)[1]) for e in examples] == readable, "a line was skipped"
        event(f"{reader.__module__}: read {len(examples)}")


@_fuzz(EXAMPLES_MANIFEST_CRAFTED)
@given(text=_manifest_lines())
@example(text='{"audio": "a.wav", "text": "one\u2028two"}\n')  # U+2028 inside a string is one JSON line
@example(text='{"audio": "a.wav", "text": "one"}\r\n{"audio": "é.wav", "text": "two"}\r\n')
@example(text='{"audio": "a.wav", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
@example(text="\ufeff" + '{"audio": "a.wav", "text": "one"}\n')
def test_crafted_manifest_is_refused_or_read_as_written(audio_dir, text):
    path = audio_dir / "m.jsonl"
    path.write_text(text, encoding="utf-8", newline="")
    _read_both(path)


VALID_MANIFEST = ('{"audio": "a.wav", "text": "one two"}\n{"audio": "b c.wav", "text": "three"}\n\n'
                  '{"audio": "é.wav", "text": "four"}\n').encode()


@_fuzz(EXAMPLES_MANIFEST_MUTATED)
@given(data=st.lists(st.tuples(st.integers(0, len(VALID_MANIFEST)), st.sampled_from(["flip", "insert", "delete"]),
                               st.binary(min_size=1, max_size=4)), min_size=1, max_size=3))
@example(data=[(0, "insert", b"\xff\xfe")])
@example(data=[(len(VALID_MANIFEST) - 2, "insert", b"\xc3")])
def test_mutated_manifest_is_refused_or_read_as_written(audio_dir, data):
    raw = bytearray(VALID_MANIFEST)
    for position, kind, chunk in data:
        position = min(position, len(raw))
        if kind == "flip" and position < len(raw):
            raw[position] ^= chunk[0] or 1
        elif kind == "insert":
            raw[position:position] = chunk
        else:
            del raw[position:position + len(chunk)]
    path = audio_dir / "mutated.jsonl"
    path.write_bytes(bytes(raw))
    _read_both(path)


def test_docstring_quotes_the_example_counts():
    doc = __doc__ or ""
    for test, constant in (("test_mutated_checkpoint_is_refused_or_restored_exactly", "EXAMPLES_CHECKPOINT_MUTATED"),
                           ("test_crafted_manifest_is_refused_or_read_as_written", "EXAMPLES_MANIFEST_CRAFTED"),
                           ("test_mutated_manifest_is_refused_or_read_as_written", "EXAMPLES_MANIFEST_MUTATED")):
        value = globals()[constant]
        assert globals()[test]._hypothesis_internal_use_settings.max_examples == value, test
        assert re.search(rf"{test}\s+{constant} = {value}\n", doc), test
    assert re.search(rf"\b{EXAMPLES_TOTAL} examples in all \(EXAMPLES_TOTAL\)", doc)
