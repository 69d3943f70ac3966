"""The logits processors one by one, and in transformers 5's order: Flax (`flax_model.generation.process_scores`)
and the reference (`torch_reference.generation.process_scores`) against expectations computed here by hand.

The Flax processors read a [rows, 1 + max_new_tokens] buffer of which only the first `1 + step` columns hold the
sequence so far; the rest holds tokens that would change every result if a processor read them.
"""

from __future__ import annotations

import types
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.base.generation_settings import GenerationConfig, GenerationSettings, resolve_settings
from flax_model.generation import process_scores as flax_process
from torch_reference.generation import process_scores as torch_process

VOCAB = 12
MAX_NEW = 6
START, PAD, EOS = 0, 1, 2
# What the buffer holds past the sequence: tokens every processor below would react to.
UNREAD = 5
NEG_INF = -np.inf

MODEL = types.SimpleNamespace(decoder=types.SimpleNamespace(vocab_size=VOCAB, max_positions=64))
MODEL_GENERATION = GenerationConfig(decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS)


def settings(**options: Any) -> GenerationSettings:
    return resolve_settings(MODEL, MODEL_GENERATION, max_new_tokens=MAX_NEW, **options)


def scores_of(rows: int, seed: int = 0) -> np.ndarray:
    """Distinct logits of both signs (no ties unless a test makes them)."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(rows * VOCAB).reshape(rows, VOCAB) / 7.0 - rows * VOCAB / 14.0).astype(np.float32)


def both(s: GenerationSettings, sequences: list[list[int]], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The processed scores from Flax and from the reference, as numpy."""
    cur_len = len(sequences[0])
    buffer = np.full((len(sequences), MAX_NEW + 1), UNREAD, np.int32)
    buffer[:, :cur_len] = sequences
    traced = {k: jnp.asarray(v, jnp.int32 if k == "min_new_tokens" else jnp.float32) for k, v in s.traced.items()}
    flax = np.asarray(flax_process(jnp.asarray(scores), jnp.asarray(buffer), jnp.int32(cur_len - 1), s, traced))
    ref = torch_process(sequences, torch.from_numpy(scores.copy()), s).numpy()
    return flax, ref


def assert_both_equal(s: GenerationSettings, sequences: list[list[int]], scores: np.ndarray,
                      expected: np.ndarray) -> None:
    for who, got in zip(("Flax", "reference"), both(s, sequences, scores)):
        assert np.array_equal(np.isneginf(got), np.isneginf(expected)), (
            f"{who}: removed {np.argwhere(np.isneginf(got)).tolist()}, expected "
            f"{np.argwhere(np.isneginf(expected)).tolist()}")
        finite = ~np.isneginf(expected)
        err = float(np.max(np.abs(got[finite] - expected[finite]))) if finite.any() else 0.0
        assert err <= 1e-6, f"{who}: max|diff|={err:.2e}"


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens():
    scores = scores_of(2)
    sequences = [[START, 3, 4, 3], [START, 9, 10, 11]]
    expected = scores.copy()
    for row, tokens in enumerate(sequences):
        for token in set(tokens):  # the start token counts, as in transformers (it is in input_ids)
            value = scores[row, token]
            expected[row, token] = value * 2.0 if value < 0 else value / 2.0
    assert_both_equal(settings(repetition_penalty=2.0), sequences, scores, expected)


@pytest.mark.parametrize(("n", "sequences", "banned"), [
    (2, [[START, 5, 6, 5], [START, 7, 8, 9]], [[6], []]),  # bigram (5, 6) seen: after 5, 6 is banned
    (3, [[START, 5, 6, 7, 5, 6], [START, 5, 6, 8, 5, 6]], [[7], [8]]),
    (3, [[START, 6, 6, 6], [START, 4, 6, 6]], [[6], []]),  # overlapping windows
    (1, [[START, 3, 4], [START, 9, 9]], [[START, 3, 4], [START, 9]]),  # n=1: every token seen so far
])
def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram(n, sequences, banned):
    scores = scores_of(2, seed=n)
    expected = scores.copy()
    for row, tokens in enumerate(banned):
        expected[row, tokens] = NEG_INF
    assert_both_equal(settings(no_repeat_ngram_size=n), sequences, scores, expected)


def test_no_repeat_ngram_bans_nothing_before_an_ngram_fits():
    scores = scores_of(2, seed=3)
    assert_both_equal(settings(no_repeat_ngram_size=3), [[START, 6], [START, 7]], scores, scores.copy())


def test_bad_words_ban_single_tokens_and_sequence_endings_but_never_a_lone_eos():
    scores = scores_of(3, seed=4)
    sequences = [[START, 3, 5], [START, 6, 6], [START, 5, 6]]
    s = settings(bad_words_ids=[[4], [5, 9], [6, 6, 10], [EOS], [4]])
    assert s.bad_words_ids == ((4,), (5, 9), (6, 6, 10))  # [eos] dropped, the duplicate too (transformers' dict)
    expected = scores.copy()
    expected[:, 4] = NEG_INF
    expected[0, 9] = NEG_INF  # row 0 ends with 5
    expected[1, 10] = NEG_INF  # row 1 ends with 6, 6
    assert_both_equal(s, sequences, scores, expected)


@pytest.mark.parametrize(("options", "step_blocked"), [
    ({"min_new_tokens": 3}, [True, True, True, False]),
    ({"min_length": 3}, [True, True, False, False]),  # min_length counts the start token
    ({"min_length": 5, "min_new_tokens": 1}, [True, False, False, False]),  # min_new_tokens wins (transformers)
])
def test_min_length_forbids_every_eos_until_enough_tokens(options, step_blocked):
    s = settings(eos_token_id=[EOS, 7], **options)
    for step, blocked in enumerate(step_blocked):
        scores = scores_of(1, seed=step)
        expected = scores.copy()
        if blocked:
            expected[:, [EOS, 7]] = NEG_INF
        assert_both_equal(s, [[START] + [3] * step], scores, expected)


def test_forced_bos_only_at_the_first_step_and_forced_eos_only_at_the_last():
    s = settings(forced_bos_token_id=7, forced_eos_token_id=[EOS, 9])
    for step in range(MAX_NEW):
        scores = scores_of(2, seed=step)
        expected = scores.copy()
        if step == 0:
            expected[:] = NEG_INF
            expected[:, 7] = 0.0
        if step == MAX_NEW - 1:
            expected[:] = NEG_INF
            expected[:, [EOS, 9]] = 0.0
        assert_both_equal(s, [[START] + [3] * step] * 2, scores, expected)


@pytest.mark.parametrize("forced_bos", [None, 7])
def test_suppress_tokens_always_and_begin_suppress_tokens_at_the_first_free_step(forced_bos):
    s = settings(suppress_tokens=[3, 8], begin_suppress_tokens=[4], forced_bos_token_id=forced_bos)
    begin = 0 if forced_bos is None else 1  # after a forced BOS, the next step is the first free one
    for step in range(3):
        scores = scores_of(1, seed=10 + step)
        expected = scores.copy()
        if step == 0 and forced_bos is not None:
            expected[:] = NEG_INF
            expected[:, forced_bos] = 0.0
        expected[:, [3, 8]] = NEG_INF
        if step == begin:
            expected[:, 4] = NEG_INF
        assert_both_equal(s, [[START] + [6] * step], scores, expected)


def test_sampling_warpers_apply_only_when_sampling():
    scores = scores_of(2, seed=5)
    assert_both_equal(settings(temperature=0.5, top_k=2, top_p=0.5), [[START], [START]], scores, scores.copy())


def test_temperature_divides_the_scores():
    scores = scores_of(2, seed=6)
    assert_both_equal(settings(do_sample=True, temperature=0.5, top_k=0), [[START]] * 2, scores, scores / 0.5)


def test_top_k_keeps_the_k_best_and_their_ties():
    scores = np.array([[5.0, 4.0, 4.0, 1.0, 0.0, -1.0, -2.0, 3.0, 2.0, 1.5, 0.5, -3.0]], np.float32)
    expected = np.where(scores >= 4.0, scores, NEG_INF)
    assert_both_equal(settings(do_sample=True, top_k=2), [[START]], scores, expected)
    # transformers' default top_k is 50 when sampling: with 12 tokens it keeps them all.
    assert settings(do_sample=True).top_k == 50
    assert_both_equal(settings(do_sample=True), [[START]], scores, scores.copy())


def test_top_p_keeps_the_smallest_set_reaching_p_and_min_tokens_to_keep():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    scores = np.full((1, VOCAB), NEG_INF, np.float32)
    scores[0, [6, 2, 9, 4]] = np.log(probs)
    expected = np.full_like(scores, NEG_INF)
    expected[0, [6, 2]] = scores[0, [6, 2]]
    assert_both_equal(settings(do_sample=True, top_k=0, top_p=0.75), [[START]], scores, expected)
    # Beam sampling keeps at least one more token than there are eos ids (here 2).
    s = settings(do_sample=True, top_k=0, top_p=0.3, num_beams=2)
    assert s.min_tokens_to_keep == 2
    assert_both_equal(s, [[START]], scores, expected)


def test_processors_run_in_transformers_order():
    # top_k before top_p: top-p sees the distribution top-k left (renormalised). [0.4, 0.35, 0.25] -> top_k=2
    # -> [0.53, 0.47] -> top_p=0.5 keeps one token; top-p first would keep two.
    scores = np.full((1, VOCAB), NEG_INF, np.float32)
    scores[0, [3, 5, 7]] = np.log([0.4, 0.35, 0.25])
    expected = np.full_like(scores, NEG_INF)
    expected[0, 3] = scores[0, 3]
    assert_both_equal(settings(do_sample=True, top_k=2, top_p=0.5), [[START]], scores, expected)
    # min length before forced eos: at the last step the forced eos wins over min_new_tokens.
    s = settings(min_new_tokens=MAX_NEW, forced_eos_token_id=EOS)
    expected = np.full((1, VOCAB), NEG_INF, np.float32)
    expected[0, EOS] = 0.0
    assert_both_equal(s, [[START] + [3] * (MAX_NEW - 1)], scores_of(1), expected)
    # repetition penalty before temperature and top-k: the penalised token drops out of the top 2.
    scores = np.zeros((1, VOCAB), np.float32)
    scores[0, [3, 4, 5]] = [3.0, 2.0, 1.9]
    expected = np.full_like(scores, NEG_INF)
    expected[0, [4, 5]] = np.array([2.0, 1.9]) / 0.5
    assert_both_equal(settings(do_sample=True, repetition_penalty=2.0, temperature=0.5, top_k=2), [[START, 3]],
                      scores, expected)


def test_every_processor_together_on_a_batch():
    """All processors at once on three rows, against the same expectations composed in transformers' order."""
    s = settings(repetition_penalty=1.5, no_repeat_ngram_size=2, bad_words_ids=[[4], [6, 9]], suppress_tokens=[10],
                 begin_suppress_tokens=[11], min_new_tokens=4, eos_token_id=[EOS, 8], do_sample=True,
                 temperature=0.7, top_k=6, top_p=0.9)
    sequences = [[START, 3, 6, 3], [START, 6, 7, 6], [START, 9, 3, 7]]
    scores = scores_of(3, seed=7)
    expected = scores.astype(np.float64)
    for row, tokens in enumerate(sequences):
        for token in set(tokens):
            value = expected[row, token]
            expected[row, token] = value * 1.5 if value < 0 else value / 1.5
    expected[0, 6] = expected[1, 7] = NEG_INF  # bigrams (3, 6) and (6, 7) seen
    expected[:, 4] = NEG_INF
    expected[1, 9] = NEG_INF  # row 1 ends with 6
    expected[:, [EOS, 8]] = NEG_INF  # 3 tokens generated < 4
    expected[:, 10] = NEG_INF
    expected = expected / 0.7
    for row in range(3):
        kth = np.sort(expected[row])[-6]
        expected[row][expected[row] < kth] = NEG_INF
        order = np.argsort(-expected[row], kind="stable")
        probs = np.exp(expected[row][order] - expected[row][order][0])
        probs /= probs.sum()
        mass_above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        expected[row, order[mass_above >= 0.9]] = NEG_INF
    assert_both_equal(s, sequences, scores, expected.astype(np.float32))
