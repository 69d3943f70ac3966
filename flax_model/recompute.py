"""Recomputation in the backward pass (rematerialisation) that holds on XLA:CPU.

`recomputed_in_backward(fn)` keeps only `fn`'s arguments for the backward pass and computes `fn` again there. It
is what `jax.checkpoint` does, with one difference that makes it work on XLA:CPU: the recomputation reads its
arguments multiplied by a 1 computed from the output's cotangent, so that it can run only once the backward pass
has reached it, and is not the forward computation again. XLA:CPU drops `jax.checkpoint`'s optimisation barriers
early; common-subexpression elimination then merges the recomputation with the forward pass (or the scheduler
runs it right after the forward pass), and the peak memory does not move (measured: the same XLA temporaries with
and without `jax.checkpoint` on every layer; `docs/training_performance.md`).

Used for whole layers (`flax_model.layer_calls`, `--remat`) and, always, for the layer norms, whose linearisation
would keep three arrays of their input's size where the input suffices (`flax_model.layers.LayerNorm`, the decoder
core's `RMSNorm`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def recomputed_in_backward(fn: Callable[..., Any], constants: int = 0) -> Callable[..., Any]:
    """`fn(*args)` (pytrees of arrays) whose backward pass recomputes it from its arguments.

    The gradients are those of `fn` itself (the same linearisation, of the same numbers). PRNG keys among the
    arguments get no gradient (dropout's random bits depend on the key alone: it is tied to the cotangent too, so
    that no bits are kept from the forward pass).

    Args:
        fn: the function; its outputs must include a floating-point array.
        constants: how many leading arguments are read as they are in the recomputation (a layer's params:
            what depends on them alone, such as their cast to the compute dtype, may be shared with the forward
            pass).
    """

    @jax.custom_vjp
    def call(*args: Any) -> Any:
        return fn(*args)

    def forward(*args: Any) -> tuple[Any, tuple]:
        return fn(*args), args

    def backward(args: tuple, grad_out: Any) -> tuple:
        leaves, tree = jax.tree.flatten(args[:constants] + tied_to(grad_out, args[constants:]))
        keys = [_is_key(a) for a in leaves]

        def with_keys(*differentiated: jax.Array) -> Any:
            it = iter(differentiated)
            return fn(*jax.tree.unflatten(tree, [a if k else next(it) for a, k in zip(leaves, keys)]))

        _, vjp = jax.vjp(with_keys, *[a for a, k in zip(leaves, keys) if not k])
        grads = iter(vjp(grad_out))
        return tuple(jax.tree.unflatten(tree, [np.zeros(np.shape(a), jax.dtypes.float0) if k else next(grads)
                                               for a, k in zip(leaves, keys)]))

    call.defvjp(forward, backward)
    return call


_LAYER_RECOMPUTED = contextvars.ContextVar("layer_recomputed", default=False)


@contextlib.contextmanager
def layer_recomputed(recomputed: bool = True) -> Iterator[None]:
    """Within this context a whole layer is traced that the backward pass recomputes (`--remat`): its parts then
    keep what their linearisation keeps instead of recomputing it once more (`in_recomputed_layer`)."""
    token = _LAYER_RECOMPUTED.set(recomputed)
    try:
        yield
    finally:
        _LAYER_RECOMPUTED.reset(token)


def in_recomputed_layer() -> bool:
    """Whether the code being traced is a layer the backward pass recomputes as a whole (`layer_recomputed`)."""
    return _LAYER_RECOMPUTED.get()


@functools.cache
def recomputed_with(fn: Callable[..., Any], **static: Any) -> Callable[..., Any]:
    """`recomputed_in_backward(functools.partial(fn, **static))`, made once per function and static arguments
    (hashable: epsilons, dtypes)."""
    return recomputed_in_backward(functools.partial(fn, **static))


def tied_to(grad_out: Any, tree: Any) -> Any:
    """`tree`'s arrays as they are, but computed only once `grad_out` (a backward pass's cotangent) exists: what
    the backward pass recomputes from them then runs there, not beside the forward pass."""
    anchor = next(g for g in jax.tree.leaves(grad_out) if jnp.issubdtype(g.dtype, jnp.floating))
    anchor = anchor.reshape(-1)[0].astype(jnp.float32)
    # 1 and 0, known only once the cotangent exists: XLA folds neither `0 * x` nor `x != x` for floats.
    one, zero = 1 + 0 * anchor, (anchor != anchor).astype(jnp.uint32)
    return jax.tree.map(lambda a: _tied(a, one, zero), tree)


def computed_beside(out: jax.Array, kept: jax.Array) -> jax.Array:
    """`out` unchanged (bit for bit), read beside `kept` (same shape, same width of dtype): `kept` is then read in
    the forward pass and XLA computes it there into a buffer of its own.

    An elementwise array the backward pass alone reads (an activation's derivative) is otherwise fused by XLA into
    the backward pass's loop, which then keeps the terms it is computed from (for the exact GELU: its input, its
    erfc and exp terms) until there, where LayerDrop's conditionals or a scanned stack would have ended the pass
    and kept `kept` alone. The bits of `kept` are OR-ed into `out`'s after an AND with a 0 that XLA cannot fold
    (false both ways of comparing a float with itself)."""
    if kept.size == 0:
        return out
    bits = jnp.dtype(f"uint{8 * jnp.dtype(out.dtype).itemsize}")
    first = kept.reshape(-1)[0].astype(jnp.float32)
    zero = ((first != first) & (first == first)).astype(bits)
    as_bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=bits)
    return jax.lax.bitcast_convert_type(as_bits(out) | (as_bits(kept) & zero), out.dtype)


def _is_key(a: Any) -> bool:
    return jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def _tied(a: jax.Array, one: jax.Array, zero: jax.Array) -> jax.Array:
    """`a` computed after the cotangent: a float times `one`, a key with `zero` added to its bits; other integer
    and boolean arrays as they are (nothing is recomputed from them alone)."""
    if _is_key(a):
        return jax.random.wrap_key_data(jax.random.key_data(a) + zero, impl=jax.random.key_impl(a))
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a * one.astype(a.dtype)
    if a.dtype == jnp.uint32:  # raw key data (`jax.random.PRNGKey`)
        return a + zero
    return a
