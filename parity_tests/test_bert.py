"""BERT (and RoBERTa, which runs on BERT's modules): cached decoding, train mode, gradients, the key table, the
source classes, the composer's treatment of a `BertModel` source, and config refusals.

The generic tests (`test_architectures.py`) already compare Flax with the reference on every fixture; what is
particular to RoBERTa (its positions and sources) is in `test_roberta.py`.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import bert as bert_spec
from convert.base.checkpoint import Checkpoint
from convert.base.errors import ConvertError, UnsupportedConfig
from convert.base.params import load_params
from convert.base.registry import spec_for
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import param_shapes
from scripts import fixtures_bert
from torch_reference.registry import from_pretrained as reference_from_pretrained
from torch_reference.registry import model_for

TOL = 1e-5
BATCH, LENGTH, ENCODER_LENGTH, CACHE_LENGTH, PREFILL = 2, 8, 6, 10, 3
# The composed model always cross-attends: Flax caches are checked on the cross-attending cases (few compilations),
# the reference's on all.
FAMILY_CASES = ["bert_xattn_untied", "bert_lm", "roberta_xattn_untied", "roberta_causal"]
CROSS_CASES = ["bert_xattn_untied", "roberta_xattn_untied"]
# Each family's dropout rates (HF names): one at a time must change the training-mode output.
DROPOUT_RATES = ("hidden_dropout_prob", "attention_probs_dropout_prob")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.cache
def loaded(directory: Path) -> tuple[Any, dict[str, Any]]:
    """(config, Flax variables) of a fixture, through the spec's key table and source rules."""
    result = load_params(directory, param_shapes)
    return result.config, {"params": result.params}


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """A decoder batch whose second row ends in padding (ids avoid the special tokens 0-3, so that RoBERTa's
    positions are plain counts), and an encoder output whose first row ends in padding."""
    rng = np.random.default_rng(0)
    decoder_mask = np.ones((BATCH, LENGTH), np.int32)
    decoder_mask[1, LENGTH - 3:] = 0
    encoder_mask = np.ones((BATCH, ENCODER_LENGTH), np.int32)
    encoder_mask[0, ENCODER_LENGTH - 2:] = 0
    return {
        "input_ids": rng.integers(4, 112, (BATCH, LENGTH)).astype(np.int32),
        "attention_mask": decoder_mask,
        "encoder_hidden_states": rng.standard_normal((BATCH, ENCODER_LENGTH, 32)).astype(np.float32),
        "encoder_attention_mask": encoder_mask,
    }


def encoder_inputs(config: Any, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not config.add_cross_attention:
        return None, None
    return inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]


def as_torch(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a)


@functools.cache
def flax_functions(config: Any) -> dict[str, Callable[..., Any]]:
    """The jitted full forward, cached step and init_cache of a config (each compiles once per shape)."""
    module = module_for(config)
    return {
        "full": jax.jit(module.apply),
        "step": jax.jit(lambda p, ids, mask, cache: module.apply(p, ids, mask, cache=cache)),
        "init": jax.jit(lambda p, e, m: module.apply(p, BATCH, CACHE_LENGTH, e, m, method="init_cache")),
        "train": jax.jit(lambda p, key, ids, mask, e, m: module.apply(
            p, ids, mask, e, m, deterministic=False, rngs={"dropout": key})[0]),
    }


def flax_full_logits(directory: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    config, params = loaded(directory)
    logits, cache = flax_functions(config)["full"](params, inputs["input_ids"], inputs["attention_mask"],
                                                   *encoder_inputs(config, inputs))
    assert cache is None
    return np.asarray(logits)


def torch_full_logits(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        logits, cache = model(torch.from_numpy(inputs["input_ids"]).long(), as_torch(inputs["attention_mask"]),
                              *map(as_torch, encoder_inputs(model.config, inputs)))
    assert cache is None
    return logits.numpy()


def cache_mask(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The decoder mask over every cache slot: the tokens' mask, then slots not written yet."""
    return np.concatenate([inputs["attention_mask"], np.ones((BATCH, CACHE_LENGTH - LENGTH), np.int32)], axis=1)


def steps() -> Iterator[tuple[int, int]]:
    """A prefill of PREFILL tokens, then one token per call."""
    return itertools.pairwise([0, PREFILL, *range(PREFILL + 1, LENGTH + 1)])


def flax_cached_logits(directory: Path, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[Any]]:
    config, params = loaded(directory)
    fns = flax_functions(config)
    cache = fns["init"](params, *encoder_inputs(config, inputs))
    caches, logits = [cache], []
    for start, stop in steps():
        out, cache = fns["step"](params, inputs["input_ids"][:, start:stop], cache_mask(inputs), cache)
        assert int(cache.index) == stop
        logits.append(np.asarray(out))
        caches.append(cache)
    return np.concatenate(logits, axis=1), caches


def torch_cached_logits(model: Any, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[Any]]:
    cache = model.init_cache(BATCH, CACHE_LENGTH, *map(as_torch, encoder_inputs(model.config, inputs)))
    ids, mask = torch.from_numpy(inputs["input_ids"]).long(), torch.from_numpy(cache_mask(inputs))
    caches, logits = [cache], []
    with torch.no_grad():
        for start, stop in steps():
            out, cache = model(ids[:, start:stop], mask, cache=cache)
            assert cache.index == stop
            logits.append(out.numpy())
            caches.append(cache)
    return np.concatenate(logits, axis=1), caches


def base_model(config: Any) -> str:
    """The attribute holding embeddings and layers: `bert` or `roberta`."""
    return spec_for(config).layer_stack[1].split("/")[0]


# ----------------------------------------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("case", CROSS_CASES)
def test_flax_cached_decode_equals_full_forward(fixture_dir, inputs, case):
    directory = fixture_dir(case)
    cached, _ = flax_cached_logits(directory, inputs)
    err = max_diff(cached, flax_full_logits(directory, inputs))
    assert err <= TOL, f"{case}: max|diff|={err:.2e}"


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_torch_cached_decode_equals_full_forward(fixture_dir, inputs, case):
    model, _ = reference_from_pretrained(fixture_dir(case))
    cached, _ = torch_cached_logits(model, inputs)
    err = max_diff(cached, torch_full_logits(model, inputs))
    assert err <= TOL, f"{case}: max|diff|={err:.2e}"


@pytest.mark.parametrize("case", CROSS_CASES)
def test_cross_attention_keys_values_are_projected_once_at_init_cache(fixture_dir, inputs, case):
    directory = fixture_dir(case)
    config, params = loaded(directory)
    heads, head_dim = config.num_attention_heads, config.head_dim
    encoder_out, encoder_mask = encoder_inputs(config, inputs)
    _, caches = flax_cached_logits(directory, inputs)
    model, _ = reference_from_pretrained(directory)
    _, torch_caches = torch_cached_logits(model, inputs)
    layers = params["params"][base_model(config)]["encoder"]["layer"]
    for i in range(config.num_hidden_layers):
        cross = layers[str(i)]["crossattention"]["self"]
        key = (encoder_out @ np.asarray(cross["key"]["kernel"]) + np.asarray(cross["key"]["bias"]))
        key = key.reshape(BATCH, ENCODER_LENGTH, heads, head_dim)  # by hand: Flax kernels are (in, out)
        first = caches[0].layers[i]
        err = max_diff(first.cross_key, key)
        assert err <= TOL, f"layer {i}: cross keys at init_cache: max|diff|={err:.2e}"
        for cache in caches[1:]:
            assert np.array_equal(cache.layers[i].cross_key, first.cross_key)
            assert np.array_equal(cache.layers[i].cross_value, first.cross_value)
        assert all(c.layers[i].cross_key is torch_caches[0].layers[i].cross_key for c in torch_caches)
        err = max_diff(torch_caches[0].layers[i].cross_key.numpy(), key)
        assert err <= TOL, f"layer {i}: torch cross keys at init_cache: max|diff|={err:.2e}"

    # A decode step multiplies nothing into the encoder output ([B, S, D], or [B * S, D] as the linear layers
    # merge its leading axes); init_cache does, twice a layer.
    module = module_for(config)
    shapes = {encoder_out.shape, (encoder_out.shape[0] * encoder_out.shape[1], encoder_out.shape[2])}

    def reads_encoder(eqn: Any) -> bool:
        return eqn.primitive.name == "dot_general" and any(
            getattr(v, "aval", None) is not None and v.aval.shape in shapes for v in eqn.invars)

    step = jax.make_jaxpr(lambda p, ids, c: module.apply(p, ids, cache_mask(inputs), cache=c))(
        params, inputs["input_ids"][:, :1], caches[0])
    init = jax.make_jaxpr(lambda p, e, m: module.apply(p, BATCH, CACHE_LENGTH, e, m, method="init_cache"))(
        params, encoder_out, encoder_mask)
    assert sum(map(reads_encoder, equations(step.jaxpr))) == 0
    assert sum(map(reads_encoder, equations(init.jaxpr))) == 2 * config.num_hidden_layers


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those inside nested calls included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def test_is_decoder_attends_causally_and_masked_lm_both_ways(fixture_dir, inputs):
    """bert_lm (is_decoder) and bert_mlm_bin (a BertForMaskedLM config) hold the same weights: changing the
    last token leaves the causal decoder's earlier logits alone and moves the masked LM's, in both frameworks."""
    changed = dict(inputs, input_ids=inputs["input_ids"].copy())
    changed["input_ids"][:, -1] = 5 + (changed["input_ids"][:, -1] % 100)
    for case, causal in (("bert_lm", True), ("bert_mlm_bin", False)):
        model, _ = reference_from_pretrained(fixture_dir(case))
        for side, logits in (("flax", functools.partial(flax_full_logits, fixture_dir(case))),
                             ("reference", functools.partial(torch_full_logits, model))):
            err = max_diff(logits(changed)[0, :-1], logits(inputs)[0, :-1])
            assert (err <= 1e-6) if causal else (err > 1e-3), f"{case}, {side}: earlier logits moved by {err:.2e}"


# ----------------------------------------------------------------------------------------------------------
# Train mode


def with_rates(config: Any, **rates: float) -> Any:
    """`config` with every dropout rate zero except those given."""
    return config.replace(**{**{name: 0.0 for name in DROPOUT_RATES}, **rates})


def train_outputs(config: Any, params: dict, inputs: dict[str, np.ndarray], keys: list[int]) -> list[np.ndarray]:
    fn = flax_functions(config)["train"]
    args = (inputs["input_ids"], inputs["attention_mask"], *encoder_inputs(config, inputs))
    return [np.asarray(fn(params, jax.random.PRNGKey(k), *args)) for k in keys]


def torch_train_outputs(config: Any, state: dict, inputs: dict[str, np.ndarray], seeds: list[int]) -> list[np.ndarray]:
    model = model_for(config)
    model.load_state_dict(state)
    model.train()
    outs = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(torch.from_numpy(inputs["input_ids"]).long(), as_torch(inputs["attention_mask"]),
                              *map(as_torch, encoder_inputs(config, inputs)))[0].numpy())
    return outs


# RoBERTa's dropout sites are BERT's modules': one check with both rates on covers its wiring.
DROPOUT_CASES = [("bert_xattn_untied", (rate,)) for rate in DROPOUT_RATES] + [("roberta_xattn_untied", DROPOUT_RATES)]


@pytest.mark.parametrize(("case", "rates"), DROPOUT_CASES, ids=[f"{c}-{'+'.join(r)}" for c, r in DROPOUT_CASES])
def test_each_dropout_draws_from_the_step_key(fixture_dir, inputs, case, rates):
    """One dropout rate at a time: training outputs are equal for equal keys (seeds), differ for others and from
    the deterministic output, in both frameworks."""
    directory = fixture_dir(case)
    config, params = loaded(directory)
    config = with_rates(config, **{rate: 0.3 for rate in rates})
    deterministic = flax_full_logits(directory, inputs)
    a, b, c = train_outputs(config, params, inputs, [0, 0, 1])
    assert np.array_equal(a, b)
    assert max_diff(a, c) > 1e-3 and max_diff(a, deterministic) > 1e-3, f"{rates} change nothing"
    model, _ = reference_from_pretrained(directory)
    ta, tb, tc = torch_train_outputs(config, model.state_dict(), inputs, [0, 0, 1])
    assert np.array_equal(ta, tb)
    assert max_diff(ta, tc) > 1e-3 and max_diff(ta, deterministic) > 1e-3, f"reference: {rates} change nothing"


def test_train_mode_without_dropout_equals_deterministic(fixture_dir, inputs):
    directory = fixture_dir("bert_xattn_untied")
    config, params = loaded(directory)
    deterministic = flax_full_logits(directory, inputs)
    (got,) = train_outputs(with_rates(config), params, inputs, [0])
    err = max_diff(got, deterministic)
    assert err <= TOL, f"max|diff|={err:.2e}"
    model, _ = reference_from_pretrained(directory)
    (ref,) = torch_train_outputs(with_rates(config), model.state_dict(), inputs, [0])
    err = max_diff(ref, torch_full_logits(model, inputs))
    assert err <= TOL, f"reference: max|diff|={err:.2e}"


def test_gradients_match_the_reference_padding_rows_included(fixture_dir, inputs):
    """d(sum(logits * w))/d(params) in Flax equals the reference's autograd, tensor by tensor (relative norm), on
    ids with pad tokens inside: their rows of the word and (RoBERTa) position embeddings get no gradient from the
    lookups, as torch's padding_idx. RoBERTa runs every BERT module plus its own positions and head (BERT's head
    is in parity_tests/test_training.py's composed gradients)."""
    directory = fixture_dir("roberta_xattn_untied")
    config, params = loaded(directory)
    ids = inputs["input_ids"].copy()
    ids[:, 2] = config.pad_token_id
    weights = np.random.default_rng(1).standard_normal((BATCH, LENGTH, config.vocab_size)).astype(np.float32)
    encoder_out, encoder_mask = encoder_inputs(config, inputs)
    module = module_for(config)

    def loss(p):
        logits, _ = module.apply(p, ids, inputs["attention_mask"], encoder_out, encoder_mask)
        return jnp.sum(logits * weights)

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params)["params"], sep="/")
    model, _ = reference_from_pretrained(directory)
    logits, _ = model(torch.from_numpy(ids).long(), as_torch(inputs["attention_mask"]), as_torch(encoder_out),
                      as_torch(encoder_mask))
    (logits * torch.from_numpy(weights)).sum().backward()
    spec = spec_for(config)
    tied = spec.tied_keys(config)
    expected = {k: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
                for k, p in model.named_parameters() if k not in tied}
    # Some gradients are zero up to rounding (a key bias shifts every score of a row alike): they are held to
    # the same absolute bound as a tensor of a thousandth of the overall gradient's norm.
    floor = 1e-3 * float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in expected.values())))
    errors = {}
    for key, want in expected.items():
        path, transform = spec.keymap.to_flax(key)
        diff = float(np.linalg.norm(transform.to_torch(np.asarray(grads[path])) - want))
        errors[key] = diff / max(float(np.linalg.norm(want)), floor)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: relative |diff| {errors[worst]:.2e}"
    # Untied, only the lookups reach these tables: their pad rows' gradients are exactly 0 (and others' are not).
    assert not config.tie_word_embeddings
    for table, used in (("word_embeddings", ids[0, 0]), ("position_embeddings", config.pad_token_id + 1)):
        path = f"roberta/embeddings/{table}/embedding"
        got, want = np.asarray(grads[path]), expected[spec.keymap.to_torch(path)[0]]
        assert not np.any(got[config.pad_token_id]) and not np.any(want[config.pad_token_id]), table
        assert np.any(got[used]), table


# ----------------------------------------------------------------------------------------------------------
# Key table, sources, composition


def test_every_bert_keymap_row_is_used(fixture_dir):
    """bert_xattn_untied has every kind of parameter: each row of the table maps at least one of its keys."""
    model, _ = reference_from_pretrained(fixture_dir("bert_xattn_untied"))
    keys = list(model.state_dict())
    unused = [r.torch for r in bert_spec.KEYMAP.rules if not any(r.match_torch(k) for k in keys)]
    assert not unused, unused


def test_source_classes_yield_the_same_decoder_weights(fixture_dir):
    """BertLMHeadModel (transformers 5 safetensors), BertForMaskedLM (.bin with every tied copy and the
    position_ids buffer) and BertForPreTraining (pooler, next-sentence head, gamma/beta) of the same weights load
    to the same Flax leaves, and every dropped key says why."""
    reference = traverse_util.flatten_dict(loaded(fixture_dir("bert_lm"))[1]["params"], sep="/")
    for case in ("bert_mlm_bin", "bert_pretraining"):
        result = load_params(fixture_dir(case), param_shapes)
        flat = traverse_util.flatten_dict(result.params, sep="/")
        assert flat.keys() == reference.keys()
        for path, value in reference.items():
            assert np.asarray(flat[path]).tobytes() == np.asarray(value).tobytes(), f"{case}: {path}"
        dropped = dict(result.plan.dropped)
        assert all(dropped.values()), dropped
        if case == "bert_mlm_bin":
            assert dropped.keys() == {"bert.embeddings.position_ids", "cls.predictions.decoder.weight",
                                      "cls.predictions.decoder.bias"}
            assert dropped["cls.predictions.decoder.bias"] == "duplicate of cls.predictions.bias"
        else:
            assert dropped.keys() == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                      "cls.seq_relationship.weight", "cls.seq_relationship.bias",
                                      "cls.predictions.decoder.weight"}


def test_source_rules_canonicalise_names_and_say_why_keys_are_dropped():
    config = bert_spec.BertConfig()
    canonical, dropped = bert_spec.source_rules(config).canonicalize([
        "embeddings.LayerNorm.gamma", "encoder.layer.0.output.LayerNorm.beta", "pooler.dense.weight",
        "cls.predictions.decoder.bias", "embeddings.position_ids",
    ])
    assert canonical == {
        "bert.embeddings.LayerNorm.weight": "embeddings.LayerNorm.gamma",
        "bert.encoder.layer.0.output.LayerNorm.bias": "encoder.layer.0.output.LayerNorm.beta",
        # A tied head saved by transformers < 5 may hold only the decoder's copy of the bias.
        "cls.predictions.bias": "cls.predictions.decoder.bias",
    }
    assert dict(dropped) == {"pooler.dense.weight": bert_spec.POOLER_WHY,
                             "embeddings.position_ids": bert_spec.POSITION_IDS_WHY}
    untied = bert_spec.source_rules(config.replace(tie_word_embeddings=False))
    canonical, dropped = untied.canonicalize(["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"])
    assert set(canonical) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} and not dropped


def test_untied_checkpoint_without_its_decoder_bias_is_refused(fixture_dir, tmp_path):
    """transformers < 5 stored one bias for untied heads; transformers 5 would start the decoder's at zero."""
    from safetensors.numpy import load_file, save_file

    source = fixture_dir("bert_xattn_untied")
    target = tmp_path / "old_untied"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["cls.predictions.decoder.bias"]
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"missing.*cls/predictions/decoder/bias") as info:
        load_params(target, param_shapes)
    assert "\n" not in str(info.value)


def test_bert_model_source_composes_with_the_head_started_as_transformers_would(fixture_dir, tmp_path):
    """A BertModel checkpoint has no prediction head: the composer draws the transform's kernel from the seed with
    initializer_range and starts its LayerNorm at 1/0 and the biases at 0 (transformers' `_init_weights`), and
    creates the cross-attention; every weight the source has is copied bit for bit. On its own it is refused."""
    from convert.compose import compose

    source = tmp_path / "bert_model"
    fixtures_bert.bert_model(source)
    with pytest.raises(ConvertError, match="missing cls.predictions"):
        reference_from_pretrained(source)
    out = tmp_path / "composed"
    compose(str(fixture_dir("w2v_group")), str(source), out, verify=False, progress=False, log=io.StringIO())
    report = json.loads((out / "compose_report.json").read_text())
    initialised = set(report["initialised"])
    head = {f"decoder/cls/predictions/{p}" for p in
            ("transform/dense/kernel", "transform/dense/bias", "transform/LayerNorm/scale",
             "transform/LayerNorm/bias", "bias")}
    assert head <= initialised
    assert all(p in head or "/crossattention/" in p or p.startswith("enc_to_dec_proj/") for p in initialised)

    composed = traverse_util.flatten_dict(load_params(out, param_shapes).params, sep="/")
    predictions = "decoder/cls/predictions/"
    assert np.all(composed[predictions + "transform/LayerNorm/scale"] == 1)
    for leaf in ("transform/LayerNorm/bias", "transform/dense/bias", "bias"):
        assert not np.any(composed[predictions + leaf]), leaf
    kernel = composed[predictions + "transform/dense/kernel"]
    assert 0.01 < float(np.std(kernel)) < 0.03, f"std {np.std(kernel):.3f}"
    lm = traverse_util.flatten_dict(loaded(fixture_dir("bert_lm"))[1]["params"], sep="/")
    for path, value in lm.items():
        if path.startswith("bert/"):
            assert np.asarray(composed[f"decoder/{path}"]).tobytes() == np.asarray(value).tobytes(), path


def test_tied_head_reuses_the_word_embedding(fixture_dir):
    _, params = loaded(fixture_dir("bert_lm"))
    assert "decoder" not in params["params"]["cls"]["predictions"]
    model, _ = reference_from_pretrained(fixture_dir("bert_lm"))
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight and head.decoder.bias is head.bias
    untied, _ = reference_from_pretrained(fixture_dir("bert_xattn_untied"))
    assert untied.cls.predictions.decoder.bias is not untied.cls.predictions.bias


def test_init_shapes_follow_hf_flax_layout(fixture_dir):
    config = Checkpoint(fixture_dir("bert_xattn_untied")).config
    shapes = param_shapes(bert_spec.BertConfig.from_hf_dict(config))
    d, v, inner = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    assert shapes["bert/embeddings/word_embeddings/embedding"] == (v, d)
    assert shapes["bert/encoder/layer/1/crossattention/self/query/kernel"] == (d, d)
    assert shapes["bert/encoder/layer/0/intermediate/dense/kernel"] == (d, inner)
    assert shapes["bert/encoder/layer/0/output/LayerNorm/scale"] == (d,)
    assert shapes["cls/predictions/transform/LayerNorm/scale"] == (d,)
    assert shapes["cls/predictions/decoder/kernel"] == (d, v)
    assert shapes["cls/predictions/decoder/bias"] == (v,)
    assert not any("pooler" in p for p in shapes)


# ----------------------------------------------------------------------------------------------------------
# Config refusals


@pytest.mark.parametrize(("change", "message"), [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
    ({"add_cross_attention": True, "is_decoder": False}, "add_cross_attention=True needs is_decoder=true"),
    ({"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
    ({"cross_attention_hidden_size": 48}, "cross_attention_hidden_size=48 is not supported"),
    ({"num_attention_heads": 5}, "num_attention_heads=5 does not divide hidden_size"),
    ({"eos_token_id": [3, 4]}, "eos_token_id=\\[3, 4\\] is not an integer or null"),
])
def test_unsupported_bert_config_is_refused(change, message):
    config = fixtures_bert.hf_config(**change)
    with pytest.raises(UnsupportedConfig, match=message) as info:
        bert_spec.BertConfig.from_hf_dict(config, "decoder/config.json")
    assert str(info.value).startswith("decoder/config.json: ") and "\n" not in str(info.value)


def test_a_cache_needs_a_causal_decoder(fixture_dir):
    config, params = loaded(fixture_dir("bert_mlm_bin"))
    with pytest.raises(ValueError, match="is_decoder=False"):
        module_for(config).apply(params, BATCH, CACHE_LENGTH, method="init_cache")
    model, _ = reference_from_pretrained(fixture_dir("bert_mlm_bin"))
    with pytest.raises(ValueError, match="is_decoder=False"):
        model.init_cache(BATCH, CACHE_LENGTH)



def test_flax_msgpack_sources_are_read(fixture_dir, tmp_path):
    """HF Flax files: a FlaxBertModel (no `bert/` level, a pooler) and a FlaxBertForPreTraining (next-sentence
    head) of bert_lm's weights load to its leaves, the extra heads dropped with the reason."""
    from flax.serialization import msgpack_serialize

    config = json.loads((fixture_dir("bert_lm") / "config.json").read_text())
    params = loaded(fixture_dir("bert_lm"))[1]["params"]
    d = config["hidden_size"]
    pooler = {"dense": {"kernel": np.ones((d, d), np.float32), "bias": np.zeros(d, np.float32)}}
    pretraining = {"bert": dict(params["bert"], pooler=pooler),
                   "cls": dict(params["cls"], seq_relationship={"kernel": np.ones((d, 2), np.float32),
                                                                "bias": np.zeros(2, np.float32)})}
    base_model = {**params["bert"], "pooler": pooler}
    reference = traverse_util.flatten_dict(params, sep="/")
    for name, tree, dropped in (("pretraining", pretraining, {"bert/pooler/", "cls/seq_relationship/"}),
                                ("base", dict(base_model, cls=params["cls"]), {"pooler/"})):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "flax_model.msgpack").write_bytes(msgpack_serialize(jax.tree.map(np.asarray, tree)))
        result = load_params(directory, param_shapes)
        flat = traverse_util.flatten_dict(result.params, sep="/")
        assert flat.keys() == reference.keys(), name
        assert all(np.array_equal(flat[k], reference[k]) for k in reference), name
        keys = [k for k, _ in result.plan.dropped]
        assert all(any(k.startswith(p) for p in dropped) for k in keys), keys
        assert all(any(k.startswith(p) for k in keys) for p in dropped), keys
        assert all(why for _, why in result.plan.dropped)
