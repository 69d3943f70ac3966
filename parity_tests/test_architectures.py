"""What every registered architecture must do, parametrised over every fixture case of every spec.

Config round trip, Flax against the PyTorch reference on a padded batch, and the key table round trip. Cases
come from the specs (`ArchSpec.fixtures`), so a new architecture is covered once it is registered.

The padded-batch comparison runs for the cases that transformers' goldens do not cover: test_goldens.py compares
Flax and the reference each with transformers' own outputs on a padded batch of every case in the manifest (a
stronger check of the same two implementations; docs/test_suite.md).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.checkpoint import numpy_to_torch
from convert.base.configs import seeded_encoder_inputs
from convert.base.keymap import plan_flax_to_torch, plan_torch_to_flax
from convert.base.params import load_params
from convert.base.registry import SPECS, spec_for
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from scripts.make_fixtures import cases_by_arch
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.registry import model_for

TOLERANCE = 1e-5
CASES = [(spec.name, case) for spec in SPECS for case in cases_by_arch()[spec.name]]
IDS = [case for _, case in CASES]
GOLDEN_KINDS = ("encoder", "decoder")


# The fixture cases whose single-architecture outputs transformers' goldens record (test_goldens.py).
GOLDEN_CASES = {name for name, case in json.loads((Path(__file__).parent / "goldens" / "manifest.json").read_text())[
    "cases"].items() if case["kind"] in GOLDEN_KINDS}
UNGOLDEN = [(arch, case) for arch, case in CASES if case not in GOLDEN_CASES]


def _batch(config, role: str) -> dict[str, np.ndarray]:
    """A padded batch of 2 for an encoder (audio or feature frames, second row shorter) or a decoder (ids, padded
    rows)."""
    rng = np.random.default_rng(0)
    if role == "encoder":
        shortest = config.min_input_length
        if config.input_kind == "waveform":
            lengths, name = (max(1200, 3 * shortest), max(800, 2 * shortest)), "input_values"
        else:  # the frames the waveform fixtures make of those samples: the same op shapes, compiled once
            lengths, name = (59, 39), "input_features"
        values, mask = seeded_encoder_inputs(config, lengths, rng)
        return {name: values, "attention_mask": mask}
    length, frames = 8, 6
    mask = np.ones((2, length), np.int32)
    mask[1, 5:] = 0
    batch = {"input_ids": rng.integers(0, config.vocab_size, (2, length)).astype(np.int32), "attention_mask": mask}
    if config.has_cross_attention:
        width = config.cross_attention_hidden_size or config.hidden_size
        encoder_mask = np.ones((2, frames), np.int32)
        encoder_mask[0, 3:] = 0
        batch["encoder_hidden_states"] = rng.standard_normal((2, frames, width)).astype(np.float32)
        batch["encoder_attention_mask"] = encoder_mask
    return batch


@functools.cache
def _apply(config):
    """The module's `apply`, run op by op: the tiny models' operations compile once per worker and serve every
    case, where a jit per config would compile each model whole (the jitted path is covered by the composed
    model's tests)."""
    return module_for(config).apply


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize(("arch", "case"), CASES, ids=IDS)
def test_config_roundtrip_loses_nothing(arch, case, fixture_dir):
    d = json.loads((fixture_dir(case) / "config.json").read_text())
    spec = spec_for(d)
    assert spec.name == arch
    assert spec.config(d).to_hf_dict() == d


def test_every_case_is_compared_on_a_padded_batch_here_or_against_transformers():
    """A case leaves the padded-batch test only for a golden of its own: test_goldens.py's encoder and decoder
    tests take every such manifest case."""
    goldens = GOLDEN_CASES
    assert goldens <= set(IDS), f"goldens of cases no spec has: {sorted(goldens - set(IDS))}"
    assert {case for _, case in UNGOLDEN} | goldens == set(IDS)
    assert UNGOLDEN, "every case has a golden: the reference comparison would never run"


@pytest.mark.parametrize(("arch", "case"), UNGOLDEN, ids=[case for _, case in UNGOLDEN])
def test_flax_matches_torch_reference_on_a_padded_batch(arch, case, fixture_dir):
    directory = fixture_dir(case)
    loaded = load_params(directory, param_shapes)
    model, _ = reference_from_pretrained(directory)
    batch = _batch(loaded.config, spec_for(loaded.config).role)
    got = np.asarray(_first(_apply(loaded.config)({"params": loaded.params}, **batch)))
    with torch.no_grad():
        expected = _first(model(**{k: torch.from_numpy(v) for k, v in batch.items()})).numpy()
    assert got.shape == expected.shape
    err = float(np.max(np.abs(got.astype(np.float64) - expected)))
    assert err <= TOLERANCE, f"{case}: max|diff|={err:.2e}"
    assert float(np.std(expected)) > 1e-3, f"{case}: degenerate output (std {np.std(expected):.1e})"


@pytest.mark.parametrize(("arch", "case"), CASES, ids=IDS)
def test_keymap_roundtrip_is_bit_exact(arch, case, fixture_dir):
    """The reference's state dict -> Flax leaves (key table) -> PyTorch keys again: same names, same bits."""
    model, _ = reference_from_pretrained(fixture_dir(case))
    spec = spec_for(model.config)
    tied = spec.tied_keys(model.config)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k not in tied}
    expected = param_shapes(model.config)
    to_flax = plan_torch_to_flax(spec.keymap, {k: v.shape for k, v in state.items()}, expected)
    assert not to_flax.missing, to_flax.missing
    flax = {e.target: e.transform.to_flax(state[e.source]) for e in to_flax.entries}
    to_torch = plan_flax_to_torch(spec.keymap, {k: v.shape for k, v in flax.items()})
    back = {e.target: e.transform.to_torch(flax[e.source]) for e in to_torch.entries}
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    # And the Flax tree it made loads into the reference module unchanged.
    nested = traverse_util.unflatten_dict(flax, sep="/")
    restored = {e.target: numpy_to_torch(e.transform.to_torch(np.asarray(traverse_util.flatten_dict(
        nested, sep="/")[e.source]))) for e in to_torch.entries}
    assert not model.load_state_dict(restored, strict=False).unexpected_keys


@pytest.mark.parametrize(("arch", "case"), CASES, ids=IDS)
def test_spec_buffers_are_the_references_buffers(arch, case, fixture_dir):
    """`ArchSpec.buffers` (which training leaves alone) names exactly what the reference registers as a persistent
    buffer, as transformers does."""
    config = load_params(fixture_dir(case), param_shapes).config
    spec = spec_for(config)
    with torch.device("meta"):
        model = model_for(config)
    persistent = set(model.state_dict())
    buffers = {name for name, _ in model.named_buffers() if name in persistent}
    declared = {key for key in persistent if spec.is_buffer(key)}
    assert declared == buffers, f"declared {sorted(declared)}, registered {sorted(buffers)}"
