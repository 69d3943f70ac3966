"""Reading WAV files and preparing waveforms the way the encoder's feature extractor (HF's
`Wav2Vec2FeatureExtractor`) does: mono float samples at the model's rate, normalised to zero mean and unit
variance, padded into a batch.

Accepted: RIFF/WAVE files with integer PCM samples of 8, 16, 24 or 32 bits (read with the stdlib `wave`
module) or IEEE float samples of 32 or 64 bits (format 3, and WAVE_FORMAT_EXTENSIBLE with either subformat,
which `wave` refuses: their header is parsed here). Integer samples are scaled to [-1, 1) as soundfile does
(divided by 2 ** (bits - 1); 8-bit samples are unsigned around 128). Several channels are averaged into one,
as HF's ffmpeg-based pipelines downmix. Files at another sample rate are refused (there is no resampler
here): convert them first, e.g. `ffmpeg -i in.wav -ac 1 -ar 16000 out.wav`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConvertError

PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_SAMPLE_RATE = 16000
# HF's Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance.
NORM_EPS = 1e-7

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
# The first two bytes of a WAVE_FORMAT_EXTENSIBLE SubFormat GUID are the format code; the rest is fixed.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


class AudioError(ConvertError):
    """An audio file that is missing, not a WAV file, or in a form this toolkit does not read."""


@dataclasses.dataclass(frozen=True)
class FeatureExtractorConfig:
    """The fields of HF's `preprocessor_config.json` that change the waveform the encoder sees.

    Attributes:
        sampling_rate: the rate the model was trained at (Hz).
        do_normalize: normalise each utterance to zero mean and unit variance.
        return_attention_mask: pass the padding mask to the model. When False (wav2vec2-base's group-norm
            models), HF normalises each padded row whole and the model gets no mask.
        padding_value: what padding samples hold.
    """

    sampling_rate: int = DEFAULT_SAMPLE_RATE
    do_normalize: bool = True
    return_attention_mask: bool = True
    padding_value: float = 0.0


def feature_extractor_config(directory: str | Path, encoder_config: Any | None = None) -> FeatureExtractorConfig:
    """Reads `preprocessor_config.json` from a model directory, or gives wav2vec2's defaults without one.

    Without the file: 16 kHz, normalised, and the attention mask only for layer-norm feature encoders (HF's
    convention: group-norm models such as wav2vec2-base are run without one).

    Raises:
        AudioError: a preprocessor config that is not valid JSON or asks for what is not implemented.
    """
    path = Path(directory) / PREPROCESSOR_FILE
    group_norm = getattr(encoder_config, "feat_extract_norm", "layer") == "group"
    defaults = FeatureExtractorConfig(return_attention_mask=not group_norm)
    if not path.is_file():
        return defaults
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AudioError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise AudioError(f"{path}: expected a JSON object")
    if data.get("feature_size", 1) != 1:
        raise AudioError(f"{path}: feature_size={data['feature_size']} is not supported (raw waveforms have 1)")
    if data.get("padding_side", "right") != "right":
        raise AudioError(f"{path}: padding_side={data['padding_side']!r} is not supported (only 'right')")
    return FeatureExtractorConfig(
        sampling_rate=int(data.get("sampling_rate", defaults.sampling_rate)),
        do_normalize=bool(data.get("do_normalize", defaults.do_normalize)),
        return_attention_mask=bool(data.get("return_attention_mask", defaults.return_attention_mask)),
        padding_value=float(data.get("padding_value", defaults.padding_value)),
    )


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Reads a WAV file.

    Returns:
        (samples [N] float32 in [-1, 1], channels averaged; the sample rate in Hz).

    Raises:
        AudioError: one line naming the file: missing, not RIFF/WAVE, an unsupported encoding, or no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt, payload = _riff_chunks(path, data)
    code, channels, rate, bits = fmt
    if code == _PCM:
        if bits not in (8, 16, 24, 32):
            raise AudioError(f"{path}: {bits}-bit PCM is not supported (8, 16, 24 or 32 bits)")
        samples = _read_pcm(path)
        if samples is None:  # `wave` refused the header (WAVE_FORMAT_EXTENSIBLE before Python 3.12)
            samples = _frames(_decode_pcm(payload, bits), channels)
    elif code == _FLOAT:
        if bits not in (32, 64):
            raise AudioError(f"{path}: {bits}-bit float samples are not supported (32 or 64 bits)")
        width = bits // 8
        samples = _frames(np.frombuffer(payload[:len(payload) - len(payload) % width], f"<f{width}"), channels)
    else:
        raise AudioError(f"{path}: WAV format code {code:#06x} is not supported (integer PCM or IEEE float only)")
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return mono.astype(np.float32), rate


def _riff_chunks(path: Path, data: bytes) -> tuple[tuple[int, int, int, int], bytes]:
    """The `fmt ` fields (format code, channels, rate, bits) and the `data` chunk's bytes."""
    fmt = payload = None
    at = 12
    while at + 8 <= len(data):
        chunk_id, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        body = data[at + 8:at + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{path}: truncated WAV fmt chunk")
            code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if code == _EXTENSIBLE:
                if len(body) < 40 or body[26:40] != _GUID_TAIL:
                    raise AudioError(f"{path}: WAVE_FORMAT_EXTENSIBLE with an unknown subformat is not supported")
                code = struct.unpack("<H", body[24:26])[0]
            fmt = (code, channels, rate, bits)
        elif chunk_id == b"data":
            payload = body
            if fmt is not None:
                break
        at += 8 + size + (size & 1)  # chunks are padded to an even size
    if fmt is None:
        raise AudioError(f"{path}: not a valid WAV file (no fmt chunk)")
    if payload is None:
        raise AudioError(f"{path}: not a valid WAV file (no data chunk)")
    if fmt[1] < 1 or fmt[2] < 1:
        raise AudioError(f"{path}: not a valid WAV file ({fmt[1]} channels at {fmt[2]} Hz)")
    return fmt, payload


def _read_pcm(path: Path) -> np.ndarray | None:
    """Integer PCM through the stdlib `wave` module: [frames, channels] float32 (None if `wave` refuses it,
    e.g. WAVE_FORMAT_EXTENSIBLE before Python 3.12; the caller decodes the raw chunk then)."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, frames = f.getnchannels(), f.getsampwidth(), f.readframes(f.getnframes())
    except (wave.Error, EOFError):
        return None
    return _frames(_decode_pcm(frames, 8 * width), channels)


def _decode_pcm(raw: bytes, bits: int) -> np.ndarray:
    """Little-endian integer PCM bytes -> float32 in [-1, 1)."""
    width = bits // 8
    raw = raw[:len(raw) - len(raw) % width]
    if bits == 8:  # unsigned, centred on 128
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 24:  # three bytes: widen to int32 through the top three bytes, keeping the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        values = (b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8
        return values.astype(np.float32) / float(1 << 23)
    values = np.frombuffer(raw, f"<i{width}")
    return (values.astype(np.float64) / float(1 << (bits - 1))).astype(np.float32)


def _frames(samples: np.ndarray, channels: int) -> np.ndarray:
    usable = samples.shape[0] - samples.shape[0] % channels
    return np.asarray(samples[:usable], np.float32).reshape(-1, channels)  # [frames, channels]


def load_audio(path: str | Path, sampling_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """A mono waveform [N] float32 from a WAV file at `sampling_rate`.

    Raises:
        AudioError: as `read_wav`, and for a file at another sample rate.
    """
    samples, rate = read_wav(path)
    if rate != sampling_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz, but the model expects {sampling_rate} Hz (resample it "
                         f"first, e.g. ffmpeg -i {Path(path).name} -ac 1 -ar {sampling_rate} out.wav)")
    return samples


def zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-7), HF's normalisation of one utterance (computed in float64)."""
    x = np.asarray(x, np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPS)).astype(np.float32)


def prepare_batch(waveforms: Sequence[np.ndarray],
                  config: FeatureExtractorConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Pads waveforms into a batch and normalises them as HF's `Wav2Vec2FeatureExtractor` does.

    With `return_attention_mask`, each utterance is normalised over its own samples and its padding holds
    `padding_value`; without it, each padded row is normalised whole and no mask is returned.

    Returns:
        (inputs [B, N] float32, attention_mask [B, N] int32 or None).
    """
    if not waveforms:
        raise ValueError("no waveforms")
    width = max(len(w) for w in waveforms)
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
