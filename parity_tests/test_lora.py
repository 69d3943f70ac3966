"""LoRA and partial training: the Flax LoRA update and its gradients equal the reference's; a merged export equals
the base model plus its PEFT adapter; frozen leaves get no gradient, no optimiser state and no update; the
parameter groups of `--train-only`; the command end to end.

(That `peft.PeftModel.from_pretrained` loads the exported adapter with the same logits is checked in the goldens
environment by `scripts/check_peft_export.py`: the package and its tests never import transformers or peft.)
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.composed import composed_keymap, group_predicate, stores_in_out, train_groups
from convert.base.errors import UsageError
from convert.base.lora import (
    LoraSettings,
    find_lora_layers,
    init_lora,
    linear_modules,
    merge_lora,
    read_peft_adapter,
    split_lora,
    write_peft_adapter,
)
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes
from flax_model.training import (
    OptimizerSettings,
    apply_function,
    init_state,
    leaf_labels,
    make_optimizer,
    split_trainable,
)
from torch_reference.lora import add_lora, lora_gradients, merge_lora_
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.training import gradients_in_flax_layout

# (encoder fixture, decoder fixture, LoRA settings). Both weight layouts are adapted: GPT-2's Conv1D weights are
# stored (in, out) (PEFT's fan_in_fan_out; its self- and cross-attention `c_attn`), wav2vec2's nn.Linear ones
# (out, in) (the encoder's `q_proj`). The widths differ: the pair has a projection.
CASES = {
    "gpt2": ("w2v_stable_wide", "gpt2_untied", LoraSettings(2, 4.0, 0.0, ("c_attn", "q_proj"), ("decoder", "encoder"))),
}
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-5


def _layers(config, settings):
    return find_lora_layers(composed_keymap(config), param_shapes(config), settings, stores_in_out(config))


def _factors(layers, settings, seed=0):
    """PEFT's first values for A, and a non-zero B (PEFT starts B at zero: the update and A's gradient would be
    zero, which proves nothing)."""
    values = init_lora(layers, settings.rank, seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        values[layer.b_path] = (0.2 * rng.standard_normal(values[layer.b_path].shape)).astype(np.float32)
    return values


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    n = max(1600, 4 * config.encoder.min_input_length)
    inputs = rng.standard_normal((2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int32)
    mask[1, n * 2 // 3:] = 0
    inputs[1, n * 2 // 3:] = 0
    labels = rng.integers(0, config.decoder.vocab_size, (2, 6))
    labels[1, 4:] = -100
    return inputs, mask, labels


@functools.cache
def _case(name, composed):
    encoder, decoder, settings = CASES[name]
    directory = composed(encoder, decoder)
    base = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    layers = _layers(base.config, settings)
    factors = _factors(layers, settings)
    flat = traverse_util.flatten_dict(base.params, sep="/")
    adapted = {**flat, **{k: jnp.asarray(v) for k, v in factors.items()}}
    model = FlaxSpeechEncoderDecoderModel(base.config, traverse_util.unflatten_dict(adapted, sep="/"), lora=settings)
    return directory, model, layers, factors


@pytest.fixture(scope="module")
def case(composed_dir):
    return lambda name: _case(name, composed_dir)


@pytest.mark.parametrize("name", list(CASES))
def test_lora_loss_and_gradients_match_the_reference(case, name):
    """Trainable: the LoRA factors and the projection (frozen: everything else, as with
    `--train-only projector --lora-rank R`). Flax differentiates only the trainable leaves."""
    directory, model, layers, factors = case(name)
    settings = CASES[name][2]
    inputs, mask, labels = _batch(model.config)
    frozen = lambda path: not (path.rsplit("/", 1)[-1] in ("lora_A", "lora_B") or path.startswith("enc_to_dec_proj"))
    trainable, rest = split_trainable(model.params, frozen)
    assert trainable.keys() >= {"enc_to_dec_proj"}, "the pair should have a projection"
    loss, grads = jax.jit(jax.value_and_grad(lambda t: model.loss(
        inputs, mask, labels, params=traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(rest, sep="/"), **traverse_util.flatten_dict(t, sep="/")}, sep="/"))
    ))(trainable)

    reference = SpeechEncoderDecoderModel.from_pretrained(directory)
    lora = add_lora(reference, layers, settings, factors)
    ref_loss = reference.loss(torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(labels))
    ref_loss.backward()
    ref_grads = {**lora_gradients(lora), **{k: v for k, v in gradients_in_flax_layout(reference).items()
                                            if not frozen(k)}}
    ref_loss = float(ref_loss.detach())
    rel = abs(float(loss) - ref_loss) / abs(ref_loss)
    assert rel <= LOSS_TOLERANCE, f"{name}: loss {float(loss):.7f} vs {ref_loss:.7f} ({rel:.2e})"
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(grads, sep="/").items()}
    assert flat.keys() == ref_grads.keys(), sorted(flat.keys() ^ ref_grads.keys())
    assert sum(k.endswith("lora_A") for k in flat) == len(layers)
    worst, where = 0.0, None
    for key, ref in ref_grads.items():
        norm = float(np.linalg.norm(ref))
        assert norm > 0, f"{name}: {key}: zero gradient in the reference"
        err = float(np.linalg.norm(flat[key] - ref)) / norm
        if err > worst:
            worst, where = err, key
    assert worst <= GRAD_TOLERANCE, f"{name}: {where}: |Δgrad| / |grad| = {worst:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_merged_export_equals_adapter_plus_base(case, name, tmp_path):
    """Flax with LoRA == Flax merged == reference with the adapter read back from PEFT's files == reference merged;
    the adapter's files round-trip bit for bit."""
    directory, model, layers, factors = case(name)
    settings = CASES[name][2]
    inputs, mask, labels = _batch(model.config, seed=1)
    ids = np.where(labels < 0, 0, labels)
    flat = traverse_util.flatten_dict(model.params, sep="/")
    base, lora = split_lora(flat)
    assert lora.keys() == factors.keys()
    merged = merge_lora(flat, layers, settings.scaling)
    plain = FlaxSpeechEncoderDecoderModel(model.config, traverse_util.unflatten_dict(merged, sep="/"))
    adapted_logits = np.asarray(model(inputs, mask, ids).logits)
    merged_logits = np.asarray(plain(inputs, mask, ids).logits)
    base_logits = np.asarray(FlaxSpeechEncoderDecoderModel(model.config, traverse_util.unflatten_dict(
        base, sep="/"))(inputs, mask, ids).logits)
    err = float(np.abs(adapted_logits - merged_logits).max())
    assert err <= LOGITS_TOLERANCE, f"{name}: Flax LoRA vs merged: max|Δlogits| = {err:.2e}"
    moved = float(np.abs(adapted_logits - base_logits).max())
    assert moved > 100 * LOGITS_TOLERANCE, f"{name}: the adapter changes the logits by only {moved:.1e}"

    candidates = linear_modules(composed_keymap(model.config), param_shapes(model.config), stores_in_out(model.config))
    write_peft_adapter(tmp_path, settings, layers, factors, candidates)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == settings.rank and config["lora_alpha"] == settings.alpha
    assert config["fan_in_fan_out"] == all(layer.fan_in_fan_out for layer in layers)
    read_settings, read = read_peft_adapter(tmp_path, candidates)
    assert (read_settings.rank, read_settings.alpha) == (settings.rank, settings.alpha)
    assert read.keys() == factors.keys() and all(np.array_equal(read[k], factors[k]) for k in factors)

    reference = SpeechEncoderDecoderModel.from_pretrained(directory)
    torch_in = (torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(ids))
    factors_t = add_lora(reference, layers, read_settings, read)
    with torch.no_grad():
        ref_adapted = reference(*torch_in).logits.numpy()
        merge_lora_(reference, factors_t)
        ref_merged = reference(*torch_in).logits.numpy()
    for what, logits in (("reference + adapter", ref_adapted), ("reference merged", ref_merged)):
        err = float(np.abs(logits - merged_logits).max())
        assert err <= LOGITS_TOLERANCE, f"{name}: {what} vs Flax merged: max|Δlogits| = {err:.2e}"
    assert {layer.fan_in_fan_out for layer in layers} == {False, True}
    # Both frameworks merge to the same weights.
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    for layer in layers:
        key = layer.torch_module + ".weight"
        torch_kernel = state[key] if layer.fan_in_fan_out else state[key].T
        flax_kernel = np.asarray(merged[layer.kernel_path])
        flax_kernel = flax_kernel.T if layer.fan_in_fan_out else flax_kernel
        assert np.abs(torch_kernel - flax_kernel).max() <= 1e-6, layer.module


def test_frozen_leaves_get_no_gradient_no_optimiser_state_and_no_update(case):
    _, model, layers, _ = case("gpt2")
    frozen = lambda path: path.rsplit("/", 1)[-1] not in ("lora_A", "lora_B")
    trainable, _ = split_trainable(model.params, frozen)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, total_steps=10, weight_decay=0.1),
                               leaf_labels(trainable, lambda path: False))
    state = init_state(model.params, optimizer, frozen)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * 2 * len(layers), "AdamW keeps two moments of each factor, nothing else"
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(trainable))
    grads = jax.tree.map(jnp.ones_like, trainable)
    with jax.disable_jit():
        after = apply_function(optimizer, frozen)(state, grads, jnp.int32(1))
    before, new = (traverse_util.flatten_dict(p, sep="/") for p in (model.params, after.params))
    assert before.keys() == new.keys()
    for key in before:
        same = np.array_equal(np.asarray(before[key]), np.asarray(new[key]))
        assert same == frozen(key), f"{key}: {'changed' if not same else 'unchanged'}"


def test_train_groups_name_the_cross_attention_and_refuse_unknown_names(case):
    _, model, _, _ = case("gpt2")
    groups = train_groups(model.config)
    assert {"encoder", "decoder", "projector", "cross-attention"} <= groups.keys()
    paths = param_shapes(model.config)
    cross = group_predicate(groups, ["cross-attention"])
    chosen = [p for p in paths if cross(p)]
    is_cross = lambda p: "/crossattention/" in p or "/ln_cross_attn/" in p
    assert chosen and all(is_cross(p) and p.startswith("decoder/") for p in chosen)
    assert not [p for p in paths if is_cross(p) and not cross(p)]
    projector = group_predicate(groups, ["projector", "cross-attention"])
    assert {p for p in paths if projector(p)} == set(chosen) | {p for p in paths if p.startswith("enc_to_dec_proj/")}
    with pytest.raises(UsageError, match=r"^train_only=adapter: adapter: not a group of this model \(groups: "):
        group_predicate(groups, ["adapter"])


def test_an_unknown_lora_target_lists_the_linear_layers(case):
    _, model, _, _ = case("gpt2")
    with pytest.raises(UsageError, match=r"^lora_targets=q_proj: q_proj names no linear layer of the decoder "
                                         r"\(there are: c_attn, c_fc, c_proj, lm_head, q_attn\)$"):
        _layers(model.config, LoraSettings(targets=("q_proj",)))


def test_the_adapted_layers_are_the_ones_the_model_calls(case):
    """`recording_lora_calls` sees every layer that holds factors when the loss is traced (what `convert.finetune`
    checks before training: a layer the model reads without calling would train nothing)."""
    from flax_model.lora import recording_lora_calls

    _, model, layers, _ = case("gpt2")
    inputs, mask, labels = _batch(model.config)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params)
    with recording_lora_calls() as seen:
        jax.eval_shape(lambda p: model.module.apply({"params": p}, inputs, mask, labels, method="loss_sums"), params)
    assert seen == {layer.module for layer in layers}, sorted(seen ^ {layer.module for layer in layers})


@pytest.mark.parametrize("prefix", [False, True])
def test_the_fine_tuned_models_card_says_how_to_apply_its_adapter(tmp_path, prefix):
    """With `--lora-export adapter` the directory holds the base weights and the adapter: the card says so, shows
    PEFT applying it to the composition's own classes (the prefix mode's LM, or the composed model), and says that
    the held-out figures are the adapted model's; a merged export's card shows the plain loading."""
    import dataclasses

    from convert.finetune_output import render_card
    from convert.finetune_settings import FinetuneSettings

    settings = FinetuneSettings(lora_rank=4, lora_alpha=8.0, lora_export="adapter")
    report = {"base_model": "m", "prefix": prefix, "train_manifest": "t.jsonl", "train_examples": 2,
              "train_audio_hours": 0.001, "eval_manifest": "e.jsonl", "eval_examples": 1,
              "settings": dataclasses.asdict(settings), "steps": 3, "first_loss": 5.0, "final_loss": 4.0,
              "eval": [{"step": 0, "wer": 1.0, "cer": 1.0}, {"step": 3, "wer": 0.5, "cer": 0.4}],
              "wall_seconds": 10.0, "audio_seconds_per_second": 1.0, "command": None,
              "lora": {"rank": 4, "alpha": 8.0, "export": "adapter"}}
    card = render_card(tmp_path, report)
    loads = "PeftModel.from_pretrained(llm, \"path/to/this/directory/adapter/decoder\")" if prefix else \
        "PeftModel.from_pretrained(model, \"path/to/this/directory/adapter\")"
    assert loads in card and "with the adapter applied" in card, card
    assert ("FlaxSpeechPrefixModel" in card) == prefix and ("SpeechEncoderDecoderModel" in card) != prefix, card
    merged = render_card(tmp_path, {**report, "lora": {**report["lora"], "export": "merged"}})
    assert "PeftModel" not in merged and "adapter" not in merged.split("## How to load")[1], merged
