"""Llama, Qwen2, Mistral and Gemma 2 configs (`convert/base/archs/{llama,qwen2,mistral,gemma2}.py`) and their rotary
settings (`convert/base/rope.py`): what they read from config.json as transformers 5 reads it, the lossless round
trip, and one-line refusals of what is not implemented. No model is run here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.base.archs.gemma2 import Gemma2Config
from convert.base.archs.llama import FULL_ATTENTION, SLIDING_ATTENTION, LlamaConfig
from convert.base.archs.mistral import MistralConfig
from convert.base.archs.qwen2 import Qwen2Config
from convert.base.errors import UnsupportedConfig
from scripts import fixtures_gemma2, fixtures_llama, fixtures_mistral, fixtures_qwen2

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
