"""`convert.extract`: a composed model's decoder or encoder written as a checkpoint of its own, in the part's
transformers format (that transformers loads it, and computes what our models compute on it, is checked against the
goldens in test_goldens.py; its refusals are in test_safety.py's catalogue)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.base.checkpoint import Checkpoint
from convert.base.params import load_params
from convert.extract import extract
from flax_model.speech_encoder_decoder import param_shapes

# An encoder wider than the decoder (so the composed model has enc_to_dec_proj) and a GPT-2 whose cross-attention
# the composer created.
PAIR = ("w2v_stable_wide", "gpt2_lm")


def composed_tensors(directory) -> dict[str, np.ndarray]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_extracted_part_holds_the_composed_tensors_bit_for_bit(part, composed_dir, tmp_path):
    directory = tmp_path / "composed"
    shutil.copytree(composed_dir(*PAIR), directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (directory / name).write_text(json.dumps({"file": name}))
    result = extract(directory, part, tmp_path / part, log=io.StringIO())
    out = result.output

    composed = composed_tensors(directory)
    want = {k[len(part) + 1:]: v for k, v in composed.items() if k.startswith(f"{part}.")}
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), f"{key} differs from the composed model's"

    config = json.loads((directory / "config.json").read_text())[part]
    written = json.loads((out / "config.json").read_text())
    expected_class = "GPT2LMHeadModel" if part == "decoder" else "Wav2Vec2Model"
    assert written == {**config, "architectures": [expected_class]}
    assert result.report["transformers_class"] == expected_class
    assert [key for key, _ in result.report["left_out"]] == sorted(k for k in composed if k.startswith("enc_to_dec"))
    assert result.report["left_out"], "the pair was chosen to have a projection"
    extra = {"decoder": {"tokenizer.json", "tokenizer_config.json"}, "encoder": {"preprocessor_config.json"}}[part]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "compose_report.json", *extra}
    assert all((out / name).read_bytes() == (directory / name).read_bytes() for name in extra)


def test_extracted_decoder_loads_as_its_own_architecture(composed_dir, tmp_path):
    """Every parameter our GPT-2 with cross-attention needs is in the file, under the names it reads."""
    out = extract(composed_dir(*PAIR), "decoder", tmp_path / "dec", log=io.StringIO()).output
    loaded = load_params(out, param_shapes)
    assert loaded.config.has_cross_attention and not loaded.plan.missing


def test_extract_reads_flax_weights_alone_into_the_same_bytes(composed_dir, tmp_path):
    directory = composed_dir(*PAIR)
    flax_only = tmp_path / "flax_only"
    shutil.copytree(directory, flax_only)
    (flax_only / "model.safetensors").unlink()
    from_flax = extract(flax_only, "decoder", tmp_path / "a", log=io.StringIO()).output
    from_torch = extract(directory, "decoder", tmp_path / "b", log=io.StringIO()).output
    a, b = load_file(str(from_flax / "model.safetensors")), load_file(str(from_torch / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_extract_keeps_bfloat16_and_shards_on_request(composed_dir, tmp_path):
    directory = composed_dir(*PAIR, dtype="bfloat16")
    out = extract(directory, "encoder", tmp_path / "enc", max_shard_size=20_000, log=io.StringIO()).output
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    shards = Checkpoint(out)
    composed = Checkpoint(directory)
    assert len(shards.weight_files) > 1
    for key in shards.keys():
        array = shards.get(key)
        assert array.dtype.name == "bfloat16", key
        assert array.tobytes() == composed.get(f"encoder.{key}").tobytes(), key


def test_overwrite_replaces_an_earlier_extraction(composed_dir, tmp_path):
    directory = composed_dir(*PAIR)
    out = tmp_path / "part"
    extract(directory, "decoder", out, log=io.StringIO())
    extract(directory, "encoder", out, overwrite=True, log=io.StringIO())
    assert json.loads((out / "config.json").read_text())["model_type"] == "wav2vec2"
