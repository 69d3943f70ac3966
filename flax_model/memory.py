"""Memory estimates of the compiled work (generation, a training step, a forward pass), from shapes alone.

Nothing is compiled or allocated: the function is traced with abstract inputs (`jax.make_jaxpr`) and its program
read for the largest array it makes (the attention scores [B, H, S, S] of a long utterance, the first conv
layer's output of a large batch). While that array is made, its inputs and the parameters exist too, so the run
needs at least the parameters (and, in training, their gradients and the optimiser's moments) plus twice that
array: a lower bound of the peak, which XLA's fusion cannot go below. The commands compare it with the machine's
memory (`convert.base.resources`) before they compile or read anything large.

Tracing a model takes about a second, so it is skipped when a quick bound shows the work fits easily: every
array of these models is at most rows x W x max(N, 2 S^2, T S, T W L) elements (rows the batch times its beams,
W the widest parameter dimension, N the samples, S the encoder frames, T the decoder positions, L the layers).

`samples` below counts the encoder's input steps: audio samples, or feature frames for an encoder that reads
features (`EncoderConfig.input_kind`; `FeatureExtractorConfig.input_length` converts a padded audio length).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from convert.base.configs import encoder_input_shape
from convert.base.stacking import layer_stacks


@dataclasses.dataclass(frozen=True)
class Estimate:
    """At least `bytes` are needed; `largest` describes the largest array (or says the bound was enough)."""

    bytes: int
    largest: str


def tree_bytes(tree: Any) -> int:
    """The bytes of a tree's leaves (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree)


def device_memory() -> int | None:
    """The memory of one accelerator when JAX runs on one (None on the CPU, where the host's memory counts)."""
    if jax.default_backend() == "cpu":
        return None
    try:
        return int(jax.local_devices()[0].memory_stats()["bytes_limit"])
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return None


def largest_array(fn: Callable[..., Any], *args: Any) -> tuple[int, str]:
    """The bytes and description of the largest array `fn(*args)` makes (args abstract: nothing runs)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    best = [0, "nothing"]

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape, dtype = getattr(var.aval, "shape", None), getattr(var.aval, "dtype", None)
                if shape is not None and dtype is not None and not jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
                    n = math.prod(shape) * np.dtype(dtype).itemsize
                    if n > best[0]:
                        best[:] = [n, f"{eqn.primitive.name} output {list(shape)} {np.dtype(dtype).name}"]
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr)
    return best[0], best[1]


def _input_bytes(config: Any, batch: int, samples: int) -> int:
    """The bytes of a float32 input batch of `samples` steps (samples, or frames of `input_feature_size` values)."""
    return 4 * math.prod(encoder_input_shape(config.encoder, batch, samples))


def _bound(config: Any, params: Any, rows: int, samples: int, positions: int) -> int:
    """An upper bound of the largest array's bytes for these models (see the module docstring)."""
    width = max((max(x.shape) for x in jax.tree.leaves(params) if len(x.shape)), default=1)
    frames = int(config.encoder.output_lengths(samples))
    layers = sum(layer_stacks(config).values()) + 2
    return 4 * rows * width * max(samples, 2 * frames * frames, positions * frames, positions * width * layers)


def generation_estimate(module: Any, params: Any, batch: int, samples: int, settings: Any, masked: bool,
                        limit: int) -> Estimate:
    """What generation with `module` (a `SpeechEncoderDecoderModule` or a `SpeechPrefixModule`) and `params` (arrays
    or abstract) on a [batch, samples] input with `settings` (resolved `GenerationSettings`) needs; not traced when
    the quick bound is within `limit` bytes."""
    from flax_model.generation import search_function

    held = tree_bytes(params) + 2 * _input_bytes(module.config, batch, samples)
    rows = batch * max(settings.num_beams, 1) * max(settings.num_return_sequences, 1)
    if held + 3 * _bound(module.config, params, rows, samples, settings.max_new_tokens + 1) <= limit:
        return Estimate(held, "within the quick bound")
    spec = abstract(params)
    inputs = jax.ShapeDtypeStruct(encoder_input_shape(module.config.encoder, batch, samples), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, samples), jnp.int32) if masked else None

    # What the search reads: the encoder's output of a composed model, the prefix (prompt and projected audio) of a
    # prefix composition, whose search is its own (`flax_model.prefix`); both searches take it the same way.
    from flax_model.prefix import SpeechPrefixModule
    from flax_model.prefix import search_function as prefix_search

    prefix = isinstance(module, SpeechPrefixModule)
    method = "prefix" if prefix else "encode"

    def encode(p, x, m):
        return module.apply({"params": p}, x, m, method=method)

    encoder_bytes, encoder_what = largest_array(encode, spec, inputs, mask)
    hidden, frame_mask = jax.eval_shape(encode, spec, inputs, mask)
    traced = {k: jax.ShapeDtypeStruct((), jnp.int32 if k == "min_new_tokens" else jnp.float32)
              for k in settings.traced}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    search = (prefix_search if prefix else search_function)(module, settings)
    search_bytes, search_what = largest_array(search, spec, hidden, frame_mask, traced, key)
    largest, what = max((encoder_bytes, f"the encoder's {encoder_what}"), (search_bytes, f"the search's {search_what}"))
    return Estimate(held + 2 * largest, what)


def forward_estimate(module: Any, params: Any, batch: int, samples: int, tokens: int, float64_reference: bool,
                     limit: int) -> Estimate:
    """A teacher-forced forward pass on [batch, samples] with `tokens` decoder tokens; with
    `float64_reference`, also the PyTorch reference's float64 run of the same (twice the bytes per array)."""
    held = tree_bytes(params) + 2 * _input_bytes(module.config, batch, samples)
    factor = 4 if float64_reference else 2
    if held + factor * _bound(module.config, params, batch, samples, tokens) <= limit:
        return Estimate(held, "within the quick bound")
    largest, what = largest_array(
        lambda p, x, ids: module.apply({"params": p}, x, None, ids), abstract(params),
        jax.ShapeDtypeStruct(encoder_input_shape(module.config.encoder, batch, samples), jnp.float32),
        jax.ShapeDtypeStruct((batch, tokens), jnp.int32))
    if float64_reference:
        what += " (twice that in the float64 reference)"
    return Estimate(held + factor * largest, what)


def train_state_bytes(params: Any, frozen: Callable[[str], bool] | None, accumulate: bool) -> int:
    """The parameters, and the trainable ones' gradients (twice with accumulation) and AdamW's two moments."""
    from flax_model.training import split_trainable

    trainable = params if frozen is None else split_trainable(params, frozen)[0]
    return tree_bytes(params) + tree_bytes(trainable) * (4 if accumulate else 3)


def training_estimate(module: Any, params: Any, batch: dict[str, Any], deterministic: bool,
                      freeze_feature_encoder: bool, accumulate: bool, limit: int,
                      frozen: Callable[[str], bool] | None = None) -> Estimate:
    """One training step on `batch` (abstract arrays: "inputs", "attention_mask", "labels", masks): the params,
    the trainable leaves' gradients (twice with accumulation) and AdamW's two moments, and twice the step's
    largest array. `frozen` (path -> bool): leaves without gradient or optimiser state."""
    from flax_model.training import loss_grad_function

    held = train_state_bytes(params, frozen, accumulate)
    samples = batch["inputs"].shape[1]
    rows, positions = batch["labels"].shape
    bound = _bound(module.config, params, rows, samples, positions) * (sum(layer_stacks(module.config).values()) + 2)
    if held + 3 * bound <= limit:
        return Estimate(held, "within the quick bound")
    fn = loss_grad_function(module, deterministic=deterministic, freeze_feature_encoder=freeze_feature_encoder,
                            frozen=frozen)
    key = None if deterministic else jax.ShapeDtypeStruct((2,), jnp.uint32)
    largest, what = largest_array(fn, abstract(params), batch, key, jax.ShapeDtypeStruct((), jnp.float32))
    return Estimate(held + 2 * largest, what)
