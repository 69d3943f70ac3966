"""CTC for the composed Flax model: the loss (transformers' `Wav2Vec2ForCTC` semantics) and the prefix scores of
one-pass joint CTC/attention beam search (ESPnet's `CTCPrefixScorer`, vectorised over beams and candidates).

The loss is the CTC forward recursion written here (`ctc_log_likelihood`), with torch's reductions around it:
"mean" divides each utterance's loss by its target length (at least 1) and averages over the utterances, "sum"
adds them; an unalignable target (more labels and repeats than frames) gives infinity, or 0 with `zero_infinity`.
`optax.ctc_loss` computes the same per-utterance loss as `torch.nn.functional.ctc_loss` for alignable targets
(checked), but scores unalignable ones with a large finite number instead of infinity, and, like torch's, runs
its recursion at -(frames x log V) in float32: on 200 frames of a random head both put the gradient ~1e-4 from
float64's, where the recursion here, each frame lowered by its largest log-probability, stays within 1e-6.

Prefix scores (Watanabe et al., "Hybrid CTC/attention architecture for end-to-end speech recognition", 2017):
each running hypothesis g carries the CTC forward variables r^n_t(g) (paths ending in g's last label at frame t)
and r^b_t(g) (ending in blank) over all frames, and its prefix probability psi(g). Extending g by label c:

    phi_t = r^b_t(g) if c is g's last label else r^n_t(g) (+) r^b_t(g)          ((+): log-add)
    r^n_t(gc) = (r^n_{t-1}(gc) (+) phi_{t-1}) + x_t(c),   r^b_t(gc) = (r^n_{t-1}(gc) (+) r^b_{t-1}(gc)) + x_t(blank)
    psi(gc) = log-sum over t of phi_{t-1} + x_t(c)       (phi_{-1} = 0 for the empty prefix)
    psi(g eos) = r^n_T(g) (+) r^b_T(g)                    (g is the whole transcript)

x the CTC log-probabilities. An utterance's frames past its length are made certain blanks (x(blank) = 0, others
log 0), which carries every variable unchanged to the last frame: a padded batch scores as each utterance alone.
Tokens that are not words (decoder start, pad, the decoder's bos, the forced first token) leave the CTC state as it
is and score 0 where the decoder may put them, as its first token or where a processor forces them, and log 0
elsewhere (else, at lambda = 1, a search would fill every hypothesis with them for free); the blank, when it is
not also eos, cannot be a label (log 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from convert.base.ctc import LOG_ZERO, CTCHeadConfig

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------
# Loss


def ctc_targets(labels: jax.Array, special_ids: Sequence[int]) -> jax.Array:
    """The CTC targets of decoder labels [B, T] (-100 padding): the labels without the `special_ids` (start, pad,
    eos, bos), moved left, -100 after them."""
    keep = labels != IGNORE_INDEX
    for i in special_ids:
        keep = keep & (labels != i)
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept positions first, in their order
    moved = jnp.take_along_axis(labels, order, axis=1)
    return jnp.where(jnp.take_along_axis(keep, order, axis=1), moved, IGNORE_INDEX)


def alignable(targets: jax.Array, frames: jax.Array) -> jax.Array:
    """[B] bool: a CTC alignment of the targets [B, U] (-100 padding) fits in `frames` [B]: it needs one frame per
    label and one more between two equal labels."""
    real = targets != IGNORE_INDEX
    repeats = jnp.sum(real[:, 1:] & (targets[:, 1:] == targets[:, :-1]), axis=1)
    return jnp.sum(real, axis=1) + repeats <= frames


def ctc_log_likelihood(log_probs: jax.Array, frame_mask: jax.Array, targets: jax.Array, blank: int) -> jax.Array:
    """log p(targets | frames) [B]: the CTC forward recursion over the blank-extended targets (Graves et al.,
    2006), in log space.

    Args:
        log_probs: [B, T, V] float32 log-probabilities.
        frame_mask: [B, T] bool, real frames (right padding).
        targets: [B, U] label ids, -100 padding (right).
        blank: the blank label.

    Each frame's log-probabilities are first lowered by their largest value, a constant every path through that
    frame pays, added back at the end (its gradient is that of the shifted recursion: exactly the same): the
    recursion then runs near 0 rather than at -(frames x log V), where float32 keeps ~10 times fewer digits of a
    long utterance's log-likelihood and its gradient (over 200 frames of a random head, torch's float32 CTC
    gradient is 1.3e-4 from float64's; this one is within 1e-5).
    """
    batch, frames, _ = log_probs.shape
    shift = jax.lax.stop_gradient(jnp.max(log_probs, axis=-1))  # [B, T]
    shift = jnp.where(frame_mask, shift, 0.0)
    log_probs = log_probs - shift[:, :, None]
    real = targets != IGNORE_INDEX
    labels = jnp.where(real, targets, blank)
    lengths = jnp.sum(real, axis=1)
    states = 2 * labels.shape[1] + 1
    extended = jnp.full((batch, states), blank, jnp.int32).at[:, 1::2].set(labels)  # [B, S]
    # A label may be reached from two states back when it is not a repeat of the label there (nor a blank).
    previous = jnp.concatenate([jnp.full((batch, 2), -1, jnp.int32), extended[:, :-2]], axis=1)
    skip = (extended != blank) & (extended != previous)
    emit = jnp.take_along_axis(log_probs, jnp.broadcast_to(extended[:, None, :], (batch, frames, states)),
                               axis=2)  # [B, T, S]
    never = jnp.float32(LOG_ZERO)
    alpha = jnp.full((batch, states), never).at[:, :2].set(emit[:, 0, :2])

    def frame(alpha, inputs):
        emit_t, real_t = inputs
        one = jnp.concatenate([jnp.full((batch, 1), never), alpha[:, :-1]], axis=1)
        two = jnp.where(skip, jnp.concatenate([jnp.full((batch, 2), never), alpha[:, :-2]], axis=1), never)
        top = jnp.maximum(jnp.maximum(alpha, one), two)
        total = top + jnp.log(jnp.exp(alpha - top) + jnp.exp(one - top) + jnp.exp(two - top))
        return jnp.where(real_t[:, None], total + emit_t, alpha), None

    alpha, _ = jax.lax.scan(frame, alpha, (jnp.moveaxis(emit, 1, 0)[1:], jnp.moveaxis(frame_mask, 1, 0)[1:]))
    last = jnp.take_along_axis(alpha, (2 * lengths)[:, None], axis=1)[:, 0]  # ends in the final blank
    label = jnp.take_along_axis(alpha, jnp.maximum(2 * lengths - 1, 0)[:, None], axis=1)[:, 0]  # or the last label
    log_likelihood = jnp.where(lengths > 0, jnp.logaddexp(last, label), last)
    return log_likelihood + jnp.sum(shift, axis=1)


def ctc_loss_terms(logits: jax.Array, frame_mask: jax.Array, targets: jax.Array, rows: jax.Array,
                   head: CTCHeadConfig) -> tuple[jax.Array, jax.Array]:
    """The CTC loss of a batch as a sum over its `rows` and the count that sum is averaged over.

    Args:
        logits: [B, S, V] the CTC head's output (any float dtype; computed in float32).
        frame_mask: [B, S] bool, the encoder's real frames.
        targets: [B, U] label ids, -100 padding (right).
        rows: [B] bool, the utterances that count (rows of a batch that only fill it count for nothing).
        head: the blank, the reduction and `zero_infinity`.

    Returns:
        (sum over rows of each utterance's loss, divided by its target length when the reduction is "mean";
        the number of rows counted when it is "mean", else 1).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_row = -ctc_log_likelihood(log_probs, frame_mask, targets, head.blank_id)
    lengths = jnp.sum(targets != IGNORE_INDEX, axis=1)
    per_row = jnp.where(alignable(targets, jnp.sum(frame_mask, axis=1)), per_row,
                        0.0 if head.zero_infinity else jnp.inf)
    if head.loss_reduction == "mean":
        per_row = per_row / jnp.maximum(lengths, 1).astype(jnp.float32)
        count = jnp.sum(rows).astype(jnp.float32)
    else:
        count = jnp.ones((), jnp.float32)
    return jnp.sum(jnp.where(rows, per_row, 0.0)), count


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decoding_log_probs(logits: jax.Array, frame_mask: jax.Array, blank: int) -> jax.Array:
    """[B, S, V] float32 CTC log-probabilities for decoding: log 0 as `LOG_ZERO`, and the frames past each
    utterance's length certain blanks."""
    log_probs = jnp.maximum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), LOG_ZERO)
    padding = jnp.where(jnp.arange(log_probs.shape[-1]) == blank, 0.0, LOG_ZERO).astype(jnp.float32)
    return jnp.where(frame_mask[:, :, None], log_probs, padding)


@jax.jit
def best_path(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each frame's most likely label [B, S] and its log-probability [B, S] (CTC best-path decoding)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.argmax(log_probs, axis=-1), jnp.max(log_probs, axis=-1)


@jax.jit
def label_log_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The log-probabilities [B, S, U] of the labels [B, U] at every frame (what a forced alignment reads), without
    moving the whole [B, S, V] off the device."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, jnp.broadcast_to(labels[:, None, :], (*log_probs.shape[:2], labels.shape[1])),
                               axis=2)


@flax.struct.dataclass
class PrefixState:
    """The CTC state of N running hypotheses.

    Attributes:
        r: [N, T, 2] log r^n_t and r^b_t of each hypothesis.
        psi: [N] log prefix probability (0 for the empty prefix).
        last: [N] int32 the last CTC label, -1 when there is none yet.
    """

    r: jax.Array
    psi: jax.Array
    last: jax.Array


@flax.struct.dataclass
class Extensions:
    """The CTC states of each hypothesis extended by each of its P candidates."""

    tokens: jax.Array  # [N, P] int32 candidate tokens
    r: jax.Array  # [N, P, T, 2]
    psi: jax.Array  # [N, P]


@flax.struct.dataclass
class JointScorer:
    """CTC prefix scores for a beam search over B utterances x K beams (rows b * K + k).

    Attributes:
        log_probs: [B, T, V] from `decoding_log_probs` (shared by an utterance's beams, never repeated).
        weight: [] float32 lambda: a step scores (1 - lambda) attention + lambda (psi(gc) - psi(g)).
        beams: K.
        pre_beam: P, the candidates per hypothesis given a CTC score: the P best by attention score (the others
            cannot be chosen), or every token (P = V).
        blank, eos_ids, neutral_ids: the blank label, the end tokens and the CTC-neutral tokens.
    """

    log_probs: jax.Array
    weight: jax.Array
    beams: int = flax.struct.field(pytree_node=False)
    pre_beam: int = flax.struct.field(pytree_node=False)
    blank: int = flax.struct.field(pytree_node=False)
    eos_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)
    neutral_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)

    def initial_state(self) -> PrefixState:
        """Every row's state for the empty prefix: no path has emitted a label (r^n = log 0), blanks only."""
        blanks = jnp.cumsum(self.log_probs[:, :, self.blank], axis=1)  # [B, T]
        blanks = jnp.repeat(blanks, self.beams, axis=0)  # [N, T]
        r = jnp.stack([jnp.full_like(blanks, LOG_ZERO), blanks], axis=-1)
        rows = blanks.shape[0]
        return PrefixState(r, jnp.zeros((rows,), jnp.float32), jnp.full((rows,), -1, jnp.int32))

    def score(self, attention: jax.Array, state: PrefixState, step: jax.Array) -> tuple[jax.Array, Extensions]:
        """The joint step scores [N, V] of every continuation (-inf outside each row's pre-beam, and where the
        attention score is -inf: a processor forbade it), and the candidates' CTC states. `step`: tokens generated
        so far."""
        rows, vocab = attention.shape
        if self.pre_beam < vocab:
            _, tokens = jax.lax.top_k(attention, self.pre_beam)  # [N, P]
        else:
            tokens = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (rows, vocab))
        tokens = tokens.astype(jnp.int32)
        ext = self.extend(state, tokens)
        delta = ext.psi - state.psi[:, None]  # [N, P]
        forced = jnp.sum(attention > -jnp.inf, axis=1) == 1  # [N]: a processor left one token
        placed = (step == 0) | forced[:, None]
        delta = jnp.where(_isin(tokens, self.neutral_ids) & ~placed, LOG_ZERO, delta)
        picked = jnp.take_along_axis(attention, tokens, axis=1)
        joint = jnp.where(picked == -jnp.inf, -jnp.inf, (1.0 - self.weight) * picked + self.weight * delta)
        full = jnp.full((rows, vocab), -jnp.inf, jnp.float32).at[jnp.arange(rows)[:, None], tokens].set(joint)
        return full, ext

    def extend(self, state: PrefixState, tokens: jax.Array) -> Extensions:
        """psi and the forward variables of every row's hypothesis extended by each of its `tokens` [N, P]."""
        rows, _ = tokens.shape
        utterance = jnp.arange(rows) // self.beams
        x = self.log_probs[utterance[:, None, None], jnp.arange(self.log_probs.shape[1])[None, :, None],
                           tokens[:, None, :]]  # [N, T, P]
        x_blank = self.log_probs[utterance, :, self.blank]  # [N, T]
        r_n, r_b = state.r[..., 0], state.r[..., 1]  # [N, T]
        whole = jnp.logaddexp(r_n, r_b)
        phi = jnp.where(tokens[:, None, :] == state.last[:, None, None], r_b[:, :, None], whole[:, :, None])
        start = jnp.where(state.last == -1, 0.0, LOG_ZERO).astype(jnp.float32)  # phi_{-1}
        phi_before = jnp.concatenate([jnp.broadcast_to(start[:, None, None], (rows, 1, tokens.shape[1])),
                                      phi[:, :-1]], axis=1)  # [N, T, P]: phi_{t-1}
        psi = jax.nn.logsumexp(phi_before + x, axis=1)  # [N, P]

        def frame(carry, inputs):
            prev_n, prev_b = carry
            phi_t, x_t, blank_t = inputs
            new_n = jnp.logaddexp(prev_n, phi_t) + x_t
            new_b = jnp.logaddexp(prev_n, prev_b) + blank_t[:, None]
            return (new_n, new_b), jnp.stack([new_n, new_b], axis=-1)

        zero = jnp.full(tokens.shape, LOG_ZERO, jnp.float32)
        _, r = jax.lax.scan(frame, (zero, zero), (jnp.moveaxis(phi_before, 1, 0), jnp.moveaxis(x, 1, 0),
                                                  jnp.moveaxis(x_blank, 1, 0)))  # [T, N, P, 2]
        r = jnp.moveaxis(r, 0, 2)  # [N, P, T, 2]
        neutral = _isin(tokens, self.neutral_ids)
        ends = _isin(tokens, self.eos_ids)
        psi = jnp.where(tokens == self.blank, LOG_ZERO, psi)
        psi = jnp.where(ends, whole[:, -1:], psi)
        psi = jnp.where(neutral, state.psi[:, None], psi)
        r = jnp.where(neutral[:, :, None, None], state.r[:, None], r)
        return Extensions(tokens, r, psi)

    def select(self, ext: Extensions, state: PrefixState, rows: jax.Array, tokens: jax.Array) -> PrefixState:
        """The states of the hypotheses that go on: row `rows[m]` extended by `tokens[m]` (one of its candidates)."""
        position = jnp.argmax(ext.tokens[rows] == tokens[:, None], axis=1)  # [M]
        neutral = _isin(tokens, self.neutral_ids)
        last = jnp.where(neutral, state.last[rows], tokens)
        return PrefixState(ext.r[rows, position], ext.psi[rows, position], last)


def _isin(tokens: jax.Array, ids: Sequence[int]) -> jax.Array:
    if not ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(ids, jnp.int32))
