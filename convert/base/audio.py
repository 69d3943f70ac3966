"""Audio files to encoder inputs: read with soundfile, averaged to mono, resampled with soxr, normalised as HF does.

`read_audio` reads anything libsndfile reads (WAV incl. float and WAVE_FORMAT_EXTENSIBLE, FLAC, OGG/Vorbis, MP3,
AIFF, ...). Integer PCM is scaled as soundfile scales it, by 1 / 2 ** (bits - 1) (8-bit WAV is unsigned around
128); float samples are kept as stored. Channels are averaged into one, as HF's ffmpeg-based pipelines downmix.
`load_audio` resamples other rates to the model's with soxr at quality "HQ" (see `RESAMPLE_QUALITY`), and
`prepare_batch` turns waveforms into the encoder's inputs as the model's feature extractor does: HF's
`Wav2Vec2FeatureExtractor` (normalised, padded waveforms) for encoders that read audio, `SeamlessM4TFeatureExtractor`
(`convert.base.fbank`: stacked log-mel frames) for those that read features. Every problem with a file (missing,
not audio, a corrupt header, truncated, no samples, NaN or infinite samples) is an `AudioError` of one line naming
the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from convert.base import fbank
from convert.base.errors import ConvertError

PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_SAMPLE_RATE = 16000
# HF's Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance.
NORM_EPS = 1e-7
# soxr's "HQ" (20-bit precision, passband to 91% of Nyquist, linear phase) is soxr's default and librosa's
# (`librosa.resample(..., res_type="soxr_hq")`, what HF speech data pipelines commonly resample with), so the
# model sees what it was most likely fine-tuned on; 20 bits is beyond what 16-bit speech holds, and "VHQ"
# (28 bits) costs more time for no difference the model can see.
RESAMPLE_QUALITY = "HQ"
# A rate this low holds no speech: a header that claims one is corrupt, and resampling a few hertz to 16 kHz
# would multiply the samples by thousands.
MIN_SAMPLE_RATE = 1000
# The highest rate audio is commonly stored at: a model said to run at more is a corrupt config, whose resampling
# would ask for more memory than any machine has.
MAX_SAMPLE_RATE = 768_000
# Samples (all channels) decoded at a time, so that a header claiming a huge length or channel count
# allocates no more than the data it really holds.
_BLOCK_SAMPLES = 1 << 20
# Bytes per sample of the encodings whose frames tile a WAV's data chunk exactly (libsndfile's subtypes): a data
# chunk of these holds size // (channels * width) frames.
_FIXED_WIDTHS = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                 "ULAW": 1, "ALAW": 1}
# A WAV data size that means "to the end of the file" (streamed writers that cannot seek back), not a length.
_UNKNOWN_SIZE = 0xFFFFFFFF
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class AudioError(ConvertError):
    """An audio file that is missing, unreadable, empty, holds NaN or infinite samples, or is otherwise unusable."""


# HF's feature extractors by `feature_extractor_type`, and the encoder input each makes.
WAVEFORM, FBANK = "Wav2Vec2FeatureExtractor", "SeamlessM4TFeatureExtractor"
EXTRACTORS = {WAVEFORM: "waveform", FBANK: "features"}
@dataclasses.dataclass(frozen=True, eq=False)
class AudioBytes:
    """An audio file's bytes held in memory (e.g. a 🤗 datasets row), read like a file: `name` stands for its path
    in messages."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name


AudioSource = str | Path | AudioBytes


def _opened(source: AudioSource) -> tuple[Any, Path | AudioBytes]:
    """What soundfile opens (a path, or the bytes as a file), and what messages name."""
    if isinstance(source, AudioBytes):
        return io.BytesIO(source.data), source
    path = Path(source)
    _check_is_file(path)
    return str(path), path


@dataclasses.dataclass(frozen=True)
class FeatureExtractorConfig:
    """The fields of HF's `preprocessor_config.json` that change what the encoder sees.

    Attributes:
        sampling_rate: the rate the model was trained at (Hz).
        do_normalize: normalise each utterance to zero mean and unit variance (waveforms; log-mel features are
            always normalised per mel bin, as `SeamlessM4TFeatureExtractor` does by default).
        return_attention_mask: pass the padding mask to the model. When False (group-norm feature encoders, by
            HF's convention), HF normalises each padded row whole and the model gets no mask.
        padding_value: what padding samples (or padded feature frames) hold.
        extractor: HF's `feature_extractor_type`: `Wav2Vec2FeatureExtractor` (waveforms) or
            `SeamlessM4TFeatureExtractor` (stacked log-mel frames, `convert.base.fbank`).
        num_mel_bins: mel filters of the log-mel extractor.
        stride: frames the log-mel extractor stacks into one input.
    """

    sampling_rate: int = DEFAULT_SAMPLE_RATE
    do_normalize: bool = True
    return_attention_mask: bool = True
    padding_value: float = 0.0
    extractor: str = WAVEFORM
    num_mel_bins: int = 80
    stride: int = 2

    @property
    def makes(self) -> str:
        """The encoder input this extractor makes: "waveform" or "features" (`EncoderConfig.input_kind`)."""
        return EXTRACTORS[self.extractor]

    def input_length(self, samples: int) -> int:
        """The encoder input steps of a batch padded to `samples` samples: the samples, or the stacked frames."""
        return samples if self.makes == "waveform" else fbank.stacked_frames(samples, self.stride)

    def min_samples(self, encoder_config: Any) -> int:
        """The fewest audio samples that give the encoder `min_input_length` input steps (one frame of output)."""
        steps = encoder_config.min_input_length
        if self.makes == "waveform":
            return steps
        # Stacked frame j is real when analysis frame stride * j + 1 is: at least two frames, and whole strides.
        return fbank.min_samples(max(2, self.stride * steps))


def default_feature_extractor(encoder_config: Any | None = None) -> FeatureExtractorConfig:
    """HF's feature-extractor defaults for an encoder (a model without `preprocessor_config.json`): the extractor its
    input kind needs, 16 kHz, normalised, and for waveforms the attention mask only for layer-norm feature encoders
    (HF's convention, `EncoderConfig.returns_attention_mask`: group-norm feature encoders are run without one)."""
    kind = getattr(encoder_config, "input_kind", "waveform")
    return FeatureExtractorConfig(return_attention_mask=getattr(encoder_config, "returns_attention_mask", True),
                                  extractor=WAVEFORM if kind == "waveform" else FBANK)


def feature_extractor_config(directory: str | Path, encoder_config: Any | None = None) -> FeatureExtractorConfig:
    """Reads `preprocessor_config.json` from a model directory, or gives HF's feature-extractor defaults.

    Without the file: `default_feature_extractor`. A file's `feature_extractor_type`, when present, must make the
    encoder's kind of input (`EncoderConfig.input_kind`).

    Raises:
        AudioError: a preprocessor config that is not valid JSON, asks for what is not implemented, or does not
            fit the encoder.
    """
    path = Path(directory) / PREPROCESSOR_FILE
    kind = getattr(encoder_config, "input_kind", "waveform")
    defaults = default_feature_extractor(encoder_config)
    data: Mapping[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AudioError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, Mapping):
            raise AudioError(f"{path}: expected a JSON object")
    extractor = data.get("feature_extractor_type", defaults.extractor)
    if extractor not in EXTRACTORS:
        raise AudioError(f"{path}: feature_extractor_type={extractor!r} is not supported (supported: "
                         f"{', '.join(EXTRACTORS)})")
    if encoder_config is not None and EXTRACTORS[extractor] != kind:
        raise AudioError(f"{path}: feature_extractor_type={extractor!r} makes {EXTRACTORS[extractor]} inputs, but the "
                         f"encoder takes {kind}")
    if data.get("padding_side", "right") != "right":
        raise AudioError(f"{path}: padding_side={data['padding_side']!r} is not supported (only 'right')")
    if extractor == WAVEFORM:
        if _number(path, data, "feature_size", 1, 1) != 1:
            raise AudioError(f"{path}: feature_size={data['feature_size']} is not supported (raw waveforms have 1)")
        return FeatureExtractorConfig(
            sampling_rate=_number(path, data, "sampling_rate", defaults.sampling_rate, MIN_SAMPLE_RATE,
                                  high=MAX_SAMPLE_RATE),
            do_normalize=_flag(path, data, "do_normalize", defaults.do_normalize),
            return_attention_mask=_flag(path, data, "return_attention_mask", defaults.return_attention_mask),
            padding_value=_number(path, data, "padding_value", defaults.padding_value, -np.inf, float),
        )
    return _fbank_config(path, data, encoder_config)


def _number(path: Path, data: Mapping[str, Any], name: str, default: Any, low: float, kind: type = int,
            high: float = np.inf) -> Any:
    """`data[name]` (or `default`) checked to be a finite number of `kind` in [low, high]."""
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise AudioError(f"{path}: {name}={json.dumps(value)} is not {'an integer' if kind is int else 'a number'}")
    if not np.isfinite(value) or value < low:
        raise AudioError(f"{path}: {name}={value} must be at least {low:g}")
    if value > high:
        raise AudioError(f"{path}: {name}={value} must be at most {high:g}")
    return kind(value)


def _flag(path: Path, data: Mapping[str, Any], name: str, default: bool) -> bool:
    """`data[name]` (or `default`) checked to be true or false: a string such as "false" is refused, not read
    as true."""
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise AudioError(f"{path}: {name}={json.dumps(value)} is not true or false")
    return value


def _fbank_config(path: Path, data: Mapping[str, Any], encoder_config: Any | None) -> FeatureExtractorConfig:
    """The settings of a `SeamlessM4TFeatureExtractor`, each checked (transformers' defaults where absent)."""
    # transformers pads 2-D features only when feature_size > 1 (it names the mel bins; nothing else reads it).
    _number(path, data, "feature_size", 80, 2)
    config = FeatureExtractorConfig(
        sampling_rate=_number(path, data, "sampling_rate", DEFAULT_SAMPLE_RATE, MIN_SAMPLE_RATE, high=MAX_SAMPLE_RATE),
        return_attention_mask=_flag(path, data, "return_attention_mask", True),
        padding_value=_number(path, data, "padding_value", 0.0, -np.inf, float),
        extractor=FBANK,
        num_mel_bins=_number(path, data, "num_mel_bins", 80, 1),
        # With stride 1, transformers' mask (every stride-th frame from the second) would keep no frame.
        stride=_number(path, data, "stride", 2, 2),
    )
    width = getattr(encoder_config, "input_feature_size", None)
    if width is not None and config.num_mel_bins * config.stride != width:
        raise AudioError(f"{path}: num_mel_bins={config.num_mel_bins} x stride={config.stride} makes "
                         f"{config.num_mel_bins * config.stride} values per frame, but the encoder reads {width} "
                         "(feature_projection_input_dim)")
    return config


def read_audio(path: AudioSource) -> tuple[np.ndarray, int]:
    """Reads an audio file in any format libsndfile reads (WAV incl. float and WAVE_FORMAT_EXTENSIBLE, FLAC,
    OGG/Vorbis, MP3, AIFF, ...) and averages its channels.

    Returns:
        (samples [N] float32, integer PCM scaled to [-1, 1); the file's sample rate in Hz).

    Raises:
        AudioError: one line naming the file: missing, not audio, truncated (a WAV's data chunk or a FLAC's
            STREAMINFO states more frames than the file holds), no samples, or NaN or infinite samples.
    """
    opened, path = _opened(path)
    if Path(str(path)).suffix.lower() == ".raw":  # soundfile would ask for the rate and encoding a headerless file lacks
        raise AudioError(f"{path}: headerless (RAW) audio has no sample rate or encoding to read; convert it to WAV "
                         f"or FLAC first")
    mono, at = [], 0
    try:
        with soundfile.SoundFile(opened) as f:
            rate, channels = f.samplerate, f.channels
            if rate < 1 or channels < 1:
                raise AudioError(f"{path}: not a valid audio file ({channels} channels at {rate} Hz)")
            _refuse_truncated(path, channels, f.subtype, f.frames)
            frames_per_block = max(1, _BLOCK_SAMPLES // channels)
            while (block := f.read(frames_per_block, dtype="float64", always_2d=True)).shape[0]:  # [F, C]
                _refuse_bad_samples(path, np.isfinite(block).all(axis=1), rate, at, "holds NaN or infinite samples")
                # Divided before summing so that no finite float64 sum overflows; a float64 file may still hold
                # samples beyond float32's range, which would turn infinite in the cast.
                average = (block / channels).sum(axis=1)
                _refuse_bad_samples(path, np.abs(average) <= _FLOAT32_MAX, rate, at,
                                    "holds samples beyond float32's range")
                mono.append(average.astype(np.float32))
                at += block.shape[0]
            if f.format == "FLAC" and at < f.frames:  # STREAMINFO's count is exact (MP3's and Vorbis' are not)
                raise AudioError(f"{path}: the file is truncated: its header says {f.frames} frames, the file holds "
                                 f"{at}")
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise AudioError(f"{path}: not an audio file soundfile can read ({_one_line(e)})") from None
    if not at:
        raise AudioError(f"{path}: the file holds no samples")
    return np.concatenate(mono), rate


def load_audio(path: AudioSource, sampling_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """A mono waveform [N] float32 read from an audio file and resampled to `sampling_rate`.

    Resampling is soxr's at `RESAMPLE_QUALITY`; its output has round(N * sampling_rate / rate) samples and
    no delay (the filter is linear phase and soxr compensates for it).

    Raises:
        AudioError: as `read_audio`; a rate below `MIN_SAMPLE_RATE`; too few samples to give one at
            `sampling_rate`.
    """
    samples, rate = read_audio(path)
    if rate == sampling_rate:
        return samples
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is too low to be speech (at least {MIN_SAMPLE_RATE} Hz; "
                         f"is the header corrupt?)")
    resampled = soxr.resample(samples, rate, sampling_rate, quality=RESAMPLE_QUALITY)
    if resampled.shape[0] == 0:
        raise AudioError(f"{path}: {samples.shape[0]} sample(s) at {rate} Hz leave none at {sampling_rate} Hz")
    # The filter overshoots a little: samples at the edge of float32's range could turn infinite.
    _refuse_bad_samples(path, np.isfinite(resampled), sampling_rate, 0, "holds samples beyond float32's range once "
                        "resampled")
    return resampled


def audio_seconds(path: AudioSource) -> float:
    """The duration an audio file's header states, without decoding it (for progress bars).

    For MP3 the length is libsndfile's estimate from the stream headers.

    Raises:
        AudioError: a missing file, one soundfile cannot open, or a truncated WAV (as `read_audio`).
    """
    opened, path = _opened(path)
    try:
        info = soundfile.info(opened)
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise AudioError(f"{path}: not an audio file soundfile can read ({_one_line(e)})") from None
    if info.samplerate < 1:
        raise AudioError(f"{path}: not a valid audio file ({info.channels} channels at {info.samplerate} Hz)")
    _refuse_truncated(path, info.channels, info.subtype, info.frames)
    return info.frames / info.samplerate


def _refuse_truncated(path: Path | AudioBytes, channels: int, subtype: str, frames: int) -> None:
    """Refuses a WAV whose data chunk's stated size holds more frames than the file does (`frames`: libsndfile
    cuts the length to the bytes there and reads the rest as if it were all). Only where the size tiles into
    frames exactly (PCM, float, mu-law, A-law) and states a length (not a streamed writer's 0xFFFFFFFF)."""
    width = _FIXED_WIDTHS.get(subtype)
    if width is None or channels < 1:
        return
    try:
        with (io.BytesIO(path.data) if isinstance(path, AudioBytes) else open(path, "rb")) as handle:
            size = _wav_data_size(handle)
    except OSError as e:
        raise AudioError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if size is not None and size // (channels * width) > frames:
        raise AudioError(f"{path}: the file is truncated: its header says {size // (channels * width)} frames, the "
                         f"file holds {frames}")


def _wav_data_size(handle: Any) -> int | None:
    """The size in bytes a RIFF, RIFX or RF64 WAVE file's header states for its data chunk; None for another
    format, no data chunk, or a size that stands for "to the end of the file". Only the chunk headers are read."""
    head = handle.read(12)
    kind = head[:4]
    if len(head) < 12 or head[8:12] != b"WAVE" or kind not in (b"RIFF", b"RIFX", b"RF64"):
        return None
    order = "big" if kind == b"RIFX" else "little"
    at, ds64 = 12, None
    while True:  # each step moves on by at least 8 bytes, and reading past the end gives fewer than 8
        handle.seek(at)
        chunk = handle.read(8)
        if len(chunk) < 8:
            return None
        size = int.from_bytes(chunk[4:], order)
        if chunk[:4] == b"ds64" and kind == b"RF64":  # RF64's 64-bit sizes: RIFF, data, sample count
            body = handle.read(16)
            ds64 = int.from_bytes(body[8:16], "little") if len(body) == 16 else None
        elif chunk[:4] == b"data":
            if kind == b"RF64" and size == 0xFFFFFFFF:
                return ds64 or None
            return None if size == _UNKNOWN_SIZE else size
        at += 8 + size + (size & 1)  # chunks are padded to an even size


def _check_is_file(path: Path) -> None:
    if path.is_file():
        return
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    raise AudioError(f"{path}: is a directory, not an audio file" if path.is_dir() else f"{path}: not a file")


def _one_line(error: Exception) -> str:
    """soundfile's message without its "Error opening '<path>': " prefix (our message starts with the path),
    folded onto one line: libsndfile's own messages can span several."""
    text = error.error_string if isinstance(error, soundfile.LibsndfileError) else str(error)
    text = " ".join(text.split()).removeprefix("Error : ").rstrip(".")
    return text[:200] or type(error).__name__


def _refuse_bad_samples(path: Path, good: np.ndarray, rate: int, first_frame: int, what: str) -> None:
    """Raises naming the time of the first frame that is not `good` [F] (the block starts at `first_frame`): one
    NaN or infinite sample turns the whole utterance's normalisation, and so its transcript, into NaN without
    any other sign."""
    if good.all():
        return
    frame = first_frame + int(np.argmin(good))
    raise AudioError(f"{path}: {what} at {frame / rate:.2f} s")


def zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-7), HF's normalisation of one utterance (computed in float64)."""
    x = np.asarray(x, np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPS)).astype(np.float32)


def files_batch(paths: Sequence[str | Path], config: FeatureExtractorConfig, encoder_config: Any
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """`prepare_batch` of the audio files `paths` (resampled to `config.sampling_rate`), each checked to give the
    encoder at least one output frame.

    Raises:
        AudioError: an unreadable file, or one too short for the encoder (naming it).
    """
    waveforms = [load_audio(p, config.sampling_rate) for p in paths]
    needed = config.min_samples(encoder_config)
    for path, w in zip(paths, waveforms):
        if len(w) < needed:
            raise AudioError(f"{path}: {len(w)} samples is too short for the encoder (it needs at least {needed})")
    return prepare_batch(waveforms, config)


def prepare_batch(waveforms: Sequence[np.ndarray], config: FeatureExtractorConfig,
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The encoder's inputs for a batch of waveforms, as the model's feature extractor makes them.

    Waveforms (`Wav2Vec2FeatureExtractor`): with `return_attention_mask`, each utterance is normalised over its own
    samples and its padding holds `padding_value`; without it, each padded row is normalised whole and no mask is
    returned. Log-mel features (`SeamlessM4TFeatureExtractor`): `convert.base.fbank.batch_features`.

    Args:
        waveforms: mono waveforms at `config.sampling_rate`.
        config: the feature extractor's settings.
        length: pad as if the longest waveform had this many samples (one shape per length bucket); None pads to
            the longest.

    Returns:
        (inputs [B, N] or [B, S, F] float32, attention_mask [B, N] / [B, S] int32 or None).
    """
    if not waveforms:
        raise ValueError("no waveforms")
    if config.makes == "features":
        inputs, mask = fbank.batch_features(waveforms, config.num_mel_bins, config.stride, config.padding_value,
                                            config.sampling_rate, length)
        return inputs, (mask if config.return_attention_mask else None)
    width = max(length or 0, *(len(w) for w in waveforms))
    inputs = np.full((len(waveforms), width), config.padding_value, np.float32)
    mask = np.zeros((len(waveforms), width), np.int32)
    for i, w in enumerate(waveforms):
        inputs[i, :len(w)] = w
        mask[i, :len(w)] = 1
    if config.do_normalize:
        for i, w in enumerate(waveforms):
            if config.return_attention_mask:
                inputs[i, :len(w)] = zero_mean_unit_var(inputs[i, :len(w)])
            else:
                inputs[i] = zero_mean_unit_var(inputs[i])
    return inputs, (mask if config.return_attention_mask else None)
