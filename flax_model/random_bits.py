"""Dropout masks drawn as `jax.random.bernoulli` draws them, bit for bit, without its slow CPU lowering.

On the CPU, JAX lowers its Threefry-2x32 hash as a loop of five passes over the whole array (to keep compile
times short), which XLA cannot fuse: a [4, 12, 499, 499] attention-dropout mask takes ~150 ms there, and the
masks of one wav2vec2-base training step at 4 x 10 s took ~2 s of its ~16 s. The same twenty rounds written
out as array arithmetic become one fused elementwise loop, ~13x faster, and give the same bits (JAX's
partitionable Threefry: one hash of each element's flat index, its two output words XOR-ed). Where that
equality is not known to hold (another PRNG implementation, the non-partitionable scheme, 64-bit floats, 2**32
or more elements, a backend other than the CPU) the draw is JAX's own.

`Dropout` (and `dropout`) apply the mask where it is drawn: its gradient draws it again from the same key
(`_fused_dropout`), so no boolean mask is written, kept for the backward pass and read back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation schedule (Salmon et al., 2011)
_PARITY = np.uint32(0x1BD11BDA)  # the key schedule's third word is key0 ^ key1 ^ this constant


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds of the uint32 words (x0, x1) under `key` (uint32[2]), unrolled."""
    schedule = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, rotation)
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _key_words(key: jax.Array) -> jax.Array | None:
    """The uint32[2] words of a single Threefry key (typed or raw), or None if `key` is something else."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,) or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key


def _fused_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """The key's uint32[2] words where `random_bits` computes JAX's bits for `shape`, else None."""
    words = _key_words(key)
    size = int(np.prod(shape, dtype=np.int64))
    if (words is None or not jax.config.jax_threefry_partitionable or size >= 2**32
            or jax.default_backend() != "cpu"):
        return None
    return words


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array | None:
    """`jax.random.bits(key, shape, jnp.uint32)` computed fused, or None where equality is not known to hold."""
    words = _fused_words(key, tuple(shape))
    return None if words is None else _bits(words, tuple(shape))


def _bits(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    index = lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)  # the flat index's low word; its high word is 0
    high, low = threefry2x32(words, jnp.zeros(shape, jnp.uint32), index)
    return high ^ low


def _bernoulli_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """`_fused_words` where `jax.random.bernoulli`'s uniform is float32 (not under 64-bit floats), else None."""
    return None if jax.config.jax_enable_x64 else _fused_words(key, shape)


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """`jax.random.bernoulli(key, p, shape)` for a Python float `p`, equal to it bit for bit, fused on the CPU."""
    words = _bernoulli_words(key, tuple(shape))
    if words is None:
        return jax.random.bernoulli(key, p, shape)
    return _fused_bernoulli(words, p, tuple(shape))


def _uniform(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.uniform`'s float32 construction from the fused bits: 23 random mantissa bits under the exponent
    of 1.0, minus 1."""
    mantissa = (_bits(words, shape) >> np.uint32(9)) | np.float32(1.0).view(np.uint32)
    return lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fused_bernoulli(words: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """`bernoulli`'s fused draw, computed once into a buffer for all its readers. Jitted so that its ~130
    operations are traced once per mask shape and reused by every call instead of traced at each; the compiled
    program is the same (XLA inlines the call)."""
    # The remainder of division by 2 changes no number in [0, 1); XLA counts a floating-point remainder as costly,
    # so it computes the hash once into a buffer instead of copying its twenty rounds into every fusion that reads
    # the mask (the forward's and the backward's), which doubled a small model's compile time.
    return lax.rem(_uniform(words, shape), np.float32(2.0)) < np.float32(p)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fused_keep(words: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """The same draw without a buffer: XLA computes it inside the fusion that reads it (one reader only)."""
    return _uniform(words, shape) < np.float32(p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_dropout(x: jax.Array, words: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
    """Inverted dropout of `x` with the mask of `shape` (broadcast to x's) drawn from `words`.

    Its gradient draws the mask again rather than reading one kept from the forward pass: each pass computes the
    hash inside the fusion that applies the mask, so no mask is written, kept between the passes or read back
    (a wav2vec2-base step at 4 x 10 s spent ~0.3 s writing the masks and turning them into booleans). Values and
    gradients are `nn.Dropout`'s to the bit."""
    return apply_mask(x, _fused_keep(words, keep, shape), keep)


def apply_mask(x: jax.Array, mask: jax.Array, keep: float) -> jax.Array:
    """Inverted dropout's arithmetic: `x / keep` where `mask` (broadcast to x's shape) holds, else 0; also the
    gradient of that, applied to a cotangent."""
    return lax.select(jnp.broadcast_to(mask, x.shape), x / keep, jnp.zeros_like(x))


def _fused_dropout_forward(x, words, keep, shape):
    return _fused_dropout(x, words, keep, shape), words


def _fused_dropout_backward(keep, shape, words, grad):
    return apply_mask(grad, _fused_keep(words, keep, shape), keep), None


_fused_dropout.defvjp(_fused_dropout_forward, _fused_dropout_backward)


def dropout(x: jax.Array, rate: float, deterministic: bool, key: Callable[[], jax.Array],
            broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """Inverted dropout as `nn.Dropout` computes it, the mask drawn as `bernoulli` draws it. `key()` is called
    only when a mask is drawn, so that a Flax module's PRNG stream advances as it does under `nn.Dropout`."""
    if deterministic or rate == 0.0:
        return x
    if rate == 1.0:  # no 0 / 0 in the gradient
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    shape = list(x.shape)
    for dim in broadcast_dims:
        shape[dim] = 1
    drawn = key()
    words = _bernoulli_words(drawn, tuple(shape))
    if words is None:
        return apply_mask(x, jax.random.bernoulli(drawn, keep, shape), keep)
    return _fused_dropout(x, words, keep, tuple(shape))


class Dropout(nn.Dropout):
    """`nn.Dropout` with its mask from `bernoulli`: the same outputs and PRNG stream (the module keeps the name
    Flax gives `nn.Dropout`, `Dropout_<n>`), drawn faster on the CPU."""

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        return dropout(inputs, self.rate, deterministic,
                       lambda: self.make_rng(self.rng_collection) if rng is None else rng, self.broadcast_dims)
