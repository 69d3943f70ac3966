"""Golden values from Hugging Face transformers itself, computed on our seeded fixtures (parity_tests/goldens/).

Every other test compares our Flax model with our own PyTorch reference, so a formula that both share (the
adapter's frame arithmetic, a layer-norm eps, a mask rule) could be wrong in both and still pass. These
goldens are what transformers' own classes compute on the same checkpoint files; `parity_tests/test_goldens.py`
checks both of our implementations against them without importing transformers.

Run it in an environment of its own (transformers is never a dependency of the package or of its tests):

    python -m venv /tmp/goldens-env && . /tmp/goldens-env/bin/activate
    pip install -c constraints.txt -e . transformers==5.24.0
    python scripts/make_goldens.py [--only NAME ...] [--out parity_tests/goldens]

`--only` regenerates the named cases (a fixture name such as `w2v_group`, or a pair `w2v_group+mbart`) and
keeps the others in the manifest. The fixtures are built into a temporary directory by
`scripts.make_fixtures.build` (their bytes are deterministic for the pinned torch 2.13.0) and the pairs are
composed there by `convert.compose.compose`.

What is written:
    manifest.json        every case: its fixtures and the sha256 of each of their files (the composed pairs also
                         the digest of the composed tensors), what transformers reported when loading (missing,
                         unexpected, mismatched keys), the transformers class, the settings used, the versions
                         of transformers / torch / numpy, and the `.npz` file holding its arrays.
    inputs_<set>.npz     the seeded inputs every case of that set was run on (stored, not only re-derivable).
    <case>.npz           float32 outputs (hidden states, logits, beam scores) and integer ones (lengths, masks,
                         tokens), compressed. The logits of decoders and composed pairs are those of a float64 run
                         instead (`<name>_f64`, FLOAT64_OUTPUTS), stored rounded to float32.

Adding cases (rows of the tables below, nothing else):
    * a new architecture (HuBERT, WavLM, data2vec-audio, BERT, RoBERTa, ...): a row in ARCHITECTURES keyed by
      the `architectures[0]` its fixtures' config.json names: the transformers class that loads them and the
      recorder (`record_speech_encoder` for speech encoders, `record_causal_lm` for decoders; a new kind of
      model gets a new recorder and a matching comparison in test_goldens.py). Every fixture of
      `scripts.make_fixtures.CASES` whose architecture has a row is then covered, except those in
      SKIPPED_FIXTURES.
    * a new composed pair: a row in PAIRS (its `inputs` names the input set: raw audio, or log-mel features for an
      encoder that reads features).
    * a pair whose parts `convert.extract` writes: a row in EXTRACTED. Each part is loaded by the transformers class
      its extracted config names and recorded as a fixture of that class (its ARCHITECTURES row); the test extracts
      the same parts and compares our models on them.
    * rotary settings: a row in ROPE_ROWS (transformers' inverse frequencies for a config's RoPE fields).
    * a new feature-extractor setting: a row in FEATURE_EXTRACTORS (transformers' extractor on the speech-like
      utterances of the `utterances` input set).
    * a new generation setting (forced BOS/EOS, no_repeat_ngram_size, repetition_penalty, several eos ids,
      ...): a row in GENERATION; list its name in the `generate` field of the pairs it should run on. The row's
      settings (over GENERATION_BASE and the pair's ids, which a row may replace; a row of MODEL_DEFAULTS_ROWS
      alone, so that the composed generation_config.json decides) are passed verbatim as keyword arguments to
      transformers' `generate` and, by the test, to our two `generate` functions, so a setting we do not
      implement fails loudly. Rows in PER_STEP_SCORES record each step's processed scores too. Sampling cannot
      give equal tokens across two RNGs: a sampling row (`do_sample`) is compared by those scores (one step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import io
import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOLDENS_DIR = Path(__file__).resolve().parent.parent / "parity_tests" / "goldens"
MANIFEST = "manifest.json"
FORMAT = 1
FIXTURE_TORCH = "2.13.0"  # the seeded fixtures are bit-for-bit those of this torch (constraints.txt)

# transformers' eager attention: the plain softmax(QK^T)V that our code writes out too.
ATTN_IMPLEMENTATION = "eager"
# Outputs recorded from a float64 run (the checkpoint loaded with dtype=torch.float64, float inputs cast) instead of
# the float32 one, as `<name>_f64`, stored rounded to float32 (within half an ulp: 4.8e-7 below 16). Float32 logits
# of magnitude ~10 move by up to ~1e-5 with the CPU that computes them (transformers' own float32 Qwen2 logits lie
# 8e-6 to 1.3e-5 from its float64 ones, by machine), so the tests hold both of our models, run in float64, to these:
# the formulas compared without float32's noise. transformers keeps a few steps in float32 even then: the softmax
# and the rotary tables, as our models do, and the RMSNorm, which ours compute in float64 (Llama-family logits
# differ by ~5e-6).
FLOAT64_OUTPUTS = ("logits", "cached_logits")

# ----------------------------------------------------------------------------------------------------------
# Inputs: seeded padded batches of 2, stored with the goldens.


def audio_inputs() -> dict[str, np.ndarray]:
    """Two utterances of noise, the second 65% as long (zeros, then padding), and a grid of input lengths."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 800)).astype(np.float32)
    mask = np.ones((2, 800), np.int32)
    values[1, 520:], mask[1, 520:] = 0.0, 0
    # Short lengths near the first frames (where rounding goes wrong first) and a spread of longer ones.
    lengths = np.unique(np.concatenate([np.arange(20, 120), rng.integers(120, 50_000, 60)])).astype(np.int32)
    return {"input_values": values, "attention_mask": mask, "lengths": lengths}


def text_inputs() -> dict[str, np.ndarray]:
    """Decoder ids with row 1 right-padded, and an encoder output (width 32) with row 0 right-padded."""
    rng = np.random.default_rng(1)
    mask = np.ones((2, 8), np.int32)
    mask[1, 6:] = 0
    encoder_mask = np.ones((2, 10), np.int32)
    encoder_mask[0, 7:] = 0
    return {
        "input_ids": rng.integers(0, 96, (2, 8)).astype(np.int32),
        "attention_mask": mask,
        "encoder_hidden_states": rng.standard_normal((2, 10, 32)).astype(np.float32),
        "encoder_attention_mask": encoder_mask,
    }


def text_inputs_with_pad_ids() -> dict[str, np.ndarray]:
    """`text_inputs` with the ids 0 and 1 (BERT's and RoBERTa's pad tokens) inside both rows: RoBERTa gives pad
    tokens the padding position and counts only the others."""
    batch = text_inputs()
    batch["input_ids"][0, [2, 5]] = (1, 0)
    batch["input_ids"][1, [1, 3]] = (0, 1)
    return batch


def speech_inputs() -> dict[str, np.ndarray]:
    """The batch of parity_tests/test_generation.py (whose eos ids give non-trivial generations) and decoder ids
    with row 1 right-padded."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 4000)).astype(np.float32)
    mask = np.ones((2, 4000), np.int32)
    values[1, 2600:], mask[1, 2600:] = 0.0, 0
    ids = np.random.default_rng(1).integers(0, 96, (2, 8)).astype(np.int32)
    decoder_mask = np.ones((2, 8), np.int32)
    decoder_mask[1, 6:] = 0
    return {"input_values": values, "attention_mask": mask, "decoder_input_ids": ids,
            "decoder_attention_mask": decoder_mask}


def speech_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Seeded audio with speech's structure (numpy only): 80 ms windows overlapping by half, each voiced (a buzzy
    pulse train at a drifting pitch of 80-260 Hz shaped by three formants), fricative (noise shaped by two high
    formants) or near-silent, at varying loudness. Log-mel features of white noise are flat; these have the
    harmonics, formants, onsets and pauses a feature extractor meets in speech."""
    rng = np.random.default_rng(seed)
    n, window = int(seconds * rate), int(0.08 * rate)
    out = np.zeros(n)
    t = np.arange(window) / rate
    freqs = np.fft.rfftfreq(window, 1 / rate)
    pitch = 90 + 130 * rng.random()
    for start in range(0, n - window + 1, window // 2):
        kind = rng.choice(["voiced", "voiced", "voiced", "fricative", "pause"])
        if kind == "voiced":
            pitch = float(np.clip(pitch * np.exp(0.1 * rng.standard_normal()), 80, 260))
            phase = 2 * np.pi * pitch * t + 2 * np.pi * rng.random()
            source = 0.5 * np.sign(np.sin(phase)) + 0.5 * np.sin(phase)
            formants, gain = (rng.uniform(300, 900), rng.uniform(900, 2400), rng.uniform(2400, 3500)), 0.3
        elif kind == "fricative":
            source, gain = rng.standard_normal(window), 0.05
            formants = (rng.uniform(2500, 4000), rng.uniform(4000, 7000))
        else:
            source, formants, gain = rng.standard_normal(window), (), 0.002
        envelope = 0.05 + sum(1.0 / (1.0 + ((freqs - f) / (0.08 * f + 50)) ** 2) for f in formants)
        shaped = np.fft.irfft(np.fft.rfft(source) * envelope, n=window)
        loudness = gain * (0.3 + 0.7 * rng.random())
        out[start:start + window] += loudness * np.hanning(window) * shaped / np.abs(shaped).max()
    # On 16-bit PCM's grid, as audio read from a file is.
    return (np.round(out * 2 ** 15) / 2 ** 15).astype(np.float32)


# Utterance lengths (seconds) of the feature-extractor goldens: an even and an odd number of 10 ms frames (62, 45),
# the shortest audio that makes two frames (560 samples), and a second.
UTTERANCE_SECONDS = (0.635, 0.465, 0.035, 1.02)


def utterance_inputs() -> dict[str, np.ndarray]:
    """Speech-like utterances (`speech_like`) as 16-bit sample values (x 2^15), right-padded with zeros into one
    array, and their lengths."""
    waves = [speech_like(s, seed) for seed, s in enumerate(UTTERANCE_SECONDS)]
    pcm = np.zeros((len(waves), max(len(w) for w in waves)), np.int32)
    for row, w in enumerate(waves):
        pcm[row, :len(w)] = np.round(w * 2 ** 15)
    return {"pcm16": pcm, "lengths": np.array([len(w) for w in waves], np.int32)}


def _seamless_features(waves: Sequence[np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
    """transformers' SeamlessM4TFeatureExtractor (`settings` over its defaults) on a batch of waveforms."""
    from transformers import SeamlessM4TFeatureExtractor

    out = SeamlessM4TFeatureExtractor(**settings)(list(waves), sampling_rate=16000, return_tensors="np")
    return {"input_features": out["input_features"], "attention_mask": out["attention_mask"].astype(np.int32)}


def feature_inputs() -> dict[str, np.ndarray]:
    """What transformers' extractor (facebook/w2v-bert-2.0's settings: padding value 1) makes of two speech-like
    utterances, the second shorter; and a grid of frame counts for the adapter's length arithmetic."""
    batch = _seamless_features([speech_like(0.47, 10), speech_like(0.33, 11)], padding_value=1.0)
    lengths = np.unique(np.concatenate([np.arange(1, 40), np.random.default_rng(2).integers(40, 3000, 40)]))
    return {**batch, "lengths": lengths.astype(np.int32)}


def speech_feature_inputs() -> dict[str, np.ndarray]:
    """`speech_inputs`' decoder ids with log-mel features (transformers' extractor, padding value 1) of two
    speech-like utterances, the second shorter."""
    batch = _seamless_features([speech_like(0.9, 12), speech_like(0.58, 13)], padding_value=1.0)
    speech = speech_inputs()
    return {**batch, "decoder_input_ids": speech["decoder_input_ids"],
            "decoder_attention_mask": speech["decoder_attention_mask"]}


INPUT_SETS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "audio": audio_inputs,
    "text": text_inputs,
    "text_pad_ids": text_inputs_with_pad_ids,
    "speech": speech_inputs,
    "features": feature_inputs,
    "speech_features": speech_feature_inputs,
    "utterances": utterance_inputs,
}


def main_input(batch: Mapping[str, np.ndarray]) -> str:
    """The name of a speech input set's encoder input: `input_features` (log-mel frames) or `input_values`."""
    return "input_features" if "input_features" in batch else "input_values"

# ----------------------------------------------------------------------------------------------------------
# Recorders: what transformers computes for one loaded model.


def record_speech_encoder(model: Any, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """last_hidden_state (after any adapter), the frame mask transformers derives for it, and the output lengths
    of the length grid with and without the adapter."""
    import torch

    name = main_input(inputs)
    values, mask = torch.from_numpy(inputs[name]), torch.from_numpy(inputs["attention_mask"])
    hidden = model(values, attention_mask=mask).last_hidden_state
    lengths = torch.from_numpy(inputs["lengths"]).long()
    lengths_of = model._get_feat_extract_output_lengths
    takes_adapter = "add_adapter" in inspect.signature(lengths_of).parameters

    def output_lengths(add_adapter: bool) -> np.ndarray:
        # HuBERT has no adapter, and its method no add_adapter: its frames are the same either way.
        return (lengths_of(lengths, add_adapter=add_adapter) if takes_adapter else lengths_of(lengths)).numpy()

    return {
        "last_hidden_state": hidden.numpy(),
        "frame_mask": model._get_feature_vector_attention_mask(hidden.shape[1], mask).numpy(),
        "lengths_without_adapter": output_lengths(False),
        "lengths_with_adapter": output_lengths(True),
    }, [name, "attention_mask", "lengths"]


def record_causal_lm(model: Any, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Logits of a padded batch; with the (padded) encoder output when the decoder cross-attends (BART's
    always do; GPT-2's with add_cross_attention)."""
    import torch

    used = ["input_ids", "attention_mask"]
    if model.config.model_type in ("bart", "mbart") or getattr(model.config, "add_cross_attention", False):
        used += ["encoder_hidden_states", "encoder_attention_mask"]
    t = {k: torch.from_numpy(inputs[k]) for k in used}
    t["input_ids"] = t["input_ids"].long()
    return {"logits": model(**t, use_cache=False).logits.numpy()}, used


# A text LM's cached decoding and greedy generation: the padded batch's first PREFILL tokens at once, then one at a
# time; greedy search from the first PROMPT tokens of each row (unpadded) for GREEDY_TOKENS tokens, no eos. Both fill
# a cache as long as the batch (8): the tests' compiled shapes are then few and shared.
PREFILL, PROMPT, GREEDY_TOKENS = 4, 4, 4


def record_text_lm(model: Any, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A decoder-only LM on text alone: the logits of a padded batch without a cache, the same logits through
    transformers' cache (PREFILL tokens, then one token per call), and greedy tokens (`generate` with its cache)."""
    import torch

    ids = torch.from_numpy(inputs["input_ids"]).long()
    mask = torch.from_numpy(inputs["attention_mask"]).long()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out = model(input_ids=ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], use_cache=True)
    cached, cache = [out.logits], out.cache
    for t in range(PREFILL, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
        cached.append(out.logits)
        cache = out.cache
    prompt = ids[:, :PROMPT]
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY_TOKENS,
                            min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    return {"logits": logits.numpy(), "cached_logits": torch.cat(cached, dim=1).numpy(), "greedy": greedy.numpy(),
            "prefill_length": np.asarray(PREFILL), "prompt_length": np.asarray(PROMPT)}, ["input_ids", "attention_mask"]


def record_seq2seq_decoder(model: Any, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A text encoder-decoder (BartForConditionalGeneration) run as a decoder: the given encoder output replaces
    its text encoder's, so the logits are those of its decoder and LM head (final_logits_bias included)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=t["encoder_hidden_states"]),
                   attention_mask=t["encoder_attention_mask"], decoder_input_ids=t["input_ids"].long(),
                   decoder_attention_mask=t["attention_mask"], use_cache=False).logits
    return {"logits": logits.numpy()}, ["input_ids", "attention_mask", "encoder_hidden_states", "encoder_attention_mask"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How transformers loads the fixtures of one `architectures[0]` and what is recorded of them.

    Attributes:
        transformers_class: the class in `transformers` that loads the checkpoint.
        kind: "encoder" or "decoder": which of our models the test compares (and how).
        record: the recorder (transformers model, inputs) -> (arrays, names of the inputs it used: the test
            feeds our models exactly those).
        inputs: the name of the input set in INPUT_SETS.
    """

    transformers_class: str
    kind: str
    record: Callable[[Any, Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], list[str]]]
    inputs: str


ARCHITECTURES: dict[str, Architecture] = {
    "Wav2Vec2Model": Architecture("Wav2Vec2Model", "encoder", record_speech_encoder, "audio"),
    # A CTC checkpoint holds the encoder under `wav2vec2.`; transformers drops the head as we do.
    "Wav2Vec2ForCTC": Architecture("Wav2Vec2Model", "encoder", record_speech_encoder, "audio"),
    "BartForCausalLM": Architecture("BartForCausalLM", "decoder", record_causal_lm, "text"),
    # BartForCausalLM would leave transformers 5's shared-only files' embeddings random and drop the
    # final_logits_bias: the class these checkpoints were written by reads them whole.
    "BartForConditionalGeneration": Architecture("BartForConditionalGeneration", "decoder", record_seq2seq_decoder,
                                                 "text"),
    "MBartForCausalLM": Architecture("MBartForCausalLM", "decoder", record_causal_lm, "text"),
    "GPT2LMHeadModel": Architecture("GPT2LMHeadModel", "decoder", record_causal_lm, "text"),
    "GPT2Model": Architecture("GPT2LMHeadModel", "decoder", record_causal_lm, "text"),
    "BertLMHeadModel": Architecture("BertLMHeadModel", "decoder", record_causal_lm, "text_pad_ids"),
    "BertForMaskedLM": Architecture("BertForMaskedLM", "decoder", record_causal_lm, "text_pad_ids"),
    # BertForPreTraining's output names its logits `prediction_logits`; BertLMHeadModel reads the same file (the
    # next-sentence head and pooler reported unexpected) and computes the same bidirectional logits.
    "BertForPreTraining": Architecture("BertLMHeadModel", "decoder", record_causal_lm, "text_pad_ids"),
    "RobertaForCausalLM": Architecture("RobertaForCausalLM", "decoder", record_causal_lm, "text_pad_ids"),
    "RobertaForMaskedLM": Architecture("RobertaForMaskedLM", "decoder", record_causal_lm, "text_pad_ids"),
    # HuBERT, WavLM, data2vec-audio: base models, and CTC checkpoints whose encoder transformers reads under the
    # prefix (`hubert.`, `wavlm.`, `data2vec_audio.`) as we do.
    "HubertModel": Architecture("HubertModel", "encoder", record_speech_encoder, "audio"),
    "HubertForCTC": Architecture("HubertModel", "encoder", record_speech_encoder, "audio"),
    "WavLMModel": Architecture("WavLMModel", "encoder", record_speech_encoder, "audio"),
    "WavLMForCTC": Architecture("WavLMModel", "encoder", record_speech_encoder, "audio"),
    "Data2VecAudioModel": Architecture("Data2VecAudioModel", "encoder", record_speech_encoder, "audio"),
    "Data2VecAudioForCTC": Architecture("Data2VecAudioModel", "encoder", record_speech_encoder, "audio"),
    "Wav2Vec2ConformerModel": Architecture("Wav2Vec2ConformerModel", "encoder", record_speech_encoder, "audio"),
    "Wav2Vec2ConformerForCTC": Architecture("Wav2Vec2ConformerModel", "encoder", record_speech_encoder, "audio"),
    # Decoder-only LMs, on text alone (no cross-attention: what a composed decoder of these families computes
    # without an encoder output).
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "decoder", record_text_lm, "text"),
    # A LlamaModel file (a file-format and RoPE variant): logits only, read by LlamaForCausalLM (its tied head).
    "LlamaModel": Architecture("LlamaForCausalLM", "decoder", record_causal_lm, "text"),
    # Qwen2's cached path is Llama's with biases (llama_tied_bf16 has them): logits only.
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", "decoder", record_causal_lm, "text"),
    "MistralForCausalLM": Architecture("MistralForCausalLM", "decoder", record_text_lm, "text"),
    "Gemma2ForCausalLM": Architecture("Gemma2ForCausalLM", "decoder", record_text_lm, "text"),
    # w2v-BERT reads log-mel features: transformers' own extractor's output on speech-like audio.
    "Wav2Vec2BertModel": Architecture("Wav2Vec2BertModel", "encoder", record_speech_encoder, "features"),
    "Wav2Vec2BertForCTC": Architecture("Wav2Vec2BertModel", "encoder", record_speech_encoder, "features"),
}

# SeamlessM4TFeatureExtractor settings (over transformers' defaults) recorded on the `utterances` set: the batch of
# every utterance padded to the longest; `alone`: utterances extracted on their own (an odd number of frames padded
# to an even one); `max_length`: (frames, utterances) padded to a fixed number of frames (`padding="max_length"`).
FEATURE_EXTRACTORS: dict[str, dict[str, Any]] = {
    "fbank_default": {"settings": {}, "alone": (1,), "max_length": (61, (2, 1))},
    "fbank_w2v_bert_2": {"settings": {"padding_value": 1.0}},
    "fbank_stride3_40bins": {"settings": {"stride": 3, "num_mel_bins": 40, "feature_size": 40, "padding_value": -2.5},
                             "alone": (0,), "max_length": (70, (1, 2))},
}

# Fixtures of a covered architecture that get no golden of their own, and why.
SKIPPED_FIXTURES: dict[str, str] = {
    "w2v_bin": "a w2v_group-shaped model in pytorch_model.bin: a file-format variant (checkpoint tests cover it)",
    "w2v_sharded": "a w2v_group-shaped model in safetensors shards: a file-format variant",
    "w2v_bin_sharded": "a w2v_group-shaped model in .bin shards: a file-format variant",
    "hubert_old_weightnorm": "hubert_stable's layout with old weight-norm names: a file-format variant",
    "wavlm_old_weightnorm": "wavlm_stable's layout with old weight-norm names: a file-format variant",
}

# ----------------------------------------------------------------------------------------------------------
# Composed pairs and generation settings.


@dataclasses.dataclass(frozen=True)
class Pair:
    """A fixture pair composed with `convert.compose.compose` and loaded by `SpeechEncoderDecoderModel`.

    Attributes:
        encoder, decoder: fixture names.
        logits: record the logits of the padded batch (only when transformers loaded every weight).
        generate: names of GENERATION rows to run.
        eos_token_id: the eos id for generation (from parity_tests/test_generation.py: non-trivial outputs).
        contiguous_encoder_output: hand the decoder a contiguous copy of the encoder output. transformers'
            GPT-2 cross-attention `.view`s it, which fails on the wav2vec2 adapter's transposed output, so
            `SpeechEncoderDecoderModel` cannot run adapter x GPT-2 without a projection in between. The copy
            changes no value.
        why: what the pair covers.
    """

    encoder: str
    decoder: str
    why: str
    logits: bool = True
    generate: tuple[str, ...] = ()
    eos_token_id: int | None = None
    contiguous_encoder_output: bool = False
    inputs: str = "speech"

    @property
    def name(self) -> str:
        return f"{self.encoder}+{self.decoder}"


PAIRS: tuple[Pair, ...] = (
    Pair("w2v_stable_adapter", "bart_untied", "adapter x BART; greedy row 0 ends with eos, row 1 hits the cap",
         generate=("greedy", "beam4", "beam4_never_lp2", "mbart_style", "penalties", "beam3_returns", "max_length",
                   "sample_warped", "beam_sample_warped", "model_defaults", "prompt_greedy", "prompt_beam_processors"),
         eos_token_id=51),
    Pair("w2v_stable_wide", "gpt2_untied", "no adapter x GPT-2, enc_to_dec_proj, cross-attention initialised by "
         "compose"),
    Pair("w2v_stable_wide", "gpt2_xattn_untied", "GPT-2 whose source cross-attention steers the tokens",
         generate=("greedy", "beam4", "gpt2_mbart_style", "gpt2_penalties", "model_defaults"), eos_token_id=33),
    Pair("w2v_group", "mbart", "no adapter (group norm) x mBART"),
    Pair("w2v_stable_adapter", "mbart", "adapter x mBART"),
    Pair("w2v_stable_adapter", "gpt2_xattn", "adapter x GPT-2 (tied head, no projection)",
         contiguous_encoder_output=True),
    Pair("w2v_group", "bart_cg_tf5", "no adapter x BART from transformers 5's shared-only file"),
    Pair("w2v_group", "bart_bias", "a non-zero final_logits_bias: BartForCausalLM has no place for it",
         logits=False),
    Pair("w2v_stable", "bert_xattn_untied", "BERT whose source cross-attention steers the tokens; untied head (the "
         "decoder's own bias); greedy row 1 ends with eos, row 0 hits the cap", generate=("greedy", "beam4"),
         eos_token_id=29),
    Pair("w2v_stable_wide", "bert_pretraining", "BERT from a BertForPreTraining file (gamma/beta names, pooler and "
         "next-sentence head dropped), enc_to_dec_proj, cross-attention initialised by compose"),
    Pair("w2v_stable_adapter", "roberta_xattn_untied", "adapter x RoBERTa (positions from the ids) whose source "
         "cross-attention steers the tokens; pad-filled finished rows", generate=("greedy", "beam4"),
         eos_token_id=37),
    Pair("w2v_group", "roberta_mlm_bin", "RoBERTa from a masked-LM .bin in shards, cross-attention initialised by "
         "compose"),
    Pair("w2v_group_adapter", "bart_causal", "an adapter whose output_hidden_size (48) differs from hidden_size "
         "(32): transformers sizes enc_to_dec_proj from hidden_size", logits=False),
    Pair("hubert_group", "gpt2_lm", "HuBERT (group norm, post-norm) x GPT-2, cross-attention initialised by "
         "compose"),
    Pair("wavlm_stable", "bart_causal", "WavLM (stable layout, relative position bias) x BART"),
    Pair("d2v_audio_odd_kernel", "mbart", "data2vec-audio (positional conv stack) x mBART"),
    Pair("conformer_rotary", "bart_causal", "wav2vec2-conformer (rotary, its inv_freq written as a weight; the "
         "BatchNorm step counters reported missing) x BART"),
    Pair("w2vbert", "bart_untied", "w2v-BERT (log-mel features, relative-key positions) x BART; greedy row 0 ends "
         "with eos",
         generate=("greedy",), eos_token_id=77, inputs="speech_features"),
    Pair("w2vbert_adapter", "gpt2_xattn_untied", "w2v-BERT with the intermediate feed-forward and the adapter x "
         "GPT-2 whose cross-attention steers the tokens", generate=("greedy",),
         eos_token_id=25, inputs="speech_features"),
    # The other decoder families: transformers loads the composed w2v-BERT whole (its numbers are the pairs above).
    Pair("w2vbert_adapter", "mbart", "w2v-BERT with the adapter x mBART", logits=False, inputs="speech_features"),
    Pair("w2vbert", "bert_lm", "w2v-BERT x BERT, cross-attention initialised by compose", logits=False,
         inputs="speech_features"),
    Pair("w2vbert_adapter", "roberta_causal", "w2v-BERT with the adapter x RoBERTa, cross-attention initialised by "
         "compose", logits=False, inputs="speech_features"),
)


@dataclasses.dataclass(frozen=True)
class Extracted:
    """A fixture pair composed as in `Pair`, whose decoder and encoder `convert.extract` writes as checkpoints of
    their own; each is loaded by the transformers class its config names (`ARCHITECTURES`), and the decoder's
    logits are recorded as a single-architecture fixture of that class would be."""

    encoder: str
    decoder: str
    why: str

    @property
    def name(self) -> str:
        return f"extracted:{self.encoder}+{self.decoder}"


# Pairs of PAIRS (their compositions are shared with those tests), so that every encoder and decoder family is
# extracted once.
EXTRACTED: tuple[Extracted, ...] = (
    Extracted("w2v_stable_wide", "gpt2_untied", "wav2vec2, its enc_to_dec_proj left out; GPT-2 with the "
              "cross-attention compose created"),
    Extracted("hubert_group", "gpt2_lm", "HuBERT; GPT-2 with a tied head"),
    Extracted("wavlm_stable", "bart_causal", "WavLM; BART"),
    Extracted("d2v_audio_odd_kernel", "mbart", "data2vec-audio; mBART (MBartForCausalLM)"),
    Extracted("conformer_rotary", "bart_causal", "wav2vec2-conformer (BatchNorm step counters missing); BART"),
    Extracted("w2v_stable", "bert_xattn_untied", "BERT with its own cross-attention and an untied head"),
    Extracted("w2v_group", "roberta_mlm_bin", "RoBERTa from a masked-LM file, cross-attention created"),
    Extracted("w2v_group", "llama_lm", "a composed Llama: its decoder without the cross-attention compose created, "
              "read by LlamaForCausalLM (transformers has no cross-attending Llama)"),
)
EXTRACTED_PARTS = ("decoder", "encoder")

# Rotary settings as config.json files hold them (transformers 5's `rope_parameters`, or the older `rope_scaling`
# with a top-level `rope_theta`), each with a head size and a context length: transformers' inverse frequencies and
# cos/sin factor for each are recorded under the row's name (`convert.base.rope` is compared with them).
ROPE_ROWS: dict[str, dict[str, Any]] = {
    "default_llama2": {"head_dim": 128, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "default_params": {"head_dim": 64, "max_position_embeddings": 32768,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "llama3_1": {"head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama3_2_params": {"head_dim": 64, "max_position_embeddings": 131072,
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}},
    "linear_old_type_key": {"head_dim": 32, "max_position_embeddings": 8192,
                            "rope_scaling": {"type": "linear", "factor": 4.0}},
    "yarn_qwen2_5": {"head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
                     "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "yarn_every_field": {"head_dim": 64, "max_position_embeddings": 16384,
                         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                             "original_max_position_embeddings": 1024, "beta_fast": 24.0,
                                             "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                             "truncate": False}},
    "yarn_no_factor": {"head_dim": 16, "max_position_embeddings": 4096,
                       "rope_parameters": {"rope_type": "yarn", "factor": None,
                                           "original_max_position_embeddings": 1024}},
    "yarn_attention_factor": {"head_dim": 16, "max_position_embeddings": 4096,
                              "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                                                  "original_max_position_embeddings": 1024}},
}
ROPE_CASE = "rope"

# What every generate call sets, so that nothing comes from a generation_config.json or from the decoder's
# config: None unsets a setting (transformers' `generate(forced_bos_token_id=None)`), so BART's
# forced_bos_token_id / forced_eos_token_id in config.json do not apply.
GENERATION_BASE: dict[str, Any] = {"max_new_tokens": 24, "length_penalty": 1.0, "early_stopping": False,
                                   "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None}
GENERATION: dict[str, dict[str, Any]] = {
    "greedy": {"num_beams": 1},
    "beam4": {"num_beams": 4},
    "beam4_never_lp2": {"num_beams": 4, "early_stopping": "never", "length_penalty": 2.0},
    # The processors and what users combine (rows may replace the pair's eos: several eos ids give generations
    # that end with eos in some rows and at the cap in others). mBART speech translation: the target-language
    # token forced first, eos forced at the cap, 4 beams, no repeated 3-gram.
    "mbart_style": {"num_beams": 4, "no_repeat_ngram_size": 3, "forced_bos_token_id": 56, "forced_eos_token_id": 2,
                    "eos_token_id": [16, 2]},
    "penalties": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "bad_words_ids": [[69, 69], [83]],
                  "suppress_tokens": [77], "begin_suppress_tokens": [14], "min_new_tokens": 4, "eos_token_id": [16, 2]},
    "beam3_returns": {"num_beams": 3, "num_return_sequences": 3, "length_penalty": 0.5, "early_stopping": True,
                      "repetition_penalty": 1.2, "eos_token_id": [16, 2]},
    # max_length counts the start token; min_length too (max_new_tokens / min_new_tokens unset to let them act).
    "max_length": {"max_new_tokens": None, "max_length": 13, "min_new_tokens": None, "min_length": 5, "num_beams": 2,
                   "eos_token_id": [16, 2]},
    # Sampling: the tokens depend on the RNG, so only the first step's processed scores are compared (temperature,
    # top-k, top-p; beam sampling keeps one token more than there are eos ids).
    "sample_warped": {"do_sample": True, "temperature": 1.5, "top_k": 30, "top_p": 0.95, "max_new_tokens": 1},
    "beam_sample_warped": {"do_sample": True, "num_beams": 2, "temperature": 2.0, "top_k": 6, "max_new_tokens": 1},
    "gpt2_mbart_style": {"num_beams": 4, "no_repeat_ngram_size": 3, "forced_bos_token_id": 37,
                         "forced_eos_token_id": 95, "eos_token_id": [92, 95]},
    "gpt2_penalties": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "bad_words_ids": [[43, 84], [63]],
                       "suppress_tokens": [71], "begin_suppress_tokens": [79], "min_new_tokens": 4,
                       "eos_token_id": [92, 95]},
    # Plain prompts (`decoder_input_ids`): one beginning with the start token (2), one without (transformers puts
    # it first); max_length and min_length count the prompt, the processors see it, begin_suppress_tokens act on
    # the first generated token.
    "prompt_greedy": {"decoder_input_ids": [[2, 60, 61, 62], [2, 63, 64, 65]]},
    "prompt_beam_processors": {"decoder_input_ids": [[60, 61, 62], [63, 64, 65]], "num_beams": 3,
                               "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "begin_suppress_tokens": [14],
                               "max_new_tokens": None, "max_length": 14, "min_new_tokens": None, "min_length": 9,
                               "eos_token_id": [16, 2]},
    # No argument at all: both sides generate with the generation_config.json that compose wrote (BART's forced
    # BOS / EOS, transformers' default of 20 new tokens): the generation config travels.
    "model_defaults": {},
}
# Rows whose settings are passed alone, without GENERATION_BASE and the pair's ids.
MODEL_DEFAULTS_ROWS = ("model_defaults",)
# Rows whose every step's processed scores are recorded too (kept to a few: [rows, steps, vocabulary] floats).
PER_STEP_SCORES = ("penalties", "gpt2_penalties", "max_length", "sample_warped", "beam_sample_warped",
                   "model_defaults", "prompt_beam_processors")
# transformers-only switches: plain search, outputs with sequences_scores. No cache: transformers 5.24 sizes
# its DynamicCache by BART's `num_hidden_layers`, an alias of `encoder_layers` (1 in our fixtures, which have 2
# decoder layers), and fails; without the cache every step recomputes the prefix, the same arithmetic.
TRANSFORMERS_GENERATION: dict[str, Any] = {"do_sample": False, "use_cache": False, "return_dict_in_generate": True,
                                           "output_scores": True}

# ----------------------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fixture_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of a fixture directory (config and weights)."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def tensors_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors (name, dtype, shape, bytes; sorted by name): the values, not the
    file layout."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Making the goldens


def loading_info(info: Mapping[str, Any]) -> dict[str, list]:
    """transformers' loading report as sorted JSON lists."""
    return {
        "missing_keys": sorted(info.get("missing_keys", ())),
        "unexpected_keys": sorted(info.get("unexpected_keys", ())),
        "mismatched_keys": sorted([k, list(a), list(b)] for k, a, b in info.get("mismatched_keys", ())),
        "error_msgs": list(info.get("error_msgs", ())),
    }


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__}


def fixture_case(name: str, directory: Path, inputs: dict[str, dict[str, np.ndarray]],
                 may_miss: str | None = None) -> tuple[dict, dict]:
    """(manifest entry, arrays) of one single-architecture fixture; keys ending with `may_miss` may be missing."""
    import torch
    import transformers

    config = json.loads((directory / "config.json").read_text())
    architecture = config["architectures"][0]
    row = ARCHITECTURES[architecture]
    cls = getattr(transformers, row.transformers_class)
    # float32 whatever the checkpoint stores (a bfloat16 source is compared as its float32 values).
    model, info = cls.from_pretrained(directory, output_loading_info=True, attn_implementation=ATTN_IMPLEMENTATION,
                                      dtype=torch.float32)
    info = loading_info(info)
    missing = [k for k in info["missing_keys"] if may_miss is None or not k.endswith(may_miss)]
    if missing or info["mismatched_keys"] or info["error_msgs"]:
        raise RuntimeError(f"{name}: transformers' {row.transformers_class} did not load every weight: {info}")
    with torch.no_grad():
        arrays, used = row.record(model.eval(), inputs[row.inputs])
    if row.kind == "decoder":  # greedy tokens from the float32 run, logits from a float64 one
        model64 = cls.from_pretrained(directory, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float64)
        with torch.no_grad():
            arrays = {k: v for k, v in arrays.items() if k not in FLOAT64_OUTPUTS}
            arrays.update(float64_outputs(row.record(model64.eval(), as_float64(inputs[row.inputs]))[0]))
    entry = {
        "kind": row.kind,
        "fixtures": {name: fixture_hashes(directory)},
        "architecture": architecture,
        "model_type": config["model_type"],
        "transformers_class": row.transformers_class,
        "settings": {"inputs": row.inputs, "inputs_used": used, "attn_implementation": ATTN_IMPLEMENTATION,
                     "record": row.record.__name__},
        "loading_info": info,
    }
    return entry, arrays


def as_float64(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An input set with its float arrays as float64 (ids and masks as they are)."""
    return {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in batch.items()}


def float64_outputs(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The FLOAT64_OUTPUTS of a float64 run, as `<name>_f64`."""
    return {f"{k}_f64": np.asarray(v) for k, v in arrays.items() if k in FLOAT64_OUTPUTS}


def generated_lengths(sequences: np.ndarray, eos: int | Sequence[int]) -> list[int]:
    """Tokens each row generated after the start token: up to and including its first eos, else all."""
    eos = {eos} if isinstance(eos, int) else set(eos)
    return [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in sequences[:, 1:].tolist()]


COMPOSE_SETTINGS = {"seed": 0, "dtype": "float32"}


def compose_row(row: Pair | Extracted, fixture_dirs: Mapping[str, Path], out: Path, kind: str) -> dict[str, Any]:
    """Composes a row's fixtures into `out` (COMPOSE_SETTINGS) and returns what every composed case's manifest
    entry starts with: its kind, fixtures, names and the digest of the composed tensors."""
    from convert.compose import compose

    compose(str(fixture_dirs[row.encoder]), str(fixture_dirs[row.decoder]), out, verify=False, progress=False,
            log=io.StringIO(), **COMPOSE_SETTINGS)
    return {
        "kind": kind,
        "fixtures": {n: fixture_hashes(fixture_dirs[n]) for n in (row.encoder, row.decoder)},
        "encoder": row.encoder,
        "decoder": row.decoder,
        "why": row.why,
        "composed_tensors_sha256": tensors_digest(out / "model.safetensors"),
    }


def pair_case(pair: Pair, fixture_dirs: Mapping[str, Path], out: Path,
              inputs: dict[str, dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """(manifest entry, arrays) of one composed pair."""
    import torch
    import transformers

    composed_entry = compose_row(pair, fixture_dirs, out, "composed")
    # ignore_mismatched_sizes: report a mismatch in the loading info instead of raising.
    model, info = transformers.SpeechEncoderDecoderModel.from_pretrained(
        out, output_loading_info=True, ignore_mismatched_sizes=True, attn_implementation=ATTN_IMPLEMENTATION)
    model.eval()
    if pair.contiguous_encoder_output:
        model.encoder.register_forward_hook(_contiguous_last_hidden_state)
    info = loading_info(info)
    config = json.loads((out / "config.json").read_text())
    entry: dict[str, Any] = {
        **composed_entry,
        "transformers_class": "SpeechEncoderDecoderModel",
        "settings": {"inputs": pair.inputs, "attn_implementation": ATTN_IMPLEMENTATION, "compose": COMPOSE_SETTINGS,
                     "use_cache": False, "contiguous_encoder_output": pair.contiguous_encoder_output},
        "loading_info": info,
        "generation": {},
    }
    if (out / "preprocessor_config.json").is_file():
        # What transformers' processor makes of the composed directory (the encoder's preprocessor_config.json).
        extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
        entry["feature_extractor"] = {"class": type(extractor).__name__,
                                      "padding_value": float(extractor.padding_value)}
    arrays: dict[str, np.ndarray] = {}
    if not pair.logits and not pair.generate:
        return entry, arrays
    if any(info[k] for k in ("unexpected_keys", "mismatched_keys", "error_msgs")) or any(
            not key.endswith(BATCH_NORM_COUNTER) for key in info["missing_keys"]):
        raise RuntimeError(f"{pair.name}: transformers did not load the composed model as written ({info}); "
                           "record only the loading info for it (logits=False, no generate)")
    batch = {k: torch.from_numpy(v) for k, v in inputs[pair.inputs].items()}
    speech = batch[main_input(batch)]
    with torch.no_grad():
        if pair.logits:
            # use_cache=False: see TRANSFORMERS_GENERATION.
            model64 = transformers.SpeechEncoderDecoderModel.from_pretrained(
                out, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float64).eval()
            if pair.contiguous_encoder_output:
                model64.encoder.register_forward_hook(_contiguous_last_hidden_state)
            arrays["logits_f64"] = model64(inputs=speech.double(), attention_mask=batch["attention_mask"],
                                           decoder_input_ids=batch["decoder_input_ids"].long(),
                                           decoder_attention_mask=batch["decoder_attention_mask"],
                                           use_cache=False).logits.numpy()
            hidden = model.encoder(speech, attention_mask=batch["attention_mask"]).last_hidden_state
            arrays["encoder_frame_mask"] = model.encoder._get_feature_vector_attention_mask(
                hidden.shape[1], batch["attention_mask"]).numpy()
        for setting in pair.generate:
            ids = {"decoder_start_token_id": config["decoder_start_token_id"], "eos_token_id": pair.eos_token_id,
                   "pad_token_id": config["pad_token_id"]}
            ours = dict(GENERATION[setting]) if setting in MODEL_DEFAULTS_ROWS else {
                **GENERATION_BASE, **ids, **GENERATION[setting]}
            # Keyword arguments over the model's generation config (the generation_config.json compose wrote), as
            # a user calls generate. Sampling draws from torch's global RNG: seeded, so the file is reproducible.
            torch.manual_seed(0)
            call = {**TRANSFORMERS_GENERATION, **ours}
            if "decoder_input_ids" in call:  # a prompt: transformers takes a tensor, the manifest keeps the list
                call["decoder_input_ids"] = torch.tensor(call["decoder_input_ids"])
            result = model.generate(inputs=speech, attention_mask=batch["attention_mask"], **call)
            sequences = result.sequences.numpy().astype(np.int32)
            arrays[f"{setting}.sequences"] = sequences
            if setting in PER_STEP_SCORES:  # each step's scores after every processor (beam search: log-probs)
                arrays[f"{setting}.scores"] = torch.stack(result.scores, dim=1).numpy().astype(np.float32)
            scores = getattr(result, "sequences_scores", None)
            if scores is not None:
                arrays[f"{setting}.sequences_scores"] = scores.numpy().astype(np.float32)
            eos = ours.get("eos_token_id", model.generation_config.eos_token_id)
            eos = [eos] if isinstance(eos, int) else list(eos)
            lengths = generated_lengths(sequences, eos)
            entry["generation"][setting] = {
                "settings": ours,
                "transformers_only": TRANSFORMERS_GENERATION,
                "sampled": bool(ours.get("do_sample")),
                "generated_lengths": lengths,
                "ended_with_eos": [bool(set(eos) & set(row[:n])) for row, n in zip(sequences[:, 1:].tolist(),
                                                                                     lengths)],
                "distinct_tokens": [len(set(row[:n])) for row, n in zip(sequences[:, 1:].tolist(), lengths)],
            }
            print(f"  {setting}: lengths {lengths}, eos {entry['generation'][setting]['ended_with_eos']}")
    return entry, arrays


def extracted_case(row: Extracted, fixture_dirs: Mapping[str, Path], out: Path,
                   inputs: dict[str, dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """(manifest entry, arrays) of the parts of one composed pair, written by `convert.extract`."""
    from convert.extract import extract

    composed = out / "composed"
    entry: dict[str, Any] = {**compose_row(row, fixture_dirs, composed, "extracted"),
                             "settings": {"compose": COMPOSE_SETTINGS}, "parts": {}}
    arrays: dict[str, np.ndarray] = {}
    for part in EXTRACTED_PARTS:
        directory = extract(composed, part, out / part, log=io.StringIO()).output
        # Our files hold no BatchNorm step counters (see BATCH_NORM_COUNTER): transformers reports them missing.
        part_entry, part_arrays = fixture_case(f"{row.name} {part}", directory, inputs, may_miss=BATCH_NORM_COUNTER)
        del part_entry["fixtures"]
        part_entry["extracted_tensors_sha256"] = tensors_digest(directory / "model.safetensors")
        entry["parts"][part] = part_entry
        if part == "decoder":  # the encoders' numbers are those of their fixtures' goldens; the loading is the point
            arrays.update({f"{part}/{k}": v for k, v in part_arrays.items()})
    return entry, arrays


def rope_case() -> tuple[dict, dict]:
    """transformers' RoPE initialisation (its LlamaRotaryEmbedding, which every family of this toolkit shares) for
    each row of ROPE_ROWS."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    entry: dict[str, Any] = {"kind": "rope", "rows": {}}
    arrays = {}
    for label, row in ROPE_ROWS.items():
        fields = copy.deepcopy({k: v for k, v in row.items() if k != "head_dim"})  # transformers fills dicts in
        config = transformers.LlamaConfig(hidden_size=4 * row["head_dim"], num_attention_heads=4, **fields)
        rotary = LlamaRotaryEmbedding(config)
        arrays[f"{label}.inv_freq"] = rotary.inv_freq.numpy()
        entry["rows"][label] = {"config": row, "attention_scaling": float(rotary.attention_scaling)}
    return entry, arrays


def feature_extractor_case(name: str, inputs: dict[str, dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """(manifest entry, arrays) of one FEATURE_EXTRACTORS row on the `utterances` set."""
    import transformers

    row = FEATURE_EXTRACTORS[name]
    utterances = inputs["utterances"]
    waves = [(pcm[:n] / 2 ** 15).astype(np.float32) for pcm, n in zip(utterances["pcm16"], utterances["lengths"])]
    runs = {"batch": (waves, {})}
    runs.update({f"alone{i}": ([waves[i]], {}) for i in row.get("alone", ())})
    if "max_length" in row:
        frames, which = row["max_length"]
        runs["max_length"] = ([waves[i] for i in which], {"padding": "max_length", "max_length": frames})
    arrays: dict[str, np.ndarray] = {}
    for run, (batch, padding) in runs.items():
        out = transformers.SeamlessM4TFeatureExtractor(**row["settings"])(batch, sampling_rate=16000,
                                                                          return_tensors="np", **padding)
        arrays[f"{run}.input_features"] = out["input_features"]
        arrays[f"{run}.attention_mask"] = out["attention_mask"].astype(np.int32)
    entry = {"kind": "feature_extractor", "fixtures": {}, "transformers_class": "SeamlessM4TFeatureExtractor",
             "settings": {"inputs": "utterances", "extractor": row["settings"], "sampling_rate": 16000,
                          "runs": {run: {"utterances": row.get("max_length", (0, ()))[1] if run == "max_length"
                                         else [int(run[5:])] if run.startswith("alone") else list(range(len(waves))),
                                         **padding} for run, (_, padding) in runs.items()}}}
    return entry, arrays


# BatchNorm's integer step counter: every weight the toolkit writes is floating point, so composed outputs lack it
# and transformers reports it missing (it starts it at 0; with momentum 0.1 it changes no output).
BATCH_NORM_COUNTER = ".num_batches_tracked"


def _contiguous_last_hidden_state(module: Any, args: Any, output: Any) -> Any:
    output.last_hidden_state = output.last_hidden_state.contiguous()
    return output


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """float arrays as float32, integer ones as int32, masks as bool; compressed."""
    out = {}
    for key, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == np.bool_:
            out[key] = array
        elif np.issubdtype(array.dtype, np.floating):
            out[key] = array.astype(np.float32)
        else:
            out[key] = array.astype(np.int32)
    np.savez_compressed(path, **out)


def fixture_names() -> list[str]:
    """Every fixture but SKIPPED_FIXTURES (those whose architecture has no ARCHITECTURES row are passed over)."""
    from scripts import make_fixtures

    return [n for n in make_fixtures.CASES if n not in SKIPPED_FIXTURES]


def make_goldens(out: Path, only: set[str] | None = None) -> dict:
    """Builds the fixtures, runs transformers on them and writes the goldens to `out`; returns the manifest."""
    import torch

    from scripts import make_fixtures

    if torch.__version__.split("+")[0] != FIXTURE_TORCH:
        raise SystemExit(f"torch {torch.__version__}: the fixtures' bytes are those of torch {FIXTURE_TORCH} "
                         "(constraints.txt); install it with `pip install -c constraints.txt ...`")
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    cases: dict[str, Any] = dict(manifest.get("cases", {}))
    if not only:  # a full run writes its files anew: no golden of a case that left the tables stays behind
        made = [c["file"] for c in cases.values() if c.get("file")] + [i["file"] for i in manifest.get("inputs", {}).values()]
        for stale in made:
            (out / stale).unlink(missing_ok=True)
        cases = {}
    inputs = {name: make() for name, make in INPUT_SETS.items()}
    input_entries = {}
    for name, arrays in inputs.items():
        save_arrays(out / f"inputs_{name}.npz", arrays)
        input_entries[name] = {"file": f"inputs_{name}.npz", "made_by": f"{INPUT_SETS[name].__name__}()",
                               "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs: dict[str, Path] = {}

        def fixture(name: str) -> Path:
            if name not in dirs:
                dirs[name] = make_fixtures.build(name, root / "fixtures")
            return dirs[name]

        for name in fixture_names():
            directory = fixture(name)
            architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
            if architecture not in ARCHITECTURES or (only and name not in only):
                continue
            print(f"{name}: {ARCHITECTURES[architecture].transformers_class}")
            entry, arrays = fixture_case(name, directory, inputs)
            cases[name] = _finish(entry, arrays, name, out)
        for name in FEATURE_EXTRACTORS:
            if only and name not in only:
                continue
            print(f"{name}: SeamlessM4TFeatureExtractor")
            entry, arrays = feature_extractor_case(name, inputs)
            cases[name] = _finish(entry, arrays, name, out)
        composed_rows = [(row, pair_case, "SpeechEncoderDecoderModel") for row in PAIRS] + [
            (row, extracted_case, "convert.extract, then each part's own transformers class") for row in EXTRACTED]
        for row, make_case, what in composed_rows:
            if only and row.name not in only:
                continue
            print(f"{row.name}: {what}")
            for name in (row.encoder, row.decoder):
                fixture(name)
            entry, arrays = make_case(row, dirs, root / "composed" / row.name, inputs)
            cases[row.name] = _finish(entry, arrays, row.name.replace(":", "_"), out)
        if not only or ROPE_CASE in only:
            print(f"{ROPE_CASE}: LlamaRotaryEmbedding")
            entry, arrays = rope_case()
            cases[ROPE_CASE] = _finish(entry, arrays, ROPE_CASE, out)
    manifest = {
        "format": FORMAT,
        "made_by": "scripts/make_goldens.py",
        "inputs": input_entries,
        "skipped_fixtures": SKIPPED_FIXTURES,
        "cases": dict(sorted(cases.items())),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _finish(entry: dict, arrays: Mapping[str, np.ndarray], name: str, out: Path) -> dict:
    entry["versions"] = versions()
    if arrays:
        entry["file"] = f"{name}.npz"
        entry["arrays"] = sorted(arrays)
        save_arrays(out / entry["file"], arrays)
    else:
        entry["file"] = None
        (out / f"{name}.npz").unlink(missing_ok=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="regenerate only these cases (fixture or pair names)")
    parser.add_argument("--out", type=Path, default=GOLDENS_DIR, help="where the goldens go (default: %(default)s)")
    args = parser.parse_args(argv)
    known = (set(fixture_names()) | {p.name for p in PAIRS} | {r.name for r in EXTRACTED} | {ROPE_CASE}
             | set(FEATURE_EXTRACTORS))
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    manifest = make_goldens(args.out, set(args.only) if args.only else None)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{len(manifest['cases'])} cases in {args.out} ({total / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
