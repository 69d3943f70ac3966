"""Where the training step's memory goes: what the backward pass keeps, and what rematerialisation saves.

The figures behind these properties, at base size, are in docs/training_performance.md; here tiny models check
the mechanisms without compiling a whole step (XLA:CPU takes tens of seconds even for the tiny fixtures): the frozen
conv feature encoder keeps nothing for the backward pass, `remat` keeps only each layer's inputs and draws the
same dropout masks, its recomputation lowers XLA's temporaries on the CPU backend too, and the grouped
convolutions' own kernel gradient equals XLA's.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from flax_model.recompute import recomputed_in_backward
from flax_model.training import loss_grad_function, step_key
from parity_tests.jaxprs import equations, saved_residuals
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
    residuals = saved_residuals(lambda p: step(p, batch, step_key(0, 0), jnp.float32(0.1))[0].nll, model.params)
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
        kept[remat] = [shape for shape, _ in saved_residuals(loss, model.params) if shape in inner]
        folds[remat] = _key_folds(jax.make_jaxpr(loss)(model.params).jaxpr, collections.Counter())
    assert kept[False], f"without remat the layers' activations {sorted(inner)} should be kept"
    assert not kept[True], f"with remat {len(kept[True])} layer activations are kept: {kept[True][:3]}"
    assert folds[True] and folds[True] == folds[False], f"key derivations differ: {folds[True] ^ folds[False]}"


def test_the_layers_keep_one_array_per_activation_and_none_per_layer_norm(model, monkeypatch):
    """The step keeps what torch keeps: per feed-forward, the activation's derivative (not JAX's three
    intermediate terms) beside the dropped activation the second matmul reads; per layer norm, nothing beyond its
    input, where JAX's linearisation of Flax's arithmetic keeps three arrays of the hidden width (one of which
    may be kept anyway, as the next matmul's input: at least two more per norm)."""
    from flax_model import layers

    config = model.config
    batch = _batch(config)
    frames = int(config.encoder.output_lengths(batch["inputs"].shape[1]))
    ffn = {(2, frames, config.encoder.intermediate_size), (2 * frames, config.encoder.intermediate_size)}
    hidden = {(2, frames, config.encoder.hidden_size), (2 * frames, config.encoder.hidden_size)}
    loss = _loss(SpeechEncoderDecoderModule(config), batch, jax.random.key(3))
    shapes = [shape for shape, _ in saved_residuals(loss, model.params)]
    layers_ = config.encoder.num_hidden_layers
    wide = sum(shape in ffn for shape in shapes)
    assert wide == 2 * layers_, f"{wide} arrays of the feed-forward's width for {layers_} layers"
    monkeypatch.setattr(layers, "_recomputed_normalise", lambda epsilon, dtype: functools.partial(
        layers.normalise, epsilon=epsilon, dtype=dtype))
    linearised = [shape for shape, _ in saved_residuals(_loss(SpeechEncoderDecoderModule(config), batch,
                                                                jax.random.key(3)), model.params)]
    extra = sum(shape in hidden for shape in linearised) - sum(shape in hidden for shape in shapes)
    assert extra >= 2 * 2 * layers_, f"linearised by JAX, the layers' norms keep {extra} more arrays, not 2 each"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_layer_norms_compute_flaxs_numbers_and_gradients_to_the_bit(dtype):
    """`LayerNorm` (recomputed in the backward pass) against `nn.LayerNorm(use_fast_variance=False)`, and the
    decoder's `RMSNorm` against its own arithmetic linearised by JAX: values and every gradient equal."""
    from flax import linen as nn

    from flax_model.decoder.modules import RMSNorm, _rms_norm
    from flax_model.layers import LayerNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 48)) * 3 + 1, dtype)
    cotangent = jnp.asarray(rng.standard_normal((2, 9, 48)), dtype)
    weights = {"scale": jnp.asarray(rng.standard_normal(48), jnp.float32),
               "bias": jnp.asarray(rng.standard_normal(48), jnp.float32)}
    pairs = [("LayerNorm", lambda p, h: LayerNorm(epsilon=1e-5, dtype=dtype).apply({"params": p}, h),
              lambda p, h: nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False).apply({"params": p}, h),
              weights)]
    for offset in (0.0, 1.0):
        pairs.append((f"RMSNorm offset {offset}", lambda p, h, o=offset: RMSNorm(1e-6, o, dtype=dtype).apply(
            {"params": p}, h), lambda p, h, o=offset: _rms_norm(h, p["scale"], 1e-6, o, jnp.dtype(dtype)),
            {"scale": weights["scale"]}))
    for name, ours, reference, params in pairs:
        got, expected = (jax.jit(lambda p, h, f=f: jax.vjp(f, p, h)[0])(params, x) for f in (ours, reference))
        assert got.dtype == expected.dtype == dtype and np.array_equal(got, expected), f"{name}: values differ"
        grads = [jax.jit(lambda p, h, f=f: jax.vjp(f, p, h)[1](cotangent))(params, x) for f in (ours, reference)]
        differ = [i for i, (a, b) in enumerate(zip(*map(jax.tree.leaves, grads))) if not np.array_equal(a, b)]
        assert not differ, f"{name}: gradients {differ} differ"
    for norm, most in ((LayerNorm(epsilon=1e-5), 0), (nn.LayerNorm(epsilon=1e-5, use_fast_variance=False), 3)):
        computed = [r for r in saved_residuals(lambda h: jnp.sum(norm.apply({"params": weights}, h)), x)
                    if r[0] == x.shape and "from the argument" not in r[1]]
        assert len(computed) == most, f"{type(norm).__module__}.LayerNorm keeps {computed} beside its input"


def test_activations_keep_their_derivative_and_differentiate_as_accurately_as_jax():
    """Each activation keeps one array for the backward pass (the exact GELU: JAX's linearisation keeps 3) and its
    gradient is as close to the float64 derivative as JAX's own (within twice its error: the derivative is rounded
    once before the cotangent multiplies it)."""
    from flax_model.layers import ACTIVATIONS

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(200_000) * 4, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(200_000), jnp.float32)
    plain_gelu = [r for r in saved_residuals(lambda h: jnp.sum(jax.nn.gelu(h, approximate=False)), x) if r[0]]
    assert len(plain_gelu) == 3, plain_gelu
    for name in ("gelu", "gelu_new", "gelu_fast", "quick_gelu", "silu"):
        fn = ACTIVATIONS[name]
        kept = [r for r in saved_residuals(lambda h: jnp.sum(fn(h)), x) if r[0]]
        assert len(kept) == 1 and kept[0][0] == x.shape, f"{name} keeps {kept}"
        with jax.enable_x64(True):
            exact = np.asarray(jax.vjp(fn.fun, jnp.asarray(np.asarray(x), jnp.float64))[1](
                jnp.asarray(np.asarray(cotangent), jnp.float64))[0])
        ours = np.asarray(jax.jit(lambda h, g: jax.vjp(fn, h)[1](g)[0])(x, cotangent), np.float64)
        jaxs = np.asarray(jax.jit(lambda h, g: jax.vjp(fn.fun, h)[1](g)[0])(x, cotangent), np.float64)
        worst, reference = float(np.max(np.abs(ours - exact))), float(np.max(np.abs(jaxs - exact)))
        assert worst <= 2 * reference, f"{name}: gradient {worst:.2e} from float64 (JAX's own: {reference:.2e})"


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "silu"])
def test_xla_computes_each_activations_derivative_in_the_forward_pass(name):
    """Compiled, with nothing between the passes (no LayerDrop conditional, no scanned loop), a stack of
    feed-forward layers keeps two arrays of the inner width per layer: the activation's derivative and the
    activation (the second product's operand). Left to itself, XLA computes the derivative inside the backward
    pass's loop and keeps its terms and input instead (measured: 5.3 such arrays per layer for the exact GELU, 3.3
    for the tanh form and SiLU; now 2.6 and 2.3); `computed_beside` prevents that and changes no bit of the value,
    whatever the kept array holds."""
    from flax_model.layers import ACTIVATIONS
    from flax_model.recompute import computed_beside

    layers, rows, width, inner = 6, 1024, 64, 1024
    rng = np.random.default_rng(0)
    weights = (jnp.asarray(rng.standard_normal((layers, width, inner)) * width ** -0.5, jnp.float32),
               jnp.asarray(rng.standard_normal((layers, inner, width)) * inner ** -0.5, jnp.float32))
    hidden = jnp.asarray(rng.standard_normal((rows, width)), jnp.float32)
    activation = ACTIVATIONS[name]

    def stack(weights, hidden):
        for i in range(layers):
            hidden = jnp.tanh(hidden + activation(hidden @ weights[0][i]) @ weights[1][i])
        return jnp.sum(hidden ** 2)

    temp = jax.jit(jax.grad(stack)).lower(weights, hidden).compile().memory_analysis().temp_size_in_bytes
    inner_sized = rows * inner * 4
    # Two per layer, and the backward pass's working arrays: under one per layer.
    assert temp <= layers * 3 * inner_sized, (f"{name}: XLA temporaries {temp / 1e6:.1f} MB for {layers} layers, "
                                              f"{temp / (layers * inner_sized):.2f} inner-width arrays per layer")
    out = jnp.asarray(rng.standard_normal(4096), jnp.float32)
    for special in (np.nan, np.inf, -np.inf, 0.0):
        kept = jnp.asarray(rng.standard_normal(4096), jnp.float32).at[0].set(special).at[7].set(np.nan)
        for dtype, bits in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)):
            beside = np.asarray(jax.jit(computed_beside)(out.astype(dtype), kept.astype(dtype)))
            assert beside.dtype == dtype and np.array_equal(
                beside.view(bits), np.asarray(out.astype(dtype)).view(bits)), f"{dtype}, kept[0] = {special}"


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
