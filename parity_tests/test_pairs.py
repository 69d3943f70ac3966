"""Every encoder composes with every decoder: each registered encoder's pair cases (its main fixture, and its
adapter fixture where it has an adapter) with each registered decoder's main fixture, composed in-process (a decoder
whose fixture module names `HEAVY_ENCODERS` is paired here with those only; `scripts.make_fixtures.in_heavy_pairs`).
Every pair's output holds every source tensor bit for bit; the logits are compared with the reference's for a cover
of the pairs (`LOGIT_PAIRS`: every encoder case and every decoder in one pair at least): a composed model
runs its encoder's code and its decoder's, joined by the cross-attention (and the projection where the widths
differ), and the cover takes each of them (docs/test_suite.md).

The pairs derive from the registry (`specs("encoder")` x `specs("decoder")`) and the fixture modules'
`PAIR_CASES` (default: the first case of `CASES`; DESIGN.md, "Adding an architecture"), so that a newly
registered architecture is paired with every architecture of the other role without an edit here.
"""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest
import torch

from convert.base.checkpoint import Checkpoint
from convert.base.composed import composed_keymap
from convert.base.registry import spec_for, specs
from convert.verify import seeded_inputs
from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule
from parity_tests.float64 import torch_inputs
from parity_tests.pair_cover import cover
from scripts.make_fixtures import in_heavy_pairs
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

TOLERANCE = 1e-5


def pair_cases(spec) -> tuple[str, ...]:
    """The fixture cases of an architecture that take part in pairs: `PAIR_CASES`, else the first case."""
    fixtures = importlib.import_module(spec.fixtures)
    return tuple(getattr(fixtures, "PAIR_CASES", (next(iter(fixtures.CASES)),)))


PAIRS = [(encoder, decoder) for encoder_spec in specs("encoder") for encoder in pair_cases(encoder_spec)
         for decoder_spec in specs("decoder") for decoder in pair_cases(decoder_spec)
         if in_heavy_pairs(encoder_spec.name, decoder_spec.name)]


def logit_pairs() -> list[tuple[str, str]]:
    """Every encoder case and every decoder of `PAIRS` in one pair at least (`pair_cover.cover`), in `PAIRS`' order."""
    encoders = list(dict.fromkeys(e for e, _ in PAIRS))
    decoders = list(dict.fromkeys(d for _, d in PAIRS))
    return sorted(cover(encoders, decoders, lambda e, d: (e, d) in PAIRS), key=PAIRS.index)


LOGIT_PAIRS = logit_pairs()


def test_the_logit_pairs_cover_every_encoder_case_and_every_decoder(fixture_dir):
    assert {e for e, _ in LOGIT_PAIRS} == {e for e, _ in PAIRS}
    assert {d for _, d in LOGIT_PAIRS} == {d for _, d in PAIRS}
    assert set(LOGIT_PAIRS) <= set(PAIRS) and len(set(LOGIT_PAIRS)) == len(LOGIT_PAIRS)

    def width(case: str) -> int:  # the adapter's output width where there is one, else the model's
        config = json.loads((fixture_dir(case) / "config.json").read_text())
        return config["output_hidden_size"] if config.get("add_adapter") else config.get("hidden_size",
                                                                                         config.get("n_embd"))

    joins = {(e, d): width(e) == width(d) for e, d in LOGIT_PAIRS}
    assert set(joins.values()) == {True, False}, f"the cover needs pairs with and without the projection: {joins}"


def test_every_registered_architecture_takes_part_in_pairs():
    encoders = {spec_for_case(e) for e, _ in PAIRS}
    decoders = {spec_for_case(d) for _, d in PAIRS}
    heavy = {s.name for s in specs("decoder") if any(in_heavy_pairs(e.name, s.name) for e in specs("encoder"))}
    assert encoders == {s.name for s in specs("encoder")} and decoders == heavy
    expected = {(e, d) for es in specs("encoder") for e in pair_cases(es) for ds in specs("decoder")
                for d in pair_cases(ds) if in_heavy_pairs(es.name, ds.name)}
    assert set(PAIRS) == expected and len(PAIRS) == len(expected)


def spec_for_case(case: str) -> str:
    return next(s.name for s in specs() if case in importlib.import_module(s.fixtures).CASES)


@pytest.mark.parametrize(("encoder", "decoder"), PAIRS, ids=[f"{e}+{d}" for e, d in PAIRS])
def test_composed_pair_matches_reference_and_copies_every_weight_bit_exactly(encoder, decoder, composed_dir,
                                                                          fixture_dir):
    directory = composed_dir(encoder, decoder)
    torch_model, _ = torch_from_pretrained(directory)
    config = torch_model.config
    flax_file = Checkpoint(directory, prefer=("flax_model.msgpack",))
    torch_file = Checkpoint(directory)
    assert flax_file.format == "flax" and torch_file.format == "safetensors"

    # Every source tensor, under its canonical name, is in both output files unchanged.
    to_torch = composed_keymap(config)
    flax_by_key = {to_torch.to_torch(path)[0]: path for path in sorted(flax_file.keys())}
    copied = 0
    for role, case in (("encoder", encoder), ("decoder", decoder)):
        source = Checkpoint(fixture_dir(case))
        spec = spec_for(source.config, role=role)
        part = spec.adapt_config(spec.config(source.config), source)
        canonical, _ = spec.source_rules(part).canonicalize(source.keys())
        tied = spec.tied_keys(part)
        for name, key in canonical.items():
            if name in tied:
                continue
            expected = source.get(key)
            composed = f"{role}.{name}"
            stored = torch_file.get(composed)
            assert stored.dtype == expected.dtype and stored.tobytes() == expected.tobytes(), composed
            path = flax_by_key[composed]
            back = to_torch.to_torch(path)[1].to_torch(flax_file.get(path))
            assert back.dtype == expected.dtype and back.tobytes() == expected.tobytes(), path
            copied += 1
    assert copied > 0
    if (encoder, decoder) not in LOGIT_PAIRS:
        return

    # Flax's float32 logits, and the reference's, within TOLERANCE of the reference run in float64 on a padded batch
    # (what the CLI's verification judges; two float32 runs differ by both their roundings, which move with the CPU:
    # up to 9.1e-6 between Flax and the reference on an AMD EPYC). The composed module is compiled (with the suite's
    # compile settings, conftest.py, one jit per pair costs less than running the pairs op by op).
    batch = seeded_inputs(config, seed=1, seconds=0.1)
    params = {}
    for path in sorted(flax_file.keys()):
        node = params
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = flax_file.get(path)
    logits = jax.jit(SpeechEncoderDecoderModule(config).apply)(
        {"params": params}, batch["inputs"], batch["attention_mask"], batch["decoder_input_ids"])
    args = [batch[k] for k in ("inputs", "attention_mask", "decoder_input_ids")]
    with torch.no_grad():
        reference = torch_model(*(torch.from_numpy(a) for a in args)).logits.numpy()
        expected = torch_model.double()(*torch_inputs(*args)).logits.numpy()
    got = np.asarray(logits)
    assert got.shape == expected.shape == (2, batch["decoder_input_ids"].shape[1], config.decoder.vocab_size)
    for who, value in (("Flax", got), ("reference", reference)):
        err = float(np.max(np.abs(value - expected)))
        assert err <= TOLERANCE, f"{encoder}+{decoder}: {who} float32 vs reference float64: max|diff|={err:.2e}"
    assert float(np.max(np.abs(expected[0] - expected[1]))) > 1e-3, "the two utterances gave the same logits"
