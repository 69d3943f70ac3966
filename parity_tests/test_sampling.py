"""Sampling (`do_sample=True`): seeded by an explicit JAX PRNG key / torch generator, and drawing from the softmax
of the processed scores (a chi-square goodness-of-fit test at significance 0.001 on thousands of draws of one
step), for greedy-style sampling and beam sampling, in Flax and in the reference.

Draws cannot match between the two frameworks (different generators): each is tested against the distribution.
Every test uses fixed seeds, so its outcome is the same on every run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.stats
import torch

from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

SIGNIFICANCE = 1e-3
DRAWS = 4000
# The sampling settings under test. The model's forced BOS / EOS (BART's config) are turned off, so that the first
# step (also the last, with max_new_tokens=1) has a distribution to draw from.
WARPED = {"do_sample": True, "temperature": 1.5, "top_k": 30, "top_p": 0.95, "forced_bos_token_id": None,
          "forced_eos_token_id": None}


@pytest.fixture(scope="module")
def models(composed_dir: Callable[..., Path]) -> tuple[FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModel]:
    directory = composed_dir("w2v_stable_adapter", "bart_untied")
    return FlaxSpeechEncoderDecoderModel.from_pretrained(directory), torch_from_pretrained(directory)[0]


def utterances(count: int, samples: int = 4000) -> np.ndarray:
    """Noise, then a square wave (the fixture decodes them differently)."""
    noise = np.random.default_rng(5).standard_normal(samples)
    square = np.sign(np.sin(2 * np.pi * 90 * np.arange(samples) / 16000))
    return np.stack([noise, square][:count]).astype(np.float32)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of `counts` to `probs`: categories expected at least 5 times, the rest pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_sampled_tokens_follow_the_processed_softmax(models):
    """DRAWS samples of the first token of one utterance (num_return_sequences rows) against the softmax of the
    step's processed scores (temperature, top-k and top-p applied): tokens outside the kept set never appear,
    and the others fit the distribution."""
    flax_model, reference = models
    inputs = utterances(1)
    options = {**WARPED, "max_new_tokens": 1, "num_return_sequences": DRAWS, "output_scores": True}
    flax_out = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(0), **options)
    torch_out = reference.generate(torch.from_numpy(inputs), generator=torch.Generator().manual_seed(0), **options)
    for who, out in (("Flax", flax_out), ("reference", torch_out)):
        scores = np.asarray(out.scores)  # [DRAWS, 1, V], the same row for every draw
        assert np.array_equal(scores[0, 0], scores[-1, 0]), who
        probs = softmax(scores[0, 0])
        assert (probs > 0.01).sum() >= 8, f"{who}: too peaked a distribution to test ({np.sort(probs)[-8:]})"
        kept = np.isfinite(scores[0, 0])
        assert 0 < kept.sum() < 30, f"{who}: top-k / top-p removed nothing ({kept.sum()} kept)"
        counts = np.bincount(np.asarray(out.sequences)[:, 1], minlength=probs.size)
        assert counts[~kept].sum() == 0, f"{who}: drew removed tokens {np.flatnonzero(counts * ~kept)}"
        p = chi_square_p_value(counts, probs)
        assert p >= SIGNIFICANCE, f"{who}: chi-square p={p:.2e} < {SIGNIFICANCE}: draws do not follow the softmax"
    # The two frameworks process the step alike.
    err = float(np.max(np.abs(np.nan_to_num(flax_out.scores[0, 0] - torch_out.scores.numpy()[0, 0], nan=0.0))))
    assert err <= 1e-4, f"processed scores max|diff|={err:.2e}"


def test_a_wrong_distribution_fails_the_chi_square_test(models):
    """The test above can fail: the same draws against the unwarped softmax (temperature 1) are rejected."""
    flax_model, _ = models
    inputs = utterances(1)
    options = {**WARPED, "max_new_tokens": 1, "num_return_sequences": DRAWS, "output_scores": True}
    out = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(0), **options)
    probs = softmax(out.scores[0, 0] * 1.5)  # undo the temperature
    counts = np.bincount(out.sequences[:, 1], minlength=probs.size)
    assert chi_square_p_value(counts, probs) < SIGNIFICANCE


def test_the_same_seed_gives_the_same_tokens(models):
    flax_model, reference = models
    inputs = utterances(2)
    options = {**WARPED, "max_new_tokens": 12, "eos_token_id": [16, 2], "num_return_sequences": 2}
    first = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(7), **options).sequences
    again = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(7), **options).sequences
    other = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(8), **options).sequences
    np.testing.assert_array_equal(first, again)
    assert first.shape[0] == 4 and first.tolist() != other.tolist()
    assert len({tuple(row) for row in first.tolist()}) > 1, first  # the returned sequences differ
    t_inputs = torch.from_numpy(inputs)
    runs = [reference.generate(t_inputs, generator=torch.Generator().manual_seed(seed), **options).sequences
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_sampling_without_a_prng_key_is_refused(models):
    flax_model, _ = models
    with pytest.raises(ValueError, match="do_sample=True needs an explicit prng_key"):
        flax_model.generate(utterances(1), do_sample=True)


def test_sampling_near_zero_temperature_is_greedy_search(models):
    """At temperature 1e-4 the softmax is one-hot on the argmax: sampling returns greedy search's tokens (the
    same static settings as the test above: only the traced temperature changes, no new compilation)."""
    flax_model, reference = models
    inputs = utterances(2)
    options = {"max_new_tokens": 12, "eos_token_id": [16, 2], "forced_bos_token_id": None,
               "forced_eos_token_id": None}
    greedy = reference.generate(torch.from_numpy(inputs), **options).sequences.numpy()
    greedy = np.repeat(greedy, 2, axis=0)  # num_return_sequences=2 below
    cold = {**WARPED, **options, "temperature": 1e-4, "num_return_sequences": 2}
    sampled = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(3), **cold).sequences
    np.testing.assert_array_equal(sampled, greedy)
    sampled = reference.generate(torch.from_numpy(inputs), generator=torch.Generator().manual_seed(3), **cold)
    np.testing.assert_array_equal(sampled.sequences.numpy(), greedy)
    assert len({tuple(row) for row in greedy.tolist()}) == 2 and max(len(set(r)) for r in greedy.tolist()) >= 4


def best_of_beam_sample(probs: np.ndarray, draws: int) -> np.ndarray:
    """The exact distribution of the returned token when one step of beam sampling draws `draws` candidates without
    replacement from `probs` and returns the most probable of them (enumerating every ordered draw)."""
    support = np.flatnonzero(probs)
    out = np.zeros_like(probs)
    for order in itertools.permutations(support, draws):
        p, left = 1.0, 1.0
        for token in order:
            p *= probs[token] / left
            left -= probs[token]
        out[max(order, key=lambda t: probs[t])] += p
    return out


def test_beam_sampling_draws_candidates_without_replacement_from_the_softmax(models):
    """One step of beam sampling with 2 beams: 4 candidates (2 x (1 + one eos id)) drawn without replacement from
    the processed softmax, the best returned. Over many identical utterances the returned token must follow the
    exactly enumerated distribution of "the most probable of 4 draws without replacement"."""
    flax_model, reference = models
    rows = 1000
    inputs = np.repeat(utterances(1, samples=1600), rows, axis=0)
    options = {**WARPED, "top_k": 6, "top_p": 1.0, "temperature": 2.0, "num_beams": 2, "max_new_tokens": 1,
               "output_scores": True}
    flax_out = flax_model.generate(inputs, prng_key=jax.random.PRNGKey(1), **options)
    torch_out = reference.generate(torch.from_numpy(inputs), generator=torch.Generator().manual_seed(1), **options)
    for who, out in (("Flax", flax_out), ("reference", torch_out)):
        probs = softmax(np.asarray(out.scores)[0, 0])  # the live beam's processed log-probs (top 6 kept)
        assert (probs > 0).sum() == 6 and probs.max() < 0.6, f"{who}: {np.sort(probs)[-6:]}"
        want = best_of_beam_sample(probs, 4)
        counts = np.bincount(np.asarray(out.sequences)[:, 1], minlength=probs.size)
        assert counts[want == 0].sum() == 0, who
        p = chi_square_p_value(counts, want)
        assert p >= SIGNIFICANCE, f"{who}: chi-square p={p:.2e} < {SIGNIFICANCE}"
        # Plain beam search would always return the most probable token: sampling must not.
        assert counts[np.argmax(probs)] < rows, who
