"""Bad input to the four commands: a catalogue of what a user meets, each refused with one line, nothing lost.

Every entry of `CATALOGUE` runs the command's `main(argv)` in-process and asserts: the exit code (2 for a
usage error, 1 for any other), one line on stderr starting `error: ` and naming the culprit (flag, file,
field or tensor), no traceback and no internal error, nothing on stdout, and a workspace left exactly as it
was: the sha256 of every input file the command was given (and of the built-in sources) and the listing of
every path in the workspace (no output directory, no temporary or parent directory left behind, nothing
replaced). A few tests run the real entry points (`python -m convert.<command>`), where the process boundary
matters: the exit status the shell sees, a full disk. `save_pretrained` follows the same output rules.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.compose import BUILTIN_DIR, compose
from parity_tests.file_state import listing as tree_listing
from parity_tests.file_state import sha256

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# The workspace: sources, a composed model, audio, and the user's own files, shared by the cases of a worker


def _copy(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    if samples.dtype == np.int16:
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(samples.tobytes())
    else:
        import soundfile

        soundfile.write(str(path), samples, rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("safety")
    _build_workspace(root)
    mounted = _make_read_only(root / "ro")
    yield root
    if mounted:
        subprocess.run(["umount", str(root / "ro")], check=False, capture_output=True)
    else:
        (root / "ro").chmod(0o755)


def _make_read_only(directory: Path) -> bool:
    """A read-only location: a read-only tmpfs where this process may mount one (root), else a directory without
    write permission (which root ignores). Returns whether it mounted."""
    directory.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)], capture_output=True).returncode == 0
    if not mounted:
        directory.chmod(0o555)
    return mounted


def _read_only(directory: Path) -> bool:
    try:
        (directory / "probe").mkdir()
    except OSError:
        return True
    (directory / "probe").rmdir()
    return False


def _build_workspace(root: Path) -> None:
    _copy(BUILTIN_DIR / "wav2vec2", root / "enc")
    _copy(BUILTIN_DIR / "bart", root / "dec")
    compose(str(root / "enc"), str(root / "dec"), root / "model", verify=False, progress=False, log=io.StringIO())
    for name in ("home", "cwd", "hfcache/hub", "audio"):
        (root / name).mkdir(parents=True)
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("the user's only copy")
    (root / "file.txt").write_text("a file, not a directory")
    (root / "link_to_enc").symlink_to(root / "enc")
    (root / "link_to_user").symlink_to(root / "user")
    audio = root / "audio"
    rng = np.random.default_rng(0)
    _write_wav(audio / "good.wav", (rng.standard_normal(8000) * 3000).astype(np.int16))
    nan = rng.standard_normal(8000).astype(np.float32) * 0.1
    nan[4000] = np.nan
    _write_wav(audio / "nan.wav", nan)
    _write_wav(audio / "short.wav", np.zeros(10, np.int16))
    _write_wav(audio / "empty.wav", np.zeros(0, np.int16))
    (audio / "text.wav").write_text("not audio at all")
    os.link(audio / "good.wav", root / "hardlink_to_good.wav")
    # Training data: manifests naming the audio above (relative paths), good and bad.
    data = root / "data"
    data.mkdir()
    line = lambda audio, text: json.dumps({"audio": audio, "text": text}) + "\n"  # noqa: E731
    (data / "train.jsonl").write_text(line("../audio/good.wav", "one two") * 2)
    (data / "eval.jsonl").write_text(line("../audio/good.wav", "three"))
    manifests = {"not_json": "{ not json\n", "no_text": json.dumps({"audio": "../audio/good.wav"}) + "\n",
                 "empty_text": line("../audio/good.wav", " "), "audio_missing": line("../audio/nope.wav", "one"),
                 "empty": "\n\n", "list_line": "[1, 2]\n", "audio_short": line("../audio/short.wav", "one"),
                 "audio_number": json.dumps({"audio": 3, "text": "one"}) + "\n"}
    for name, text in manifests.items():
        (data / f"{name}.jsonl").write_text(text)
    (root / "gen.jsonl").write_text(json.dumps({"audio": "audio/good.wav", "text": "one"}) + "\n")
    # A previous output of the toolkit that holds the user's data (the manifest), and checkpoint directories.
    prev = root / "prev_out"
    prev.mkdir()
    (prev / "compose_report.json").write_text("{}")
    (prev / "train.jsonl").write_text(line("../audio/good.wav", "one two"))
    (root / "ckpt_earlier" / "3").mkdir(parents=True)
    (root / "ckpt_earlier" / "3" / "_CHECKPOINT_METADATA").write_text("{}")
    (root / "ft_earlier.checkpoints" / "3").mkdir(parents=True)
    (root / "ckpt_user").mkdir()
    (root / "ckpt_user" / "notes.txt").write_text("not a checkpoint")
    # Generation configs a user passes with --generation-config.
    generation = {"dup": '{"max_new_tokens": 5, "max_new_tokens": 500}', "long": '{"max_new_tokens": 500}',
                  "maxlength": '{"max_length": 1000}', "suppress": '{"suppress_tokens": [0]}',
                  "unknown": '{"my_setting": 1}', "typical": '{"typical_p": 0.5}', "beams0": '{"num_beams": 0}',
                  "notjson": "{ nope", "list": "[1]", "eosbig": '{"eos_token_id": 99999}',
                  "returns": '{"num_return_sequences": 2}'}
    (root / "gc").mkdir()
    for name, text in generation.items():
        (root / "gc" / f"{name}.json").write_text(text)


# Variants of the sources and of the composed model, made on first use (before the workspace is measured).

def _first_key(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _edit_config(src: str, **changes) -> Callable[[Path, Path], None]:
    def make(ws: Path, out: Path) -> None:
        _copy(ws / src, out)
        config = json.loads((out / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (out / "config.json").write_text(json.dumps(config))
    return make


_DELETE = object()


def _edit_tensors(src: str, edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def make(ws: Path, out: Path) -> None:
        _copy(ws / src, out)
        tensors = load_file(out / "model.safetensors")
        edit(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return make


def _set_value(suffix: str, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        key = _first_key(t, suffix)
        t[key] = t[key].copy()
        t[key].reshape(-1)[3] = value
    return edit


def _as_int(suffix: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        key = _first_key(t, suffix)
        t[key] = (t[key] * 100).astype(np.int32)
    return edit


def _reshape(suffix: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        key = _first_key(t, suffix)
        t[key] = t[key][:-1].copy()
    return edit


def _delete(suffix: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        del t[_first_key(t, suffix)]
    return edit


def _file_edit(src: str, name: str, how: str) -> Callable[[Path, Path], None]:
    def make(ws: Path, out: Path) -> None:
        _copy(ws / src, out)
        path = out / name
        if how == "delete":
            path.unlink()
        elif how == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif how == "garble":
            path.write_text("{ not json")
        else:
            raise ValueError(how)
    return make


class _Exploit:
    """Unpickling this would run a shell command: a safe reader refuses it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _malicious_bin(ws: Path, out: Path) -> None:
    _copy(ws / "dec", out)
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(pickle.dumps({"model.decoder.embed_tokens.weight": _Exploit(ws / "pwned")}))


def _with_entry(make: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """The composed model with one more entry, made by `make(workspace, directory)`."""
    def variant(ws: Path, out: Path) -> None:
        _copy(ws / "model", out)
        make(ws, out)
    return variant


def _hidden_and_link(ws: Path, out: Path) -> None:
    (out / ".hidden").write_text("a private note")
    (out / "visible.txt").symlink_to(out / ".hidden")


def _generation_file(text: str) -> Callable[[Path, Path], None]:
    def make(ws: Path, out: Path) -> None:
        _copy(ws / "dec", out)
        (out / "generation_config.json").write_text(text)
    return make


VARIANTS: dict[str, Callable[[Path, Path], None]] = {
    "model_link_out": _with_entry(lambda ws, out: (out / "secret.txt").symlink_to("/etc/passwd")),
    "model_link_hidden": _with_entry(_hidden_and_link),
    "model_link_dangling": _with_entry(lambda ws, out: (out / "gone.txt").symlink_to(out / "never-there")),
    "model_link_dir": _with_entry(lambda ws, out: (out / "user").symlink_to(ws / "user")),
    "model_fifo": _with_entry(lambda ws, out: os.mkfifo(out / "pipe")),
    "dec_generation_dup": _generation_file('{"max_length": 20, "max_length": 30}'),
    "dec_generation_long": _generation_file('{"max_length": 5000}'),
    "model_generation_dup": _with_entry(lambda ws, out: (out / "generation_config.json").write_text(
        '{"max_new_tokens": 4, "max_new_tokens": 400}')),
    "dec_layers_negative": _edit_config("dec", decoder_layers=-1),
    "dec_vocab_string": _edit_config("dec", vocab_size="big"),
    "dec_eos_outside_vocab": _edit_config("dec", eos_token_id=100000),
    "dec_no_start_ids": _edit_config("dec", decoder_start_token_id=None, bos_token_id=None),
    "dec_cross_width": _edit_config("dec", cross_attention_hidden_size=7),
    "dec_model_type_unknown": _edit_config("dec", model_type="whisper"),
    "dec_model_type_missing": _edit_config("dec", model_type=_DELETE),
    "dec_activation_unknown": _edit_config("dec", activation_function="swiglu3"),
    "enc_hidden_null": _edit_config("enc", hidden_size=None),
    "enc_conv_mismatch": _edit_config("enc", conv_dim=[8, 8]),
    "enc_dropout_2": _edit_config("enc", hidden_dropout=2.0),
    "dec_config_garbled": _file_edit("dec", "config.json", "garble"),
    "dec_config_missing": _file_edit("dec", "config.json", "delete"),
    "dec_no_weights": _file_edit("dec", "model.safetensors", "delete"),
    "dec_truncated": _file_edit("dec", "model.safetensors", "truncate"),
    "dec_int_weight": _edit_tensors("dec", _as_int("fc1.weight")),
    "dec_nan_weight": _edit_tensors("dec", _set_value("fc2.weight", np.nan)),
    "enc_inf_weight": _edit_tensors("enc", _set_value("feature_projection.projection.weight", np.inf)),
    "dec_huge_weight": _edit_tensors("dec", _set_value("fc2.bias", 1e5)),
    "dec_wrong_shape": _edit_tensors("dec", _reshape("fc1.weight")),
    "dec_missing_tensor": _edit_tensors("dec", _delete("layers.1.fc2.weight")),
    "dec_malicious_bin": _malicious_bin,
    "model_config_garbled": _file_edit("model", "config.json", "garble"),
    "model_truncated": _file_edit("model", "model.safetensors", "truncate"),
    "model_no_weights": lambda ws, out: (_file_edit("model", "model.safetensors", "delete")(ws, out),
                                         (out / "flax_model.msgpack").unlink()),
}


# ----------------------------------------------------------------------------------------------------------
# The catalogue


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input. `argv` and `culprit` may name `{ws}` (the workspace) and `{builtin}`; `variants` are made
    first; `env` is set (paths relative to the workspace are made absolute); `patch` monkeypatches."""

    command: str
    argv: tuple[str, ...]
    code: int
    culprit: str
    variants: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    patch: Callable | None = None  # patch(monkeypatch, ws) -> a cleanup or None
    absent: str | None = None  # what the message must not say (e.g. a flag that was not passed)


def compose_case(args: str, code: int, culprit: str, *, output: str = "{ws}/out", **kw) -> Case:
    argv = args.split() + (["--output", output] if output else [])
    return Case("compose", tuple(argv), code, culprit, **kw)


def finetune_case(extra: tuple[str, ...], code: int, culprit: str, *, model: str = "{ws}/model",
                  train: str = "{ws}/data/train.jsonl", eval: str = "{ws}/data/eval.jsonl", output: str = "{ws}/ftout",
                  **kw) -> Case:
    argv = ("--model", model, "--train", train, "--eval", eval, "--output", output, "--no-progress", *extra)
    return Case("finetune", argv, code, culprit, **kw)


def _tiny_disk(monkeypatch: pytest.MonkeyPatch, ws: Path) -> None:
    import convert.base.outputs

    monkeypatch.setattr(convert.base.outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096,
                                                                                                  4096))


_HOLDER = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def _held_by_another_process(name: str) -> Callable:
    """A patch: another process holds the lock of output `name` in the workspace (as a run writing it would)."""
    def patch(monkeypatch: pytest.MonkeyPatch, ws: Path) -> Callable[[], None]:
        lock = ws / f".{name}.lock"
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "locked\n"

        def cleanup() -> None:
            holder.kill()
            holder.wait()
            lock.unlink()
        return cleanup
    return patch


MODEL_AUDIO = ("--model", "{ws}/model", "--audio", "{ws}/audio/good.wav")


ENC, DEC = "--encoder {ws}/enc", "--decoder {ws}/dec"
GOOD = f"{ENC} {DEC} --no-verify --no-progress"
V = "{ws}/v/"  # where variants live

CATALOGUE: dict[str, Case] = {
    # --- compose: arguments ---------------------------------------------------------------------------------
    "compose/seed-negative": compose_case(f"{GOOD} --seed -1", 2, "--seed -1:"),
    "compose/ctc-vocab-missing": compose_case(f"{GOOD} --ctc-vocab {{ws}}/nope.json", 2, "--ctc-vocab"),
    "compose/ctc-vocab-with-a-decoder-head": compose_case(f"{GOOD} --ctc-head decoder --ctc-vocab "
                                                          "{ws}/data/train.jsonl", 2, "--ctc-vocab"),
    "compose/seed-too-large": compose_case(f"{GOOD} --seed 4294967296", 2, "--seed 4294967296:"),
    "compose/seed-not-a-number": compose_case(f"{GOOD} --seed abc", 2, "--seed"),
    "compose/dtype-unknown": compose_case(f"{GOOD} --dtype int8", 2, "--dtype"),
    "compose/shard-size-unreadable": compose_case(f"{GOOD} --max-shard-size lots", 2, "--max-shard-size lots:"),
    "compose/shard-size-below-a-byte": compose_case(f"{GOOD} --max-shard-size 0.1B", 2, "--max-shard-size 0.1B:"),
    "compose/start-token-outside-vocab": compose_case(f"{GOOD} --decoder-start-token-id 99999", 2,
                                                      "--decoder-start-token-id 99999:"),
    "compose/eos-negative": compose_case(f"{GOOD} --eos-token-id -3", 2, "--eos-token-id -3:"),
    "compose/pad-equal-to-vocab": compose_case(f"{GOOD} --pad-token-id 320", 2, "--pad-token-id 320:"),
    "compose/verify-factor-negative": compose_case(f"{ENC} {DEC} --verify-factor -1", 2, "--verify-factor -1"),
    "compose/verify-factor-zero": compose_case(f"{ENC} {DEC} --verify-factor 0", 2, "--verify-factor 0"),
    "compose/verify-factor-nan": compose_case(f"{ENC} {DEC} --verify-factor nan", 2, "--verify-factor nan:"),
    "compose/dry-run-without-push": compose_case(f"{GOOD} --dry-run", 2, "--dry-run"),
    "compose/private-without-push": compose_case(f"{GOOD} --private", 2, "--private"),
    "compose/push-to-bad-repo-id": compose_case(f"{GOOD} --push-to-hub a/b/c", 2, "--push-to-hub a/b/c:"),
    "compose/revision-of-builtin": compose_case("--encoder wav2vec2 --decoder bart --encoder-revision main", 2,
                                                "--encoder-revision main:"),
    "compose/revision-of-local-dir": compose_case(f"{GOOD} --decoder-revision v1", 2, "--decoder-revision v1:"),
    "compose/missing-output-flag": compose_case(GOOD, 2, "--output", output=""),
    "compose/unknown-flag": compose_case(f"{GOOD} --overwrit", 2, "--overwrit"),
    "compose/empty-encoder": Case("compose", ("--encoder", "", "--decoder", "bart", "--output", "{ws}/out"), 2,
                                  "--encoder"),
    # --- compose: sources -------------------------------------------------------------------------------------
    "compose/encoder-missing": compose_case(f"--encoder {{ws}}/nope {DEC}", 1, "--encoder {ws}/nope:"),
    "compose/encoder-is-a-file": compose_case(f"--encoder {{ws}}/file.txt {DEC}", 1, "--encoder {ws}/file.txt"),
    "compose/decoder-as-encoder": compose_case(f"--encoder {{ws}}/dec {DEC}", 1, "--encoder {ws}/dec"),
    "compose/builtin-decoder-as-encoder": compose_case(f"--encoder bart {DEC}", 1, "--encoder bart:"),
    "compose/not-a-repo-id": compose_case(f"{ENC} --decoder not//a//repo", 1, "--decoder not//a//repo:"),
    "compose/repo-not-cached-offline": compose_case(f"{ENC} --decoder someone/absent-model", 1,
                                                    "--decoder someone/absent-model:"),
    "compose/config-layers-negative": compose_case(f"{ENC} --decoder {V}dec_layers_negative", 1, "decoder_layers=-1",
                                                   variants=("dec_layers_negative",)),
    "compose/config-vocab-string": compose_case(f"{ENC} --decoder {V}dec_vocab_string", 1, "vocab_size=",
                                                variants=("dec_vocab_string",)),
    "compose/config-null-value": compose_case(f"--encoder {V}enc_hidden_null {DEC}", 1, "hidden_size=null",
                                              variants=("enc_hidden_null",)),
    "compose/config-conv-lists-disagree": compose_case(f"--encoder {V}enc_conv_mismatch {DEC}", 1, "conv_dim=",
                                                       variants=("enc_conv_mismatch",)),
    "compose/config-probability-above-one": compose_case(f"--encoder {V}enc_dropout_2 {DEC}", 1, "hidden_dropout=2.0",
                                                         variants=("enc_dropout_2",)),
    "compose/config-eos-outside-vocab": compose_case(f"{ENC} --decoder {V}dec_eos_outside_vocab", 1,
                                                     "eos_token_id=100000", variants=("dec_eos_outside_vocab",)),
    "compose/config-no-start-token": compose_case(f"{ENC} --decoder {V}dec_no_start_ids", 1,
                                                  "--decoder-start-token-id ID", variants=("dec_no_start_ids",)),
    "compose/config-cross-width": compose_case(f"{ENC} --decoder {V}dec_cross_width", 1,
                                               "cross_attention_hidden_size=7", variants=("dec_cross_width",)),
    "compose/config-model-type-unknown": compose_case(f"{ENC} --decoder {V}dec_model_type_unknown", 1, "'whisper'",
                                                      variants=("dec_model_type_unknown",)),
    "compose/config-model-type-missing": compose_case(f"{ENC} --decoder {V}dec_model_type_missing", 1, "model_type",
                                                      variants=("dec_model_type_missing",)),
    "compose/config-activation-unknown": compose_case(f"{ENC} --decoder {V}dec_activation_unknown", 1,
                                                      "activation_function='swiglu3'",
                                                      variants=("dec_activation_unknown",)),
    "compose/config-not-json": compose_case(f"{ENC} --decoder {V}dec_config_garbled", 1,
                                            "dec_config_garbled/config.json", variants=("dec_config_garbled",)),
    "compose/config-missing": compose_case(f"{ENC} --decoder {V}dec_config_missing", 1,
                                           "dec_config_missing/config.json", variants=("dec_config_missing",)),
    "compose/no-weight-file": compose_case(f"{ENC} --decoder {V}dec_no_weights", 1, "no weight file",
                                           variants=("dec_no_weights",)),
    "compose/truncated-weights": compose_case(f"{ENC} --decoder {V}dec_truncated", 1,
                                              "dec_truncated/model.safetensors", variants=("dec_truncated",)),
    "compose/malicious-pickle": compose_case(f"{ENC} --decoder {V}dec_malicious_bin", 1, "pytorch_model.bin",
                                             variants=("dec_malicious_bin",)),
    "compose/integer-weight": compose_case(f"{ENC} --decoder {V}dec_int_weight", 1,
                                           "model.decoder.layers.0.fc1.weight", variants=("dec_int_weight",)),
    "compose/nan-weight": compose_case(f"{ENC} --decoder {V}dec_nan_weight", 1, "model.decoder.layers.0.fc2.weight",
                                       variants=("dec_nan_weight",), output="{ws}/new/parents/out"),
    "compose/inf-weight": compose_case(f"--encoder {V}enc_inf_weight {DEC}", 1,
                                       "feature_projection.projection.weight", variants=("enc_inf_weight",)),
    "compose/weight-overflows-float16": compose_case(f"{ENC} --decoder {V}dec_huge_weight --dtype float16", 1,
                                                     "model.decoder.layers.0.fc2.bias", variants=("dec_huge_weight",)),
    "compose/weight-wrong-shape": compose_case(f"{ENC} --decoder {V}dec_wrong_shape", 1,
                                               "model.decoder.layers.0.fc1.weight", variants=("dec_wrong_shape",)),
    "compose/weight-missing": compose_case(f"{ENC} --decoder {V}dec_missing_tensor", 1, "layers/1/fc2/kernel",
                                           variants=("dec_missing_tensor",)),
    # --- compose: the output ----------------------------------------------------------------------------------
    "compose/output-is-cwd": compose_case(f"{GOOD} --overwrite", 2, "--output .: is the current directory",
                                          output="."),
    "compose/output-contains-cwd": compose_case(f"{GOOD} --overwrite", 2, "contains the current directory",
                                                output=".."),
    "compose/output-is-home": compose_case(f"{GOOD} --overwrite", 2, "is your home directory", output="{ws}/home"),
    "compose/output-is-encoder": compose_case(f"{GOOD} --overwrite", 2, "--output {ws}/enc: is the encoder source",
                                              output="{ws}/enc"),
    "compose/output-contains-sources": compose_case(f"--encoder {V}enc_dropout_2 {DEC} --overwrite", 2,
                                                    "--output {ws}/v: contains the encoder source", output="{ws}/v",
                                                    variants=("enc_dropout_2",)),
    "compose/output-inside-decoder": compose_case(GOOD, 2, "lies inside the decoder source", output="{ws}/dec/out"),
    "compose/output-inside-builtin": compose_case("--encoder wav2vec2 --decoder bart --no-verify", 2,
                                                  "lies inside the toolkit's built-in sources",
                                                  output="{builtin}/gpt2/out"),
    "compose/output-through-symlink-into-source": compose_case(GOOD, 2, "lies inside the encoder source",
                                                               output="{ws}/link_to_enc/out"),
    "compose/output-is-a-symlink": compose_case(f"{GOOD} --overwrite", 2, "is a symbolic link",
                                                output="{ws}/link_to_user"),
    "compose/output-inside-hub-cache": compose_case(GOOD, 2, "the Hugging Face cache",
                                                    output="{ws}/hfcache/hub/models--me--x",
                                                    env=(("HF_HUB_CACHE", "hfcache/hub"),)),
    "compose/output-user-dir": compose_case(GOOD, 2, "--output {ws}/user: directory exists and is not empty "
                                            "(pass --overwrite", output="{ws}/user"),
    "compose/overwrite-user-dir": compose_case(f"{GOOD} --overwrite", 2, "--output {ws}/user: exists and was not "
                                               "written by this toolkit", output="{ws}/user"),
    "compose/output-is-a-file": compose_case(f"{GOOD} --overwrite", 2, "exists and is not a directory",
                                             output="{ws}/file.txt"),
    "compose/output-under-a-file": compose_case(GOOD, 1, "--output {ws}/file.txt/out:", output="{ws}/file.txt/out"),
    "compose/output-unwritable": compose_case(GOOD, 1, "--output /proc/speech-encdec/out:",
                                              output="/proc/speech-encdec/out"),
    "compose/output-disk-too-small": compose_case(GOOD, 1, "free", patch=_tiny_disk),
    # --- generate -----------------------------------------------------------------------------------------------
    "generate/model-missing": Case("generate", ("--model", "{ws}/nope", "--audio", "{ws}/audio/good.wav"), 1,
                                   "{ws}/nope"),
    "generate/model-not-composed": Case("generate", ("--model", "{ws}/dec", "--audio", "{ws}/audio/good.wav"), 1,
                                        "{ws}/dec"),
    "generate/audio-missing": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/nope.wav"), 1,
                                   "{ws}/audio/nope.wav"),
    "generate/audio-not-audio": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/text.wav"), 1,
                                     "{ws}/audio/text.wav"),
    "generate/audio-nan": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/nan.wav"), 1,
                               "{ws}/audio/nan.wav"),
    "generate/audio-empty": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/empty.wav"), 1,
                                 "{ws}/audio/empty.wav"),
    "generate/num-beams-zero": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/good.wav",
                                                 "--num-beams", "0"), 2, "--num-beams"),
    "generate/max-new-tokens-negative": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/good.wav",
                                                          "--max-new-tokens", "-1"), 2, "--max-new-tokens"),
    "generate/length-penalty-nan": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/good.wav",
                                                     "--num-beams", "2", "--length-penalty", "nan"), 2,
                                        "--length-penalty"),
    "generate/unknown-flag": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/audio/good.wav",
                                               "--beams", "2"), 2, "--beams"),
    "generate/no-audio": Case("generate", ("--model", "{ws}/model"), 2, "--audio"),
    "generate/ctc-weight-without-a-ctc-head": Case("generate", (*MODEL_AUDIO, "--ctc-weight", "0.3"), 2,
                                                   "--ctc-weight 0.3: needs a model with a CTC head"),
    "generate/ctc-decoder-with-the-reference": Case("generate", (*MODEL_AUDIO, "--decoder", "ctc", "--framework",
                                                                 "torch"), 2, "--decoder ctc: needs framework=flax"),
    "generate/dataset-missing": Case("generate", ("--model", "{ws}/model", "--dataset", "{ws}/nodata"), 1,
                                     "{ws}/nodata: no such file or directory"),
    # --- check --------------------------------------------------------------------------------------------------
    "check/model-missing": Case("check", ("{ws}/nope",), 1, "{ws}/nope"),
    "check/model-is-a-file": Case("check", ("{ws}/file.txt",), 1, "{ws}/file.txt"),
    "check/model-not-composed": Case("check", ("{ws}/dec",), 1, "{ws}/dec/config.json"),
    "check/config-not-json": Case("check", ("{ws}/v/model_config_garbled",), 1, "model_config_garbled/config.json",
                                  variants=("model_config_garbled",)),
    "check/truncated-weights": Case("check", ("{ws}/v/model_truncated", "--format", "safetensors"), 1,
                                    "model_truncated/model.safetensors", variants=("model_truncated",)),
    "check/factor-negative": Case("check", ("{ws}/model", "--factor", "-1"), 2, "--factor -1"),
    "check/factor-infinite": Case("check", ("{ws}/model", "--factor", "inf"), 2, "--factor inf"),
    "check/max-new-tokens-zero": Case("check", ("{ws}/model", "--max-new-tokens", "0"), 2, "--max-new-tokens 0:"),
    "check/seed-negative": Case("check", ("{ws}/model", "--seed", "-5"), 2, "--seed -5:"),
    "check/format-unknown": Case("check", ("{ws}/model", "--format", "onnx"), 2, "--format"),
    "check/revision-of-local-dir": Case("check", ("{ws}/model", "--revision", "main"), 2, "--revision main:"),
    "check/audio-missing": Case("check", ("{ws}/model", "--audio", "{ws}/audio/nope.wav"), 1, "{ws}/audio/nope.wav"),
    "check/audio-nan": Case("check", ("{ws}/model", "--audio", "{ws}/audio/nan.wav"), 1, "{ws}/audio/nan.wav"),
    "check/audio-too-short": Case("check", ("{ws}/model", "--audio", "{ws}/audio/short.wav"), 1,
                                  "{ws}/audio/short.wav"),
    # --- push ---------------------------------------------------------------------------------------------------
    "push/directory-missing": Case("push", ("{ws}/nope", "me/model", "--dry-run"), 1, "{ws}/nope"),
    "push/not-composed": Case("push", ("{ws}/dec", "me/model", "--dry-run"), 1, "{ws}/dec/config.json"),
    "push/no-weights": Case("push", ("{ws}/v/model_no_weights", "me/model", "--dry-run"), 1, "no weights",
                            variants=("model_no_weights",)),
    "push/truncated-weights": Case("push", ("{ws}/v/model_truncated", "me/model", "--dry-run"), 1,
                                   "model_truncated/model.safetensors", variants=("model_truncated",)),
    "push/repo-id-one-part": Case("push", ("{ws}/model", "model", "--dry-run"), 2, "model: not a valid Hub repo id"),
    "push/repo-id-three-parts": Case("push", ("{ws}/model", "a/b/c", "--dry-run"), 2, "a/b/c: not a valid Hub repo id"),
    "push/empty-commit-message": Case("push", ("{ws}/model", "me/model", "--dry-run", "--commit-message", ""), 2,
                                      "--commit-message"),
    "push/empty-revision": Case("push", ("{ws}/model", "me/model", "--dry-run", "--revision", " "), 2, "--revision"),
    "push/no-token": Case("push", ("{ws}/model", "me/model"), 1, "token"),
    "push/offline-with-token": Case("push", ("{ws}/model", "me/model"), 1, "HF_HUB_OFFLINE",
                                    env=(("HF_TOKEN", "hf_NotARealToken0123456789"),)),
    "push/missing-repo-id": Case("push", ("{ws}/model",), 2, "OWNER/NAME"),
    "push/unknown-flag": Case("push", ("{ws}/model", "me/model", "--privat"), 2, "--privat"),
    # --- extract ------------------------------------------------------------------------------------------------
    "extract/part-unknown": Case("extract", ("{ws}/model", "--part", "lm", "--output", "{ws}/out"), 2, "--part"),
    "extract/part-missing": Case("extract", ("{ws}/model", "--output", "{ws}/out"), 2, "--part"),
    "extract/directory-missing": Case("extract", ("{ws}/nope", "--part", "decoder", "--output", "{ws}/out"), 1,
                                      "{ws}/nope"),
    "extract/not-composed": Case("extract", ("{ws}/dec", "--part", "decoder", "--output", "{ws}/out"), 1,
                                 "{ws}/dec/config.json"),
    "extract/no-weights": Case("extract", ("{ws}/v/model_no_weights", "--part", "decoder", "--output", "{ws}/out"),
                               1, "no weight", variants=("model_no_weights",)),
    "extract/truncated-weights": Case("extract", ("{ws}/v/model_truncated", "--part", "encoder", "--output",
                                                  "{ws}/out"), 1, "model_truncated/model.safetensors",
                                      variants=("model_truncated",)),
    "extract/output-is-the-model": Case("extract", ("{ws}/model", "--part", "decoder", "--output", "{ws}/model",
                                                    "--overwrite"), 2, "--output {ws}/model"),
    "extract/output-inside-the-model": Case("extract", ("{ws}/model", "--part", "decoder", "--output",
                                                        "{ws}/model/llm"), 2, "--output {ws}/model/llm"),
    "extract/output-user-directory": Case("extract", ("{ws}/model", "--part", "decoder", "--output", "{ws}/user",
                                                      "--overwrite"), 2, "was not written by this toolkit"),
    "extract/output-symlink": Case("extract", ("{ws}/model", "--part", "decoder", "--output", "{ws}/link_to_user"),
                                   2, "symbolic link"),
    "extract/output-is-cwd": Case("extract", ("{ws}/model", "--part", "encoder", "--output", "{ws}/cwd"), 2,
                                  "current directory"),
    "extract/shard-size-garbled": Case("extract", ("{ws}/model", "--part", "decoder", "--output", "{ws}/out",
                                                   "--max-shard-size", "lots"), 2, "--max-shard-size"),
    # --- push: what it would send -------------------------------------------------------------------------------
    "push/link-out-of-the-directory": Case("push", ("{ws}/v/model_link_out", "me/model", "--dry-run"), 1,
                                           "model_link_out/secret.txt: is a symbolic link to /etc/passwd, outside",
                                           variants=("model_link_out",), absent="root:"),
    "push/link-to-a-hidden-file": Case("push", ("{ws}/v/model_link_hidden", "me/model", "--dry-run"), 1,
                                       "model_link_hidden/visible.txt: is a symbolic link to the hidden file",
                                       variants=("model_link_hidden",)),
    "push/link-to-nothing": Case("push", ("{ws}/v/model_link_dangling", "me/model", "--dry-run"), 1,
                                 "model_link_dangling/gone.txt: is a symbolic link to", variants=("model_link_dangling",)),
    "push/link-to-a-directory": Case("push", ("{ws}/v/model_link_dir", "me/model", "--dry-run"), 1,
                                     "model_link_dir/user: is a symbolic link to a directory",
                                     variants=("model_link_dir",)),
    "push/a-pipe": Case("push", ("{ws}/v/model_fifo", "me/model", "--dry-run"), 1,
                        "model_fifo/pipe: is not a regular file", variants=("model_fifo",)),
    "push/link-out-with-a-token": Case("push", ("{ws}/v/model_link_out", "me/model"), 1,
                                       "model_link_out/secret.txt: is a symbolic link", variants=("model_link_out",),
                                       env=(("HF_TOKEN", "hf_NotARealToken0123456789"),)),
    "push/a-file": Case("push", ("{ws}/file.txt", "me/model", "--dry-run"), 1, "{ws}/file.txt: not a directory"),
    "push/config-not-json": Case("push", ("{ws}/v/model_config_garbled", "me/model", "--dry-run"), 1,
                                 "model_config_garbled/config.json", variants=("model_config_garbled",)),
    "push/repo-id-with-spaces": Case("push", ("{ws}/model", "me/my model", "--dry-run"), 2, "me/my model"),
    # --- compose: more outputs and sources ----------------------------------------------------------------------
    "compose/output-is-the-hub-cache": compose_case(GOOD, 2, "is the Hugging Face cache", output="{ws}/hfcache/hub",
                                                    env=(("HF_HUB_CACHE", "hfcache/hub"),)),
    "compose/output-contains-the-hub-cache": compose_case(GOOD, 2, "contains the Hugging Face cache",
                                                          output="{ws}/hfcache", env=(("HF_HUB_CACHE", "hfcache/hub"),)),
    "compose/output-is-the-root": compose_case(f"{GOOD} --overwrite", 2, "--output /: contains", output="/"),
    "compose/output-is-the-builtin-dir": compose_case("--encoder wav2vec2 --decoder bart --overwrite", 2,
                                                      "--output {builtin}: contains the encoder source", output="{builtin}"),
    "compose/output-read-only": compose_case(GOOD, 1, "--output {ws}/ro/out: cannot be created", output="{ws}/ro/out"),
    "compose/output-held-by-another-run": compose_case(GOOD, 1, "--output {ws}/out: another run (process",
                                                       patch=_held_by_another_process("out")),
    "compose/pad-negative": compose_case(f"{GOOD} --pad-token-id -1", 2, "--pad-token-id -1:"),
    "compose/start-negative": compose_case(f"{GOOD} --decoder-start-token-id -2", 2, "--decoder-start-token-id -2:"),
    "compose/shard-size-negative": compose_case(f"{GOOD} --max-shard-size -5", 2, "--max-shard-size"),
    "compose/seed-fraction": compose_case(f"{GOOD} --seed 1.5", 2, "--seed"),
    "compose/decoder-generation-config-duplicate-key": compose_case(
        f"{ENC} --decoder {V}dec_generation_dup", 1, "dec_generation_dup/generation_config.json: max_length is set twice",
        variants=("dec_generation_dup",)),
    "compose/decoder-generation-config-too-long": compose_case(
        f"{ENC} --decoder {V}dec_generation_long", 1, "dec_generation_long/generation_config.json: max_length=5000",
        variants=("dec_generation_long",), absent="--max"),
    # --- generate: the output -------------------------------------------------------------------------------------
    **{f"generate/output-{name}": Case("generate", (*MODEL_AUDIO, *extra, "--output", output), code, culprit)
       for name, output, extra, code, culprit in [
           ("is-the-audio-being-read", "{ws}/audio/good.wav", ("--overwrite",), 2,
            "--output {ws}/audio/good.wav: is an audio file being read"),
           ("is-a-hard-link-to-the-audio", "{ws}/hardlink_to_good.wav", ("--overwrite",), 2,
            "--output {ws}/hardlink_to_good.wav: is an audio file being read"),
           ("is-the-manifest-being-read", "{ws}/gen.jsonl", ("--manifest", "{ws}/gen.jsonl", "--overwrite"), 2,
            "--output {ws}/gen.jsonl: is a manifest being read"),
           ("is-the-model-config", "{ws}/model/config.json", ("--overwrite",), 2,
            "--output {ws}/model/config.json: lies inside the model"),
           ("new-file-inside-the-model", "{ws}/model/out.jsonl", (), 2, "lies inside the model"),
           ("is-the-generation-config", "{ws}/gc/long.json", ("--generation-config", "{ws}/gc/long.json",
                                                               "--overwrite"), 2,
            "--output {ws}/gc/long.json: is the generation config being read"),
           ("exists", "{ws}/file.txt", (), 2, "--output {ws}/file.txt: exists (pass --overwrite to replace it)"),
           ("is-a-directory", "{ws}/user", ("--overwrite",), 2, "--output {ws}/user: is a directory"),
           ("is-a-symlink", "{ws}/link_to_user", (), 2, "--output {ws}/link_to_user: is a symbolic link"),
           ("is-a-device", "/dev/null", ("--overwrite",), 2, "--output /dev/null: exists and is not a regular file"),
           ("under-a-file", "{ws}/file.txt/out.jsonl", (), 1, "--output {ws}/file.txt/out.jsonl: cannot be created"),
           ("unwritable", "/proc/speech-encdec/out.jsonl", (), 1, "--output /proc/speech-encdec/out.jsonl:"),
           ("read-only", "{ws}/ro/out.jsonl", (), 1, "--output {ws}/ro/out.jsonl: cannot be created"),
           ("inside-the-hub-cache", "{ws}/hfcache/hub/out.jsonl", (), 2, "lies inside the Hugging Face cache"),
       ]},
    "generate/output-held-by-another-run": Case("generate", (*MODEL_AUDIO, "--output", "{ws}/out.jsonl"), 1,
                                                "--output {ws}/out.jsonl: another run (process",
                                                patch=_held_by_another_process("out.jsonl")),
    "generate/overwrite-without-output": Case("generate", (*MODEL_AUDIO, "--overwrite"), 2, "--overwrite: applies only"),
    # --- generate: generation configs name the file and the key, never a flag that was not passed ---------------
    **{f"generate/generation-config-{case}": Case("generate", (*MODEL_AUDIO, "--generation-config",
                                                               f"{{ws}}/gc/{case.split('-')[0]}.json", *extra), code,
                                                  culprit, absent=absent)
       for case, extra, code, culprit, absent in [
           ("dup", (), 1, "{ws}/gc/dup.json: max_new_tokens is set twice (5 and 500)", "--max-new-tokens"),
           ("long", (), 1, "{ws}/gc/long.json: max_new_tokens=500: needs 501 decoder positions", "--max-new-tokens"),
           ("maxlength", (), 1, "{ws}/gc/maxlength.json: max_length=1000: needs 1000 decoder positions",
            "--max-new-tokens"),
           ("suppress", (), 1, "{ws}/gc/suppress.json: suppress_tokens=[0]: holds forced_bos_token_id=0 (set in "
            "{ws}/model/generation_config.json)", "--forced-bos-token-id"),
           ("unknown", (), 1, "{ws}/gc/unknown.json: my_setting is not a generation setting", "--"),
           ("typical", (), 1, "{ws}/gc/typical.json: typical_p=0.5: is not implemented", "--"),
           ("beams0", (), 1, "{ws}/gc/beams0.json: num_beams=0: must be an integer >= 1", "--num-beams"),
           ("notjson", (), 1, "{ws}/gc/notjson.json: not valid JSON", "--"),
           ("list", (), 1, "{ws}/gc/list.json: expected a JSON object", "--"),
           ("eosbig", (), 1, "{ws}/gc/eosbig.json: eos_token_id=99999: holds ids outside", "--eos-token-id"),
           ("returns", (), 1, "{ws}/gc/returns.json: num_return_sequences=2: needs --do-sample or num_beams > 1",
            "--num-return"),
           ("suppress-with-the-flag", ("--forced-bos-token-id", "0"), 2,
            "--forced-bos-token-id 0: is also in suppress_tokens (set in {ws}/gc/suppress.json)", "internal"),
       ]},
    "generate/generation-config-missing": Case("generate", (*MODEL_AUDIO, "--generation-config", "{ws}/gc/nope.json"),
                                               2, "--generation-config {ws}/gc/nope.json: no such file"),
    "generate/max-new-tokens-flag-too-long": Case("generate", (*MODEL_AUDIO, "--max-new-tokens", "5000"), 2,
                                                  "--max-new-tokens 5000: needs 5001 decoder positions"),
    "generate/suppress-flag-against-the-model": Case("generate", (*MODEL_AUDIO, "--suppress-tokens", "0"), 2,
                                                     "--suppress-tokens [0]: holds forced_bos_token_id=0 (set in "
                                                     "{ws}/model/generation_config.json)"),
    "generate/eos-flag-outside-vocab": Case("generate", (*MODEL_AUDIO, "--eos-token-id", "99999"), 2,
                                            "--eos-token-id [99999]: holds ids outside"),
    "generate/bad-words-not-json": Case("generate", (*MODEL_AUDIO, "--bad-words-ids", "[[1"), 2, "--bad-words-ids"),
    "generate/batch-size-zero": Case("generate", (*MODEL_AUDIO, "--batch-size", "0"), 2, "--batch-size 0:"),
    "generate/buckets-zero": Case("generate", (*MODEL_AUDIO, "--buckets", "0"), 2, "--buckets 0:"),
    "generate/chunk-seconds-negative": Case("generate", (*MODEL_AUDIO, "--chunk-seconds", "-1"), 2,
                                            "--chunk-seconds -1"),
    "generate/tokens-per-second-zero": Case("generate", (*MODEL_AUDIO, "--tokens-per-second", "0"), 2,
                                            "--tokens-per-second 0"),
    "generate/framework-unknown": Case("generate", (*MODEL_AUDIO, "--framework", "jax"), 2, "--framework"),
    "generate/mesh-with-torch": Case("generate", (*MODEL_AUDIO, "--framework", "torch", "--mesh", "data=1"), 2,
                                     "--mesh data=1: needs"),
    "generate/manifest-missing": Case("generate", ("--model", "{ws}/model", "--manifest", "{ws}/nope.jsonl"), 1,
                                      "{ws}/nope.jsonl: no such manifest file"),
    "generate/manifest-not-json": Case("generate", ("--model", "{ws}/model", "--manifest",
                                                    "{ws}/data/not_json.jsonl"), 1, "{ws}/data/not_json.jsonl:1:"),
    "generate/manifest-audio-missing": Case("generate", ("--model", "{ws}/model", "--manifest",
                                                         "{ws}/data/audio_missing.jsonl"), 1,
                                            "{ws}/data/audio_missing.jsonl:1:"),
    "generate/manifest-audio-not-a-string": Case("generate", ("--model", "{ws}/model", "--manifest",
                                                              "{ws}/data/audio_number.jsonl"), 1,
                                                 "{ws}/data/audio_number.jsonl:1:"),
    "generate/manifest-empty": Case("generate", ("--model", "{ws}/model", "--manifest", "{ws}/data/empty.jsonl"), 1,
                                    "{ws}/data/empty.jsonl: the manifest lists no audio"),
    "generate/directory-without-audio": Case("generate", ("--model", "{ws}/model", "--audio", "{ws}/user"), 1,
                                             "{ws}/user: no audio files"),
    "generate/model-truncated": Case("generate", ("--model", "{ws}/v/model_truncated", "--audio",
                                                  "{ws}/audio/good.wav", "--framework", "torch"), 1,
                                     "model_truncated/model.safetensors", variants=("model_truncated",)),
    # --- check: more ----------------------------------------------------------------------------------------------
    "check/audio-not-audio": Case("check", ("{ws}/model", "--audio", "{ws}/audio/text.wav"), 1,
                                  "{ws}/audio/text.wav"),
    "check/audio-empty": Case("check", ("{ws}/model", "--audio", "{ws}/audio/empty.wav"), 1, "{ws}/audio/empty.wav"),
    "check/audio-is-a-directory": Case("check", ("{ws}/model", "--audio", "{ws}/audio"), 1, "{ws}/audio"),
    "check/seed-too-large": Case("check", ("{ws}/model", "--seed", "4294967296"), 2, "--seed 4294967296:"),
    "check/unknown-flag": Case("check", ("{ws}/model", "--formats", "flax"), 2, "--formats"),
    "check/missing-model": Case("check", (), 2, "DIR_OR_REPO"),
    "check/repo-not-cached-offline": Case("check", ("someone/absent-model",), 1, "someone/absent-model"),
    # --- finetune: arguments -----------------------------------------------------------------------------------
    **{f"finetune/{flag.strip('-')}-{value}": finetune_case((flag, value), 2, f"{flag}")
       for flag, value in [("--max-steps", "0"), ("--batch-size", "0"), ("--learning-rate", "-1"),
                           ("--label-smoothing", "1.5"), ("--dtype", "float16"), ("--epochs", "0"),
                           ("--bfloat16-products", "fast"),
                           ("--warmup-steps", "-1"), ("--num-beams", "0"), ("--max-new-tokens", "0"),
                           ("--eval-every", "-1"), ("--grad-accum", "0"), ("--max-grad-norm", "-1"),
                           ("--mesh", "dta=2"), ("--weight-decay", "nan"), ("--eval-batch-size", "0"),
                           ("--num-buckets", "0"), ("--seed", "x")]},
    "finetune/unknown-flag": finetune_case(("--resum",), 2, "--resum"),
    "finetune/bfloat16-products-in-float32": finetune_case(("--bfloat16-products", "upcast"), 2,
                                                           "--bfloat16-products upcast: goes with dtype bfloat16"),
    "finetune/ctc-weight-out-of-range": finetune_case(("--ctc-weight", "1.5"), 2, "--ctc-weight 1.5"),
    "finetune/ctc-weight-without-a-ctc-head": finetune_case(("--ctc-weight", "0.3"), 2, "--ctc-weight"),
    "finetune/dataset-and-manifests": finetune_case(("--dataset", "{ws}/data"), 2, "--dataset"),
    "finetune/dataset-missing": Case("finetune", ("--model", "{ws}/model", "--dataset", "{ws}/nodata", "--output",
                                                  "{ws}/ftout", "--no-progress"), 1, "{ws}/nodata: no such file or directory"),
    "finetune/missing-train": Case("finetune", ("--model", "{ws}/model", "--eval", "{ws}/data/eval.jsonl",
                                                "--output", "{ws}/ftout"), 2, "--train"),
    # --- finetune: inputs --------------------------------------------------------------------------------------------
    "finetune/model-missing": finetune_case((), 2, "--model {ws}/nope: not a composed model directory",
                                            model="{ws}/nope"),
    "finetune/model-not-composed": finetune_case((), 1, "{ws}/dec", model="{ws}/dec"),
    "finetune/model-config-garbled": finetune_case((), 1, "model_config_garbled/config.json",
                                                   model="{ws}/v/model_config_garbled",
                                                   variants=("model_config_garbled",)),
    "finetune/model-without-weights": finetune_case((), 1, "model_no_weights", model="{ws}/v/model_no_weights",
                                                    variants=("model_no_weights",)),
    **{f"finetune/train-{name.replace('_', '-')}": finetune_case((), 1, culprit, train=f"{{ws}}/data/{name}.jsonl")
       for name, culprit in [("not_json", "{ws}/data/not_json.jsonl:1: not a JSON object"),
                             ("no_text", "{ws}/data/no_text.jsonl:1: 'text'"),
                             ("empty_text", "{ws}/data/empty_text.jsonl:1: 'text'"),
                             ("audio_missing", "{ws}/data/audio_missing.jsonl:1: audio"),
                             ("empty", "{ws}/data/empty.jsonl: the manifest holds no examples"),
                             ("list_line", "{ws}/data/list_line.jsonl:1: not a JSON object"),
                             ("audio_number", "{ws}/data/audio_number.jsonl:1: 'audio'"),
                             ("audio_short", "{ws}/data/audio_short.jsonl:1:"),
                             ("nope", "{ws}/data/nope.jsonl: no such manifest file")]},
    "finetune/eval-missing": finetune_case((), 1, "{ws}/data/nope.jsonl: no such manifest file",
                                           eval="{ws}/data/nope.jsonl"),
    # --- finetune: the output and the checkpoints -----------------------------------------------------------------
    **{f"finetune/output-{name}": finetune_case(extra, code, culprit, output=output)
       for name, output, extra, code, culprit in [
           ("is-the-model", "{ws}/model", ("--overwrite",), 2, "--output {ws}/model: is the model"),
           ("inside-the-model", "{ws}/model/ft", (), 2, "--output {ws}/model/ft: lies inside the model"),
           ("is-cwd", ".", ("--overwrite",), 2, "--output .: is the current directory"),
           ("is-home", "{ws}/home", ("--overwrite",), 2, "--output {ws}/home: is your home directory"),

           ("holds-the-audio", "{ws}/audio", ("--overwrite",), 2, "--output {ws}/audio: exists and was not written"),
           ("user-dir", "{ws}/user", (), 2, "--output {ws}/user: directory exists and is not empty"),
           ("user-dir-overwrite", "{ws}/user", ("--overwrite",), 2, "--output {ws}/user: exists and was not written"),
           ("is-a-file", "{ws}/file.txt", ("--overwrite",), 2, "--output {ws}/file.txt: exists and is not a directory"),
           ("is-a-symlink", "{ws}/link_to_user", ("--overwrite",), 2, "--output {ws}/link_to_user: is a symbolic link"),
           ("inside-the-hub-cache", "{ws}/hfcache/hub/ft", (), 2, "lies inside the Hugging Face cache"),
           ("read-only", "{ws}/ro/ft", (), 1, "--output {ws}/ro/ft: cannot be created"),
           ("under-a-file", "{ws}/file.txt/ft", (), 1, "--output {ws}/file.txt/ft: cannot be created"),
       ]},
    **{f"finetune/checkpoints-{name}": finetune_case(("--checkpoint-dir", directory, *extra), code, culprit)
       for name, directory, extra, code, culprit in [
           ("are-the-model", "{ws}/model", (), 2, "--checkpoint-dir {ws}/model: is the model"),
           ("inside-the-model", "{ws}/model/ck", (), 2, "--checkpoint-dir {ws}/model/ck: lies inside the model"),
           ("are-cwd", ".", (), 2, "--checkpoint-dir .: is the current directory"),
           ("are-home", "{ws}/home", (), 2, "--checkpoint-dir {ws}/home: is your home directory"),
           ("hold-the-manifests", "{ws}/data", (), 2, "--checkpoint-dir {ws}/data: contains a manifest being read"),
           ("hold-the-audio", "{ws}/audio", (), 2, "--checkpoint-dir {ws}/audio: contains an audio file being read"),
           ("are-the-output", "{ws}/ftout", (), 2, "--output {ws}/ftout: is the checkpoint directory"),
           ("inside-the-output", "{ws}/ftout/ck", (), 2, "--output {ws}/ftout: contains the checkpoint directory"),
           ("hold-user-files", "{ws}/ckpt_user", (), 2,
            "--checkpoint-dir {ws}/ckpt_user: holds notes.txt, which is not a checkpoint"),
           ("hold-an-earlier-run", "{ws}/ckpt_earlier", (), 2,
            "--checkpoint-dir {ws}/ckpt_earlier: holds checkpoints of an earlier run (up to step 3); pass --resume"),
           ("are-a-file", "{ws}/file.txt", (), 2, "--checkpoint-dir {ws}/file.txt: exists and is not a directory"),
           ("read-only", "{ws}/ro/ck", (), 1, "--checkpoint-dir {ws}/ro/ck: cannot be created"),
           ("inside-the-hub-cache", "{ws}/hfcache/hub/ck", (), 2, "lies inside the Hugging Face cache"),
       ]},
    "finetune/checkpoints-held-by-another-run": finetune_case(("--checkpoint-dir", "{ws}/ck_busy"), 1,
                                                              "--checkpoint-dir {ws}/ck_busy: another run (process",
                                                              patch=_held_by_another_process("ck_busy")),
    "finetune/output-held-by-another-run": finetune_case((), 1, "--output {ws}/ftout: another run (process",
                                                         patch=_held_by_another_process("ftout")),
    "finetune/output-holds-the-manifest": finetune_case(("--overwrite",), 2, "--output {ws}/prev_out: contains a "
                                                        "manifest being read", output="{ws}/prev_out",
                                                        train="{ws}/prev_out/train.jsonl"),
    "finetune/default-checkpoints-named-by-path": finetune_case(
        (), 2, "error: {ws}/ft_earlier.checkpoints: holds checkpoints of an earlier run (up to step 3); pass --resume",
        output="{ws}/ft_earlier", absent="--checkpoint-dir"),
}


# ----------------------------------------------------------------------------------------------------------
# Running a case


def _inputs(argv: list[str], root: Path) -> list[Path]:
    """The files an argument list names (directories expanded, and the audio files manifests name), inside the
    workspace or the built-ins."""
    files = [p for p in BUILTIN_DIR.rglob("*") if p.is_file()]
    for arg in argv:
        path = Path(arg)
        inside = any(path == top or top in path.parents for top in (root, BUILTIN_DIR))
        if path.is_absolute() and inside and path.exists():
            files.extend([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()])
            if path.suffix == ".jsonl" and path.is_file():
                files.extend(_manifest_audio(path))
    return sorted({f for f in files if not f.is_fifo()})


def _manifest_audio(manifest: Path) -> list[Path]:
    out = []
    for line in manifest.read_text().splitlines():
        try:
            audio = json.loads(line).get("audio")
        except (ValueError, AttributeError):
            continue
        if isinstance(audio, str) and (manifest.parent / audio).is_file():
            out.append(manifest.parent / audio)
    return out


def _run(command: str, argv: list[str]) -> int:
    module = importlib.import_module(f"convert.{command}")
    try:
        return module.main(argv)
    except SystemExit as e:  # argparse's usage errors and --help
        return e.code


def _fill(text: str, root: Path) -> str:
    return text.replace("{ws}", str(root)).replace("{builtin}", str(BUILTIN_DIR))


def _prepare(ws: Path, variants: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the variants a case needs (before the workspace is measured); home, the Hub cache and offline mode
    point into the workspace."""
    for variant in variants:
        if not (ws / "v" / variant).exists():
            VARIANTS[variant](ws, ws / "v" / variant)
    monkeypatch.setenv("HOME", str(ws / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hfcache" / "hub"))


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_one_line_and_changes_nothing(name, ws, capsys, monkeypatch):
    case = CATALOGUE[name]
    _prepare(ws, case.variants, monkeypatch)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for key, value in case.env:
        monkeypatch.setenv(key, str(ws / value) if "/" in value and not value.startswith("hf_") else value)
    if "{ws}/ro/" in " ".join(case.argv) and not _read_only(ws / "ro"):
        pytest.skip("no read-only location can be made here (root without mount)")
    if case.command == "finetune":  # a case that got past every check would train: fail it at once instead
        monkeypatch.setattr("flax_model.training.init_state", _reached_training)
    cleanup = case.patch(monkeypatch, ws) if case.patch is not None else None
    monkeypatch.chdir(ws / "cwd")
    argv = [_fill(a, ws) for a in case.argv]
    inputs = _inputs(argv, ws)
    hashes = {p: sha256(p) for p in inputs}
    listing = tree_listing(ws)
    capsys.readouterr()

    try:
        code = _run(case.command, argv)
        out, err = capsys.readouterr()
        _assert_refused(name, case, ws, code, out, err, inputs, hashes, listing)
    finally:
        if cleanup is not None:
            cleanup()


def _reached_training(*args, **kwargs):
    raise AssertionError("the case reached training: nothing refused it")


def _assert_refused(name: str, case: Case, ws: Path, code: int, out: str, err: str, inputs: list[Path],
                    hashes: dict[Path, str], listing: dict[str, tuple]) -> None:
    assert code == case.code, f"{name}: exit {code}, expected {case.code}: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"{name}: not one line: {err!r}"
    assert err.startswith("error: "), f"{name}: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, f"{name}: {err!r}"
    culprit = _fill(case.culprit, ws)
    assert culprit in err, f"{name}: the message does not name {culprit!r}: {err!r}"
    assert case.absent is None or case.absent not in err, f"{name}: the message says {case.absent!r}: {err!r}"
    assert out == "", f"{name}: printed {out!r}"
    assert {p: sha256(p) for p in inputs} == hashes, f"{name}: an input file changed"
    after = tree_listing(ws)
    assert after == listing, (f"{name}: the workspace changed: added {sorted(set(after) - set(listing))}, removed "
                              f"{sorted(set(listing) - set(after))}, changed "
                              f"{sorted(k for k in after if k in listing and after[k] != listing[k])}")
    assert not (ws / "pwned").exists()


# ----------------------------------------------------------------------------------------------------------
# The Python API: the same refusals as exceptions (one line, the API's names), nothing changed


@dataclasses.dataclass(frozen=True)
class ApiCase:
    """`call(ws, models)` must raise `error` with one line naming `culprit` (which may name `{ws}`)."""

    call: Callable
    error: str  # the exception class, by name in convert.base.errors / generation_settings
    culprit: str
    variants: tuple[str, ...] = ()
    patch: Callable | None = None


def _save(framework: str, directory: str, **kw) -> Callable:
    return lambda ws, models: models[framework].save_pretrained(Path(_fill(directory, ws)), **kw)


def _load(framework: str, directory: str) -> Callable:
    def call(ws, models):
        if framework == "flax":
            from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel as Model
        else:
            from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel as Model
        return Model.from_pretrained(_fill(directory, ws))
    return call


def _generate(framework: str, **kw) -> Callable:
    def call(ws, models):
        if "generation_config" in kw and isinstance(kw["generation_config"], str):
            from convert.base.generation_settings import GenerationConfig, read_json_object

            path = Path(_fill(kw["generation_config"], ws))
            kw["generation_config"] = GenerationConfig.from_hf_dict(read_json_object(path), str(path))
        inputs = np.zeros((1, 8000), np.float32)
        if framework == "torch":
            import torch

            inputs = torch.from_numpy(inputs)
        return models[framework].generate(inputs, None, **kw)
    return call


def _finetune(**kw) -> Callable:
    def call(ws, models):
        from convert.finetune import finetune

        args = {"model": "{ws}/model", "train": "{ws}/data/train.jsonl", "eval": "{ws}/data/eval.jsonl",
                "output": "{ws}/ftout", **kw}
        filled = {k: _fill(v, ws) if isinstance(v, str) else v for k, v in args.items()}
        return finetune(filled.pop("model"), filled.pop("train"), filled.pop("eval"), filled.pop("output"),
                        progress=False, log=io.StringIO(), **filled)
    return call


def _api(module: str, function: str, *args, **kw) -> Callable:
    def call(ws, models):
        fill = lambda v: _fill(v, ws) if isinstance(v, str) else v  # noqa: E731
        args_ = [Path(fill(a)) if isinstance(a, str) and a.endswith(".json") else fill(a) for a in args]
        return getattr(importlib.import_module(module), function)(*args_,
                                                                   **{k: fill(v) for k, v in kw.items()})
    return call


API_CASES: dict[str, ApiCase] = {
    **{f"save_pretrained/{framework}/{name}": ApiCase(_save(framework, directory, **kw), error, culprit, patch=patch)
       for framework in ("flax", "torch")
       for name, directory, kw, error, culprit, patch in [
           ("into-cwd", ".", {}, "UsageError", "directory=.: is the current directory", None),
           ("into-home", "{ws}/home", {}, "UsageError", "directory={ws}/home: is your home directory", None),
           ("around-cwd", "{ws}", {"overwrite": True}, "UsageError", "directory={ws}: contains the current directory",
            None),
           ("into-the-hub-cache", "{ws}/hfcache/hub/models--me--x", {}, "UsageError",
            "lies inside the Hugging Face cache", None),
           ("into-its-own-model-without-overwrite", "{ws}/model", {}, "UsageError",
            "directory={ws}/model: directory exists and is not empty (pass overwrite=True to replace its model files; "
            "the other files are kept)", None),
           ("into-a-user-dir", "{ws}/user", {"overwrite": True}, "UsageError",
            "directory={ws}/user: exists and was not written by this toolkit", None),
           ("onto-a-file", "{ws}/file.txt", {"overwrite": True}, "UsageError",
            "directory={ws}/file.txt: exists and is not a directory", None),
           ("onto-a-symlink", "{ws}/link_to_user", {"overwrite": True}, "UsageError",
            "directory={ws}/link_to_user: is a symbolic link", None),
           ("read-only", "{ws}/ro/saved", {}, "OutputError", "directory={ws}/ro/saved: cannot be created", None),
           ("under-a-file", "{ws}/file.txt/saved", {}, "OutputError", "directory={ws}/file.txt/saved: cannot be created",
            None),
           ("overwrite-not-a-bool", "{ws}/saved", {"overwrite": "yes"}, "UsageError",
            "overwrite=yes: is not True or False", None),
           ("held-by-another-run", "{ws}/saved", {}, "OutputError", "directory={ws}/saved: another run (process",
            _held_by_another_process("saved")),
       ]},
    "save_pretrained/flax/params-of-another-model": ApiCase(
        _save("flax", "{ws}/saved", params={"encoder": {}}), "UnsupportedConfig", "params"),
    "save_pretrained/torch/params-of-another-model": ApiCase(
        _save("torch", "{ws}/saved", params={"nope": np.zeros(3)}), "UnsupportedConfig", "params: nope"),
    **{f"from_pretrained/{framework}/{name}": ApiCase(_load(framework, directory), error, culprit, variants)
       for framework in ("flax", "torch")
       for name, directory, error, culprit, variants in [
           ("missing", "{ws}/nope", "ConvertError", "{ws}/nope", ()),
           ("not-composed", "{ws}/dec", "UnsupportedConfig", "{ws}/dec", ()),
           ("config-not-json", "{ws}/v/model_config_garbled", "ConvertError", "model_config_garbled/config.json",
            ("model_config_garbled",)),
           ("no-weights", "{ws}/v/model_no_weights", "ConvertError", "model_no_weights", ("model_no_weights",)),
           ("generation-config-duplicate-key", "{ws}/v/model_generation_dup", "GenerationConfigError",
            "model_generation_dup/generation_config.json: max_new_tokens is set twice (4 and 400)",
            ("model_generation_dup",)),
       ]},
    **{f"generate/{framework}/{name}": ApiCase(_generate(framework, **kw), error, culprit)
       for framework in ("flax", "torch")
       for name, kw, error, culprit in [
           ("num-beams-zero", {"num_beams": 0}, "GenerationArgumentError", "num_beams=0: must be an integer >= 1"),
           ("generation-config-too-long", {"generation_config": {"max_new_tokens": 5000}}, "GenerationConfigError",
            "generation_config: max_new_tokens=5000: needs 5001 decoder positions"),
           ("generation-file-suppresses-the-forced-token", {"generation_config": "{ws}/gc/suppress.json"},
            "GenerationConfigError", "{ws}/gc/suppress.json: suppress_tokens=[0]: holds forced_bos_token_id=0 (set in "
            "{ws}/model/generation_config.json)"),
           ("suppress-argument-against-the-model", {"suppress_tokens": [0]}, "GenerationArgumentError",
            "suppress_tokens=[0]: holds forced_bos_token_id=0 (set in {ws}/model/generation_config.json)"),
       ]},
    "generation_config/duplicate-key": ApiCase(
        _api("convert.base.generation_settings", "read_json_object", "{ws}/gc/dup.json"),
        "GenerationConfigError", "max_new_tokens is set twice"),
    "compose/overwrite-not-a-bool": ApiCase(_api("convert.compose", "compose", "{ws}/enc", "{ws}/dec", "{ws}/out",
                                                 overwrite="yes", log=io.StringIO()), "UsageError",
                                            "overwrite=yes: is not True or False"),
    "compose/output-is-a-source": ApiCase(_api("convert.compose", "compose", "{ws}/enc", "{ws}/dec", "{ws}/dec",
                                               overwrite=True, log=io.StringIO()), "UsageError",
                                          "output={ws}/dec: is the decoder source"),
    "transcribe/batch-size-zero": ApiCase(_api("convert.transcribe", "transcribe", "{ws}/model",
                                               ["{ws}/audio/good.wav"], batch_size=0), "UsageError", "batch_size=0"),
    "transcribe/no-audio": ApiCase(_api("convert.transcribe", "transcribe", "{ws}/model", []), "UsageError",
                                   "audio=[]"),
    "finetune/checkpoints-are-the-model": ApiCase(_finetune(checkpoint_dir="{ws}/model"), "UsageError",
                                                  "checkpoint_dir={ws}/model: is the model"),
    "finetune/output-is-the-model": ApiCase(_finetune(output="{ws}/model", overwrite=True), "UsageError",
                                            "output={ws}/model: is the model"),
    "finetune/overwrite-not-a-bool": ApiCase(_finetune(overwrite="yes"), "UsageError", "overwrite=yes"),
    "finetune/resume-not-a-bool": ApiCase(_finetune(resume=1), "UsageError", "resume=1"),
    "push_to_hub/link-out": ApiCase(_api("convert.push", "push_to_hub", "{ws}/v/model_link_out", "me/x",
                                         dry_run=True, out=io.StringIO()), "CheckpointError",
                                    "model_link_out/secret.txt: is a symbolic link to /etc/passwd",
                                    ("model_link_out",)),
    "push_to_hub/dry-run-not-a-bool": ApiCase(_api("convert.push", "push_to_hub", "{ws}/model", "me/x",
                                                   dry_run="yes"), "UsageError", "dry_run=yes"),
    "check/factor-zero": ApiCase(_api("convert.check", "check", "{ws}/model", factor=0), "UsageError", "factor=0"),
}


@pytest.fixture(scope="module")
def models(ws) -> dict:
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

    return {"flax": FlaxSpeechEncoderDecoderModel.from_pretrained(ws / "model"),
            "torch": SpeechEncoderDecoderModel.from_pretrained(ws / "model")}


@pytest.mark.parametrize("name", list(API_CASES))
def test_the_python_api_refuses_with_one_line_and_changes_nothing(name, ws, models, monkeypatch):
    import convert.base.errors
    import convert.base.generation_settings

    case = API_CASES[name]
    if "{ws}/ro/" in case.culprit and not _read_only(ws / "ro"):
        pytest.skip("no read-only location can be made here (root without mount)")
    _prepare(ws, case.variants, monkeypatch)
    monkeypatch.setattr("flax_model.training.init_state", _reached_training)
    monkeypatch.chdir(ws / "cwd")
    error = getattr(convert.base.errors, case.error, None) or getattr(convert.base.generation_settings, case.error)
    cleanup = case.patch(monkeypatch, ws) if case.patch is not None else None
    try:
        inputs = sorted({p for p in ws.rglob("*") if p.is_file() and not p.is_symlink() and "v" not in
                         p.relative_to(ws).parts[:1]} | {p for p in BUILTIN_DIR.rglob("*") if p.is_file()})
        hashes = {p: sha256(p) for p in inputs}
        listing = tree_listing(ws)
        with pytest.raises(error) as info:
            case.call(ws, models)
        text = str(info.value)
        assert "\n" not in text and "Traceback" not in text, f"{name}: {text!r}"
        culprit = _fill(case.culprit, ws)
        assert culprit in text, f"{name}: the message does not name {culprit!r}: {text!r}"
        assert not re.search(r"(^|\s)--[a-z]", text), f"{name}: the API's message names a flag: {text!r}"
        assert {p: sha256(p) for p in inputs} == hashes, f"{name}: an input file changed"
        after = tree_listing(ws)
        assert after == listing, (f"{name}: the workspace changed: added {sorted(set(after) - set(listing))}, "
                                  f"removed {sorted(set(listing) - set(after))}, changed "
                                  f"{sorted(k for k in after if k in listing and after[k] != listing[k])}")
    finally:
        if cleanup is not None:
            cleanup()


def test_the_catalogues_reach_200_cases_over_every_command_and_the_api():
    per_command = {c: sum(case.command == c for case in CATALOGUE.values())
                   for c in ("compose", "generate", "check", "push", "finetune", "extract")}
    api = {n.split("/")[0] for n in API_CASES}
    assert len(CATALOGUE) + len(API_CASES) >= 200 and min(per_command.values()) >= 12, (per_command, len(API_CASES))
    assert {"save_pretrained", "from_pretrained", "generate"} <= api, api


# ----------------------------------------------------------------------------------------------------------
# What the library promises as well: compose() and save_pretrained follow the same output rules


def test_compose_api_names_its_parameters_not_flags(ws, monkeypatch):
    from convert.base.errors import UsageError

    monkeypatch.chdir(ws / "cwd")
    with pytest.raises(UsageError, match=r"^seed=-1: must be from 0 to 4294967295$"):
        compose(str(ws / "enc"), str(ws / "dec"), ws / "out", seed=-1, log=io.StringIO())
    with pytest.raises(UsageError, match=r"^output=\.: is the current directory") as info:
        compose(str(ws / "enc"), str(ws / "dec"), ".", overwrite=True, log=io.StringIO())
    assert info.value.param == "output" and "--" not in str(info.value)
    with pytest.raises(UsageError, match=r"pass overwrite=True to replace it\)$"):
        compose(str(ws / "enc"), str(ws / "dec"), ws / "user", log=io.StringIO())


def test_overwrite_replaces_only_what_the_toolkit_wrote(ws, tmp_path):
    out = tmp_path / "out"
    compose(str(ws / "enc"), str(ws / "dec"), out, verify=False, progress=False, log=io.StringIO())
    (out / "extra.txt").write_text("added later")
    compose(str(ws / "enc"), str(ws / "dec"), out, seed=1, overwrite=True, verify=False, progress=False,
            log=io.StringIO())
    assert json.loads((out / "compose_report.json").read_text())["init"]["seed"] == 1
    assert not (out / "extra.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_save_pretrained_follows_the_output_rules(framework, ws, tmp_path, monkeypatch):
    from convert.base.errors import UsageError

    if framework == "flax":
        from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel as Model
    else:
        from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel as Model
    model = Model.from_pretrained(ws / "model")
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    monkeypatch.chdir(user)
    monkeypatch.setenv("HOME", str(ws / "home"))
    for target, why in ((user, "is the current directory"), (tmp_path, "contains the current directory"),
                        (ws / "home", "is your home directory")):
        with pytest.raises(UsageError, match=f"^directory={target}: {why}"):
            model.save_pretrained(target)
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"] and (user / "keep.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="was not written by this toolkit"):
        model.save_pretrained(other, overwrite=True)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    with pytest.raises(UsageError, match=r"is not empty \(pass overwrite=True to replace its model files; the "
                                         r"other files are kept\)$"):
        model.save_pretrained(saved)
    model.save_pretrained(saved, overwrite=True)  # its own earlier output: updated
    assert (saved / "compose_report.json").is_file() and (saved / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# The real entry points


def _python_m(command: str, *args: str, cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", f"convert.{command}", *args], capture_output=True, text=True,
                          check=False, cwd=cwd, env=env, timeout=300, **kw)


@pytest.mark.parametrize("command, args, code", [
    ("compose", ["--encoder", "wav2vec2", "--decoder", "bart", "--output", "x", "--seed", "-1"], 2),
    ("generate", ["--model", "/nonexistent", "--audio", "a.wav"], 1),
    ("check", ["/nonexistent", "--factor", "0"], 2),
    ("push", ["/nonexistent", "me/x", "--dry-run"], 1),
    ("extract", ["/nonexistent", "--part", "decoder", "--output", "x"], 1),
])
def test_entry_points_exit_with_the_convention_and_one_line(command, args, code, tmp_path):
    result = _python_m(command, *args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_help_shows_every_default(capsys):
    for command in ("compose", "generate", "check", "push", "extract"):
        module = importlib.import_module(f"convert.{command}")
        parser = module.build_parser()
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, (), [], "==SUPPRESS==") \
                    and not isinstance(action.default, bool):
                assert f"default: {action.default}" in text or "default" in (action.help or ""), (command, action.dest)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A file size limit (what a full disk looks like to a writer): a write fails with EFBIG partway through."""
    out = tmp_path / "deep" / "out"
    # 100 blocks of 1 kB, SIGXFSZ ignored: a write past the limit fails with EFBIG instead of killing the process.
    command = (f"trap '' XFSZ; ulimit -f 100; exec {sys.executable} -m convert.compose --encoder wav2vec2 "
               f"--decoder bart --output {out} --no-verify")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=300,
                            check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: --output {out}: cannot be written (File too large") \
        and result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


# ----------------------------------------------------------------------------------------------------------
# One output policy: updates in place keep what is not the model's, one writer per output, exclusive commits


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_save_pretrained_into_its_own_directory_replaces_only_the_model_files(framework, ws, tmp_path):
    """Every other file (tokenizer, preprocessor, card, report, a user's folder) is kept byte for byte; every
    weight file the directory held is rewritten (the reference writes the Flax file too: no stale weights)."""
    import torch
    from flax import traverse_util

    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

    directory = _copy(ws / "model", tmp_path / "model")
    (directory / "notes").mkdir()
    (directory / "notes" / "mine.txt").write_text("the user's")
    kept = {p: sha256(p) for p in directory.rglob("*") if p.is_file() and p.name not in (
        "config.json", "generation_config.json", "model.safetensors", "flax_model.msgpack")}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "README.md",
            "compose_report.json", "mine.txt"} <= {p.name for p in kept}
    if framework == "flax":
        model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
        flat = traverse_util.flatten_dict(model.params, sep="/")
        key = next(k for k in sorted(flat) if k.endswith("bias"))
        flat[key] = flat[key] + 1.0
        model.save_pretrained(directory, params=traverse_util.unflatten_dict(flat, sep="/"), overwrite=True)
        want = np.asarray(flat[key])
    else:
        model = SpeechEncoderDecoderModel.from_pretrained(directory)
        name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("bias"))
        with torch.no_grad():
            param += 1.0
        model.save_pretrained(directory, overwrite=True)  # formats=("safetensors",): the Flax file is rewritten too
        want = param.detach().numpy()
    assert {p: sha256(p) for p in kept} == kept, "a file that is not the model's changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "a temporary or lock file was left"
    reloaded_flax = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)  # reads flax_model.msgpack first
    reloaded_torch = SpeechEncoderDecoderModel.from_pretrained(directory)  # reads model.safetensors
    flat = traverse_util.flatten_dict(reloaded_flax.params, sep="/")
    state = reloaded_torch.state_dict()
    if framework == "flax":
        assert np.array_equal(np.asarray(flat[key]), want)
        assert any(np.array_equal(v.numpy().reshape(-1), want.reshape(-1)) for v in state.values()
                   if v.numel() == want.size)
    else:
        assert np.array_equal(state[name].numpy(), want)
        assert any(np.array_equal(np.asarray(v).reshape(-1), want.reshape(-1)) for v in flat.values()
                   if np.size(v) == want.size), "the Flax weights were left stale"


def test_two_composes_into_one_new_output_never_both_write(tmp_path):
    """Started together: one writes the output, the other fails with one line; nothing else is left."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "convert.compose", "--encoder", "wav2vec2", "--decoder", "bart", "--output",
            str(out), "--no-verify", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results)[0] == 0, results
    code, _, loser = max(results)
    assert code in (1, 2) and loser.count("\n") == 1 and loser.startswith(f"error: --output {out}: "), loser
    # While the first writes, its lock refuses the second (or, had it no lock, the exclusive rename would); once
    # it has written, the output exists: never a silent replacement.
    assert any(why in loser for why in ("another run (process", "appeared while this run wrote",
                                        "directory exists and is not empty")), loser
    assert sum("wrote" in o for _, o, _ in results) == 1, results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").is_file()


def test_an_output_that_appears_while_writing_is_left_alone(ws, tmp_path, monkeypatch):
    """Something else creates the output's path during the run: the run fails and leaves it as it is."""
    import convert.compose
    from convert.base.errors import OutputError

    out = tmp_path / "out"
    real = convert.compose.save_params

    def save_and_race(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("another program's")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert.compose, "save_params", save_and_race)
    with pytest.raises(OutputError, match=r"appeared while this run wrote, and was left as it is; nothing was "
                                          r"written to") as info:
        compose(str(ws / "enc"), str(ws / "dec"), out, verify=False, progress=False, log=io.StringIO())
    assert str(info.value).startswith(f"output={out}: ")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_generate_failing_on_a_late_file_leaves_no_partial_jsonl(ws, tmp_path, capsys, monkeypatch):
    """The first file is transcribed and written to the temporary file, the second fails: the output never
    appears, the partial file is removed, and the message says so."""
    import convert.generate

    out = tmp_path / "out.jsonl"
    written = []
    real = convert.generate.transcribe

    def counting(*args, on_result, **kwargs):
        return real(*args, on_result=lambda r: (written.append(r.audio), on_result(r)), **kwargs)

    monkeypatch.setattr(convert.generate, "transcribe", counting)
    code = convert.generate.main(["--model", str(ws / "model"), "--audio", str(ws / "audio" / "good.wav"),
                                  str(ws / "audio" / "nan.wav"), "--batch-size", "1", "--framework", "torch",
                                  "--max-new-tokens", "3", "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {ws / 'audio' / 'nan.wav'}") and err.endswith(f"; nothing was written to {out}\n")
    assert written == [str(ws / "audio" / "good.wav")], written
    assert list(tmp_path.iterdir()) == []


def _small_disk(tmp_path: Path) -> tuple[Path, Callable[[], None]] | None:
    directory = tmp_path / "small"
    directory.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(directory)],
                                           capture_output=True).returncode != 0:
        return None
    return directory, lambda: subprocess.run(["umount", str(directory)], check=False, capture_output=True)


@pytest.mark.parametrize("where", ["output", "stdout"])
def test_a_full_disk_during_generate_names_the_file(where, ws, tmp_path):
    """A 4 kB tmpfs (where this process may mount one; else a file size limit of 0): the JSON lines do not fit.
    With --output the temporary file is removed; to a redirected stdout, the message names the file."""
    small = _small_disk(tmp_path)
    target = (small[0] if small else tmp_path) / "out.jsonl"
    limit = "" if small else "ulimit -f 0; "
    if small:  # a file fills the disk but for a few hundred bytes: the second or third line does not fit
        (small[0] / "ballast").write_bytes(b"x" * 3800)
    generate = (f"{sys.executable} -m convert.generate --model {ws / 'model'} --framework torch --max-new-tokens 3 "
                f"--batch-size 2 --no-progress --audio " + " ".join([str(ws / "audio" / "good.wav")] * 6))
    command = f"trap '' XFSZ; {limit}exec {generate} " + (f"--output {target}" if where == "output" else f"> {target}")
    try:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        why = "No space left on device: the disk is full" if small else "File too large"
        if where == "output":
            assert result.stderr.startswith(f"error: --output {target}: cannot be written ({why}") \
                and result.stderr.endswith("); nothing was written\n"), result.stderr
            assert [p.name for p in target.parent.iterdir()] == (["ballast"] if small else []), \
                list(target.parent.iterdir())
        else:
            assert result.stderr.startswith(f"error: {target}: cannot be written ({why}"), result.stderr
    finally:
        if small:
            small[1]()


def test_push_lists_exactly_what_it_sends(ws, tmp_path, capsys):
    """A link to a file inside is sent as that file, under the link's name; hidden files never are."""
    from convert import push

    directory = _copy(ws / "model", tmp_path / "model")
    (directory / "alias.json").symlink_to("config.json")
    (directory / ".secret").write_text("hidden")
    (directory / "notes").mkdir()
    (directory / "notes" / "readme.txt").write_text("mine")
    files = push.upload_files(directory)
    names = [name for name, _, _ in files]
    assert ".secret" not in names and "notes/readme.txt" in names and "alias.json" in names
    alias = next(item for item in files if item[0] == "alias.json")
    assert alias[1] == directory.resolve() / "config.json" and alias[2] == (directory / "config.json").stat().st_size
    result = push.push_to_hub(directory, "me/x", dry_run=True, out=io.StringIO())
    assert result.files == tuple((name, size) for name, _, size in files)


# ----------------------------------------------------------------------------------------------------------
# Interrupts while generate and finetune write: exit 130 at once, only complete outputs kept, said in one line

PROMPT = 30  # seconds from the signal to the exit, at most, on a loaded machine


def _interrupt(argv: list[str], cwd: Path, ready: Callable[[int], bool], sig: signal.Signals,
               delay: float = 0.0) -> tuple[int, str, float]:
    """Starts `argv`, waits for `ready(pid)` (and `delay`), sends `sig` while it still runs (test_interrupts'
    helpers); returns (exit code, stderr, seconds from the signal to the exit)."""
    from parity_tests.test_interrupts import _interrupt_when, _start

    proc = _start(argv, cwd)
    _, err, seconds = _interrupt_when(proc, lambda: ready(proc.pid), delay=delay, sig=sig)
    return proc.returncode, err, seconds


@pytest.mark.parametrize("moment, sig", [("loading", signal.SIGINT), ("after-a-line", signal.SIGTERM)])
def test_generate_interrupted_while_writing_leaves_no_jsonl(moment, sig, ws, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "convert.generate", "--model", str(ws / "model"), "--framework", "torch",
            "--max-new-tokens", "3", "--batch-size", "1", "--no-progress", "--output", str(out),
            "--audio", *[str(ws / "audio" / "good.wav")] * 40]

    def partial() -> list[Path]:
        return list(tmp_path.glob(".out.jsonl.partial-*"))

    if moment == "loading":  # the temporary file exists; the model is being loaded
        ready = lambda pid: bool(partial())  # noqa: E731
    else:  # the first transcript is in the temporary file
        ready = lambda pid: any(p.stat().st_size for p in partial() if p.exists())  # noqa: E731
    code, err, seconds = _interrupt(argv, tmp_path, ready, sig)
    assert code == 130 and err == f"interrupted: nothing was written to {out}\n", (code, err)
    assert seconds <= PROMPT, f"{seconds:.1f} s from the signal to the exit"
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def _finetune_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convert.finetune", "--model", str(ws / "model"), "--train",
            str(ws / "data" / "train.jsonl"), "--eval", str(ws / "data" / "eval.jsonl"), "--output", str(out),
            "--max-steps", "1", "--batch-size", "1", "--num-buckets", "1", "--eval-batch-size", "1",
            "--max-new-tokens", "2", "--no-progress", *extra]


def test_finetune_interrupted_before_its_first_step_leaves_nothing(ws, tmp_path):
    """Loading or compiling (nothing trained yet): the run ends at once and leaves no checkpoint directory."""
    out = tmp_path / "ft"
    # JAX is loaded, then a moment: reading the model or compiling (the first step takes far longer to come).
    from parity_tests.test_interrupts import _has_jax

    code, err, seconds = _interrupt(_finetune_argv(ws, out), tmp_path, _has_jax, signal.SIGINT, delay=1.0)
    assert code == 130 and err == "interrupted: nothing was trained or written\n", (code, err)
    assert seconds <= PROMPT, f"{seconds:.1f} s from the signal to the exit"
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_finetune_interrupted_while_exporting_keeps_its_last_checkpoint_and_writes_no_output(ws, tmp_path):
    """The export and its verification (after the last checkpoint): SIGTERM ends the run at once (a signal was
    ignored there before), the temporary output is removed, the checkpoint kept, and the line says both.

    The run resumes from a checkpoint of its last step (made here with finetune's own functions, so that the
    subprocess goes straight to the final evaluation and the export without compiling a training step)."""
    from convert import finetune, finetune_run, train_checkpoints
    from flax_model.training import init_state

    out, checkpoints = tmp_path / "ft", tmp_path / "ft.checkpoints"
    argv = _finetune_argv(ws, out, "--resume")
    settings = finetune.FinetuneSettings(max_steps=1, batch_size=1, num_buckets=1, eval_batch_size=1,
                                         max_new_tokens=2)
    run = finetune_run.Run(ws / "model", ws / "data" / "train.jsonl", ws / "data" / "eval.jsonl", settings, checkpoints)
    state = init_state(run.model.params, run.optimizer, run.frozen_fn)
    history = {"loss": [[1, 5.0]], "eval": [{"step": 0, "wer": 1.0, "cer": 1.0, "examples": [], "seconds": 0.0}],
               "audio_seconds": 0.5, "train_seconds": 1.0}
    train_checkpoints.save_checkpoint(train_checkpoints.checkpoint_manager(checkpoints), state.replace(step=state.step + 1), history)
    del run, state
    ready = lambda pid: any(tmp_path.glob(".ft.partial-*"))  # noqa: E731
    code, err, seconds = _interrupt(argv, tmp_path, ready, signal.SIGTERM)
    assert (code, err) == (130, f"interrupted: nothing was written to {out}; the checkpoint at step 1 in "
                                f"{checkpoints} is kept (run again with --resume to evaluate and export it)\n"), \
        (code, err)
    assert seconds <= PROMPT, f"{seconds:.1f} s from the signal to the exit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.checkpoints"], list(tmp_path.iterdir())
    assert [p.name for p in checkpoints.iterdir()] == ["1"]
