"""wav2vec2 encoder: Flax vs the PyTorch reference, the key table both ways, loading and bad input; and the train
mode of the modules the wav2vec2 family shares (HuBERT, WavLM, data2vec-audio too): dropout, LayerDrop,
freeze_feature_encoder."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util

from convert.base.archs import wav2vec2 as keymaps
from convert.base.archs.wav2vec2 import Wav2Vec2Config
from convert.base.checkpoint import Checkpoint
from convert.base.errors import CheckpointError, KeyMapError, UnsupportedConfig
from convert.base.keymap import plan_flax_to_torch, plan_torch_to_flax
from convert.base.params import load_params
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from flax_model.wav2vec2 import FeatureEncoder, Wav2Vec2Module, init_shapes
from flax_model.wav2vec2 import feature_vector_mask as flax_feature_vector_mask
from torch_reference import wav2vec2 as reference
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.registry import model_for

CASES = ("w2v_group", "w2v_stable", "w2v_group_adapter", "w2v_stable_adapter", "w2v_bin", "w2v_bin_sharded",
         "w2v_sharded", "w2v_old_weightnorm", "w2v_ctc")
TOLERANCE = 1e-5
LENGTHS = (1200, 800)


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Two utterances of different lengths, right-padded with zeros, and their sample mask."""
    rng = np.random.default_rng(0)
    values = np.zeros((len(LENGTHS), max(LENGTHS)), np.float32)
    mask = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    for row, length in enumerate(LENGTHS):
        values[row, :length] = rng.standard_normal(length)
        mask[row, :length] = 1
    return values, mask


def _config(directory: Path) -> Wav2Vec2Config:
    return Wav2Vec2Config.from_file(directory / "config.json")


def _flax_shapes(config: Wav2Vec2Config) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config), sep="/").items()}


def _flax_params(directory: Path) -> tuple[Wav2Vec2Config, dict]:
    """A checkpoint's tensors in the Flax layout, through the key table (every Flax leaf must be loaded)."""
    checkpoint, config = Checkpoint(directory), _config(directory)
    plan = plan_torch_to_flax(keymaps.KEYMAP, checkpoint.shapes(), expected=_flax_shapes(config),
                              source_rules=keymaps.source_rules(config), where=str(directory))
    assert not plan.missing, f"Flax leaves no checkpoint tensor provides: {plan.missing}"
    flat = {e.target: e.transform.to_flax(checkpoint.get(e.source)) for e in plan.entries}
    return config, traverse_util.unflatten_dict(flat, sep="/")


@functools.cache
def _encode(config: Wav2Vec2Config):
    """One jit per config: fixtures that differ only in their files share a compilation."""
    return jax.jit(Wav2Vec2Module(config).apply)


def _reference_output(directory: Path, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    model, _ = reference_from_pretrained(directory)
    with torch.no_grad():
        out = model(torch.from_numpy(values), None if mask is None else torch.from_numpy(mask))
    return out.numpy()


# ----------------------------------------------------------------------------------------------------------
# Parity


def test_flax_matches_torch_reference_without_mask(fixture_dir):
    directory = fixture_dir("w2v_stable")
    values = _batch()[0][:1]
    expected = _reference_output(directory, values, None)
    config, params = _flax_params(directory)
    got = np.asarray(_encode(config)({"params": params}, values))
    err = float(np.max(np.abs(got - expected)))
    assert err <= TOLERANCE, f"max|diff|={err:.2e}"


def test_padding_does_not_change_real_frames_of_stable_layout(fixture_dir):
    # Layer norms are per frame and padded frames are zeroed and masked, so a padded utterance encodes
    # as it does alone. (The group norm of the base layout normalises over padding too, as in HF.)
    directory = fixture_dir("w2v_stable")
    values, mask = _batch()
    padded = _reference_output(directory, values, mask)[1]
    alone = _reference_output(directory, values[1:, :LENGTHS[1]], None)[0]
    err = float(np.max(np.abs(padded[:len(alone)] - alone)))
    assert err <= TOLERANCE, f"max|diff|={err:.2e}"


def test_feature_vector_mask_agrees_between_frameworks_and_with_conv_lengths(fixture_dir):
    config = _config(fixture_dir("w2v_group_adapter"))
    _, mask = _batch()
    for add_adapter in (False, True):
        frames = config.output_lengths(max(LENGTHS), add_adapter)
        ours = np.asarray(flax_feature_vector_mask(config, jnp.asarray(mask), frames, add_adapter))
        ref = reference.feature_vector_mask(config, torch.from_numpy(mask), frames, add_adapter).numpy()
        np.testing.assert_array_equal(ours, ref)
        assert ours.sum(-1).tolist() == [config.output_lengths(n, add_adapter) for n in LENGTHS]


# ----------------------------------------------------------------------------------------------------------
# Key table


@pytest.mark.parametrize("case", CASES)
def test_wav2vec2_keymap_roundtrip_is_bit_exact(case, fixture_dir):
    directory = fixture_dir(case)
    checkpoint, config = Checkpoint(directory), _config(directory)
    rules = keymaps.source_rules(config)
    to_flax = plan_torch_to_flax(keymaps.KEYMAP, checkpoint.shapes(), expected=_flax_shapes(config),
                                 source_rules=rules)
    assert not to_flax.missing
    flax = {e.target: e.transform.to_flax(checkpoint.get(e.source)) for e in to_flax.entries}

    torch_shapes = {k: tuple(v.shape) for k, v in reference.Wav2Vec2Model(config).state_dict().items()}
    to_torch = plan_flax_to_torch(keymaps.KEYMAP, {k: v.shape for k, v in flax.items()}, expected=torch_shapes)
    assert not to_torch.missing
    back = {e.target: e.transform.to_torch(flax[e.source]) for e in to_torch.entries}

    canonical, _ = rules.canonicalize(checkpoint.keys())
    assert set(back) == set(canonical) == set(torch_shapes)
    for name, source in canonical.items():
        original = checkpoint.get(source)
        assert back[name].dtype == original.dtype and back[name].shape == original.shape, name
        assert np.array_equal(np.ascontiguousarray(back[name]).view(np.uint8), original.view(np.uint8)), name


# ----------------------------------------------------------------------------------------------------------
# Training behaviour and loading


# The wav2vec2 family shares these modules: one fixture per architecture (HuBERT's with the BatchNorm
# positional conv, whose statistics train mode changes).
FAMILY = ("w2v_group", "hubert_batch_norm", "wavlm_group", "d2v_audio")


def _loaded(case: str, fixture_dir):
    loaded = load_params(fixture_dir(case), param_shapes)
    return loaded.config, loaded.params


def _train_fn(config):
    module = module_for(config)
    return jax.jit(lambda params, key, values, mask: module.apply(
        {"params": params}, values, mask, deterministic=False, rngs={"dropout": key}))


@pytest.mark.parametrize("case", FAMILY)
def test_dropout_follows_the_key(case, fixture_dir):
    """Train mode draws its dropout masks from the step's key: same key, same output; another key, another.
    (LayerDrop 1.0 against a model without its layers is in test_spec_augment.py, with the SpecAugment masks.)"""
    config, params = _loaded(case, fixture_dir)
    config = config.replace(layerdrop=0.0, feat_proj_dropout=0.1, hidden_dropout=0.1, attention_dropout=0.1,
                            activation_dropout=0.1)
    values, mask = _batch()
    run = _train_fn(config)
    first = np.asarray(run(params, jax.random.key(1), values, mask))
    again = np.asarray(run(params, jax.random.key(1), values, mask))
    other = np.asarray(run(params, jax.random.key(2), values, mask))
    assert np.array_equal(first, again), "the same key gave another output"
    assert float(np.max(np.abs(first - other))) > 1e-3, "another key gave the same output"


def test_layerdrop_draws_a_new_subset_of_layers_per_key(fixture_dir):
    config, params = _loaded("w2v_group", fixture_dir)
    config = config.replace(layerdrop=0.5, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    values, mask = _batch()
    run = _train_fn(config)
    outputs = [np.asarray(run(params, jax.random.key(k), values, mask)) for k in range(8)]
    distinct = {np.round(o, 4).tobytes() for o in outputs}
    # Two layers make at most four subsets; eight keys drawing the same one would mean one draw for all.
    assert 2 <= len(distinct) <= 4, f"{len(distinct)} distinct outputs over 8 keys"


@pytest.mark.parametrize("case", FAMILY)
def test_freeze_feature_encoder_gives_exactly_zero_gradient_to_the_conv_feature_encoder(case, fixture_dir):
    """Numerically for wav2vec2 and for a family whose module runs a feature encoder or a `__call__` of its own;
    a family that runs wav2vec2's (the freezing is `FeatureEncoder`'s `stop_gradient`) is checked to do so (a
    compiled gradient per family cost 4-8 s; every family's gradients are compared in test_training.py)."""
    config, params = _loaded(case, fixture_dir)
    module_class = type(module_for(config))
    if case != FAMILY[0] and module_class.FEATURE_ENCODER is FeatureEncoder and (
            module_class.__call__ is Wav2Vec2Module.__call__):
        return
    values, mask = _batch()
    frames = config.output_lengths(values.shape[1], add_adapter=False)
    time = np.zeros((len(values), frames), bool)
    time[:, 2:6] = True  # so that masked_spec_embed takes part
    module = module_for(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    floats = {k: v for k, v in flat.items() if np.issubdtype(v.dtype, np.floating)}  # not BatchNorm's counter

    def loss(floats):
        tree = traverse_util.unflatten_dict({**flat, **floats}, sep="/")
        out = module.apply({"params": tree}, values, mask, freeze_feature_encoder=True, mask_time_indices=time)
        return jnp.sum(out ** 2)

    grads = jax.jit(jax.grad(loss))(floats)
    frozen = [k for k in grads if k.startswith("feature_extractor/")]
    assert frozen and all(k.startswith("feature_extractor/conv_layers/") for k in frozen)
    for path, grad in grads.items():
        if path in frozen:
            assert not np.any(np.asarray(grad)), f"{path} has a gradient despite freeze_feature_encoder"
        else:
            assert np.any(np.asarray(grad)), f"{path} has no gradient"


@pytest.mark.parametrize("case", FAMILY)
def test_reference_train_mode_layerdrop_and_freeze_feature_encoder(case, fixture_dir):
    """The reference in `.train()`: LayerDrop 1.0 equals the model without its layers (WavLM keeps layer 0);
    `freeze_feature_encoder()` leaves the conv feature encoder without gradient and the rest with one."""
    model, _ = reference_from_pretrained(fixture_dir(case))
    kept = 1 if model.config.MODEL_TYPES[0] == "wavlm" else 0
    config = model.config.replace(layerdrop=1.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                  feat_proj_dropout=0.0)
    state = model.state_dict()
    dropped = model_for(config)
    dropped.load_state_dict(state)
    fewer = model_for(config.replace(num_hidden_layers=kept))
    fewer.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < kept})
    values, mask = (torch.from_numpy(a) for a in _batch())
    with torch.no_grad():
        err = float((dropped.train()(values, mask) - fewer.train()(values, mask)).abs().max())
    assert err <= TOLERANCE, f"{case}: max|diff|={err:.2e}"

    frozen = model_for(model.config.replace(layerdrop=0.0))  # every layer takes part, so every layer has a gradient
    frozen.load_state_dict(state)
    frozen.train().freeze_feature_encoder()
    frozen(values, mask).square().sum().backward()
    for name, param in frozen.named_parameters():
        if name.startswith("feature_extractor."):
            assert param.grad is None and not param.requires_grad, name
        elif name != "masked_spec_embed":  # used only with a time mask
            assert param.grad is not None and bool(param.grad.abs().sum() > 0), f"{name} has no gradient"


def test_ctc_checkpoint_reports_dropped_heads_by_name(fixture_dir):
    model, report = reference_from_pretrained(fixture_dir("w2v_ctc"))
    dropped = dict(report.dropped)
    assert set(dropped) == {"lm_head.weight", "lm_head.bias"}
    assert all("CTC head" in why for why in dropped.values())
    assert set(report.loaded) == set(model.state_dict())


def test_pretraining_heads_are_dropped_with_reasons(fixture_dir):
    config = _config(fixture_dir("w2v_group"))
    keys = ["wav2vec2.encoder.layer_norm.weight", "wav2vec2.encoder.pos_conv_embed.conv.weight_g",
            "quantizer.codevectors", "quantizer.weight_proj.weight", "project_q.weight", "project_hid.bias"]
    canonical, dropped = keymaps.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.layer_norm.weight": keys[0],
                         "encoder.pos_conv_embed.conv.parametrizations.weight.original0": keys[1]}
    assert [k for k, _ in dropped] == keys[2:]
    assert all("Wav2Vec2ForPreTraining" in why for _, why in dropped)


def test_unused_spec_embed_is_dropped_when_config_has_no_spec_augment(fixture_dir):
    config = _config(fixture_dir("w2v_stable"))
    assert not config.has_masked_spec_embed
    for rules, key in ((keymaps.source_rules(config), "wav2vec2.masked_spec_embed"),
                       (keymaps.flax_source_rules(config), "wav2vec2/masked_spec_embed")):
        canonical, dropped = rules.canonicalize([key])
        assert not canonical and dropped[0][0] == key and "SpecAugment" in dropped[0][1]


def test_hf_flax_ctc_msgpack_loads_unchanged(fixture_dir, tmp_path):
    # FlaxWav2Vec2ForCTC's layout: the FlaxWav2Vec2Module tree under `wav2vec2/`, plus `lm_head/`.
    source = fixture_dir("w2v_group")
    config, params = _flax_params(source)
    head = {"kernel": np.ones((32, 32), np.float32), "bias": np.ones(32, np.float32)}
    tree = {"wav2vec2": params, "lm_head": head}
    directory = tmp_path / "flax_ctc"
    directory.mkdir()
    shutil.copy(source / "config.json", directory / "config.json")
    (directory / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))

    checkpoint = Checkpoint(directory)
    canonical, dropped = keymaps.flax_source_rules(config).canonicalize(checkpoint.keys())
    assert set(canonical) == set(_flax_shapes(config))
    assert sorted(k for k, _ in dropped) == ["lm_head/bias", "lm_head/kernel"]
    loaded = traverse_util.unflatten_dict({k: checkpoint.get(v) for k, v in canonical.items()}, sep="/")
    values, mask = _batch()
    got = np.asarray(_encode(config)({"params": loaded}, values, mask))
    err = float(np.max(np.abs(got - _reference_output(source, values, mask))))
    assert err <= TOLERANCE, f"max|diff|={err:.2e}"


def test_old_weight_norm_names_load_as_parametrizations(fixture_dir):
    directory = fixture_dir("w2v_old_weightnorm")
    assert "encoder.pos_conv_embed.conv.weight_g" in Checkpoint(directory)
    _, report = reference_from_pretrained(directory)
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in report.loaded
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in report.loaded


def test_reference_state_dict_keys_are_exactly_the_checkpoint_keys(fixture_dir):
    # The fixtures are written from the reference, so this pins the optional parameters per config.
    for case in ("w2v_group", "w2v_stable", "w2v_group_adapter", "w2v_stable_adapter"):
        directory = fixture_dir(case)
        config = _config(directory)
        keys = set(reference.Wav2Vec2Model(config).state_dict())
        assert keys == set(Checkpoint(directory).keys()), case
        assert ("masked_spec_embed" in keys) == config.has_masked_spec_embed
        projects = config.add_adapter and config.encoder_output_size != config.hidden_size
        assert ("adapter.proj.weight" in keys) == projects
        assert ("feature_extractor.conv_layers.1.layer_norm.weight" in keys) == (config.feat_extract_norm == "layer")


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line that names the file and the problem


def _copy(fixture_dir, case: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture_dir(case), tmp_path / case))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_missing_config_json_is_refused(fixture_dir, tmp_path):
    directory = _copy(fixture_dir, "w2v_group", tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(directory)
    message = _one_line(error)
    assert str(directory / "config.json") in message and "no config.json" in message


def test_missing_weight_file_is_refused(fixture_dir, tmp_path):
    directory = _copy(fixture_dir, "w2v_group", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(directory)
    message = _one_line(error)
    assert str(directory) in message and "no weight file" in message


def test_truncated_safetensors_is_refused(fixture_dir, tmp_path):
    path = _copy(fixture_dir, "w2v_group", tmp_path) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(path.parent)
    message = _one_line(error)
    assert str(path) in message and "truncated" in message


def test_corrupt_safetensors_header_is_refused(fixture_dir, tmp_path):
    path = _copy(fixture_dir, "w2v_group", tmp_path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(path.parent)
    message = _one_line(error)
    assert str(path) in message and "corrupt" in message and "header" in message


def test_unsupported_model_type_is_refused_with_supported_list(fixture_dir, tmp_path):
    directory = _copy(fixture_dir, "w2v_group", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "speecht5"}))
    with pytest.raises(UnsupportedConfig) as error:
        reference_from_pretrained(directory)
    message = _one_line(error)
    assert str(directory / "config.json") in message and "'speecht5'" in message
    assert "supported: wav2vec2, hubert, wavlm, data2vec-audio" in message


def test_tensor_shape_not_matching_config_is_refused(fixture_dir, tmp_path):
    directory = _copy(fixture_dir, "w2v_group", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    key = "encoder.layers.0.feed_forward.intermediate_dense.weight"

    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(directory)
    message = _one_line(error)
    assert str(directory) in message and f"{key}: shape [64, 32] does not match the config" in message

    checkpoint = Checkpoint(directory)
    weights = checkpoint.weight_files[0]
    with pytest.raises(KeyMapError) as error:
        plan_torch_to_flax(keymaps.KEYMAP, checkpoint.shapes(), expected=_flax_shapes(_config(directory)),
                           source_rules=keymaps.source_rules(_config(directory)), where=str(weights))
    message = _one_line(error)
    assert str(weights) in message and f"{key}: shape [64, 32] does not match the config" in message


def test_sharded_index_naming_missing_shard_is_refused(fixture_dir, tmp_path):
    directory = _copy(fixture_dir, "w2v_sharded", tmp_path)
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(directory)
    message = _one_line(error)
    assert str(directory / "model.safetensors.index.json") in message
    assert "'model-00002-of-00003.safetensors', which is missing" in message


class _NotATensor:
    """Anything a weights_only unpickler must not construct."""


@pytest.mark.parametrize("extra", [_NotATensor(), math.sqrt], ids=["class_instance", "function"])
def test_bin_pickle_needing_more_than_weights_is_refused(extra, fixture_dir, tmp_path):
    path = _copy(fixture_dir, "w2v_bin", tmp_path) / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "extra": extra}, path)
    with pytest.raises(CheckpointError) as error:
        reference_from_pretrained(path.parent)
    message = _one_line(error)
    assert str(path) in message and "refused" in message and "weights_only" in message


def test_channel_norm_matches_torch_group_norm_with_a_group_per_channel():
    """The feature encoder's first norm (`ChannelNorm`, written out for XLA:CPU's sake) against torch's
    `nn.GroupNorm(C, C)`: values and the gradients of the input, scale and bias; values off zero so that a
    variance taken without centring would show."""
    from flax_model.wav2vec2 import ChannelNorm

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 301, 24)) * 3.0 + 40.0).astype(np.float32)
    scale, bias = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)
    module = ChannelNorm(1e-5)
    assert jax.tree.map(np.shape, module.init(jax.random.key(0), x)) == {"params": {"scale": (24,), "bias": (24,)}}

    def loss(params, hidden):
        return jnp.sum(module.apply({"params": params}, hidden) * cotangent)

    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    out = module.apply({"params": params}, x)
    grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    norm = torch.nn.GroupNorm(24, 24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale))
        norm.bias.copy_(torch.from_numpy(bias))
    given = torch.from_numpy(x).transpose(1, 2).requires_grad_(True)  # [B, C, L], as the reference runs it
    expected = norm(given)
    (expected * torch.from_numpy(cotangent).transpose(1, 2)).sum().backward()
    pairs = {"output": (out, expected.detach().transpose(1, 2)), "input gradient": (grad_x, given.grad.transpose(1, 2)),
             "scale gradient": (grads["scale"], norm.weight.grad), "bias gradient": (grads["bias"], norm.bias.grad)}
    for name, (ours, theirs) in pairs.items():
        theirs = theirs.numpy()
        error = float(np.max(np.abs(np.asarray(ours) - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))
        assert error < TOLERANCE, f"{name}: max error {error:.2e} relative to the largest value"

    # bfloat16 compute: the statistics in float32, the output in bfloat16, as nn.GroupNorm gives it
    low = ChannelNorm(1e-5, jnp.bfloat16).apply({"params": params}, jnp.asarray(x, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    wide = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    centred = wide - wide.mean(1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(1, keepdims=True) + 1e-5) * scale + bias
    error = float(np.max(np.abs(np.asarray(low, np.float64) - want)))
    assert error < 2.0**-7 * np.max(np.abs(want)), f"bfloat16: max error {error:.3e}"
