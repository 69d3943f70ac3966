"""Greedy and beam-search generation for the composed Flax model: one jitted function, one `lax.while_loop`.

Semantics are Hugging Face's `generate` (transformers >= 4.50, whose vectorised `_beam_search` replaced
`BeamSearchScorer`), and `torch_reference.generation` computes the same thing plainly in eager PyTorch:

* The encoder runs once; `init_cache` projects the cross-attention keys/values once (the prefill); every step
  feeds the last token through the decoder with the cache (positions `0, 1, ...`; the start token sits at 0).
  The cache holds `max_new_tokens + 1` positions.
* Greedy: the next token is the argmax of the step's logits (the argmax of the log-softmax too; ties go to
  the lowest id). A row that has produced `eos_token_id` is finished; later steps append `pad_token_id` to
  it. The loop stops when every row has finished or after `max_new_tokens` tokens. Greedy has no score.
* `min_new_tokens`: while fewer than `min_new_tokens` tokens have been generated, eos scores -inf.
* Beam search, per utterance: `num_beams` (K) running beams start from the start token (only the first one
  live: the others score -1e9, as HF does, so that step 1 does not pick K copies of one token). Each step
  scores every continuation as running score + log-softmax, ranks the top 2K over all K x V, and:
  - a candidate among the top K of those 2K that ends in eos (or reaches `max_new_tokens`) becomes a
    finished hypothesis scored `sum_logprobs / n ** length_penalty`, n = the number of generated tokens
    including the eos (the start token is not counted); the K best finished hypotheses are kept;
  - the K best candidates that did not finish become the running beams (the cache rows are gathered to
    follow them with `reorder_cache`).
  - The utterance is done when no running beam can beat the finished ones (`early_stopping`):
    `True`: as soon as K hypotheses are finished; `False` (HF's default heuristic): when K are finished and
    the best running score divided by (tokens generated so far) ** length_penalty is no better than the
    worst finished score; `"never"`: the same, but dividing by `max_new_tokens ** length_penalty` when
    `length_penalty > 0` (the canonical bound). A done utterance takes no new hypotheses.
  - The loop stops when every utterance is done or after `max_new_tokens` steps. The result is each
    utterance's best finished hypothesis and its score.
* Output: `sequences` [B, 1 + n], the start token then the generated tokens (eos included), rows shorter
  than the longest padded with `pad_token_id`; n is the longest row's generated length.

Compilation: one `jax.jit` function per static configuration (beam width, `max_new_tokens`, `early_stopping`,
token ids), cached on the model; `length_penalty` and `min_new_tokens` are traced arguments, so changing them
does not compile again, and neither does a second call with the same input shapes. `TRACES` counts traces.

Not implemented (HF generation-config options): sampling, repetition / n-gram penalties, forced BOS/EOS tokens,
several eos ids, `num_return_sequences`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from convert.generation_settings import GenerationSettings, resolve_settings
from flax_model.cache import DecoderCache, reorder_cache

# How many times each search has been traced (a Python side effect that runs only while tracing).
TRACES: collections.Counter[str] = collections.Counter()

# The score of the beams that are not live at the first step (HF's value).
DEAD_BEAM_SCORE = -1e9

DecodeFn = Callable[[jax.Array, DecoderCache], tuple[jax.Array, DecoderCache]]


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        sequences: [B, 1 + n] int32, starting with `decoder_start_token_id`.
        scores: [B] float32 length-normalised log-probabilities of the returned beams (beam search); None
            for greedy search.
    """

    sequences: np.ndarray
    scores: np.ndarray | None


def generate(
    model: Any,
    inputs: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    min_new_tokens: int = 0,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    params: dict | None = None,
) -> GenerateOutput:
    """Transcribes a batch of waveforms with greedy search (`num_beams=1`) or beam search.

    Args:
        model: a `FlaxSpeechEncoderDecoderModel`.
        inputs: [B, N] float waveforms (normalised as the feature extractor would).
        attention_mask: [B, N], 1 for real samples (right padding); None means all real.
        max_new_tokens: the most tokens generated after the start token.
        num_beams: 1 for greedy search, else the beam width.
        length_penalty: beam search divides a hypothesis' log-probability by length ** length_penalty.
        early_stopping: True, False or "never" (see the module docstring).
        min_new_tokens: eos is forbidden until this many tokens have been generated.
        decoder_start_token_id, eos_token_id, pad_token_id: override the config's ids.
        params: run with these params instead of `model.params`.

    Returns:
        `GenerateOutput(sequences [B, 1 + n] int32, scores [B] float32 | None)`, as numpy arrays.
    """
    settings = resolve_settings(model.config, max_new_tokens, num_beams, length_penalty, early_stopping,
                                min_new_tokens, decoder_start_token_id, eos_token_id, pad_token_id)
    key = ("generate", settings.static)
    if key not in model._compiled:
        model._compiled[key] = jax.jit(search_function(model.module, settings))
    run = model._compiled[key]
    inputs = jnp.asarray(inputs, jnp.float32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    sequences, scores, lengths = run(model.params if params is None else params, inputs, mask,
                                     jnp.float32(settings.length_penalty), jnp.int32(settings.min_new_tokens))
    width = 1 + int(jnp.max(lengths))
    return GenerateOutput(np.asarray(sequences)[:, :width], None if scores is None else np.asarray(scores))


def search_function(module: Any, settings: GenerationSettings) -> Callable:
    """The function to jit: (params, inputs, attention_mask, length_penalty, min_new_tokens) ->
    (sequences [B, 1 + max_new_tokens], scores [B] | None, generated lengths [B])."""
    kind = "greedy" if settings.num_beams == 1 else "beam_search"

    def run(params, inputs, attention_mask, length_penalty, min_new_tokens):
        TRACES[kind] += 1
        variables = {"params": params}
        hidden, encoder_mask = module.apply(variables, inputs, attention_mask,
                                            method="encode")  # [B, S, D], [B, S]
        cache = module.apply(variables, inputs.shape[0], settings.max_new_tokens + 1, hidden, encoder_mask,
                             method="init_cache")

        def decode(tokens: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
            logits, cache = module.apply(variables, tokens, None, None, cache=cache,
                                         method="decode")
            return logits[:, -1].astype(jnp.float32), cache  # [B, V]

        if settings.num_beams == 1:
            return greedy_search(decode, cache, settings, min_new_tokens)
        return beam_search(decode, cache, settings, length_penalty, min_new_tokens)

    return run


def forbid_eos(scores: jax.Array, settings: GenerationSettings, generated: jax.Array,
               min_new_tokens: jax.Array) -> jax.Array:
    """scores [B, V]: eos gets -inf while fewer than `min_new_tokens` tokens have been generated."""
    if settings.eos_token_id is None:
        return scores
    eos = settings.eos_token_id
    return scores.at[:, eos].set(jnp.where(generated < min_new_tokens, -jnp.inf, scores[:, eos]))


def greedy_search(decode: DecodeFn, cache: DecoderCache, settings: GenerationSettings,
                  min_new_tokens: jax.Array) -> tuple[jax.Array, None, jax.Array]:
    batch = cache.encoder_mask.shape[0]
    eos, pad = settings.eos_token_id, settings.pad_token_id
    fill = 0 if pad is None else pad
    sequences = jnp.full((batch, settings.max_new_tokens + 1), fill, jnp.int32)
    sequences = sequences.at[:, 0].set(settings.decoder_start_token_id)  # [B, 1 + max_new_tokens]

    def not_done(state):
        _, _, finished, step = state
        return (step < settings.max_new_tokens) & ~jnp.all(finished)

    def step_fn(state):
        sequences, cache, finished, step = state
        tokens = jax.lax.dynamic_slice_in_dim(sequences, step, 1, axis=1)  # [B, 1]
        logits, cache = decode(tokens, cache)
        # HF takes the argmax of the logits: the same token as the log-softmax's, without computing it.
        next_tokens = jnp.argmax(forbid_eos(logits, settings, step, min_new_tokens), axis=-1).astype(jnp.int32)
        if eos is not None:
            next_tokens = jnp.where(finished, pad, next_tokens)
            finished = finished | (next_tokens == eos)
        sequences = jax.lax.dynamic_update_slice(sequences, next_tokens[:, None], (0, step + 1))
        return sequences, cache, finished, step + 1

    state = (sequences, cache, jnp.zeros((batch,), bool), jnp.zeros((), jnp.int32))
    sequences, _, _, steps = jax.lax.while_loop(not_done, step_fn, state)
    return sequences, None, jnp.full((batch,), steps)


@flax.struct.dataclass
class BeamState:
    """The beam-search loop carry: B utterances x K beams, sequences of 1 + max_new_tokens slots."""

    cache: DecoderCache  # batch B * K, row b * K + k is beam k of utterance b
    running: jax.Array  # [B, K, L] int32 running beams (start token, generated tokens, pad)
    running_scores: jax.Array  # [B, K] float32 sum of log-probs, best first
    finished: jax.Array  # [B, K, L] int32 finished hypotheses, best first
    finished_scores: jax.Array  # [B, K] float32 length-normalised; -inf in unused slots
    finished_lengths: jax.Array  # [B, K] int32 generated tokens of each hypothesis
    done: jax.Array  # [B] bool: the utterance takes no more hypotheses
    step: jax.Array  # [] int32 tokens generated so far


def beam_search(decode: DecodeFn, cache: DecoderCache, settings: GenerationSettings, length_penalty: jax.Array,
                min_new_tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    k, max_new = settings.num_beams, settings.max_new_tokens
    batch = cache.encoder_mask.shape[0]
    fill = 0 if settings.pad_token_id is None else settings.pad_token_id
    cache = reorder_cache(cache, jnp.repeat(jnp.arange(batch), k))  # one copy of each utterance per beam
    sequences = jnp.full((batch, k, max_new + 1), fill, jnp.int32).at[:, :, 0].set(settings.decoder_start_token_id)
    first_live = jnp.where(jnp.arange(k) == 0, 0.0, DEAD_BEAM_SCORE).astype(jnp.float32)
    state = BeamState(
        cache=cache,
        running=sequences,
        running_scores=jnp.broadcast_to(first_live, (batch, k)),
        finished=sequences,
        finished_scores=jnp.full((batch, k), -jnp.inf, jnp.float32),
        finished_lengths=jnp.zeros((batch, k), jnp.int32),
        done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
    )

    def not_done(s: BeamState) -> jax.Array:
        return (s.step < max_new) & ~jnp.all(s.done)

    def step_fn(s: BeamState) -> BeamState:
        generated = s.step + 1  # tokens in every candidate after this step
        tokens = jax.lax.dynamic_slice_in_dim(s.running, s.step, 1, axis=2).reshape(batch * k, 1)
        logits, cache = decode(tokens, s.cache)
        log_probs = forbid_eos(jax.nn.log_softmax(logits, axis=-1), settings, s.step, min_new_tokens)  # [B*K, V]
        vocab = log_probs.shape[-1]
        candidates = (log_probs.reshape(batch, k, vocab) + s.running_scores[:, :, None]).reshape(batch, k * vocab)
        top_scores, top_ids = jax.lax.top_k(candidates, 2 * k)  # [B, 2K], best first
        source_beam, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
        extended = jnp.take_along_axis(s.running, source_beam[:, :, None], axis=1)  # [B, 2K, L]
        extended = jax.lax.dynamic_update_slice(extended, token[:, :, None], (0, 0, generated))
        ends = generated >= max_new
        if settings.eos_token_id is not None:
            ends = ends | (token == settings.eos_token_id)  # [B, 2K]

        # The K best candidates that go on (a stable sort keeps the rank order among them).
        go_on = jnp.argsort(ends, axis=1, stable=True)[:, :k]  # [B, K]
        running = jnp.take_along_axis(extended, go_on[:, :, None], axis=1)
        running_scores = jnp.take_along_axis(top_scores, go_on, axis=1)
        rows = jnp.arange(batch)[:, None] * k + jnp.take_along_axis(source_beam, go_on, axis=1)  # [B, K]

        # Candidates among the top K that end join the finished hypotheses; the K best of all are kept.
        finishing = ends & (jnp.arange(2 * k) < k)[None, :] & ~s.done[:, None]
        final_scores = top_scores / generated.astype(jnp.float32) ** length_penalty
        merged_scores = jnp.concatenate([s.finished_scores, jnp.where(finishing, final_scores, -jnp.inf)], axis=1)
        _, keep = jax.lax.top_k(merged_scores, k)  # ties keep the older hypothesis (lower index)
        merged = jnp.concatenate([s.finished, extended], axis=1)
        lengths = jnp.concatenate([s.finished_lengths, jnp.full((batch, 2 * k), generated, jnp.int32)], axis=1)
        finished_scores = jnp.take_along_axis(merged_scores, keep, axis=1)
        full = jnp.all(finished_scores > -jnp.inf, axis=1)  # [B] K hypotheses finished

        if settings.early_stopping is True:
            done = s.done | full
        else:
            bound_length = generated.astype(jnp.float32)
            if settings.early_stopping == "never":
                bound_length = jnp.where(length_penalty > 0, jnp.float32(max_new), bound_length)
            best_possible = running_scores[:, 0] / bound_length ** length_penalty
            done = s.done | (full & (jnp.min(finished_scores, axis=1) >= best_possible))
        return BeamState(
            cache=reorder_cache(cache, rows.reshape(-1), cross=False),  # beams stay within their utterance
            running=running,
            running_scores=running_scores,
            finished=jnp.take_along_axis(merged, keep[:, :, None], axis=1),
            finished_scores=finished_scores,
            finished_lengths=jnp.take_along_axis(lengths, keep, axis=1),
            done=done,
            step=generated,
        )

    s = jax.lax.while_loop(not_done, step_fn, state)
    return s.finished[:, 0], s.finished_scores[:, 0], s.finished_lengths[:, 0]
