"""SpecAugment masks for training, computed on the host with numpy as transformers computes them.

`compute_mask_indices` is transformers' `_compute_mask_indices` (wav2vec2 and its family): spans of
`mask_length` frames (or channels) start at distinct random positions; their number is
`int(mask_prob * length / mask_length + epsilon)` with one uniform `epsilon` per call (probabilistic rounding),
at least `min_masks`, and no more than fit. transformers draws from numpy's legacy global RNG; here the caller
passes a `np.random.RandomState`, and the draws are the same calls in the same order, so that
`np.random.seed(s)` before transformers' code and `RandomState(s)` here give the same masks.

`spec_augment_masks` does what transformers' encoder does in training: the time mask over each utterance's
frames (`mask_time_*`), then the channel mask (`mask_feature_*`), none when `apply_spec_augment` is False. The
masks go to the encoder as `mask_time_indices` [B, S] and `mask_feature_indices` [B, C] (DESIGN.md, Training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from convert.base.errors import UnsupportedConfig


def compute_mask_indices(shape: tuple[int, int], mask_prob: float, mask_length: int, rng: np.random.RandomState,
                         lengths: Sequence[int] | np.ndarray | None = None, min_masks: int = 0) -> np.ndarray:
    """Random spans to mask along the second axis of `shape`, transformers' algorithm and RNG calls.

    Args:
        shape: (B, L), the batch and the length of the masked axis.
        mask_prob: the fraction of the axis to mask (an upper bound: spans may overlap).
        mask_length: frames (or channels) per span.
        rng: the random state; one `rand(1)` and then one `choice` per row are drawn from it.
        lengths: [B] real lengths of right-padded rows (spans stay inside them), or None for L.
        min_masks: the fewest spans per row, as far as they fit.

    Returns:
        [B, L] bool, True where masked.

    Raises:
        ValueError: `mask_length` is below 1 or longer than L.
    """
    batch, sequence_length = shape
    if mask_length < 1:
        raise ValueError(f"mask_length={mask_length} must be at least 1")
    if mask_length > sequence_length:
        raise ValueError(f"mask_length={mask_length} is longer than the masked axis ({sequence_length})")
    epsilon = rng.rand(1).item()

    def num_spans(length: int) -> int:
        n = max(int(mask_prob * length / mask_length + epsilon), min_masks)
        if n * mask_length > sequence_length:
            n = sequence_length // mask_length
        return max(length - (mask_length - 1), 0) if length - (mask_length - 1) < n else n

    rows = [sequence_length] * batch if lengths is None else [int(n) for n in lengths]
    mask = np.zeros((batch, sequence_length), dtype=bool)
    most = num_spans(sequence_length)
    if most == 0:
        return mask
    starts = []
    for length in rows:
        n = num_spans(length)
        chosen = rng.choice(np.arange(length - (mask_length - 1)), n, replace=False)
        # Rows with fewer spans repeat their first start (or, with none, the last frame, which is padding then)
        # so that every row has `most` starts.
        filler = sequence_length - 1 if len(chosen) == 0 else chosen[0]
        starts.append(np.concatenate([chosen, np.full(most - n, filler, dtype=np.int32)]))
    spans = np.array(starts)[:, :, None] + np.arange(mask_length)[None, None, :]  # [B, most, mask_length]
    spans = np.minimum(spans.reshape(batch, most * mask_length), sequence_length - 1)
    np.put_along_axis(mask, spans, True, axis=-1)
    return mask


def spec_augment_masks(encoder_config: Any, attention_mask_or_lengths: Any, num_frames: int,
                       rng: np.random.RandomState, batch_size: int | None = None
                       ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The time and channel masks transformers' encoder would draw in a training step.

    Args:
        encoder_config: an encoder config with SpecAugment's fields (`apply_spec_augment`, `mask_time_prob`,
            `mask_time_length`, `mask_time_min_masks`, `mask_feature_*`), `hidden_size` and `output_lengths`.
        attention_mask_or_lengths: the [B, N] sample-level padding mask, or [B] sample counts, or None when
            nothing is padded (then `batch_size` is needed).
        num_frames: S, the frames the conv feature encoder makes of the padded batch.
        rng: numpy's random state; the draws match transformers' calls on the global RNG.
        batch_size: B, when `attention_mask_or_lengths` is None.

    Returns:
        (mask_time_indices [B, S] bool or None, mask_feature_indices [B, hidden_size] bool or None): None where
        the config's probability is 0 or `apply_spec_augment` is False.

    Raises:
        UnsupportedConfig: a span longer than the axis it masks.
    """
    c = encoder_config
    if not getattr(c, "apply_spec_augment", True):
        return None, None
    samples = None
    if attention_mask_or_lengths is not None:
        samples = np.asarray(attention_mask_or_lengths)
        samples = samples.sum(-1) if samples.ndim == 2 else samples
        batch_size = len(samples)
    if batch_size is None:
        raise ValueError("spec_augment_masks: pass batch_size when there is no attention mask")
    time_mask = feature_mask = None
    if c.mask_time_prob > 0:
        lengths = None
        # transformers' model passes its frame mask to SpecAugment (HuBERT's does not: masks span the padding).
        if samples is not None and getattr(c, "SPEC_AUGMENT_USES_LENGTHS", True):
            lengths = c.output_lengths(samples.astype(np.int64), add_adapter=False)
        _check_fits(c, "mask_time_length", num_frames, "frames")
        time_mask = compute_mask_indices((batch_size, num_frames), c.mask_time_prob, c.mask_time_length, rng,
                                         lengths, c.mask_time_min_masks)
    if c.mask_feature_prob > 0:
        _check_fits(c, "mask_feature_length", c.hidden_size, "channels (hidden_size)")
        feature_mask = compute_mask_indices((batch_size, c.hidden_size), c.mask_feature_prob, c.mask_feature_length,
                                            rng, None, getattr(c, "mask_feature_min_masks", 0))
    return time_mask, feature_mask


def _check_fits(config: Any, field: str, axis: int, what: str) -> None:
    value = getattr(config, field)
    if value > axis:
        raise UnsupportedConfig(f"{field}={value} is longer than the {axis} {what} to mask")
