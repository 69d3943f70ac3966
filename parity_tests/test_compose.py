"""Composition: the combined model's parity, bit-exact copies, initialisation, output files and the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors import safe_open

from convert.base.checkpoint import Checkpoint
from convert.compose import compose
from convert.base.composed import SpeechEncoderDecoderConfig
from convert.base.errors import ConvertError, KeyMapError, UnsupportedConfig
from convert.base.keymap import SourceRules
from convert.base.registry import spec_for
from convert.verify import compare_weight_files, load_both, logits_difference, seeded_inputs
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

TOL = 1e-5
REPO = Path(__file__).resolve().parent.parent

# (encoder fixture, decoder fixture, has projection, initialised Flax paths besides the projection)
PAIRS = {
    "w2v_adapter+bart": ("w2v_group_adapter", "bart_cg", True),
    "w2v_stable+gpt2": ("w2v_stable_wide", "gpt2_lm", True),
    "same_width+bart": ("w2v_group", "bart_causal", False),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_composed_flax_logits_match_torch_reference(pair, composed_dir):
    encoder, decoder, has_projection = PAIRS[pair]
    directory = composed_dir(encoder, decoder)
    config = SpeechEncoderDecoderConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
    assert config.has_projection == has_projection
    flax_model, torch_model = load_both(directory)
    batch = seeded_inputs(config, seed=1, seconds=0.1)
    err = logits_difference(flax_model, torch_model, batch)
    assert err <= TOL, f"{pair}: max|diff|={err:.2e} > {TOL:.0e}"
    flax_logits = np.asarray(flax_model(**batch).logits)
    assert flax_logits.shape[0] == 2 and flax_logits.shape[-1] == config.decoder.vocab_size
    # Guard against a vacuous comparison: the two utterances must differ.
    assert np.max(np.abs(flax_logits[0] - flax_logits[1])) > 1e-3


def _canonical_source(directory: Path, role: str) -> tuple[dict[str, np.ndarray], object]:
    """A source checkpoint's tensors under their canonical PyTorch names."""
    checkpoint = Checkpoint(directory)
    arch = spec_for(checkpoint.config, role=role)
    config = arch.adapt_config(arch.config(checkpoint.config, "config.json"), checkpoint)
    rules: SourceRules = arch.source_rules(config)
    canonical, _ = rules.canonicalize(checkpoint.keys())
    return {name: checkpoint.get(src) for name, src in canonical.items()}, arch


@pytest.mark.parametrize("pair", list(PAIRS))
def test_every_source_weight_is_copied_bit_exactly_to_both_files(pair, composed_dir, fixture_dir):
    encoder, decoder, _ = PAIRS[pair]
    directory = composed_dir(encoder, decoder)
    out_torch = Checkpoint(directory)
    out_flax = Checkpoint(directory, prefer=("flax_model.msgpack",))
    assert out_torch.format == "safetensors" and out_flax.format == "flax"
    checked = 0
    for role, case in (("encoder", encoder), ("decoder", decoder)):
        tensors, arch = _canonical_source(fixture_dir(case), role)
        for name, source in tensors.items():
            key = f"{role}.{name}"
            assert key in out_torch, f"{key} missing from model.safetensors"
            got = out_torch.get(key)
            assert got.dtype == source.dtype and got.tobytes() == source.tobytes(), f"{key} differs"
            path, transform = arch.keymap.to_flax(name)
            flax_leaf = out_flax.get(f"{role}/{path}")
            assert flax_leaf.tobytes() == transform.to_flax(source).tobytes(), f"{role}/{path} differs"
            checked += 1
    assert checked > 50


def test_initialised_keys_are_exactly_the_missing_ones(composed_dir):
    report = json.loads((composed_dir("w2v_stable_wide", "gpt2_lm") / "compose_report.json").read_text())
    expected = {"enc_to_dec_proj/kernel", "enc_to_dec_proj/bias"}
    for layer in range(2):
        for module in ("c_attn", "q_attn", "c_proj"):
            expected |= {f"decoder/transformer/h/{layer}/crossattention/{module}/{leaf}" for leaf in ("kernel", "bias")}
        expected |= {f"decoder/transformer/h/{layer}/ln_cross_attn/{leaf}" for leaf in ("scale", "bias")}
    assert set(report["initialised"]) == expected
    bart = json.loads((composed_dir("w2v_group", "bart_causal") / "compose_report.json").read_text())
    assert bart["initialised"] == []


def test_initialisation_follows_the_decoders_scale(composed_dir):
    directory = composed_dir("w2v_stable_wide", "gpt2_lm")
    flax = Checkpoint(directory, prefer=("flax_model.msgpack",))
    kernel = flax.get("decoder/transformer/h/0/crossattention/c_attn/kernel")
    assert abs(float(kernel.std()) - 0.02) < 0.004, float(kernel.std())
    assert not flax.get("enc_to_dec_proj/bias").any()
    np.testing.assert_array_equal(flax.get("decoder/transformer/h/1/ln_cross_attn/scale"), 1.0)


def test_same_seed_gives_identical_files_and_another_seed_changes_only_initialised(fixture_dir, tmp_path):
    def run(name: str, seed: int) -> Path:
        return compose(str(fixture_dir("w2v_stable_wide")), str(fixture_dir("gpt2_lm")), tmp_path / name, seed=seed,
                       verify=False, progress=False, log=io.StringIO()).output

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    for name in ("model.safetensors", "flax_model.msgpack", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tc = Checkpoint(a), Checkpoint(c)
    report = json.loads((a / "compose_report.json").read_text())
    initialised_torch = {"enc_to_dec_proj.weight"} | {
        f"decoder.transformer.h.{i}.crossattention.{m}.weight"
        for i in range(2) for m in ("c_attn", "q_attn", "c_proj")}
    for key in ta.keys():
        same = ta.get(key).tobytes() == tc.get(key).tobytes()
        assert same != (key in initialised_torch), key
    assert report["init"]["seed"] == 7


def test_save_pretrained_then_from_pretrained_gives_identical_logits(composed_dir, tmp_path):
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir("w2v_group_adapter", "bart_cg"))
    batch = seeded_inputs(model.config, seed=3, seconds=0.1)
    before = np.asarray(model(**batch).logits)
    model.save_pretrained(tmp_path / "saved")
    again = FlaxSpeechEncoderDecoderModel.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(again(**batch).logits), before)
    torch_model, _ = torch_from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch_logits = torch_model(*(torch.from_numpy(batch[k]) for k in
                                     ("inputs", "attention_mask", "decoder_input_ids"))).logits.numpy()
    err = float(np.max(np.abs(torch_logits - before)))
    assert err <= TOL, f"max|diff|={err:.2e}"


def test_output_keys_are_hf_speech_encoder_decoder_keys(composed_dir):
    """transformers' SpeechEncoderDecoderModel.from_pretrained must find nothing missing or unexpected:
    the safetensors keys are the reference state dict (HF's names) minus the tied LM head, as HF saves it."""
    for encoder, decoder, _ in PAIRS.values():
        directory = composed_dir(encoder, decoder)
        config = SpeechEncoderDecoderConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
        expected = set(SpeechEncoderDecoderModel(config).state_dict()) - {"decoder.lm_head.weight"}
        with safe_open(directory / "model.safetensors", "np") as f:
            assert set(f.keys()) == expected
            assert f.metadata() == {"format": "pt"}
        flat = traverse_util.flatten_dict(
            __import__("flax").serialization.msgpack_restore((directory / "flax_model.msgpack").read_bytes()))
        assert {k[0] for k in flat} == ({"encoder", "decoder", "enc_to_dec_proj"} if config.has_projection
                                        else {"encoder", "decoder"})
        assert compare_weight_files(directory)["mismatched"] == []


def test_composed_config_is_hf_speech_encoder_decoder_config(fixture_dir, tmp_path):
    out = compose(str(fixture_dir("w2v_group")), str(fixture_dir("gpt2_lm")), tmp_path / "o", verify=False,
                  progress=False, log=io.StringIO(), pad_token_id=5).output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "speech-encoder-decoder" and config["is_encoder_decoder"] is True
    assert config["architectures"] == ["SpeechEncoderDecoderModel"]
    decoder = config["decoder"]
    assert decoder["is_decoder"] is True and decoder["add_cross_attention"] is True
    assert decoder["model_type"] == "gpt2" and config["encoder"]["model_type"] == "wav2vec2"
    # GPT-2 has no decoder_start_token_id: its bos starts decoding; the flag overrides pad.
    assert config["decoder_start_token_id"] == decoder["bos_token_id"]
    assert config["eos_token_id"] == decoder["eos_token_id"] and config["pad_token_id"] == 5
    # Fields we do not model survive the composition.
    source = json.loads((fixture_dir("gpt2_lm") / "config.json").read_text())
    for key, value in source.items():
        if key not in ("add_cross_attention", "is_decoder"):
            assert decoder[key] == value, key


def test_bfloat16_output_halves_the_weights(composed_dir):
    f32 = composed_dir("w2v_group", "bart_causal")
    bf16 = composed_dir("w2v_group", "bart_causal", dtype="bfloat16")
    with safe_open(bf16 / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    ratio = (bf16 / "model.safetensors").stat().st_size / (f32 / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.56, ratio
    # Every weight is the float32 one rounded to bfloat16, in both files.
    a, b = Checkpoint(f32), Checkpoint(bf16)
    for key in a.keys():
        assert b.get(key).tobytes() == a.get(key).astype(b.get(key).dtype).tobytes(), key
    assert compare_weight_files(bf16)["mismatched"] == []


def test_model_card_and_report_describe_the_composition(composed_dir):
    directory = composed_dir("w2v_stable_wide", "gpt2_lm")
    card = (directory / "README.md").read_text()
    report = json.loads((directory / "compose_report.json").read_text())
    assert card.startswith("---\n") and "pipeline_tag: automatic-speech-recognition" in card
    assert "crossattention" in card and "seed 0" in card
    assert report["encoder"]["model_type"] == "wav2vec2" and report["decoder"]["model_type"] == "gpt2"
    assert len(report["decoder"]["loaded"]) + len(report["encoder"]["loaded"]) == report["tensors"]["loaded"]
    assert set(report["files"]) >= {"config.json", "model.safetensors", "flax_model.msgpack", "README.md"}


def test_dropped_source_keys_are_reported(composed_dir):
    report = json.loads((composed_dir("w2v_group_adapter", "bart_cg") / "compose_report.json").read_text())
    dropped = dict(report["decoder"]["dropped"])
    assert any(k.startswith("model.encoder.") for k in dropped)
    assert all(why for why in dropped.values())


# ----------------------------------------------------------------------------------------------------------
# Bad input (library)


def test_existing_output_is_refused_without_overwrite(fixture_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match=r"^output=.*o: directory exists and is not empty"):
        compose(str(fixture_dir("w2v_group")), str(fixture_dir("bart_causal")), tmp_path / "o",
                verify=False, progress=False, log=io.StringIO())
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_a_decoder_as_encoder_is_refused(fixture_dir, tmp_path):
    with pytest.raises(UnsupportedConfig, match=r"^encoder=.*model_type='bart' is not a supported encoder"):
        compose(str(fixture_dir("bart_causal")), str(fixture_dir("bart_causal")), tmp_path / "o",
                verify=False, progress=False, log=io.StringIO())
    assert not (tmp_path / "o").exists()


def test_cross_attention_width_mismatch_is_refused(fixture_dir, tmp_path):
    decoder = tmp_path / "dec"
    decoder.mkdir()
    for p in fixture_dir("bart_causal").iterdir():
        (decoder / p.name).write_bytes(p.read_bytes())
    config = json.loads((decoder / "config.json").read_text())
    config["cross_attention_hidden_size"] = 32
    (decoder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match=r"cross_attention_hidden_size=32 differs from the encoder's"):
        compose(str(fixture_dir("w2v_stable_wide")), str(decoder), tmp_path / "o", verify=False, progress=False,
                log=io.StringIO())


def test_failure_midway_leaves_no_output(fixture_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Checkpoint.get

    def flaky(self, key, dtype=None):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(self, key, dtype)

    monkeypatch.setattr(Checkpoint, "get", flaky)
    with pytest.raises(KeyboardInterrupt):
        compose(str(fixture_dir("w2v_group")), str(fixture_dir("bart_causal")), tmp_path / "o",
                verify=False, progress=False, log=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_missing_decoder_tensor_is_refused_by_name(fixture_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    decoder = tmp_path / "dec"
    decoder.mkdir()
    (decoder / "config.json").write_bytes((fixture_dir("bart_causal") / "config.json").read_bytes())
    tensors = load_file(fixture_dir("bart_causal") / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.weight"]
    save_file(tensors, decoder / "model.safetensors")
    with pytest.raises(KeyMapError, match=r"^decoder=.*missing: decoder/model/decoder/layers/1/fc2/kernel"):
        compose(str(fixture_dir("w2v_group")), str(decoder), tmp_path / "o", verify=False, progress=False,
                log=io.StringIO())
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------
# The CLI in a subprocess


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert.compose", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


@pytest.mark.default_emitters  # the verification users run
def test_cli_composes_the_builtin_sources_offline(tmp_path):
    # Without --no-progress: stderr is not a terminal here, so no progress bar may be drawn on it.
    result = run_cli("--encoder", "wav2vec2", "--decoder", "bart", "--output", str(tmp_path / "out"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "verified    max |Δlogits| from a float64 reference run: Flax" in result.stdout
    assert "loaded" in result.stdout and "initialised" in result.stdout and "dropped" in result.stdout
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names >= {"config.json", "model.safetensors", "flax_model.msgpack", "README.md", "compose_report.json",
                     "tokenizer.json", "preprocessor_config.json"}
    report = json.loads((tmp_path / "out" / "compose_report.json").read_text())
    v = report["verification"]
    assert v["passed"] and v["max_abs_logits_diff"] <= 1e-5 and v["flax_error"] <= v["bound"], v
    assert report["verification"]["weight_files_identical"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_help_lists_every_flag(capsys):
    from convert.compose import main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    for flag in ("--encoder", "--decoder", "--output", "--encoder-revision", "--decoder-revision", "--seed",
                 "--dtype", "--max-shard-size", "--overwrite", "--no-verify", "--verify-factor", "--push-to-hub",
                 "--dry-run"):
        assert flag in out, flag


# Bad input to the CLI (one line, exit codes, nothing written) is catalogued in test_safety.py; interrupts are
# in test_interrupts.py.


def test_cli_failed_verification_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    """In this process (`convert.compose.main`; the test above starts the command as `python -m`)."""
    from convert import compose as compose_command

    # Flax is ~1e-6 from the float64 reference: a bound of 1e-9 times the reference's own error must fail.
    capsys.readouterr()
    code = compose_command.main(["--encoder", "wav2vec2", "--decoder", "bart", "--output", str(tmp_path / "out"),
                                 "--no-progress", "--verify-factor", "1e-9"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: verification failed: Flax is " in err and "more than 1e-09 x" in err
    assert "largest at utterance" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_reference_save_pretrained_then_from_pretrained_gives_identical_logits(composed_dir, tmp_path):
    model = SpeechEncoderDecoderModel.from_pretrained(composed_dir("w2v_stable_wide", "gpt2_lm"))
    assert model.load_report.loaded and not model.training
    batch = {k: torch.from_numpy(v) for k, v in seeded_inputs(model.config, seed=4, seconds=0.1).items()}
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "saved")
    # compose_report.json: the toolkit's mark (a stub here), which lets a later save replace the directory.
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"compose_report.json", "config.json",
                                                                 "model.safetensors"}
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert "decoder.lm_head.weight" not in f.keys()  # tied, left out as HF's safe serialization does
    again = SpeechEncoderDecoderModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, before)
    # The Flax class reads what the reference wrote.
    flax_logits = np.asarray(FlaxSpeechEncoderDecoderModel.from_pretrained(tmp_path / "saved")(
        **{k: v.numpy() for k, v in batch.items()}).logits)
    err = float(np.max(np.abs(flax_logits - before.numpy())))
    assert err <= TOL, f"max|diff|={err:.2e}"


@pytest.mark.parametrize("decoder", ["bart_cg", "mbart", "gpt2_lm", "gpt2_xattn_untied"])
@pytest.mark.parametrize("layers", [(3, 1), (1, 4)])
def test_one_layer_shape_trace_equals_the_full_trace(fixture_dir, decoder, layers):
    """compose takes the composed tree's shapes from a one-layer trace, repeated; it must equal a full trace."""
    from convert.compose import compose_config, open_source
    from flax_model.speech_encoder_decoder import init_shapes

    enc, dec = open_source(str(fixture_dir("w2v_group_adapter")), "encoder"), open_source(str(fixture_dir(decoder)),
                                                                                          "decoder")
    config = compose_config(enc, dec)
    field = {"bart": "decoder_layers", "mbart": "decoder_layers", "gpt2": "n_layer"}[config.decoder.to_hf_dict()[
        "model_type"]]
    config = dataclasses.replace(config, encoder=config.encoder.replace(num_hidden_layers=layers[0]),
                                 decoder=config.decoder.replace(**{field: layers[1]}))
    fast = traverse_util.flatten_dict(init_shapes(config), sep="/")
    full = traverse_util.flatten_dict(init_shapes(config, trace_every_layer=True), sep="/")
    assert fast == full
    assert f"encoder/encoder/layers/{layers[0] - 1}/attention/q_proj/kernel" in fast


# ----------------------------------------------------------------------------------------------------------
# The verification judges float error (against a float64 run of the reference), and still catches a bug


def _ill_conditioned_bart(fixture_dir, directory: Path, scale: float = 0.5) -> Path:
    """bart_causal with every matrix redrawn at std `scale` (BART initialises at 0.02): logits of ~10."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(fixture_dir("bart_causal"), directory)
    tensors = load_file(directory / "model.safetensors")
    rng = np.random.default_rng(0)
    for key, value in tensors.items():
        if value.ndim >= 2:
            tensors[key] = (rng.standard_normal(value.shape) * scale).astype(value.dtype)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_verification_passes_an_ill_conditioned_decoder_and_fails_a_broken_weight(fixture_dir, tmp_path,
                                                                                   monkeypatch):
    from convert import verify

    decoder = _ill_conditioned_bart(fixture_dir, tmp_path / "dec")
    good = compose(str(fixture_dir("w2v_group")), str(decoder), tmp_path / "good", progress=False, log=io.StringIO())
    v = good.report["verification"]
    figures = (f"Flax {v['flax_error']:.2e}, reference {v['reference_error']:.2e} from float64, bound "
               f"{v['bound']:.2e}, logits up to {v['logit_scale']:.1f}")
    assert v["passed"] and v["logit_scale"] > 5, figures
    assert 0 < v["reference_error"] and v["flax_error"] <= v["bound"] == v["factor"] * max(
        v["reference_error"], verify.FLOOR_ULPS * float(np.finfo(np.float32).eps) * v["logit_scale"]), figures
    assert set(v["where"]) == {"utterance", "position", "token", "flax", "float64"}

    # One weight off by 0.1% in the Flax model (as a wrong cast or a misread layout would do): caught.
    load_flax = verify.load_flax

    def broken(directory, prefer=None):
        model = load_flax(directory, prefer)
        flat = traverse_util.flatten_dict(model.params, sep="/")
        flat["decoder/model/decoder/layers/0/fc1/kernel"] = flat["decoder/model/decoder/layers/0/fc1/kernel"] * 1.001
        model.params = traverse_util.unflatten_dict(flat, sep="/")
        return model

    monkeypatch.setattr(verify, "load_flax", broken)
    failed = verify.verify_directory(good.output)
    assert not failed["passed"] and failed["weight_files_identical"], failed
    assert failed["flax_error"] > 2 * failed["bound"], f"{failed['flax_error']:.2e} vs bound {failed['bound']:.2e}"
    assert failed["reason"].startswith("Flax is ") and "more than 8 x" in failed["reason"]


def test_judgement_refuses_non_finite_logits():
    from convert.verify import judge_logits

    exact = np.linspace(-3, 3, 2 * 3 * 5).reshape(2, 3, 5)
    ref32 = exact.astype(np.float32)
    flax = ref32.copy()
    assert judge_logits(flax, ref32, exact)["passed"]
    flax[1, 2, 4] = np.nan
    judged = judge_logits(flax, ref32, exact)
    assert not judged["passed"] and judged["reason"] == "Flax gives NaN or Inf logits"
    assert judged["where"]["utterance"] == 1 and judged["where"]["position"] == 2 and judged["where"]["token"] == 4
    assert not judge_logits(ref32, ref32, np.full_like(exact, np.inf))["passed"]


# ----------------------------------------------------------------------------------------------------------
# Saying when transformers cannot load the output


def test_report_card_and_summary_say_when_transformers_cannot_load_the_output(composed_dir, fixture_dir, tmp_path):
    # An adapter whose output_hidden_size (48) differs from hidden_size (32) and from BART's width (32):
    # transformers builds enc_to_dec_proj as [32, 32] and refuses the [32, 48] weights (checked with 5.24).
    directory = composed_dir("w2v_group_adapter", "bart_cg")
    report = json.loads((directory / "compose_report.json").read_text())
    assert report["transformers"]["loads"] is False
    assert "hidden_size (32)" in report["transformers"]["reason"] and "48" in report["transformers"]["reason"]
    card = (directory / "README.md").read_text()
    assert "**transformers cannot load this model**: transformers builds enc_to_dec_proj" in card
    assert "from transformers import SpeechEncoderDecoderModel" not in card
    log = io.StringIO()
    compose(str(fixture_dir("w2v_group_adapter")), str(fixture_dir("bart_cg")), tmp_path / "o", verify=False,
            progress=False, log=log)
    assert "transformers cannot load this model: transformers builds enc_to_dec_proj" in log.getvalue()
    # A pair transformers loads says nothing of the kind.
    fine = composed_dir("w2v_stable_wide", "gpt2_lm")
    assert json.loads((fine / "compose_report.json").read_text())["transformers"] == {"loads": True, "reason": None, "ignored": []}
    assert "from transformers import SpeechEncoderDecoderModel" in (fine / "README.md").read_text()


def _pairs_over_every_architecture() -> list[tuple[str, str]]:
    from convert.base.registry import SPECS
    from scripts.make_fixtures import cases_by_arch

    first = {spec.name: next(iter(cases_by_arch()[spec.name])) for spec in SPECS}
    encoder = next(first[s.name] for s in SPECS if s.role == "encoder")
    decoder = next(first[s.name] for s in SPECS if s.role == "decoder")
    return [(first[s.name], decoder) if s.role == "encoder" else (encoder, first[s.name]) for s in SPECS]


@pytest.mark.parametrize("encoder, decoder", _pairs_over_every_architecture())
def test_float64_reference_run_layer_by_layer_equals_a_whole_float64_model(encoder, decoder, fixture_dir,
                                                                          monkeypatch):
    """The verification converts one layer at a time to float64 (memory); it must compute what .double() does."""
    import copy

    from convert.compose import compose_config, open_source
    from convert.verify import float64_logits, torch_logits

    config = compose_config(open_source(str(fixture_dir(encoder)), "encoder"),
                            open_source(str(fixture_dir(decoder)), "decoder"), decoder_start_token_id=0)
    torch.manual_seed(0)
    model = SpeechEncoderDecoderModel(config).eval()
    batch = seeded_inputs(config, seed=2, seconds=0.25)
    expected = torch_logits(copy.deepcopy(model).double(), batch, dtype=torch.float64)
    monkeypatch.setattr(type(model), "double", lambda self: pytest.fail("fell back to a whole float64 model"))
    got = float64_logits(model, batch)
    assert got.dtype == np.float64 and np.array_equal(got, expected), f"max|diff|={np.max(np.abs(got - expected)):.2e}"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # each went back after its module ran


def test_compose_refuses_a_sources_broken_tokenizer_or_preprocessor_config_before_writing(tmp_path):
    """The files composing copies are read first: a tokenizer.json that is no tokenizers file or belongs to another
    model (ids beyond the decoder's vocabulary), and a preprocessor config with a wrong field, are refused in one
    line naming the source and the file; nothing is written."""
    import shutil

    from tokenizers import Tokenizer, models

    from convert.base.audio import AudioError
    from convert.base.errors import CheckpointError
    from convert.sources import BUILTIN_DIR

    out = tmp_path / "out"
    run = lambda enc, dec: compose(str(enc), str(dec), out, verify=False, progress=False, log=io.StringIO())  # noqa: E731
    dec = tmp_path / "dec"
    shutil.copytree(BUILTIN_DIR / "bart", dec)
    (dec / "tokenizer.json").write_text("garbage{")
    with pytest.raises(CheckpointError, match=rf"^decoder={dec}: tokenizer.json: not a tokenizers file \("):
        run("wav2vec2", dec)
    vocab_size = json.loads((dec / "config.json").read_text())["vocab_size"]
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size + 5)}, unk_token="w0")).save(
        str(dec / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=rf"^decoder={dec}: tokenizer.json: makes token ids up to "
                                              rf"{vocab_size + 4} \('w{vocab_size + 4}'\), but the decoder has "
                                              rf"{vocab_size} \(vocab_size\)"):
        run("wav2vec2", dec)
    enc = tmp_path / "enc"
    shutil.copytree(BUILTIN_DIR / "wav2vec2", enc)
    (enc / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": "16000"}))
    with pytest.raises(AudioError, match=rf'^encoder={enc}/preprocessor_config.json: sampling_rate="16000" is not '
                                         r"an integer$"):
        run(enc, "bart")
    assert not out.exists()


def test_an_eos_id_outside_the_vocabulary_is_blamed_on_eos_when_pad_defaults_to_it(fixture_dir, tmp_path):
    """A decoder config without a pad id takes its eos id as pad: a bad eos id is named as eos_token_id, where it
    was written (it used to be reported as pad_token_id, a field the file does not have)."""
    import shutil

    dec = tmp_path / "dec"
    shutil.copytree(fixture_dir("llama_lm"), dec)
    config = json.loads((dec / "config.json").read_text())
    config.pop("pad_token_id", None)
    (dec / "config.json").write_text(json.dumps({**config, "eos_token_id": config["vocab_size"] + 10}))
    with pytest.raises(ConvertError, match=rf"^decoder={dec}/config.json: eos_token_id={config['vocab_size'] + 10} "
                                           rf"is not a token id of the decoder"):
        compose("wav2vec2", str(dec), tmp_path / "out", verify=False, progress=False, log=io.StringIO())
