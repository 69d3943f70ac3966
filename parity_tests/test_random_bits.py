"""The dropout masks of `flax_model.random_bits` are JAX's own, bit for bit; `bernoulli` compiles to one hash per mask,
`Dropout` to one inside each pass that applies it, with no mask kept between the passes."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_model.random_bits import Dropout, bernoulli, random_bits

SHAPES = [(), (0,), (7,), (3, 5), (5, 70_001)]
PROBABILITIES = [0.9, 0.5, 0.1, 1e-7, 1.0 - 1e-7]


@pytest.mark.parametrize("raw", [False, True], ids=["typed_key", "raw_key"])
def test_bits_and_masks_equal_jax_random_bit_for_bit(raw):
    key = jax.random.fold_in(jax.random.PRNGKey(11) if raw else jax.random.key(11), 3)
    for shape in SHAPES:
        bits = random_bits(key, shape)
        assert bits is not None, f"{shape}: the fused draw was not taken"
        expected = jax.random.bits(key, shape, jnp.uint32)
        assert bits.dtype == expected.dtype and bits.shape == expected.shape
        assert bool((bits == expected).all()), f"{shape}: {int((bits != expected).sum())} words differ"
        compiled = jax.jit(lambda k, shape=shape: [bernoulli(k, p, shape) for p in PROBABILITIES])(key)
        for p, got in zip(PROBABILITIES, compiled):
            expected = np.asarray(jax.random.bernoulli(key, p, shape))
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(np.asarray(got), expected), f"{shape}, p={p}: masks differ"
    assert np.array_equal(bernoulli(key, 0.3, (4, 6)), jax.random.bernoulli(key, 0.3, (4, 6)))  # op by op


def test_other_prng_implementations_take_jaxs_draw():
    key = jax.random.key(5, impl="rbg")
    assert random_bits(key, (4, 6)) is None
    assert np.array_equal(bernoulli(key, 0.3, (4, 6)), jax.random.bernoulli(key, 0.3, (4, 6)))


def _module(dropout: type[nn.Module], rate: float, broadcast_dims: tuple[int, ...]) -> nn.Module:
    class TwoDropouts(nn.Module):  # auto-named submodules: the PRNG streams depend on the names
        @nn.compact
        def __call__(self, x, deterministic):
            x = dropout(rate)(x, deterministic=deterministic)
            return dropout(rate, broadcast_dims=broadcast_dims)(jnp.tanh(x), deterministic=deterministic)

    return TwoDropouts()


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("broadcast_dims", [(), (1,), (-1,)])
def test_dropout_equals_flax_dropout_and_draws_the_same_streams(rate, broadcast_dims):
    x = jax.random.normal(jax.random.key(1), (3, 40, 16))
    rngs = {"dropout": jax.random.key(9)}
    for deterministic in (False, True):
        ours = _module(Dropout, rate, broadcast_dims).apply({}, x, deterministic, rngs=rngs)
        flax = _module(nn.Dropout, rate, broadcast_dims).apply({}, x, deterministic, rngs=rngs)
        assert np.array_equal(ours, flax), f"rate {rate}, broadcast {broadcast_dims}, deterministic {deterministic}"


def test_a_compiled_gradient_hashes_each_mask_once():
    """Masks read by the forward and the backward pass: XLA would copy a cheap elementwise hash into every fusion
    that reads it (a small model's training step took twice as long to compile); the compiled program holds the
    hash's 21 XOR operations over the mask's shape (one per round, one joining the two words) once per mask, none
    copied. (The keys' own derivation, JAX's Threefry over single keys, is not counted; the program JAX hands XLA
    holds the hash once, a function called for each mask.)"""
    shape = (4, 64, 32)

    def loss(x, key):
        for i in range(3):
            keep = bernoulli(jax.random.fold_in(key, i), 0.8, x.shape)
            x = jnp.where(keep, x / 0.8, 0.0)
            x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        return jnp.sum(jnp.tanh(x) ** 2)

    lowered = jax.jit(jax.grad(loss)).lower(jnp.ones(shape), jax.random.key(0))
    written = len(re.findall(r"stablehlo\.xor .*tensor<4x64x32xui32>", lowered.as_text()))
    compiled = len(re.findall(r"= u32\[4,64,32\]\S* xor\(", lowered.compile().as_text()))
    assert written == 21, f"{written} XORs over the masks' shape written (one hash, called per mask)"
    assert compiled == 3 * 21, f"{compiled} XORs over the masks' shape compiled for three masks: the hash was copied"


@pytest.mark.parametrize("broadcast_dims", [(), (1,)])
def test_dropout_gradient_equals_flax_dropouts_bit_for_bit(broadcast_dims):
    """The gradient draws the mask again (`_fused_dropout`'s backward): it must be the one `nn.Dropout`'s
    gradient reads from the forward pass. Compiled (as a training step is): op by op, nn.Dropout's own
    differentiated forward pass divides by the keep probability as a traced scalar, which rounds 1 ulp away
    from its undifferentiated output in some entries, so eager gradients are not comparable to the bit."""
    x = jax.random.normal(jax.random.key(2), (3, 40, 16))
    rngs = {"dropout": jax.random.key(4)}

    def loss(module, x):
        return jnp.sum(jnp.sin(module.apply({}, x, False, rngs=rngs)) * x)

    ours = jax.jit(jax.grad(lambda x: loss(_module(Dropout, 0.3, broadcast_dims), x)))(x)
    flax = jax.jit(jax.grad(lambda x: loss(_module(nn.Dropout, 0.3, broadcast_dims), x)))(x)
    assert np.array_equal(ours, flax), f"{int((ours != flax).sum())} gradient entries differ"
    assert int((ours == 0).sum()) > 0.2 * ours.size, "the masks dropped nothing"


def test_a_compiled_dropout_gradient_hashes_inside_the_passes_and_keeps_no_mask():
    """`Dropout` in a training step: the hash is computed where the mask is applied, once in the forward pass
    and once in the backward (twice 21 XORs per mask), and no boolean mask of the activations' shape is written
    to memory, kept for the backward pass or read back; with three masks, the jaxpr holds no mask among the
    values the backward pass reads (they would be `bool` of the activations' shape)."""
    shape = (4, 64, 32)

    def loss(x, key):
        for i in range(3):
            x = Dropout(0.2).apply({}, x, False, rngs={"dropout": jax.random.fold_in(key, i)})
            x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        return jnp.sum(jnp.tanh(x) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(shape), jax.random.key(0)).compile().as_text()
    xors = len(re.findall(r"= u32\[4,64,32\]\S* xor\(", compiled))
    assert xors == 2 * 3 * 21, f"{xors} XORs over the masks' shape compiled for three masks (126 expected)"
    fusions = re.findall(r"^\s*(?:ROOT )?%?\S+ = (\S+) fusion\(", compiled, re.M)
    masks = [s for s in fusions if s.startswith("pred[4,64,32]")]
    assert not masks, f"fusions writing a boolean mask: {masks}"
    _, vjp = jax.vjp(lambda x: loss(x, jax.random.key(0)), jnp.ones(shape))
    masks = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, "dtype", None) == jnp.bool_
             and leaf.shape == shape]
    assert not masks, f"{len(masks)} boolean masks kept for the backward pass"
