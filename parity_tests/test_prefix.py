"""The prefix composition's base pieces: the prompt template and its tokenisation, the config's round trip, and
the directory layout (each part in its own format, the projector beside them) read back bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.base.errors import CheckpointError, UnsupportedConfig, UsageError
from convert.base.prefix import (
    PROJECTOR_FILE,
    SpeechPrefixConfig,
    prefix_keymap,
    projector_shapes,
    read_prefix_config,
    split_prompt,
    tokenize_prompt,
)
from convert.base.prefix_io import load_prefix_params, save_prefix_params
from flax_model.speech_encoder_decoder import init_tree

BUILTIN = Path(__file__).resolve().parents[1] / "convert" / "builtin"


def test_the_prompt_template_holds_audio_once():
    assert split_prompt("Transcribe: {audio}") == ("Transcribe: ", "")
    assert split_prompt("{audio} in {{braces}}?") == ("", " in {braces}?")
    for bad, why in (("no audio", "exactly once (found 0)"), ("{audio}{audio}", "exactly once (found 2)"),
                     ("{audio} {lang}", "a field other than {audio}")):
        with pytest.raises(UsageError, match=r"^prompt=.*" + why.replace("(", r"\(").replace(")", r"\)")):
            split_prompt(bad)


def test_the_prompt_is_tokenised_piece_by_piece_with_bos_only_when_the_tokenizer_adds_it():
    vocab = {"<s>": 0, "a": 1, "say": 2, "it": 3, "now": 4}

    def encoder(adds_bos):
        def encode(text, specials):
            ids = [vocab[w] for w in text.split()]
            return [0, *ids] if specials and adds_bos else ids
        return encode

    assert tokenize_prompt("say {audio} now", encoder(True), 0) == ([0, 2], [4])
    assert tokenize_prompt("say {audio} now", encoder(False), 0) == ([2], [4])
    assert tokenize_prompt("{audio}", encoder(True), 0) == ([0], [])
    assert tokenize_prompt("{audio}", encoder(True), None) == ([], [])


def _config(projector_type="mlp", **fields):
    encoder = json.loads((BUILTIN / "wav2vec2" / "config.json").read_text())
    decoder = json.loads((BUILTIN / "gpt2" / "config.json").read_text())
    d = {"model_type": "speech-prefix-lm", "projector_type": projector_type, "stack_frames": 3,
         "prompt": "Say: {audio}", "prompt_ids_before": [5, 6], "prompt_ids_after": [], "eos_token_id": 0,
         "pad_token_id": 0, "encoder": encoder, "decoder": decoder, **fields}
    return SpeechPrefixConfig.from_hf_dict(d)


def test_the_config_round_trips_and_refuses_what_it_does_not_implement():
    config = _config()
    again = SpeechPrefixConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert again == config and again.to_hf_dict() == config.to_hf_dict()
    assert config.projector_input_size == 3 * config.encoder.encoder_output_size
    assert config.projector_inner_size == config.decoder.hidden_size
    assert int(config.audio_lengths(np.int32(11))) == 3
    linear = _config("linear")
    assert projector_shapes(linear) == {"projector/linear_1/kernel": (3 * 48, 32), "projector/linear_1/bias": (32,)}
    assert prefix_keymap(linear).to_torch("projector/linear_1/kernel")[0] == "projector.linear_1.weight"
    for field, value, why in (("projector_type", "conv", "is not one of linear, mlp"),
                              ("stack_frames", 0, "must be at least 1"),
                              ("projector_activation", "tanh", "is not one of gelu, relu"),
                              ("prompt", "no audio here", "exactly once")):
        with pytest.raises(UnsupportedConfig, match=f"^config.json: .*{field}.*{why}"):
            _config(**{field: value})


def test_the_directory_holds_each_part_in_its_own_format_and_reads_back_bit_for_bit(tmp_path):
    config = _config("mlp")
    rng = np.random.default_rng(0)
    leaves = {}
    for part in ("encoder", "decoder"):
        tree = init_tree(getattr(config, part))
        from flax import traverse_util

        for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
            leaves[f"{part}/{path}"] = rng.standard_normal(leaf.shape).astype(np.float32)
    for path, shape in projector_shapes(config).items():
        leaves[path] = rng.standard_normal(shape).astype(np.float32)
    save_prefix_params(tmp_path, config, leaves)
    for part in ("encoder", "decoder"):
        own = json.loads((tmp_path / part / "config.json").read_text())
        assert own == getattr(config, part).to_hf_dict(), part
        assert {"model.safetensors", "flax_model.msgpack"} <= {p.name for p in (tmp_path / part).iterdir()}
    from convert.base.checkpoint.safetensors_reader import SafetensorsFile

    names = set(SafetensorsFile(tmp_path / PROJECTOR_FILE).entries)
    expected = {f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert names == expected
    assert {prefix_keymap(config).to_torch(p)[0] for p in leaves if p.startswith("projector/")} == expected

    def shapes_of(part_config):
        from flax import traverse_util

        return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(init_tree(part_config), sep="/").items()}

    for prefer in (("flax_model.msgpack",), ("model.safetensors",)):
        read_config, read = load_prefix_params(tmp_path, shapes_of, prefer=prefer)
        assert read_config == config
        assert read.keys() == leaves.keys()
        differ = [k for k in leaves if not np.array_equal(read[k], leaves[k])]
        assert not differ, differ[:3]

    # A part whose config.json was changed by hand no longer matches the model's: refused, naming the field.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path, bad, ignore=shutil.ignore_patterns("bad"))
    own = json.loads((bad / "decoder" / "config.json").read_text())
    own["n_layer"] = 3
    (bad / "decoder" / "config.json").write_text(json.dumps(own))
    with pytest.raises(CheckpointError, match=r"decoder/config.json: differs from config.json's 'decoder' "
                                              r"\(fields: n_layer\)"):
        read_prefix_config(bad)
    (bad / "decoder" / "config.json").write_text(json.dumps(config.decoder.to_hf_dict()))
    (bad / PROJECTOR_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{PROJECTOR_FILE}: no such file"):
        load_prefix_params(bad, shapes_of)


def test_compose_prefix_copies_each_part_bit_for_bit_and_initialises_only_the_projector(tmp_path):
    import io

    from convert.base.checkpoint import Checkpoint
    from convert.compose_prefix import compose_prefix

    out = tmp_path / "prefix"
    result = compose_prefix("wav2vec2", "gpt2", out, projector="mlp", stack_frames=2, prompt="Transcribe: {audio}",
                            verify=False, progress=False, log=io.StringIO())
    config = read_prefix_config(out)
    assert (config.projector_type, config.stack_frames, config.prompt) == ("mlp", 2, "Transcribe: {audio}")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(BUILTIN / "gpt2" / "tokenizer.json"))
    assert list(config.prompt_ids_before) == tokenizer.encode("Transcribe: ", add_special_tokens=False).ids
    assert config.prompt_ids_after == () and config.eos_token_id == config.decoder.eos_token_id
    for part, builtin in (("encoder", "wav2vec2"), ("decoder", "gpt2")):
        source, written = Checkpoint(BUILTIN / builtin), Checkpoint(out / part, prefer=("model.safetensors",))
        assert set(written.keys()) <= set(source.keys())
        differ = [k for k in written.keys() if not np.array_equal(written.get(k), source.get(k))]
        assert not differ, (part, differ[:3])
    assert (out / "decoder" / "tokenizer.json").is_file() and (out / "encoder" / "preprocessor_config.json").is_file()
    assert result.report["initialised"] == sorted(projector_shapes(config))
    assert (out / "compose_report.json").is_file() and "prefix composition" in (out / "README.md").read_text()


def test_a_bfloat16_prefix_composition_stores_bfloat16_and_passes_its_verification(tmp_path):
    """`--dtype bfloat16`: each part's tensors are the sources' rounded to bfloat16, and the verification (the
    reference reading the bfloat16 files, Flax's parameters in float32 as the reference holds them) passes."""
    import io

    import ml_dtypes

    from convert.base.checkpoint import Checkpoint
    from convert.compose_prefix import compose_prefix

    out = tmp_path / "prefix"
    result = compose_prefix("wav2vec2", "gpt2", out, stack_frames=2, prompt="{audio}", dtype="bfloat16",
                            progress=False, log=io.StringIO())
    verification = result.report["verification"]
    assert verification["passed"] and verification["weight_files_identical"], verification
    source, written = Checkpoint(BUILTIN / "gpt2"), Checkpoint(out / "decoder", prefer=("model.safetensors",))
    key = next(k for k in sorted(written.keys()) if k.endswith("attn.c_attn.weight"))
    assert written.get(key).dtype == ml_dtypes.bfloat16
    assert np.array_equal(written.get(key), source.get(key).astype(ml_dtypes.bfloat16)), key


def test_compose_prefix_refuses_a_decoder_that_is_not_a_language_model_on_its_own(tmp_path):
    from convert.compose_prefix import compose_prefix

    with pytest.raises(UnsupportedConfig, match=r"^decoder=bart: bart is not a decoder-only language model; the "
                                                r"prefix mode takes one of: gpt2"):
        compose_prefix("wav2vec2", "bart", tmp_path / "out", verify=False, progress=False)
    assert not (tmp_path / "out").exists()


def test_compose_prefix_refuses_linear_projector_settings_and_a_projector_beyond_memory(tmp_path):
    """The mlp's width and activation given for the linear projector would be recorded and unused: refused. An
    mlp too large for the machine is refused by the memory estimate, which counts the projector, before it is
    drawn (it used to be drawn first and run out of memory)."""
    from convert.base.errors import ConvertError, UsageError
    from convert.compose_prefix import compose_prefix

    out = tmp_path / "out"
    for setting, message in (({"projector_hidden_size": 8}, "projector_hidden_size=8"),
                             ({"projector_activation": "relu"}, "projector_activation=relu")):
        with pytest.raises(UsageError, match=rf"^{message}: applies to projector=mlp only \(this projector is "
                                             r"linear\)$"):
            compose_prefix("wav2vec2", "gpt2", out, verify=False, progress=False, **setting)
    with pytest.raises(ConvertError, match=r"^the composed model \([\d,.]+M parameters, [\d.]+ TB in float32\) to "
                                           r"stream into the weight files needs at least"):
        compose_prefix("wav2vec2", "gpt2", out, projector="mlp", projector_hidden_size=2_000_000_000, verify=False,
                       progress=False, max_memory="1TB")
    assert not out.exists()


def test_compose_prefix_notes_a_prompt_its_tokenizer_reads_as_unknown_tokens(tmp_path):
    import io
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from convert.compose_prefix import compose_prefix
    from convert.sources import BUILTIN_DIR

    known = io.StringIO()
    compose_prefix("wav2vec2", "gpt2", tmp_path / "known", verify=False, progress=False, log=known)
    assert "note:" not in known.getvalue(), known.getvalue()
    dec = tmp_path / "dec"
    shutil.copytree(BUILTIN_DIR / "gpt2", dec)
    vocab = json.loads((dec / "config.json").read_text())["vocab_size"]
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token=f"w{vocab - 1}"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(dec / "tokenizer.json"))
    unknown = io.StringIO()
    compose_prefix("wav2vec2", str(dec), tmp_path / "unknown", verify=False, progress=False, log=unknown,
                   prompt="w5 {audio} transcribe")
    ids = json.loads((tmp_path / "unknown" / "compose_report.json").read_text())["prompt"]
    total = len(ids["ids_before"]) + len(ids["ids_after"])
    assert [*ids["ids_before"], *ids["ids_after"]].count(vocab - 1) == 1, ids  # "transcribe"; w5 is known
    assert f"note: 1 of the prompt's {total} tokens are the decoder tokenizer's unknown token" in unknown.getvalue(), (
        unknown.getvalue())
