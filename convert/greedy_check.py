"""The greedy-token comparison `convert.check` runs on either composition: each model's greedy sequences, whatever
its generation config asks for, and the check entry that compares them."""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.base.errors import ConvertError


def greedy_sequences(generate: Any, inputs: Any, mask: Any, max_new_tokens: int) -> np.ndarray:
    """`generate(inputs, mask, ...)`'s sequences, greedy (sampling or beams in the model's generation config are
    overridden: the comparison is deterministic)."""
    from convert.base.generation_settings import GenerationConfigError

    try:
        greedy = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}
        return np.asarray(generate(inputs, mask, max_new_tokens=max_new_tokens, **greedy).sequences)
    except (ValueError, GenerationConfigError) as e:  # options the model cannot honour, found by generate
        raise ConvertError(f"greedy generation: {' '.join(str(e).split())}") from None


def tokens_check(flax_tokens: np.ndarray, torch_tokens: np.ndarray, max_new_tokens: int) -> dict[str, Any]:
    same = flax_tokens.shape == torch_tokens.shape and bool(np.array_equal(flax_tokens, torch_tokens))
    return {"name": f"greedy tokens ({max_new_tokens} new) Flax vs PyTorch",
            "value": "identical" if same else _first_difference(flax_tokens, torch_tokens),
            "limit": "identical", "passed": same, "flax": flax_tokens.tolist(), "torch": torch_tokens.tolist()}


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"lengths differ: {list(a.shape)} vs {list(b.shape)}"
    row, step = (int(x[0]) for x in np.nonzero(a != b))
    return f"differ at utterance {row}, token {step}"
