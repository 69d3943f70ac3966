"""Configs read from config.json: lossless round trips and refusals of settings we do not implement."""

from __future__ import annotations

import json

import pytest

from convert.base.archs.wav2vec2 import Wav2Vec2Config
from convert.base.registry import config_from_hf_dict
from convert.base.errors import UnsupportedConfig
from scripts.fixtures_wav2vec2 import GROUP, STABLE, hf_config

# ----------------------------------------------------------------------------------------------------------
# wav2vec2

WAV2VEC2_FIXTURES = ("w2v_group", "w2v_stable", "w2v_group_adapter", "w2v_stable_adapter", "w2v_ctc")


@pytest.mark.parametrize("case", WAV2VEC2_FIXTURES)
def test_wav2vec2_config_roundtrip_loses_nothing(case, fixture_dir):
    d = json.loads((fixture_dir(case) / "config.json").read_text())
    assert Wav2Vec2Config.from_hf_dict(d).to_hf_dict() == d


def test_wav2vec2_config_roundtrip_keeps_unknown_fields():
    d = {**hf_config(**STABLE), "my_custom_field": {"nested": [1, 2]}, "task_specific_params": None}
    config = Wav2Vec2Config.from_hf_dict(d)
    assert config.to_hf_dict() == d
    assert config.conv_dim == (32, 32, 32) and config.do_stable_layer_norm


def test_wav2vec2_config_replace_writes_the_change():
    config = Wav2Vec2Config.from_hf_dict(hf_config(**GROUP))
    assert config.replace(num_hidden_layers=5).to_hf_dict()["num_hidden_layers"] == 5


def test_wav2vec2_config_from_minimal_dict_uses_hf_defaults():
    config = Wav2Vec2Config.from_hf_dict({"model_type": "wav2vec2"})
    assert config.hidden_size == 768 and config.feat_extract_norm == "group" and config.has_masked_spec_embed
    assert config.encoder_output_size == 768


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("feat_extract_norm", "batch"),
        ("hidden_act", "mish"),
        ("feat_extract_activation", "elu"),
        ("num_attention_heads", 5),
        ("num_conv_pos_embedding_groups", 3),
        ("adapter_attn_dim", 16),
    ],
)
def test_wav2vec2_config_refuses_unimplemented_setting_naming_the_field(field, value):
    d = {**hf_config(**GROUP), field: value}
    with pytest.raises(UnsupportedConfig) as error:
        Wav2Vec2Config.from_hf_dict(d, where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={value!r}" in message


def test_wav2vec2_config_refuses_mismatched_conv_lists():
    d = {**hf_config(**GROUP), "conv_kernel": [10, 3]}
    with pytest.raises(UnsupportedConfig, match="conv_dim"):
        Wav2Vec2Config.from_hf_dict(d)


def test_encoder_config_refuses_unknown_model_type_listing_supported():
    with pytest.raises(UnsupportedConfig, match=r"model_type='speecht5'.*supported: wav2vec2"):
        config_from_hf_dict({"model_type": "speecht5"}, where="config.json", role="encoder")
