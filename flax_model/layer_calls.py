"""How the loss's unrolled layers are called: each as one pure function, traced once for all the layers alike, and
optionally recomputed in the backward pass.

`pure_layers(pattern)` is the context the loss runs in (`SpeechEncoderDecoderModule.loss_sums`, the prefix model's
loss). Within it every call of a layer whose module path matches `pattern` runs as a pure function of the layer's
variables, a dropout key and its array arguments. The function goes through `jax.jit`, one per context entry, whose
static argument is the unbound layer (its config, no name) with the layer's non-array arguments: the twelve layers
of wav2vec2-base are then traced once, and the linearisation of that trace is shared too (JAX caches it per traced
program). XLA inlines the calls, so the compiled program computes what the unrolled layers computed; only JAX's
work shrinks (tracing a wav2vec2-base + BART-base step at 4 x 10 s: `docs/training_performance.md`).

With `remat=True` the function's backward pass recomputes it from its inputs (`recomputed_in_backward`): only the
layer's inputs are kept for the backward pass.

A layer's dropout key is its own stream's key with its module path folded in (`LazyRng.as_jax_rng`), so each layer
draws its own masks; the recomputation gets the same key and draws the same masks. While the model is initialised,
and for layers called with arguments that cannot be compared (a NumPy array among the static ones), layers run as
they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.scope import LazyRng

from flax_model.recompute import layer_recomputed, recomputed_in_backward

_INSIDE_LAYER = contextvars.ContextVar("inside_pure_layer", default=False)
_ACTIVE = contextvars.ContextVar("pure_layers", default=False)
_SHARED = contextvars.ContextVar("shared_layer_traces", default=True)
_PREFIX: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("pure_layer_path", default=())


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    """`var` set to `value` within the context."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def layer_pattern(stacks: list[str]) -> re.Pattern[str]:
    """Module paths of the layers of the given stacks (e.g. `encoder/encoder/layers/` -> `.../layers/3`)."""
    return re.compile("|".join(f"{re.escape(stack)}\\d+" for stack in stacks))


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What makes two layer calls the same traced program: the unbound layer (its class and fields, no name),
    the structure of its arguments, their non-array leaves, which leaves are arrays, whether a dropout key comes
    with them and whether the call is rematerialised. Hashable: it is `jax.jit`'s static argument."""

    layer: nn.Module
    tree: Any  # treedef of (args, kwargs)
    static: tuple  # the leaves, None where an array goes
    traced: tuple[int, ...]  # positions of the array leaves
    keyed: bool
    remat: bool

    def run(self, variables: Any, key: jax.Array | None, *arrays: jax.Array) -> Any:
        leaves = list(self.static)
        for i, a in zip(self.traced, arrays):
            leaves[i] = a
        args, kwargs = jax.tree.unflatten(self.tree, leaves)
        with _setting(_INSIDE_LAYER, True), layer_recomputed(self.remat):
            return self.layer.apply(variables, *args, rngs=None if key is None else {"dropout": key}, **kwargs)


def _call_layer(call: LayerCall, variables: Any, key: jax.Array | None, *arrays: jax.Array) -> Any:
    fn = recomputed_in_backward(call.run, constants=1) if call.remat else call.run
    return fn(variables, key, *arrays)


@contextlib.contextmanager
def pure_layers(layers: re.Pattern[str], remat: bool = False) -> Iterator[None]:
    """Within this context the layers whose module paths match `layers` run as shared pure functions (the module
    docstring); `remat`: each is recomputed in the backward pass.

    The layers are the architectures' own modules; wrapping their calls here (a Flax method interceptor) keeps this
    out of every architecture file. Each entry of the context jits a function of its own (JAX keys its traces on the
    function), so that what the layers read from other contexts while traced (LoRA updates, a mesh) is never taken
    from an earlier entry's trace.
    """

    def layer_call(call: LayerCall, variables: Any, key: jax.Array | None, *arrays: jax.Array) -> Any:
        return _call_layer(call, variables, key, *arrays)

    shared = jax.jit(layer_call, static_argnums=0)  # JAX keys its trace cache on the function: this entry's own

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if (context.method_name != "__call__" or _INSIDE_LAYER.get() or module.is_initializing()
                or not layers.fullmatch("/".join(module.path))):
            return next_fun(*args, **kwargs)
        leaves, tree = jax.tree.flatten((args, kwargs))
        traced = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray)))
        static = tuple(None if i in traced else leaf for i, leaf in enumerate(leaves))
        key = module.scope.rngs.get("dropout") if module.has_rng("dropout") else None
        if isinstance(key, LazyRng):
            key = key.as_jax_rng()
        call = LayerCall(module.clone(parent=None, name=None), tree, static, traced, key is not None, remat)
        arrays = [jnp.asarray(leaves[i]) for i in traced]
        shareable = _SHARED.get()
        try:
            hash(call)
        except TypeError:  # a static argument that cannot be compared: this call is traced on its own
            shareable = False
        with _setting(_PREFIX, tuple(module.path)):
            return (shared if shareable else _call_layer)(call, dict(module.variables), key, *arrays)

    with _setting(_ACTIVE, True), nn.intercept_methods(intercept):
        yield


@contextlib.contextmanager
def traced_per_call() -> Iterator[None]:
    """Within this context `pure_layers` traces every layer call on its own (for what records, while traced, which
    modules ran: a shared trace runs the Python of the first layer only)."""
    with _setting(_SHARED, False):
        yield


def module_path(module: nn.Module) -> str:
    """`module`'s path in the whole model, `/`-joined, also inside a layer run by `pure_layers` (where the layer is
    the root of what is applied)."""
    return "/".join((*_PREFIX.get(), *module.path))


def stack_index(index: jax.Array | int) -> jax.Array | int:
    """A layer's index in its stack as the layer should receive it: a Python int traced within `pure_layers` (so
    that the layers share one trace; what depends on the index is selected at run time, as in a scanned stack),
    anything else as it is."""
    return jnp.asarray(index, jnp.int32) if _ACTIVE.get() and isinstance(index, int) else index
