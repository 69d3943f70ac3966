"""Small pieces shared by the Flax architectures: activations, frame masks, LayerDrop, and the layer stack
(per-layer modules or one scanned layer) every architecture runs its identical layers through."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def frame_mask(encoder_config: Any, attention_mask: jax.Array, num_frames: int,
               add_adapter: bool | None = None) -> jax.Array:
    """Which of an encoder's output frames hold real audio, from the sample-level mask.

    Args:
        encoder_config: an `EncoderConfig` (its `output_lengths` counts frames, adapter included by default).
        attention_mask: [B, N], 1 for real samples (right padding).
        num_frames: S, the number of frames of the padded batch.
        add_adapter: passed to `output_lengths` (False: the frames before an adapter).

    Returns:
        [B, S] bool, True for the first `output_lengths(sum(attention_mask))` frames of each row.
    """
    lengths = encoder_config.output_lengths(attention_mask.sum(-1).astype(jnp.int32), add_adapter)  # [B]
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def layer_drop(module: Any, rate: float, deterministic: bool) -> jax.Array | bool:
    """LayerDrop: whether `module`'s layer is skipped in this call (training only).

    One uniform draw per layer per call from the module's "dropout" PRNG stream, so that a compiled training
    step draws anew at every step (Python's `random` would be frozen into the trace). Use as
    `hidden = jnp.where(layer_drop(self, rate, deterministic), hidden, layer(hidden))`.
    """
    if deterministic or rate <= 0.0:
        return False
    return jax.random.uniform(module.make_rng("dropout"), ()) < rate


# ----------------------------------------------------------------------------------------------------------
# Layer stacks: unrolled or scanned


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """How the layer stacks built in the current context run.

    Attributes:
        scan: one `nn.scan` over a single layer module with stacked params (a leading layer axis) instead of
            one module per layer (`name=str(i)`, HF's layout).
        remat: rematerialise each scanned layer (`nn.remat` inside the scan). Unrolled layers are
            rematerialised by `flax_model.training.remat_layers` instead.
    """

    scan: bool = False
    remat: bool = False


UNROLLED = ScanSettings()
_SCAN: contextvars.ContextVar[ScanSettings | None] = contextvars.ContextVar("layer_scan", default=None)


def scan_settings() -> ScanSettings:
    """The settings of the current context (`layer_scan`); unrolled outside any."""
    return _SCAN.get() or UNROLLED


@contextlib.contextmanager
def layer_scan(scan: bool = True, remat: bool | None = None) -> Iterator[None]:
    """Within this context, the layer stacks that modules build (`make_stack`) are scanned (or not: `scan=False`).

    The choice changes the param tree, so a model must be initialised and applied under the same setting: the
    composed model (`SpeechEncoderDecoderModule.scan_layers`) enters this context in each of its methods.

    Args:
        scan: scan the stacks.
        remat: rematerialise each scanned layer; None keeps the enclosing context's choice.
    """
    token = _SCAN.set(ScanSettings(scan, scan_settings().remat if remat is None else remat))
    try:
        yield
    finally:
        _SCAN.reset(token)


Stack = Sequence[nn.Module] | nn.Module  # per-layer modules, or the one module a scan runs over


def make_stack(parent: nn.Module, make_layer: Callable[[int, str], nn.Module], num_layers: int) -> Stack:
    """The layers of a stack, built inside `parent`'s `setup` or compact method.

    Unrolled: `[make_layer(i, str(i)) for i]`, layer i's params at `<parent>/<i>/...` (HF's Flax layout).
    Scanned (inside `layer_scan`): one `make_layer(0, "layer")` whose scope is `parent`'s own, so that its
    stacked params sit at `<parent>/...` with a leading layer axis (`convert.base.stacking` converts between the two).

    Args:
        parent: the module the stack's params live under.
        make_layer: (layer index, name) -> an unbound layer module. A scanned layer is built with index 0 and
            gets its traced index from `run_stack` (a layer whose computation depends on its index must take it
            from there).
        num_layers: how many layers.
    """
    if not scan_settings().scan:
        return [make_layer(i, str(i)) for i in range(num_layers)]
    layer = make_layer(0, "layer")
    nn.share_scope(parent, layer)
    return layer


def is_scanned(layers: Stack) -> bool:
    return isinstance(layers, nn.Module)


Step = Callable[[nn.Module, Any, Any, Any], tuple[Any, Any]]


def run_stack(layers: Stack, num_layers: int, step: Step, carry: Any, per_layer: Any = None) -> tuple[Any, Any]:
    """Runs `step` through the layers in order: `carry, out = step(layer, index, carry, x)`.

    Unrolled, `index` is the Python int i and `x` is `per_layer[i]`; the outputs come back as a tuple. Scanned,
    `index` is a traced int32 scalar, `x` the i-th slice of the stacked `per_layer` pytree (leading layer axis),
    and the outputs come back stacked. Scanned layers draw their "dropout" keys from a key split per layer
    (`split_rngs`), so their random draws differ from the unrolled layers' for the same key.

    Args:
        layers: from `make_stack`.
        num_layers: how many layers (the scan's length).
        step: one layer's work; arguments other than `carry` and `x` are closed over (static or constants).
        carry: what flows from layer to layer (e.g. the hidden states [B, T, D]).
        per_layer: each layer's own input (e.g. its `LayerCache`), or None.
    """
    if not is_scanned(layers):
        outs = []
        for i, layer in enumerate(layers):
            carry, out = step(layer, i, carry, None if per_layer is None else per_layer[i])
            outs.append(out)
        return carry, tuple(outs)

    def body(layer: nn.Module, carry: Any, xs: tuple[jax.Array, Any]) -> tuple[Any, Any]:
        index, x = xs
        return step(layer, index, carry, x)

    if scan_settings().remat:
        # Inside a scan, common-subexpression elimination cannot merge the recomputation with the forward pass.
        body = nn.remat(body, prevent_cse=False)
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=num_layers)
    return scanned(layers, carry, (jnp.arange(num_layers, dtype=jnp.int32), per_layer))


def map_stack(layers: Stack, num_layers: int, fn: Callable[[nn.Module], Any]) -> Any:
    """`fn(layer)` for every layer: a tuple (unrolled) or one stacked pytree (scanned)."""
    return run_stack(layers, num_layers, lambda layer, index, carry, x: (carry, fn(layer)), None)[1]
