"""Generation for the composed model in eager PyTorch, written plainly as the reference: greedy search, sampling,
beam search and beam sampling, with transformers 5's logits processors in transformers 5's order.

`flax_model.generation` computes the same thing vectorised inside one `lax.while_loop`; the two must give
identical token sequences for the deterministic modes and scores within 1e-4. Both follow transformers 5's
`generate` for an encoder-decoder model, whose decoder prompt is the start token, or a plain prompt
(`decoder_input_ids`, the start token put first unless every row begins with it, as transformers does):

* Settings: `convert.base.generation_settings.resolve_settings` (the model's generation config, a GenerationConfig-like
  object, keyword arguments). `max_new_tokens` = max_length - P, P the prompt's tokens (1: the start token).
* The encoder runs once; `init_cache` projects the cross-attention keys/values once; the prompt but its last token
  goes through the decoder into the cache, and every step feeds the last token (the prompt's at first) with the
  cache (the start token sits at position 0). Processors see the prompt as part of the sequence, as transformers'.
* Processors, applied to each step's scores in this order (`process_scores`): repetition_penalty,
  no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens, forced_bos_token_id, forced_eos_token_id,
  suppress_tokens, begin_suppress_tokens; then, when sampling, temperature, top_k, top_p. The sequences they
  look at start with the decoder start token. Greedy search and sampling process the logits; beam search
  processes the log-softmax of the logits.
* Greedy: the argmax of the processed scores (ties go to the lowest id). Sampling: one draw from the softmax of
  the processed scores (`torch.multinomial` with the caller's `generator`). A row whose token is one of the eos
  ids is finished; later steps append `pad_token_id` to it. The loop ends when every row has finished or after
  `max_new_tokens` tokens. With `num_return_sequences` R, each utterance is sampled R times (rows b * R + r).
* Beam search, per utterance (K beams; K' = max(2, 1 + number of eos ids) * K candidates a step): the K running
  beams start from the start token (only the first live: the others score -1e9, as transformers does). Each
  step scores every continuation as running score + processed log-prob, takes the top K' over all K x V
  (beam sampling: K' drawn without replacement from the softmax of those scores, then sorted by score), and
  - a candidate among the first K that ends (an eos id, or the `max_new_tokens`-th token) becomes a finished
    hypothesis scored `sum_logprobs / n ** length_penalty`, n the number of generated tokens; the K best are kept
    (an equal score does not displace an older one);
  - the best K candidates that did not end become the running beams;
  - the utterance is done when no running beam can beat the finished ones (`early_stopping`): True: as soon as K
    are finished; False: when K are finished and the best running score / (tokens so far) ** length_penalty is
    no better than the worst finished score; "never": the same with `max_new_tokens` as the length when
    length_penalty > 0. A done utterance takes no new hypotheses.
  The result is each utterance's R best finished hypotheses (rows b * R + r), padded with transformers'
  `pad_token_id or eos_token_id[0]` to the longest.
* Deliberate differences from transformers 5 (README, "Generation"): settings that transformers would silently
  ignore are refused (`convert.base.generation_settings`); greedy search and sampling return a score too.
* Scores: `sequences_scores` is, for beam search, each returned hypothesis' length-normalised score; for greedy
  search and sampling (where transformers returns none) the mean log-probability of the generated tokens under
  the softmax of the processed scores (eos included, padding not). With `output_scores`, `scores` holds each
  step's processed scores ([rows, steps, V]; beam search: one row per running beam, b * K + k) and, for beam
  search, `beam_indices` the running beam (b * K + k) each returned token came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from convert.base.generation_settings import GenerationSettings, model_generation_config, resolve_with_prompt
from torch_reference.cache import DecoderCache, LayerCache

# The score of the beams that are not live at the first step, and the penalty transformers adds to scores that
# must not be picked (finished candidates among the running ones).
DEAD_BEAM_SCORE = -1e9


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        sequences: [N, P + n] int64 (N = batch * num_return_sequences), starting with the decoder prompt (the start
            token, and a plain prompt after it).
        sequences_scores: [N] float32 (see the module docstring).
        scores: [rows, steps, V] float32 processed scores of each step, with `output_scores`; else None.
        beam_indices: [N, n] int64 running beam of each token (beam search with `output_scores`), -1 past the end.
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor
    scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None


@torch.no_grad()
def generate(
    model: Any,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: Any = None,
    *,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> GenerateOutput:
    """Transcribes a batch of waveforms.

    Args:
        model: a `torch_reference.speech_encoder_decoder.SpeechEncoderDecoderModel` (in eval mode).
        inputs: [B, N] float waveforms (normalised as the feature extractor would).
        attention_mask: [B, N], 1 for real samples (right padding); None means all real.
        generation_config: a GenerationConfig-like object (ours, transformers', or a dict) over the model's own.
        generator: the torch RNG that sampling draws from (None: torch's global RNG, as transformers).
        kwargs: generation settings by transformers' names (max_new_tokens, num_beams, do_sample, ...), and
            `decoder_input_ids`: a plain prompt [B, P] (or [P] for every utterance).

    Returns:
        A `GenerateOutput`.

    Raises:
        GenerationConfigError: a setting that is malformed, not implemented, or impossible for this model.
    """
    inputs = torch.as_tensor(inputs, dtype=torch.float32)
    settings, prompt = resolve_with_prompt(model.config, model_generation_config(model), generation_config,
                                           inputs.shape[0], **kwargs)
    prompts = prompt.tolist()  # [B, P], the start token first
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
    encoder_out, encoder_mask = model.encode(inputs, attention_mask)
    if settings.num_beams == 1:
        rows = torch.arange(inputs.shape[0]).repeat_interleave(settings.num_return_sequences)
        encoder_out, encoder_mask = encoder_out[rows], encoder_mask[rows]
        prompts = [prompts[int(r)] for r in rows]
    cache = model.init_cache(encoder_out.shape[0], settings.prompt_length + settings.max_new_tokens, encoder_out,
                             encoder_mask)
    if settings.prompt_length > 1:  # the prompt but its last token, one token at a time: the loop feeds that one
        for t in range(settings.prompt_length - 1):
            _, cache = next_token_logits(model, torch.tensor([p[t] for p in prompts]), cache)
    if settings.num_beams == 1:
        return greedy_or_sample(model, cache, settings, generator, prompts)
    return beam_search(model, cache, settings, generator, prompts)


def next_token_logits(model: Any, tokens: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
    """Feeds `tokens` [N] (the last token of each row) through the decoder: (logits [N, V] float32, cache)."""
    logits, cache = model.decode(tokens[:, None], None, None, cache=cache)
    return logits[:, -1].float(), cache


# ----------------------------------------------------------------------------------------------------------
# Logits processors


def process_scores(sequences: list[list[int]], scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """transformers 5's processors, in its order, on one step's scores.

    Args:
        sequences: each row's tokens so far (the decoder prompt first: the start token, and a plain prompt after
            it); all rows have the same length.
        scores: [N, V] logits (greedy, sampling) or log-probs (beam search).

    Returns:
        The processed scores [N, V] (a new tensor).
    """
    scores = scores.clone()
    cur_len = len(sequences[0])
    generated = cur_len - settings.prompt_length
    neg_inf = -float("inf")
    if settings.uses_repetition_penalty:
        penalty = settings.repetition_penalty
        for row, tokens in enumerate(sequences):
            for token in set(tokens):
                value = scores[row, token]
                scores[row, token] = value * penalty if value < 0 else value / penalty
    n = settings.no_repeat_ngram_size
    if n > 0 and cur_len >= n:
        for row, tokens in enumerate(sequences):
            seen: dict[tuple[int, ...], list[int]] = {}
            for start in range(cur_len - n + 1):
                gram = tuple(tokens[start:start + n])
                seen.setdefault(gram[:-1], []).append(gram[-1])
            for token in seen.get(tuple(tokens[cur_len - n + 1:]), []):
                scores[row, token] = neg_inf
    for bad in settings.bad_words_ids:
        prefix = list(bad[:-1])
        if len(prefix) > cur_len:
            continue
        for row, tokens in enumerate(sequences):
            if not prefix or tokens[cur_len - len(prefix):] == prefix:
                scores[row, bad[-1]] = neg_inf
    if generated < settings.min_new_tokens:
        scores[:, list(settings.eos_token_ids)] = neg_inf
    if settings.forced_bos_token_id is not None and cur_len == 1:
        scores[:] = neg_inf
        scores[:, settings.forced_bos_token_id] = 0.0
    if settings.forced_eos_token_ids and generated == settings.max_new_tokens - 1:
        scores[:] = neg_inf
        scores[:, list(settings.forced_eos_token_ids)] = 0.0
    if settings.suppress_tokens:
        scores[:, list(settings.suppress_tokens)] = neg_inf
    if settings.begin_suppress_tokens and cur_len == settings.begin_index:
        scores[:, list(settings.begin_suppress_tokens)] = neg_inf
    if settings.uses_temperature:
        scores = scores / settings.temperature
    if settings.uses_top_k:
        k = min(max(settings.top_k, settings.min_tokens_to_keep), scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, neg_inf)
    if settings.uses_top_p:
        scores = top_p_filter(scores, settings.top_p, settings.min_tokens_to_keep)
    return scores


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability reaches `top_p` (nucleus filtering)."""
    out = scores.clone()
    for row in range(scores.shape[0]):
        order = torch.argsort(scores[row], descending=True, stable=True)
        probs = F.softmax(scores[row][order], dim=-1)
        # transformers removes, in ascending order, every token whose cumulative probability (from the least
        # likely up) is <= 1 - top_p; counted from the top, a token is kept while the mass above it is < top_p.
        above = torch.flip(torch.cumsum(torch.flip(probs, [0]), 0), [0])  # mass of this token and all below it
        keep = above > 1 - top_p
        keep[:min_tokens_to_keep] = True
        out[row, order[~keep]] = -float("inf")
    return out


# ----------------------------------------------------------------------------------------------------------
# Greedy search and sampling


def greedy_or_sample(model: Any, cache: DecoderCache, settings: GenerationSettings,
                     generator: torch.Generator | None, prompts: list[list[int]] | None = None) -> GenerateOutput:
    rows = cache.encoder_mask.shape[0]
    if prompts is None:  # the start token alone
        prompts = [[settings.decoder_start_token_id]] * rows
    eos = set(settings.eos_token_ids)
    sequences = [list(p) for p in prompts]
    finished = [False] * rows
    log_prob_sums = [0.0] * rows
    lengths = [0] * rows
    step_scores = []
    for _ in range(settings.max_new_tokens):
        logits, cache = next_token_logits(model, torch.tensor([s[-1] for s in sequences]), cache)
        scores = process_scores(sequences, logits, settings)
        if settings.output_scores:
            step_scores.append(scores)
        if settings.do_sample:
            next_tokens = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            next_tokens = scores.argmax(dim=-1)
        log_probs = F.log_softmax(scores, dim=-1)
        for row in range(rows):
            token = int(next_tokens[row])
            if finished[row]:
                token = settings.pad_token_id
            else:
                log_prob_sums[row] += float(log_probs[row, token])
                lengths[row] += 1
                finished[row] = token in eos
            sequences[row].append(token)
        if all(finished):
            break
    mean_log_probs = torch.tensor([s / n for s, n in zip(log_prob_sums, lengths)], dtype=torch.float32)
    scores = torch.stack(step_scores, dim=1) if settings.output_scores else None
    return GenerateOutput(torch.tensor(sequences, dtype=torch.long), mean_log_probs, scores)


# ----------------------------------------------------------------------------------------------------------
# Beam search and beam sampling


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # the generated tokens, eos included when it ended with one
    score: float  # finished: sum of log-probs / len(tokens) ** length_penalty; running: sum of log-probs
    beams: list[int]  # the running beam (b * K + k) each token was appended to


def beam_search(model: Any, cache: DecoderCache, settings: GenerationSettings,
                generator: torch.Generator | None, prompts: list[list[int]] | None = None) -> GenerateOutput:
    k, lp, eos = settings.num_beams, settings.length_penalty, set(settings.eos_token_ids)
    keep = settings.beams_to_keep
    batch = cache.encoder_mask.shape[0]
    if prompts is None:  # the start token alone
        prompts = [[settings.decoder_start_token_id]] * batch
    cache = repeat_cache(cache, k)  # every beam starts from the prompt; only the first is live at first
    running = [[Hypothesis([], 0.0 if j == 0 else DEAD_BEAM_SCORE, []) for j in range(k)] for _ in range(batch)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_scores = []
    for step in range(settings.max_new_tokens):
        generated = step + 1  # tokens in every candidate after this step
        flat = [h for beams in running for h in beams]
        prompt_of = [prompts[row // k] for row in range(batch * k)]
        logits, cache = next_token_logits(model, torch.tensor([(p + h.tokens)[-1] for p, h in zip(prompt_of, flat)]),
                                          cache)
        log_probs = process_scores([p + h.tokens for p, h in zip(prompt_of, flat)], F.log_softmax(logits, dim=-1),
                                   settings)
        if settings.output_scores:
            step_scores.append(log_probs)
        vocab = log_probs.shape[-1]
        # Running scores are float32, as in transformers (and the Flax port): the sums round alike.
        running_scores = torch.tensor([[h.score for h in beams] for beams in running], dtype=torch.float32)
        candidates = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        if settings.do_sample:
            top_ids = torch.multinomial(F.softmax(candidates, dim=-1), keep, generator=generator)
            top_scores = candidates.gather(1, top_ids)
            top_scores, order = top_scores.sort(dim=-1, descending=True, stable=True)
            top_ids = top_ids.gather(1, order)
        else:
            top_scores, top_ids = candidates.topk(keep, dim=1)
        source_rows, next_running = [], []
        for b in range(batch):
            new_running, ended_running = [], []
            for rank in range(keep):
                beam, token = divmod(int(top_ids[b, rank]), vocab)
                score = top_scores[b, rank]
                parent = running[b][beam]
                hypothesis = Hypothesis(parent.tokens + [token], float(score), parent.beams + [b * k + beam])
                if token in eos or generated == settings.max_new_tokens:
                    # Only the first K candidates may finish, and only while the utterance is not done.
                    if rank < k and not done[b]:
                        final = float(score / torch.tensor(float(generated)) ** lp)
                        add_hypothesis(finished[b], dataclasses.replace(hypothesis, score=final), k)
                    # transformers ranks ended candidates last among the running ones (score - 1e9).
                    ended_running.append((dataclasses.replace(hypothesis, score=float(score) + DEAD_BEAM_SCORE),
                                          b * k + beam))
                else:
                    new_running.append((hypothesis, b * k + beam))
            chosen = (new_running + ended_running)[:k]
            next_running.append([h for h, _ in chosen])
            source_rows += [row for _, row in chosen]
        running = next_running
        if generated == settings.max_new_tokens:
            break
        for b in range(batch):
            done[b] = done[b] or is_done(finished[b], running[b][0].score, generated, settings)
        if all(done):
            break
        cache = reorder_cache(cache, torch.tensor(source_rows))
    best = [h for hyps in finished for h in sorted(hyps, key=lambda h: -h.score)[:settings.num_return_sequences]]
    width, first = max(len(h.tokens) for h in best), settings.prompt_length
    sequences = torch.full((len(best), first + width), settings.beam_fill_token_id, dtype=torch.long)
    beam_indices = torch.full((len(best), width), -1, dtype=torch.long)
    for i, h in enumerate(best):
        sequences[i, :first] = torch.tensor(prompts[i // settings.num_return_sequences])
        sequences[i, first:first + len(h.tokens)] = torch.tensor(h.tokens)
        beam_indices[i, :len(h.beams)] = torch.tensor(h.beams)
    scores = torch.stack(step_scores, dim=1) if settings.output_scores else None
    return GenerateOutput(sequences, torch.tensor([h.score for h in best], dtype=torch.float32), scores,
                          beam_indices if settings.output_scores else None)


def add_hypothesis(hypotheses: list[Hypothesis], new: Hypothesis, keep: int) -> None:
    """Adds a finished hypothesis, keeping the `keep` best (an equal score does not displace an older one)."""
    hypotheses.append(new)
    hypotheses.sort(key=lambda h: -h.score)  # stable: older hypotheses stay ahead of equal newer ones
    del hypotheses[keep:]


def is_done(finished: list[Hypothesis], best_running: float, generated: int, settings: GenerationSettings) -> bool:
    """Whether an utterance can stop: K hypotheses finished and (unless early_stopping=True) none of the running
    beams can beat the worst of them."""
    if len(finished) < settings.num_beams:
        return False
    if settings.early_stopping is True:
        return True
    lp = settings.length_penalty
    length = settings.max_new_tokens if settings.early_stopping == "never" and lp > 0 else generated
    best_possible = float(torch.tensor(best_running, dtype=torch.float32) / torch.tensor(float(length)) ** lp)
    return min(h.score for h in finished) >= best_possible


def repeat_cache(cache: DecoderCache, times: int) -> DecoderCache:
    """Each row of the cache `times` times in a row: [B, ...] -> [B * times, ...] (one copy per beam)."""
    rows = torch.arange(cache.encoder_mask.shape[0]).repeat_interleave(times)
    return reorder_cache(cache, rows, cross=True)


def reorder_cache(cache: DecoderCache, rows: torch.Tensor, cross: bool = False) -> DecoderCache:
    """Gathers the self-attention keys/values along the batch axis. The cross-attention arrays and the encoder
    mask are gathered only with `cross`: beams only move within their utterance, whose rows share them."""
    pick = lambda a: a.index_select(0, rows) if cross else a
    layers = tuple(LayerCache(c.key.index_select(0, rows), c.value.index_select(0, rows), pick(c.cross_key),
                              pick(c.cross_value)) for c in cache.layers)
    return DecoderCache(layers, cache.index, pick(cache.encoder_mask))
