"""Generation for the composed Flax model: greedy search, sampling, beam search and beam sampling with transformers
5's logits processors, each one jitted function around one `lax.while_loop`.

Semantics are those of `torch_reference.generation` (its module docstring states them in full), which computes
the same thing plainly in eager PyTorch; both follow transformers 5's `generate`:

* Settings come from `convert.base.generation_settings.resolve_settings`: the model's generation config
  (`generation_config.json`, else `config.json`), a GenerationConfig-like object, keyword arguments.
* The encoder runs once (the model's own jitted `encode`, compiled once per input shape whatever the settings);
  `init_cache` projects the cross-attention keys/values once (the prefill); every step feeds the last token
  through the decoder with the cache. A plain prompt (`decoder_input_ids`, the start token put first as transformers
  does) goes into the cache at once but its last token, which the first step feeds. The cache holds
  `P + max_new_tokens` positions (P: the prompt's tokens, 1 without one).
* Every processor runs inside the loop on fixed shapes: the sequences so far live in a [rows, P + max_new_tokens]
  buffer and a processor looks only at the first `P + step` columns (masks built with `arange < cur_len`).
  Order: repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens,
  forced_bos_token_id, forced_eos_token_id, suppress_tokens, begin_suppress_tokens, then (sampling)
  temperature, top_k, top_p.
* Sampling draws from the softmax of the processed scores with the caller's `prng_key`, folded with the step
  number (`jax.random.categorical`); beam sampling draws the candidates without replacement by the Gumbel-top-k
  trick, the same distribution as transformers' `torch.multinomial(..., replacement=False)`. The same key gives
  the same tokens; the draws differ from PyTorch's (another generator).
* Beam search keeps transformers' vectorised bookkeeping: K' = max(2, 1 + number of eos ids) * K candidates per
  step; running beams are the best candidates that did not end; finished hypotheses merge with the K best kept.

Deliberate differences from transformers 5 (also in the README's Generation section): the settings refuse what
transformers would silently ignore (`convert.base.generation_settings`); greedy search and sampling return a score (the
mean log-probability of the generated tokens); sampling draws from JAX's generator, not PyTorch's.

Compilation: the encoder once per input shape, and one `jax.jit` search (prefill and loop) per static setting
(`GenerationSettings.static`: the mode, lengths, token ids, which processors run, `output_scores`) and encoder
output shape, cached on the model; `length_penalty`, `min_new_tokens`, `repetition_penalty`, `temperature` and
`top_p` are traced arguments, so changing their values does not compile again, and neither does a second call
with the same input shapes. `TRACES` counts the searches' traces per mode.
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

from convert.base.generation_settings import (
    GenerationConfigError,
    GenerationSettings,
    model_generation_config,
    resolve_with_prompt,
)
from flax_model.cache import DecoderCache, reorder_cache, slice_start
from flax_model.ctc import JointScorer, PrefixState, decoding_log_probs

# How many times each search has been traced (a Python side effect that runs only while tracing).
TRACES: collections.Counter[str] = collections.Counter()

# The score of the beams that are not live at the first step, and transformers' penalty for scores that must not
# be picked (ended candidates among the running ones).
DEAD_BEAM_SCORE = -1e9

DecodeFn = Callable[[jax.Array, DecoderCache], tuple[jax.Array, DecoderCache]]


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns (numpy arrays).

    Attributes:
        sequences: [N, 1 + n] int32 (N = batch * num_return_sequences), starting with the decoder start token.
        sequences_scores: [N] float32: beam search: the length-normalised score of each returned hypothesis;
            greedy search and sampling: the mean log-probability of the generated tokens (eos included).
        scores: [rows, steps, V] float32 processed scores of each step with `output_scores` (beam search: one
            row per running beam, b * K + k); else None.
        beam_indices: [N, n] int32 running beam of each token (beam search with `output_scores`), -1 past the end.
    """

    sequences: np.ndarray
    sequences_scores: np.ndarray
    scores: np.ndarray | None = None
    beam_indices: np.ndarray | None = None


def generate(
    model: Any,
    inputs: Any,
    attention_mask: Any = None,
    generation_config: Any = None,
    *,
    prng_key: jax.Array | None = None,
    params: dict | None = None,
    ctc_weight: float | None = None,
    **kwargs: Any,
) -> GenerateOutput:
    """Transcribes a batch of waveforms.

    Args:
        model: a `FlaxSpeechEncoderDecoderModel`.
        inputs: [B, N] float waveforms (normalised as the feature extractor would).
        attention_mask: [B, N], 1 for real samples (right padding); None means all real.
        generation_config: a GenerationConfig-like object (ours, transformers', or a dict) over the model's own.
        prng_key: the key sampling draws from (`jax.random.PRNGKey(seed)`); required with do_sample=True.
        params: run with these params instead of `model.params`.
        ctc_weight: lambda of one-pass joint CTC/attention beam search (`flax_model.ctc.JointScorer`; the model
            needs a CTC head over the decoder's vocabulary): each step scores (1 - lambda) x the processed
            attention log-probability + lambda x the CTC prefix score's increase. None: attention only. With
            num_beams=1 it is a beam search of one beam.
        kwargs: generation settings by transformers' names (max_new_tokens, num_beams, do_sample, ...), and
            `decoder_input_ids`: a plain prompt [B, P] (or [P] for every utterance), the start token put first
            unless every row begins with it; the sequences returned begin with it.

    Returns:
        A `GenerateOutput`.

    Raises:
        GenerationConfigError: a setting that is malformed, not implemented, or impossible for this model.
    """
    settings, prompt = resolve_with_prompt(model.config, model_generation_config(model), generation_config,
                                           np.shape(inputs)[0], **kwargs)
    if settings.do_sample and prng_key is None:
        raise GenerationConfigError("generate: do_sample=True needs an explicit prng_key (jax.random.PRNGKey(seed))")
    joint = None if ctc_weight is None else joint_setting(model.config, settings, ctc_weight)
    if joint is not None and settings.prompt_length > 1:
        raise GenerationConfigError("generate: decoder_input_ids: a plain prompt does not go with ctc_weight (the "
                                    "CTC prefix scores start from an empty transcript)")
    key = ("generate", settings.static, joint)
    if key not in model._compiled:
        model._compiled[key] = jax.jit(search_function(model.module, settings, joint))
    run = model._compiled[key]
    params = model.params if params is None else params
    traced = traced_values(settings)
    rng = jax.random.PRNGKey(0) if prng_key is None else prng_key
    if joint is None:
        # The encoder is compiled apart (once per input shape, whatever the generation settings).
        encoded = model.encode(inputs, attention_mask, params=params)
        out = run(params, encoded.last_hidden_state, encoded.attention_mask, traced, rng, None, jnp.asarray(prompt))
    else:
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        hidden, encoder_mask, ctc_logits = model._fn("encode_with_ctc")(params, jnp.asarray(inputs, jnp.float32),
                                                                        mask)
        traced["ctc_weight"] = jnp.float32(ctc_weight)
        out = run(params, hidden, encoder_mask, traced, rng, ctc_logits)
    return search_output(out, settings.prompt_length)


def traced_values(settings: GenerationSettings) -> dict[str, jax.Array]:
    """The settings a compiled search takes as traced arguments (new values do not compile again)."""
    return {name: jnp.asarray(value, jnp.int32 if name == "min_new_tokens" else jnp.float32)
            for name, value in settings.traced.items()}


def search_output(out: dict[str, jax.Array], prompt_length: int = 1) -> GenerateOutput:
    """A search's dict (`greedy_or_sample`, `beam_search`) as numpy, cut to the steps it took (after a decoder
    prompt of `prompt_length` tokens, the start token included)."""
    steps = int(out["steps"])
    width = prompt_length + int(jnp.max(out["lengths"]))
    scores = None if out.get("scores") is None else np.asarray(out["scores"])[:, :steps]
    beam_indices = (None if out.get("beam_indices") is None
                    else np.asarray(out["beam_indices"])[:, :width - prompt_length])
    return GenerateOutput(np.asarray(out["sequences"])[:, :width], np.asarray(out["sequences_scores"]), scores,
                          beam_indices)


@dataclasses.dataclass(frozen=True)
class JointSetting:
    """What a compiled joint CTC/attention search depends on (lambda itself is traced)."""

    blank: int
    eos_ids: tuple[int, ...]
    neutral_ids: tuple[int, ...]
    pre_beam: int


def joint_setting(config: Any, settings: GenerationSettings, ctc_weight: float) -> JointSetting:
    """Checks that joint decoding applies and fixes its static part.

    The CTC head must speak the decoder's vocabulary. Every token that is not a word (the decoder start, pad and
    bos tokens, the forced first token) is CTC-neutral; the blank (the pad token) cannot be a label; eos scores
    the whole transcript. Each hypothesis' CTC scores are computed for its P best continuations by attention
    score (ESPnet's pre-beam; P = the candidates the search ranks, so that lambda = 0 is the attention-only
    search exactly), or for every token when lambda = 1 (the attention scores then decide nothing).
    """
    head = config.ctc
    if head is None:
        raise GenerationConfigError("generate: ctc_weight needs a CTC head (compose the model with --ctc-head "
                                    "decoder)")
    if not head.shares_decoder_vocabulary:
        raise GenerationConfigError("generate: ctc_weight: this model's CTC head has its own vocabulary "
                                    f"({head.vocabulary}), so its scores cannot join the decoder's; decode it alone "
                                    "(--decoder ctc) or compose with --ctc-head decoder")
    if isinstance(ctc_weight, bool) or not isinstance(ctc_weight, (int, float)) or not 0.0 <= ctc_weight <= 1.0:
        raise GenerationConfigError(f"generate: ctc_weight={ctc_weight!r} is not a number from 0 to 1")
    if settings.do_sample:
        raise GenerationConfigError("generate: ctc_weight: joint CTC/attention decoding is a beam search; it does "
                                    "not sample (do_sample=False)")
    eos = tuple(settings.eos_token_ids)
    neutral = set(config.special_token_ids) | {settings.decoder_start_token_id}
    if settings.forced_bos_token_id is not None:
        neutral.add(settings.forced_bos_token_id)
    neutral -= set(eos) | {head.blank_id}
    vocab = config.decoder.vocab_size
    pre_beam = vocab if ctc_weight == 1.0 else min(vocab, settings.beams_to_keep)
    return JointSetting(head.blank_id, eos, tuple(sorted(neutral)), pre_beam)


def search_function(module: Any, settings: GenerationSettings, joint: JointSetting | None = None) -> Callable:
    """The function to jit: (params, encoder output [B, S, D], its mask [B, S], traced settings, PRNG key[, CTC
    logits [B, S, V] for joint decoding, decoder prompt [B, P] (None: the start token alone)]) -> a dict of
    sequences [N, P + max_new_tokens], sequences_scores [N],
    lengths [N] (generated tokens), steps [], and with `output_scores` scores [rows, max_new_tokens, V] (and
    beam_indices)."""
    mode = settings.mode if joint is None else "joint"

    def run(params, hidden, encoder_mask, traced, key, ctc_logits=None, prompt=None):
        TRACES[mode] += 1
        variables = {"params": params}
        if prompt is None:  # the start token alone
            prompt = jnp.full((hidden.shape[0], 1), settings.decoder_start_token_id, jnp.int32)
        if settings.num_beams == 1 and settings.num_return_sequences > 1:
            hidden, encoder_mask, prompt = (jnp.repeat(a, settings.num_return_sequences, axis=0)
                                            for a in (hidden, encoder_mask, prompt))
        cache = module.apply(variables, hidden.shape[0], settings.prompt_length + settings.max_new_tokens, hidden,
                             encoder_mask, method="init_cache")

        def decode(tokens: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
            logits, cache = module.apply(variables, tokens, None, None, cache=cache, method="decode")
            return logits[:, -1].astype(jnp.float32), cache  # [N, V]

        if settings.prompt_length > 1:  # the prompt but its last token into the cache at once; the loop feeds that
            _, cache = decode(prompt[:, :-1], cache)
        if joint is not None:
            scorer = JointScorer(decoding_log_probs(ctc_logits, encoder_mask, joint.blank), traced["ctc_weight"],
                                 settings.num_beams, joint.pre_beam, joint.blank, joint.eos_ids, joint.neutral_ids)
            return beam_search(decode, cache, settings, traced, key, scorer)
        if settings.num_beams == 1:
            return greedy_or_sample(decode, cache, settings, traced, key, prompt)
        return beam_search(decode, cache, settings, traced, key, prompt=prompt)

    return run


# ----------------------------------------------------------------------------------------------------------
# Logits processors


def process_scores(scores: jax.Array, sequences: jax.Array, step: jax.Array, settings: GenerationSettings,
                   traced: dict[str, jax.Array]) -> jax.Array:
    """transformers 5's processors, in its order, on one step's scores.

    Args:
        scores: [N, V] float32 logits (greedy, sampling) or log-probs (beam search).
        sequences: [N, L] int32, the decoder prompt (the start token, and a plain prompt after it) then the generated
            tokens; columns >= prompt_length + step are not read.
        step: [] int32 tokens generated so far (the sequences hold prompt_length + step tokens).
        settings: the static settings (which processors run).
        traced: the traced values (repetition_penalty, min_new_tokens, temperature, top_p).

    Returns:
        The processed scores [N, V].
    """
    rows, vocab = scores.shape
    length = sequences.shape[1]
    cur_len = step + settings.prompt_length
    neg_inf = jnp.float32(-jnp.inf)
    row_ids = jnp.arange(rows)[:, None]

    def mark(tokens: jax.Array, where: jax.Array) -> jax.Array:
        """[N, V] bool: True at tokens[n, j] for every j where `where[n, j]` (a spare column takes the rest)."""
        marked = jnp.zeros((rows, vocab + 1), bool).at[row_ids, jnp.where(where, tokens, vocab)].set(True)
        return marked[:, :vocab]

    if settings.uses_repetition_penalty:
        penalty = traced["repetition_penalty"]
        present = mark(sequences, jnp.broadcast_to(jnp.arange(length) < cur_len, sequences.shape))
        scores = jnp.where(present, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)
    n = settings.no_repeat_ngram_size
    if n > 0 and length >= n:
        starts = length - n + 1
        windows = jnp.stack([sequences[:, j:j + starts] for j in range(n)], axis=-1)  # [N, starts, n]
        prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
        matches = jnp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)  # [N, starts]
        # A window counts once all its n tokens exist: it starts at most at cur_len - n.
        matches = matches & (jnp.arange(starts) <= cur_len - n)[None, :]
        scores = jnp.where(mark(windows[:, :, -1], matches), neg_inf, scores)
    if settings.bad_words_ids:
        banned = jnp.zeros((rows, vocab), bool)
        singles = [s[0] for s in settings.bad_words_ids if len(s) == 1]
        if singles:
            banned = banned | token_mask(vocab, singles)[None, :]
        by_prefix: dict[int, list[tuple[int, ...]]] = {}
        for s in settings.bad_words_ids:
            if len(s) > 1:
                by_prefix.setdefault(len(s) - 1, []).append(s)
        for m, group in by_prefix.items():
            prefixes = jnp.asarray([s[:-1] for s in group], jnp.int32)  # [G, m]
            last = jnp.asarray([s[-1] for s in group], jnp.int32)  # [G]
            tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - m, 0), m, axis=1)  # [N, m]
            hit = jnp.all(tail[:, None, :] == prefixes[None], axis=-1) & (cur_len >= m)  # [N, G]
            banned = banned | mark(jnp.broadcast_to(last, hit.shape), hit)
        scores = jnp.where(banned, neg_inf, scores)
    if settings.eos_token_ids:
        eos = token_mask(vocab, settings.eos_token_ids)
        scores = jnp.where(eos[None, :] & (step < traced["min_new_tokens"]), neg_inf, scores)
    if settings.forced_bos_token_id is not None:
        forced = jnp.where(jnp.arange(vocab) == settings.forced_bos_token_id, 0.0, neg_inf)
        scores = jnp.where(cur_len == 1, forced[None, :], scores)
    if settings.forced_eos_token_ids:
        forced = jnp.where(token_mask(vocab, settings.forced_eos_token_ids), 0.0, neg_inf)
        scores = jnp.where(step == settings.max_new_tokens - 1, forced[None, :], scores)
    if settings.suppress_tokens:
        scores = jnp.where(token_mask(vocab, settings.suppress_tokens)[None, :], neg_inf, scores)
    if settings.begin_suppress_tokens:
        begin = token_mask(vocab, settings.begin_suppress_tokens)[None, :] & (cur_len == settings.begin_index)
        scores = jnp.where(begin, neg_inf, scores)
    if settings.uses_temperature:
        scores = scores / traced["temperature"]
    if settings.uses_top_k:
        k = min(max(settings.top_k, settings.min_tokens_to_keep), vocab)
        kth = jax.lax.top_k(scores, k)[0][:, -1:]
        scores = jnp.where(scores < kth, neg_inf, scores)
    if settings.uses_top_p:
        scores = top_p_filter(scores, traced["top_p"], settings.min_tokens_to_keep)
    return scores


def token_mask(vocab: int, ids: tuple[int, ...] | list[int]) -> jax.Array:
    """[V] bool, True at `ids`."""
    return jnp.zeros((vocab,), bool).at[jnp.asarray(list(ids), jnp.int32)].set(True)


def top_p_filter(scores: jax.Array, top_p: jax.Array, min_tokens_to_keep: int) -> jax.Array:
    """Nucleus filtering as transformers: sorted ascending, a token goes when the cumulative probability up to and
    including it is <= 1 - top_p; the `min_tokens_to_keep` most likely always stay."""
    rows, vocab = scores.shape
    order = jnp.argsort(scores, axis=-1, stable=True)  # ascending
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p) & (jnp.arange(vocab) < vocab - min_tokens_to_keep)[None, :]
    remove = jnp.zeros_like(remove).at[jnp.arange(rows)[:, None], order].set(remove)
    return jnp.where(remove, -jnp.inf, scores)


# ----------------------------------------------------------------------------------------------------------
# Greedy search and sampling


def greedy_or_sample(decode: DecodeFn, cache: DecoderCache, settings: GenerationSettings,
                     traced: dict[str, jax.Array], key: jax.Array, prompt: jax.Array | None = None) -> dict[str, jax.Array]:
    rows = cache.encoder_mask.shape[0]
    max_new, first = settings.max_new_tokens, settings.prompt_length  # the prompt's P tokens, then the new ones
    pad = 0 if settings.pad_token_id is None else settings.pad_token_id
    if prompt is None:  # the start token alone
        prompt = jnp.full((rows, 1), settings.decoder_start_token_id, jnp.int32)
    sequences = jnp.full((rows, first + max_new), pad, jnp.int32).at[:, :first].set(prompt)
    eos = settings.eos_token_ids

    def not_done(state):
        return (state["step"] < max_new) & ~jnp.all(state["finished"])

    def step_fn(state):
        step = state["step"]
        tokens = jax.lax.dynamic_slice_in_dim(state["sequences"], first - 1 + step, 1, axis=1)  # [N, 1]
        logits, cache = decode(tokens, state["cache"])
        scores = process_scores(logits, state["sequences"], step, settings, traced)
        if settings.do_sample:
            next_tokens = jax.random.categorical(jax.random.fold_in(key, step), scores, axis=-1).astype(jnp.int32)
        else:
            next_tokens = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), next_tokens[:, None], axis=1)[:, 0]
        live = ~state["finished"]
        out = dict(state, cache=cache, step=step + 1,
                   log_prob_sum=state["log_prob_sum"] + jnp.where(live, log_prob, 0.0),
                   lengths=state["lengths"] + live.astype(jnp.int32))
        if eos:
            next_tokens = jnp.where(live, next_tokens, pad)
            out["finished"] = state["finished"] | jnp.isin(next_tokens, jnp.asarray(eos, jnp.int32))
        out["sequences"] = jax.lax.dynamic_update_slice(state["sequences"], next_tokens[:, None],
                                                        slice_start(0, first + step))
        if settings.output_scores:
            out["scores"] = jax.lax.dynamic_update_slice(state["scores"], scores[:, None, :],
                                                         slice_start(0, step, 0))
        return out

    state = {"sequences": sequences, "cache": cache, "finished": jnp.zeros((rows,), bool),
             "step": jnp.zeros((), jnp.int32), "log_prob_sum": jnp.zeros((rows,), jnp.float32),
             "lengths": jnp.zeros((rows,), jnp.int32)}
    if settings.output_scores:
        vocab = cache_vocab_probe(decode, cache)
        state["scores"] = jnp.zeros((rows, max_new, vocab), jnp.float32)
    state = jax.lax.while_loop(not_done, step_fn, state)
    return {"sequences": state["sequences"], "lengths": jnp.full((rows,), state["step"]),
            "sequences_scores": state["log_prob_sum"] / jnp.maximum(state["lengths"], 1).astype(jnp.float32),
            "steps": state["step"], "scores": state.get("scores")}


def cache_vocab_probe(decode: DecodeFn, cache: DecoderCache) -> int:
    """The vocabulary size, from the shape of one decode step traced abstractly (nothing runs)."""
    rows = cache.encoder_mask.shape[0]
    logits, _ = jax.eval_shape(decode, jax.ShapeDtypeStruct((rows, 1), jnp.int32), cache)
    return logits.shape[-1]


# ----------------------------------------------------------------------------------------------------------
# Beam search and beam sampling


@flax.struct.dataclass
class BeamState:
    """The beam-search loop carry: B utterances x K beams, sequences of P + max_new_tokens slots (P: the prompt)."""

    cache: DecoderCache  # batch B * K, row b * K + k is beam k of utterance b
    running: jax.Array  # [B, K, L] int32 running beams (the prompt, generated tokens, fill)
    running_scores: jax.Array  # [B, K] float32 sum of log-probs, best first
    running_beams: jax.Array  # [B, K, L - 1] int32 the running beam (b * K + k) each token came from, -1 after
    finished: jax.Array  # [B, K, L] int32 finished hypotheses, best first
    finished_scores: jax.Array  # [B, K] float32 length-normalised; -inf in unused slots
    finished_lengths: jax.Array  # [B, K] int32 generated tokens of each hypothesis
    finished_beams: jax.Array  # [B, K, L - 1] int32
    done: jax.Array  # [B] bool: the utterance takes no more hypotheses
    step: jax.Array  # [] int32 tokens generated so far
    scores: jax.Array | None  # [B * K, max_new_tokens, V] processed log-probs of each step (output_scores)
    ctc: PrefixState | None = None  # joint decoding: the running beams' CTC prefix states


def beam_search(decode: DecodeFn, cache: DecoderCache, settings: GenerationSettings,
                traced: dict[str, jax.Array], key: jax.Array, joint: JointScorer | None = None,
                prompt: jax.Array | None = None) -> dict[str, jax.Array]:
    """Beam search (and beam sampling); with `joint`, one-pass joint CTC/attention beam search: each step's scores
    are `joint.score`'s, and the beams that go on carry their CTC prefix states. `prompt` [B, P]: the decoder
    prompt every beam of an utterance starts from (None: the start token)."""
    k, max_new, keep = settings.num_beams, settings.max_new_tokens, settings.beams_to_keep
    first = settings.prompt_length  # the prompt's P tokens, then the new ones
    batch = cache.encoder_mask.shape[0]
    length_penalty = traced["length_penalty"]
    if prompt is None:
        prompt = jnp.full((batch, 1), settings.decoder_start_token_id, jnp.int32)
    cache = reorder_cache(cache, jnp.repeat(jnp.arange(batch), k))  # one copy of each utterance per beam
    sequences = jnp.full((batch, k, first + max_new), settings.beam_fill_token_id, jnp.int32)
    sequences = sequences.at[:, :, :first].set(prompt[:, None, :])
    no_beams = jnp.full((batch, k, max_new), -1, jnp.int32)
    first_live = jnp.where(jnp.arange(k) == 0, 0.0, DEAD_BEAM_SCORE).astype(jnp.float32)
    scores = None
    if settings.output_scores:
        scores = jnp.zeros((batch * k, max_new, cache_vocab_probe(decode, cache)), jnp.float32)
    state = BeamState(
        cache=cache,
        running=sequences,
        running_scores=jnp.broadcast_to(first_live, (batch, k)),
        running_beams=no_beams,
        finished=sequences,
        finished_scores=jnp.full((batch, k), -jnp.inf, jnp.float32),
        finished_lengths=jnp.zeros((batch, k), jnp.int32),
        finished_beams=no_beams,
        done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
        scores=scores,
        ctc=None if joint is None else joint.initial_state(),
    )
    eos = jnp.asarray(settings.eos_token_ids or (-1,), jnp.int32)

    def not_done(s: BeamState) -> jax.Array:
        return (s.step < max_new) & ~jnp.all(s.done)

    def step_fn(s: BeamState) -> BeamState:
        generated = s.step + 1  # tokens in every candidate after this step
        flat_running = s.running.reshape(batch * k, first + max_new)
        tokens = jax.lax.dynamic_slice_in_dim(flat_running, first - 1 + s.step, 1, axis=1)  # [B*K, 1]
        logits, cache = decode(tokens, s.cache)
        log_probs = process_scores(jax.nn.log_softmax(logits, axis=-1), flat_running, s.step, settings,
                                   traced)  # [B*K, V]
        if joint is not None:
            log_probs, extensions = joint.score(log_probs, s.ctc, s.step)
        vocab = log_probs.shape[-1]
        candidates = (log_probs.reshape(batch, k, vocab) + s.running_scores[:, :, None]).reshape(batch, k * vocab)
        if settings.do_sample:
            gumbel = jax.random.gumbel(jax.random.fold_in(key, s.step), candidates.shape, jnp.float32)
            _, top_ids = jax.lax.top_k(candidates + gumbel, keep)  # K' draws without replacement
            top_scores = jnp.take_along_axis(candidates, top_ids, axis=1)
            order = jnp.argsort(-top_scores, axis=1, stable=True)
            top_scores, top_ids = (jnp.take_along_axis(a, order, axis=1) for a in (top_scores, top_ids))
        else:
            top_scores, top_ids = jax.lax.top_k(candidates, keep)  # [B, K']
        source_beam, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
        extended = jnp.take_along_axis(s.running, source_beam[:, :, None], axis=1)  # [B, K', L]
        extended = jax.lax.dynamic_update_slice(extended, token[:, :, None],
                                                slice_start(0, 0, first - 1 + generated))
        source_row = (jnp.arange(batch)[:, None] * k + source_beam).astype(jnp.int32)  # [B, K']
        beams = jnp.take_along_axis(s.running_beams, source_beam[:, :, None], axis=1)
        beams = jax.lax.dynamic_update_slice(beams, source_row[:, :, None], slice_start(0, 0, s.step))
        ends = jnp.isin(token, eos) | (generated >= max_new)  # [B, K']

        # The K best candidates that go on; ended ones rank last (transformers' score - 1e9; a stable sort keeps
        # the rank order among each kind).
        go_on = jnp.argsort(ends, axis=1, stable=True)[:, :k]  # [B, K]
        running = jnp.take_along_axis(extended, go_on[:, :, None], axis=1)
        running_scores = jnp.take_along_axis(top_scores + jnp.where(ends, DEAD_BEAM_SCORE, 0.0), go_on, axis=1)
        running_beams = jnp.take_along_axis(beams, go_on[:, :, None], axis=1)
        rows = jnp.take_along_axis(source_row, go_on, axis=1)  # [B, K]

        # Candidates among the first K that end join the finished hypotheses; the K best of all are kept.
        finishing = ends & (jnp.arange(keep) < k)[None, :] & ~s.done[:, None]
        final_scores = top_scores / generated.astype(jnp.float32) ** length_penalty
        merged_scores = jnp.concatenate([s.finished_scores, jnp.where(finishing, final_scores, -jnp.inf)], axis=1)
        _, kept = jax.lax.top_k(merged_scores, k)  # ties keep the older hypothesis (lower index)
        merged = jnp.concatenate([s.finished, extended], axis=1)
        merged_beams = jnp.concatenate([s.finished_beams, beams], axis=1)
        lengths = jnp.concatenate([s.finished_lengths, jnp.full((batch, keep), generated, jnp.int32)], axis=1)
        finished_scores = jnp.take_along_axis(merged_scores, kept, axis=1)
        full = jnp.all(finished_scores > -jnp.inf, axis=1)  # [B] K hypotheses finished

        if settings.early_stopping is True:
            done = s.done | full
        else:
            bound_length = generated.astype(jnp.float32)
            if settings.early_stopping == "never":
                bound_length = jnp.where(length_penalty > 0, jnp.float32(max_new), bound_length)
            best_possible = running_scores[:, 0] / bound_length ** length_penalty
            done = s.done | (full & (jnp.min(finished_scores, axis=1) >= best_possible))
        step_scores = s.scores
        if settings.output_scores:
            step_scores = jax.lax.dynamic_update_slice(s.scores, log_probs[:, None, :],
                                                       slice_start(0, s.step, 0))
        return BeamState(
            cache=reorder_cache(cache, rows.reshape(-1), cross=False),  # beams stay within their utterance
            running=running,
            running_scores=running_scores,
            running_beams=running_beams,
            finished=jnp.take_along_axis(merged, kept[:, :, None], axis=1),
            finished_scores=finished_scores,
            finished_lengths=jnp.take_along_axis(lengths, kept, axis=1),
            finished_beams=jnp.take_along_axis(merged_beams, kept[:, :, None], axis=1),
            done=done,
            step=generated,
            scores=step_scores,
            ctc=None if joint is None else joint.select(extensions, s.ctc, rows.reshape(-1),
                                                        jnp.take_along_axis(token, go_on, axis=1).reshape(-1)),
        )

    s = jax.lax.while_loop(not_done, step_fn, state)
    returns = settings.num_return_sequences
    flat = lambda a: a[:, :returns].reshape((batch * returns,) + a.shape[2:])
    return {"sequences": flat(s.finished), "sequences_scores": flat(s.finished_scores),
            "lengths": flat(s.finished_lengths), "steps": s.step, "scores": s.scores,
            "beam_indices": flat(s.finished_beams) if settings.output_scores else None}
