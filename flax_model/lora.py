"""LoRA in Flax: the low-rank update of every adapted linear layer, added to the layer's output.

The factors live in the param tree beside the adapted kernel (`<module>/lora_A` [r, in], `<module>/lora_B`
[out, r]; `convert.base.lora` finds the layers and draws them). The architectures' modules never read them:
inside `lora_updates(settings)`, a Flax method interceptor adds s · B A dropout(x) to the output of every module
call whose params hold both factors, so LoRA works with every architecture's linear layers (`nn.Dense`, GPT-2's
Conv1D) without a line in their files. Dropout on the adapted layer's input (PEFT's `lora_dropout`) draws from
the "dropout" PRNG stream, i.e. in train mode only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.base.lora import LoraSettings
from flax_model.layer_calls import module_path, traced_per_call
from flax_model.layers import token_matmul
from flax_model.random_bits import dropout

_ACTIVE: contextvars.ContextVar[LoraSettings | None] = contextvars.ContextVar("lora_active", default=None)
# The module paths the update was added to, while `recording_lora_calls` runs.
_SEEN: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("lora_seen", default=None)


def lora_update(x: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """s · B A x for inputs x [..., in], A [r, in], B [out, r] -> [..., out]."""
    inner = token_matmul(x, a.astype(x.dtype), kernel_in_axis=1)  # [..., r]
    return token_matmul(inner, b.astype(x.dtype), kernel_in_axis=1) * jnp.asarray(scaling, x.dtype)


@contextlib.contextmanager
def lora_updates(settings: LoraSettings | None) -> Iterator[None]:
    """Within this context every module call whose params hold `lora_A` and `lora_B` returns its output plus the
    LoRA update of its first argument. Nested uses add the update once."""
    if settings is None or _ACTIVE.get() is not None:
        yield
        return

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or not module.has_variable("params", "lora_A")
                or not module.has_variable("params", "lora_B")):
            return out
        x = args[0]
        if settings.dropout > 0.0 and module.has_rng("dropout"):
            x = dropout(x, settings.dropout, False, lambda: module.make_rng("dropout"))
        update = lora_update(x, module.get_variable("params", "lora_A"), module.get_variable("params", "lora_B"),
                             settings.scaling)
        seen = _SEEN.get()
        if seen is not None:
            seen.add(module_path(module))
        return out + update.astype(out.dtype)

    token = _ACTIVE.set(settings)
    try:
        with nn.intercept_methods(intercept):
            yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def recording_lora_calls() -> Iterator[set[str]]:
    """Yields the set of module paths (`/`-joined) that received a LoRA update while the context ran (a trace is
    enough: `jax.eval_shape`). A layer that holds factors but is never called as a module (a head whose kernel a
    model reads directly) would otherwise train nothing, silently."""
    seen: set[str] = set()
    token = _SEEN.set(seen)
    try:
        with traced_per_call():
            yield seen
    finally:
        _SEEN.reset(token)
