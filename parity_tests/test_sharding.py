"""Sharded outputs in Hugging Face's layouts, the streaming writers' bytes, and the readers that go with them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from convert.base import writing
from convert.base.checkpoint import Checkpoint
from convert.compose import compose, main
from convert.base.errors import ConvertError
from convert.verify import compare_weight_files, seeded_inputs
from convert.base.writing import MsgpackWriter, SafetensorsWriter, TensorSpec, parse_size
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

ENCODER, DECODER = "w2v_group", "bart_causal"
SHARD = "60kB"  # the tiny pair is ~0.5 MB of float32: several shards, and tensors bigger than a shard


@pytest.fixture(scope="module")
def outputs(fixture_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny pair composed four ways: float32 / bfloat16, single files / sharded."""
    root = tmp_path_factory.mktemp("sharding")
    out = {}
    for dtype in ("float32", "bfloat16"):
        for shard in (None, SHARD):
            name = f"{dtype}-{'sharded' if shard else 'single'}"
            out[name] = compose(str(fixture_dir(ENCODER)), str(fixture_dir(DECODER)), root / name, dtype=dtype,
                                max_shard_size=shard, verify=False, progress=False, log=io.StringIO()).output
    return out


def _index(directory: Path, name: str) -> dict:
    return json.loads((directory / name).read_text())


@pytest.mark.parametrize("kind", ["safetensors", "msgpack"])
def test_sharded_output_is_hf_layout_and_every_tensor_is_in_one_shard(outputs, kind):
    single, sharded = outputs["float32-single"], outputs["float32-sharded"]
    base, index_name = ("model", "model.safetensors.index.json") if kind == "safetensors" else \
        ("flax_model", "flax_model.msgpack.index.json")
    assert not (sharded / f"{base}.{kind}").exists() and not (single / index_name).exists()
    text = (sharded / index_name).read_text()
    index = json.loads(text)
    # transformers writes json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    shards = sorted(p.name for p in sharded.glob(f"{base}-*.{kind}"))
    n = len(shards)
    assert n >= 3 and shards == [f"{base}-{k:05d}-of-{n:05d}.{kind}" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)

    reference = _tensors(single, kind, [f"{base}.{kind}"])
    per_shard = {name: _tensors(sharded, kind, [name]) for name in shards}
    seen = [key for tensors in per_shard.values() for key in tensors]
    assert len(seen) == len(set(seen)), "a tensor is in two shards"
    assert set(seen) == set(reference) == set(index["weight_map"])
    for name, tensors in per_shard.items():
        assert all(index["weight_map"][key] == name for key in tensors)
        for key, value in tensors.items():
            assert value.dtype == reference[key].dtype and value.tobytes() == reference[key].tobytes(), key
        # Greedy in write order: a shard only exceeds the limit when it holds a single larger tensor.
        size = sum(v.nbytes for v in tensors.values())
        assert size <= parse_size(SHARD) or len(tensors) == 1, (name, size)

    if kind == "safetensors":  # keyed by PyTorch name, as PreTrainedModel.save_pretrained
        assert set(index["metadata"]) == {"total_parameters", "total_size"}
        assert index["metadata"]["total_parameters"] == sum(v.size for v in reference.values())
        assert all("/" not in key for key in index["weight_map"])
    else:  # keyed by "/"-joined Flax path, as FlaxPreTrainedModel.save_pretrained
        assert set(index["metadata"]) == {"total_size"}
        assert all(key.startswith(("encoder/", "decoder/")) for key in index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in reference.values())


def _tensors(directory: Path, kind: str, files: list[str]) -> dict[str, np.ndarray]:
    """The tensors of some weight files, read the way transformers reads them (safetensors / flax)."""
    out: dict[str, np.ndarray] = {}
    for name in files:
        if kind == "safetensors":
            with safe_open(directory / name, "np") as f:
                assert f.metadata() == {"format": "pt"}
                out.update({k: f.get_tensor(k) for k in f.keys()})
        else:  # FlaxPreTrainedModel.load_flax_sharded_weights: restore each shard, flatten with "/"
            tree = serialization.msgpack_restore((directory / name).read_bytes())
            out.update(traverse_util.flatten_dict(tree, sep="/"))
    return out


def test_sharded_output_loads_in_both_frameworks_with_identical_logits(outputs):
    single, sharded = outputs["float32-single"], outputs["float32-sharded"]
    flax_single = FlaxSpeechEncoderDecoderModel.from_pretrained(single)
    flax_sharded = FlaxSpeechEncoderDecoderModel.from_pretrained(sharded)
    batch = seeded_inputs(flax_single.config, seed=2, seconds=0.1)
    a, b = np.asarray(flax_single(**batch).logits), np.asarray(flax_sharded(**batch).logits)
    assert np.array_equal(a, b), f"max|diff|={np.max(np.abs(a - b)):.2e}"

    inputs = [torch.from_numpy(batch[k]) for k in ("inputs", "attention_mask", "decoder_input_ids")]
    logits = []
    for directory in (single, sharded):
        model, _ = torch_from_pretrained(directory)
        with torch.no_grad():
            logits.append(model.eval()(*inputs).logits.numpy())
    assert np.array_equal(logits[0], logits[1]), f"max|diff|={np.max(np.abs(logits[0] - logits[1])):.2e}"
    assert compare_weight_files(sharded)["mismatched"] == []


def test_save_pretrained_shards_and_from_pretrained_reads_them_back(outputs, tmp_path):
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(outputs["float32-single"])
    files = model.save_pretrained(tmp_path / "saved", max_shard_size=SHARD)
    names = {f.name for f in files}
    assert {"flax_model.msgpack.index.json", "model.safetensors.index.json"} <= names
    assert "flax_model.msgpack" not in names and "model.safetensors" not in names
    again = FlaxSpeechEncoderDecoderModel.from_pretrained(tmp_path / "saved")
    a = traverse_util.flatten_dict(model.params, sep="/")
    b = traverse_util.flatten_dict(again.params, sep="/")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert compare_weight_files(tmp_path / "saved")["mismatched"] == []


def test_bfloat16_sharded_output_has_bfloat16_weights_and_half_the_bytes(outputs):
    f32, bf16 = outputs["float32-sharded"], outputs["bfloat16-sharded"]
    for prefer in (("flax_model.msgpack.index.json",), ("model.safetensors.index.json",)):
        checkpoint = Checkpoint(bf16, prefer=prefer)
        assert {checkpoint.info(k).dtype for k in checkpoint.keys()} == {np.dtype(ml_dtypes.bfloat16)}
    for index in ("flax_model.msgpack.index.json", "model.safetensors.index.json"):
        half, full = _index(bf16, index)["metadata"]["total_size"], _index(f32, index)["metadata"]["total_size"]
        assert 2 * half == full, (index, half, full)
    ratio = _shards_size(bf16) / _shards_size(f32)
    assert 0.45 < ratio < 0.6, ratio
    assert compare_weight_files(bf16)["mismatched"] == []


def _shards_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if re.search(r"-of-\d+\.(msgpack|safetensors)$", p.name))


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 2**30), ("100kB", 10**5), ("1.5GB", 15 * 10**8),
    (" 64 MiB ", 64 * 2**20), ("0", None), (None, None), (123, 123),
])
def test_parse_size_reads_hf_style_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["junk", "2XB", "-1GB", "GB", "1..5MB"])
def test_bad_max_shard_size_is_one_line_naming_the_flag(text, tmp_path, capsys):
    with pytest.raises(ConvertError, match="^max_shard_size="):  # the API names its parameter
        parse_size(text)
    assert main(["--encoder", "wav2vec2", "--decoder", "bart", "--output", str(tmp_path / "o"),
                 f"--max-shard-size={text}", "--no-progress"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert err.startswith(f"error: --max-shard-size {text.strip()}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------
# The streaming writers write the same bytes as the libraries they stand in for


def _mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((24, 40)).astype(np.float32)
    conv = rng.standard_normal((8, 3, 5)).astype(np.float32)
    return {
        "b.kernel_t": kernel.T,  # strided views, as the composer passes transposed kernels
        "a.conv_t": np.transpose(conv, (2, 1, 0)),
        "c.bf16_t": rng.standard_normal((33, 17)).astype(ml_dtypes.bfloat16).T,
        "d.half": rng.standard_normal((7,)).astype(np.float16),
        "e.ids": np.arange(9, dtype=np.int64).reshape(3, 3),
        "f.mask": rng.random(5) > 0.5,
        "g.empty": np.zeros((0, 4), np.float32),
        "h.scalar": np.array(1.5, np.float64),
    }


def test_safetensors_writer_bytes_equal_safetensors_save_file(tmp_path, monkeypatch):
    monkeypatch.setattr(writing, "_STAGING_BYTES", 256)  # force several staging slabs per tensor
    tensors = _mixed_tensors()
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    order = sorted(tensors, reverse=True)  # any arrival order: each tensor lands at its offset
    writer = SafetensorsWriter(tmp_path / "ours.safetensors",
                               [TensorSpec(k, tensors[k].dtype, tensors[k].shape) for k in order], {"format": "pt"})
    for key in order:
        writer.write(key, tensors[key])
    writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_msgpack_writer_bytes_equal_flax_to_bytes_and_read_back(tmp_path, monkeypatch, chunk):
    if chunk:  # flax splits leaves over MAX_CHUNK_SIZE bytes; shrink both limits to exercise that path
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk)
        monkeypatch.setattr(writing, "_MSGPACK_MAX_LEAF", chunk)
    monkeypatch.setattr(writing, "_STAGING_BYTES", 256)
    flat = {k.replace(".", "/"): v for k, v in _mixed_tensors().items()}
    flat = {f"{k[0]}/x/{k}": v for k, v in flat.items()}  # a deeper tree
    expected = serialization.to_bytes(traverse_util.unflatten_dict(
        {k: np.array(v, order="C") for k, v in sorted(flat.items())}, sep="/"))
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in sorted(flat.items())]
    writer = MsgpackWriter(tmp_path / "flax_model.msgpack", specs)
    for key in sorted(flat):
        writer.write(key, flat[key])
    writer.close()
    assert (tmp_path / "flax_model.msgpack").read_bytes() == expected
    # ...and our reader indexes it without loading it, chunks included.
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    assert sorted(checkpoint.keys()) == sorted(flat)
    for key, value in flat.items():
        got = checkpoint.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes(), key


@pytest.mark.parametrize("cut", [0, 9, 100, -1])
def test_truncated_msgpack_is_refused(tmp_path, cut):
    data = serialization.to_bytes({"a": {"kernel": np.ones((4, 4), np.float32)}, "b": np.zeros(3, np.int32)})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "flax_model.msgpack").write_bytes(data[:cut])
    with pytest.raises(ConvertError, match="flax_model.msgpack: truncated or corrupt msgpack file"):
        Checkpoint(tmp_path)


def test_bin_reads_are_exact_after_their_pages_are_released(fixture_dir):
    """`.bin` tensors are copied out of the memory map and their pages dropped; tied tensors share a storage,
    so reading one after the other was released must still give the stored values."""
    directory = fixture_dir("bart_cg")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    checkpoint = Checkpoint(directory)
    for _ in range(2):
        for key, value in state.items():
            got = checkpoint.get(key)
            assert got.flags.writeable and np.array_equal(got, value.numpy()), key
