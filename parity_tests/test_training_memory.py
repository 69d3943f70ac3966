"""Where the training step's memory goes: what the backward pass keeps, and what rematerialisation saves.

The figures behind these properties, at base size, are in docs/training_performance.md; here tiny models check
the mechanisms without compiling a whole step (XLA:CPU takes tens of seconds even for the tiny fixtures): the frozen
conv feature encoder keeps nothing for the backward pass, `remat` keeps only each layer's inputs and draws the
same dropout masks, its recomputation lowers XLA's temporaries on the CPU backend too, and the grouped
convolutions' own kernel gradient equals XLA's.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from flax_model.layers import grouped_conv
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from flax_model.layer_calls import recomputed_in_backward
from flax_model.training import loss_grad_function, step_key
from parity_tests.jaxprs import equations
from scripts.make_fixtures import cases_by_arch

ENCODER, DECODER = next(iter(cases_by_arch()["wav2vec2"])), next(iter(cases_by_arch()["bart"]))


@pytest.fixture(scope="module")
def model(composed_dir):
    return FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(ENCODER, DECODER))


def _batch(config, samples: int = 4000) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    mask = np.ones((2, samples), np.int32)
    mask[1, samples * 3 // 4:] = 0
    labels = rng.integers(0, config.decoder.vocab_size, (2, 6))
    labels[1, 4:] = -100
    return {"inputs": jnp.asarray(rng.standard_normal((2, samples)) * mask, jnp.float32),
            "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels, jnp.int32)}


def _saved_residuals(step, params) -> list[tuple[tuple[int, ...], str]]:
    """(shape, what) of every array the backward pass of `step` keeps (`print_saved_residuals`' lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(step, params)
    found = []
    for line in out.getvalue().splitlines():
        match = re.match(r"\s*\w+\[([\d,]*)\]\s+(.*)", line)
        if match:
            found.append((tuple(int(d) for d in match.group(1).split(",") if d), match.group(2)))
    return found


def _loss(module, batch, key):
    return lambda params: module.apply({"params": params}, batch["inputs"], batch["attention_mask"], batch["labels"],
                                       False, True, method="loss_sums", rngs={"dropout": key}).nll


def test_a_frozen_feature_encoder_keeps_none_of_its_activations_for_the_backward_pass(model):
    """With `freeze_feature_encoder`, the step's saved residuals hold nothing at the conv feature encoder's input
    or intermediate rates (its output, the features, is the feature projection's input and is kept)."""
    config = model.config.encoder
    batch = _batch(model.config)
    step = loss_grad_function(SpeechEncoderDecoderModule(model.config), deterministic=False,
                              freeze_feature_encoder=True)
    residuals = _saved_residuals(lambda p: step(p, batch, step_key(0, 0), jnp.float32(0.1))[0].nll, model.params)
    length, rates = batch["inputs"].shape[1], []
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        rates.append(length)
        length = (length - kernel) // stride + 1
    full_rate = [(shape, what) for shape, what in residuals
                 if any(dim in rates for dim in shape) or "feature_extractor" in what]
    assert not full_rate, f"{len(full_rate)} residuals at the feature encoder's rates {rates}: {full_rate[:3]}"
    assert any(length in shape for shape, _ in residuals), "the features themselves should be kept"


def _key_folds(jaxpr, found: collections.Counter) -> collections.Counter:
    """The data folded into PRNG keys anywhere in `jaxpr` (flax derives each module's dropout keys this way)."""
    for eqn in equations(jaxpr):
        if eqn.primitive.name == "random_fold_in":
            found[str(eqn.invars[1])] += 1
    return found


def test_rematerialised_layers_keep_only_their_inputs_and_draw_the_same_masks(model):
    """`remat=True` (unrolled layers): no attention probabilities or feed-forward activations among the saved
    residuals (there are without it), and in train mode the dropout keys are derived exactly as without it (the
    same data folded into the same key: the same masks)."""
    config = model.config
    batch, key = _batch(config), jax.random.key(3)
    frames = int(config.encoder.output_lengths(batch["inputs"].shape[1]))
    inner = {(2, config.encoder.num_attention_heads, frames, frames), (2, frames, config.encoder.intermediate_size)}
    kept, folds = {}, {}
    for remat in (False, True):
        loss = _loss(SpeechEncoderDecoderModule(config, remat=remat), batch, key)
        kept[remat] = [shape for shape, _ in _saved_residuals(loss, model.params) if shape in inner]
        folds[remat] = _key_folds(jax.make_jaxpr(loss)(model.params).jaxpr, collections.Counter())
    assert kept[False], f"without remat the layers' activations {sorted(inner)} should be kept"
    assert not kept[True], f"with remat {len(kept[True])} layer activations are kept: {kept[True][:3]}"
    assert folds[True] and folds[True] == folds[False], f"key derivations differ: {folds[True] ^ folds[False]}"


def test_recomputation_in_the_backward_pass_lowers_xlas_temporaries():
    """`recomputed_in_backward` on a stack of 12 layers: the compiled gradient's XLA temporaries fall by over 30%,
    and the gradients are those of the plain stack."""
    layers, rows, width = 12, 256, 128

    def layer(params, key, hidden):
        return hidden + jnp.tanh(jnp.tanh(hidden @ params[0]) @ params[1])

    def stack(weights, hidden, remat):
        run = recomputed_in_backward(layer) if remat else layer
        for i in range(layers):
            hidden = run((weights[0][i], weights[1][i]), None, hidden)
        return jnp.sum(hidden ** 2)

    rng = np.random.default_rng(0)
    weights = (jnp.asarray(rng.standard_normal((layers, width, 4 * width)) * 0.05, jnp.float32),
               jnp.asarray(rng.standard_normal((layers, 4 * width, width)) * 0.05, jnp.float32))
    hidden = jnp.asarray(rng.standard_normal((rows, width)), jnp.float32)
    temp, grads = {}, {}
    for remat in (False, True):
        compiled = jax.jit(jax.grad(lambda w, h: stack(w, h, remat))).lower(weights, hidden).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
        grads[remat] = compiled(weights, hidden)
    assert temp[True] < 0.7 * temp[False], f"XLA temporaries {temp[True]} B recomputed, {temp[False]} B kept"
    worst = max(float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))
                for got, expected in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])))
    assert worst <= 1e-5, f"max relative gradient difference, recomputed vs kept: {worst:.2e}"


@pytest.mark.parametrize(("taps", "channels", "groups"), [(16, 48, 4), (7, 12, 12)], ids=["grouped", "depthwise"])
def test_grouped_conv_kernel_gradient_equals_xlas(taps, channels, groups):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 40, channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((taps, channels // groups, channels)), jnp.float32)
    padding = [(taps // 2, taps // 2)]

    def grads(conv):
        def loss(h, k):
            out = conv(h, k, (1,), padding, dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
            return jnp.sum(jnp.sin(out))
        return jax.grad(loss, argnums=(0, 1))(hidden, kernel)

    ours, xla = grads(grouped_conv), grads(jax.lax.conv_general_dilated)
    for name, got, expected in zip(("input", "kernel"), ours, xla):
        err = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
        assert err <= 1e-5, f"{name} gradient: max relative difference {err:.2e}"
