"""Running our models in float64, where a comparison should not depend on float32's rounding.

Float32 results move with the CPU and XLA's code generation (logits of magnitude ~10 by up to ~1e-5 through a few
layers): a test that holds two computations to 1e-6 or a golden to 1e-5 runs both in float64 instead, the Flax
module with `dtype=jnp.float64` under `jax.enable_x64` and the PyTorch reference with `.double()`. A few steps stay
float32 by design in both (the softmax of attention scores, rotary tables), as in transformers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch


def float64(tree: Any) -> Any:
    """Every floating leaf as a float64 jax array, the others as jax arrays (call it under `jax.enable_x64`)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                        else jnp.asarray(x), tree)


def flax_apply(module: Any, params: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
    """`module.apply` in float64 (the module's dtype, its params and float inputs), its outputs as numpy arrays."""
    with jax.enable_x64(True):
        out = module.clone(dtype=jnp.float64).apply({"params": float64(params)}, *float64(args), method=method,
                                                    **float64(kwargs))
        return jax.tree.map(np.asarray, out)


def torch_inputs(*arrays: np.ndarray) -> list[torch.Tensor]:
    """numpy arrays as tensors, floating ones as float64."""
    return [torch.from_numpy(np.asarray(a, np.float64) if np.issubdtype(a.dtype, np.floating) else a) for a in arrays]
