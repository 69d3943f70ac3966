"""The loss's unrolled layers run as one shared pure function (`flax_model.layer_calls.pure_layers`).

From the traced training program (nothing compiled): every encoder layer calls the same traced program, and every
decoder layer the same one, so that JAX traces and linearises a layer once per stack instead of once per layer
(tracing the wav2vec2-base + BART-base step: docs/training_performance.md). On a toy stack: each layer still draws
its own dropout masks, the gradient uses the masks of the forward pass, rematerialised calls draw the same masks,
and a layer that reads a context (LoRA, a mesh) is traced again in each entry of the context. That the gradient is
right is checked against the PyTorch reference in test_training.py (which runs through it).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_model.layer_calls import layer_pattern, pure_layers
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from flax_model.training import loss_grad_function, step_key
from parity_tests.jaxprs import equations
from scripts.make_fixtures import cases_by_arch


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_each_stack_traces_its_layers_once(composed_dir, remat):
    """The train-mode gradient of a composed pair (wav2vec2 with LayerDrop, BART): every layer is a call of
    `layer_call` in the forward pass and one in the backward pass, and the layers of a stack share one traced
    program for each (without the sharing, each layer has programs of its own)."""
    encoder, decoder = next(iter(cases_by_arch()["wav2vec2"])), next(iter(cases_by_arch()["bart"]))
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(encoder, decoder))
    config = dataclasses.replace(model.config, encoder=model.config.encoder.replace(layerdrop=0.5))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params)
    step = loss_grad_function(SpeechEncoderDecoderModule(config, remat=remat), deterministic=False)
    batch = {"inputs": jnp.zeros((2, 4000)), "attention_mask": jnp.ones((2, 4000), jnp.int32),
             "labels": jnp.ones((2, 5), jnp.int32)}
    jaxpr = jax.make_jaxpr(lambda p: step(p, batch, step_key(0, 0), jnp.float32(0.0)))(shapes).jaxpr
    calls = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "jit" and eqn.params["name"] == "layer_call"]
    layers = config.encoder.num_hidden_layers + config.decoder.decoder_layers
    assert len(calls) == 2 * layers, f"{len(calls)} shared layer calls for {layers} layers (forward and backward)"
    uses = collections.Counter(id(eqn.params["jaxpr"]) for eqn in calls)
    # one forward and one backward program per stack, each called by every layer of its stack
    expected = sorted([config.encoder.num_hidden_layers] * 2 + [config.decoder.decoder_layers] * 2)
    assert sorted(uses.values()) == expected, \
        f"{len(uses)} distinct layer programs, called {sorted(uses.values())} times (2 stacks: 4 programs)"
    conds = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "cond"]
    assert len(conds) >= config.encoder.num_hidden_layers, "LayerDrop's conditionals should hold the layer calls"


# ----------------------------------------------------------------------------------------------------------
# A toy stack

SCALE = contextvars.ContextVar("scale", default=1.0)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = nn.Dense(x.shape[-1], use_bias=False, kernel_init=nn.initializers.ones)(x) * SCALE.get()
        return nn.Dropout(0.5)(x, deterministic=deterministic)


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = False) -> list[jax.Array]:
        outs = []
        for i in range(3):
            x = Layer(name=f"layers_{i}")(x, deterministic)
            outs.append(x)
        return outs


PATTERN = layer_pattern(["layers_"])
X = jnp.full((4, 64), 0.125, jnp.float32)


def _apply(params, remat=False, key=jax.random.key(0)):
    with pure_layers(PATTERN, remat=remat):
        return Stack().apply({"params": params}, X, rngs={"dropout": key})


@pytest.fixture(scope="module")
def params():
    return Stack().init(jax.random.key(1), X, True)["params"]


def test_each_layer_draws_its_own_masks(params):
    """Three layers traced once: their dropout masks differ (each layer's key has its path folded in) and each keeps
    about half the units."""
    outs = jax.jit(_apply)(params)
    masks = [np.asarray(o != 0) for o in outs]
    assert len({m.tobytes() for m in masks}) == 3, "two layers drew the same dropout mask"
    first = masks[0].mean()
    assert 0.3 < first < 0.7, f"layer 0 kept {first:.2f} of its units at rate 0.5"


def test_gradient_uses_the_forward_masks_and_remat_draws_the_same(params):
    """d(sum of the first layer's output)/d(its kernel) counts, for kernel entry (i, j), the rows whose unit j was
    kept, times x_i = 0.125 and the dropout scale 2: an independent computation from the forward pass's mask.
    Rematerialised, the outputs and gradients are the same to the bit."""
    def first_sum(p, remat):
        return jnp.sum(_apply(p, remat)[0])

    mask = np.asarray(jax.jit(_apply)(params)[0] != 0)
    expected = np.broadcast_to(mask.sum(0) * 0.125 * 2.0, (64, 64))
    grads = {remat: jax.jit(jax.grad(first_sum), static_argnums=1)(params, remat) for remat in (False, True)}
    got = np.asarray(grads[False]["layers_0"]["Dense_0"]["kernel"])
    assert np.array_equal(got, expected), f"gradient off the forward mask by {np.abs(got - expected).max()}"
    for remat in (False, True):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads[False])))
    outs = [jax.jit(_apply, static_argnums=1)(params, r) for r in (False, True)]
    assert all(np.array_equal(a, b) for a, b in zip(*outs)), "remat drew other masks"


def test_a_context_the_layers_read_is_traced_in_each_entry(params):
    """A layer that reads a context variable while traced: two entries of `pure_layers` under two values give the
    two results (the shared trace belongs to one entry, never reused by a later one)."""
    def deterministic(p):
        with pure_layers(PATTERN):
            return Stack().apply({"params": p}, X, True)[-1]

    first = deterministic(params)
    token = SCALE.set(2.0)
    try:
        second = deterministic(params)
    finally:
        SCALE.reset(token)
    # each layer sums its 64 inputs (a kernel of ones) times the scale: 0.125 x 64^3, and that x 2^3
    np.testing.assert_array_equal(np.asarray(first), 0.125 * 64.0**3)
    np.testing.assert_array_equal(np.asarray(second), 0.125 * 64.0**3 * 8)
