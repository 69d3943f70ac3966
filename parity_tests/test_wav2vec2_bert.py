"""w2v-BERT 2.0: what is particular to it (source rules, config refusals, the log-mel feature extractor's settings and
fixed-length batches, train mode, no feature encoder to freeze) and the feature-input contract end to end: compose
(verified), transcribe and check from the command line, fine-tuning's batches. The generic parity, round trips,
pairs and gradients are in test_architectures.py, test_pairs.py and test_training.py; transformers' own features,
hidden states, logits and tokens in test_goldens.py, its SpecAugment masks on feature frames in test_spec_augment.py.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile
import torch

from convert.base import audio as audio_io
from convert.base import fbank
from convert.base.archs import wav2vec2_bert as arch
from convert.base.archs.wav2vec2_bert import Wav2Vec2BertConfig
from convert.base.errors import ConvertError, UnsupportedConfig
from convert.base.params import load_params
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from scripts.fixtures_wav2vec2_bert import PREPROCESSOR, hf_config
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.registry import model_for
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

TOLERANCE = 1e-5
RATE = 16000


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tone(seconds: float, frequency: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * frequency * t) * (1 + np.sin(7 * t)) + 0.02 * noise).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and configs


def test_ctc_checkpoint_drops_its_head_with_the_reason(fixture_dir):
    model, report = reference_from_pretrained(fixture_dir("w2vbert_ctc_bin"))
    dropped = dict(report.dropped)
    assert set(dropped) == {"lm_head.weight", "lm_head.bias"}
    assert all("CTC head of Wav2Vec2BertForCTC" in why for why in dropped.values())
    assert set(report.loaded) == set(model.state_dict())


def test_task_heads_and_an_unused_spec_embed_are_dropped_by_the_source_rules():
    config = Wav2Vec2BertConfig.from_hf_dict(hf_config(mask_time_prob=0.0))
    keys = ["wav2vec2_bert.encoder.layers.3.self_attn.distance_embedding.weight", "wav2vec2_bert.adapter.proj.bias",
            "wav2vec2_bert.masked_spec_embed", "classifier.weight", "projector.bias", "tdnn.0.kernel.weight",
            "objective.weight", "layer_weights"]
    canonical, dropped = arch.source_rules(config).canonicalize(keys)
    assert canonical == {"encoder.layers.3.self_attn.distance_embedding.weight": keys[0],
                         "adapter.proj.bias": keys[1]}
    assert [k for k, _ in dropped] == keys[2:]
    assert "mask_time_prob=0" in dropped[0][1] and "Wav2Vec2BertFor" in dropped[1][1]


@pytest.mark.parametrize(("fields", "field", "why"), [
    ({"position_embeddings_type": "alibi"}, "position_embeddings_type", "supported: relative_key, relative, rotary"),
    ({"conv_depthwise_kernel_size": 4}, "conv_depthwise_kernel_size", "must be odd"),
    ({"left_max_position_embeddings": -1}, "left_max_position_embeddings", "at least 0"),
    ({"position_embeddings_type": "rotary", "hidden_size": 36, "output_hidden_size": 36, "num_attention_heads": 4},
     "num_attention_heads", "odd head size (9)"),
    ({"use_intermediate_ffn_before_adapter": True}, "use_intermediate_ffn_before_adapter", "needs add_adapter"),
    ({"output_hidden_size": 512}, "output_hidden_size", "without add_adapter"),
    ({"add_adapter": True, "output_hidden_size": 1000}, "output_hidden_size", "num_attention_heads=16"),
    ({"add_adapter": True, "adapter_stride": 4}, "adapter_stride", "pads the conv by stride // 2"),
    ({"adapter_act": "mish"}, "adapter_act", "is not supported"),
    ({"conformer_conv_dropout": 1.5}, "conformer_conv_dropout", "probability"),
])
def test_unimplemented_settings_are_refused_naming_the_field(fields, field, why):
    with pytest.raises(UnsupportedConfig) as error:
        Wav2Vec2BertConfig.from_hf_dict(hf_config(**fields), where="encoder/config.json")
    message = str(error.value)
    assert message.startswith("encoder/config.json: ") and f"{field}={fields[field]!r}" in message and why in message


def test_the_encoder_reads_features_whose_frames_it_keeps_or_subsamples():
    config = Wav2Vec2BertConfig.from_hf_dict(hf_config(add_adapter=True, num_adapter_layers=2))
    assert (config.input_kind, config.input_feature_size, config.min_input_length) == ("features", 160, 1)
    lengths = np.arange(1, 30)
    once = (lengths + 2 - 3) // 2 + 1  # a conv of kernel 3, stride 2, padding 1
    np.testing.assert_array_equal(config.output_lengths(lengths, add_adapter=False), lengths)
    np.testing.assert_array_equal(config.output_lengths(lengths), (once + 2 - 3) // 2 + 1)


# ----------------------------------------------------------------------------------------------------------
# The feature extractor


def test_preprocessor_config_is_read_checked_and_defaulted(fixture_dir, tmp_path):
    encoder = Wav2Vec2BertConfig.from_hf_dict(hf_config())
    read = audio_io.feature_extractor_config(fixture_dir("w2vbert"), encoder)
    assert (read.makes, read.padding_value, read.num_mel_bins, read.stride) == ("features", 1.0, 80, 2)
    assert read.min_samples(encoder) == 560  # two 25 ms frames 10 ms apart make one stacked frame
    default = audio_io.feature_extractor_config(tmp_path, encoder)  # no file: SeamlessM4T's defaults
    assert (default.makes, default.padding_value, default.return_attention_mask) == ("features", 0.0, True)

    def refused(fields: dict, encoder_config=encoder) -> str:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, **fields}))
        with pytest.raises(audio_io.AudioError) as error:
            audio_io.feature_extractor_config(tmp_path, encoder_config)
        assert str(error.value).count("\n") == 0
        return str(error.value)

    assert "makes waveform inputs, but the encoder takes features" in refused(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1})
    assert "WhisperFeatureExtractor' is not supported" in refused({"feature_extractor_type": "WhisperFeatureExtractor"})
    assert "num_mel_bins=64 x stride=2 makes 128 values per frame, but the encoder reads 160" in refused(
        {"num_mel_bins": 64})
    assert "stride=1 must be at least 2" in refused({"stride": 1})
    assert "padding_value=\"x\" is not a number" in refused({"padding_value": "x"})
    from convert.base.archs.wav2vec2 import Wav2Vec2Config

    assert "makes features inputs, but the encoder takes waveform" in refused({}, Wav2Vec2Config())


def test_features_padded_to_a_bucket_length_keep_every_real_frame():
    """A fixed shape per length bucket (`length` in samples): each utterance's real frames and mask are those of
    the utterance alone; the rest is padding."""
    waves = [tone(0.43, 220, 0), tone(0.21, 330, 1)]
    longest, mask = fbank.batch_features(waves, 80, 2, 1.0, RATE, length=RATE)  # bucket of one second
    assert longest.shape == (2, 49, 160) and mask.shape == (2, 49)
    for row, wave in enumerate(waves):
        alone, alone_mask = fbank.batch_features([wave], 80, 2, 1.0, RATE)
        real = int(alone_mask.sum())
        assert mask[row].sum() == real and mask[row, :real].all()
        np.testing.assert_array_equal(longest[row, :real], alone[0, :real])
    assert (longest[1, 20:] == 1.0).all()  # padding_value beyond the real frames (10 of them, 20 values each)


# ----------------------------------------------------------------------------------------------------------
# Train mode


def test_train_mode_with_layerdrop_one_matches_the_reference_without_blocks(fixture_dir):
    """Every dropout rate 0 and LayerDrop 1.0: the Flax model in train mode computes what the reference without its
    conformer blocks computes with the same SpecAugment masks (feature projection, masks, intermediate feed-forward,
    adapter with the subsampled padding mask): an independent computation of the train-mode wiring."""
    directory = fixture_dir("w2vbert_adapter")
    loaded = load_params(directory, param_shapes)
    no_dropout = {name: 0.0 for name in ("hidden_dropout", "attention_dropout", "activation_dropout",
                                         "feat_proj_dropout", "conformer_conv_dropout")}
    config = loaded.config.replace(**no_dropout, layerdrop=1.0)
    rng = np.random.default_rng(4)
    features = rng.standard_normal((2, 21, 160)).astype(np.float32)
    mask = np.ones((2, 21), np.int32)
    mask[1, 13:] = 0
    time, channels = rng.random((2, 21)) < 0.3, rng.random((2, config.hidden_size)) < 0.2
    apply = jax.jit(functools.partial(module_for(config).apply, deterministic=False))
    got = np.asarray(apply({"params": loaded.params}, features, mask, mask_time_indices=time,
                           mask_feature_indices=channels, rngs={"dropout": jax.random.key(0)}))
    fewer = model_for(config.replace(num_hidden_layers=0))
    state = reference_from_pretrained(directory)[0].state_dict()
    fewer.load_state_dict({k: v for k, v in state.items() if not k.startswith("encoder.layers.")})
    fewer.train()
    args = [torch.from_numpy(a) for a in (features, mask, time, channels)]
    with torch.no_grad():
        expected, unmasked = fewer(*args).numpy(), fewer(*args[:2]).numpy()
    err = _max_diff(got, expected)
    assert err <= TOLERANCE, f"max|diff|={err:.2e}"
    assert _max_diff(expected, unmasked) > 1e-2, "the masks changed nothing"


def test_there_is_no_feature_encoder_to_freeze(fixture_dir):
    loaded = load_params(fixture_dir("w2vbert"), param_shapes)
    with pytest.raises(UnsupportedConfig, match="no conv feature encoder"):
        module_for(loaded.config).init(jax.random.key(0), np.zeros((1, 2, 160), np.float32),
                                       freeze_feature_encoder=True)
    model, _ = reference_from_pretrained(fixture_dir("w2vbert"))
    with pytest.raises(UnsupportedConfig, match="no conv feature encoder"):
        model.freeze_feature_encoder()


# ----------------------------------------------------------------------------------------------------------
# End to end: compose, transcribe, check, fine-tuning batches


@pytest.fixture(scope="module")
def composed(fixture_dir, tmp_path_factory) -> Path:
    """w2v-BERT + the built-in BART (it has a tokenizer), composed from the command line with verification."""
    from convert.compose import main

    out = tmp_path_factory.mktemp("w2vbert") / "asr"
    assert main(["--encoder", str(fixture_dir("w2vbert")), "--decoder", "bart", "--output", str(out)]) == 0
    return out


def test_composed_model_is_verified_and_carries_the_encoders_preprocessor_config(composed):
    report = json.loads((composed / "compose_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    assert json.loads((composed / "preprocessor_config.json").read_text()) == PREPROCESSOR
    assert report["transformers"] == {"loads": True, "reason": None, "ignored": []}


def test_transcription_and_check_run_on_audio_files(composed, tmp_path, capsys):
    """`convert.generate` on two WAV files (one bucket: the shorter padded): each file's tokens are the reference's
    greedy tokens on that file's features alone, unpadded; `convert.check --audio` passes on them."""
    from convert.check import main as check_main
    from convert.generate import main as generate_main

    waves = [tone(0.62, 200, 0), tone(0.35, 310, 1)]
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path, wave in zip(paths, waves):
        soundfile.write(str(path), wave, RATE, subtype="FLOAT")
    out = tmp_path / "out.jsonl"
    assert generate_main(["--model", str(composed), "--audio", *map(str, paths), "--max-new-tokens", "6",
                          "--batch-size", "2", "--buckets", "1", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    reference = SpeechEncoderDecoderModel.from_pretrained(composed)
    settings = audio_io.feature_extractor_config(composed, reference.config.encoder)
    eos = reference.config.eos_token_id
    for record, wave in zip(records, waves):
        features, mask = audio_io.prepare_batch([wave], settings)
        expected = reference.generate(torch.from_numpy(features), torch.from_numpy(mask),
                                      max_new_tokens=6).sequences[0].tolist()
        expected = expected[:expected.index(eos, 1) + 1] if eos in expected[1:] else expected
        assert record["token_ids"] == expected, record
    assert abs(records[0]["score"] - records[1]["score"]) > 1e-4, records  # the audio reaches the decoder
    capsys.readouterr()
    assert check_main([str(composed), "--audio", *map(str, paths), "--max-new-tokens", "4"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    with pytest.raises(ConvertError, match=r"short\.wav: 500 samples is too short for the encoder \(it needs at "
                                           r"least 560\)"):
        from convert.transcribe import transcribe

        soundfile.write(str(tmp_path / "short.wav"), tone(500 / RATE, 200, 2), RATE)
        transcribe(str(composed), [str(tmp_path / "short.wav")], progress=False)


def test_fine_tuning_batches_are_feature_frames_with_spec_augment_on_them(composed, tmp_path):
    """`convert.finetune`'s host batches for a feature encoder: log-mel frames of each bucket's length, the frame
    mask, and SpecAugment time masks over those frames (transformers' draw: inside each utterance's real frames);
    freezing the (absent) feature encoder is refused."""
    from convert import finetune_run
    from convert.finetune_settings import FinetuneSettings

    (tmp_path / "wav").mkdir()
    with (tmp_path / "train.jsonl").open("w") as f:
        for i, seconds in enumerate((0.9, 0.5, 0.7)):
            soundfile.write(str(tmp_path / "wav" / f"{i}.wav"), tone(seconds, 180 + 60 * i, i), RATE)
            f.write(json.dumps({"audio": f"wav/{i}.wav", "text": "one two"}) + "\n")
    settings = FinetuneSettings(batch_size=3, num_buckets=1, max_steps=1)
    run = finetune_run.Run(composed, tmp_path / "train.jsonl", tmp_path / "train.jsonl", settings, tmp_path / "ckpt")
    batch, seconds = run.arrays(0, 0)
    frames = (fbank.frames_of(run.micro_batch(0).padded_length) + 1) // 2  # padded to even, pairs stacked
    assert batch["inputs"].shape == (3, frames, 160) and batch["attention_mask"].shape == (3, frames)
    assert seconds == pytest.approx(2.1)
    time_mask = batch["mask_time_indices"]
    assert time_mask.shape == (3, frames) and time_mask.any()
    assert not (time_mask & (batch["attention_mask"] == 0)).any()  # spans stay in the real frames
    frozen = FinetuneSettings(batch_size=3, num_buckets=1, max_steps=1, freeze_feature_encoder=True)
    with pytest.raises(ConvertError, match="freeze_feature_encoder=True: this encoder reads features, not audio"):
        finetune_run.Run(composed, tmp_path / "train.jsonl", tmp_path / "train.jsonl", frozen, tmp_path / "ckpt")
