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
import hashlib
import importlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.compose import BUILTIN_DIR, compose

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
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("safety")
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
    return root


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


VARIANTS: dict[str, Callable[[Path, Path], None]] = {
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
    patch: Callable | None = None


def compose_case(args: str, code: int, culprit: str, *, output: str = "{ws}/out", **kw) -> Case:
    argv = args.split() + (["--output", output] if output else [])
    return Case("compose", tuple(argv), code, culprit, **kw)


def _tiny_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    import convert.base.writing

    monkeypatch.setattr(convert.base.writing.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096,
                                                                                                  4096))


ENC, DEC = "--encoder {ws}/enc", "--decoder {ws}/dec"
GOOD = f"{ENC} {DEC} --no-verify --no-progress"
V = "{ws}/v/"  # where variants live

CATALOGUE: dict[str, Case] = {
    # --- compose: arguments ---------------------------------------------------------------------------------
    "compose/seed-negative": compose_case(f"{GOOD} --seed -1", 2, "--seed -1:"),
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
}


# ----------------------------------------------------------------------------------------------------------
# Running a case


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(root: Path) -> dict[str, tuple]:
    """Every path under `root` (links not followed) with its kind, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns,
                                                os.readlink(path) if path.is_symlink() else None)
    return out


def _inputs(argv: list[str], root: Path) -> list[Path]:
    """The files an argument list names (directories expanded), inside the workspace or the built-ins."""
    files = [p for p in BUILTIN_DIR.rglob("*") if p.is_file()]
    for arg in argv:
        path = Path(arg)
        if path.is_absolute() and path.exists():
            files.extend([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()])
    return sorted(set(files))


def _run(command: str, argv: list[str]) -> int:
    module = importlib.import_module(f"convert.{command}")
    try:
        return module.main(argv)
    except SystemExit as e:  # argparse's usage errors and --help
        return e.code


def _fill(text: str, root: Path) -> str:
    return text.replace("{ws}", str(root)).replace("{builtin}", str(BUILTIN_DIR))


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_one_line_and_changes_nothing(name, ws, capsys, monkeypatch):
    case = CATALOGUE[name]
    for variant in case.variants:
        if not (ws / "v" / variant).exists():
            VARIANTS[variant](ws, ws / "v" / variant)
    monkeypatch.setenv("HOME", str(ws / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hfcache" / "hub"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for key, value in case.env:
        monkeypatch.setenv(key, str(ws / value) if "/" in value and not value.startswith("hf_") else value)
    if case.patch is not None:
        case.patch(monkeypatch)
    monkeypatch.chdir(ws / "cwd")
    argv = [_fill(a, ws) for a in case.argv]
    inputs = _inputs(argv, ws)
    hashes = {p: _sha256(p) for p in inputs}
    listing = _listing(ws)
    capsys.readouterr()

    code = _run(case.command, argv)
    out, err = capsys.readouterr()

    assert code == case.code, f"{name}: exit {code}, expected {case.code}: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"{name}: not one line: {err!r}"
    assert err.startswith("error: "), f"{name}: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, f"{name}: {err!r}"
    culprit = _fill(case.culprit, ws)
    assert culprit in err, f"{name}: the message does not name {culprit!r}: {err!r}"
    assert out == "", f"{name}: printed {out!r}"
    assert {p: _sha256(p) for p in inputs} == hashes, f"{name}: an input file changed"
    after = _listing(ws)
    assert after == listing, (f"{name}: the workspace changed: added {sorted(set(after) - set(listing))}, removed "
                              f"{sorted(set(listing) - set(after))}, changed "
                              f"{sorted(k for k in after if k in listing and after[k] != listing[k])}")
    assert not (ws / "pwned").exists()


def test_the_catalogue_covers_every_command_with_at_least_60_cases():
    per_command = {c: sum(case.command == c for case in CATALOGUE.values())
                   for c in ("compose", "generate", "check", "push", "extract")}
    assert len(CATALOGUE) >= 60 and min(per_command.values()) >= 8, per_command


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
        model.save_pretrained(other)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    model.save_pretrained(saved)  # its own earlier output: replaced
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
