"""GFLOP/s of the linear layers' products on this machine's XLA:CPU, by dtype and by which axes they contract.

    python scripts/bench_matmul.py [--tokens 1996] [--inputs 768] [--outputs 3072] [--runs 5]

One JSON line per product (the best of `--runs` compiled calls): the forward product [N, I] x [I, O], the input
gradient [N, O] x [I, O]^T and the kernel gradient [N, I]^T x [N, O] (the tokens contracted), in float32, in
bfloat16 returning bfloat16, in bfloat16 returning float32 sums (what `flax_model.layers.token_matmul` asks for
under `dtype=jnp.bfloat16`), and upcast (the bfloat16 operands cast to float32, the form it takes on a CPU without
bfloat16 arithmetic: `flax_model.layers.set_bfloat16_products`). On a CPU with bfloat16 matrix units (Intel AMX) XLA:CPU uses them only for the
float32-sum form, and not where the contracted axis is the leading one of the left operand (the kernel gradient).
`load` is the 1-minute load average when measured (above the core count the figures are not results).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax


def best_seconds(fn, *args, runs: int) -> float:
    compiled = jax.jit(fn)
    compiled(*args).block_until_ready()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        compiled(*args).block_until_ready()
        times.append(time.perf_counter() - started)
    return min(times)


def _product(a: jax.Array, b: jax.Array, axes: tuple, sums: object, upcast: bool) -> jax.Array:
    """The product in one form; `upcast`: bfloat16 operands cast to float32, multiplied, the result rounded back
    (`flax_model.layers`' upcast form of bfloat16 products, for CPUs without bfloat16 arithmetic)."""
    if upcast:
        return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), (axes, ((), ()))).astype(a.dtype)
    return lax.dot_general(a, b, (axes, ((), ())), preferred_element_type=sums)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1996, help="N: 4 x 499 frames of 10 s audio")
    parser.add_argument("--inputs", type=int, default=768)
    parser.add_argument("--outputs", type=int, default=3072)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n, i, o = args.tokens, args.inputs, args.outputs
    flops = 2.0 * n * i * o
    products = {  # name -> (left shape, right shape, contracted axes)
        "forward": ((n, i), (i, o), ((1,), (0,))),
        "input_gradient": ((n, o), (i, o), ((1,), (1,))),
        "kernel_gradient": ((n, i), (n, o), ((0,), (0,))),
    }
    forms = {"float32": (jnp.float32, None, False), "bfloat16": (jnp.bfloat16, None, False),
             "bfloat16_float32_sums": (jnp.bfloat16, jnp.float32, False),
             "bfloat16_upcast": (jnp.bfloat16, None, True)}
    for product, (left, right, axes) in products.items():
        for form, (dtype, sums, upcast) in forms.items():
            a, b = jnp.ones(left, dtype), jnp.ones(right, dtype)
            seconds = best_seconds(lambda a, b, axes=axes, sums=sums, upcast=upcast: _product(
                a, b, axes, sums, upcast), a, b, runs=args.runs)
            print(json.dumps({"bench": "matmul", "product": product, "form": form, "shape": [n, i, o],
                              "ms": round(seconds * 1e3, 2), "gflops": round(flops / seconds / 1e9, 1),
                              "load": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
