"""HuBERT: what is particular to it (source rules, config refusals, the optional modules); the generic parity,
round trips and train mode are in test_architectures.py, test_wav2vec2.py and test_spec_augment.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert.base.archs import hubert
from convert.base.archs.hubert import HubertConfig
from convert.base.checkpoint import Checkpoint
from convert.base.errors import UnsupportedConfig
from flax_model.hubert import init_shapes
from flax_model.speech_encoder_decoder import param_shapes
from scripts.fixtures_hubert import TINY_GROUP, hf_config
from torch_reference.hubert import HubertModel
from torch_reference.registry import from_pretrained as reference_from_pretrained

TOLERANCE = 1e-5


def test_ctc_checkpoint_drops_its_head_with_the_reason(fixture_dir):
    model, report = reference_from_pretrained(fixture_dir("hubert_ctc_bin"))
    dropped = dict(report.dropped)
    assert set(dropped) == {"lm_head.weight", "lm_head.bias"}
    assert all("CTC head of HubertForCTC" in why for why in dropped.values())
    assert set(report.loaded) == set(model.state_dict())


def test_classification_heads_and_prefix_are_handled_by_the_source_rules():
    config = HubertConfig.from_hf_dict(hf_config())
    keys = ["hubert.encoder.layer_norm.weight", "hubert.encoder.pos_conv_embed.conv.weight_v", "projector.weight",
            "classifier.bias", "layer_weights", "hubert.masked_spec_embed"]
    canonical, dropped = hubert.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.layer_norm.weight": keys[0],
                         "encoder.pos_conv_embed.conv.parametrizations.weight.original1": keys[1],
                         "masked_spec_embed": keys[5]}
    assert [k for k, _ in dropped] == keys[2:5]
    assert all("the encoder does not use it" in why for _, why in dropped)


def test_hubert_has_no_adapter_whatever_its_config_says():
    # HF's HubertConfig has no adapter fields and HubertModel deletes the adapter: a stray add_adapter is kept
    # for the round trip and changes nothing.
    d = hf_config(**TINY_GROUP, add_adapter=True, num_adapter_layers=2)
    config = HubertConfig.from_hf_dict(d)
    assert not config.add_adapter and config.encoder_output_size == 32
    assert config.output_lengths(16000) == config.output_lengths(16000, add_adapter=False)
    assert config.to_hf_dict() == d
    assert not any(k.startswith("adapter.") for k in HubertModel(config).state_dict())


@pytest.mark.parametrize(("field", "value", "why"), [
    ("adapter_attn_dim", 16, "attention adapters"),
    ("feat_extract_norm", "batch", "supported: group, layer"),
    ("num_conv_pos_embedding_groups", 5, "does not divide hidden_size"),
])
def test_unimplemented_settings_are_refused_naming_the_field(field, value, why):
    with pytest.raises(UnsupportedConfig) as error:
        HubertConfig.from_hf_dict(hf_config(**{field: value}), where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={value!r}" in message and why in message


def test_optional_modules_follow_the_config(fixture_dir):
    """The reference's keys are exactly the checkpoint's (less what the source rules drop), and the Flax tree has
    exactly the mapped leaves."""
    expectations = {
        "hubert_group": {"feature_projection.layer_norm.weight": True,
                         "encoder.pos_conv_embed.conv.parametrizations.weight.original0": True},
        "hubert_stable": {"feature_projection.layer_norm.weight": False,
                          "encoder.pos_conv_embed.batch_norm.running_var": False},
        "hubert_batch_norm": {"encoder.pos_conv_embed.batch_norm.running_var": True,
                              "encoder.pos_conv_embed.conv.weight": True,
                              "encoder.pos_conv_embed.conv.parametrizations.weight.original0": False},
    }
    for case, present in expectations.items():
        directory = fixture_dir(case)
        config = HubertConfig.from_file(directory / "config.json")
        keys = set(HubertModel(config).state_dict())
        canonical, _ = hubert.source_rules(config).canonicalize(Checkpoint(directory).keys())
        assert keys == set(canonical), case
        for key, expected in present.items():
            assert (key in keys) == expected, f"{case}: {key}"
        mapped = {hubert.KEYMAP.to_flax(k)[0] for k in keys}
        assert mapped == set(param_shapes(config)), case
        assert "encoder" in init_shapes(config)


def test_batch_norm_step_counter_is_dropped_with_the_reason(fixture_dir):
    """transformers' checkpoints hold BatchNorm's integer `num_batches_tracked`; every leaf of the models is
    floating point and the counter changes no output, so it is dropped (and not written)."""
    directory = fixture_dir("hubert_batch_norm")
    counter = "encoder.pos_conv_embed.batch_norm.num_batches_tracked"
    assert counter in Checkpoint(directory)
    model, report = reference_from_pretrained(directory)
    assert counter not in model.state_dict()
    assert "BatchNorm step counter" in dict(report.dropped)[counter]


def test_batch_norm_uses_running_statistics_in_inference_and_batch_statistics_in_training(fixture_dir):
    model, _ = reference_from_pretrained(fixture_dir("hubert_batch_norm"))
    values = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1200)).astype(np.float32))
    running = model.encoder.pos_conv_embed.batch_norm.running_mean.clone()
    with torch.no_grad():
        inference = model.eval()(values)
        training = model.train()(values)
    assert float((inference - training).abs().max()) > 1e-3
    # torch moves the running mean in training (the Flax model keeps its parameters as they are).
    assert not torch.equal(model.encoder.pos_conv_embed.batch_norm.running_mean, running)


def test_old_weight_norm_names_load(fixture_dir):
    directory = fixture_dir("hubert_old_weightnorm")
    assert "encoder.pos_conv_embed.conv.weight_g" in Checkpoint(directory)
    _, report = reference_from_pretrained(directory)
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in report.loaded
