"""WavLM: what is particular to it (relative-position buckets, the bias shared from layer 0, source rules, config
refusals); the generic parity, round trips and train mode are in test_architectures.py, test_wav2vec2.py and
test_spec_augment.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import wavlm
from convert.base.archs.wavlm import WavLMConfig
from convert.base.composed import SpeechEncoderDecoderConfig
from convert.base.errors import UnsupportedConfig
from flax_model.speech_encoder_decoder import init_shapes
from flax_model.wavlm import relative_position_buckets as flax_buckets
from scripts.fixtures_wavlm import TINY_GROUP, hf_config
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.wavlm import relative_position_buckets as reference_buckets

TOLERANCE = 1e-5


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(320, 800), (16, 20), (12, 30), (6, 7)])
def test_relative_position_buckets_agree_between_frameworks_up_to_long_inputs(num_buckets, max_distance):
    """Flax computes the buckets with numpy at trace time, the reference with torch as transformers does: every
    relative position of a 3000-frame input (a minute of audio) must fall in the same bucket."""
    length = 3000
    ours = flax_buckets(1, length, num_buckets, max_distance)[0]  # query 0: relative positions 0 .. length - 1
    back = flax_buckets(length, 1, num_buckets, max_distance)[:, 0]  # key 0: relative positions 0 .. -(length - 1)
    relative = torch.arange(-(length - 1), length)
    expected = reference_buckets(relative, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(np.concatenate([back[::-1], ours[1:]]), expected)
    half = num_buckets // 2
    assert expected.min() == 0 and expected.max() == num_buckets - 1
    # Exact buckets near 0 (keys after the query in the upper half), the last bucket of each half from
    # max_distance on.
    assert list(expected[length - 2:length + 1]) == [1, 0, half + 1]
    assert expected[length - 1 - max_distance] == half - 1 and expected[length - 1 + max_distance] == num_buckets - 1


def test_flax_buckets_cover_a_full_query_key_grid():
    grid = flax_buckets(7, 9, 16, 20)
    relative = torch.arange(9)[None, :] - torch.arange(7)[:, None]
    np.testing.assert_array_equal(grid, reference_buckets(relative, 16, 20).numpy())


def test_only_layer_zero_has_the_relative_position_embedding(fixture_dir):
    model, _ = reference_from_pretrained(fixture_dir("wavlm_stable"))
    keys = [k for k in model.state_dict() if "rel_attn_embed" in k]
    assert keys == ["encoder.layers.0.attention.rel_attn_embed.weight"]
    assert wavlm.KEYMAP.to_flax(keys[0])[0] == "encoder/rel_attn_embed/embedding"
    assert all(f"encoder.layers.{i}.attention.gru_rel_pos_const" in model.state_dict() for i in range(2))


def test_composed_shapes_traced_from_one_layer_equal_the_full_trace(fixture_dir):
    """The composed model's shapes repeat one traced layer: WavLM's layers must be identical in shape, which is
    why layer 0's embedding sits beside the stack in the Flax tree."""
    encoder = json.loads((fixture_dir("wavlm_group_adapter") / "config.json").read_text())
    decoder = json.loads((fixture_dir("bart_causal") / "config.json").read_text())
    config = SpeechEncoderDecoderConfig.from_hf_dict({"model_type": "speech-encoder-decoder", "encoder": encoder,
                                                      "decoder": decoder, "decoder_start_token_id": 2,
                                                      "pad_token_id": 1})
    config = dataclasses.replace(config, encoder=config.encoder.replace(num_hidden_layers=3))
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config), sep="/").items()}
    full = {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config, trace_every_layer=True),
                                                             sep="/").items()}
    assert shapes == full
    assert "encoder/encoder/rel_attn_embed/embedding" in shapes


def test_task_heads_are_dropped_with_reasons():
    config = WavLMConfig.from_hf_dict(hf_config())
    keys = ["wavlm.encoder.layers.0.attention.rel_attn_embed.weight", "lm_head.weight", "tdnn.0.kernel.weight",
            "feature_extractor.weight", "objective.weight", "classifier.weight"]
    canonical, dropped = wavlm.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.layers.0.attention.rel_attn_embed.weight": keys[0]}
    reasons = dict(dropped)
    assert "WavLMForCTC" in reasons["lm_head.weight"] and "WavLMForXVector" in reasons["tdnn.0.kernel.weight"]
    assert set(reasons) == set(keys[1:])


@pytest.mark.parametrize(("field", "value", "why"), [
    ("num_buckets", 3, "must be at least 4"),
    ("max_bucket_distance", 4, "must exceed num_buckets // 4 = 4"),
    ("adapter_kernel_size", 5, "only 3"),
])
def test_unimplemented_settings_are_refused_naming_the_field(field, value, why):
    d = hf_config(**{**TINY_GROUP, "add_adapter": True, field: value})
    with pytest.raises(UnsupportedConfig) as error:
        WavLMConfig.from_hf_dict(d, where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={value!r}" in message and why in message
