"""Parameters and batches on a device mesh: partition rules, box reads, sharded loading and sharded generation.

Runs on the 8 simulated CPU devices that `conftest.py` asks XLA for. The single-device results these tests
compare with come from the plain paths (`load_params`, `from_pretrained` without a mesh).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from unittest import mock

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import serialization, traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convert.base.checkpoint import FLAX_FIRST, FLAX_MSGPACK, SAFETENSORS, Checkpoint
from convert.base.keymap import KeyMap, Rule, T
from convert.base.params import load_params, read_config
from convert.base.registry import SPECS
from convert.base.spec import ShardingError, check_partition_rules, default_partition_rules
from flax_model.sharding import auto_mesh, load_sharded, partition_rules, partition_spec
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes
from scripts.make_fixtures import cases_by_arch

PAIRS = [("w2v_group", "bart_causal"), ("w2v_stable_adapter", "gpt2_xattn")]
# float32 logits of a data-split batch cannot match the whole batch bit for bit: XLA's CPU kernels sum in
# another order for another per-device batch (the single-device model itself differs by ~3e-6 on this
# fixture's logits, |logit| <= 10, between a batch of 3 and rows one by one). The bound is relative to the
# logits' magnitude: 1e-6 of it is 8 float32 ulps.
RELATIVE_TOLERANCE = 1e-6


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    assert len(jax.devices()) >= math.prod(shape), (
        f"{len(jax.devices())} devices: conftest.py sets XLA_FLAGS before JAX starts; was JAX started earlier?")
    return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), names)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


# ----------------------------------------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_leaf_of_every_architecture_gets_a_valid_spec(spec, fixture_dir):
    """The rules derived from each registered key table reach every leaf of every fixture case, and the specs
    they give split only dimensions the mesh divides (a mesh of data 2, fsdp 4, model 2)."""
    sizes = {"data": 2, "fsdp": 4, "model": 2}
    rules = spec.partitioning
    split = 0
    for case in cases_by_arch()[spec.name]:
        shapes = param_shapes(read_config(Checkpoint(fixture_dir(case))))
        unmatched = [p for p in shapes if not any(re.fullmatch(regex, p) for regex, _ in rules)]
        assert not unmatched, f"{case}: no partition rule for {unmatched[:5]}"
        for path, shape in shapes.items():
            pspec = partition_spec(path, shape, rules, sizes)
            assert len(pspec) <= len(shape), f"{case}: {path} {shape} -> {pspec}"
            for dim, axes in zip(shape, pspec):
                names = () if axes is None else (axes,) if isinstance(axes, str) else axes
                assert dim % math.prod(sizes[n] for n in names) == 0, f"{case}: {path} {shape} -> {pspec}"
            split += any(axes is not None for axes in pspec)
    assert split > 0, f"{spec.name}: no leaf is split at all"


def test_default_rules_follow_the_transform_and_fall_back_to_replication():
    keymap = KeyMap("t", (
        Rule("layers.{i}.fc.weight", "layers/{i}/fc/kernel", T.LINEAR),
        Rule("layers.{i}.fc.bias", "layers/{i}/fc/bias", T.IDENTITY),
        Rule("conv.weight", "conv/kernel", T.CONV),
        Rule("embed.weight", "embed/embedding", T.EMBED),
        Rule("norm.weight", "norm/scale", T.NORM),
        Rule("pos.weight_v", "pos/weight_v", T.WEIGHT_NORM),
        Rule("pos.weight_g", "pos/weight_g", T.WEIGHT_NORM),
    ))
    rules = default_partition_rules(keymap)
    sizes = {"data": 2, "fsdp": 4, "model": 2}
    expected = {
        ("layers/12/fc/kernel", (32, 64)): PartitionSpec("fsdp", "model"),
        ("layers/3/fc/kernel", (30, 64)): PartitionSpec(None, "model"),  # 30 % 4: that dimension is replicated
        ("layers/3/fc/bias", (64,)): PartitionSpec(),
        ("conv/kernel", (10, 1, 32)): PartitionSpec(None, None, "model"),
        ("conv/kernel", (3, 32, 32)): PartitionSpec(None, "fsdp", "model"),
        ("embed/embedding", (50265, 32)): PartitionSpec(None, "fsdp"),
        ("embed/embedding", (66, 32)): PartitionSpec("model", "fsdp"),
        ("norm/scale", (32,)): PartitionSpec(),
        ("pos/weight_v", (32, 16, 128)): PartitionSpec("fsdp"),
        ("pos/weight_g", (1, 1, 128)): PartitionSpec(),
        ("layers/x/fc/kernel", (32, 64)): PartitionSpec(),  # no rule: replicated
    }
    for (path, shape), want in expected.items():
        assert partition_spec(path, shape, rules, sizes) == want, path
    # Missing and size-1 axes drop out.
    assert partition_spec("layers/0/fc/kernel", (32, 64), rules, {"fsdp": 8}) == PartitionSpec("fsdp")
    assert partition_spec("layers/0/fc/kernel", (32, 64), rules, {"fsdp": 1, "data": 8}) == PartitionSpec()
    # Several axes on one dimension: their product must divide it.
    both = (("w", (("data", "fsdp"), None)),)
    assert partition_spec("w", (16, 3), both, sizes) == PartitionSpec(("data", "fsdp"))
    assert partition_spec("w", (12, 3), both, sizes) == PartitionSpec()


def test_an_architecture_overrides_rules_without_losing_the_defaults():
    spec = next(s for s in SPECS if s.name == "bart")
    override = dataclasses.replace(spec, partition_rules=((r".*/fc1/kernel", ("model", "fsdp")),))
    sizes = {"fsdp": 4, "model": 2}
    assert partition_spec("model/decoder/layers/0/fc1/kernel", (32, 64), override.partitioning,
                          sizes) == PartitionSpec("model", "fsdp")
    assert partition_spec("model/decoder/layers/0/fc2/kernel", (64, 32), override.partitioning,
                          sizes) == PartitionSpec("fsdp", "model")


@pytest.mark.parametrize("rules, message", [
    (((r"a(", ("fsdp",)),), "not a valid regex"),
    (((r"a", ("fdsp",)),), "not mesh axes"),
    (((r"a", ("fsdp", "fsdp")),), "uses a mesh axis twice"),
    (((r"a", "fsdp"),), "not (regex, axes per dimension)"),
])
def test_bad_partition_rules_are_refused_in_one_line(rules, message):
    with pytest.raises(ShardingError) as info:
        check_partition_rules(rules, "bart: partition_rules")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("bart: partition_rules"), text
    spec = next(s for s in SPECS if s.name == "bart")
    with pytest.raises(ShardingError):
        dataclasses.replace(spec, partition_rules=rules)


def test_a_rule_with_more_dimensions_than_the_leaf_is_refused():
    with pytest.raises(ShardingError, match=r"^decoder/b: partition rule .* splits 2 dimensions of a leaf of shape"):
        partition_spec("decoder/b", (32,), ((r"decoder/b", ("fsdp", "model")),), {"fsdp": 4})


def test_a_mesh_with_an_unknown_axis_is_refused(composed_dir):
    mesh = _mesh((2, 4), ("data", "fsdpp"))
    with pytest.raises(ShardingError, match=r"^mesh: axis 'fsdpp' is not one of data, fsdp, model"):
        FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(*PAIRS[0]), mesh=mesh)


# ----------------------------------------------------------------------------------------------------------
# Box reads


@pytest.fixture(scope="module")
def box_files(tmp_path_factory) -> dict[str, Path]:
    """The same tensors in safetensors, Flax msgpack (arrays split in 96-byte chunks) and torch .bin files."""
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((5, 6, 7)).astype(np.float32),
        "b": rng.standard_normal((9, 4)).astype(ml_dtypes.bfloat16),
        "c": np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        "d": rng.standard_normal((11,)).astype(np.float16),
    }
    out = {}
    for kind in ("safetensors", "msgpack", "bin"):
        directory = tmp_path_factory.mktemp(f"boxes_{kind}")
        (directory / "config.json").write_text("{}")
        if kind == "safetensors":
            safetensors.numpy.save_file(arrays, str(directory / SAFETENSORS))
        elif kind == "msgpack":
            with mock.patch.object(serialization, "MAX_CHUNK_SIZE", 96):
                (directory / FLAX_MSGPACK).write_bytes(serialization.msgpack_serialize(arrays))
        else:
            state = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == ml_dtypes.bfloat16
                     else torch.from_numpy(v) for k, v in arrays.items()}
            torch.save(state, directory / "pytorch_model.bin")
        out[kind] = directory
    out["arrays"] = arrays  # type: ignore[assignment]
    return out


@st.composite
def _boxes(draw):
    key = draw(st.sampled_from("abcd"))
    shape = {"a": (5, 6, 7), "b": (9, 4), "c": (2, 3, 4), "d": (11,)}[key]
    index = []
    for n in shape[:draw(st.integers(0, len(shape)))]:
        start = draw(st.integers(0, n))
        index.append(slice(start, draw(st.integers(start, n))))
    return key, tuple(index)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(box=_boxes(), kind=st.sampled_from(["safetensors", "msgpack", "bin"]))
def test_get_slice_reads_exactly_the_box(box_files, box, kind):
    key, index = box
    checkpoint = Checkpoint(box_files[kind])
    expected = box_files["arrays"][key][index]
    got = checkpoint.get_slice(key, index)
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8)), (key, index)
    assert checkpoint.bytes_read == expected.nbytes, f"read {checkpoint.bytes_read} B for a {expected.nbytes} B box"


@pytest.mark.parametrize("kind", ["safetensors", "msgpack"])
def test_row_ranges_take_one_read_and_strided_boxes_one_read_per_row(box_files, kind):
    checkpoint = Checkpoint(box_files[kind])
    array = box_files["arrays"]["a"]
    chunked = kind == "msgpack"  # 96-byte chunks: a range crossing a chunk boundary takes a read per chunk
    with mock.patch.object(os, "preadv", wraps=os.preadv) as preadv:
        np.testing.assert_array_equal(checkpoint.get_slice("c", (slice(1, 2),)), box_files["arrays"]["c"][1:2])
        assert preadv.call_count == 1, f"{preadv.call_count} reads for one contiguous range"
        preadv.reset_mock()
        np.testing.assert_array_equal(checkpoint.get_slice("a", (slice(1, 4), slice(2, 3), slice(0, 5))),
                                      array[1:4, 2:3, 0:5])
        assert preadv.call_count == 3 or chunked and preadv.call_count >= 3, f"{preadv.call_count} reads for 3 rows"
    assert checkpoint.bytes_read == array[1:4, 2:3, 0:5].nbytes + box_files["arrays"]["c"][1:2].nbytes


def test_get_slice_casts_and_refuses_steps(box_files):
    checkpoint = Checkpoint(box_files["safetensors"])
    got = checkpoint.get_slice("b", (slice(2, 5),), np.float32)
    np.testing.assert_array_equal(got, box_files["arrays"]["b"][2:5].astype(np.float32))
    with pytest.raises(ValueError, match="step 1"):
        checkpoint.get_slice("a", (slice(0, 4, 2),))


# ----------------------------------------------------------------------------------------------------------
# Sharded loading


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
@pytest.mark.parametrize("prefer", ["msgpack", "safetensors"])
@pytest.mark.parametrize("mesh_shape", [((2, 4), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp", "model"))],
                         ids=["data2-fsdp4", "data2-fsdp2-model2"])
def test_sharded_load_is_bit_exact_and_placed_by_the_rules(composed_dir, pair, prefer, mesh_shape):
    _check_sharded_load(composed_dir(*pair), _mesh(*mesh_shape), FLAX_FIRST if prefer == "msgpack" else (SAFETENSORS,))


def test_a_rotary_decoder_loads_sharded_with_its_heads_split(composed_dir):
    """Qwen2 (grouped-query attention, biases, a tied head) composed, on data 2 x fsdp 2 x model 2: every leaf
    where the rules put it, its shards the file's bytes."""
    _check_sharded_load(composed_dir("hubert_group", "qwen2_lm"), _mesh((2, 2, 2), ("data", "fsdp", "model")),
                        (SAFETENSORS,))


def _check_sharded_load(directory, mesh, order) -> None:
    loaded = load_sharded(directory, mesh, param_shapes, prefer=order)
    reference = _flat(load_params(directory, param_shapes, prefer=order).params)
    params = _flat(loaded.params)
    assert sorted(params) == sorted(reference)
    rules = partition_rules(loaded.config)
    split = 0
    for path, leaf in params.items():
        assert isinstance(leaf, jax.Array), path
        want = NamedSharding(auto_mesh(mesh), partition_spec(path, leaf.shape, rules, dict(mesh.shape)))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), f"{path}: {leaf.sharding.spec} != {want.spec}"
        for shard in leaf.addressable_shards:
            expected = np.ascontiguousarray(reference[path][shard.index])
            assert np.array_equal(np.asarray(shard.data).view(np.uint8), expected.view(np.uint8)), path
        split += leaf.sharding.spec != PartitionSpec()
    assert split > len(params) // 3, f"only {split} of {len(params)} leaves are split"
    # One process holds every device: each byte of the model is read once, boxes held by several devices too.
    total = sum(v.nbytes for v in reference.values())
    assert loaded.bytes_read == total, f"read {loaded.bytes_read} bytes of a {total}-byte model"


def test_sharded_load_casts_floating_point_leaves(composed_dir):
    directory = composed_dir(*PAIRS[0])
    loaded = load_sharded(directory, _mesh((8,), ("fsdp",)), param_shapes, dtype=ml_dtypes.bfloat16)
    reference = _flat(load_params(directory, param_shapes).params)
    for path, leaf in _flat(loaded.params).items():
        want = reference[path].astype(ml_dtypes.bfloat16)
        assert leaf.dtype == want.dtype, f"{path}: {leaf.dtype}"
        assert np.array_equal(np.asarray(leaf).view(np.uint16), want.view(np.uint16)), path


# ----------------------------------------------------------------------------------------------------------
# Sharded generation


# test_generation.py's "gpt2_xattn" case: the encoder output steers the tokens, and eos ends one row early.
GENERATION_PAIR, EOS, MAX_NEW_TOKENS = ("w2v_stable_wide", "gpt2_xattn_untied"), 33, 24


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Three seeded utterances of different lengths (not a multiple of the data axis: one padding row)."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((3, 4000)).astype(np.float32)
    mask = np.ones(inputs.shape, np.int32)
    for row, n in ((1, 2600), (2, 3300)):
        inputs[row, n:], mask[row, n:] = 0.0, 0
    return inputs, mask


@pytest.fixture(scope="module")
def models(composed_dir):
    directory = composed_dir(*GENERATION_PAIR)
    single = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    # jax.make_mesh gives Explicit axes: the model runs them as Auto ones (sharding propagation).
    sharded = FlaxSpeechEncoderDecoderModel.from_pretrained(directory, mesh=jax.make_mesh((2, 4), ("data", "fsdp")))
    return single, sharded


def test_sharded_logits_equal_single_device(models):
    single, sharded = models
    inputs, mask = _batch()
    ids = np.array([[2, 5, 7, 9, 11]] * len(inputs), np.int32)
    want = np.asarray(single(inputs, mask, decoder_input_ids=ids).logits)
    got = np.asarray(sharded(inputs, mask, decoder_input_ids=ids).logits)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= RELATIVE_TOLERANCE * max(1.0, scale), f"max|diff|={err:.2e} (max|logit|={scale:.2f})"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_sharded_generation_gives_identical_tokens(models, num_beams):
    single, sharded = models
    inputs, mask = _batch()
    options = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": num_beams, "eos_token_id": EOS}
    want = single.generate(inputs, mask, **options)
    got = sharded.generate(inputs, mask, **options)
    assert got.sequences.shape == want.sequences.shape, (got.sequences.shape, want.sequences.shape)
    assert np.array_equal(got.sequences, want.sequences), f"\n{got.sequences}\n!=\n{want.sequences}"
    if num_beams == 1:  # rows mixed up between devices would show (the fixture's beams agree across rows)
        rows = [tuple(r) for r in want.sequences.tolist()]
        assert len(set(rows)) == len(rows), f"rows alike: a weak check\n{want.sequences}"
    err = float(np.abs(got.sequences_scores - want.sequences_scores).max())
    assert err <= 1e-5, f"sequence scores max|diff|={err:.2e}"
