"""wav2vec2-conformer: what is particular to it (source rules, config refusals, the position embeddings, the unused
positional conv, train mode with the BatchNorm's batch statistics); the generic parity, round trips and pairs are in
test_architectures.py, test_pairs.py, test_training.py and test_goldens.py (transformers' own outputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import wav2vec2_conformer as arch
from convert.base.archs.wav2vec2_conformer import Wav2Vec2ConformerConfig
from convert.base.checkpoint import Checkpoint
from convert.base.errors import UnsupportedConfig
from convert.base.params import load_params
from flax_model.speech_encoder_decoder import param_shapes
from flax_model.wav2vec2_conformer import Wav2Vec2ConformerModule, skew
from scripts.fixtures_wav2vec2_conformer import RELATIVE, hf_config
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.wav2vec2_conformer import Wav2Vec2ConformerModel

TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4  # relative, in norm, per tensor (as test_training.py)
ZERO_GRADIENT = 1e-6  # of the whole gradient's norm: below it a gradient is zero analytically (as test_training.py)
CASES = ("conformer_rel", "conformer_rotary", "conformer_rel_adapter", "conformer_ctc_bin")
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
              "conformer_conv_dropout": 0.0}


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 1200)).astype(np.float32)
    mask = np.ones((2, 1200), np.int32)
    values[1, 800:], mask[1, 800:] = 0.0, 0
    return values, mask


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_ctc_checkpoint_drops_its_head_and_the_batch_norm_counters_with_the_reason(fixture_dir):
    model, report = reference_from_pretrained(fixture_dir("conformer_ctc_bin"))
    dropped = dict(report.dropped)
    counters = {f"wav2vec2_conformer.encoder.layers.{i}.conv_module.batch_norm.num_batches_tracked" for i in (0, 1)}
    assert set(dropped) == {"lm_head.weight", "lm_head.bias"} | counters
    assert all("CTC head of Wav2Vec2ConformerForCTC" in dropped[k] for k in ("lm_head.weight", "lm_head.bias"))
    assert all("BatchNorm step counter" in dropped[k] for k in counters)
    assert set(report.loaded) == set(model.state_dict())


def test_pretraining_and_classification_heads_are_dropped_by_the_source_rules():
    config = Wav2Vec2ConformerConfig.from_hf_dict(hf_config())
    keys = ["wav2vec2_conformer.encoder.layers.3.self_attn.pos_bias_u",
            "wav2vec2_conformer.encoder.pos_conv_embed.conv.weight_g", "quantizer.codevectors", "project_hid.weight", "project_q.bias", "classifier.weight", "tdnn.0.kernel.weight"]
    canonical, dropped = arch.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.layers.3.self_attn.pos_bias_u": keys[0],
                         "encoder.pos_conv_embed.conv.parametrizations.weight.original0": keys[1]}
    assert [k for k, _ in dropped] == keys[2:]
    assert all("Wav2Vec2ConformerForPreTraining" in why for _, why in dropped[:3])


@pytest.mark.parametrize(("fields", "field", "why"), [
    ({"conv_depthwise_kernel_size": 4}, "conv_depthwise_kernel_size", "must be odd"),
    ({"position_embeddings_type": "alibi"}, "position_embeddings_type", "supported: relative, rotary, null"),
    ({"position_embeddings_type": "rotary", "hidden_size": 36, "output_hidden_size": 36, "num_attention_heads": 4,
      "num_conv_pos_embedding_groups": 2}, "num_attention_heads", "odd head size (9)"),
    ({"position_embeddings_type": "relative", "hidden_size": 33, "output_hidden_size": 33, "num_attention_heads": 3,
      "num_conv_pos_embedding_groups": 3}, "hidden_size", "must be even"),
    ({"conformer_conv_dropout": 1.5}, "conformer_conv_dropout", "probability"),
])
def test_unimplemented_settings_are_refused_naming_the_field(fields, field, why):
    with pytest.raises(UnsupportedConfig) as error:
        Wav2Vec2ConformerConfig.from_hf_dict(hf_config(**fields), where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={fields[field]!r}" in message and why in message


def test_position_embedding_parameters_follow_the_config(fixture_dir):
    """The reference's keys are exactly the checkpoint's (less what the source rules drop), the Flax tree has
    exactly the mapped leaves, and each position embedding brings its own parameters."""
    own = {"relative": {"linear_pos.weight", "pos_bias_u", "pos_bias_v"}, "rotary": set(), None: set()}
    for case in CASES:
        directory = fixture_dir(case)
        config = Wav2Vec2ConformerConfig.from_file(directory / "config.json")
        keys = set(Wav2Vec2ConformerModel(config).state_dict())
        canonical, _ = arch.source_rules(config).canonicalize(Checkpoint(directory).keys())
        assert keys == set(canonical), case
        attention = {k.split("self_attn.")[1] for k in keys if k.startswith("encoder.layers.0.self_attn.")
                     and not k.split("self_attn.")[1].startswith(("linear_q", "linear_k", "linear_v", "linear_out"))}
        assert attention == own[config.position_embeddings_type], case
        assert ("encoder.embed_positions.inv_freq" in keys) == (config.position_embeddings_type == "rotary"), case
        assert {arch.KEYMAP.to_flax(k)[0] for k in keys} == set(param_shapes(config)), case


@pytest.mark.parametrize("length", [1, 2, 7])
def test_relative_skew_picks_the_row_of_each_distance(length):
    """Query i and key j read the table's row of distance i - j, which is row length - 1 - (i - j)."""
    scores = np.random.default_rng(length).standard_normal((2, 3, length, 2 * length - 1)).astype(np.float32)
    expected = np.empty((2, 3, length, length), np.float32)
    for i in range(length):
        for j in range(length):
            expected[:, :, i, j] = scores[:, :, i, length - 1 - (i - j)]
    assert np.array_equal(np.asarray(skew(jnp.asarray(scores))), expected)


def test_the_positional_conv_is_carried_but_never_used(fixture_dir):
    """transformers' conformer encoder builds wav2vec2's positional conv and never calls it: changing its weights
    changes neither model's output (the goldens show that transformers' does not change either)."""
    directory = fixture_dir("conformer_rotary")
    loaded = load_params(directory, param_shapes)
    model, _ = reference_from_pretrained(directory)
    values, mask = _batch()
    module = Wav2Vec2ConformerModule(loaded.config)
    flat = traverse_util.flatten_dict(loaded.params, sep="/")
    conv = [k for k in flat if k.startswith("encoder/pos_conv_embed/")]
    assert len(conv) == 3
    changed = traverse_util.unflatten_dict({k: (v * 3.0 + 1.0 if k in conv else v) for k, v in flat.items()}, sep="/")
    run = jax.jit(lambda params: module.apply({"params": params}, values, mask))
    before, after = np.asarray(run(loaded.params)), np.asarray(run(changed))
    assert np.array_equal(before, after)
    inputs = (torch.from_numpy(values), torch.from_numpy(mask))
    with torch.no_grad():
        expected = model(*inputs)
        for p in model.encoder.pos_conv_embed.parameters():
            p.mul_(3.0).add_(1.0)
        assert torch.equal(model(*inputs), expected)
    assert _max_diff(before, expected) <= TOLERANCE


def test_train_mode_matches_the_reference_with_batch_statistics(fixture_dir):
    """Train mode without dropout: the BatchNorms normalise with the batch's statistics in both frameworks (outputs
    and every trainable gradient equal, SpecAugment masks applied), which differs from inference. torch also moves
    its running statistics; the Flax model leaves its parameters (a pure function)."""
    directory = fixture_dir("conformer_rel")
    loaded = load_params(directory, param_shapes)
    config = loaded.config.replace(layerdrop=0.0, **NO_DROPOUT)
    model = _reference_with(config, directory)
    values, mask = _batch()
    frames = int(config.output_lengths(values.shape[1], add_adapter=False))
    time = np.zeros((2, frames), bool)
    time[0, 3:9], time[1, 1:4] = True, True
    channels = np.zeros((2, config.hidden_size), bool)
    channels[:, 5:8] = True
    module = Wav2Vec2ConformerModule(config)

    def loss(params, deterministic):
        out = module.apply({"params": params}, values, mask, deterministic=deterministic, mask_time_indices=time,
                           mask_feature_indices=channels, rngs={"dropout": jax.random.key(0)})
        return jnp.sum(out ** 2), out

    (_, flax_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(loaded.params, False)
    running = model.encoder.layers[0].conv_module.batch_norm.running_mean.clone()
    torch_out = model.train()(torch.from_numpy(values), torch.from_numpy(mask), torch.from_numpy(time),
                              torch.from_numpy(channels))
    torch.sum(torch_out ** 2).backward()
    err = _max_diff(flax_out, torch_out.detach().numpy())
    assert err <= TOLERANCE, f"train-mode output: max|diff|={err:.2e}"
    flat = traverse_util.flatten_dict(grads, sep="/")
    expected = {}
    for name, param in model.named_parameters():
        path, transform = arch.KEYMAP.to_flax(name)
        grad = param.grad.numpy() if param.grad is not None else np.zeros(param.shape, np.float32)
        expected[path] = transform.to_flax(grad).astype(np.float64)
    total = float(np.sqrt(sum(np.sum(np.square(g)) for g in expected.values())))
    worst, worst_key = 0.0, None
    for path, grad in expected.items():
        got, norm = np.asarray(flat[path], np.float64), float(np.linalg.norm(grad))
        if norm < ZERO_GRADIENT * total:
            # Analytically zero (the unused positional conv; key biases, which softmax ignores): noise on both sides.
            assert float(np.linalg.norm(got)) < ZERO_GRADIENT * total, f"{path}: reference {norm:.1e}, Flax not"
            continue
        rel = float(np.linalg.norm(got - grad)) / norm
        if rel > worst:
            worst, worst_key = rel, path
    assert worst <= GRAD_TOLERANCE, f"{worst_key}: |Δgrad| / |grad| = {worst:.2e}"
    assert not torch.equal(model.encoder.layers[0].conv_module.batch_norm.running_mean, running)
    inference = np.asarray(jax.jit(loss, static_argnums=1)(loaded.params, True)[1])
    assert _max_diff(inference, flax_out) > 1e-3, "train mode gave the inference output"


def _reference_with(config, directory) -> Wav2Vec2ConformerModel:
    """The reference model of `directory`'s weights under a changed config."""
    reference, _ = reference_from_pretrained(directory)
    model = Wav2Vec2ConformerModel(config)
    model.load_state_dict(reference.state_dict())
    return model


def test_layerdrop_one_skips_every_block_in_both(fixture_dir):
    """LayerDrop 1.0 in train mode: the output is the encoder's layer norm of the projected features, in both."""
    directory = fixture_dir("conformer_rotary")
    loaded = load_params(directory, param_shapes)
    config = loaded.config.replace(layerdrop=1.0, **NO_DROPOUT)
    values, mask = _batch()
    got = jax.jit(lambda params: Wav2Vec2ConformerModule(config).apply(
        {"params": params}, values, mask, deterministic=False, rngs={"dropout": jax.random.key(0)}))(loaded.params)
    model = _reference_with(config, directory).train()
    with torch.no_grad():
        expected = model(torch.from_numpy(values), torch.from_numpy(mask))
        features = model.feature_extractor(torch.from_numpy(values)).transpose(1, 2)
        frames = (torch.arange(features.shape[1])[None] < torch.from_numpy(
            config.output_lengths(mask.sum(-1), add_adapter=False))[:, None])[:, :, None]
        direct = model.encoder.layer_norm(model.feature_projection(features) * frames)
    assert torch.equal(expected, direct)
    err = _max_diff(got, expected.numpy())
    assert err <= TOLERANCE, f"LayerDrop 1.0: max|diff|={err:.2e}"


def test_conv_module_dropout_follows_the_key_and_a_frozen_feature_encoder_gets_no_gradient(fixture_dir):
    """`conformer_conv_dropout` is wired: with only it on, the same key gives the same output, another key another;
    with `freeze_feature_encoder` the conv feature encoder's gradient is exactly zero, the projection's is not."""
    loaded = load_params(fixture_dir("conformer_rotary"), param_shapes)
    config = loaded.config.replace(layerdrop=0.0, **{**NO_DROPOUT, "conformer_conv_dropout": 0.3})
    module = Wav2Vec2ConformerModule(config)
    values, mask = _batch()

    def loss(params, key):
        out = module.apply({"params": params}, values, mask, deterministic=False, freeze_feature_encoder=True,
                           rngs={"dropout": key})
        return jnp.sum(out ** 2), out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ((_, first), grads), ((_, again), _), ((_, other), _) = (run(loaded.params, jax.random.key(k)) for k in (1, 1, 2))
    assert np.array_equal(first, again), "the same key gave another output"
    assert _max_diff(first, other) > 1e-3, "another key gave the same output"
    flat = traverse_util.flatten_dict(grads, sep="/")
    frozen = [k for k in flat if k.startswith("feature_extractor/")]
    assert frozen and not any(np.any(np.asarray(flat[k])) for k in frozen), "the frozen feature encoder has a gradient"
    assert np.any(np.asarray(flat["feature_projection/projection/kernel"])), "the projection has no gradient"
