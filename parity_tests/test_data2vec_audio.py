"""data2vec-audio: what is particular to it (the positional conv stack, the options it does not have, source
rules); the generic parity, round trips and train mode are in test_architectures.py, test_wav2vec2.py and
test_spec_augment.py."""

from __future__ import annotations

import pytest

from convert.base.archs import data2vec_audio
from convert.base.archs.data2vec_audio import Data2VecAudioConfig
from convert.base.checkpoint import Checkpoint
from convert.base.errors import UnsupportedConfig
from scripts.fixtures_data2vec_audio import TINY, hf_config
from torch_reference.data2vec_audio import Data2VecAudioModel
from torch_reference.registry import from_pretrained as reference_from_pretrained


def test_ctc_checkpoint_drops_its_head_with_the_reason(fixture_dir):
    model, report = reference_from_pretrained(fixture_dir("d2v_audio_ctc_bin"))
    dropped = dict(report.dropped)
    assert set(dropped) == {"lm_head.weight", "lm_head.bias"}
    assert all("CTC head of Data2VecAudioForCTC" in why for why in dropped.values())
    assert set(report.loaded) == set(model.state_dict())


def test_positional_convs_are_plain_with_parameter_free_layer_norms(fixture_dir):
    directory = fixture_dir("d2v_audio_odd_kernel")
    config = Data2VecAudioConfig.from_file(directory / "config.json")
    keys = set(Data2VecAudioModel(config).state_dict())
    assert keys == set(Checkpoint(directory).keys())
    positional = sorted(k for k in keys if k.startswith("encoder.pos_conv_embed."))
    assert positional == [f"encoder.pos_conv_embed.layers.{j}.conv.{p}" for j in range(3) for p in ("bias", "weight")]
    assert data2vec_audio.KEYMAP.to_flax(positional[1])[0] == "encoder/pos_conv_embed/layers/0/conv/kernel"
    # The feature encoder is layer-normed on every conv.
    assert all(f"feature_extractor.conv_layers.{i}.layer_norm.weight" in keys for i in range(3))


def test_layout_fields_it_does_not_have_are_kept_and_ignored():
    """HF's Data2VecAudioConfig has no feat_extract_norm or do_stable_layer_norm: values in a config.json change
    nothing (here or in transformers) and survive the round trip."""
    d = hf_config(**TINY, feat_extract_norm="group", do_stable_layer_norm=True)
    config = Data2VecAudioConfig.from_hf_dict(d)
    assert config.feat_extract_norm == "layer" and not config.do_stable_layer_norm
    assert config.returns_attention_mask
    assert config.to_hf_dict() == d


def test_task_heads_are_dropped_with_reasons():
    config = Data2VecAudioConfig.from_hf_dict(hf_config(**TINY))
    keys = ["data2vec_audio.encoder.pos_conv_embed.layers.0.conv.weight", "projector.weight", "layer_weights"]
    canonical, dropped = data2vec_audio.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.pos_conv_embed.layers.0.conv.weight": keys[0]}
    assert [k for k, _ in dropped] == keys[1:]


@pytest.mark.parametrize(("field", "value", "why"), [
    ("conv_pos_kernel_size", 0, "must be at least 1"),
    ("num_conv_pos_embedding_groups", 5, "does not divide hidden_size"),
    ("output_hidden_size", 48, "not supported without add_adapter"),
])
def test_unimplemented_settings_are_refused_naming_the_field(field, value, why):
    with pytest.raises(UnsupportedConfig) as error:
        Data2VecAudioConfig.from_hf_dict(hf_config(**{**TINY, field: value}), where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={value!r}" in message and why in message
