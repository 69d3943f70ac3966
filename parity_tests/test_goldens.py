"""Fidelity to Hugging Face transformers itself: our Flax model and our PyTorch reference against the goldens
that scripts/make_goldens.py recorded with transformers 5 on the same fixtures (parity_tests/goldens/).

The other parity tests compare our two implementations with each other, so a formula both share could be
wrong in both; these compare each with transformers' numbers. transformers is not imported here.

Logits are compared in float64 (both of our models and transformers'; `float64.py`): float32 logits of magnitude
~10 move by up to ~1e-5 with the CPU (transformers' own float32 Qwen2 logits lie 8e-6 to 1.3e-5 from its float64
ones), which would make a 1e-5 test a draw. Encoder outputs (magnitude ~1, within 5e-6 in float32 everywhere
measured), generated tokens and scores are compared as users compute them, in float32.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.base.audio import feature_extractor_config
from convert.base.composed import SpeechEncoderDecoderConfig, composed_keymap
from convert.base.params import load_params
from convert.extract import extract
from flax_model import generation as flax_generation
from flax_model import layers as flax_layers
from flax_model import registry as flax_registry
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule, param_shapes
from torch_reference import generation as torch_generation
from torch_reference import layers as torch_layers
from torch_reference import registry as torch_registry
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained
from parity_tests import float64 as f64

GOLDENS = Path(__file__).parent / "goldens"
MANIFEST = json.loads((GOLDENS / "manifest.json").read_text())
CASES: dict[str, dict[str, Any]] = MANIFEST["cases"]
TOL = 1e-5
TOL_SCORE = 1e-4
REMAKE = "re-run scripts/make_goldens.py (see its docstring)"


def cases(kind: str, needs: str | None = None) -> list[str]:
    """The manifest's cases of one kind (`encoder`, `decoder`, `composed`); with `needs`, only those that
    recorded that array."""
    return [n for n, c in CASES.items() if c["kind"] == kind and (needs is None or needs in c.get("arrays", ()))]


GENERATIONS = [(n, s) for n in cases("composed") for s in CASES[n]["generation"]]


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / CASES[name]["file"]) as f:
        return dict(f)


@functools.cache
def inputs(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / MANIFEST["inputs"][name]["file"]) as f:
        return dict(f)


def speech(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A speech input set's encoder input: log-mel frames (`input_features`) or samples (`input_values`)."""
    return batch["input_features"] if "input_features" in batch else batch["input_values"]


def max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs transformers' {b.shape}"
    return float(np.max(np.abs(a - b)))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors_digest(path: Path) -> str:
    """The digest make_goldens.py records for a composed model: its tensors, not the file's layout."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def checked_fixtures(name: str, fixture_dir: Callable[[str], Path]) -> dict[str, Path]:
    """Builds the fixtures of a case and checks that they are the bytes the goldens were made from."""
    dirs = {}
    for fixture, files in CASES[name]["fixtures"].items():
        directory = fixture_dir(fixture)
        found = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
        changed = sorted(f for f in found.keys() | files.keys() if found.get(f) != files.get(f))
        assert not changed, f"fixture {fixture} changed since the goldens were made ({', '.join(changed)}): {REMAKE}"
        dirs[fixture] = directory
    return dirs


# ----------------------------------------------------------------------------------------------------------
# Single architectures


@functools.cache
def _jit_apply(config: Any) -> Callable:
    """The Flax module's `apply`, run op by op: the tiny models' operations compile once per worker and serve
    every fixture, where a jit per config would compile each model whole (the jitted path is covered by the
    composed-model and generation goldens)."""
    return flax_registry.module_for(config).apply


def load_both(directory: Path) -> tuple[Any, Callable, dict, Any]:
    """(config, Flax apply, Flax params, reference model) of a single-architecture checkpoint."""
    loaded = load_params(directory, param_shapes)
    reference, _ = torch_registry.from_pretrained(directory)
    return loaded.config, _jit_apply(loaded.config), loaded.params, reference


@pytest.mark.parametrize("name", cases("encoder"))
def test_encoder_output_and_frames_match_transformers(name, fixture_dir):
    directory = checked_fixtures(name, fixture_dir)[name]
    compare_encoder(name, directory, CASES[name]["settings"], golden(name))


def compare_encoder(name: str, directory: Path, settings: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    """Our frame arithmetic and both encoders on `directory` against transformers' recorded arrays."""
    config, apply, params, reference = load_both(directory)
    batch = inputs(settings["inputs"])
    values, mask = speech(batch), batch["attention_mask"]

    # Frame arithmetic first: a wrong length shows here before it shows as a shape mismatch below.
    for add_adapter in (False, True):
        got = np.asarray(config.output_lengths(batch["lengths"], add_adapter))
        expected = want[f"lengths_{'with' if add_adapter else 'without'}_adapter"]
        wrong = np.flatnonzero(got != expected)
        assert wrong.size == 0, (f"{name}: output_lengths(add_adapter={add_adapter}) differs from transformers' for "
                                f"{wrong.size} lengths, e.g. {batch['lengths'][wrong[0]]} input steps: "
                                f"{got[wrong[0]]} frames vs {expected[wrong[0]]}")
    frames = want["frame_mask"].shape[1]
    flax_mask = flax_layers.frame_mask(config, mask, frames)
    torch_mask = torch_layers.frame_mask(config, torch.from_numpy(mask), frames)
    np.testing.assert_array_equal(np.asarray(flax_mask), want["frame_mask"], err_msg=f"{name}: Flax frame mask")
    np.testing.assert_array_equal(torch_mask.numpy(), want["frame_mask"], err_msg=f"{name}: reference frame mask")

    flax_hidden = apply({"params": params}, values, mask)
    with torch.no_grad():
        torch_hidden = reference(torch.from_numpy(values), torch.from_numpy(mask)).numpy()
    for who, hidden in (("Flax", flax_hidden), ("reference", torch_hidden)):
        err = max_diff(hidden, want["last_hidden_state"])
        assert err <= TOL, f"{name}: {who} last_hidden_state vs transformers: max|diff|={err:.2e}"


@pytest.mark.parametrize("name", cases("decoder"))
def test_decoder_logits_match_transformers(name, fixture_dir):
    directory = checked_fixtures(name, fixture_dir)[name]
    compare_decoder(name, directory, CASES[name]["settings"], golden(name))


def compare_decoder(name: str, directory: Path, settings: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    """Both decoders on `directory` against transformers' recorded logits, all in float64."""
    config, _, params, reference = load_both(directory)
    batch = {k: v for k, v in inputs(settings["inputs"]).items() if k in settings["inputs_used"]}
    flax_logits, _ = f64.flax_apply(flax_registry.module_for(config), params, **batch)
    with torch.no_grad():
        torch_logits, _ = reference.double()(**dict(zip(batch, f64.torch_inputs(*batch.values()))))
    for who, logits in (("Flax", flax_logits), ("reference", torch_logits.numpy())):
        err = max_diff(logits, want["logits_f64"])
        assert err <= TOL, f"{name}: {who} logits vs transformers (float64): max|diff|={err:.2e}"


@pytest.mark.parametrize("name", cases("decoder", needs="greedy"))
def test_text_lm_cached_decoding_and_greedy_search_match_transformers(name, fixture_dir):
    """A decoder-only LM on text alone, through its cache: the padded batch's prompt at once, then one token per
    call, gives transformers' cached logits (in float64); greedy search from the unpadded prompts gives its tokens
    (in float32)."""
    directory = checked_fixtures(name, fixture_dir)[name]
    config, apply, params, reference = load_both(directory)
    batch, want = inputs(CASES[name]["settings"]["inputs"]), golden(name)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefill, prompt = int(want["prefill_length"]), int(want["prompt_length"])
    steps = want["greedy"].shape[1] - prompt
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]
    module = flax_registry.module_for(config).clone(dtype=jnp.float64)
    with jax.enable_x64(True):
        params64 = f64.float64(params)
        cache = module.apply({"params": params64}, 2, ids.shape[1], method="init_cache")
        pieces = []
        for start, stop in chunks:
            logits, cache = module.apply({"params": params64}, ids[:, start:stop], mask, cache=cache)
            pieces.append(np.asarray(logits))
    reference64 = copy.deepcopy(reference).double()
    cache = reference64.init_cache(2, ids.shape[1])
    for start, stop in chunks:
        with torch.no_grad():
            logits, cache = reference64(torch.from_numpy(ids[:, start:stop]), torch.from_numpy(mask), cache=cache)
        pieces.append(logits.numpy())
    for who, got in (("Flax", pieces[:len(chunks)]), ("reference", pieces[len(chunks):])):
        err = max_diff(np.concatenate(got, axis=1), want["cached_logits_f64"])
        assert err <= TOL, f"{name}: {who} cached logits vs transformers' (float64): max|diff|={err:.2e}"

    variables = {"params": params}

    def flax_step(tokens, slot_mask, cache):
        return apply(variables, tokens, slot_mask, cache=cache)

    def torch_step(tokens, slot_mask, cache):
        with torch.no_grad():
            logits, cache = reference(torch.from_numpy(tokens), torch.from_numpy(slot_mask), cache=cache)
        return logits.numpy(), cache

    for who, step, init in (("Flax", flax_step, lambda b, n: apply(variables, b, n, method="init_cache")),
                            ("reference", torch_step, reference.init_cache)):
        cache = init(2, prompt + steps)
        slot_mask = np.ones((2, prompt + steps), np.int32)
        tokens = ids[:, :prompt]
        generated = []
        for _ in range(steps):
            logits, cache = step(tokens, slot_mask, cache)
            tokens = np.argmax(np.asarray(logits)[:, -1], axis=-1).astype(np.int32)[:, None]
            generated.append(tokens)
        np.testing.assert_array_equal(np.concatenate(generated, axis=1), want["greedy"][:, prompt:],
                                      err_msg=f"{name}: {who} greedy tokens vs transformers'")


ROTARY_CASES = [n for n in cases("decoder", needs="greedy")]


@pytest.mark.parametrize("name", ROTARY_CASES)
def test_composed_decoder_without_audio_is_transformers_causal_lm(name, fixture_dir, composed_dir):
    """The text-only path (`decode` without an encoder output: cross-attention skipped) of a decoder composed with
    a speech encoder, the created cross-attention in every layer, gives transformers' `...ForCausalLM` logits on
    the source checkpoint."""
    checked_fixtures(name, fixture_dir)
    directory = composed_dir("w2v_group", name)
    loaded = load_params(directory, param_shapes)
    assert loaded.config.decoder.has_cross_attention
    batch = inputs(CASES[name]["settings"]["inputs"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    flax_logits, _ = f64.flax_apply(SpeechEncoderDecoderModule(loaded.config), loaded.params, ids, None, None, mask,
                                    method="decode")
    reference, _ = torch_from_pretrained(directory)
    with torch.no_grad():
        torch_logits, _ = reference.double().decode(torch.from_numpy(ids), None, None, torch.from_numpy(mask))
    for who, logits in (("Flax", flax_logits), ("reference", torch_logits.numpy())):
        err = max_diff(logits, golden(name)["logits_f64"])
        assert err <= TOL, f"{name} composed, text alone: {who} logits vs transformers (float64): max|diff|={err:.2e}"


@pytest.mark.parametrize("name", cases("extracted"))
def test_extracted_parts_load_in_transformers_and_match_it(name, fixture_dir, composed_dir, tmp_path):
    """`convert.extract` writes each part of a composed model so that transformers' class of the part loads every
    weight (only the BatchNorm step counters our files never hold are missing), and computes on the decoder what our
    models compute on it."""
    directory = checked_composition(name, fixture_dir, composed_dir)
    for part, recorded in CASES[name]["parts"].items():
        out = extract(directory, part, tmp_path / part, log=io.StringIO()).output
        assert tensors_digest(out / "model.safetensors") == recorded["extracted_tensors_sha256"], (
            f"{name}: the extracted {part} holds other weights than when the goldens were made: {REMAKE}")
        info = recorded["loading_info"]
        missing = [k for k in info["missing_keys"] if not k.endswith(".num_batches_tracked")]
        assert not (missing or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]), (
            f"{name}: transformers' {recorded['transformers_class']} did not load the extracted {part} whole: {info}")
        if part == "decoder":
            want = {k.removeprefix("decoder/"): v for k, v in golden(name).items() if k.startswith("decoder/")}
            compare_decoder(f"{name} decoder", out, recorded["settings"], want)


# ----------------------------------------------------------------------------------------------------------
# Composed models


def checked_composition(name: str, fixture_dir: Callable[[str], Path], composed_dir: Callable[..., Path]) -> Path:
    """Composes the pair of a case (session fixture) and checks that it holds the tensors the goldens saw."""
    case = CASES[name]
    checked_fixtures(name, fixture_dir)
    directory = composed_dir(case["encoder"], case["decoder"], **case["settings"]["compose"])
    assert tensors_digest(directory / "model.safetensors") == case["composed_tensors_sha256"], (
        f"composing {case['encoder']} + {case['decoder']} gives other weights than when the goldens were made: "
        f"{REMAKE}")
    return directory


@pytest.fixture(scope="module")
def composed(fixture_dir, composed_dir) -> Callable[[str], tuple[FlaxSpeechEncoderDecoderModel, Any]]:
    """`composed(name)`: (Flax model, reference model) of a composed case, loaded once per module so that the
    logits and generation tests share their compilations."""
    loaded: dict[str, tuple[FlaxSpeechEncoderDecoderModel, Any]] = {}

    def load(name: str) -> tuple[FlaxSpeechEncoderDecoderModel, Any]:
        if name not in loaded:
            directory = checked_composition(name, fixture_dir, composed_dir)
            loaded[name] = FlaxSpeechEncoderDecoderModel.from_pretrained(directory), torch_from_pretrained(directory)[0]
        return loaded[name]

    return load


def expected_loading_info(config: Any) -> dict[str, list]:
    """What transformers' SpeechEncoderDecoderModel.from_pretrained should report for our output (README):
    every key found, except
    * a BART source's non-zero final_logits_bias, kept as `decoder.final_logits_bias`, for which
      BartForCausalLM has no place;
    * transformers sizes `enc_to_dec_proj` by the encoder's `hidden_size` though it projects the adapter's
      `output_hidden_size` (transformers 5.24; its forward then fails): our [decoder width, output width]
      weight is reported as mismatched when the two widths differ;
    * every BatchNorm's integer step counter (`num_batches_tracked`), which our files leave out (floating-point
      weights only; it changes no output), is reported missing."""
    info: dict[str, list] = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    keymap = composed_keymap(config)
    info["missing_keys"] = sorted(key.removesuffix("running_mean") + "num_batches_tracked" for key in (
        keymap.to_torch(path)[0] for path in param_shapes(config)) if key.endswith(".running_mean"))
    if getattr(config.decoder, "lm_head_bias", False):
        info["unexpected_keys"].append("decoder.final_logits_bias")
    encoder_width, hidden = config.encoder.encoder_output_size, config.encoder.hidden_size
    if config.has_projection and encoder_width != hidden:
        width = config.decoder.hidden_size
        info["mismatched_keys"].append(["enc_to_dec_proj.weight", [width, encoder_width], [width, hidden]])
    return info


@pytest.mark.parametrize("name", cases("composed"))
def test_transformers_loads_composed_model_as_documented(name, fixture_dir, composed_dir):
    directory = checked_composition(name, fixture_dir, composed_dir)
    config = SpeechEncoderDecoderConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
    assert CASES[name]["loading_info"] == expected_loading_info(config), name
    if config.encoder.input_kind == "features":  # transformers' processor makes this encoder's log-mel frames
        settings = feature_extractor_config(directory, config.encoder)
        recorded = CASES[name]["feature_extractor"]
        assert (recorded["class"], recorded["padding_value"]) == (settings.extractor, settings.padding_value), name


@pytest.mark.parametrize("name", cases("composed", needs="logits_f64"))
def test_composed_logits_match_transformers(name, composed):
    """Logits and the encoder's frame mask in float64 (both models op by op; see the module's docstring)."""
    flax_model, reference = composed(name)
    batch, want = inputs(CASES[name]["settings"]["inputs"]), golden(name)
    args = (speech(batch), batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
    module = SpeechEncoderDecoderModule(flax_model.config)
    flax_logits = f64.flax_apply(module, flax_model.params, *args)
    flax_mask = f64.flax_apply(module, flax_model.params, *args[:2], method="encode_features")[1]
    with torch.no_grad():
        torch_out = copy.deepcopy(reference).double()(*f64.torch_inputs(*args))
    for who, logits, mask in (("Flax", flax_logits, flax_mask),
                              ("reference", torch_out.logits.numpy(), torch_out.encoder_attention_mask.numpy())):
        err = max_diff(logits, want["logits_f64"])
        wrong = np.argwhere(mask != want["encoder_frame_mask"]).tolist()
        assert err <= TOL and not wrong, (f"{name}: {who} vs transformers (float64): logits max|diff|={err:.2e}, "
                                          f"encoder frame mask differs at [row, frame] {wrong}")


def generate_options(generate: Callable, settings: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings as keyword arguments of one of our `generate` functions. A setting recorded as None
    (unset: its processor off) is left out where that `generate` has no such parameter, for it then has no such
    processor either; every other setting is passed, so one we do not implement fails loudly."""
    parameters = inspect.signature(generate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(settings)
    return {k: v for k, v in settings.items() if v is not None or k in parameters}


def sequences_scores(out: Any) -> np.ndarray:
    """The beam scores of a generate output: `sequences_scores` (transformers' name), else `scores`."""
    scores = getattr(out, "sequences_scores", None)
    scores = out.scores if scores is None else scores
    return scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)


@pytest.mark.parametrize(("name", "setting"), GENERATIONS, ids=[f"{n}-{s}" for n, s in GENERATIONS])
def test_generation_matches_transformers(name, setting, composed):
    """Tokens equal to transformers' and beam scores within TOL_SCORE; where recorded, each step's processed
    scores too (the same tokens removed, the rest within TOL_SCORE). A sampling row is compared by its processed
    scores only (the draws come from other generators)."""
    flax_model, reference = composed(name)
    batch, want = inputs(CASES[name]["settings"]["inputs"]), golden(name)
    recorded = CASES[name]["generation"][setting]
    settings = recorded["settings"]  # every option transformers was given
    per_step = f"{setting}.scores" in want
    if per_step:
        settings = {**settings, "output_scores": True}
    values, mask = speech(batch), batch["attention_mask"]
    flax_out = flax_model.generate(values, mask, prng_key=jax.random.PRNGKey(0),
                                   **generate_options(flax_generation.generate, settings))
    torch_out = reference.generate(torch.from_numpy(values), torch.from_numpy(mask),
                                   **generate_options(torch_generation.generate, settings))
    outputs = (("Flax", flax_out), ("reference", torch_out))
    if per_step:
        for who, out in outputs:
            scores = out.scores.numpy() if isinstance(out.scores, torch.Tensor) else np.asarray(out.scores)
            expected = want[f"{setting}.scores"]
            assert scores.shape == expected.shape, f"{name} {setting}: {who} scores {scores.shape} vs {expected.shape}"
            removed = np.isneginf(expected)
            assert np.array_equal(np.isneginf(scores), removed), (
                f"{name} {setting}: {who} removes other tokens than transformers' processors")
            err = max_diff(scores[~removed], expected[~removed])
            assert err <= TOL_SCORE, f"{name} {setting}: {who} per-step scores vs transformers: max|diff|={err:.2e}"
    if recorded.get("sampled"):
        return
    sequences = want[f"{setting}.sequences"]
    for who, out in (("Flax", flax_out.sequences), ("reference", torch_out.sequences.numpy())):
        np.testing.assert_array_equal(out, sequences, err_msg=f"{name} {setting}: {who} tokens vs transformers'")
    if f"{setting}.sequences_scores" in want:
        for who, out in outputs:
            err = max_diff(sequences_scores(out), want[f"{setting}.sequences_scores"])
            assert err <= TOL_SCORE, f"{name} {setting}: {who} beam scores vs transformers: max|diff|={err:.2e}"


# ----------------------------------------------------------------------------------------------------------
# Feature extraction


@pytest.mark.parametrize("name", cases("feature_extractor"))
def test_log_mel_features_match_transformers(name):
    """`convert.base.fbank` (numpy) against transformers' SeamlessM4TFeatureExtractor on speech-like utterances:
    features within 1e-4, identical masks, for each recorded run (the batch padded to its longest, utterances on
    their own, a batch padded to a fixed number of frames)."""
    from convert.base import fbank

    settings = CASES[name]["settings"]
    extractor = {"num_mel_bins": 80, "stride": 2, "padding_value": 0.0, **settings["extractor"]}
    utterances, want = inputs(settings["inputs"]), golden(name)
    waves = [(pcm[:n] / 2 ** 15).astype(np.float32) for pcm, n in zip(utterances["pcm16"], utterances["lengths"])]
    for run, recorded in settings["runs"].items():
        frames = recorded.get("max_length")
        features, mask = fbank.batch_features(
            [waves[i] for i in recorded["utterances"]], extractor["num_mel_bins"], extractor["stride"],
            extractor["padding_value"], settings["sampling_rate"], None if frames is None else fbank.min_samples(frames))
        np.testing.assert_array_equal(mask, want[f"{run}.attention_mask"], err_msg=f"{name} {run}: attention mask")
        err = max_diff(features, want[f"{run}.input_features"])
        assert err <= 1e-4, f"{name} {run}: features vs transformers: max|diff|={err:.2e}"
