"""Generation: Flax against the PyTorch reference on composed fixtures for every processor and the combinations
users set, the generation config that travels with a composed model, and the compiled loop.

The processors' semantics are checked one by one against hand-computed expectations in test_processors.py,
sampling in test_sampling.py, transformers' own outputs in test_goldens.py, and the transcription command in
test_transcribe.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convert.base.generation_settings import GenerationArgumentError, GenerationConfig, GenerationConfigError
from flax_model import generation as flax_generation
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

MAX_NEW_TOKENS = 20
TOL_LOGITS = 1e-5
TOL_SCORE = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """A composed fixture pair and eos ids picked (by running the reference over every id) so that generation is
    not trivial on `batch()`: the untied LM heads give logits whose argmax moves along the sequence, the three
    utterances decode differently, and the eos ends some rows after 5 or more tokens but not all of them."""

    encoder: str
    decoder: str
    eos_token_id: tuple[int, ...]


CASES = {
    # wav2vec2 with an adapter + BART. The decoder's config.json carries forced_bos_token_id=0 and
    # forced_eos_token_id=2 (eos 2, pad 1, start 2): the composed generation_config.json keeps them.
    "bart": Case("w2v_stable_adapter", "bart_untied", eos_token_id=(16, 2)),
    # GPT-2 whose cross-attention comes from the source at full scale (start = eos = pad = 95).
    "gpt2": Case("w2v_stable_wide", "gpt2_xattn_untied", eos_token_id=(92, 95)),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Generation settings for one parity run; `mixed`: some rows end with eos, some reach the length cap."""

    options: dict[str, Any]
    mixed: bool = True


# Flax against the reference on a three-utterance batch (transformers' own tokens and scores for these settings
# and more, both frameworks, are in test_goldens.py): per-step scores and beam indices, what each processor
# promises, greedy search's score, the order of returned hypotheses.
SETTINGS: dict[tuple[str, str], Setting] = {
    # The model's own generation config (forced BOS 0 first, forced EOS 2 at the cap), per-step scores.
    ("bart", "greedy"): Setting({"output_scores": True}),
    # What an mBART speech-translation checkpoint sets: the target-language token forced first, eos forced at the
    # cap (from the config), 4 beams, no repeated 3-gram.
    ("bart", "mbart_style"): Setting({"num_beams": 4, "no_repeat_ngram_size": 3, "forced_bos_token_id": 56}),
    ("bart", "penalties"): Setting({"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                                    "bad_words_ids": [[69, 69], [83]], "suppress_tokens": [77],
                                    "begin_suppress_tokens": [14], "min_new_tokens": 4}),
    ("bart", "beam_returns"): Setting({"num_beams": 3, "num_return_sequences": 3, "length_penalty": 0.5,
                                       "early_stopping": True, "repetition_penalty": 1.2, "output_scores": True}),
    ("gpt2", "beam4"): Setting({"num_beams": 4}),
}


@dataclasses.dataclass
class Models:
    flax: FlaxSpeechEncoderDecoderModel
    torch: SpeechEncoderDecoderModel
    case: Case
    directory: Path


@pytest.fixture(scope="module")
def models(composed_dir: Callable[..., Path]) -> Callable[[str], Models]:
    loaded: dict[str, Models] = {}

    def load(name: str) -> Models:
        if name not in loaded:
            case = CASES[name]
            directory = composed_dir(case.encoder, case.decoder)
            loaded[name] = Models(FlaxSpeechEncoderDecoderModel.from_pretrained(directory),
                                  torch_from_pretrained(directory)[0], case, directory)
        return loaded[name]

    return load


def speech_batch() -> tuple[np.ndarray, np.ndarray]:
    """Three utterances of 6000 samples (0.375 s) that the fixtures decode differently: noise; a chirp with a little
    noise, padded after 4000 samples; a square wave."""
    rng = np.random.default_rng(0)
    n = 6000
    t = np.arange(n) / 16000
    chirp = 3 * np.sin(2 * np.pi * (200 + 2000 * t) * t) + 0.3 * rng.standard_normal(n)
    inputs = np.stack([rng.standard_normal(n), chirp, np.sign(np.sin(2 * np.pi * 90 * t))]).astype(np.float32)
    mask = np.ones((3, n), np.int32)
    mask[1, 4000:] = 0
    inputs[1, 4000:] = 0.0
    return inputs, mask


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    return speech_batch()


def with_case(m: Models, options: dict[str, Any]) -> dict[str, Any]:
    return {"max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": list(m.case.eos_token_id), **options}


def run_both(m: Models, batch: tuple[np.ndarray, np.ndarray], **options):
    """The same generate call on both frameworks: (Flax output, reference output)."""
    inputs, mask = batch
    return (m.flax.generate(inputs, mask, **with_case(m, options)),
            m.torch.generate(torch.from_numpy(inputs), torch.from_numpy(mask), **with_case(m, options)))


def generated_lengths(sequences: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    """Tokens each row generated: up to and including its first eos, else all of them."""
    return [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in sequences[:, 1:].tolist()]


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_same_scores(flax_scores: np.ndarray, torch_scores: np.ndarray, what: str) -> None:
    """Equal -inf positions (what the processors removed) and finite values within TOL_SCORE."""
    assert flax_scores.shape == torch_scores.shape, (flax_scores.shape, torch_scores.shape)
    removed = np.isneginf(flax_scores)
    assert np.array_equal(removed, np.isneginf(torch_scores)), f"{what}: the processors removed different tokens"
    err = max_diff(flax_scores[~removed], torch_scores[~removed])
    assert err <= TOL_SCORE, f"{what}: per-step scores max|diff|={err:.2e}"


def ngrams(row: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


# ----------------------------------------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("name", ["bart"])  # the decoders' own cache tests are in test_bart.py, test_gpt2.py, ...
def test_cached_decode_steps_equal_full_forward(models, batch, name):
    m = models(name)
    inputs, mask = batch
    rows = inputs.shape[0]
    ids = np.random.default_rng(1).integers(0, m.flax.config.decoder.vocab_size, (rows, MAX_NEW_TOKENS)).astype(np.int32)
    ids[:, 0] = m.flax.config.decoder_start_token_id
    encoded = m.flax.encode(inputs, mask)  # the compilation generation uses too
    full = np.asarray(m.flax.decode(ids, encoded)[0])  # [B, T, V]
    cache = m.flax.init_cache(rows, MAX_NEW_TOKENS + 1, encoded)
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
        t_cache = m.torch.init_cache(rows, MAX_NEW_TOKENS + 1, hidden, encoder_mask)
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
# Flax against the reference, every processor


@pytest.mark.parametrize(("name", "setting"), SETTINGS, ids=[f"{c}-{s}" for c, s in SETTINGS])
def test_generation_flax_equals_reference(models, batch, name, setting):
    m, options = models(name), SETTINGS[name, setting].options
    flax_out, torch_out = run_both(m, batch, **options)
    what = f"{name} {setting}"
    np.testing.assert_array_equal(flax_out.sequences, torch_out.sequences.numpy(), err_msg=f"{what}: tokens")
    err = max_diff(flax_out.sequences_scores, torch_out.sequences_scores.numpy())
    assert err <= TOL_SCORE, f"{what}: sequence scores max|diff|={err:.2e}"
    if options.get("output_scores"):
        assert_same_scores(flax_out.scores, torch_out.scores.numpy(), what)
        if options.get("num_beams", 1) > 1:
            np.testing.assert_array_equal(flax_out.beam_indices, torch_out.beam_indices.numpy())
    else:
        assert flax_out.scores is None and torch_out.scores is None

    # Not trivial: several different tokens per row, the utterances decode differently, and (mixed) some rows
    # end with an eos id while others reach the cap.
    sequences = flax_out.sequences
    assert sequences.shape[0] == 3 * options.get("num_return_sequences", 1)
    eos = m.case.eos_token_id
    lengths = generated_lengths(sequences, eos)
    for row, n in zip(sequences[:, 1:].tolist(), lengths):
        assert len(set(row[:n])) >= 3, f"{what}: degenerate row {row[:n]}"
    assert len({tuple(row) for row in sequences.tolist()}) > 1, f"{what}: every row is the same"
    if SETTINGS[name, setting].mixed:
        assert min(lengths) < MAX_NEW_TOKENS == max(lengths), f"{what}: lengths {lengths}"
    check_what_the_settings_promise(m, batch, name, setting, flax_out)


def check_what_the_settings_promise(m: Models, batch, name: str, setting: str, out) -> None:
    """What the processors and the search promise, visible in the tokens and scores of a parity run."""
    eos, start = m.case.eos_token_id, m.flax.config.decoder_start_token_id
    rows = [row[1:1 + n] for row, n in zip(out.sequences.tolist(), generated_lengths(out.sequences, eos))]
    capped = [row for row in rows if len(row) == MAX_NEW_TOKENS]
    options = SETTINGS[name, setting].options
    if (name, setting) == ("bart", "greedy"):
        # The composed generation_config.json: forced_bos_token_id=0, forced_eos_token_id=2.
        assert all(row[0] == 0 for row in rows) and capped and all(row[-1] == 2 for row in capped), rows
        # Greedy search's score (transformers has none): the mean log-softmax of the processed scores at the
        # chosen tokens, recomputed from the per-step scores.
        log_probs = torch.log_softmax(torch.tensor(out.scores, dtype=torch.float64), dim=-1).numpy()
        for i, row in enumerate(rows):
            want = float(np.mean([log_probs[i, t, token] for t, token in enumerate(row)]))
            assert abs(out.sequences_scores[i] - want) <= 1e-5, (i, out.sequences_scores[i], want)
    if setting == "mbart_style":
        forced_eos = options.get("forced_eos_token_id", 2)
        assert all(row[0] == options["forced_bos_token_id"] for row in rows), rows
        assert capped and all(row[-1] == forced_eos for row in capped), rows
        for row in rows:
            grams = ngrams([start, *row], 3)  # the start token counts too
            assert len(grams) == len(set(grams)), f"a 3-gram repeats in {row}"
    if setting == "penalties":
        for row in rows:
            assert 83 not in row and 77 not in row and (69, 69) not in ngrams(row, 2), row
            assert row[1] != 14 and not set(row[:4]) & set(eos), row  # begin_suppress at index 2 (forced BOS)
            assert len(ngrams(row, 2)) == len(set(ngrams(row, 2))), row
    if setting == "beam_returns":
        returns = options["num_return_sequences"]
        scores = out.sequences_scores.reshape(3, returns)
        assert (np.diff(scores, axis=1) <= 0).all(), scores  # best first within each utterance
        # The best returned hypothesis is the one num_return_sequences=1 returns.
        inputs, mask = (torch.from_numpy(a) for a in batch)
        single = m.torch.generate(inputs, mask, **with_case(m, {**options, "num_return_sequences": 1}))
        single = single.sequences.numpy()
        best = out.sequences[::returns]
        np.testing.assert_array_equal(single, best[:, :single.shape[1]])
        assert (best[:, single.shape[1]:] == 1).all()  # the rest is padding (transformers' pad, here 1)


# ----------------------------------------------------------------------------------------------------------
# The generation config travels with the model


def test_composed_model_carries_the_decoders_generation_settings(models):
    m = models("bart")
    written = json.loads((m.directory / "generation_config.json").read_text())
    assert written == {"bos_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "forced_bos_token_id": 0,
                       "forced_eos_token_id": 2, "pad_token_id": 1, "transformers_version": "5.24.0"}, written
    assert m.flax.generation_config.to_hf_dict() == written == m.torch.generation_config.to_hf_dict()


@pytest.fixture(scope="module")
def beam_decoder_model(fixture_dir, tmp_path_factory) -> Path:
    """bart_untied with a generation_config.json of its own (beam search, n-gram blocking, a length limit),
    composed."""
    from convert.compose import compose

    root = tmp_path_factory.mktemp("generation_config")
    decoder = root / "decoder"
    shutil.copytree(fixture_dir("bart_untied"), decoder)
    settings = {"num_beams": 2, "no_repeat_ngram_size": 2, "max_length": 13, "forced_bos_token_id": 56,
                "forced_eos_token_id": 2, "eos_token_id": [16, 2], "length_penalty": 0.8, "bos_token_id": 0,
                "decoder_start_token_id": 2, "pad_token_id": 1, "transformers_version": "4.51.0"}
    (decoder / "generation_config.json").write_text(json.dumps(settings))
    compose(str(fixture_dir("w2v_stable_adapter")), str(decoder), root / "model", verify=False, progress=False,
            log=io.StringIO())
    return root / "model"


def test_decoder_generation_config_is_the_default_and_arguments_override_it(beam_decoder_model, batch):
    inputs, mask = batch
    written = json.loads((beam_decoder_model / "generation_config.json").read_text())
    assert written["num_beams"] == 2 and written["eos_token_id"] == [16, 2] and written["max_length"] == 13
    flax_model = FlaxSpeechEncoderDecoderModel.from_pretrained(beam_decoder_model)
    reference, _ = torch_from_pretrained(beam_decoder_model)
    by_default = flax_model.generate(inputs, mask)
    explicit = reference.generate(torch.from_numpy(inputs), torch.from_numpy(mask), num_beams=2,
                                  no_repeat_ngram_size=2, max_new_tokens=12, forced_bos_token_id=56,
                                  forced_eos_token_id=2, eos_token_id=[16, 2], length_penalty=0.8)
    np.testing.assert_array_equal(by_default.sequences, explicit.sequences.numpy())
    assert max_diff(by_default.sequences_scores, explicit.sequences_scores.numpy()) <= TOL_SCORE
    assert (by_default.sequences[:, 1] == 56).all() and by_default.sequences.shape[1] <= 13
    # A call argument wins over the file; None unsets a setting as in transformers.
    greedy = reference.generate(torch.from_numpy(inputs), torch.from_numpy(mask), num_beams=1,
                                forced_bos_token_id=None)
    assert greedy.sequences.shape[0] == 3 and (greedy.sequences[:, 1] != 56).any(), greedy.sequences
    assert greedy.sequences.shape[1] <= 13


def test_generation_config_objects_equal_keyword_arguments(models, batch):
    """Our GenerationConfig, a dict, and any object with to_dict() (transformers' GenerationConfig) give what the
    same keyword arguments give."""
    m = models("bart")
    inputs, mask = (torch.from_numpy(a) for a in batch)
    options = {"num_beams": 2, "max_new_tokens": 8, "no_repeat_ngram_size": 2, "eos_token_id": [16, 2]}

    class Duck:
        def to_dict(self) -> dict[str, Any]:
            return {**options, "typical_p": None, "transformers_version": "5.24.0"}

    want = m.torch.generate(inputs, mask, **options).sequences
    for config in (GenerationConfig(**{**options, "eos_token_id": (16, 2)}), dict(options), Duck()):
        got = m.torch.generate(inputs, mask, generation_config=config).sequences
        assert torch.equal(got, want), type(config).__name__
    # Keyword arguments win over the object.
    got = m.torch.generate(inputs, mask, generation_config=dict(options), num_beams=1).sequences
    assert torch.equal(got, m.torch.generate(inputs, mask, **{**options, "num_beams": 1}).sequences)


@pytest.mark.parametrize(("options", "message"), [
    ({"typical_p": 0.5}, "typical_p=0.5: is not implemented"),
    ({"num_beam_groups": 2}, "num_beam_groups=2: is not implemented"),
    ({"constraints": [[1]]}, "constraints=[[1]]: is not implemented"),
    ({"bogus_setting": 1}, "bogus_setting=1: is not a generation setting"),
    ({"length_penalty": float("nan")}, "length_penalty=NaN: must be a finite number"),
    ({"eos_token_id": -1}, "eos_token_id=-1: must be a token id"),
    ({"max_new_tokens": 64}, "max_new_tokens=64: needs 65 decoder positions; the decoder has 64"),
    ({"eos_token_id": 96}, "eos_token_id=96: holds ids outside the decoder's vocabulary (vocab_size=96)"),
    ({"num_return_sequences": 2}, "num_return_sequences=2: needs do_sample=True or num_beams > 1"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences=3: must be at most num_beams=2"),
    ({"forced_bos_token_id": 5, "suppress_tokens": [5]}, "forced_bos_token_id=5: is also in suppress_tokens"),
    ({"decoder_input_ids": [[2, 7.5]] * 3}, "decoder_input_ids: holds float64 values, not integer token ids"),
    ({"decoder_input_ids": [[2, 96]] * 3}, "decoder_input_ids: holds ids outside the decoder's vocabulary"),
    ({"decoder_input_ids": [[2, 7]] * 2}, "decoder_input_ids: has 2 rows for 3 utterances"),
    ({"decoder_input_ids": [2, 7, 8], "max_length": 3}, "max_length=3: leaves no room after the decoder prompt"),
])
def test_bad_generation_arguments_are_refused_by_name(models, batch, options, message):
    m = models("bart")
    for generate in (m.flax.generate, m.torch.generate):
        with pytest.raises(GenerationArgumentError) as error:
            generate(batch[0], **options)
        assert str(error.value).startswith(message), str(error.value)
        assert error.value.param == message.split("=")[0].split(":")[0]


def test_a_generation_config_file_with_an_unimplemented_setting_is_refused(models, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(models("bart").directory, directory)
    for settings, message in (({"typical_p": 0.9}, "typical_p=0.9: is not implemented by this toolkit"),
                              ({"alignment_heads": [[1, 2]]}, "alignment_heads is not a generation setting"),
                              ({"num_beams": 0}, "num_beams=0: must be an integer >= 1")):
        (directory / "generation_config.json").write_text(json.dumps({"num_beams": 1, **settings}))
        for load in (FlaxSpeechEncoderDecoderModel.from_pretrained, SpeechEncoderDecoderModel.from_pretrained):
            with pytest.raises(GenerationConfigError) as error:
                load(directory)
            assert str(error.value).startswith(f"{directory / 'generation_config.json'}: {message}"), str(error.value)
    # Settings at their no-op value are accepted (old configs list every default).
    (directory / "generation_config.json").write_text(json.dumps({"typical_p": 1.0, "diversity_penalty": 0.0,
                                                                  "num_beam_groups": 1, "use_cache": True}))
    assert SpeechEncoderDecoderModel.from_pretrained(directory).generation_config.num_beams is None


def test_compose_refuses_a_decoder_generation_setting_it_does_not_implement(fixture_dir, tmp_path):
    from convert.compose import compose
    from convert.base.errors import ConvertError

    decoder = tmp_path / "decoder"
    shutil.copytree(fixture_dir("bart_untied"), decoder)
    (decoder / "generation_config.json").write_text(json.dumps({"num_beams": 4, "diversity_penalty": 0.5}))
    with pytest.raises(ConvertError) as error:
        compose(str(fixture_dir("w2v_stable_adapter")), str(decoder), tmp_path / "out", verify=False,
                progress=False, log=io.StringIO())
    assert "generation_config.json: diversity_penalty=0.5: is not implemented" in str(error.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Compilation


def test_second_generate_call_does_not_trace_again(models, batch):
    m = models("bart")
    inputs, mask = batch
    options = {**SETTINGS["bart", "penalties"].options, "max_new_tokens": MAX_NEW_TOKENS,
               "eos_token_id": list(m.case.eos_token_id)}
    first = m.flax.generate(inputs, mask, **options)
    traces = flax_generation.TRACES["greedy"]
    second = m.flax.generate(inputs, mask, **options)
    # length_penalty, min_new_tokens and repetition_penalty are traced arguments: new values, no new compile.
    changed = m.flax.generate(inputs, mask, **{**options, "repetition_penalty": 2.5, "min_new_tokens": 9,
                                               "length_penalty": 0.3})
    assert flax_generation.TRACES["greedy"] == traces, "traced again for the same static settings and shapes"
    np.testing.assert_array_equal(first.sequences, second.sequences)
    reference = m.torch.generate(torch.from_numpy(inputs), torch.from_numpy(mask),
                                 **{**options, "repetition_penalty": 2.5, "min_new_tokens": 9, "length_penalty": 0.3})
    np.testing.assert_array_equal(changed.sequences, reference.sequences.numpy())
    assert not np.isin(changed.sequences[:, 1:10], m.case.eos_token_id).any(), changed.sequences


# ----------------------------------------------------------------------------------------------------------
# Inputs generate cannot read: refused on the host, naming the argument and both shapes, before anything compiles


def _refused(generate, inputs, mask, message: str, param: str) -> None:
    with pytest.raises(GenerationArgumentError) as error:
        generate(inputs, mask, max_new_tokens=2)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text and error.value.param == param, text
    assert isinstance(error.value, ValueError)


def _bad_waveform_inputs(generate, batch) -> None:
    inputs, mask = batch
    _refused(generate, inputs, mask[:, :100], "attention_mask: shape [3, 100] is not [B, samples] = [3, 6000]",
             "attention_mask")
    _refused(generate, inputs, mask[:2], "attention_mask: shape [2, 6000] is not [B, samples] = [3, 6000]",
             "attention_mask")
    _refused(generate, inputs[0], None, "inputs: shape [6000] is not [B, samples]", "inputs")
    _refused(generate, inputs[:, :, None], mask, "inputs: shape [3, 6000, 1] is not [B, samples]", "inputs")
    _refused(generate, inputs, mask * 0.5, "attention_mask: holds 0.5; a mask holds only 0 and 1", "attention_mask")
    _refused(generate, inputs, mask * 2, "attention_mask: holds 2; a mask holds only 0 and 1", "attention_mask")


def test_generate_refuses_inputs_and_masks_of_the_wrong_shape_or_values(models, batch):
    m = models("bart")
    compiled = lambda: (len(m.flax._compiled), sum(flax_generation.TRACES.values()))  # noqa: E731
    before = compiled()
    _bad_waveform_inputs(m.flax.generate, batch)
    assert compiled() == before  # refused before anything compiled
    # Masks of 0 and 1 as booleans or floats are read as the integers.
    inputs, mask = batch
    expected = m.flax.generate(inputs, mask, max_new_tokens=3).sequences
    for same in (mask.astype(bool), mask.astype(np.float32)):
        np.testing.assert_array_equal(m.flax.generate(inputs, same, max_new_tokens=3).sequences, expected)


def test_generate_on_a_feature_encoder_refuses_waveforms(composed_dir):
    from convert.base.configs import seeded_encoder_inputs

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir("w2vbert", "bart_untied"))
    width = model.config.encoder.input_feature_size
    waveforms = np.zeros((2, 16000), np.float32)
    _refused(model.generate, waveforms, np.ones((2, 16000), np.int32),
             f"inputs: shape [2, 16000] is not [B, frames, {width}] with B and frames at least 1 (this model's "
             f"encoder reads feature frames of width {width})", "inputs")
    inputs, mask = seeded_encoder_inputs(model.config.encoder, [7, 5], np.random.default_rng(0))
    _refused(model.generate, inputs, np.ones((2, 7 * width)), f"attention_mask: shape [2, {7 * width}] is not "
             "[B, frames] = [2, 7]", "attention_mask")
    _refused(model.generate, inputs[..., :-1], mask, f"inputs: shape [2, 7, {width - 1}] is not [B, frames, {width}]",
             "inputs")


def test_prefix_generate_refuses_inputs_and_masks_of_the_wrong_shape_or_values(fixture_dir, fixtures_root, batch):
    from convert.compose_prefix import compose_prefix
    from flax_model.prefix import FlaxSpeechPrefixModel
    from scripts.prefix_cases import COMPOSE, ENCODERS, LMS, lm_with_tokenizer

    encoder, decoder = ENCODERS[0], LMS[0]
    out = fixtures_root / "prefix" / f"{encoder}+{decoder}"  # test_prefix_model.py's composition, shared
    if not (out / "config.json").exists():
        lm = lm_with_tokenizer(fixture_dir(decoder), fixtures_root / "prefix_lm" / decoder)
        compose_prefix(str(fixture_dir(encoder)), str(lm), out, **COMPOSE, verify=False, progress=False,
                       log=io.StringIO())
    model = FlaxSpeechPrefixModel.from_pretrained(out)
    assert model.config.encoder.input_kind == "waveform"
    _bad_waveform_inputs(model.generate, batch)
    assert not model._compiled  # a fresh model: refused before anything compiled
