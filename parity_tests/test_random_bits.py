"""The dropout masks of `flax_model.random_bits` are JAX's own, bit for bit, and compile to one hash per mask."""

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
