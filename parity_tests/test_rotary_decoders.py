"""Llama, Qwen2, Mistral and Gemma 2 decoders (`convert/base/archs/{llama,qwen2,mistral,gemma2}.py`, on the decoder
core): their configs and rotary settings (`convert/base/rope.py`) read as transformers 5 reads them, the lossless
round trip, one-line refusals of what is not implemented; composition with every encoder, what compose creates and
says, extraction back to the source, the generation config. Against transformers' numbers: test_goldens.py; Flax
against the reference, key tables, pairs and gradients: the generic tests (test_architectures, test_pairs,
test_training)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert.base.archs.gemma2 import Gemma2Config
from convert.base.archs.llama import FULL_ATTENTION, SLIDING_ATTENTION, LlamaConfig, RotaryDecoderConfig
from convert.base.checkpoint import Checkpoint
from convert.base.composed import composed_keymap, read_any_config
from convert.base.archs.mistral import MistralConfig
from convert.base.archs.qwen2 import Qwen2Config
from convert.base.errors import UnsupportedConfig
from convert.base.registry import spec_for, specs
from convert.compose import main as compose_main
from convert.compose import transformers_compatibility
from convert.extract import extract
from convert.verify import seeded_inputs
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from scripts import fixtures_gemma2, fixtures_llama, fixtures_mistral, fixtures_qwen2
from scripts.make_fixtures import cases_by_arch
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

GOLDENS = Path(__file__).parent / "goldens"
ROPE = json.loads((GOLDENS / "manifest.json").read_text())["cases"]["rope"]
CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma2": Gemma2Config}
FIXTURES = {name: build for module in (fixtures_llama, fixtures_qwen2, fixtures_mistral, fixtures_gemma2)
            for name, build in module.CASES.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The fixtures' config.json dicts (the builders write small files; no model is built)."""
    root = tmp_path_factory.mktemp("rotary")
    out = {}
    for name, build in FIXTURES.items():
        build(root / name)
        out[name] = json.loads((root / name / "config.json").read_text())
    return out


def typed(d: dict):
    return CLASSES[d["model_type"]].from_hf_dict(d, where="decoder/config.json")


@pytest.mark.parametrize("name", list(FIXTURES))
def test_config_roundtrip_loses_nothing(name, written):
    d = written[name]
    config = typed(d)
    assert config.to_hf_dict() == d
    assert config == typed(json.loads(json.dumps(d))) and hash(config) == hash(typed(d))


def test_rotary_settings_take_part_in_equality_and_cannot_be_changed(written):
    """Configs are static arguments of compiled functions: two that differ only in their RoPE must differ."""
    d = written["llama_lm"]
    other = {**d, "rope_scaling": {**d["rope_scaling"], "factor": 4.0}}
    assert typed(d) != typed(other) and hash(typed(d)) != hash(typed(other))
    with pytest.raises(TypeError):
        typed(d).rope_scaling["factor"] = 2.0


def test_each_family_reads_what_transformers_reads(written):
    llama = typed(written["llama_lm"])
    assert (llama.num_kv_heads, llama.head_size, llama.bias_qkv, llama.layer_windows) == (2, 8, False, (None, None))

    biased = typed(written["llama_tied_bf16"])
    assert biased.bias_qkv and biased.bias_o and biased.bias_mlp and biased.eos_token_id == 2
    assert biased.eos_token_ids == (2, 94)

    qwen2 = typed(written["qwen2_lm"])
    assert qwen2.bias_qkv and not qwen2.bias_o and not qwen2.bias_mlp
    assert qwen2.layer_windows == (None, 4)  # from max_window_layers=1 on
    assert qwen2.replace(use_sliding_window=False).layer_windows == (None, None)

    mistral = typed(written["mistral_lm"])
    assert mistral.layer_windows == (4, 4) and mistral.head_size == 8
    assert mistral.replace(sliding_window=None).layer_windows == (None, None)

    gemma2 = typed(written["gemma2_lm"])
    assert gemma2.layer_windows == (4, None) and gemma2.head_size == 16 and gemma2.norm_offset == 1.0
    assert gemma2.attention_multiplier == 12 ** -0.5 and gemma2.embedding_multiplier == 32 ** 0.5
    assert (gemma2.attention_softcap, gemma2.final_logit_softcap, gemma2.sandwich_norms) == (2.0, 1.0, True)
    defaults = Gemma2Config.from_hf_dict({"model_type": "gemma2", "num_hidden_layers": 4})
    assert defaults.layer_types == (SLIDING_ATTENTION, FULL_ATTENTION) * 2 and defaults.activation == "gelu_pytorch_tanh"


@pytest.mark.parametrize("label", list(ROPE["rows"]))
def test_inverse_frequencies_match_transformers(label):
    """Every RoPE type, in both spellings of config.json, against transformers' LlamaRotaryEmbedding."""
    row = ROPE["rows"][label]
    fields = {k: v for k, v in row["config"].items() if k != "head_dim"}
    config = LlamaConfig.from_hf_dict({"model_type": "llama", "hidden_size": 4 * row["config"]["head_dim"],
                                       "num_attention_heads": 4, **fields})
    inv_freq, scaling = config.rotary_frequencies()
    with np.load(GOLDENS / ROPE["file"]) as f:
        want = f[f"{label}.inv_freq"]
    assert inv_freq.dtype == np.float32 and inv_freq.shape == want.shape
    err = float(np.max(np.abs(inv_freq.astype(np.float64) - want) / want))
    assert err <= 2 ** -22, f"{label}: inv_freq relative max|diff|={err:.2e} (float32 rounding is 6e-8)"
    assert abs(scaling - row["attention_scaling"]) <= 1e-12, (label, scaling, row["attention_scaling"])


def test_fixture_ropes_hit_what_they_were_built_for(written):
    """llama_lm's llama3 settings keep one frequency, blend one and divide two; qwen2_lm's YaRN scales cos/sin."""
    llama = typed(written["llama_lm"])
    plain, _ = llama.replace(rope_scaling=None).rotary_frequencies()
    scaled, _ = llama.rotary_frequencies()
    ratio = plain / scaled
    assert ratio[0] == 1 and 1 < ratio[1] < 8 and np.all(ratio[2:] == 8), ratio
    assert typed(written["qwen2_lm"]).rotary_frequencies()[1] > 1


@pytest.mark.parametrize(("model_type", "field", "value", "culprit"), [
    ("llama", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
    ("llama", "rope_parameters", {"rope_type": "longrope", "factor": 2.0}, "rope_parameters.rope_type='longrope'"),
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling.low_freq_factor is missing"),
    ("llama", "rope_scaling", {"type": "linear"}, "rope_scaling.factor is missing"),
    ("llama", "rope_scaling", {"type": "linear", "factor": -2}, "rope_scaling.factor=-2"),
    ("llama", "rope_theta", -1.0, "rope_theta=-1.0"),
    ("llama", "partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
    ("llama", "rope_parameters", {"full_attention": {"rope_type": "default"}}, "one setting per layer type"),
    ("llama", "rope_scaling", "yes", "rope_scaling='yes'"),
    ("llama", "hidden_act", "mish", "hidden_act='mish'"),
    ("llama", "num_key_value_heads", 3, "num_key_value_heads=3"),
    ("llama", "num_attention_heads", 5, "num_attention_heads=5"),
    ("llama", "head_dim", 7, "head_dim=7"),
    ("llama", "cross_attention_hidden_size", 48, "cross_attention_hidden_size=48"),
    ("llama", "eos_token_id", "2", 'eos_token_id="2"'),
    ("qwen2", "layer_types", ["full_attention", "chunked_attention"], "layer_types='chunked_attention'"),
    ("qwen2", "layer_types", ["full_attention"], "layer_types=['full_attention']"),
    ("mistral", "sliding_window", 0, "sliding_window=0"),
    ("gemma2", "use_bidirectional_attention", True, "use_bidirectional_attention=True"),
    ("gemma2", "hidden_activation", "mish", "hidden_activation='mish'"),
    ("gemma2", "attn_logit_softcapping", 0.0, "attn_logit_softcapping=0.0"),
])
def test_unimplemented_settings_are_refused_naming_the_field(model_type, field, value, culprit, written):
    d = {**next(c for c in written.values() if c["model_type"] == model_type), field: value}
    if field == "rope_parameters":
        d.pop("rope_scaling", None)  # which wins over rope_parameters, as in transformers
    with pytest.raises(UnsupportedConfig) as error:
        typed(d)
    message = str(error.value)
    assert message.startswith("decoder/config.json: ") and culprit in message and "\n" not in message, message


# ----------------------------------------------------------------------------------------------------------
# Composed with every encoder (the heavy pairs, numbers included, are in test_pairs.py and test_training.py:
# `HEAVY_ENCODERS` in each fixture module)

ROTARY_SPECS = [spec for spec in specs("decoder") if issubclass(spec.config_class, RotaryDecoderConfig)]
MAIN_CASES = {spec.name: next(iter(cases_by_arch()[spec.name])) for spec in ROTARY_SPECS}
EVERY_PAIR = [(next(iter(cases_by_arch()[e.name])), MAIN_CASES[d.name]) for e in specs("encoder")
              for d in ROTARY_SPECS]


@pytest.mark.parametrize(("encoder", "decoder"), EVERY_PAIR, ids=[f"{e}+{d}" for e, d in EVERY_PAIR])
def test_every_encoder_composes_with_every_rotary_decoder(encoder, decoder, composed_dir, fixture_dir):
    """Every source tensor is copied bit for bit into both files; the composer creates exactly the cross-attention
    (and `enc_to_dec_proj` when the widths differ), initialised as transformers would (kernels N(0, the decoder's
    initializer_range), biases 0, RMSNorm weights 1, Gemma's `1 + weight` ones 0)."""
    directory = composed_dir(encoder, decoder)
    report = json.loads((directory / "compose_report.json").read_text())
    config = read_any_config(json.loads((directory / "config.json").read_text()))
    spec = spec_for(config.decoder, role="decoder")
    torch_file, flax_file = Checkpoint(directory), Checkpoint(directory, prefer=("flax_model.msgpack",))
    keymap = composed_keymap(config)
    for role, case in (("encoder", encoder), ("decoder", decoder)):
        source = Checkpoint(fixture_dir(case))
        for source_key, target in report[role]["loaded"]:
            want = source.get(source_key)
            key = keymap.to_torch(target)[0]
            assert torch_file.get(key).tobytes() == want.tobytes(), key
            assert keymap.to_flax(key)[1].to_torch(flax_file.get(target)).tobytes() == want.tobytes(), target
    created = set(report["initialised"])
    cross = {p for p in flax_file.keys() if any(re.fullmatch("decoder/" + r.removesuffix(r"\Z"), p)
                                                  for r in spec.initializable)}
    projection = {p for p in flax_file.keys() if p.startswith("enc_to_dec_proj/")}
    assert cross and created == cross | projection, sorted(created ^ (cross | projection))
    assert bool(projection) == (config.encoder.encoder_output_size != config.decoder.hidden_size)
    norm_start = 1.0 - config.decoder.norm_offset
    for path in created:
        value = flax_file.get(path).astype(np.float64)
        if path.endswith("norm/weight"):
            assert np.all(value == norm_start), path
        elif path.endswith("/bias"):
            assert np.all(value == 0), path
        else:
            assert abs(value.std() / config.decoder.init_scale - 1) < 0.25, (path, value.std())


def test_cli_composes_verified_and_says_transformers_cannot_run_it(fixture_dir, tmp_path, capsys):
    """`python -m convert.compose` with its verification (Flax and the reference against a float64 run) on a
    Mistral, whose sliding window the verification's sequence outgrows; the summary, compose_report.json and the
    model card say that transformers cannot run a composed Mistral, and give the command that extracts its
    decoder."""
    out = tmp_path / "asr"
    code = compose_main(["--encoder", str(fixture_dir("w2v_group")), "--decoder", str(fixture_dir("mistral_lm")),
                         "--output", str(out), "--no-progress"])
    summary = capsys.readouterr().out
    assert code == 0, summary
    report = json.loads((out / "compose_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    assert report["transformers"]["loads"] is False
    reason = report["transformers"]["reason"]
    assert "MistralForCausalLM" in reason and "python -m convert.extract DIR --part decoder --output llm" in reason
    assert reason in summary and reason in (out / "README.md").read_text()
    config = read_any_config(json.loads((out / "config.json").read_text()))
    assert transformers_compatibility(config) == report["transformers"]


def test_extracted_llama_is_its_source_again(composed_dir, fixture_dir, tmp_path):
    """Composed, then extracted: the decoder is the source checkpoint's tensors bit for bit, without the
    cross-attention compose created, and its config the source's (plus the composer's ids and flags, off)."""
    directory = composed_dir("w2v_group", "llama_lm")
    result = extract(directory, "decoder", tmp_path / "llm", log=io.StringIO())
    got = Checkpoint(result.output)
    source = Checkpoint(fixture_dir("llama_lm"))
    assert sorted(got.keys()) == sorted(source.keys())
    assert all(got.get(k).tobytes() == source.get(k).tobytes() for k in source.keys())
    left_out = [key for key, _ in result.report["left_out"] if "cross_attn" in key]
    assert len(left_out) == 5 * 2 and all(key.startswith("decoder.model.layers.") for key in left_out)
    written = json.loads((result.output / "config.json").read_text())
    original = json.loads((fixture_dir("llama_lm") / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("is_decoder", "add_cross_attention")} == original
    assert written["add_cross_attention"] is False and result.report["transformers_class"] == "LlamaForCausalLM"


def test_the_decoders_generation_config_travels_and_sampling_follows_it(composed_dir):
    """Llama 3.x's generation_config.json (sampling, temperature 0.6, top-p 0.9, two eos ids) is the composed
    model's; without arguments both frameworks sample with it: the same processed scores (tokens removed by
    top-p, the rest at temperature 0.6), and beam search (an argument over it) gives the same tokens."""
    directory = composed_dir("w2v_group", "llama_tied_bf16")
    written = json.loads((directory / "generation_config.json").read_text())
    assert {k: written[k] for k in ("do_sample", "temperature", "top_p", "eos_token_id")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 94]}
    flax_model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    reference = torch_from_pretrained(directory)[0]
    batch = seeded_inputs(flax_model.config, seed=3, seconds=0.1)
    inputs, mask = batch["inputs"], batch["attention_mask"]
    flax_out = flax_model.generate(inputs, mask, max_new_tokens=1, output_scores=True, prng_key=jax.random.PRNGKey(0))
    torch_out = reference.generate(torch.from_numpy(inputs), torch.from_numpy(mask), max_new_tokens=1,
                                   output_scores=True, generator=torch.Generator().manual_seed(0))
    flax_scores, torch_scores = np.asarray(flax_out.scores), torch_out.scores.numpy()
    removed = np.isneginf(torch_scores)
    assert removed.any() and not removed.all(axis=-1).any(), "top-p removed nothing, or everything"
    assert np.array_equal(np.isneginf(flax_scores), removed)
    err = float(np.max(np.abs(flax_scores[~removed] - torch_scores[~removed])))
    assert err <= 1e-4, f"processed scores max|diff|={err:.2e}"
    beams = {"num_beams": 3, "do_sample": False, "max_new_tokens": 6}
    np.testing.assert_array_equal(
        flax_model.generate(inputs, mask, **beams).sequences,
        reference.generate(torch.from_numpy(inputs), torch.from_numpy(mask), **beams).sequences.numpy())
