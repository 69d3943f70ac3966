"""Corrupt data, impossible sizes and bad labels: a catalogue of what a user meets, each refused with one line.

The companion of `test_safety.py` (the output half): integrity (safetensors files whose tensors share, skip or
overrun bytes; training checkpoints whose files changed since they were saved; configs whose layer counts or sizes
the weights cannot fill), resources (work that cannot fit in memory, refused before it is built, `--max-memory`)
and data (manifests, transcripts with words the tokenizer does not know, labels a loss cannot score).

Every entry of `CATALOGUE` is either a command (`main(argv)` in-process) or a call of the Python API. It asserts
the exit code (2 usage, 1 other) or the exception type, one line naming the culprit (for a command: on stderr,
starting `error: `, nothing on stdout), no traceback and no internal error, and that nothing changed: the sha256
of every input file and the listing of every path in the workspace (nothing added, removed or replaced).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import resource
import shutil
import signal
import struct
import threading
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.base.errors import CheckpointError, KeyMapError, OutputError, UnsupportedConfig, UsageError
from convert.base.resources import ResourceError
from convert.check import check
from convert.compose import BUILTIN_DIR, compose
from convert.training_data import DataError
from parity_tests.file_state import listing as tree_listing
from parity_tests.file_state import sha256

# ----------------------------------------------------------------------------------------------------------
# The workspace: sources, a composed model, audio, manifests and checkpoints, shared by the cases of a worker

WORDS = ("one two", "three", "four five six", "seven", "eight nine", "zero one")
WORD_VOCAB = ("<s>", "<pad>", "</s>", "<unk>", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
              "nine")


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype(np.int16).tobytes())
    return path


def _tone(seconds: float, pitch: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (8000 * np.sin(2 * np.pi * pitch * t) + 300 * rng.standard_normal(t.shape)).astype(np.int16)


def _manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer (as the demo model's): a word outside its vocabulary becomes <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORD_VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(WORD_VOCAB[:4]))
    tokenizer.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sources, the composed model, audio and manifests."""
    root = tmp_path_factory.mktemp("safety_data")
    shutil.copytree(BUILTIN_DIR / "wav2vec2", root / "enc")
    shutil.copytree(BUILTIN_DIR / "bart", root / "dec")
    shutil.copytree(BUILTIN_DIR / "gpt2", root / "gpt2")
    compose(str(root / "enc"), str(root / "dec"), root / "model", verify=False, progress=False, log=io.StringIO())
    shutil.copytree(root / "model", root / "words")
    _word_tokenizer(root / "words")
    for name in ("cwd", "home", "v", "ck"):
        (root / name).mkdir()
    (root / "file.txt").write_text("a file, not a directory")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(WORDS):
        _write_wav(data / f"u{i}.wav", _tone(0.3 + 0.05 * len(text.split()), 200 + 40 * i, rng))
        rows.append({"audio": f"u{i}.wav", "text": text})
    _manifest(data / "train.jsonl", rows)
    _manifest(data / "eval.jsonl", rows[:2])
    _write_wav(data / "long.wav", np.zeros(16000 * 600, np.int16))  # ten minutes of silence
    _manifest(data / "train_long.jsonl", [*rows, {"audio": "long.wav", "text": "one"}])
    for name, text in (("unk_case", "One Two"), ("unk_digit", "3"), ("unk_punct", "seven."),
                       ("unk_later", "one <unk> two"), ("unk_many", "a b c d e f g")):
        _manifest(data / f"{name}.jsonl", [*rows[:3], {"audio": "u3.wav", "text": text}])
    lines = {
        "bad_json": '{"audio": "u0.wav", "text": "one"\n',
        "nested": "[" * 100_000 + "]" * 100_000 + "\n",
        "array": '["u0.wav", "one"]\n',
        "no_text": '{"audio": "u0.wav"}\n',
        "text_number": '{"audio": "u0.wav", "text": 3}\n',
        "text_blank": '{"audio": "u0.wav", "text": "   "}\n',
        "text_surrogate": '{"audio": "u0.wav", "text": "one \\ud800"}\n',  # a JSON escape of a lone surrogate
        "audio_surrogate": '{"audio": "u\\udc00.wav", "text": "one"}\n',
        "audio_missing": '{"audio": "nope.wav", "text": "one"}\n',
        "audio_null": '{"audio": null, "text": "one"}\n',
        "audio_directory": '{"audio": ".", "text": "one"}\n',
        "blank_only": "\n\n   \n",
    }
    for name, text in lines.items():
        (data / f"{name}.jsonl").write_text(text)
    (data / "latin1.jsonl").write_bytes('{"audio": "u0.wav", "text": "caf\xe9"}\n'.encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def objects(root: Path) -> dict[str, Any]:
    """The loaded models, a batch of inputs and the initial train state of a run on the workspace's data."""
    from convert.finetune_run import Run
    from convert.finetune_settings import FinetuneSettings
    from flax_model.training import init_state
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

    settings = FinetuneSettings(max_steps=4, batch_size=2, num_buckets=1, eval_batch_size=2, max_new_tokens=4)
    data = root / "data"
    run = Run(root / "model", data / "train.jsonl", data / "eval.jsonl", settings, root / "ck" / "unused")
    return {"flax": run.model, "torch": SpeechEncoderDecoderModel.from_pretrained(root / "model"),
            "inputs": np.random.default_rng(0).standard_normal((2, 800)).astype(np.float32),
            "state": init_state(run.model.params, run.optimizer, run.frozen_fn)}


@pytest.fixture(scope="module")
def ws(root: Path, objects: dict[str, Any]) -> Path:
    """The workspace, with orbax checkpoints of a run on its data (steps 2 and 4, as `--save-every 2` leaves
    them), saved through `save_checkpoint` from the initial train state (nothing is compiled), and copies of
    them edited after the save."""
    from convert.train_checkpoints import checkpoint_manager, save_checkpoint

    manager = checkpoint_manager(root / "ck" / "good")
    for step in (2, 4):
        save_checkpoint(manager, objects["state"].replace(step=np.int32(step)), {"loss": [[step, 1.0]], "eval": []})
    for name, edit in CHECKPOINT_EDITS.items():
        shutil.copytree(root / "ck" / "good", root / "ck" / name)
        edit(root / "ck" / name / "4")
    return root


def _largest_file(step: Path) -> Path:
    return max((p for p in step.rglob("*") if p.is_file() and p.name != "sha256_manifest.json"),
               key=lambda p: p.stat().st_size)


def _flip(count: int) -> Callable[[Path], None]:
    def edit(step: Path) -> None:
        path = _largest_file(step)
        data = bytearray(path.read_bytes())
        for i in np.random.default_rng(count).choice(len(data), min(count, len(data)), replace=False):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    return edit


def _truncate(step: Path) -> None:
    path = _largest_file(step)
    path.write_bytes(path.read_bytes()[:-100])


def _delete_data(step: Path) -> None:
    _largest_file(step).unlink()


def _add_file(step: Path) -> None:
    (step / "state" / "extra.bin").write_bytes(b"\0" * 16)


def _manifest_edit(how: str) -> Callable[[Path], None]:
    def edit(step: Path) -> None:
        path = step / "sha256_manifest.json"
        if how == "delete":
            path.unlink()
        elif how == "garble":
            path.write_text("{ not json")
        elif how == "wrong-hash":
            manifest = json.loads(path.read_text())
            name = sorted(manifest["files"])[0]
            manifest["files"][name]["sha256"] = "0" * 64
            path.write_text(json.dumps(manifest))
        elif how == "list":
            path.write_text(json.dumps({"format": 1, "files": ["not", "a", "map"]}))
    return edit


CHECKPOINT_EDITS: dict[str, Callable[[Path], None]] = {
    "flip400": _flip(400), "flip1": _flip(1), "truncated": _truncate, "data-deleted": _delete_data,
    "file-added": _add_file, "manifest-deleted": _manifest_edit("delete"), "manifest-garbled": _manifest_edit("garble"),
    "manifest-wrong-hash": _manifest_edit("wrong-hash"), "manifest-not-a-map": _manifest_edit("list"),
}


# Variants of the sources and the composed model, made on first use (before the workspace is measured).

def _copy(ws: Path, src: str, out: Path) -> None:
    if not out.exists():
        shutil.copytree(ws / src, out)


def _edit_config(src: str, **changes: Any) -> Callable[[Path, Path], None]:
    """`changes` by dotted key (`decoder.vocab_size` in a composed config)."""
    def make(ws: Path, out: Path) -> None:
        _copy(ws, src, out)
        config = json.loads((out / "config.json").read_text())
        for dotted, value in changes.items():
            node = config
            *parents, key = dotted.split(".")
            for parent in parents:
                node = node[parent]
            node[key] = value
        (out / "config.json").write_text(json.dumps(config))
    return make


def _safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_layout(src: str, how: str) -> Callable[[Path, Path], None]:
    """A safetensors file whose header lies about where the tensors are (every length still right)."""
    def make(ws: Path, out: Path) -> None:
        _copy(ws, src, out)
        path = out / "model.safetensors"
        header, data = _safetensors_parts(path)
        tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        if how == "shared":  # the second of two equally long tensors reads the first one's bytes
            sizes: dict[int, str] = {}
            for key in tensors:
                begin, end = header[key]["data_offsets"]
                if end - begin in sizes:
                    header[key]["data_offsets"] = header[sizes[end - begin]]["data_offsets"]
                    break
                sizes[end - begin] = key
        elif how == "shift4":  # every tensor 4 bytes later, 4 bytes added at the end: each reads its neighbour's
            for key in tensors:
                header[key]["data_offsets"] = [o + 4 for o in header[key]["data_offsets"]]
            data += b"\0" * 4
        elif how == "trailing":
            data += b"\0" * 16
        elif how == "gap":  # the last tensor 8 bytes further on
            header[tensors[-1]]["data_offsets"] = [o + 8 for o in header[tensors[-1]]["data_offsets"]]
            data += b"\0" * 8
        elif how == "overlap":  # a tensor starts 2 bytes into the one before
            key = tensors[len(tensors) // 2]
            header[key]["data_offsets"] = [o - 2 for o in header[key]["data_offsets"]]
        _write_safetensors(path, header, data)
    return make


VARIANTS: dict[str, Callable[[Path, Path], None]] = {
    # safetensors layout
    "dec_shared": _edit_layout("dec", "shared"),
    "dec_shift4": _edit_layout("dec", "shift4"),
    "dec_trailing": _edit_layout("dec", "trailing"),
    "dec_gap": _edit_layout("dec", "gap"),
    "enc_overlap": _edit_layout("enc", "overlap"),
    "enc_shared": _edit_layout("enc", "shared"),
    "model_shared": _edit_layout("model", "shared"),
    "model_shift4": _edit_layout("model", "shift4"),
    "model_trailing": _edit_layout("model", "trailing"),
    # configs the weights cannot fill
    "dec_layers_1e9": _edit_config("dec", decoder_layers=10**9),
    "dec_layers_3": _edit_config("dec", decoder_layers=3),
    "dec_layers_1": _edit_config("dec", decoder_layers=1),
    "dec_vocab_3e9": _edit_config("dec", vocab_size=3 * 10**9),
    "dec_vocab_1e9": _edit_config("dec", vocab_size=10**9),
    "dec_width_1e6": _edit_config("dec", d_model=10**6),
    "dec_ffn_2e31": _edit_config("dec", decoder_ffn_dim=2**31),
    "enc_layers_1e6": _edit_config("enc", num_hidden_layers=10**6),
    "enc_layers_1": _edit_config("enc", num_hidden_layers=1),
    "enc_conv_huge": _edit_config("enc", conv_dim=[2**40] * 7),
    "gpt2_layers_1e9": _edit_config("gpt2", n_layer=10**9),
    "gpt2_vocab_1e9": _edit_config("gpt2", vocab_size=10**9),
    "model_dec_layers_1e9": _edit_config("model", **{"decoder.decoder_layers": 10**9}),
    "model_enc_layers_1": _edit_config("model", **{"encoder.num_hidden_layers": 1}),
    "model_vocab_1e9": _edit_config("model", **{"decoder.vocab_size": 10**9}),
    "model_vocab_3e9": _edit_config("model", **{"decoder.vocab_size": 3 * 10**9}),
    "model_ffn_mismatch": _edit_config("model", **{"encoder.intermediate_size": 4096}),
}


# ----------------------------------------------------------------------------------------------------------
# The catalogue


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input to a command. `argv` and `culprit` may name `{ws}`; `variants` are made first."""

    command: str
    argv: tuple[str, ...]
    code: int
    culprit: str
    variants: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ApiCase:
    """One bad call of the Python API: `call(ws, objects)` must raise `error` naming `culprit`."""

    call: Callable[[Path, dict[str, Any]], Any]
    error: type[BaseException]
    culprit: str
    variants: tuple[str, ...] = ()


def case(command: str, args: str, code: int, culprit: str, *variants: str) -> Case:
    return Case(command, tuple(args.split()), code, culprit, variants)


V = "{ws}/v/"
D = "{ws}/data/"
ENC, DEC = "--encoder {ws}/enc", "--decoder {ws}/dec"
COMPOSE = f"{ENC} {DEC} --output {{ws}}/out --no-verify --no-progress"
GENERATE = "--model {ws}/model --no-progress"
FINETUNE_ARGS = ("--train {ws}/data/train.jsonl --eval {ws}/data/eval.jsonl --output {ws}/out --no-progress "
                 "--no-verify --max-steps 1 --batch-size 2 --num-buckets 1 --eval-batch-size 2 --max-new-tokens 4")
FINETUNE = "--model {ws}/model " + FINETUNE_ARGS


def finetune_with(**replace: str) -> str:
    """FINETUNE with some flags' values replaced (`train=...`, `model=...`)."""
    parts = FINETUNE.split()
    for flag, value in replace.items():
        parts[parts.index("--" + flag.replace("_", "-")) + 1] = value
    return " ".join(parts)


def _resume(name: str) -> str:
    return f"{FINETUNE} --resume --checkpoint-dir {{ws}}/ck/{name}"


CLI_CASES: dict[str, Case] = {
    # --- integrity: safetensors files whose tensors do not tile the data ---------------------------------------------
    "compose/safetensors-two-tensors-share-bytes": case("compose", f"{ENC} --decoder {V}dec_shared --output {{ws}}/out "
                                                        "--no-verify", 1, "dec_shared/model.safetensors: corrupt "
                                                        "safetensors file", "dec_shared"),
    "compose/safetensors-offsets-shifted-4-bytes": case("compose", f"{ENC} --decoder {V}dec_shift4 --output {{ws}}/out",
                                                        1, "dec_shift4/model.safetensors: corrupt", "dec_shift4"),
    "compose/safetensors-trailing-bytes": case("compose", f"{ENC} --decoder {V}dec_trailing --output {{ws}}/out", 1,
                                               "16 trailing byte(s)", "dec_trailing"),
    "compose/safetensors-gap": case("compose", f"{ENC} --decoder {V}dec_gap --output {{ws}}/out", 1,
                                    "8 byte(s) belong to no tensor", "dec_gap"),
    "compose/safetensors-overlap-in-encoder": case("compose", f"--encoder {V}enc_overlap {DEC} --output {{ws}}/out",
                                                   1, "enc_overlap/model.safetensors: corrupt", "enc_overlap"),
    "compose/safetensors-shared-in-encoder": case("compose", f"--encoder {V}enc_shared {DEC} --output {{ws}}/out", 1,
                                                  "overlaps", "enc_shared"),
    "check/safetensors-shared": case("check", f"{V}model_shared --format safetensors", 1,
                                     "model_shared/model.safetensors: corrupt", "model_shared"),
    "check/safetensors-shifted": case("check", f"{V}model_shift4", 1, "model_shift4/model.safetensors", "model_shift4"),
    "check/safetensors-trailing": case("check", f"{V}model_trailing --format safetensors", 1, "trailing byte(s)",
                                       "model_trailing"),
    "generate/torch-safetensors-shared": case("generate", f"--model {V}model_shared --framework torch --audio "
                                              f"{D}u0.wav", 1, "model_shared/model.safetensors", "model_shared"),
    "generate/torch-safetensors-trailing": case("generate", f"--model {V}model_trailing --framework torch --audio "
                                                f"{D}u0.wav", 1, "model_trailing/model.safetensors", "model_trailing"),
    # --- integrity: configs whose layer counts or sizes the weights cannot fill --------------------------------------
    "compose/decoder-layers-1e9": case("compose", f"{ENC} --decoder {V}dec_layers_1e9 --output {{ws}}/out", 1,
                                       "decoder_layers=1000000000 does not match the weights: model.safetensors hold 2 "
                                       "layer(s)", "dec_layers_1e9"),
    "compose/decoder-layers-3": case("compose", f"{ENC} --decoder {V}dec_layers_3 --output {{ws}}/out", 1,
                                     "decoder_layers=3 does not match the weights", "dec_layers_3"),
    "compose/decoder-layers-1": case("compose", f"{ENC} --decoder {V}dec_layers_1 --output {{ws}}/out", 1,
                                     "decoder_layers=1 does not match", "dec_layers_1"),
    "compose/encoder-layers-1e6": case("compose", f"--encoder {V}enc_layers_1e6 {DEC} --output {{ws}}/out", 1,
                                       "num_hidden_layers=1000000 does not match the weights", "enc_layers_1e6"),
    "compose/encoder-layers-1": case("compose", f"--encoder {V}enc_layers_1 {DEC} --output {{ws}}/out", 1,
                                     "num_hidden_layers=1 does not match", "enc_layers_1"),
    "compose/gpt2-n-layer-1e9": case("compose", f"{ENC} --decoder {V}gpt2_layers_1e9 --output {{ws}}/out", 1,
                                     "n_layer=1000000000 does not match", "gpt2_layers_1e9"),
    "compose/vocab-above-int32": case("compose", f"{ENC} --decoder {V}dec_vocab_3e9 --output {{ws}}/out", 1,
                                      "vocab_size=3000000000 must be at most 2147483647", "dec_vocab_3e9"),
    "compose/ffn-above-int32": case("compose", f"{ENC} --decoder {V}dec_ffn_2e31 --output {{ws}}/out", 1,
                                    "decoder_ffn_dim=2147483648 must be at most", "dec_ffn_2e31"),
    "compose/conv-dims-above-int32": case("compose", f"--encoder {V}enc_conv_huge {DEC} --output {{ws}}/out", 1,
                                          "conv_dim=", "enc_conv_huge"),
    "compose/vocab-1e9-names-the-field": case("compose", f"{ENC} --decoder {V}dec_vocab_1e9 --output {{ws}}/out", 1,
                                              "(config: vocab_size=1000000000)", "dec_vocab_1e9"),
    "compose/width-1e6-names-the-field": case("compose", f"{ENC} --decoder {V}dec_width_1e6 --output {{ws}}/out", 1,
                                              "d_model=1000000", "dec_width_1e6"),
    "compose/gpt2-vocab-1e9-names-the-field": case("compose", f"{ENC} --decoder {V}gpt2_vocab_1e9 --output {{ws}}/out",
                                                   1, "vocab_size=1000000000", "gpt2_vocab_1e9"),
    "check/model-decoder-layers-1e9": case("check", f"{V}model_dec_layers_1e9", 1,
                                           "decoder.decoder_layers=1000000000 does not match the weights",
                                           "model_dec_layers_1e9"),
    "check/model-encoder-layers-1": case("check", f"{V}model_enc_layers_1", 1,
                                         "encoder.num_hidden_layers=1 does not match", "model_enc_layers_1"),
    "check/model-vocab-above-int32": case("check", f"{V}model_vocab_3e9", 1, "vocab_size=3000000000 must be at most",
                                          "model_vocab_3e9"),
    "check/model-vocab-1e9": case("check", f"{V}model_vocab_1e9 --format flax", 1, "decoder.vocab_size=1000000000",
                                  "model_vocab_1e9"),
    "generate/model-decoder-layers-1e9": case("generate", f"--model {V}model_dec_layers_1e9 --audio {D}u0.wav", 1,
                                              "decoder.decoder_layers=1000000000", "model_dec_layers_1e9"),
    "generate/torch-model-decoder-layers-1e9": case("generate", f"--model {V}model_dec_layers_1e9 --framework torch "
                                                    f"--audio {D}u0.wav", 1, "decoder.decoder_layers=1000000000",
                                                    "model_dec_layers_1e9"),
    "generate/model-vocab-1e9": case("generate", f"--model {V}model_vocab_1e9 --audio {D}u0.wav", 1,
                                     "decoder.vocab_size=1000000000", "model_vocab_1e9"),
    "generate/model-intermediate-size": case("generate", f"--model {V}model_ffn_mismatch --audio {D}u0.wav", 1,
                                             "encoder.intermediate_size=4096", "model_ffn_mismatch"),
    "finetune/model-decoder-layers-1e9": case("finetune", finetune_with(model=f"{V}model_dec_layers_1e9"), 1,
                                              "decoder.decoder_layers=1000000000", "model_dec_layers_1e9"),
    "finetune/model-vocab-3e9": case("finetune", finetune_with(model=f"{V}model_vocab_3e9"), 1,
                                     "vocab_size=3000000000 must be at most", "model_vocab_3e9"),
    # --- integrity: training checkpoints whose files changed since they were saved -----------------------------------
    **{f"finetune/resume-checkpoint-{name}": case("finetune", _resume(name), 1, f"{{ws}}/ck/{name}/4")
       for name in CHECKPOINT_EDITS},
    "finetune/resume-corrupt-says-the-earlier-step": case("finetune", _resume("flip400"), 1,
                                                          "to resume from step 2, the checkpoint before"),
    "finetune/resume-flip-names-the-file": case("finetune", _resume("flip1"), 1, "differs from its sha256 at save"),
    "finetune/resume-checkpoint-beyond-the-steps": case("finetune", _resume("good"), 2,
                                                        "--resume: the checkpoint in {ws}/ck/good is at step 4, beyond "
                                                        "this run's 1 step"),
    "finetune/eval-ctc-weight-without-a-ctc-head": case("finetune", f"{FINETUNE} --eval-ctc-weight 0.3", 2,
                                                        "--eval-ctc-weight 0.3: the model has no CTC head"),
    "finetune/lora-alpha-without-lora-rank": case("finetune", f"{FINETUNE} --lora-alpha 4", 2,
                                                  "--lora-alpha 4.0: applies to LoRA: set --lora-rank R to use it"),
    "finetune/lora-dropout-without-lora-rank": case("finetune", f"{FINETUNE} --lora-dropout 0.1", 2,
                                                    "--lora-dropout 0.1: applies to LoRA"),
    "finetune/fresh-run-into-old-checkpoints": case("finetune", f"{FINETUNE} --checkpoint-dir {{ws}}/ck/good", 2,
                                                    "{ws}/ck/good: holds checkpoints of an earlier run"),
    # --- resources: work that cannot fit in memory -------------------------------------------------------------------
    "generate/batch-size-100000": case("generate", f"{GENERATE} --audio {D}u0.wav --batch-size 100000", 1,
                                       "--batch-size 100000: a batch of 100000 utterances"),
    "generate/max-memory-below-the-parameters": case("generate", f"{GENERATE} --audio {D}u0.wav --max-memory 100kB",
                                                     1, "the model: holding its parameters needs at least 429.8 kB"),
    "generate/max-memory-unreadable": case("generate", f"{GENERATE} --audio {D}u0.wav --max-memory lots", 2,
                                           "--max-memory lots: cannot read it as a size"),
    "generate/max-memory-zero": case("generate", f"{GENERATE} --audio {D}u0.wav --max-memory 0", 2,
                                     "--max-memory 0: must be more than 0 bytes"),
    "generate/max-memory-negative": case("generate", f"{GENERATE} --audio {D}u0.wav --max-memory -1GB", 2,
                                         "--max-memory"),
    "check/ten-minute-audio": case("check", f"{{ws}}/model --audio {D}long.wav", 1,
                                   "{ws}/data/long.wav: 600.0 s of audio in the check's forward passes"),
    "check/max-memory-below-the-parameters": case("check", "{ws}/model --max-memory 100kB", 1,
                                                  "{ws}/model: holding its parameters"),
    "check/max-memory-below-the-forward": case("check", "{ws}/model --max-memory 600kB", 1,
                                               "{ws}/model: the check's forward passes on 2 seeded utterances"),
    "check/max-memory-unreadable": case("check", "{ws}/model --max-memory 12XB", 2, "--max-memory 12XB"),
    "finetune/600-second-utterance": case("finetune", finetune_with(train=f"{D}train_long.jsonl"), 1,
                                          "{ws}/data/train_long.jsonl:7: {ws}/data/long.wav holds 600.0 s of audio"),
    "finetune/batch-size-100000": case("finetune", finetune_with(batch_size="100000"), 1,
                                       "--batch-size 100000: a training step of 100000 utterances"),
    "finetune/eval-batch-size-100000": case("finetune", finetune_with(eval_batch_size="100000"), 1,
                                            "--eval-batch-size 100000: an evaluation batch"),
    "finetune/max-memory-below-the-parameters": case("finetune", f"{FINETUNE} --max-memory 10kB", 1,
                                                     "--model {ws}/model: holding its parameters"),
    "finetune/audio-beyond-max-memory": case("finetune", f"{FINETUNE} --max-memory 500kB", 1,
                                             "--train {ws}/data/train.jsonl: 0.00 h of training audio"),
    "finetune/train-state-beyond-max-memory": case("finetune", f"{FINETUNE} --max-memory 1MB", 1,
                                                   "--model {ws}/model: its train state"),
    "finetune/max-memory-unreadable": case("finetune", f"{FINETUNE} --max-memory much", 2, "--max-memory much"),
    "compose/max-memory-below-verification": case("compose", f"{ENC} {DEC} --output {{ws}}/out --max-memory 100kB", 1,
                                                  "needs at least 1.0 MB of memory"),
    "compose/max-memory-below-streaming": case("compose", f"{COMPOSE} --max-memory 1kB", 1,
                                               "to stream into the two weight files"),
    "compose/max-memory-unreadable": case("compose", f"{COMPOSE} --max-memory ten", 2, "--max-memory ten"),
    # --- data: transcripts the tokenizer cannot encode ---------------------------------------------------------------
    "finetune/unk-capitalised-words": case("finetune", finetune_with(model="{ws}/words", train=f"{D}unk_case.jsonl"), 1,
                                           "{ws}/data/unk_case.jsonl:4: the transcript 'One Two' has 2 word(s) the "
                                           "tokenizer does not know: 'One', 'Two'"),
    "finetune/unk-digit": case("finetune", finetune_with(model="{ws}/words", train=f"{D}unk_digit.jsonl"), 1,
                               "unk_digit.jsonl:4: the transcript '3' has 1 word(s)"),
    "finetune/unk-punctuation": case("finetune", finetune_with(model="{ws}/words", train=f"{D}unk_punct.jsonl"), 1,
                                     "'seven.'"),
    "finetune/unk-literal-token": case("finetune", finetune_with(model="{ws}/words", train=f"{D}unk_later.jsonl"), 1,
                                       "'<unk>'"),
    "finetune/unk-says-the-flag": case("finetune", finetune_with(model="{ws}/words", train=f"{D}unk_many.jsonl"), 1,
                                       "pass --allow-unk to train on them anyway"),
    # --- data: manifests ---------------------------------------------------------------------------------------------
    **{f"finetune/train-manifest-{name}": case("finetune", finetune_with(train=f"{D}{name}.jsonl"), 1,
                                               f"{{ws}}/data/{name}.jsonl{where}")
       for name, where in (("bad_json", ":1: not a JSON object"), ("nested", ":1: not a JSON object (nested"),
                           ("array", ":1: not a JSON object"), ("no_text", ":1: 'text' must be"),
                           ("text_number", ":1: 'text' must be"), ("text_blank", ":1: 'text' must be"),
                           ("text_surrogate", ":1: 'text' is not valid Unicode text: a lone surrogate U+D800"),
                           ("audio_surrogate", ":1: 'audio' is not valid Unicode text"),
                           ("audio_missing", ":1: audio"), ("audio_null", ":1: 'audio' must be"),
                           ("audio_directory", ":1: audio {ws}/data: is a directory, not an audio file"),
                           ("blank_only", ": the manifest holds no examples"), ("latin1", ": not UTF-8 text"))},
    "finetune/eval-manifest-nested": case("finetune", finetune_with(eval=f"{D}nested.jsonl"), 1,
                                          "{ws}/data/nested.jsonl:1"),
    "finetune/eval-manifest-missing": case("finetune", finetune_with(eval=f"{D}nope.jsonl"), 1,
                                           "{ws}/data/nope.jsonl: no such manifest file"),
    **{f"generate/manifest-{name}": case("generate", f"{GENERATE} --manifest {D}{name}.jsonl", 1,
                                         f"{{ws}}/data/{name}.jsonl{where}")
       for name, where in (("bad_json", ":1: not valid JSON"), ("nested", ":1: not valid JSON (nested"),
                           ("array", ":1: expected an object"), ("text_number", ':1: "text" must be a string'),
                           ("audio_missing", ":1: {ws}/data/nope.wav: no such audio file"),
                           ("audio_null", ":1: expected an object"), ("blank_only", ": the manifest lists no audio"),
                           ("latin1", ": not UTF-8 text"))},
    # --- data: settings a loss cannot use ----------------------------------------------------------------------------
    **{f"finetune/label-smoothing-{value}": case("finetune", f"{FINETUNE} --label-smoothing {value}", 2,
                                                 f"--label-smoothing {value}")
       for value in ("1.0", "1", "-0.1", "nan", "inf", "2")},
}


# The Python API: model.loss in both frameworks, train_step, from_pretrained, the library functions.

def _flax_loss(labels: Any, **kw: Any) -> Callable[[Path, dict[str, Any]], Any]:
    return lambda ws, o: o["flax"].loss(o["inputs"], None, labels, **kw)


def _torch_loss(labels: Any, **kw: Any) -> Callable[[Path, dict[str, Any]], Any]:
    import torch

    def call(ws: Path, o: dict[str, Any]) -> Any:
        return o["torch"].loss(torch.from_numpy(o["inputs"]), None, torch.as_tensor(np.asarray(labels)), **kw)
    return call


GOOD_LABELS = [[5, 6, -100], [7, -100, -100]]
BAD_LABELS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "id-equal-to-vocab": ([[5, 320, -100], [7, 8, 9]], {},
                          "token id 320 at [0, 1] is outside the decoder's vocabulary"),
    "id-far-beyond-vocab": ([[5, 6, 7], [7, 10**6, 9]], {}, "token id 1000000 at [1, 1]"),
    "negative-id-not-minus-100": ([[5, -1, 7], [7, 8, 9]], {}, "token id -1 at [0, 1]"),
    "minus-99": ([[5, 6, -99], [7, 8, 9]], {}, "token id -99"),
    "float-labels": (np.array([[5.0, 6.0], [7.0, 8.0]]), {}, "labels: dtype float64, expected integer token ids"),
    "bool-labels": (np.array([[True, False], [True, True]]), {}, "labels: dtype bool"),
    "one-dimensional": ([5, 6, 7], {}, "labels: shape [3], expected [batch, tokens]"),
    "rows-differ-from-inputs": ([[5, 6, 7]], {}, "labels: 1 rows, but the inputs have 2"),
    "all-padding": ([[-100, -100], [-100, -100]], {}, "no token to score"),
    "smoothing-2": (GOOD_LABELS, {"label_smoothing": 2.0}, "label_smoothing=2.0: must be at least 0 and below 1"),
    "smoothing-1": (GOOD_LABELS, {"label_smoothing": 1.0}, "label_smoothing=1.0"),
    "smoothing-negative": (GOOD_LABELS, {"label_smoothing": -0.1}, "label_smoothing=-0.1"),
    "smoothing-nan": (GOOD_LABELS, {"label_smoothing": float("nan")}, "label_smoothing=nan"),
    "smoothing-string": (GOOD_LABELS, {"label_smoothing": "0.1"}, "label_smoothing='0.1': is not a number"),
}


def _train_step_with(labels: Any, smoothing: float = 0.0) -> Callable[[Path, dict[str, Any]], Any]:
    def call(ws: Path, o: dict[str, Any]) -> Any:
        from flax_model.training import StepFunctions, train_step

        def never(*args: Any) -> Any:
            raise AssertionError("the step ran")

        fns = StepFunctions(never, never, never, None, 320)
        batch = {"inputs": o["inputs"], "attention_mask": None, "labels": np.asarray(labels)}
        return train_step(fns, None, [(batch, None)], smoothing)
    return call


def _from_pretrained(framework: str, variant: str) -> Callable[[Path, dict[str, Any]], Any]:
    def call(ws: Path, o: dict[str, Any]) -> Any:
        if framework == "flax":
            from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel as Model
        else:
            from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel as Model
        return Model.from_pretrained(ws / "v" / variant)
    return call


def _transcribe(**kw: Any) -> Callable[[Path, dict[str, Any]], Any]:
    def call(ws: Path, o: dict[str, Any]) -> Any:
        from convert.transcribe import transcribe

        return transcribe(o["flax"], [ws / "data" / "u0.wav"], model_dir=ws / "model", progress=False, **kw)
    return call


def _restore(name: str) -> Callable[[Path, dict[str, Any]], Any]:
    def call(ws: Path, o: dict[str, Any]) -> Any:
        from convert.train_checkpoints import checkpoint_manager, restore_checkpoint

        return restore_checkpoint(checkpoint_manager(ws / "ck" / name), o["state"], ws / "ck" / name)
    return call


def _tokenizer_encode(text: str) -> Callable[[Path, dict[str, Any]], Any]:
    def call(ws: Path, o: dict[str, Any]) -> Any:
        from convert.training_data import LabelTokenizer

        return LabelTokenizer(ws / "words", 2, 2, 320).encode(text, "manifest.jsonl:9")
    return call


API_CASES: dict[str, ApiCase] = {
    **{f"api/flax-loss-{name}": ApiCase(_flax_loss(labels, **kw), UsageError, culprit)
       for name, (labels, kw, culprit) in BAD_LABELS.items()},
    **{f"api/torch-loss-{name}": ApiCase(_torch_loss(labels, **kw), UsageError, culprit)
       for name, (labels, kw, culprit) in BAD_LABELS.items()},
    "api/torch-loss-labels-not-a-tensor": ApiCase(
        lambda ws, o: o["torch"].loss(__import__("torch").from_numpy(o["inputs"]), None, GOOD_LABELS), UsageError,
        "labels: a list, expected a torch.Tensor"),
    "api/train-step-id-beyond-vocab": ApiCase(_train_step_with([[5, 400], [6, -100]]), UsageError, "token id 400"),
    "api/train-step-float-labels": ApiCase(_train_step_with(np.ones((2, 2), np.float32)), UsageError,
                                           "dtype float32"),
    "api/train-step-smoothing-1": ApiCase(_train_step_with([[5, 6], [7, 8]], 1.0), UsageError, "label_smoothing=1.0"),
    "api/flax-from-pretrained-layers-1e9": ApiCase(_from_pretrained("flax", "model_dec_layers_1e9"), UnsupportedConfig,
                                                   "decoder.decoder_layers=1000000000 does not match",
                                                   ("model_dec_layers_1e9",)),
    "api/torch-from-pretrained-layers-1e9": ApiCase(_from_pretrained("torch", "model_dec_layers_1e9"),
                                                    UnsupportedConfig, "decoder.decoder_layers=1000000000",
                                                    ("model_dec_layers_1e9",)),
    "api/flax-from-pretrained-vocab-1e9": ApiCase(_from_pretrained("flax", "model_vocab_1e9"), KeyMapError,
                                                  "(config: decoder.vocab_size=1000000000)", ("model_vocab_1e9",)),
    "api/torch-from-pretrained-vocab-1e9": ApiCase(_from_pretrained("torch", "model_vocab_1e9"), KeyMapError,
                                                   "decoder.vocab_size=1000000000", ("model_vocab_1e9",)),
    "api/torch-from-pretrained-shared-bytes": ApiCase(_from_pretrained("torch", "model_shared"), CheckpointError,
                                                      "model_shared/model.safetensors: corrupt", ("model_shared",)),
    "api/transcribe-batch-size-100000": ApiCase(_transcribe(batch_size=100000), ResourceError,
                                                "batch_size=100000: a batch of 100000 utterances"),
    "api/transcribe-max-memory-unreadable": ApiCase(_transcribe(max_memory="a lot"), UsageError,
                                                    "max_memory=a lot: cannot read it as a size"),
    "api/check-max-memory": ApiCase(lambda ws, o: check(str(ws / "model"), max_memory="100kB"), ResourceError,
                                    "model={ws}/model: holding its parameters"),
    "api/compose-max-memory": ApiCase(
        lambda ws, o: compose(str(ws / "enc"), str(ws / "dec"), ws / "out", max_memory=1000, log=io.StringIO(),
                              progress=False), ResourceError, "to verify"),
    **{f"api/restore-checkpoint-{name}": ApiCase(_restore(name), CheckpointError, f"ck/{name}/4")
       for name in ("flip400", "truncated", "manifest-deleted", "file-added")},
    "api/tokenizer-unknown-word": ApiCase(_tokenizer_encode("One two"), DataError,
                                          "manifest.jsonl:9: the transcript 'One two' has 1"),
    "api/tokenizer-names-the-api-switch": ApiCase(_tokenizer_encode("eleven"), DataError,
                                                  "pass allow_unk=True to train on them anyway"),
}

CATALOGUE: dict[str, Case | ApiCase] = {**CLI_CASES, **API_CASES}


# ----------------------------------------------------------------------------------------------------------
# Running a case


def _fill(text: str, root: Path) -> str:
    return text.replace("{ws}", str(root))


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_one_line_and_changes_nothing(name, ws, objects, capsys, monkeypatch):
    entry = CATALOGUE[name]
    for variant in entry.variants:
        if not (ws / "v" / variant).exists():
            VARIANTS[variant](ws, ws / "v" / variant)
    monkeypatch.setenv("HOME", str(ws / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ws / "cwd")
    inputs = sorted(p for p in ws.rglob("*") if p.is_file())
    hashes = {p: sha256(p) for p in inputs}
    listing = tree_listing(ws, directory_times=False)
    capsys.readouterr()

    if isinstance(entry, Case):
        argv = [_fill(a, ws) for a in entry.argv]
        module = importlib.import_module(f"convert.{entry.command}")
        try:
            code = module.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out, err = capsys.readouterr()
        assert code == entry.code, f"{name}: exit {code}, expected {entry.code}: {err!r}"
        assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), f"{name}: {err!r}"
        assert out == "", f"{name}: printed {out!r}"
        message = err
    else:
        with pytest.raises(BaseException) as info:
            entry.call(ws, objects)
        assert isinstance(info.value, entry.error), f"{name}: {type(info.value).__name__}: {info.value}"
        message = str(info.value)
        assert "\n" not in message, f"{name}: not one line: {message!r}"
    assert "Traceback" not in message and "internal error" not in message, f"{name}: {message!r}"
    culprit = _fill(entry.culprit, ws)
    assert culprit in message, f"{name}: the message does not name {culprit!r}: {message!r}"
    assert {p: sha256(p) for p in inputs} == hashes, f"{name}: an input file changed"
    after = tree_listing(ws, directory_times=False)
    assert after == listing, (f"{name}: the workspace changed: added {sorted(set(after) - set(listing))}, removed "
                              f"{sorted(set(listing) - set(after))}, changed "
                              f"{sorted(k for k in after if k in listing and after[k] != listing[k])}")


def test_the_catalogue_holds_at_least_100_cases_over_the_commands_and_the_api():
    kinds = {k: sum(name.startswith(k + "/") for name in CATALOGUE)
             for k in ("compose", "generate", "check", "finetune", "api")}
    assert len(CATALOGUE) >= 100 and min(kinds.values()) >= 8, kinds


# ----------------------------------------------------------------------------------------------------------
# What is accepted: the same checks let good input through


def test_a_good_checkpoint_resumes_and_reads_back_what_was_saved(ws, objects):
    from convert.train_checkpoints import checkpoint_manager, restore_checkpoint

    state, meta = restore_checkpoint(checkpoint_manager(ws / "ck" / "good"), objects["state"], ws / "ck" / "good")
    assert int(state.step) == 4 and meta["loss"] == [[4, 1.0]]
    import jax

    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state.params,
                        objects["state"].params)
    assert all(jax.tree.leaves(same))


def test_allow_unk_trains_on_unknown_words_and_counts_them(ws):
    from convert.training_data import LabelTokenizer

    tokenizer = LabelTokenizer(ws / "words", 2, 2, 320, allow_unk=True)
    ids = tokenizer.encode("One two 3", "m:1")
    assert ids.count(3) == 2 and ids[-1] == 2, ids
    tokenizer.encode("seven.", "m:2")
    assert tokenizer.unknown == {"utterances": 2, "tokens": 3, "words": {"One": 1, "3": 1, "seven.": 1}}


def test_labels_a_loss_can_score_pass_the_checks():
    from convert.base.labels import check_label_smoothing, check_labels

    for labels in (GOOD_LABELS, np.array(GOOD_LABELS, np.int32), np.array(GOOD_LABELS, np.int64),
                   np.array([[0, 319]], np.uint16)):
        check_labels(labels, 320, batch_size=len(labels))
    check_labels([[-100, -100]], 320, need_tokens=False)  # a padding row of a train step's micro-batch
    assert [check_label_smoothing(v) for v in (0, 0.0, 0.1, np.float32(0.5), 0.999)] == [0.0, 0.0, 0.1, 0.5, 0.999]


def test_a_checkpoint_write_that_fails_is_one_line_keeps_the_last_good_step_and_leaves_no_partial(ws, objects,
                                                                                                  tmp_path):
    """A file size limit (what a full disk looks like to orbax's writers): the save fails with EFBIG partway."""
    from convert.train_checkpoints import checkpoint_manager, save_checkpoint

    directory = tmp_path / "ck"
    shutil.copytree(ws / "ck" / "good", directory)
    shutil.rmtree(directory / "4")
    before = {p: sha256(p) for p in (directory / "2").rglob("*") if p.is_file()}
    manager = checkpoint_manager(directory)
    largest = _largest_file(ws / "ck" / "good" / "4").stat().st_size
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, hard))
    try:
        with pytest.raises(OutputError) as info:
            save_checkpoint(manager, objects["state"].replace(step=np.int32(4)), {"loss": []})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{directory / '4'}: the checkpoint of step 4 could not be "
                                                      "written (") and "File too large" in message, message
    assert f"the last good checkpoint, step 2, is kept in {directory}" in message, message
    assert sorted(p.name for p in directory.iterdir()) == ["2"], sorted(p.name for p in directory.iterdir())
    assert {p: sha256(p) for p in (directory / "2").rglob("*") if p.is_file()} == before


def test_a_checkpoint_that_cannot_be_created_is_one_line(ws, objects):
    from convert.train_checkpoints import checkpoint_manager, save_checkpoint

    listing = tree_listing(ws, directory_times=False)
    threads = set(threading.enumerate())
    with pytest.raises(OutputError) as info:
        save_checkpoint(checkpoint_manager(ws / "file.txt" / "ck"), objects["state"], {"loss": []})
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{ws / 'file.txt' / 'ck' / '0'}:"), info.value
    assert "there is no earlier checkpoint" in str(info.value)
    assert tree_listing(ws, directory_times=False) == listing
    # No writer thread is left waiting for a directory that will never exist (it held the exit for 5 minutes).
    waiting = [t.name for t in set(threading.enumerate()) - threads if t.is_alive() and not t.daemon]
    assert not waiting, f"threads left running: {waiting}"
