"""Training in Flax means what it means in PyTorch: the loss and every parameter's gradient match the reference.

Pairs come from the registry: every encoder spec with a decoder spec, until every decoder spec that pairs in the
heavy tests has been used (each encoder's fixture with the adapter where it has one). Each pair's compiled loss is
differentiated (one compilation) and checked twice: a padded batch without smoothing, and with label smoothing
and SpecAugment masks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.configs import seeded_encoder_inputs
from convert.base.registry import specs
from convert.verify import compare_weight_files
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from flax_model.training import (
    FEATURE_ENCODER,
    OptimizerSettings,
    apply_function,
    frozen_predicate,
    init_state,
    leaf_labels,
    loss_grad_function,
    make_optimizer,
)
from parity_tests.float64 import float64
from parity_tests.jaxprs import equations
from parity_tests.pair_cover import cover
from scripts.make_fixtures import cases_by_arch, in_heavy_pairs
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel, non_trainable_paths
from torch_reference.training import gradients_in_flax_layout

LOSS_TOLERANCE = 1e-5  # relative
GRAD_TOLERANCE = 1e-4  # relative, in norm, per tensor
# A gradient below this fraction of the whole model's gradient norm is zero analytically (attention key biases:
# softmax ignores a shift shared by every key); both frameworks must then give rounding noise below it.
ZERO_GRADIENT = 1e-6


def _first_case(spec) -> str:
    return next(iter(cases_by_arch()[spec.name]))


def _encoder_case(spec) -> str:
    """The encoder's fixture for the gradient pairs: its adapter case where it has one (that case is its first case
    plus the adapter, so every gradient of the first case is compared too), else its first case."""
    fixtures = importlib.import_module(spec.fixtures)
    cases = getattr(fixtures, "PAIR_CASES", ())
    adapters = [c for c in cases if c.endswith("_adapter")]
    return adapters[0] if adapters else _first_case(spec)


def _heavy_decoders() -> list:
    """The decoder specs that pair with some encoder in the heavy tests."""
    return [d for d in specs("decoder") if any(in_heavy_pairs(e.name, d.name) for e in specs("encoder"))]


def _training_pairs() -> list[tuple[str, str]]:
    """Every encoder with one decoder and every decoder (that pairs in the heavy tests: `in_heavy_pairs`) with one
    encoder at least. A decoder that names its heavy encoders takes one of them; the others take the encoders in
    turn. The gradients of a pair are those of its two parts joined through the cross-attention and, where the
    widths differ, the projection; test_pairs composes and runs every heavy pair."""
    encoders = specs("encoder")
    pairs = cover(encoders, _heavy_decoders(), lambda e, d: in_heavy_pairs(e.name, d.name))
    order = {e.name: i for i, e in enumerate(encoders)}
    return [(_encoder_case(e), _first_case(d)) for e, d in sorted(pairs, key=lambda p: order[p[0].name])]


PAIRS = _training_pairs()


def _batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Two utterances (the second shorter, padded: samples, or feature frames) and labels padded with -100."""
    rng = np.random.default_rng(seed)
    encoder = config.encoder
    # Feature frames: as many as the waveform fixtures make of their samples (the same op shapes, compiled once).
    lengths = ((max(1600, 4 * encoder.min_input_length), max(1000, 3 * encoder.min_input_length))
               if encoder.input_kind == "waveform" else (79, 49))
    inputs, mask = seeded_encoder_inputs(encoder, lengths, rng)
    labels = rng.integers(0, config.decoder.vocab_size, (2, 7))
    labels[1, 4:] = -100
    return {"inputs": inputs, "attention_mask": mask, "labels": labels.astype(np.int64)}


@functools.cache
def _models(directory):
    """The pair's Flax model, reference, and (params, batch, smoothing, masks) -> (loss, grads): the gradient of
    the model's loss, compiled whole (smoothing and masks are its arguments, so a pair compiles once for both
    checks, and the remat check compares two programs compiled alike)."""
    flax_model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)

    @jax.jit
    def value_and_grad(params, batch, smoothing, masks):
        return jax.value_and_grad(lambda p: flax_model.loss(
            batch["inputs"], batch["attention_mask"], batch["labels"], params=p, label_smoothing=smoothing,
            **masks))(params)

    return flax_model, SpeechEncoderDecoderModel.from_pretrained(directory), value_and_grad


def _reference_loss_and_grads(model, batch, smoothing=0.0, **masks):
    model.zero_grad()
    torch_batch = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    loss = model.loss(torch_batch["inputs"], torch_batch["attention_mask"], torch_batch["labels"],
                      label_smoothing=smoothing, **{k: torch.from_numpy(v) for k, v in masks.items()})
    loss.backward()
    return float(loss), gradients_in_flax_layout(model)


def _compare(case: str, loss: float, grads, ref_loss: float, ref_grads, buffers: frozenset[str] = frozenset()
             ) -> None:
    """`buffers`: Flax leaves the reference keeps as buffers (no `.grad` there; the optimiser never updates them)."""
    rel = abs(loss - ref_loss) / abs(ref_loss)
    assert rel <= LOSS_TOLERANCE, f"{case}: loss {loss:.7f} vs reference {ref_loss:.7f}, relative {rel:.2e}"
    flat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(grads, sep="/").items()
            if k not in buffers}
    assert flat.keys() == ref_grads.keys(), sorted(flat.keys() ^ ref_grads.keys())
    total = float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in ref_grads.values())))
    worst, worst_key, zeros = 0.0, None, 0
    for key, ref in ref_grads.items():
        ref_norm, diff = float(np.linalg.norm(ref)), float(np.linalg.norm(flat[key] - ref))
        if ref_norm < ZERO_GRADIENT * total:
            zeros += 1
            assert float(np.linalg.norm(flat[key])) < ZERO_GRADIENT * total, (
                f"{case}: {key}: the reference's gradient is zero ({ref_norm:.1e}), Flax's is "
                f"{np.linalg.norm(flat[key]):.1e}")
            continue
        if diff / ref_norm > worst:
            worst, worst_key = diff / ref_norm, key
    assert worst <= GRAD_TOLERANCE, f"{case}: {worst_key}: |Δgrad| / |grad| = {worst:.2e}"
    assert zeros < len(ref_grads) // 4, f"{case}: {zeros} of {len(ref_grads)} gradients are zero"


def _spec_augment_masks(config, batch) -> dict[str, np.ndarray]:
    """Fixed SpecAugment masks: a time span in each utterance (when the encoder has a mask embedding) and two
    channel spans; the reference applies them as given, so any mask serves the comparison."""
    frames = int(config.encoder.output_lengths(batch["inputs"].shape[1], add_adapter=False))
    masks = {"mask_feature_indices": np.zeros((2, config.encoder.hidden_size), bool)}
    masks["mask_feature_indices"][0, 3:7] = True
    masks["mask_feature_indices"][1, 10:12] = True
    if config.encoder.has_masked_spec_embed:
        masks["mask_time_indices"] = np.zeros((2, frames), bool)
        masks["mask_time_indices"][0, 5:15] = True
        masks["mask_time_indices"][1, 2:8] = True
    return masks


def _no_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All-False masks of the same shapes: they change nothing, and the gradient compiled for the masked check
    serves the unmasked one."""
    return {k: np.zeros_like(v) for k, v in masks.items()}


def _check_pair(directory, case: str) -> None:
    flax_model, ref, value_and_grad = _models(directory)
    batch = _batch(flax_model.config)
    masks = _spec_augment_masks(flax_model.config, batch)
    no_masks = _no_masks(masks)
    for smoothing, given in ((0.0, no_masks), (0.1, masks)):
        loss, grads = value_and_grad(flax_model.params, batch, smoothing, given)
        ref_loss, ref_grads = _reference_loss_and_grads(ref, batch, smoothing, **{
            k: v for k, v in given.items() if v.any()})
        _compare(f"{case} smoothing={smoothing} masks={sorted(k for k, v in given.items() if v.any())}",
                 float(loss), grads, ref_loss, ref_grads, non_trainable_paths(flax_model.config))


@pytest.mark.parametrize(("encoder", "decoder"), PAIRS, ids=[f"{e}+{d}" for e, d in PAIRS])
def test_loss_and_every_gradient_match_the_reference(encoder, decoder, composed_dir):
    """For the first pair, also the rematerialised layers' gradient against the one just checked
    (`_check_remat`): one test, so that the gradient compiled here serves both on whichever worker runs it."""
    directory = composed_dir(encoder, decoder)
    _check_pair(directory, f"{encoder}+{decoder}")
    if (encoder, decoder) == PAIRS[0]:
        _check_remat(directory)


def test_the_pairs_cover_every_encoder_with_its_adapter_and_every_decoder(fixture_dir, composed_dir):
    """The claims `_training_pairs` and `_encoder_case` rest on: every encoder and every heavy-pair decoder takes
    part; an encoder's adapter case is its first case plus the adapter (so none of the first case's gradients goes
    unchecked); some pairs join through the projection and some without."""
    encoders = specs("encoder")
    assert {c for c, _ in PAIRS} == {_encoder_case(e) for e in encoders}
    assert {d for _, d in PAIRS} == {_first_case(d) for d in _heavy_decoders()}
    for spec in encoders:
        if "add_adapter" not in {f.name for f in dataclasses.fields(spec.config_class)}:
            continue
        adapter, first = (json.loads((fixture_dir(c) / "config.json").read_text())
                          for c in (_encoder_case(spec), _first_case(spec)))
        assert adapter["add_adapter"], f"{spec.name}: {_encoder_case(spec)} has no adapter"
        differing = {k for k in adapter.keys() | first.keys() if adapter.get(k) != first.get(k)}
        assert differing <= {"add_adapter", "num_adapter_layers", "output_hidden_size", "layer_norm_eps"}, (
            f"{spec.name}: the adapter case differs from {_first_case(spec)} in {sorted(differing)}")
    projected = {"enc_to_dec_proj" in _models(composed_dir(*pair))[0].params for pair in PAIRS}
    assert projected == {True, False}, projected


def test_saved_gradients_have_transformers_names_in_both_formats(composed_dir, tmp_path):
    """Flax gradients saved with `save_pretrained(params=grads)` equal the reference's `.grad`s saved the same
    way, key by key, and each directory's two weight files agree bit for bit."""
    from safetensors.numpy import load_file

    encoder, decoder = PAIRS[0]
    flax_model, ref, value_and_grad = _models(composed_dir(encoder, decoder))
    batch = _batch(flax_model.config, seed=1)
    no_masks = _no_masks(_spec_augment_masks(flax_model.config, batch))
    _, grads = value_and_grad(flax_model.params, batch, 0.0, no_masks)  # the pair test's compiled gradient
    _reference_loss_and_grads(ref, batch)
    flax_model.save_pretrained(tmp_path / "flax", params=grads)
    ref.save_pretrained(tmp_path / "torch", params={k: p.grad for k, p in ref.named_parameters()
                                                    if p.grad is not None}, formats=("flax", "safetensors"))
    for d in ("flax", "torch"):
        files = compare_weight_files(tmp_path / d)
        assert not files["mismatched"] and not files["missing"], files
    ours, theirs = load_file(tmp_path / "flax" / "model.safetensors"), load_file(tmp_path / "torch" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    grad_keys = {k for k, p in ref.named_parameters() if p.grad is not None}
    total = float(np.sqrt(sum(np.sum(np.square(theirs[k].astype(np.float64))) for k in grad_keys)))
    worst = max(float(np.linalg.norm(ours[k].astype(np.float64) - theirs[k])) / total for k in grad_keys)
    assert worst <= GRAD_TOLERANCE, f"max |Δgrad| / |grad| over the saved tensors: {worst:.2e}"


def test_a_traced_label_smoothing_must_be_a_float_scalar(composed_dir):
    """Inside a caller's jit the loss takes the smoothing as a traced scalar (the pair tests differentiate it so);
    its value cannot be checked there, its type can."""
    from convert.base.errors import UsageError

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(*PAIRS[0]))
    batch = _batch(model.config)
    loss = lambda smoothing: model.loss(batch["inputs"], batch["attention_mask"], batch["labels"],
                                        label_smoothing=smoothing)
    for bad, shown in ((jnp.int32(0), "int32[]"), (jnp.zeros(2), "float32[2]")):
        with pytest.raises(UsageError, match=rf"^label_smoothing: {re.escape(shown)}, expected a float scalar"):
            jax.jit(loss)(bad)


def test_save_pretrained_refuses_a_tree_of_another_shape(composed_dir, tmp_path):
    from convert.base.errors import ConvertError

    flax_model, _, _ = _models(composed_dir(*PAIRS[0]))
    flat = traverse_util.flatten_dict(flax_model.params, sep="/")
    name = next(iter(flat))
    flat[name] = jnp.zeros(flat[name].shape + (1,))
    with pytest.raises(ConvertError, match=f"params: {name}: shape"):
        flax_model.save_pretrained(tmp_path / "bad", params=traverse_util.unflatten_dict(flat, sep="/"))
    assert not (tmp_path / "bad").exists()


def _frozen_run(directory, steps: int = 8):
    """`steps` deterministic AdamW steps (weight decay on) on one batch with the toolkit's train step and a
    frozen feature encoder; returns (model, losses, final state)."""
    model, _, _ = _models(directory)
    settings = OptimizerSettings(learning_rate=3e-3, total_steps=steps, weight_decay=0.1)
    optimizer = make_optimizer(settings, leaf_labels(model.params, frozen_predicate(True, non_trainable_paths(
        model.config))))
    module = SpeechEncoderDecoderModule(model.config)
    grad_fn = jax.jit(loss_grad_function(module, deterministic=True, freeze_feature_encoder=True))
    apply = jax.jit(apply_function(optimizer))
    state = init_state(model.params, optimizer)
    batch = {k: jnp.asarray(v) for k, v in _batch(model.config, seed=2).items()}
    losses = []
    for _ in range(steps):
        sums, grads = grad_fn(state.params, batch, None, jnp.float32(0.0))
        losses.append(float(sums.mean(0.0)))
        state = apply(state, grads, sums.tokens)
    return model, losses, state


def test_a_frozen_feature_encoder_gets_exactly_zero_update_and_the_loss_falls(composed_dir):
    """Eight AdamW steps (weight decay on) with the feature encoder frozen: its leaves stay bit-identical, the others
    move, and the loss on the tiny batch falls below 0.7 of its first value (one run serves both checks)."""
    model, losses, state = _frozen_run(composed_dir(*PAIRS[0]))
    before = traverse_util.flatten_dict(model.params, sep="/")
    after = traverse_util.flatten_dict(state.params, sep="/")
    feature = [k for k in before if k.startswith("encoder/") and FEATURE_ENCODER in k.split("/")]
    assert feature, f"no leaf under encoder/.../{FEATURE_ENCODER}/"
    for key in feature:
        assert np.array_equal(np.asarray(before[key]), np.asarray(after[key])), f"{key} moved"
    moved = [k for k in before if k not in feature and not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    assert len(moved) >= len(before) - len(feature) - 8, f"only {len(moved)} of {len(before) - len(feature)} moved"
    assert losses[-1] < 0.7 * losses[0], f"losses {[round(x, 3) for x in losses]}"


def test_a_frozen_encoder_gets_exactly_zero_update_and_everything_else_moves(composed_dir):
    """`freeze_encoder` (convert.finetune --freeze-encoder): one AdamW step with weight decay on a gradient of ones
    leaves every speech-encoder leaf bit-identical and moves every decoder leaf (and the projection)."""
    model, _, _ = _models(composed_dir(*PAIRS[0]))
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, total_steps=2, weight_decay=0.1),
                               leaf_labels(model.params, frozen_predicate(False, frozenset(), freeze_encoder=True)))
    state = init_state(model.params, optimizer)
    ones = jax.tree.map(jnp.ones_like, model.params)
    after = traverse_util.flatten_dict(jax.jit(apply_function(optimizer))(state, ones, jnp.float32(1.0)).params,
                                       sep="/")
    before = traverse_util.flatten_dict(model.params, sep="/")
    encoder = [k for k in before if k.startswith("encoder/")]
    assert encoder and len(encoder) < len(before)
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert not moved & set(encoder), f"encoder leaves moved: {sorted(moved & set(encoder))[:3]}"
    assert moved == set(before) - set(encoder), f"did not move: {sorted(set(before) - set(encoder) - moved)[:3]}"


def test_an_encoder_learning_rate_is_adamw_at_that_rate_on_the_encoder_only(composed_dir):
    """`encoder_learning_rate` (convert.finetune --encoder-learning-rate): one AdamW step on a constant gradient,
    checked against Adam's first step written out (after global-norm clipping, bias-corrected moments make each
    update lr * (g / (|g| + eps) + weight_decay * p)), with 1e-3 on the speech encoder and 1e-2 elsewhere."""
    model, _, _ = _models(composed_dir(*PAIRS[0]))
    settings = OptimizerSettings(learning_rate=1e-2, encoder_learning_rate=1e-3, total_steps=2, weight_decay=0.1)
    optimizer = make_optimizer(settings, leaf_labels(model.params, lambda _: False))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), model.params)
    after = jax.jit(apply_function(optimizer))(init_state(model.params, optimizer), grads, jnp.float32(1.0))
    before = traverse_util.flatten_dict(model.params, sep="/")
    after = traverse_util.flatten_dict(after.params, sep="/")
    size = sum(np.size(v) for v in before.values())
    g = 0.5 * min(1.0, 1.0 / (0.5 * np.sqrt(size)))  # clipped to global norm 1
    worst = 0.0
    for key, p in before.items():
        p = np.asarray(p, np.float64)
        rate = 1e-3 if key.startswith("encoder/") else 1e-2
        decay = 0.0 if key.rsplit("/", 1)[-1] in ("bias", "scale") else 0.1
        expected = p - rate * (g / (g + 1e-8) + decay * p)
        worst = max(worst, float(np.max(np.abs(np.asarray(after[key]) - expected), initial=0.0)))
    assert worst <= 1e-6, f"largest difference from AdamW at the per-part rates: {worst:.3g}"


def _with_rates(config, dropout: float, layerdrop: float):
    """The config with every dropout probability of both parts set to `dropout` and every LayerDrop rate to
    `layerdrop` (fields found by name, so any architecture's are)."""
    def part(c):
        changes = {f.name: (layerdrop if "layerdrop" in f.name else dropout) for f in dataclasses.fields(c)
                   if ("dropout" in f.name or "layerdrop" in f.name or f.name.endswith("pdrop"))
                   and isinstance(getattr(c, f.name), float)}
        return c.replace(**changes)
    return dataclasses.replace(config, encoder=part(config.encoder), decoder=part(config.decoder))


def _losses(model, batch, keys):
    return [float(model.loss(batch["inputs"], batch["attention_mask"], batch["labels"], dropout_rng=k)) for k in keys]


def test_dropout_and_layerdrop_change_with_the_key_and_not_otherwise(composed_dir):
    """Same key, same loss; another key, another draw (the compiled function is not frozen to one draw); and
    LayerDrop alone (every dropout rate 0) takes at most 2**layers values: it is the only randomness left."""
    base, _, _ = _models(composed_dir(*PAIRS[0]))
    batch = _batch(base.config, seed=4)
    keys = [jax.random.key(i) for i in range(8)]
    deterministic = float(base.loss(batch["inputs"], batch["attention_mask"], batch["labels"]))

    dropout = FlaxSpeechEncoderDecoderModel(_with_rates(base.config, 0.2, 0.0), base.params)
    losses = _losses(dropout, batch, keys)
    assert _losses(dropout, batch, keys[:1]) == losses[:1]
    assert len(set(losses)) == len(keys), f"dropout losses {losses}"

    layers = base.config.encoder.num_hidden_layers + base.config.decoder.num_layers
    layerdrop = FlaxSpeechEncoderDecoderModel(_with_rates(base.config, 0.0, 0.5), base.params)
    losses = _losses(layerdrop, batch, [jax.random.key(i) for i in range(16)])
    assert 2 <= len(set(losses)) <= 2 ** layers, f"LayerDrop losses {sorted(set(losses))}"
    assert deterministic not in set(_losses(dropout, batch, keys)), "train mode gave the deterministic loss"


def _check_remat(directory) -> None:
    """`remat=True` recomputes every encoder and decoder layer in the backward pass (one `custom_vjp` per layer in
    the traced loss; what it saves: test_training_memory.py) and changes no gradient: both programs run in float64
    (`parity_tests/float64.py`), where the comparison does not depend on the CPU's float32 rounding (a gradient that
    nearly cancels, such as a cross-attention query bias, differs by 1e-5 of itself between float32 programs)."""
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    batch = _batch(model.config, seed=5)
    module = SpeechEncoderDecoderModule(model.config, remat=True)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    program = jax.make_jaxpr(lambda p: module.apply(
        {"params": p}, device_batch["inputs"], device_batch["attention_mask"], device_batch["labels"],
        method="loss_sums").nll)(model.params)
    layers = model.config.encoder.num_hidden_layers + model.config.decoder.num_layers
    regions = sum(eqn.primitive.name.startswith("custom_vjp_call") for eqn in equations(program))
    assert regions >= layers, f"{regions} recomputed regions for {layers} layers"
    with jax.enable_x64(True):
        params, batch64 = float64(model.params), float64(device_batch)
        _, expected = jax.jit(loss_grad_function(module.clone(dtype=jnp.float64, remat=False), deterministic=True))(
            params, batch64, None, jnp.float64(0.0))
        _, got = jax.jit(loss_grad_function(module.clone(dtype=jnp.float64), deterministic=True))(
            params, batch64, None, jnp.float64(0.0))
        expected, got = jax.tree.map(np.asarray, expected), jax.tree.map(np.asarray, got)
    total = float(np.sqrt(sum(float(np.sum(np.square(e))) for e in jax.tree.leaves(expected))))
    worst = 0.0
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        norm = float(np.linalg.norm(e))
        if norm < ZERO_GRADIENT * total:  # zero analytically: rounding noise in both
            assert float(np.linalg.norm(g)) < ZERO_GRADIENT * total, f"{float(np.linalg.norm(g)):.1e}"
            continue
        worst = max(worst, float(np.linalg.norm(g - e)) / norm)
    assert worst <= 1e-5, f"max relative gradient difference with remat: {worst:.2e}"
