"""Log-mel filterbank features as transformers' `SeamlessM4TFeatureExtractor` computes them (w2v-BERT's input), in
numpy: no torch or torchaudio.

Per utterance: the waveform scaled to 16-bit integers (x 2^15), cut into 25 ms frames every 10 ms (400 and 160
samples, no centring), each frame's mean removed, pre-emphasised (0.97), weighted by a Povey window, its 512-point
power spectrum taken through Kaldi's triangular mel filters (`num_mel_bins` filters from 20 Hz to Nyquist,
triangular in mel space), floored at float32's epsilon and logged; then every bin normalised to zero mean and unit
variance over the utterance's frames (unbiased variance, + 1e-7). A batch is padded with `padding_value` to the
longest utterance rounded up to an even number of frames, cut to a multiple of `stride`, and each run of `stride`
frames stacked into one input of `num_mel_bins * stride` values; stacked frame j is real when frame
`stride * j + 1` is (transformers' attention mask keeps every `stride`-th entry from the second).

The arithmetic follows transformers' (float64 spectra rounded through complex64, float32 log-mel and float32
normalisation), so the features agree with transformers' to rounding (the goldens hold its outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FRAME_LENGTH = 400  # samples per analysis frame (25 ms at 16 kHz)
HOP_LENGTH = 160  # samples between frames (10 ms at 16 kHz)
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MIN_FREQUENCY = 20.0
MEL_FLOOR = float(np.finfo(np.float32).eps)
NORM_EPS = 1e-7
# transformers' extractor pads every batch to an even number of frames before stacking.
PAD_TO_MULTIPLE = 2
INT16_SCALE = 2.0 ** 15


def frames_of(samples: int) -> int:
    """Analysis frames of `samples` samples (0 when shorter than one frame)."""
    return 0 if samples < FRAME_LENGTH else 1 + (samples - FRAME_LENGTH) // HOP_LENGTH


def stacked_frames(samples: int, stride: int) -> int:
    """The stacked input frames of a batch padded to `samples` samples (even frames, cut to whole strides)."""
    padded = -(-frames_of(samples) // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    return padded // stride


def min_samples(frames: int) -> int:
    """The fewest samples that make `frames` analysis frames."""
    return FRAME_LENGTH + HOP_LENGTH * (max(frames, 1) - 1)


def _kaldi_mel(hertz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hertz, np.float64) / 700.0)


def mel_filters(num_mel_bins: int, sampling_rate: int) -> np.ndarray:
    """Kaldi's filterbank [FFT_LENGTH // 2 + 1, num_mel_bins] float64: triangles spaced evenly in Kaldi's mel scale
    from MIN_FREQUENCY to `sampling_rate // 2`, each rising from its left neighbour's centre to its own and falling
    to its right neighbour's, drawn over the FFT bins' mel positions."""
    edges = np.linspace(_kaldi_mel(MIN_FREQUENCY), _kaldi_mel(sampling_rate // 2), num_mel_bins + 2)  # [M + 2]
    bins = _kaldi_mel(np.arange(FFT_LENGTH // 2 + 1) * (sampling_rate / FFT_LENGTH))[:, None]  # [K, 1]
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bins - left) / (centre - left)
    falling = (right - bins) / (right - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def povey_window() -> np.ndarray:
    """Kaldi's Povey window: a symmetric Hann window to the power 0.85, [FRAME_LENGTH] float64."""
    return np.hanning(FRAME_LENGTH) ** 0.85


def log_mel(waveform: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Log-mel frames [T, num_mel_bins] float32 of one mono waveform [N] in [-1, 1] (N >= FRAME_LENGTH)."""
    samples = np.asarray(waveform, np.float32).astype(np.float64) * INT16_SCALE
    frames = np.lib.stride_tricks.sliding_window_view(samples, FRAME_LENGTH)[::HOP_LENGTH]  # [T, L]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = np.empty_like(frames)
    emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
    emphasised[:, 0] = frames[:, 0] * (1.0 - PREEMPHASIS)
    # transformers keeps the spectrum in complex64 before taking its magnitude in float64.
    spectrum = np.fft.rfft(emphasised * povey_window(), n=FFT_LENGTH).astype(np.complex64)  # [T, K]
    power = np.abs(spectrum.astype(np.complex128)) ** 2
    return np.log(np.maximum(MEL_FLOOR, power @ filters)).astype(np.float32)  # [T, M]


def normalise_bins(features: np.ndarray) -> np.ndarray:
    """Each mel bin to zero mean and unit variance over the frames (unbiased variance), in float32."""
    return (features - features.mean(0, keepdims=True)) / np.sqrt(features.var(0, ddof=1, keepdims=True) + NORM_EPS)


def batch_features(waveforms: Sequence[np.ndarray], num_mel_bins: int, stride: int, padding_value: float,
                   sampling_rate: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A batch of stacked, normalised log-mel frames and its mask, as `SeamlessM4TFeatureExtractor` pads it.

    Args:
        waveforms: mono waveforms in [-1, 1], each at least `min_samples(2)` samples long.
        num_mel_bins, stride, padding_value, sampling_rate: the extractor's settings.
        length: pad as if the longest utterance had this many samples (a fixed shape per length bucket), as
            transformers' `padding="max_length"` with that many frames; None pads to the longest.

    Returns:
        (input_features [B, S, num_mel_bins * stride] float32, attention_mask [B, S] int32).
    """
    filters = mel_filters(num_mel_bins, sampling_rate)
    per_utterance = [normalise_bins(log_mel(w, filters)) for w in waveforms]
    longest = max(len(f) for f in per_utterance)
    if length is not None:
        longest = max(longest, frames_of(length))
    padded = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    kept = padded - padded % stride  # stacked_frames(length) * stride when `length` is the longest
    features = np.full((len(waveforms), padded, num_mel_bins), padding_value, np.float32)
    mask = np.zeros((len(waveforms), padded), np.int32)
    for row, f in enumerate(per_utterance):
        features[row, :len(f)] = f
        mask[row, :len(f)] = 1
    stacked = features[:, :kept].reshape(len(waveforms), kept // stride, num_mel_bins * stride)
    return stacked, np.ascontiguousarray(mask[:, 1:kept:stride])
