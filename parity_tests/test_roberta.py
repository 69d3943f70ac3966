"""RoBERTa: its padding-offset positions, its sources, its position budget and config refusals.

Cached decoding, train mode, gradients and cross-attention caching run on BERT's modules and are tested for both
architectures in `test_bert.py`.
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import roberta as roberta_spec
from convert.base.errors import ConvertError, UnsupportedConfig
from convert.base.params import load_params
from flax_model import roberta as flax_roberta
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from scripts import fixtures_roberta
from torch_reference import roberta as torch_roberta
from torch_reference.registry import from_pretrained as reference_from_pretrained

TOL = 1e-5
PAD = fixtures_roberta.PAD


def make_positions(ids: np.ndarray, padding_idx: int, past_length: int) -> np.ndarray:
    """fairseq's `make_positions` as a loop: each non-pad token takes the next number after `padding_idx` and the
    `past_length` cached positions; a pad token takes `padding_idx`."""
    out = np.full(ids.shape, padding_idx, np.int64)
    for row in range(ids.shape[0]):
        count = past_length
        for t in range(ids.shape[1]):
            if ids[row, t] != padding_idx:
                count += 1
                out[row, t] = padding_idx + count
    return out


@pytest.mark.parametrize("past_length", [0, 5])
def test_position_ids_follow_fairseq_make_positions(past_length):
    ids = np.random.default_rng(past_length).integers(0, 4, (3, 9))  # a quarter of them pads
    ids[0, :] = PAD
    expected = make_positions(ids, PAD, past_length)
    got = np.asarray(flax_roberta.roberta_position_ids(ids, PAD, past_length))
    assert np.array_equal(got, expected), got
    got = torch_roberta.roberta_position_ids(torch.from_numpy(ids), PAD, past_length).numpy()
    assert np.array_equal(got, expected), got


def test_pad_tokens_inside_a_row_take_the_padding_position(fixture_dir):
    """With pad tokens inside the rows, the model's logits equal its own layers run on the position ids of
    `make_positions` (the reference), and Flax equals the reference."""
    directory = fixture_dir("roberta_xattn_untied")
    model, _ = reference_from_pretrained(directory)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 112, (2, 8))
    ids[0, 2] = ids[1, 5] = ids[1, 6] = PAD
    mask = np.ones((2, 8), np.int64)
    mask[1, 7] = 0
    encoder_out = torch.from_numpy(rng.standard_normal((2, 6, 32)).astype(np.float32))
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(ids), torch.from_numpy(mask), encoder_out)
        positions = torch.from_numpy(make_positions(ids, PAD, 0))
        hidden, _ = model.roberta(torch.from_numpy(ids), positions, torch.from_numpy(mask), encoder_out, None, None)
        by_hand = model.lm_head(hidden)
    assert torch.equal(logits, by_hand)
    loaded = load_params(directory, param_shapes)
    got, _ = jax.jit(module_for(loaded.config).apply)({"params": loaded.params}, ids.astype(np.int32), mask,
                                                       encoder_out.numpy())
    err = float(np.max(np.abs(np.asarray(got, np.float64) - logits.numpy())))
    assert err <= TOL, f"max|diff|={err:.2e}"


def test_position_budget_excludes_the_padding_offset(fixture_dir):
    """max_position_embeddings=66 with pad 1 serves 64 decoder positions: the 64th token uses the last row."""
    model, _ = reference_from_pretrained(fixture_dir("roberta_causal"))
    assert model.config.max_positions == model.config.max_position_embeddings - PAD - 1 == 64
    ids = torch.full((1, 64), 7)
    with torch.no_grad():
        assert model(ids)[0].shape == (1, 64, 112)
        with pytest.raises(ValueError, match="65 positions exceed the decoder's 64"):
            model(torch.full((1, 65), 7))
    with pytest.raises(ValueError, match="65 positions exceed the decoder's 64"):
        model.init_cache(1, 65)
    loaded = load_params(fixture_dir("roberta_causal"), param_shapes)
    with pytest.raises(ValueError, match="65 positions exceed the decoder's 64"):
        module_for(loaded.config).apply({"params": loaded.params}, 1, 65, method="init_cache")


def test_source_classes_yield_the_same_decoder_weights(fixture_dir):
    """RobertaForCausalLM (transformers 5 safetensors) and RobertaForMaskedLM (two .bin shards with every tied
    copy and the position_ids buffer) of the same weights load to the same Flax leaves."""
    reference = traverse_util.flatten_dict(load_params(fixture_dir("roberta_causal"), param_shapes).params, sep="/")
    result = load_params(fixture_dir("roberta_mlm_bin"), param_shapes)
    flat = traverse_util.flatten_dict(result.params, sep="/")
    assert flat.keys() == reference.keys()
    for path, value in reference.items():
        assert np.asarray(flat[path]).tobytes() == np.asarray(value).tobytes(), path
    dropped = dict(result.plan.dropped)
    assert dropped == {"roberta.embeddings.position_ids": "position-id buffer saved by older transformers versions, "
                       "not a weight", "lm_head.decoder.weight": "tied to roberta.embeddings.word_embeddings.weight",
                       "lm_head.decoder.bias": "duplicate of lm_head.bias"}


def test_roberta_model_source_composes_with_the_lm_head_started_as_transformers_would(fixture_dir, tmp_path):
    from convert.compose import compose

    source = tmp_path / "roberta_model"
    fixtures_roberta.roberta_model(source)
    with pytest.raises(ConvertError, match="missing lm_head"):
        reference_from_pretrained(source)
    out = tmp_path / "composed"
    compose(str(fixture_dir("w2v_group")), str(source), out, verify=False, progress=False, log=io.StringIO())
    initialised = set(json.loads((out / "compose_report.json").read_text())["initialised"])
    head = {f"decoder/lm_head/{p}" for p in ("dense/kernel", "dense/bias", "layer_norm/scale", "layer_norm/bias",
                                              "bias")}
    assert head <= initialised
    assert all(p in head or "/crossattention/" in p or p.startswith("enc_to_dec_proj/") for p in initialised)
    composed = traverse_util.flatten_dict(load_params(out, param_shapes).params, sep="/")
    assert np.all(composed["decoder/lm_head/layer_norm/scale"] == 1) and not np.any(composed["decoder/lm_head/bias"])
    source_leaves = traverse_util.flatten_dict(load_params(fixture_dir("roberta_causal"), param_shapes).params,
                                                 sep="/")
    for path, value in source_leaves.items():
        if path.startswith("roberta/"):
            assert np.asarray(composed[f"decoder/{path}"]).tobytes() == np.asarray(value).tobytes(), path


def test_init_shapes_follow_hf_flax_layout():
    config = roberta_spec.RobertaConfig.from_hf_dict(fixtures_roberta.hf_config(add_cross_attention=True,
                                                                                 tie_word_embeddings=False))
    shapes = param_shapes(config)
    assert shapes["roberta/embeddings/position_embeddings/embedding"] == (66, 32)
    assert shapes["roberta/embeddings/token_type_embeddings/embedding"] == (1, 32)
    assert shapes["roberta/encoder/layer/1/crossattention/output/LayerNorm/scale"] == (32,)
    assert shapes["lm_head/dense/kernel"] == (32, 32)
    assert shapes["lm_head/layer_norm/scale"] == (32,)
    assert shapes["lm_head/decoder/kernel"] == (32, 112) and shapes["lm_head/bias"] == (112,)


@pytest.mark.parametrize(("change", "message"), [
    ({"pad_token_id": None}, "pad_token_id=None is required"),
    ({"max_position_embeddings": 2}, "max_position_embeddings=2 leaves no position after the padding offset"),
    ({"position_embedding_type": "relative_key_query"}, "position_embedding_type='relative_key_query' is not"),
])
def test_unsupported_roberta_config_is_refused(change, message):
    with pytest.raises(UnsupportedConfig, match=message) as info:
        roberta_spec.RobertaConfig.from_hf_dict(fixtures_roberta.hf_config(**change), "decoder/config.json")
    assert str(info.value).startswith("decoder/config.json: ") and "\n" not in str(info.value)


def test_roberta_config_is_not_taken_for_bert():
    from convert.base.registry import spec_for

    assert spec_for(roberta_spec.RobertaConfig()).name == "roberta"
