"""The attention's probabilities times the values, with the probabilities recomputed in the backward pass.

softmax(scores) in float32, cast to the values' dtype, dropout, then the product with the values: JAX's
linearisation of that keeps two arrays of the scores' size for the backward pass, the softmax's float32
exponentials and the dropped probabilities (the product's operand). For wav2vec2-base at 4 x 10 s each is
[4, 12, 499, 499]: 48 MB in float32 per layer, twice over. `probs_times_values` keeps the scores (one array of
that size, in the scores' dtype) and each row's maximum and sum, and the backward pass computes the probabilities
again from them, exp(scores - max) / sum, the forward pass's own operations on the same numbers, and the dropout
mask again from its key, once (the gradient's mask is read from the dropped probabilities' zeros). Inside a layer
that the backward pass recomputes as a whole (`--remat`), and in float64, the computation is left to JAX's
linearisation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_model.random_bits import apply_mask, dropout
from flax_model.recompute import in_recomputed_layer, tied_to


def probs_times_values(scores: jax.Array, values: jax.Array, spec: str, rate: float, deterministic: bool,
                       key: Callable[[], jax.Array], probs_shape: tuple[int, ...] | None = None) -> jax.Array:
    """`jnp.einsum(spec, probs, values)` with probs = dropout(softmax(scores, float32) as the values' dtype).

    Args:
        scores: the attention scores, masked, softmax over the last axis.
        values: the product's second operand.
        spec: the product's einsum, probabilities first.
        rate: the dropout rate of the probabilities.
        deterministic: no dropout.
        key: draws the dropout key (a module's "dropout" stream); called only when a mask is drawn, as
            `nn.Dropout` calls it, so that the stream advances as it did.
        probs_shape: the probabilities reshaped to this before the product (grouped query heads).
    """
    rate = 0.0 if deterministic else rate
    drawn = key() if 0.0 < rate < 1.0 else None
    # In a layer the backward pass recomputes as a whole, recomputing the probabilities again would only add work.
    # Float64, the verification mode, keeps JAX's linearisation: its results stay those of earlier code op for op
    # (an attention key bias's gradient, zero analytically, is float32 softmax residue that another order of the
    # same operations rounds differently).
    made = _linearised if in_recomputed_layer() or scores.dtype == jnp.float64 else _recomputed
    return made(spec, rate, probs_shape)(scores, values, drawn)


def _softmax_terms(scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`jax.nn.softmax`'s operations in float32: the probabilities, each row's maximum and the sum of its
    exponentials."""
    x = scores.astype(jnp.float32)
    high = jax.lax.stop_gradient(x.max(-1, keepdims=True))
    unnormalised = jnp.exp(x - high)
    total = unnormalised.sum(-1, keepdims=True)
    return unnormalised / total, high, total


def _times_values(probs: jax.Array, values: jax.Array, drawn: jax.Array | None, spec: str, rate: float,
                  probs_shape: tuple[int, ...] | None) -> jax.Array:
    """The float32 probabilities as the values' dtype, dropped out, times the values."""
    return _product(_dropped(probs, values, drawn, rate), values, spec, probs_shape)


def _product(operand: jax.Array, values: jax.Array, spec: str, probs_shape: tuple[int, ...] | None) -> jax.Array:
    return jnp.einsum(spec, operand if probs_shape is None else operand.reshape(probs_shape), values)


def _dropped(probs: jax.Array, values: jax.Array, drawn: jax.Array | None, rate: float) -> jax.Array:
    """The float32 probabilities as the values' dtype, dropped out: the product's operand."""
    return dropout(probs.astype(values.dtype), rate, rate == 0.0, lambda: drawn)


def _linearised(spec: str, rate: float, probs_shape: tuple[int, ...] | None) -> Callable[..., jax.Array]:
    """The same computation as JAX linearises it (the exponentials and the dropped probabilities kept)."""
    return lambda scores, values, drawn: _times_values(jax.nn.softmax(scores.astype(jnp.float32), axis=-1), values,
                                                       drawn, spec, rate, probs_shape)


@functools.cache
def _recomputed(spec: str, rate: float, probs_shape: tuple[int, ...] | None) -> Callable[..., jax.Array]:
    product = functools.partial(_times_values, spec=spec, rate=rate, probs_shape=probs_shape)
    dropped = functools.partial(_dropped, rate=rate)

    @jax.custom_vjp
    def call(scores: jax.Array, values: jax.Array, drawn: jax.Array | None) -> jax.Array:
        return product(_softmax_terms(scores)[0], values, drawn)

    def forward(scores: jax.Array, values: jax.Array, drawn: jax.Array | None) -> tuple[jax.Array, tuple]:
        probs, high, total = _softmax_terms(scores)
        return product(probs, values, drawn), (scores, values, drawn, high, total)

    def backward(kept: tuple, grad: jax.Array) -> tuple:
        scores, values, drawn, high, total = kept
        # Read only once the cotangent exists: XLA would otherwise merge the recomputation with the forward pass
        # and keep its arrays until here (the row maxima and sums included: XLA:CPU fuses a reduction with its
        # broadcast, and would keep the forward pass's broadcast, an array of the scores' size, for the backward).
        scores, drawn, high, total = tied_to(grad, (scores, drawn, high, total))
        probs = jnp.exp(scores.astype(jnp.float32) - high) / total
        # The product's operand as the forward pass dropped it (the mask drawn once here). Its gradient is
        # dropped by the same mask, read from the operand's zeros rather than drawn a second time: where the
        # mask kept a probability that is 0 in the operand's dtype the gradient is dropped too, and is multiplied
        # below by that probability (0, or under the dtype's smallest normal number).
        operand = dropped(probs, values, drawn)
        _, vjp = jax.vjp(functools.partial(_product, spec=spec, probs_shape=probs_shape), operand, values)
        grad_operand, grad_values = vjp(grad)
        if 0.0 < rate:
            grad_operand = apply_mask(grad_operand, operand != 0, 1.0 - rate)
        grad_probs = grad_operand.astype(jnp.float32)
        # The transpose of softmax's JVP, y * (dx - sum(y * dx)), in the order JAX computes it.
        weighted = probs * grad_probs
        grad_scores = weighted + probs * (-weighted).sum(-1, keepdims=True)
        no_key = None if drawn is None else np.zeros(np.shape(drawn), jax.dtypes.float0)
        return grad_scores.astype(scores.dtype), grad_values, no_key

    call.defvjp(forward, backward)
    return call
