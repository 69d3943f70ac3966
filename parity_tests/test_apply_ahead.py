"""`train_step` compiles the optimiser update (`StepFunctions.apply`) in a thread of its own while the first
gradient compiles and runs, once: the later call finds it in jax.jit's cache, and the step's result is the one of
an update compiled in the calling thread. The update is traced and lowered before the gradient's trace begins
(the two traces do not take turns on the interpreter), the gradient compiled once, with the cyclic garbage
collector paused."""

from __future__ import annotations

import gc
import threading
import time

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flax_model.training import (
    LossSums,
    OptimizerSettings,
    StepFunctions,
    apply_function,
    collector_paused,
    compiled_add,
    compiled_apply,
    init_state,
    leaf_labels,
    make_optimizer,
    split_trainable,
    train_step,
)

SETTINGS = OptimizerSettings(learning_rate=1e-2, total_steps=10, warmup_steps=2, weight_decay=0.01)


def _params() -> dict:
    rng = np.random.default_rng(0)
    shapes = {"encoder/w": (3, 4), "encoder/b": (4,), "decoder/w": (4, 5), "decoder/scale": (5,)}
    return traverse_util.unflatten_dict({k: jnp.asarray(rng.normal(size=s), jnp.float32)
                                         for k, s in shapes.items()}, sep="/")


def _grad(frozen):
    """A gradient function of the step's signature: the gradient of mean(x) sum(p) + 0.5 sum(p^2) per leaf."""
    def grad(params, batch, key, smoothing):
        trainable = params if frozen is None else split_trainable(params, frozen)[0]
        grads = jax.tree.map(lambda p: batch["x"].mean() * jnp.ones_like(p) + p, trainable)
        tokens = jnp.int32(batch["x"].size)
        return LossSums(jnp.float32(1.0), jnp.float32(0.0), tokens), grads
    return jax.jit(grad)


def _compiles(record: list) -> None:
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: record.append((kw.get("fun_name"), threading.current_thread().name))
        if event == "/jax/core/compile/backend_compile_duration" else None)


def _two_train_steps(fill: float):
    """Two `train_step` calls of a step whose encoder is frozen: (the state after them, the optimizer, the frozen
    predicate, the batch)."""
    frozen = lambda path: path.startswith("encoder/")  # noqa: E731 - the gradients are the decoder's only
    trainable = split_trainable(_params(), frozen)[0]
    optimizer = make_optimizer(SETTINGS, leaf_labels(trainable, lambda path: False))
    fns = StepFunctions(_grad(frozen), compiled_add(None, frozen), compiled_apply(optimizer, None, frozen),
                        frozen=frozen)
    batch = {"x": np.full((2, 3), fill, np.float32), "labels": np.zeros((2, 3), np.int32)}
    state = init_state(_params(), optimizer, frozen)
    for _ in range(2):
        state, _, _ = train_step(fns, state, [(batch, None)])
    return state, optimizer, frozen, batch


def test_apply_compiles_once_in_its_own_thread_and_gives_the_same_step():
    record: list = []
    _compiles(record)
    state, optimizer, frozen, batch = _two_train_steps(0.5)
    applied = [thread for name, thread in record if name == "jit(apply)"]
    assert applied == ["compile-apply"], f"apply compiled in {applied} (expected once, ahead, in its own thread)"

    # The same two steps with the update compiled where it is called.
    expected = init_state(_params(), optimizer, frozen)
    apply = jax.jit(apply_function(optimizer, frozen))
    for _ in range(2):
        _, grads = _grad(frozen)(expected.params, batch, None, np.float32(0.0))
        expected = apply(expected, grads, np.int32(6))
    got, want = (traverse_util.flatten_dict(s.params, sep="/") for s in (state, expected))
    assert got.keys() == want.keys()
    for path in got:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    assert not np.array_equal(np.asarray(got["decoder/w"]), np.asarray(_params()["decoder"]["w"]))


def test_the_update_is_lowered_before_the_gradient_is_traced_which_compiles_once():
    events: list = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.append((event.rsplit("/", 1)[-1], kw.get("fun_name"),
                                                     time.perf_counter() - duration, time.perf_counter())))
    _two_train_steps(0.25)
    lowered = [end for name, fun, _, end in events if name == "jaxpr_to_mlir_module_duration" and fun == "jit(apply)"]
    traced = [start for name, fun, start, _ in events if name == "jaxpr_trace_duration" and fun == "grad"]
    compiled = [fun for name, fun, _, _ in events if name == "backend_compile_duration" and fun == "jit(grad)"]
    assert len(lowered) == 1 and len(traced) == 1, (lowered, traced)
    assert traced[0] >= lowered[0], f"the gradient traced {lowered[0] - traced[0]:.4f} s before the update was lowered"
    assert compiled == ["jit(grad)"], f"the gradient compiled {len(compiled)} times (expected once)"


def test_collector_paused_restores_the_collector():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "a collector the caller had turned off was turned on"
    finally:
        gc.enable()
    try:
        with collector_paused():
            raise KeyError("inside")
    except KeyError:
        pass
    assert gc.isenabled()
