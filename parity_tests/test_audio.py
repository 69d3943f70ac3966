"""The audio reader (soundfile + soxr) and the feature extractor's normalisation, checked against independent
computations; plus fuzzing of WAV and FLAC headers with hypothesis: 300 corrupted files (FUZZ_EXAMPLES = 100 for
each of the 3 seed files) must each give an AudioError or a valid waveform, never another exception."""

from __future__ import annotations

import dataclasses
import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.base import audio as audio_io
from convert.base.errors import ConvertError

FUZZ_EXAMPLES = 100  # per seed file; three seed files
# Lossy codecs may pad the stream to whole frames: an MP3 frame is 1152 samples, a Vorbis block at most 2048.
CODEC_PADDING = 2304
# The tail of a WAVE_FORMAT_EXTENSIBLE SubFormat GUID; its first two bytes are the format code.
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


def write_pcm(path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> Path:
    """Integer PCM through the stdlib `wave` module; `samples` [N, channels] integers of that width."""
    data = np.asarray(samples).reshape(-1)
    if width == 1:
        raw = (data + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in data)
    else:
        raw = data.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


def write_wav(path: Path, raw: bytes, code: int, bits: int, rate: int = 16000, channels: int = 1,
              extensible: bool = False) -> Path:
    """A RIFF/WAVE file built byte by byte (the stdlib `wave` writes integer PCM only)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", EXTENSIBLE if extensible else code, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, SubFormat GUID
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", code) + GUID_TAIL
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int = 16000, bits: int = 32,
                    extensible: bool = False) -> Path:
    """IEEE float samples [N] or [N, channels] (format 3, or WAVE_FORMAT_EXTENSIBLE with the float subformat)."""
    samples = np.asarray(samples)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    raw = samples.astype(f"<f{bits // 8}").tobytes()
    return write_wav(path, raw, IEEE_FLOAT, bits, rate, channels, extensible)


def sine(freq: float, rate: int, n: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate)


def assert_refused_in_one_line(path: Path, pattern: str, read=audio_io.read_audio) -> None:
    with pytest.raises(audio_io.AudioError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert pattern in message, message


# ----------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("width", [1, 2, 3, 4], ids=["8bit", "16bit", "24bit", "32bit"])
def test_pcm_wav_is_read_as_scaled_floats(tmp_path, width):
    full = 1 << (8 * width - 1)
    values = np.array([0, 1, -1, full - 1, -full, full // 2, -(full // 3)], np.int64)
    samples, rate = audio_io.read_audio(write_pcm(tmp_path / "a.wav", values, rate=22050, width=width))
    assert rate == 22050 and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, (values / full).astype(np.float32))


@pytest.mark.parametrize("bits,extensible", [(32, False), (64, False), (32, True)],
                         ids=["float32", "float64", "float32-extensible"])
def test_float_wav_is_read_exactly(tmp_path, bits, extensible):
    values = np.array([0.0, 0.5, -0.25, 0.123456, -1.5, 3.0], np.float32)  # beyond [-1, 1] too: never clipped
    samples, _ = audio_io.read_audio(write_float_wav(tmp_path / "f.wav", values, bits=bits, extensible=extensible))
    np.testing.assert_array_equal(samples, values)


def test_extensible_pcm_wav_is_read_as_scaled_floats(tmp_path):
    values = np.array([0, 1, -1, (1 << 23) - 1, -(1 << 23), 12345], np.int64)
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in values)
    samples, _ = audio_io.read_audio(write_wav(tmp_path / "x.wav", raw, PCM, 24, extensible=True))
    np.testing.assert_array_equal(samples, (values / (1 << 23)).astype(np.float32))


@pytest.mark.parametrize("bits", [16, 24])
def test_flac_round_trip_is_exact(tmp_path, bits):
    full = 1 << (bits - 1)
    values = np.random.default_rng(bits).integers(-full, full, 4000).astype(np.int32)
    path = tmp_path / "a.flac"
    # soundfile takes int32 as left-aligned: shift the values into the top bits of the 32-bit word.
    soundfile.write(path, values << (32 - bits), 16000, format="FLAC", subtype=f"PCM_{bits}")
    samples, rate = audio_io.read_audio(path)
    assert rate == 16000
    np.testing.assert_array_equal(samples, (values / full).astype(np.float32))


@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")], ids=["ogg", "mp3"])
def test_lossy_files_are_read_close_to_their_source(tmp_path, fmt, subtype):
    n = 16000
    source = sine(440, 16000, n) + sine(1234, 16000, n, 0.2)
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, source, 16000, format=fmt, subtype=subtype)
    samples, rate = audio_io.read_audio(path)
    assert rate == 16000 and abs(len(samples) - n) <= CODEC_PADDING, len(samples)
    m = min(n, len(samples))
    correlation = np.corrcoef(source[:m], samples[:m])[0, 1]
    assert correlation > 0.9, f"correlation={correlation:.3f}"


def test_stereo_wav_is_averaged_to_mono(tmp_path):
    frames = np.array([[1000, 3000], [-2000, 0], [500, 500], [-32768, 32767]], np.int64)
    samples, _ = audio_io.read_audio(write_pcm(tmp_path / "s.wav", frames, channels=2))
    np.testing.assert_array_equal(samples, (frames.mean(axis=1) / 32768).astype(np.float32))


def test_audio_seconds_comes_from_the_header(tmp_path):
    wav = write_pcm(tmp_path / "a.wav", np.zeros(24000, np.int64), rate=48000)
    flac = tmp_path / "a.flac"
    soundfile.write(flac, np.zeros(11025), 22050, format="FLAC")
    assert audio_io.audio_seconds(wav) == 0.5 and audio_io.audio_seconds(flac) == 0.5
    assert_refused_in_one_line(tmp_path / "none.wav", "no such file", read=audio_io.audio_seconds)


# ----------------------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampling_keeps_frequency_amplitude_and_length(tmp_path, rate):
    n = rate  # one second: the FFT's bins are 1 Hz apart
    resampled = audio_io.load_audio(write_float_wav(tmp_path / "s.wav", sine(440, rate, n), rate=rate), 16000)
    assert resampled.dtype == np.float32 and len(resampled) == round(n * 16000 / rate), len(resampled)
    peak = np.fft.rfftfreq(len(resampled), 1 / 16000)[np.abs(np.fft.rfft(resampled)).argmax()]
    assert peak == 440, f"peak at {peak} Hz"
    # Away from the ends, where the filter sees the signal start and stop, the sine is kept sample by sample:
    # the same amplitude and no delay.
    inner = slice(160, -160)
    err = np.abs(resampled - sine(440, 16000, len(resampled)))[inner].max()
    assert err <= 1e-2, f"max|diff|={err:.2e}"


def test_audio_at_the_model_rate_is_not_resampled(tmp_path):
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(audio_io.load_audio(write_float_wav(tmp_path / "a.wav", values), 16000), values)


def test_rates_that_cannot_be_resampled_are_refused(tmp_path):
    path = write_pcm(tmp_path / "slow.wav", np.zeros(100, np.int64), rate=500)
    assert_refused_in_one_line(path, "sample rate 500 Hz is too low", read=lambda p: audio_io.load_audio(p, 16000))
    path = write_pcm(tmp_path / "one.wav", np.zeros(1, np.int64), rate=48000)
    assert_refused_in_one_line(path, "1 sample(s) at 48000 Hz leave none at 16000 Hz",
                               read=lambda p: audio_io.load_audio(p, 16000))


# ----------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("channels", [1, 2])
def test_non_finite_samples_are_refused_naming_the_file_and_time(tmp_path, bad, channels):
    samples = np.zeros((40000, channels), np.float32)
    samples[int(1.23 * 16000), channels - 1] = bad
    path = write_float_wav(tmp_path / "bad.wav", samples)
    assert_refused_in_one_line(path, "holds NaN or infinite samples at 1.23 s")
    assert_refused_in_one_line(path, "at 1.23 s", read=lambda p: audio_io.load_audio(p, 8000))


def test_samples_beyond_float32_are_refused(tmp_path):
    samples = np.zeros(32000)
    samples[16000] = 1e300
    assert_refused_in_one_line(write_float_wav(tmp_path / "huge.wav", samples, bits=64),
                               "holds samples beyond float32's range at 1.00 s")


def test_unreadable_audio_is_refused_in_one_line_naming_the_file(tmp_path):
    assert issubclass(audio_io.AudioError, ConvertError)
    assert_refused_in_one_line(tmp_path / "missing.wav", "no such file")
    assert_refused_in_one_line(tmp_path, "is a directory")
    (tmp_path / "text.wav").write_text("not audio at all")
    assert_refused_in_one_line(tmp_path / "text.wav", "not an audio file soundfile can read (Format not recognised)")
    (tmp_path / "empty.flac").write_bytes(b"")
    assert_refused_in_one_line(tmp_path / "empty.flac", "not an audio file soundfile can read")
    assert_refused_in_one_line(write_pcm(tmp_path / "silent.wav", np.zeros(0, np.int64)), "the file holds no samples")
    (tmp_path / "pcm.raw").write_bytes(bytes(64))
    assert_refused_in_one_line(tmp_path / "pcm.raw", "headerless (RAW) audio")


# ----------------------------------------------------------------------------------------------------------
# The feature extractor


def test_batch_is_normalised_like_the_feature_extractor():
    rng = np.random.default_rng(0)
    long, short = 3 * rng.standard_normal(50) + 1, rng.standard_normal(30) - 2
    with_mask = audio_io.FeatureExtractorConfig(return_attention_mask=True)
    inputs, mask = audio_io.prepare_batch([long, short], with_mask)
    expected = (short - short.mean()) / np.sqrt(short.var() + 1e-7)
    np.testing.assert_allclose(inputs[1, :30], expected, atol=1e-6)
    assert (inputs[1, 30:] == 0).all() and mask.sum(1).tolist() == [50, 30]
    # Group-norm models (wav2vec2-base): each padded row is normalised whole, and no mask is passed.
    inputs, mask = audio_io.prepare_batch([long, short], dataclasses.replace(with_mask, return_attention_mask=False))
    padded = np.concatenate([short, np.zeros(20)])
    assert mask is None
    np.testing.assert_allclose(inputs[1], (padded - padded.mean()) / np.sqrt(padded.var() + 1e-7), atol=1e-6)
    raw, _ = audio_io.prepare_batch([short], audio_io.FeatureExtractorConfig(do_normalize=False))
    np.testing.assert_array_equal(raw[0], short.astype(np.float32))


def test_feature_extractor_config_is_read_or_defaulted(tmp_path):
    from convert.base.archs.wav2vec2 import Wav2Vec2Config

    group = audio_io.feature_extractor_config(tmp_path, Wav2Vec2Config(feat_extract_norm="group"))
    layer = audio_io.feature_extractor_config(tmp_path, Wav2Vec2Config(feat_extract_norm="layer"))
    assert group.do_normalize and not group.return_attention_mask and layer.return_attention_mask
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False, "sampling_rate": 8000,
         "return_attention_mask": True, "padding_value": 0.0, "feature_size": 1}))
    read = audio_io.feature_extractor_config(tmp_path, Wav2Vec2Config())
    assert (read.do_normalize, read.sampling_rate, read.return_attention_mask) == (False, 8000, True)


@pytest.mark.parametrize(("fields", "message"), [
    ({"sampling_rate": None}, "sampling_rate=null is not an integer"),
    ({"sampling_rate": "16000"}, 'sampling_rate="16000" is not an integer'),
    ({"sampling_rate": 1.5}, "sampling_rate=1.5 is not an integer"),
    ({"sampling_rate": 0}, "sampling_rate=0 must be at least 1000"),
    ({"sampling_rate": 10**12}, "sampling_rate=1000000000000 must be at most 768000"),
    ({"do_normalize": "false"}, 'do_normalize="false" is not true or false'),
    ({"return_attention_mask": 1}, "return_attention_mask=1 is not true or false"),
    ({"padding_value": "abc"}, 'padding_value="abc" is not a number'),
    ({"feature_size": "1"}, 'feature_size="1" is not an integer'),
])
def test_a_waveform_preprocessor_config_is_checked_field_by_field(tmp_path, fields, message):
    """Each field of a `Wav2Vec2FeatureExtractor` file is checked, as the w2v-BERT extractor's are: a wrong type or
    range is refused naming the file and the field, never read as another value (bool("false") is True)."""
    from convert.base.archs.wav2vec2 import Wav2Vec2Config

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000, **fields}))
    with pytest.raises(audio_io.AudioError) as caught:
        audio_io.feature_extractor_config(tmp_path, Wav2Vec2Config())
    assert str(caught.value) == f"{tmp_path / 'preprocessor_config.json'}: {message}"


# ----------------------------------------------------------------------------------------------------------
# Fuzzing


def _riff_size_offsets(data: bytes) -> list[int]:
    """Where the 32-bit little-endian sizes of a RIFF file sit: the RIFF size and each chunk's."""
    offsets, at = [4], 12
    while at + 8 <= len(data):
        offsets.append(at + 4)
        size = int.from_bytes(data[at + 4:at + 8], "little")
        at += 8 + size + (size & 1)  # chunks are padded to an even size
    return offsets


def _seed_files() -> dict[str, tuple[bytes, list[int]]]:
    """Small valid files and the offsets of their length and format fields, where corruption bites hardest."""
    import io
    import tempfile

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pcm = write_pcm(Path(tmp) / "a.wav", rng.integers(-3000, 3000, (64, 2)), channels=2).read_bytes()
        pcm += b"LIST" + struct.pack("<I", 5) + b"INFOx\x00"  # a trailing odd-sized chunk with its pad byte
        floats = write_float_wav(Path(tmp) / "f.wav", rng.standard_normal(48) / 4, rate=8000,
                                 extensible=True).read_bytes()
    flac = io.BytesIO()
    soundfile.write(flac, rng.integers(-3000, 3000, 256).astype(np.int16), 16000, format="FLAC")
    flac = flac.getvalue()
    # FLAC: the STREAMINFO block header's 24-bit length (5), then its fields: block and frame sizes (8-17),
    # the rate / channels / bits / total-samples bit field (18-25).
    # WAV: the sizes, then the fmt chunk's format code (20), channels (22), rate (24), bits (34), and for
    # WAVE_FORMAT_EXTENSIBLE its cbSize (36) and the SubFormat code (44).
    fmt_fields = [20, 22, 24, 34]
    return {"wav_pcm16_stereo": (pcm, _riff_size_offsets(pcm) + fmt_fields),
            "wav_float_extensible": (floats, _riff_size_offsets(floats) + fmt_fields + [36, 44]),
            "flac": (flac, [5, 8, 10, 12, 15, 18, 21, 22])}


SEED_FILES = _seed_files()
ABSURD = [0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def corrupted(draw: st.DrawFn, data: bytes, offsets: list[int]) -> bytes:
    """`data` with 1 to 3 corruptions: a truncation, a flipped bit, or an absurd 32-bit value written over a
    length field (or anywhere), little- or big-endian."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "absurd"]))
        if kind == "truncate" and out:
            del out[draw(st.integers(0, len(out) - 1)):]
        elif kind == "flip" and out:
            bit = draw(st.integers(0, 8 * len(out) - 1))
            out[bit // 8] ^= 1 << bit % 8
        elif kind == "absurd" and len(out) >= 4:
            at = draw(st.sampled_from(offsets) | st.integers(0, len(out) - 4))
            at = min(at, len(out) - 4)
            value = draw(st.sampled_from(ABSURD) | st.integers(0, 0xFFFFFFFF))
            out[at:at + 4] = value.to_bytes(4, draw(st.sampled_from(["little", "big"])))
    return bytes(out)


@pytest.mark.parametrize("seed_file", sorted(SEED_FILES))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_audio_gives_audio_error_or_a_valid_waveform(tmp_path, seed_file, data):
    path = tmp_path / ("fuzz.flac" if seed_file == "flac" else "fuzz.wav")
    path.write_bytes(data.draw(corrupted(*SEED_FILES[seed_file]), label="file"))
    try:
        samples, rate = audio_io.read_audio(path)
        waveform = audio_io.load_audio(path, 16000)
        seconds = audio_io.audio_seconds(path)
    except audio_io.AudioError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        return
    for w in (samples, waveform):
        assert w.dtype == np.float32 and w.ndim == 1 and len(w) > 0 and np.isfinite(w).all()
    assert rate >= 1 and seconds >= 0


# ----------------------------------------------------------------------------------------------------------
# Truncated files: libsndfile cuts the length to the bytes there and reads the rest as if it were all


@pytest.mark.parametrize("fmt", ["WAV", "RF64"])
def test_a_truncated_wav_is_refused_naming_the_frames_its_header_states(tmp_path, fmt):
    whole = tmp_path / "whole.wav"
    soundfile.write(str(whole), np.zeros(11200, np.int16), 16000, format=fmt, subtype="PCM_16")
    data = whole.read_bytes()
    truncated = tmp_path / "trunc.wav"
    truncated.write_bytes(data[:5589])  # `head -c 5589`: the data chunk says 22400 bytes
    held = soundfile.info(str(truncated)).frames  # what libsndfile reads without a word
    assert 0 < held < 11200
    message = f"the file is truncated: its header says 11200 frames, the file holds {held}"
    assert_refused_in_one_line(truncated, message)
    assert_refused_in_one_line(truncated, message, read=audio_io.audio_seconds)
    assert_refused_in_one_line(truncated, message, read=lambda p: audio_io.load_audio(p, 8000))
    with pytest.raises(audio_io.AudioError, match=r"^row 3: the file is truncated: its header says 11200 frames"):
        audio_io.read_audio(audio_io.AudioBytes(data[:5589], "row 3"))  # dataset bytes (training) too
    assert truncated.read_bytes() == data[:5589]  # never modified
    samples, _ = audio_io.read_audio(whole)
    assert samples.shape == (11200,) and audio_io.audio_seconds(whole) == 0.7


def test_a_wav_whose_data_size_means_to_the_end_is_read_whole(tmp_path):
    """Streamed writers that cannot seek back leave the data size 0xFFFFFFFF: the samples run to the end."""
    raw = (np.arange(100, dtype=np.int16) * 50).tobytes()
    for size in (0xFFFFFFFF,):
        path = write_wav(tmp_path / f"stream{size}.wav", raw, PCM, 16)
        data = bytearray(path.read_bytes())
        data[data.index(b"data") + 4:data.index(b"data") + 8] = size.to_bytes(4, "little")
        path.write_bytes(bytes(data))
        samples, _ = audio_io.read_audio(path)
        assert samples.shape == (100,), size
