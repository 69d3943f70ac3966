"""Greedy and beam-search generation for the composed model in eager PyTorch, written plainly as the reference.

`flax_model.generation` computes the same thing vectorised inside one `lax.while_loop`; the two must give
identical token sequences (and beam scores within 1e-4). Both follow Hugging Face's `generate` (transformers
>= 4.50, whose vectorised `_beam_search` replaced `BeamSearchScorer`):

* The encoder runs once; `init_cache` projects the cross-attention keys/values once; every step feeds the
  last token through the decoder with the cache (positions `0, 1, ...`; the start token sits at 0).
* Greedy: the next token is the argmax of the step's logits (the argmax of the log-softmax too; ties go to
  the lowest id). A row that has produced `eos_token_id` is finished; later steps append `pad_token_id` to it.
  Generation stops when every row has finished or after `max_new_tokens` tokens. Greedy has no score.
* `min_new_tokens`: while fewer than `min_new_tokens` tokens have been generated, eos scores -inf.
* Beam search, per utterance: `num_beams` (K) running beams start from the start token (only the first
  one live: the others score -1e9, as HF does, so that step 1 does not pick K copies of one token). Each
  step scores every continuation as running score + log-softmax, ranks the top 2K over all K x V, and:
  - a candidate among the top K of those 2K that ends in eos (or reaches `max_new_tokens`) becomes a
    finished hypothesis scored `sum_logprobs / n ** length_penalty`, n = the number of generated tokens
    including the eos (the start token is not counted); the K best finished hypotheses are kept;
  - the K best candidates that did not finish become the running beams.
  - The utterance is done when no running beam can beat the finished ones (`early_stopping`):
    `True`: as soon as K hypotheses are finished; `False` (HF's default heuristic): when K are finished and
    the best running score divided by (tokens generated so far) ** length_penalty is no better than the
    worst finished score; `"never"`: the same, but dividing by `max_new_tokens ** length_penalty` when
    `length_penalty > 0` (the canonical bound). A done utterance takes no new hypotheses.
  - Generation stops when every utterance is done or after `max_new_tokens` steps. The result is each
    utterance's best finished hypothesis and its score.
* Output: `sequences` [B, 1 + n], the start token then the generated tokens (eos included), rows shorter
  than the longest padded with `pad_token_id`; n is the longest row's generated length.

Not implemented (HF generation-config options): sampling, repetition / n-gram penalties, forced BOS/EOS tokens,
several eos ids, `num_return_sequences`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from convert.generation_settings import GenerationSettings, resolve_settings
from torch_reference.layers import DecoderCache, LayerCache


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        sequences: [B, 1 + n] int64, starting with `decoder_start_token_id`.
        scores: [B] float32 length-normalised log-probabilities of the returned beams (beam search); None
            for greedy search.
    """

    sequences: torch.Tensor
    scores: torch.Tensor | None


@torch.no_grad()
def generate(
    model: Any,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    min_new_tokens: int = 0,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GenerateOutput:
    """Transcribes a batch of waveforms with greedy search (`num_beams=1`) or beam search.

    Args:
        model: a `torch_reference.speech_encoder_decoder.SpeechEncoderDecoderModel` (in eval mode).
        inputs: [B, N] float waveforms (normalised as the feature extractor would).
        attention_mask: [B, N], 1 for real samples (right padding); None means all real.
        max_new_tokens: the most tokens generated after the start token.
        num_beams: 1 for greedy search, else the beam width.
        length_penalty: beam search divides a hypothesis' log-probability by length ** length_penalty.
        early_stopping: True, False or "never" (see the module docstring).
        min_new_tokens: eos is forbidden until this many tokens have been generated.
        decoder_start_token_id, eos_token_id, pad_token_id: override the config's ids.

    Returns:
        `GenerateOutput(sequences [B, 1 + n] int64, scores [B] | None)`.
    """
    settings = resolve_settings(model.config, max_new_tokens, num_beams, length_penalty, early_stopping,
                                min_new_tokens, decoder_start_token_id, eos_token_id, pad_token_id)
    inputs = torch.as_tensor(inputs, dtype=torch.float32)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
    encoder_out, encoder_mask = model.encode(inputs, attention_mask)
    cache = model.init_cache(inputs.shape[0], settings.max_new_tokens + 1, encoder_out, encoder_mask)
    if settings.num_beams == 1:
        return greedy_search(model, cache, settings)
    return beam_search(model, cache, settings)


def next_token_scores(model: Any, tokens: torch.Tensor, cache: DecoderCache, settings: GenerationSettings,
                      generated: int, log_softmax: bool) -> tuple[torch.Tensor, DecoderCache]:
    """Feeds `tokens` [B] (the last token of each row) through the decoder.

    Returns:
        (the next token's logits, or log-probs with `log_softmax`, [B, V] float32; the advanced cache).
    """
    logits, cache = model.decode(tokens[:, None], None, None, cache=cache)
    scores = logits[:, -1].float()
    if log_softmax:
        scores = F.log_softmax(scores, dim=-1)
    if settings.eos_token_id is not None and generated < settings.min_new_tokens:
        scores[:, settings.eos_token_id] = -float("inf")
    return scores, cache


def greedy_search(model: Any, cache: DecoderCache, settings: GenerationSettings) -> GenerateOutput:
    batch = cache.encoder_mask.shape[0]
    sequences = torch.full((batch, 1), settings.decoder_start_token_id, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    for step in range(settings.max_new_tokens):
        # HF takes the argmax of the logits: the same token as the log-softmax's, without computing it.
        logits, cache = next_token_scores(model, sequences[:, -1], cache, settings, step, log_softmax=False)
        next_tokens = logits.argmax(dim=-1)
        if settings.eos_token_id is not None:
            next_tokens = torch.where(finished, torch.tensor(settings.pad_token_id), next_tokens)
            finished = finished | (next_tokens == settings.eos_token_id)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if bool(finished.all()):
            break
    return GenerateOutput(sequences, None)


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # the generated tokens, eos included when it ended with one
    score: float  # finished: sum of log-probs / len(tokens) ** length_penalty; running: sum of log-probs


def beam_search(model: Any, cache: DecoderCache, settings: GenerationSettings) -> GenerateOutput:
    k, lp, eos = settings.num_beams, settings.length_penalty, settings.eos_token_id
    batch = cache.encoder_mask.shape[0]
    # Every beam starts from the start token; only the first is live at first.
    cache = repeat_cache(cache, k)
    running = [[Hypothesis([], 0.0 if j == 0 else -1e9) for j in range(k)] for _ in range(batch)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    last_tokens = torch.full((batch * k,), settings.decoder_start_token_id, dtype=torch.long)
    for step in range(settings.max_new_tokens):
        generated = step + 1  # tokens in every candidate after this step
        log_probs, cache = next_token_scores(model, last_tokens, cache, settings, step, log_softmax=True)
        vocab = log_probs.shape[-1]
        # Running scores are float32, as in HF (and the Flax port): the sums round alike.
        running_scores = torch.tensor([[h.score for h in beams] for beams in running], dtype=torch.float32)
        candidates = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=1)
        source_rows, next_tokens = [], []
        for b in range(batch):
            new_running = []
            for rank in range(2 * k):
                beam, token = divmod(int(top_ids[b, rank]), vocab)
                score = top_scores[b, rank]
                tokens = running[b][beam].tokens + [token]
                if token == eos or generated == settings.max_new_tokens:
                    # Only the top K candidates may finish, and only while the utterance is not done.
                    if rank < k and not done[b]:
                        final = float(score / torch.tensor(float(generated)) ** lp)
                        add_hypothesis(finished[b], Hypothesis(tokens, final), k)
                elif len(new_running) < k:
                    new_running.append(Hypothesis(tokens, float(score)))
                    source_rows.append(b * k + beam)
                    next_tokens.append(token)
            running[b] = new_running
        if generated == settings.max_new_tokens:
            break
        for b in range(batch):
            done[b] = done[b] or is_done(finished[b], running[b][0].score, generated, settings)
        if all(done):
            break
        cache = reorder_cache(cache, torch.tensor(source_rows))
        last_tokens = torch.tensor(next_tokens)
    best = [max(hyps, key=lambda h: h.score) for hyps in finished]
    width = max(len(h.tokens) for h in best)
    sequences = torch.full((batch, 1 + width), settings.pad_token_id, dtype=torch.long)
    sequences[:, 0] = settings.decoder_start_token_id
    for b, h in enumerate(best):
        sequences[b, 1:1 + len(h.tokens)] = torch.tensor(h.tokens)
    return GenerateOutput(sequences, torch.tensor([h.score for h in best], dtype=torch.float32))


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
    pick = lambda a: a.index_select(0, rows) if cross else a  # noqa: E731
    layers = tuple(LayerCache(c.key.index_select(0, rows), c.value.index_select(0, rows), pick(c.cross_key),
                              pick(c.cross_value)) for c in cache.layers)
    return DecoderCache(layers, cache.index, pick(cache.encoder_mask))
