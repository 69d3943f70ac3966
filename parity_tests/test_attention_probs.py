"""The attention's probabilities recomputed in the backward pass (`flax_model.attention_probs`): what the backward
pass keeps, the gradient against JAX's linearisation of the plain computation, and the dropout stream."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_model.attention_probs import probs_times_values
from flax_model.random_bits import Dropout, dropout
from parity_tests.jaxprs import saved_residuals

SPEC = "BNTS,BNSH->BNTH"
GROUPED = "BKGTS,BKSH->BTKGH"


def _plain(scores, values, spec, rate, key, probs_shape=None):
    """softmax in float32, cast, dropout (`nn.Dropout`'s numbers: `test_random_bits.py`), the product: as the
    attention layers computed it before, linearised by JAX."""
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
    probs = dropout(probs, rate, False, lambda: key)
    return jnp.einsum(spec, probs if probs_shape is None else probs.reshape(probs_shape), values)


def _ours(scores, values, spec, rate, key, probs_shape=None):
    return probs_times_values(scores, values, spec, rate, False, lambda: key, probs_shape)


def _inputs(dtype, shape=(2, 3, 7, 7), head=5, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(shape) * 3
    scores[1, :, :, 5:] = np.finfo(np.float32).min  # padded keys, as the attention masks them
    values = rng.standard_normal(shape[:2] + (shape[3], head))
    cotangent = rng.standard_normal(shape[:3] + (head,))
    return (jnp.asarray(scores, dtype), jnp.asarray(values, dtype), jnp.asarray(cotangent, dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_backward_pass_keeps_the_scores_and_no_probabilities(dtype):
    """JAX's linearisation of the plain computation keeps two arrays of the scores' shape beside its arguments
    (the exponentials and the dropped probabilities); ours keeps none (the scores are an argument) and only
    [.., T, 1] row statistics besides."""
    scores, values, _ = _inputs(dtype)
    key = jax.random.key(1)
    plain = [s for s, what in saved_residuals(lambda s, v: _plain(s, v, SPEC, 0.1, key).sum(), scores, values)
             if s == scores.shape and "from the argument" not in what]
    assert len(plain) == 2, plain
    kept = saved_residuals(lambda s, v: _ours(s, v, SPEC, 0.1, key).sum(), scores, values)
    computed = [(s, what) for s, what in kept if "from the argument" not in what and s != ()]
    assert all(s == scores.shape[:-1] + (1,) for s, _ in computed), computed


def test_xla_keeps_one_array_of_the_scores_size_per_layer():
    """Compiled, with nothing between the passes (no LayerDrop conditional, no scanned loop), a stack of attention
    cores keeps one [B, N, T, T] array per layer for the backward pass: the scores. XLA:CPU fuses each row
    statistic with its broadcast to the scores' shape; unless the backward pass reads the statistics only once the
    cotangent exists, it keeps the forward pass's two broadcasts as well (three arrays per layer)."""
    layers, batch, heads, frames, head = 4, 2, 4, 256, 8
    width = heads * head
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.standard_normal((layers, 3, width, width)) * width ** -0.5, jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((batch, frames, width)), jnp.float32)

    def stack(weights, hidden):
        for i in range(layers):
            q, k, v = (jnp.einsum("BTD,DE->BTE", hidden, weights[i, j]).reshape(batch, frames, heads, head)
                       .transpose(0, 2, 1, 3) for j in range(3))
            out = _ours(jnp.einsum("BNTH,BNSH->BNTS", q, k), v, SPEC, 0.1, jax.random.key(i))
            hidden = hidden + out.transpose(0, 2, 1, 3).reshape(hidden.shape)
        return jnp.sum(hidden ** 2)

    compiled = jax.jit(jax.grad(stack)).lower(weights, hidden).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    scores, heads_sized = batch * heads * frames * frames * 4, batch * frames * width * 4
    # Per layer the scores and four [B, N, T, H] arrays (q, k, v, the output); up to four scores-sized working
    # arrays of the backward pass at a time (measured: 15.9 MB against this bound's 17.8; 22.1 MB before).
    bound = layers * (scores + 4 * heads_sized) + 4 * scores
    assert temp <= bound, (f"XLA temporaries {temp / 1e6:.1f} MB for {layers} layers, over {bound / 1e6:.1f} MB: "
                           f"{temp / (layers * scores):.2f} scores-sized arrays per layer")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_the_gradient_is_that_of_the_plain_computation(dtype, tolerance, grouped):
    """Under `jax.jit`, outputs and gradients together, with dropout, padded keys and (grouped) query heads sharing
    a key/value head: within the dtype's rounding of the largest (float32: a few units in the last place;
    bfloat16: its 8 bits), as the two compute the same numbers in a different order."""
    scores, values, cotangent = _inputs(dtype, (2, 4, 33, 33), 8, seed=4)
    spec, probs_shape = SPEC, None
    if grouped:  # 4 query heads reading 2 key/value heads
        spec, probs_shape = GROUPED, (2, 2, 2, 33, 33)
        values, cotangent = values[:, :2], cotangent.transpose(0, 2, 1, 3).reshape(2, 33, 2, 2, 8)
    key = jax.random.key(5)
    results = {}
    for name, fn in (("plain", _plain), ("ours", _ours)):
        results[name] = jax.jit(lambda s, v, g, f=fn: (lambda o, vjp: (o, *vjp(g)))(
            *jax.vjp(lambda s, v: f(s, v, spec, 0.1, key, probs_shape), s, v)))(scores, values, cotangent)
    for got, expected, what in zip(results["ours"], results["plain"], ("output", "scores", "values")):
        assert bool(jnp.all(jnp.isfinite(got))), what
        got, expected = (np.asarray(a, np.float64) for a in (got, expected))
        error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
        assert error <= tolerance, f"{what}: {error:.2e} from the plain computation"


def test_the_compiled_gradient_hashes_the_mask_once_per_pass():
    """The probabilities are dropped in the forward pass and again in the backward's recomputation, and their
    gradient is dropped by the same mask: the compiled forward and backward pass hash it once each (21 XORs over
    the probabilities' shape per hash). The backward pass reads the gradient's mask from the dropped operand's
    zeros; drawn again for it, the hash was compiled four times here (84 XORs)."""
    scores, values, cotangent = _inputs(jnp.float32, (2, 4, 16, 16), 8)

    def grads(s, v, g):  # the cotangent an argument, as in a training step (not a constant XLA could fold)
        out, vjp = jax.vjp(lambda s, v: _ours(s, v, SPEC, 0.1, jax.random.key(3)), s, v)
        return out, vjp(g)

    compiled = jax.jit(grads).lower(scores, values, cotangent).compile().as_text()
    xors = len(re.findall(r"= u32\[2,4,16,16\]\S* xor\(", compiled))
    assert xors == 2 * 21, f"{xors} XORs over the probabilities' shape (two hashes: 42)"


def test_the_dropout_stream_is_the_dropout_modules():
    """Drawn through a module's "dropout" stream, the probabilities are dropped as `Dropout` drops them in that
    module (the same key, the same mask); deterministic or at rate 0 no key is drawn."""

    class Attend(nn.Module):
        ours: bool

        @nn.compact
        def __call__(self, scores, values):
            drop = Dropout(0.3)
            if self.ours:
                return probs_times_values(scores, values, SPEC, drop.rate, False, lambda: drop.make_rng("dropout"))
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
            return jnp.einsum(SPEC, drop(probs, deterministic=False), values)

    scores, values, _ = _inputs(jnp.float32)
    got, expected = (Attend(ours).apply({}, scores, values, rngs={"dropout": jax.random.key(7)})
                     for ours in (True, False))
    assert np.array_equal(got, expected)
    undrawn = lambda: pytest.fail("a key was drawn")  # noqa: E731
    plain = _plain(scores, values, SPEC, 0.0, None)
    for rate, deterministic in ((0.3, True), (0.0, False)):
        assert np.array_equal(probs_times_values(scores, values, SPEC, rate, deterministic, undrawn), plain)
    dropped = probs_times_values(scores, values, SPEC, 1.0, False, undrawn)
    assert not np.any(dropped), "rate 1 drops every probability"



def test_the_model_recomputes_the_probabilities_unless_it_recomputes_the_whole_layer(composed_dir, monkeypatch):
    """The composed model's train-mode loss: each encoder layer keeps one array of the attention's [B, N, T, T]
    shape (its scores), where JAX's linearisation keeps two (the exponentials and the dropped probabilities), and
    its float32 gradient (dropout on) is that of JAX's linearisation within float32 rounding; under `remat`, unrolled or
    scanned, where the backward pass recomputes whole layers, the attention computes its probabilities once per
    pass (no recomputation of its own is traced)."""
    from flax_model import attention_probs
    from flax_model.speech_encoder_decoder import (FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule,
                                                   stack_params)
    from scripts.make_fixtures import cases_by_arch

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(next(iter(cases_by_arch()["wav2vec2"])),
                                                                       next(iter(cases_by_arch()["bart"]))))
    config = model.config
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.standard_normal((2, 4000)), jnp.float32), jnp.ones((2, 4000), jnp.int32),
             jnp.asarray(rng.integers(0, config.decoder.vocab_size, (2, 6)), jnp.int32))
    frames = int(config.encoder.output_lengths(4000))
    probs_shape = (2, config.encoder.num_attention_heads, frames, frames)

    def loss(module):
        return lambda params: module.apply({"params": params}, *batch, False, True, method="loss_sums",
                                           rngs={"dropout": jax.random.key(3)}).nll

    def kept(module, params):
        return sum(shape == probs_shape for shape, _ in saved_residuals(loss(module), params))

    layers_ = config.encoder.num_hidden_layers
    assert kept(SpeechEncoderDecoderModule(config), model.params) == layers_
    ours = jax.jit(jax.grad(loss(SpeechEncoderDecoderModule(config))))(model.params)
    made = []
    monkeypatch.setattr(attention_probs, "_recomputed",
                        lambda *a: (made.append(a), attention_probs._linearised(*a))[1])
    assert kept(SpeechEncoderDecoderModule(config), model.params) == 2 * layers_, "JAX's linearisation"
    assert made, "the attention's recomputation was not traced"
    linearised = jax.jit(jax.grad(loss(SpeechEncoderDecoderModule(config))))(model.params)
    largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(linearised))
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(linearised)))
    assert error <= 1e-6 * largest, f"train-mode gradient {error / largest:.2e} (of the largest) from JAX's"
    for scan in (False, True):
        made.clear()
        params = stack_params(config, model.params) if scan else model.params
        jax.eval_shape(jax.grad(loss(SpeechEncoderDecoderModule(config, remat=True, scan_layers=scan))), params)
        assert not made, f"remat, scan_layers={scan}: the attention recomputes its probabilities inside the layer"
