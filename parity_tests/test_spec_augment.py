"""SpecAugment: the host-side masks against transformers' own (goldens), and the masks applied in both frameworks.

The goldens (`parity_tests/goldens/spec_augment.json`) are written by `scripts/make_spec_augment_goldens.py` with
transformers installed: its `_compute_mask_indices` after `np.random.seed`, and the masks its encoders draw in a
training forward pass.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert.base.errors import UnsupportedConfig
from convert.base.params import load_params
from convert.base.registry import config_from_hf_dict
from convert.base.spec_augment import compute_mask_indices, spec_augment_masks
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.registry import model_for

GOLDENS = json.loads((Path(__file__).parent / "goldens" / "spec_augment.json").read_text())
TOLERANCE = 1e-5
# One fixture per encoder architecture; HuBERT's with the BatchNorm positional conv, which train mode changes.
ENCODERS = ("w2v_group", "hubert_batch_norm", "wavlm_group", "d2v_audio")
_NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
                   "layerdrop": 0.0}


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


# ----------------------------------------------------------------------------------------------------------
# The masks, against transformers


@pytest.mark.parametrize("case", GOLDENS["compute"], ids=lambda c: f"seed{c['seed']}")
def test_compute_mask_indices_matches_transformers(case):
    got = compute_mask_indices(tuple(case["shape"]), case["mask_prob"], case["mask_length"],
                               np.random.RandomState(case["seed"]), case["lengths"], case["min_masks"])
    expected = _mask(case["mask"])
    assert got.dtype == bool and got.shape == expected.shape
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} of {got.size} entries differ"


@pytest.mark.parametrize("case", GOLDENS["model"], ids=lambda c: c["name"])
def test_spec_augment_masks_match_what_transformers_encoders_draw(case):
    config = config_from_hf_dict({"model_type": case["model_type"], **case["fields"]}, role="encoder")
    lengths = case["sample_lengths"]
    attention_mask = (np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    assert config.output_lengths(max(lengths), add_adapter=False) == case["num_frames"]
    time, feature = spec_augment_masks(config, attention_mask, case["num_frames"], np.random.RandomState(case["seed"]))
    for name, got, rows in (("time", time, case["mask_time_indices"]), ("feature", feature,
                                                                        case["mask_feature_indices"])):
        expected = _mask(rows)
        got = np.zeros_like(expected) if got is None else got
        assert np.array_equal(got, expected), f"{name} mask: {int((got != expected).sum())} entries differ"


def test_spec_augment_masks_take_lengths_or_a_mask_and_need_a_batch_size_otherwise():
    case = GOLDENS["model"][0]
    config = config_from_hf_dict({"model_type": case["model_type"], **case["fields"]})
    lengths = np.array(case["sample_lengths"])
    attention_mask = (np.arange(lengths.max())[None, :] < lengths[:, None]).astype(np.int32)
    by_mask = spec_augment_masks(config, attention_mask, case["num_frames"], np.random.RandomState(3))
    by_lengths = spec_augment_masks(config, lengths, case["num_frames"], np.random.RandomState(3))
    for a, b in zip(by_mask, by_lengths):
        assert np.array_equal(a, b)
    # Without lengths every row may be masked up to the end: the last row (the shortest) gets spans in its padding.
    padded_rows = spec_augment_masks(config, None, case["num_frames"], np.random.RandomState(5), batch_size=3)[0]
    assert padded_rows[2, config.output_lengths(int(lengths[2])):].any()
    with pytest.raises(ValueError, match="batch_size"):
        spec_augment_masks(config, None, case["num_frames"], np.random.RandomState(0))


def test_mask_longer_than_the_frames_is_refused_naming_the_field():
    case = GOLDENS["model"][0]
    config = config_from_hf_dict({"model_type": case["model_type"], **case["fields"], "mask_time_length": 50})
    with pytest.raises(UnsupportedConfig, match=r"mask_time_length=50 is longer than the 40 frames"):
        spec_augment_masks(config, [300, 300], 40, np.random.RandomState(0))


# ----------------------------------------------------------------------------------------------------------
# The masks, applied


def _batch(config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A padded batch of 2 and seeded time [B, S] / channel [B, C] masks."""
    rng = np.random.default_rng(4)
    values = rng.standard_normal((2, 1200)).astype(np.float32)
    mask = np.ones((2, 1200), np.int32)
    values[1, 800:], mask[1, 800:] = 0.0, 0
    frames = config.output_lengths(1200, add_adapter=False)
    return values, mask, rng.random((2, frames)) < 0.3, rng.random((2, config.hidden_size)) < 0.2


@functools.cache
def _train_apply(config):
    return jax.jit(functools.partial(module_for(config).apply, deterministic=False))


@pytest.mark.parametrize("case", ENCODERS)
def test_flax_in_train_mode_matches_reference_with_given_masks_and_layerdrop_one(case, fixture_dir):
    """Train mode with every dropout rate 0 and LayerDrop 1.0: the output is that of the same weights without the
    transformer layers (WavLM keeps layer 0, which transformers never drops) with the SpecAugment masks applied,
    and HuBERT's BatchNorm normalising with the batch's statistics. The reference without those layers, given
    the same masks, is the independent computation (one compilation per encoder)."""
    directory = fixture_dir(case)
    loaded = load_params(directory, param_shapes)
    config = loaded.config.replace(**{**_NO_DROPOUT, "layerdrop": 1.0})
    assert config.has_masked_spec_embed
    kept = 1 if config.MODEL_TYPES[0] == "wavlm" else 0
    values, mask, time, feature = _batch(config)
    got = np.asarray(_train_apply(config)({"params": loaded.params}, values, mask, mask_time_indices=time,
                                          mask_feature_indices=feature, rngs={"dropout": jax.random.key(0)}))
    fewer = model_for(config.replace(num_hidden_layers=kept))
    state = reference_from_pretrained(directory)[0].state_dict()
    fewer.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < kept})
    fewer.train()
    args = [torch.from_numpy(a) for a in (values, mask, time, feature)]
    with torch.no_grad():
        expected = fewer(*args).numpy()
        unmasked = fewer(*args[:2]).numpy()
    err = float(np.max(np.abs(got - expected)))
    assert err <= TOLERANCE, f"{case}: max|diff|={err:.2e}"
    assert float(np.max(np.abs(expected - unmasked))) > 1e-2, f"{case}: the masks changed nothing"


def test_apply_spec_augment_false_ignores_given_masks(fixture_dir):
    model, _ = reference_from_pretrained(fixture_dir("w2v_group"))
    values, mask, time, feature = (torch.from_numpy(a) for a in _batch(model.config))
    with torch.no_grad():
        plain = model(values, mask)
        assert not torch.equal(model(values, mask, time, feature), plain)
        model.config = model.config.replace(apply_spec_augment=False)
        assert torch.equal(model(values, mask, time, feature), plain)


def test_time_mask_without_masked_spec_embed_is_refused_in_both_frameworks(fixture_dir):
    directory = fixture_dir("w2v_stable")  # mask_time_prob=0 and mask_feature_prob=0: no masked_spec_embed
    loaded = load_params(directory, param_shapes)
    model, _ = reference_from_pretrained(directory)
    values, mask, time, _ = _batch(loaded.config)
    with pytest.raises(UnsupportedConfig, match="mask_time_indices: this config has no masked_spec_embed"):
        model(torch.from_numpy(values), torch.from_numpy(mask), torch.from_numpy(time))
    with pytest.raises(UnsupportedConfig, match="mask_time_indices: this config has no masked_spec_embed"):
        jax.eval_shape(lambda: module_for(loaded.config).apply({"params": loaded.params}, values, mask,
                                                               mask_time_indices=time))
