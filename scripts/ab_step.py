"""Paired A/B of the compiled training gradient in one process: the step as the package has it against the same
step with one change undone (`--undo NAME`), both compiled side by side and run alternately (A B B A ...), so that
a drift in the machine's speed (a busy host) weighs on both alike. Prints JSON lines: each variant's median run
and the median of the paired ratios (undone / as is), with the load before and after.

    python scripts/ab_step.py --undo bias_sum --setting bfloat16 --pairs 6
    python scripts/ab_step.py --undo bias_sum --setting bfloat16 --batch 8 --audio-seconds 15
    python scripts/ab_step.py --undo fft_conv --setting scan+bfloat16 --bfloat16-products upcast

What `--undo` can undo (each patches the package while the B variant is traced):
    bias_sum  the float32 sum of a bias's gradient under bfloat16 compute (`flax_model.layers.add_bias`): B adds
              the bias as JAX transposes it (a bfloat16 sum)
    tokens_last  the bfloat16 kernel gradient's left operand laid out tokens last (`flax_model.layers._tokens_last`):
              B contracts the tokens of both operands, as before
    kept_inputs  the activations and layer norms that keep only their input for the backward pass
              (`flax_model.layers.ACTIVATIONS`, `LayerNorm`): B keeps what JAX's linearisation keeps
    residual_bits  a scanned bfloat16 layer's residuals kept as their bits (`flax_model.layers.
              bfloat16_residual_bits`): B stacks them as bfloat16 (scan+bfloat16)
    probs_recomputed  the attention's probabilities recomputed from the scores in the backward pass
              (`flax_model.attention_probs`): B keeps the softmax's exponentials and the dropped probabilities
    conv_product  a bfloat16 strided conv over time as one product on the matrix units (`flax_model.layers.
              strided_conv`: the feature encoder's): B is XLA's convolution
    tap_chunks  the grouped conv over time as one product per chunk of taps (`flax_model.layers.grouped_conv`:
              the positional conv's kernel gradient, and in bfloat16 its output and input gradient): B computes the
              kernel gradient one product per tap and the rest as XLA's convolution
    layerdrop_cond  a dropped encoder layer skipped under `nn.cond` (`flax_model.layers.run_unless_dropped`, as
              `flax_model.wav2vec2` calls it): B computes every layer and selects a dropped one's input
    channel_norm  the feature encoder's group norm (one group per channel) written out over time
              (`flax_model.wav2vec2.ChannelNorm`): B is `nn.GroupNorm`, which reduces a [B, L, C, 1] view
    fft_conv  the positional conv and its gradients through the FFT (`flax_model.fft_conv`, as
              `flax_model.layers.grouped_conv` calls it): B is XLA's convolution with the chunked kernel gradient
    hash_rounds  a measurement, not a change to undo: B draws the dropout masks through Threefry's key additions
              without its twenty rounds (`flax_model.random_bits.threefry2x32`; masks that are not random), so the
              difference is what the fused hash costs the step
    upcast_products  a comparison of the two forms of bfloat16 products: A computes them natively (bfloat16
              operands, float32 sums: the default here, whatever the CPU), B upcast to float32 operands
              (`flax_model.layers.set_bfloat16_products`, what `convert.finetune` chooses on a CPU without bfloat16
              arithmetic)

`--compiler-option KEY=VALUE` (repeatable) instead of `--undo`: B is the same program compiled with those XLA
options (`jax.jit(...).lower(...).compile(compiler_options=...)`, e.g. `xla_backend_optimization_level=1`), and
each variant's compile time is printed.

    python scripts/ab_step.py --compiler-option xla_backend_optimization_level=1 --setting scan+bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@contextlib.contextmanager
def _patched(name: str, replacement: Any, module: str = "layers") -> Iterator[None]:
    """`flax_model.<module>.<name>` replaced while the block runs."""
    owner = importlib.import_module(f"flax_model.{module}")
    kept = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, kept)


@contextlib.contextmanager
def _linearised_by_jax() -> Iterator[None]:
    """The activations and layer norms as JAX linearises them (their intermediate arrays kept), not recomputed
    from their inputs."""
    from flax_model import layers

    kept = dict(layers.ACTIVATIONS)
    layers.ACTIVATIONS.update({name: getattr(fn, "fun", fn) for name, fn in kept.items()})
    try:
        with _patched("_recomputed_normalise", lambda epsilon, dtype: functools.partial(
                layers.normalise, epsilon=epsilon, dtype=dtype)):
            yield
    finally:
        layers.ACTIVATIONS.update(kept)


def _xla_conv(hidden: Any, kernel: Any, stride: int) -> Any:
    import jax

    from flax_model.layers import _TIME_NUMBERS

    return jax.lax.conv_general_dilated(hidden, kernel, (stride,), "VALID", dimension_numbers=_TIME_NUMBERS)


def _group_norm(epsilon: float, dtype: Any, name: str) -> Any:
    from flax import linen as nn

    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=epsilon, dtype=dtype, use_fast_variance=False,
                        name=name)


@contextlib.contextmanager
def _without_hash_rounds() -> Iterator[None]:
    """Threefry-2x32's key additions without its rounds. The masks are drawn by jitted functions, traced once per
    shape: their caches are cleared on the way in and out so that each variant traces its own."""
    import numpy as np

    from flax_model import random_bits

    def additions_only(key: Any, x0: Any, x1: Any) -> tuple[Any, Any]:
        return x0 + key[0], x1 + key[1] + np.uint32(1)

    drawn = (random_bits._fused_keep, random_bits._fused_bernoulli)
    for fn in drawn:
        fn.clear_cache()
    try:
        with _patched("threefry2x32", additions_only, "random_bits"):
            yield
    finally:
        for fn in drawn:
            fn.clear_cache()


UNDO: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "bias_sum": lambda: _patched("_low_precision_bias_add", lambda y, bias: y + bias.astype(y.dtype)),
    "tokens_last": lambda: _patched("_tokens_last", lambda a: None),
    "kept_inputs": _linearised_by_jax,
    "residual_bits": lambda: _patched("bfloat16_residual_bits", lambda body: body),
    "probs_recomputed": lambda: _patched(
        "_recomputed", importlib.import_module("flax_model.attention_probs")._linearised, "attention_probs"),
    "conv_product": lambda: _patched("_conv_as_product", _xla_conv),
    "tap_chunks": lambda: _patched("_TAP_PRODUCT_MIN_WIDTH", sys.maxsize),
    "layerdrop_cond": lambda: _patched(
        "run_unless_dropped", importlib.import_module("flax_model.layers").computed_and_selected, "wav2vec2"),
    "channel_norm": lambda: _patched("ChannelNorm", _group_norm, "wav2vec2"),
    "fft_conv": lambda: _patched("_FFT_MIN_TAPS", sys.maxsize),
    "hash_rounds": _without_hash_rounds,
    "upcast_products": lambda: importlib.import_module("flax_model.layers").bfloat16_products_as("upcast"),
}


def _compiler_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as XLA compile options (integers as integers)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise SystemExit(f"--compiler-option {pair!r}: expected KEY=VALUE")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--undo", choices=sorted(UNDO))
    which.add_argument("--compiler-option", action="append", metavar="KEY=VALUE",
                       help="B: the same program compiled with this XLA option (repeatable)")
    parser.add_argument("--setting", default="float32", help="as bench_train.py's --settings (one)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--label-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 layers per stack (a smoke test)")
    parser.add_argument("--layerdrop", type=float, default=None)
    parser.add_argument("--bfloat16-products", choices=("native", "upcast"), default="native",
                        help="the form of bfloat16 products both variants trace (upcast: what convert.finetune "
                             "chooses on a CPU without bfloat16 arithmetic)")
    args = parser.parse_args(argv)
    args.freeze = True

    from convert.allocator import keep_freed_memory
    from convert.xla_settings import order_for_memory
    from scripts.bench_train import Setting, bench_batch, load, model_config

    setting = Setting.parse(args.setting)
    keep_freed_memory()  # before JAX starts its backend, as convert.finetune has both
    if setting.memory_ordered():
        order_for_memory()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_model.layers import set_bfloat16_products
    from flax_model.speech_encoder_decoder import stack_params
    from flax_model.training import compiled_grad, step_key
    from scripts.bench import random_params
    set_bfloat16_products(args.bfloat16_products)
    config = model_config(args)
    data = bench_batch(config, args.batch, args.audio_seconds, args.label_tokens)
    batch = {k: jnp.asarray(data[k]) for k in ("inputs", "attention_mask", "labels")}
    params = random_params(config)
    if setting.scan and not setting.per_layer:
        params = stack_params(config, params)
    params = jax.tree.map(jnp.asarray, params)
    module = setting.module(config)
    example = (params, batch, step_key(0, 0), np.float32(0.0))
    options = _compiler_options(args.compiler_option) if args.compiler_option else None
    variant = f"undo_{args.undo}" if args.undo else "options"
    compiled = {}
    for name, patch in (("as_is", contextlib.nullcontext), (variant, UNDO.get(args.undo, contextlib.nullcontext))):
        with patch():
            started = time.perf_counter()
            grad = compiled_grad(module, deterministic=False, freeze_feature_encoder=True)
            try:
                compiled[name] = grad.lower(*example).compile(compiler_options=options if name == variant else None)
            except jax.errors.JaxRuntimeError as error:  # an option XLA does not know, or a value it refuses
                if name != variant or options is None:
                    raise
                raise SystemExit(f"--compiler-option {options}: {str(error).splitlines()[0]}") from None
        print(json.dumps({"bench": "ab_compile", "variant": name, "compile_s": round(time.perf_counter() - started, 2),
                          "temp_bytes": compiled[name].memory_analysis().temp_size_in_bytes}), flush=True)
    names = list(compiled)
    times: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    load_before = load()
    for name in names:  # the first run of each faults its pages in: not timed
        jax.block_until_ready(compiled[name](*example))
    for pair in range(args.pairs):
        for name in (names if pair % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            sums, _ = jax.block_until_ready(compiled[name](params, batch, step_key(0, pair + 1), np.float32(0.0)))
            times[name].append(time.perf_counter() - started)
            losses.setdefault(name, float(jax.tree.leaves(sums)[0]))  # the first timed run's
    ratios = [b / a for a, b in zip(times[names[0]], times[names[1]])]
    for name in names:
        print(json.dumps({"bench": "ab_run", "variant": name, "median_s": round(statistics.median(times[name]), 3),
                          "runs_s": [round(t, 3) for t in times[name]], "first_loss_sum": losses[name]}))
    print(json.dumps({"bench": "ab", "undo": args.undo, "compiler_options": options, "setting": setting.name,
                      "bfloat16_products": args.bfloat16_products,
                      "batch": args.batch, "audio_seconds": args.audio_seconds, "pairs": args.pairs,
                      "median_ratio_undone_over_as_is": round(statistics.median(ratios), 3),
                      "ratios": [round(r, 3) for r in ratios], "load_before": load_before, "load_after": load()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
