"""Transcription at scale (`convert.transcribe`, `python -m convert.generate`): inputs, length buckets and their
compilations, chunking of long audio, JSON-lines output, WER / CER, and one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from convert.base.audio import zero_mean_unit_var
from convert.base.errors import UsageError
from convert.generate import main
from convert.transcribe import chunk_bounds, merge_overlapping, read_manifest, transcribe
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

RATE = 16000


def write_audio(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    soundfile.write(str(path), samples, rate)
    return path


def tone(seconds: float, frequency: float, seed: int, rate: int = RATE) -> np.ndarray:
    """A tone with a little noise: the fixtures decode different tones differently."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.5 * np.sin(2 * np.pi * frequency * t) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def builtin_model(tmp_path_factory) -> Path:
    """The built-in tiny wav2vec2 + BART composed: the output holds the tokenizer and the preprocessor config."""
    from convert.compose import compose

    out = tmp_path_factory.mktemp("transcribe") / "model"
    compose("wav2vec2", "bart", out, verify=False, progress=False, log=io.StringIO())
    return out


@pytest.fixture(scope="module")
def masked_model(composed_dir) -> Path:
    """A layer-norm encoder that takes an attention mask: padding does not change what it hears."""
    return composed_dir("w2v_stable_adapter", "bart_untied")


# ----------------------------------------------------------------------------------------------------------
# The command


def test_command_writes_one_json_line_per_file_with_the_references_tokens(builtin_model, tmp_path, capsys):
    samples = np.random.default_rng(3).standard_normal(6000).astype(np.float32) * 0.1
    wav = write_audio(tmp_path / "speech.wav", samples)
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--max-new-tokens", "12", "--output",
                 str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "transcribed 1 file(s)" in captured.err, captured
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(record) == {"audio", "text", "token_ids", "score", "seconds", "chunks"}, record
    assert record["audio"] == str(wav) and record["seconds"] == pytest.approx(6000 / RATE) and record["chunks"] == 1

    # The same ids from the reference, on the waveform normalised by hand (as preprocessor_config.json asks).
    model = SpeechEncoderDecoderModel.from_pretrained(builtin_model)
    x = zero_mean_unit_var(soundfile.read(str(wav), dtype="float32")[0])
    expected = model.generate(torch.from_numpy(x)[None], max_new_tokens=12).sequences[0].tolist()
    eos = model.config.eos_token_id
    expected = expected[:expected.index(eos, 1) + 1] if eos in expected[1:] else expected
    assert record["token_ids"] == expected
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(builtin_model / "tokenizer.json")).decode(expected, skip_special_tokens=True)
    assert record["text"] == text

    # --scan-layers (nn.scan over the identical layers): the same tokens.
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--max-new-tokens", "12", "--scan-layers",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected

    # --output refuses to replace a file unless asked; beam search through the reference, to stdout.
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {out}: exists (pass --overwrite to replace it)")
    assert main(["--model", str(builtin_model), "--audio", str(wav), "--max-new-tokens", "12", "--num-beams", "2",
                 "--framework", "torch", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    beams = model.generate(torch.from_numpy(x)[None], max_new_tokens=12, num_beams=2)
    assert record["score"] == pytest.approx(float(beams.sequences_scores[0]), abs=1e-6)


def test_manifest_references_give_wer_and_cer(builtin_model, tmp_path):
    audio = [write_audio(tmp_path / f"{i}.flac", tone(0.4 + 0.2 * i, 300 + 150 * i, seed=i, rate=22050), 22050)
             for i in range(3)]
    options = {"framework": "torch", "max_new_tokens": 10, "progress": False}  # the reference: nothing to compile
    first = transcribe(builtin_model, audio, **options)
    assert first.wer is None and first.references == 0
    texts = [r.text for r in first.results]
    assert all(t and t.split() for t in texts), texts
    # References: the first two transcripts verbatim, the third with its first word replaced.
    words = texts[2].split()
    changed = " ".join(["zzz", *words[1:]])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": audio[0].name, "text": texts[0]}) + "\n\n"
                        + json.dumps({"audio": str(audio[1]), "text": texts[1]}) + "\n"
                        + json.dumps({"audio": audio[2].name, "text": changed}) + "\n")
    report = transcribe(builtin_model, manifests=[manifest], **options)
    assert [r.text for r in report.results] == texts and report.references == 3
    total_words = sum(len(t.split()) for t in texts)
    assert report.wer == pytest.approx(1 / total_words), (report.wer, texts)
    total_chars = sum(len(t) for t in texts[:2]) + len(changed)
    changed_chars = sum(a != b for a, b in zip(changed, texts[2])) + abs(len(changed) - len(texts[2]))
    assert 0 < report.cer <= changed_chars / total_chars + 1e-9, (report.cer, changed, texts[2])
    assert report.results[2].reference == changed and "reference" in report.results[2].to_json()


def test_length_buckets_compile_once_each_and_do_not_change_the_tokens(masked_model, tmp_path):
    """Ten files of mixed length in 2 buckets of 4 rows: the encoder and the search compile once per bucket, a
    second run compiles nothing, and every transcript equals the reference's on the file alone (an encoder with
    an attention mask does not hear the padding)."""
    lengths = [0.30, 0.34, 0.5, 0.62, 0.41, 0.9, 0.33, 0.75, 0.58, 0.47]
    files = [write_audio(tmp_path / f"{i:02d}.wav", tone(s, 200 + 90 * i, seed=i)) for i, s in enumerate(lengths)]
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(masked_model)
    options = {"max_new_tokens": 8, "eos_token_id": [16, 2], "batch_size": 4, "buckets": 2, "progress": False}
    report = transcribe(model, files, **options)
    padded = {n for _, n in report.shapes}
    assert len(padded) <= 2 and {rows for rows, _ in report.shapes} == {4}, report.shapes
    assert report.compilations == {"encoder": len(report.shapes), "search": len(report.shapes)}, report.compilations
    again = transcribe(model, files, **options)
    assert again.compilations["search"] == 0 and [r.token_ids for r in again.results] == \
        [r.token_ids for r in report.results]
    reference = SpeechEncoderDecoderModel.from_pretrained(masked_model)
    alone = transcribe(reference, files, **{**options, "batch_size": 1, "buckets": len(files)})
    assert [r.token_ids for r in report.results] == [r.token_ids for r in alone.results]
    assert len({tuple(r.token_ids) for r in report.results}) > 1  # the files decode differently
    assert [r.audio for r in report.results] == [str(f) for f in files]  # input order
    assert report.audio_seconds == pytest.approx(sum(lengths), abs=1e-3) and report.audio_seconds_per_second > 0


def test_audio_too_long_is_refused_with_the_length_possible_or_chunked(masked_model, tmp_path, capsys):
    long = write_audio(tmp_path / "long.wav", tone(2.5, 330, seed=1))
    args = ["--model", str(masked_model), "--audio", str(long), "--max-new-tokens", "8", "--no-progress",
            "--framework", "torch"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {long}: 2.5 s of audio is longer than the 2.0 s this model can transcribe in one "
                          "pass (max_new_tokens=8 at 4 tokens per second of speech; the decoder's 64 positions allow "
                          "up to 15.8 s"), err
    assert err.count("\n") == 1 and "--chunk-seconds" in err
    assert main([*args, "--chunk-seconds", "1.0", "--chunk-overlap-seconds", "0.25"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["chunks"] == len(chunk_bounds(40000, RATE, 1.0, 0.25)) == 3
    assert record["token_ids"][0] == 2 and len(record["token_ids"]) > 8
    # A chunk longer than one pass allows is refused too.
    assert main([*args, "--chunk-seconds", "3"]) == 2
    assert "--chunk-seconds 3.0: is longer than the 2.0 s one pass can transcribe" in capsys.readouterr().err


def test_chunk_bounds_cover_the_audio_with_the_overlap():
    assert chunk_bounds(10, 1, 4.0, 1.0) == [(0, 4), (3, 7), (6, 10)]
    assert chunk_bounds(4, 1, 4.0, 1.0) == [(0, 4)]
    assert chunk_bounds(11, 1, 4.0, 0.0) == [(0, 4), (4, 8), (8, 11)]


def test_merging_overlapping_chunks_keeps_one_copy_of_the_overlap():
    # The overlap (7, 8, 9) is described by both chunks: it is kept once, split in its middle.
    assert merge_overlapping([1, 2, 7, 8, 9], [7, 8, 9, 4, 5]) == [1, 2, 7, 8, 9, 4, 5]
    # Disagreements inside the overlap: the left half comes from the left chunk, the right half from the right.
    assert merge_overlapping([1, 2, 7, 8, 6, 9], [7, 8, 3, 9, 4]) == [1, 2, 7, 8, 3, 9, 4]
    # No alignment with two equal tokens: the chunks are concatenated.
    assert merge_overlapping([1, 2, 3], [4, 5, 3]) == [1, 2, 3, 4, 5, 3]
    assert merge_overlapping([], [4, 5]) == [4, 5]


def test_a_progress_bar_shows_audio_seconds_per_second(builtin_model, tmp_path, monkeypatch, capsys):
    from convert import cli

    monkeypatch.setattr(cli, "show_progress", lambda requested=True: requested)
    wav = write_audio(tmp_path / "a.wav", tone(0.5, 440, seed=2))
    transcribe(builtin_model, [wav], max_new_tokens=4, framework="torch")
    err = capsys.readouterr().err
    assert "transcribing" in err and "audio-s/s" in err, err


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, the file, manifest line or flag named


def test_manifest_problems_name_the_line(tmp_path):
    wav = write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    cases = [('{"audio": "a.wav"}\n{"audio": ', "m.jsonl:2: not valid JSON"),
             ('{"text": "x"}\n', 'm.jsonl:1: expected an object with an "audio" path'),
             ('{"audio": "a.wav", "text": 3}\n', 'm.jsonl:1: "text" must be a string'),
             ('{"audio": "nope.wav"}\n', f"m.jsonl:1: {tmp_path / 'nope.wav'}: no such audio file"),
             ("\n\n", "m.jsonl: the manifest lists no audio")]
    for text, message in cases:
        (tmp_path / "m.jsonl").write_text(text)
        with pytest.raises(Exception) as error:
            read_manifest(tmp_path / "m.jsonl")
        assert str(error.value) == f"{tmp_path}/{message}" or str(error.value).startswith(f"{tmp_path}/{message}"), \
            str(error.value)
    assert wav.is_file()


@pytest.mark.parametrize(("extra", "code", "message"), [
    ([], 2, "--audio"),
    (["--audio", "{tmp}/empty_dir"], 1, "{tmp}/empty_dir: no audio files"),
    (["--audio", "{tmp}/a.wav", "--num-beams", "0"], 2, "--num-beams 0: must be an integer >= 1"),
    (["--audio", "{tmp}/a.wav", "--length-penalty", "nan"], 2, "--length-penalty NaN: must be a finite number"),
    (["--audio", "{tmp}/a.wav", "--eos-token-id", "-3"], 2, "--eos-token-id [-3]: must be a token id"),
    (["--audio", "{tmp}/a.wav", "--bad-words-ids", "[[1"], 2, "--bad-words-ids [[1: is not JSON"),
    (["--audio", "{tmp}/a.wav", "--top-p", "2"], 2, "--top-p 2.0: must be a number in [0, 1]"),
    (["--audio", "{tmp}/a.wav", "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (["--audio", "{tmp}/a.wav", "--scan-layers", "--framework", "torch"], 2, "--scan-layers: needs framework=flax"),
    (["--audio", "{tmp}/a.wav", "--generation-config", "{tmp}/g.json"], 1,
     "{tmp}/g.json: typical_p=0.5: is not implemented by this toolkit"),
])
def test_bad_arguments_are_one_line_naming_the_flag(builtin_model, tmp_path, capsys, extra, code, message):
    write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "g.json").write_text(json.dumps({"typical_p": 0.5}))
    argv = ["--model", str(builtin_model), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in captured.err, captured.err


@pytest.mark.parametrize(("extra", "message"), [
    (["--ctc-weight", "1.5"], "--ctc-weight 1.5: must be from 0.0 to 1.0"),
    (["--ctc-weight", "-0.1"], "--ctc-weight -0.1: must be from 0.0 to 1.0"),
    (["--ctc-weight", "nan"], "--ctc-weight nan: must be a finite number"),
    (["--ctc-weight", "0.3", "--do-sample"], "--ctc-weight 0.3: joint CTC/attention decoding is a beam search; it "
                                             "does not sample (--do-sample)"),
    (["--decoder", "ctc", "--num-beams", "4"], "--num-beams 4: applies to attention decoding"),
    (["--decoder", "ctc", "--do-sample"], "--do-sample: applies to attention decoding"),
    (["--decoder", "ctc", "--generation-config", "{tmp}/g.json"], "--generation-config {tmp}/g.json: applies to "
                                                                    "attention decoding"),
    (["--chunk-overlap-seconds", "0.5"], "--chunk-overlap-seconds 0.5: applies only with --chunk-seconds S"),
    (["--split", "test"], "--split test: applies to --dataset"),
    (["--text-column", "txt"], "--text-column txt: applies to --dataset"),
    (["--streaming"], "--streaming: applies to --dataset"),
])
def test_decoding_flags_wrong_by_themselves_are_usage_errors_before_the_model_is_read(tmp_path, capsys, extra,
                                                                                        message):
    """The model does not exist: a check made after loading it would report that instead (exit 1)."""
    wav = write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    (tmp_path / "g.json").write_text(json.dumps({"num_beams": 2}))
    argv = ["--model", str(tmp_path / "no-model"), "--audio", str(wav), *(a.replace("{tmp}", str(tmp_path))
                                                                        for a in extra)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), captured.err


def test_a_setting_transcription_refuses_names_the_generation_config_that_set_it(builtin_model, tmp_path, capsys):
    wav = write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    config = tmp_path / "gc.json"
    config.write_text(json.dumps({"num_beams": 3, "num_return_sequences": 2}))
    argv = ["--model", str(builtin_model), "--audio", str(wav), "--framework", "torch", "--no-progress"]
    assert main([*argv, "--generation-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {config}: num_return_sequences=2: transcription writes one transcript per file\n", err
    with pytest.raises(UsageError, match=r"^num_return_sequences=2: transcription writes one transcript per file"):
        transcribe(builtin_model, [wav], framework="torch", num_beams=3, num_return_sequences=2, progress=False)


def test_audio_just_too_long_reads_longer_than_the_limit(masked_model, tmp_path, capsys):
    """2.02 s against a 2.0 s limit: one decimal would read "2.0 s ... longer than the 2.0 s"."""
    wav = write_audio(tmp_path / "a.wav", tone(2.02, 330, seed=1))
    assert main(["--model", str(masked_model), "--audio", str(wav), "--max-new-tokens", "8", "--framework", "torch",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {wav}: 2.02 s of audio is longer than the 2.00 s this model can transcribe"), err
    assert main(["--model", str(masked_model), "--audio", str(wav), "--max-new-tokens", "8", "--framework", "torch",
                 "--chunk-seconds", "2.04", "--no-progress"]) == 2
    assert "--chunk-seconds 2.04: is longer than the 2.00 s one pass" in capsys.readouterr().err


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "convert.generate", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    for flag in ("--model", "--audio", "--manifest", "--output", "--batch-size", "--buckets", "--chunk-seconds",
                 "--num-beams", "--max-new-tokens", "--do-sample", "--temperature", "--top-k", "--top-p",
                 "--no-repeat-ngram-size", "--repetition-penalty", "--forced-bos-token-id", "--forced-eos-token-id",
                 "--eos-token-id", "--suppress-tokens", "--bad-words-ids", "--generation-config", "--framework",
                 "--scan-layers", "--mesh"):
        assert flag in out, flag


def test_a_manifest_text_that_is_not_valid_unicode_is_refused_naming_the_line(tmp_path):
    """A lone surrogate (a JSON escape can write one) used to crash the output writer after all the work."""
    from convert.transcribe import TranscriptionError, read_manifest

    write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "ok"}\n{"audio": "a.wav", "text": "x\\ud800"}\n')
    with pytest.raises(TranscriptionError, match=rf'^{manifest}:2: "text" is not valid Unicode text: a lone surrogate '
                                                 r"U\+D800 at character 1"):
        read_manifest(manifest)


def test_generate_notes_an_adapter_it_does_not_apply(builtin_model, tmp_path, capsys):
    """A directory `convert.finetune --lora-export adapter` wrote: generate transcribes with the base weights and
    says so (it used to say nothing, and the transcripts were not the adapted model's)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(builtin_model, model)
    (model / "adapter").mkdir()
    wav = write_audio(tmp_path / "a.wav", tone(0.3, 300, seed=0))
    assert main(["--model", str(model), "--audio", str(wav), "--framework", "torch", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"note: {model / 'adapter'} holds a LoRA adapter that was not applied" in err, err
