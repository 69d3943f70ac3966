"""The decoders compute what they computed before the decoder core (issue 19), within 1e-6 of each array's norm.

`parity_tests/goldens/decoder_core.npz` was written by `scripts/make_core_goldens.py` with the per-family decoders
that the core replaced: every decoder fixture's file digests, the logits of the Flax model and of the PyTorch
reference (teacher-forced, and decoded through the cache), and the decoder-side label loss and gradients of a few
composed pairs, all computed in float64 and stored as projections (norm and 8 random directions). This module
recomputes them all with the code of today, in float64 too: the figures then hold on any CPU and with either of
XLA's CPU emitters (in float32 they moved by 3e-6 to 7e-6 on an AMD EPYC against the machine they were recorded on).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from convert.base.params import load_params
from flax_model.speech_encoder_decoder import param_shapes
from scripts import make_core_goldens as goldens
from torch_reference.registry import from_pretrained as reference_from_pretrained

GOLDEN = np.load(goldens.OUTPUT)
# On the loss absolute; on logits and gradients relative to the array's norm (or, for a gradient that is zero
# analytically, e.g. an attention key bias's, to a millionth of the whole gradient's).
TOLERANCE = 1e-6
INPUTS = {k.split("/", 1)[1]: GOLDEN[k] for k in GOLDEN.files if k.startswith("inputs/")}
# The decoder fixtures that existed before the core (families added on the core have goldens of their own).
PRE_CORE_CASES = sorted(k.split("/")[0] for k in GOLDEN.files if k.endswith("/fixture_sha256"))


def test_every_pre_core_decoder_fixture_is_still_made():
    missing = sorted(set(PRE_CORE_CASES) - set(goldens.decoder_cases()))
    assert PRE_CORE_CASES and not missing, f"decoder fixtures of the golden no longer made: {missing}"


def relative_diff(got: np.ndarray, want: np.ndarray, scale: float) -> float:
    """max|got - want| / scale (projections: [norm, 8 dot products])."""
    assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))) / scale


@functools.cache
def _logits(directory: Path, case: str) -> dict[str, np.ndarray]:
    """{"<flax|torch>/<logits|cached_logits>": projections} of a fixture's float64 logits, with the golden's batch."""
    loaded = load_params(directory, param_shapes)
    model, _ = reference_from_pretrained(directory)
    batch = goldens.case_inputs(loaded.config, INPUTS)
    out = goldens.logits_projections(case, loaded.config, loaded.params, model, batch)
    return {k.removeprefix(f"{case}/"): v for k, v in out.items()}


@pytest.mark.parametrize("case", PRE_CORE_CASES)
def test_decoder_logits_equal_those_before_the_core(case, fixture_dir):
    directory = fixture_dir(case)
    assert goldens.fixture_digest(directory) == str(GOLDEN[f"{case}/fixture_sha256"]), (
        f"{case}: the fixture's files changed (the reference's parameters are drawn or stored in another order)")
    if f"{case}/same_as" in GOLDEN.files:
        # The same decoder in another source layout: it must load to the same config and params as that case.
        other = str(GOLDEN[f"{case}/same_as"])
        mine, theirs = (load_params(fixture_dir(c), param_shapes) for c in (case, other))
        assert mine.config == theirs.config
        assert goldens.params_digest(mine.params) == goldens.params_digest(theirs.params)
        return
    got = _logits(directory, case)
    expected = sorted(k.split("/", 1)[1] for k in GOLDEN.files if k.startswith(f"{case}/") and "logits" in k)
    assert sorted(got) == expected
    errors = {}
    for name in expected:
        want = GOLDEN[f"{case}/{name}"]
        errors[name] = relative_diff(got[name], want, float(want[0]))
    worst = max(errors, key=errors.get)
    print(f"{case}: max relative |Δ| {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOLERANCE, f"{case}: {worst} moved by {errors[worst]:.2e} of its norm"


@pytest.mark.parametrize(("encoder", "decoder"), goldens.PAIRS, ids=[f"{e}+{d}" for e, d in goldens.PAIRS])
def test_composed_decoder_gradients_equal_those_before_the_core(encoder, decoder, composed_dir):
    got = goldens.pair_gradients(composed_dir(encoder, decoder), INPUTS)
    prefix = f"{encoder}+{decoder}/"
    expected = {k[len(prefix):]: GOLDEN[k] for k in GOLDEN.files if k.startswith(prefix)}
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    # A gradient is compared by its norm and 4 random projections, relative to its norm (or, for one that is zero
    # analytically, e.g. an attention key bias's, to a millionth of the whole gradient's); a loss as it is.
    total = {who: np.sqrt(sum(float(v[0]) ** 2 for k, v in expected.items() if k.startswith(who) and
                              not k.endswith("/loss"))) for who in ("flax/", "torch/")}
    worst, worst_key = 0.0, None
    for key, value in expected.items():
        scale = 1.0 if key.endswith("/loss") else max(float(value[0]), 1e-6 * total[key[:key.index("/") + 1]])
        err = relative_diff(got[key], value, scale)
        if err > worst:
            worst, worst_key = err, key
    print(f"{encoder}+{decoder}: max relative |Δ| {worst:.2e} ({worst_key})")
    assert worst <= TOLERANCE, f"{encoder}+{decoder}: {worst_key} moved by {worst:.2e}"
