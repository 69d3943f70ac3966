"""Cached decoding and generation: Flax against the PyTorch reference on composed fixtures, the compiled loop
and the transcribe command (the audio reader's tests are in test_audio.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flax_model import generation as flax_generation
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

MAX_NEW_TOKENS = 24
MIN_GENERATED = 20  # the longest row of every parity run generates at least this many tokens
TOL_LOGITS = 1e-5
TOL_SCORE = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """A composed fixture pair and an eos id picked so that generation is not trivial: the untied LM heads give
    logits whose argmax moves along the sequence, and the eos ends some rows or beams after 20 or more tokens
    but not all of them (picked by running the reference over every id; see the asserts below)."""

    encoder: str
    decoder: str
    eos_token_id: int


CASES = {
    # wav2vec2 with an adapter (layer-norm features) + BART: greedy row 0 ends with eos after 22 tokens while
    # row 1 runs to the limit, and both beam-search results end with eos after 20 or more.
    "bart": Case("w2v_stable_adapter", "bart_untied", eos_token_id=51),
    # The wide encoder needs enc_to_dec_proj, and GPT-2's cross-attention is initialised by the composer.
    "gpt2": Case("w2v_stable_wide", "gpt2_untied", eos_token_id=64),
    # GPT-2 whose cross-attention comes from the source at full scale, so that the encoder output steers the
    # tokens (the two utterances decode differently): greedy row 0 ends after 21 tokens, row 1 runs on.
    "gpt2_xattn": Case("w2v_stable_wide", "gpt2_xattn_untied", eos_token_id=33),
}


@dataclasses.dataclass
class Models:
    flax: FlaxSpeechEncoderDecoderModel
    torch: SpeechEncoderDecoderModel
    case: Case


@pytest.fixture(scope="module")
def models(composed_dir: Callable[..., Path]) -> Callable[[str], Models]:
    loaded: dict[str, Models] = {}

    def load(name: str) -> Models:
        if name not in loaded:
            case = CASES[name]
            directory = composed_dir(case.encoder, case.decoder)
            loaded[name] = Models(FlaxSpeechEncoderDecoderModel.from_pretrained(directory),
                                  torch_from_pretrained(directory)[0], case)
        return loaded[name]

    return load


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """Two utterances of noise; the second is 65% as long (zeros, then padding)."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((2, 4000)).astype(np.float32)
    mask = np.ones((2, 4000), np.int32)
    mask[1, 2600:] = 0
    inputs[1, 2600:] = 0.0
    return inputs, mask


def run_both(m: Models, batch: tuple[np.ndarray, np.ndarray], **options):
    """The same generate call on both frameworks: (Flax output, reference output as numpy)."""
    inputs, mask = batch
    options = {"max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": m.case.eos_token_id, **options}
    flax_out = m.flax.generate(inputs, mask, **options)
    torch_out = m.torch.generate(torch.from_numpy(inputs), torch.from_numpy(mask), **options)
    torch_scores = None if torch_out.scores is None else torch_out.scores.numpy()
    return flax_out, (torch_out.sequences.numpy(), torch_scores)


def generated_lengths(sequences: np.ndarray, eos: int) -> list[int]:
    """Tokens each row generated: up to and including its first eos, else all of them."""
    lengths = []
    for row in sequences[:, 1:].tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


def assert_not_trivial(sequences: np.ndarray, eos: int) -> None:
    lengths = generated_lengths(sequences, eos)
    assert max(lengths) >= MIN_GENERATED, f"only {lengths} tokens generated: {sequences.tolist()}"
    for row, n in zip(sequences[:, 1:].tolist(), lengths):
        assert len(set(row[:n])) >= 3, f"degenerate sequence {row[:n]}"


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("name", CASES)
def test_cached_decode_steps_equal_full_forward(models, batch, name):
    m = models(name)
    inputs, mask = batch
    rng = np.random.default_rng(1)
    ids = rng.integers(0, m.flax.config.decoder.vocab_size, (2, MAX_NEW_TOKENS)).astype(np.int32)
    ids[:, 0] = m.flax.config.decoder_start_token_id
    full = np.asarray(m.flax(inputs, mask, ids).logits)  # [B, T, V]

    encoded = m.flax.encode(inputs, mask)
    cache = m.flax.init_cache(2, MAX_NEW_TOKENS + 1, encoded)
    steps = []
    for t in range(MAX_NEW_TOKENS):
        logits, cache = m.flax.decode(ids[:, t:t + 1], None, cache=cache)
        steps.append(np.asarray(logits)[:, 0])
    err = max_diff(np.stack(steps, axis=1), full)
    assert err <= TOL_LOGITS, f"{name}: Flax cached steps vs full forward: max|diff|={err:.2e}"

    with torch.no_grad():
        t_inputs, t_mask, t_ids = torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(ids).long()
        t_full = m.torch(t_inputs, t_mask, t_ids).logits.numpy()
        hidden, encoder_mask = m.torch.encode(t_inputs, t_mask)
        t_cache = m.torch.init_cache(2, MAX_NEW_TOKENS + 1, hidden, encoder_mask)
        t_steps = []
        for t in range(MAX_NEW_TOKENS):
            logits, t_cache = m.torch.decode(t_ids[:, t:t + 1], None, None, cache=t_cache)
            t_steps.append(logits[:, 0].numpy())
    err = max_diff(np.stack(t_steps, axis=1), t_full)
    assert err <= TOL_LOGITS, f"{name}: reference cached steps vs full forward: max|diff|={err:.2e}"
    err = max_diff(full, t_full)
    assert err <= TOL_LOGITS, f"{name}: Flax vs reference full forward: max|diff|={err:.2e}"
    # The test tells tokens apart only if the argmax moves along the sequence.
    assert all(len(set(row)) >= 3 for row in full.argmax(-1).tolist()), full.argmax(-1)


# ----------------------------------------------------------------------------------------------------------
# Greedy and beam search parity


@pytest.mark.parametrize("name", CASES)
def test_greedy_search_flax_equals_torch_reference(models, batch, name):
    m = models(name)
    flax_out, (torch_sequences, torch_scores) = run_both(m, batch)
    assert flax_out.scores is None and torch_scores is None
    np.testing.assert_array_equal(flax_out.sequences, torch_sequences)
    assert (flax_out.sequences[:, 0] == m.flax.config.decoder_start_token_id).all()
    assert_not_trivial(flax_out.sequences, m.case.eos_token_id)


@pytest.mark.parametrize("name", ["bart", "gpt2_xattn"])
def test_encoder_output_steers_generation(models, batch, name):
    """The two utterances of the padded batch decode to different tokens: a test that compares sequences
    then also checks that each row attends to its own (masked) encoder output."""
    m = models(name)
    flax_out, (torch_sequences, _) = run_both(m, batch)
    np.testing.assert_array_equal(flax_out.sequences, torch_sequences)
    assert flax_out.sequences[0].tolist() != flax_out.sequences[1].tolist()


def test_greedy_search_pads_finished_rows(models, batch):
    m = models("bart")
    flax_out, _ = run_both(m, batch)
    lengths = generated_lengths(flax_out.sequences, m.case.eos_token_id)
    assert lengths[0] < lengths[1] == MAX_NEW_TOKENS, lengths  # the fixture's row 0 ends first
    assert (flax_out.sequences[0, 1 + lengths[0]:] == m.flax.config.pad_token_id).all(), flax_out.sequences


@pytest.mark.parametrize("name", CASES)
def test_beam_search_flax_equals_torch_reference(models, batch, name):
    m = models(name)
    flax_out, (torch_sequences, torch_scores) = run_both(m, batch, num_beams=4)
    np.testing.assert_array_equal(flax_out.sequences, torch_sequences)
    err = max_diff(flax_out.scores, torch_scores)
    assert err <= TOL_SCORE, f"{name}: beam scores max|diff|={err:.2e}"
    assert_not_trivial(flax_out.sequences, m.case.eos_token_id)


@pytest.mark.parametrize("options", [
    {"num_beams": 4, "early_stopping": True},
    {"num_beams": 4, "early_stopping": "never", "length_penalty": 2.0},
    {"num_beams": 3, "length_penalty": -0.5, "min_new_tokens": 23},
], ids=["early_stopping", "never_length_penalty", "min_new_tokens"])
def test_beam_search_options_match_torch_reference(models, batch, options):
    m = models("bart")
    flax_out, (torch_sequences, torch_scores) = run_both(m, batch, **options)
    np.testing.assert_array_equal(flax_out.sequences, torch_sequences)
    err = max_diff(flax_out.scores, torch_scores)
    assert err <= TOL_SCORE, f"{options}: beam scores max|diff|={err:.2e}"
    if "min_new_tokens" in options:
        assert (flax_out.sequences[:, 1:1 + options["min_new_tokens"]] != m.case.eos_token_id).all()


def test_generation_stops_when_every_row_has_finished(models, batch):
    m = models("gpt2")
    inputs, mask = batch
    first = m.flax.generate(inputs, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=m.case.eos_token_id)
    eos = int(first.sequences[0, 3])  # the third generated token of row 0 becomes the eos
    early = m.flax.generate(inputs, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    lengths = generated_lengths(early.sequences, eos)
    # Greedy output is as wide as the steps run: the loop stopped as soon as the last row finished.
    assert early.sequences.shape[1] == 1 + max(lengths) < 1 + MAX_NEW_TOKENS, early.sequences
    # min_new_tokens holds eos back (a traced argument: the same compiled loop).
    held = m.flax.generate(inputs, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, min_new_tokens=5)
    assert (held.sequences[:, 1:6] != eos).all(), held.sequences
    reference = m.torch.generate(torch.from_numpy(inputs), torch.from_numpy(mask), max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=eos, min_new_tokens=5)
    np.testing.assert_array_equal(held.sequences, reference.sequences.numpy())


def test_second_generate_call_does_not_trace_again(models, batch):
    m = models("gpt2")
    inputs, mask = batch
    options = {"max_new_tokens": 8, "eos_token_id": m.case.eos_token_id}
    for kind, beams in (("greedy", 1), ("beam_search", 2)):
        first = m.flax.generate(inputs, mask, num_beams=beams, **options)
        traces = flax_generation.TRACES[kind]
        second = m.flax.generate(inputs, mask, num_beams=beams, **options)
        # length_penalty and min_new_tokens are traced arguments: changing them does not compile again.
        m.flax.generate(inputs, mask, num_beams=beams, length_penalty=0.5, min_new_tokens=2, **options)
        assert flax_generation.TRACES[kind] == traces, f"{kind}: traced again for the same shapes"
        np.testing.assert_array_equal(first.sequences, second.sequences)
    traces = flax_generation.TRACES["greedy"]
    m.flax.generate(inputs[:1], mask[:1], **options)  # a new batch shape: the counter does see a trace
    assert flax_generation.TRACES["greedy"] == traces + 1


def test_generate_refuses_more_tokens_than_positions(models, batch):
    m = models("gpt2")
    with pytest.raises(ValueError, match="decoder positions"):
        m.flax.generate(*batch, max_new_tokens=64)
    with pytest.raises(ValueError, match="decoder positions"):
        m.torch.generate(torch.from_numpy(batch[0]), max_new_tokens=64)


# ----------------------------------------------------------------------------------------------------------
# The transcribe command


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


@pytest.fixture(scope="module")
def builtin_model(tmp_path_factory) -> Path:
    """The built-in tiny wav2vec2 + BART composed: the output holds the tokenizer and the preprocessor config."""
    import io

    from convert.compose import compose

    out = tmp_path_factory.mktemp("transcribe") / "model"
    compose("wav2vec2", "bart", out, verify=False, progress=False, log=io.StringIO())
    return out


def test_compose_copies_tokenizer_and_preprocessor_config(builtin_model):
    assert (builtin_model / "tokenizer.json").is_file()
    assert (builtin_model / "preprocessor_config.json").is_file()


def test_transcribe_command_end_to_end(builtin_model, tmp_path, capsys):
    from convert.generate import main

    rng = np.random.default_rng(3)
    samples = np.round(rng.standard_normal(6000) * 2000).astype(np.int64)
    wav = write_pcm(tmp_path / "speech.wav", samples)
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--max-new-tokens", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(wav), "ids"], [str(wav), "text"]], lines
    ids = [int(i) for i in lines[0].split("\t")[2].split()]

    # The same ids from the reference, on the waveform normalised by hand (as preprocessor_config.json asks).
    assert json.loads((builtin_model / "preprocessor_config.json").read_text())["do_normalize"] is True
    model, _ = torch_from_pretrained(builtin_model)
    x = samples / 32768.0
    x = ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)
    expected = model.generate(torch.from_numpy(x)[None], max_new_tokens=12).sequences[0].tolist()
    eos = model.config.eos_token_id
    expected = expected[:expected.index(eos, 1) + 1] if eos in expected[1:] else expected
    assert ids == expected

    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(builtin_model / "tokenizer.json")).decode(ids, skip_special_tokens=True)
    assert lines[1].split("\t", 2)[2] == text

    # Beam search through the reference framework, as JSON.
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--max-new-tokens", "12", "--num-beams", "2",
                 "--framework", "torch", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["audio"] == str(wav) and record["token_ids"][0] == model.config.decoder_start_token_id
    assert isinstance(record["score"], float)


def test_transcribe_command_reports_bad_audio_in_one_line(builtin_model, tmp_path, capsys):
    from convert.generate import main

    wav = write_pcm(tmp_path / "nan.wav", np.zeros(4000, np.int64), rate=16000)
    data = bytearray(wav.read_bytes())
    data[:] = data[:-8000]  # no samples left
    wav.write_bytes(bytes(data))
    assert main(["--model", str(builtin_model), "--audio", str(wav)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {wav}: ") and "\n" not in err
    assert main(["--model", str(builtin_model), "--audio", str(tmp_path / "none.wav")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.wav'}: no such file"


def test_transcribe_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "convert.generate", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    for flag in ("--model", "--audio", "--num-beams", "--max-new-tokens", "--min-new-tokens", "--length-penalty",
                 "--revision", "--framework", "--json"):
        assert flag in out
