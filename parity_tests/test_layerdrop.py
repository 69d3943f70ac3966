"""LayerDrop skips the dropped layers' computation, as transformers' `if not skip_the_layer` does.

What a dropped layer computes (its input, passed through) is checked per family against the reference without
its layers (test_spec_augment.py, test_wav2vec2_bert.py, test_bart.py), and that the draws follow the key in
test_training.py. Here, from the traced training program (nothing compiled): each speech encoder's layers run under
a conditional whose other branch holds no matmul, in the forward and in the backward pass, unrolled and scanned, so
that a dropped layer costs nothing (computing it and selecting its input cost the whole layer: ~10% of
wav2vec2-base's encoder at LayerDrop 0.1), and the eval program has no conditional at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from convert.base.params import load_params
from flax_model.layers import layer_scan
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from parity_tests.jaxprs import equations

# One fixture per encoder stack (HuBERT and data2vec-audio run wav2vec2's), with the layers that may be dropped
# (WavLM keeps its first layer, as transformers does).
CASES = {"w2v_group": 0, "wavlm_group": 1, "conformer_rel": 0, "w2vbert": 0}


def _dots(jaxpr: Any) -> int:
    """dot_general equations in `jaxpr`, nested programs included."""
    return sum(eqn.primitive.name == "dot_general" for eqn in equations(jaxpr))


def _conds(jaxpr: Any) -> list[list[int]]:
    """For every `cond` in `jaxpr` (nested programs included): the dot_general count of each of its branches."""
    return [[_dots(branch) for branch in eqn.params["branches"]] for eqn in equations(jaxpr)
            if eqn.primitive.name == "cond"]


def _inputs(case: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if case == "w2vbert":  # stacked log-mel features
        values, mask = rng.standard_normal((2, 24, 160)).astype(np.float32), np.ones((2, 24), np.int32)
        mask[1, 18:] = 0
    else:
        values, mask = rng.standard_normal((2, 3200)).astype(np.float32), np.ones((2, 3200), np.int32)
        mask[1, 2400:] = 0
    return values, mask


def _program(config, scan: bool, deterministic: bool, *inputs: Any, **named: Any) -> jax_core.Jaxpr:
    """The traced value and gradient of the summed squares of the model's output (the first, for a model that
    returns several), params as shapes only."""
    module = module_for(config)
    with layer_scan(scan):
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **named))["params"]

    def loss(params):
        with layer_scan(scan):
            out = module.apply({"params": params}, *inputs, **named, deterministic=deterministic,
                               rngs=None if deterministic else {"dropout": jax.random.key(1)})
        return jnp.sum((out[0] if isinstance(out, tuple) else out) ** 2)

    return jax.make_jaxpr(jax.value_and_grad(loss))(shapes).jaxpr


def _skipping(conds: list[list[int]]) -> list[list[int]]:
    """The conditionals with a branch of matmuls and a branch of none."""
    return [c for c in conds if len(c) == 2 and min(c) == 0 and max(c) > 0]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_dropped_layer_computes_nothing_forward_or_backward(case, scan, fixture_dir):
    config = load_params(fixture_dir(case), param_shapes).config.replace(layerdrop=0.1)
    values, mask = _inputs(case)
    conds = _conds(_program(config, scan, False, values, mask))
    droppable = config.num_hidden_layers - CASES[case]
    # Forward and backward: one conditional per droppable layer each, unrolled; one each in the scan's body.
    expected = 2 if scan else 2 * droppable
    skipping = _skipping(conds)
    assert len(skipping) == expected, f"conditionals (matmuls per branch): {conds}, expected {expected} skipping"
    if not scan:  # each layer's whole forward and backward work sits in its branches
        one_layer = (_dots(_program(config.replace(num_hidden_layers=1), scan, True, values, mask))
                     - _dots(_program(config.replace(num_hidden_layers=0), scan, True, values, mask)))
        held = sorted(max(c) for c in skipping)
        assert sum(held) == droppable * one_layer, (
            f"the branches hold {held} matmuls; one layer's forward and backward passes hold {one_layer}")


@pytest.mark.parametrize("case", list(CASES))
def test_eval_and_layerdrop_zero_have_no_conditional(case, fixture_dir):
    config = load_params(fixture_dir(case), param_shapes).config.replace(layerdrop=0.1)
    values, mask = _inputs(case)
    assert _conds(_program(config, False, True, values, mask)) == []
    assert _conds(_program(config.replace(layerdrop=0.0), False, False, values, mask)) == []


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_dropped_decoder_layer_computes_nothing(scan, fixture_dir):
    """The decoder core's LayerDrop (BART's and mBART's `decoder_layerdrop`), cross-attention included."""
    config = load_params(fixture_dir("bart_cg"), param_shapes).config.replace(decoder_layerdrop=0.1)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 90, (2, 7)).astype(np.int32), "attention_mask": np.ones((2, 7), np.int32),
             "encoder_hidden_states": rng.standard_normal((2, 5, config.d_model)).astype(np.float32)}

    skipping = _skipping(_conds(_program(config, scan, False, **batch)))
    assert len(skipping) == (2 if scan else 2 * config.decoder_layers), f"skipping conditionals: {skipping}"
    assert _conds(_program(config, scan, True, **batch)) == []
