"""Times one dropout mask drawn by `jax.random.bernoulli` and by `flax_model.random_bits.bernoulli` (the same bits).

    python scripts/bench_dropout_masks.py [--shape 4 12 499 499] [--masks 12] [--runs 3]

A compiled function draws `--masks` masks of `--shape` (fresh keys from one key, as a model's layers do) and
applies each to an array; one JSON line per implementation: milliseconds per mask (the median of `--runs` calls),
the compile CPU seconds, whether the masks equal JAX's, and the machine's 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flax_model.random_bits import bernoulli  # noqa: E402

KEEP = 0.9


def masked(draw: Callable[..., jax.Array], masks: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def run(key: jax.Array, x: jax.Array) -> jax.Array:
        for i in range(masks):
            x = jnp.where(draw(jax.random.fold_in(key, i), KEEP, x.shape), x / KEEP, 0.0)
        return x
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 12, 499, 499])
    parser.add_argument("--masks", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    key, x = jax.random.key(0), jnp.ones(args.shape, jnp.float32)
    expected = None
    for name, draw in (("jax.random.bernoulli", jax.random.bernoulli), ("random_bits.bernoulli", bernoulli)):
        lowered = jax.jit(masked(draw, args.masks)).lower(key, x)
        before = os.times()
        compiled = lowered.compile()
        after = os.times()
        out = compiled(key, x).block_until_ready()
        expected = out if expected is None else expected
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            compiled(key, x).block_until_ready()
            times.append(time.perf_counter() - start)
        print(json.dumps({"bench": "dropout_masks", "draw": name, "shape": args.shape,
                          "ms_per_mask": round(statistics.median(times) / args.masks * 1e3, 2),
                          "compile_cpu_s": round(after.user + after.system - before.user - before.system, 2),
                          "equal_to_jax": bool((out == expected).all()), "load": round(os.getloadavg()[0], 2)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
