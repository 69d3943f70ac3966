"""GPT-2: Flax vs the PyTorch reference, cached decoding, and the key table, on tiny seeded checkpoints."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import gpt2 as gpt2_keymap
from convert.base.archs.gpt2 import GPT2Config
from convert.base.checkpoint import Checkpoint
from convert.base.keymap import check_missing, plan_flax_to_torch, plan_torch_to_flax
from flax_model import gpt2 as flax_gpt2
from torch_reference import gpt2 as torch_gpt2
from torch_reference.registry import from_pretrained as reference_from_pretrained

TOL = 1e-5
BATCH, LENGTH, ENCODER_LENGTH, CACHE_LENGTH, PREFILL = 2, 8, 6, 10, 3


# ----------------------------------------------------------------------------------------------------------
# Helpers


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def read_config(directory: Path) -> GPT2Config:
    return GPT2Config.from_hf_dict(Checkpoint(directory).config)


def load_flax_params(directory: Path) -> dict[str, Any]:
    """A checkpoint's Flax params through the key table (every leaf loaded, every source key accounted for)."""
    checkpoint = Checkpoint(directory)
    config = GPT2Config.from_hf_dict(checkpoint.config)
    expected = flat_shapes(flax_gpt2.init_shapes(config))
    plan = plan_torch_to_flax(gpt2_keymap.KEYMAP, checkpoint.shapes(), expected, gpt2_keymap.source_rules(config))
    check_missing(plan)
    flat = {e.target: e.transform.to_flax(checkpoint.get(e.source)) for e in plan.entries}
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def jaxpr_equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those inside nested calls (pjit, custom_jvp, cond branches) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from jaxpr_equations(inner)


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """A decoder batch whose second row ends in padding, and an encoder output whose first row does."""
    rng = np.random.default_rng(0)
    decoder_mask = np.ones((BATCH, LENGTH), np.int32)
    decoder_mask[1, LENGTH - 3:] = 0
    encoder_mask = np.ones((BATCH, ENCODER_LENGTH), np.int32)
    encoder_mask[0, ENCODER_LENGTH - 2:] = 0
    return {
        "input_ids": rng.integers(0, 96, (BATCH, LENGTH)).astype(np.int32),
        "attention_mask": decoder_mask,
        "encoder_hidden_states": rng.standard_normal((BATCH, ENCODER_LENGTH, 32)).astype(np.float32),
        "encoder_attention_mask": encoder_mask,
    }


def encoder_inputs(config: GPT2Config, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not config.add_cross_attention:
        return None, None
    return inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]


@functools.cache
def flax_forward(directory: Path) -> Callable[..., Any]:
    """One jitted full forward per checkpoint (their configs differ, so each compiles once)."""
    module = flax_gpt2.GPT2LMHeadModule(read_config(directory))
    return jax.jit(module.apply)


def flax_full_logits(directory: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    config = read_config(directory)
    encoder_out, encoder_mask = encoder_inputs(config, inputs)
    logits, cache = flax_forward(directory)(
        load_flax_params(directory), inputs["input_ids"], inputs["attention_mask"], encoder_out, encoder_mask)
    assert cache is None
    return np.asarray(logits)


def torch_full_logits(model: torch_gpt2.GPT2LMHeadModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    encoder_out, encoder_mask = encoder_inputs(model.config, inputs)
    as_torch = lambda a: None if a is None else torch.from_numpy(a)
    with torch.no_grad():
        logits, cache = model(torch.from_numpy(inputs["input_ids"]).long(), as_torch(inputs["attention_mask"]),
                              as_torch(encoder_out), as_torch(encoder_mask))
    assert cache is None
    return logits.numpy()


def cache_mask(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The decoder mask over every cache slot: the tokens' mask, then slots not written yet."""
    return np.concatenate([inputs["attention_mask"], np.ones((BATCH, CACHE_LENGTH - LENGTH), np.int32)], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Parity


def test_config_options_match_torch_reference(inputs):
    """Settings no fixture uses: per-layer attention scaling, float32 scores, another width and activation."""
    from scripts.fixtures_gpt2 import build_model, hf_config

    model = build_model(hf_config(add_cross_attention=True, scale_attn_by_inverse_layer_idx=True,
                                  reorder_and_upcast_attn=True, n_inner=48, activation_function="gelu_fast"))
    state = {k: v.numpy() for k, v in model.state_dict().items() if k not in gpt2_keymap.tied_keys(model.config)}
    expected = flat_shapes(flax_gpt2.init_shapes(model.config))
    plan = plan_torch_to_flax(gpt2_keymap.KEYMAP, {k: v.shape for k, v in state.items()}, expected)
    params = traverse_util.unflatten_dict({e.target: e.transform.to_flax(state[e.source]) for e in plan.entries},
                                          sep="/")
    module = flax_gpt2.GPT2LMHeadModule(model.config)
    got, _ = jax.jit(module.apply)({"params": params}, inputs["input_ids"], inputs["attention_mask"],
                                   inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    err = max_diff(got, torch_full_logits(model, inputs))
    assert err <= TOL, f"max|diff|={err:.2e}"


def test_cross_attention_changes_the_logits(fixture_dir, inputs):
    """The encoder output and its padding mask reach the logits (a guard against a silently skipped block)."""
    model, _ = reference_from_pretrained(fixture_dir("gpt2_xattn"))
    base = torch_full_logits(model, inputs)
    unmasked = dict(inputs, encoder_attention_mask=np.ones_like(inputs["encoder_attention_mask"]))
    assert max_diff(torch_full_logits(model, unmasked)[0], base[0]) > 1e-3
    assert max_diff(torch_full_logits(model, unmasked)[1], base[1]) <= 1e-6  # that row had no padding


# ----------------------------------------------------------------------------------------------------------
# Cached decoding


@functools.cache
def flax_step(directory: Path) -> Callable[..., Any]:
    """One jitted cached step per checkpoint (compiled for the prefill length and for single tokens)."""
    module = flax_gpt2.GPT2LMHeadModule(read_config(directory))
    return jax.jit(lambda params, ids, mask, cache: module.apply(params, ids, mask, cache=cache))


def flax_cached_logits(directory: Path, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[Any]]:
    """Logits from a prefill of PREFILL tokens, then one token per call; also every cache along the way."""
    config = read_config(directory)
    module = flax_gpt2.GPT2LMHeadModule(config)
    params = load_flax_params(directory)
    encoder_out, encoder_mask = encoder_inputs(config, inputs)
    cache = module.apply(params, BATCH, CACHE_LENGTH, encoder_out, encoder_mask, method="init_cache")
    step = flax_step(directory)
    mask = cache_mask(inputs)
    caches, logits = [cache], []
    bounds = [0, PREFILL, *range(PREFILL + 1, LENGTH + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        out, cache = step(params, inputs["input_ids"][:, start:stop], mask, cache)
        assert int(cache.index) == stop
        logits.append(np.asarray(out))
        caches.append(cache)
    return np.concatenate(logits, axis=1), caches


def torch_cached_logits(model: torch_gpt2.GPT2LMHeadModel, inputs: dict[str, np.ndarray]):
    encoder_out, encoder_mask = encoder_inputs(model.config, inputs)
    as_torch = lambda a: None if a is None else torch.from_numpy(a)
    cache = model.init_cache(BATCH, CACHE_LENGTH, as_torch(encoder_out), as_torch(encoder_mask))
    ids, mask = torch.from_numpy(inputs["input_ids"]).long(), torch.from_numpy(cache_mask(inputs))
    caches, logits = [cache], []
    bounds = [0, PREFILL, *range(PREFILL + 1, LENGTH + 1)]
    with torch.no_grad():
        for start, stop in zip(bounds, bounds[1:]):
            out, cache = model(ids[:, start:stop], mask, cache=cache)
            assert cache.index == stop
            logits.append(out.numpy())
            caches.append(cache)
    return np.concatenate(logits, axis=1), caches


@pytest.mark.parametrize("case", ["gpt2_xattn", "gpt2_lm"])
def test_flax_cached_decode_equals_full_forward(fixture_dir, inputs, case):
    directory = fixture_dir(case)
    cached, _ = flax_cached_logits(directory, inputs)
    err = max_diff(cached, flax_full_logits(directory, inputs))
    assert err <= TOL, f"{case}: max|diff|={err:.2e}"


@pytest.mark.parametrize("case", ["gpt2_xattn", "gpt2_lm"])
def test_torch_cached_decode_equals_full_forward(fixture_dir, inputs, case):
    model, _ = reference_from_pretrained(fixture_dir(case))
    cached, _ = torch_cached_logits(model, inputs)
    err = max_diff(cached, torch_full_logits(model, inputs))
    assert err <= TOL, f"{case}: max|diff|={err:.2e}"


def test_cross_attention_keys_values_are_projected_once_at_init_cache(fixture_dir, inputs):
    directory = fixture_dir("gpt2_xattn")
    config = read_config(directory)
    d, heads = config.n_embd, config.n_head
    params = load_flax_params(directory)
    encoder_out, encoder_mask = encoder_inputs(config, inputs)
    _, caches = flax_cached_logits(directory, inputs)
    model, _ = reference_from_pretrained(directory)
    _, torch_caches = torch_cached_logits(model, inputs)

    for i in range(config.n_layer):
        # The projection, by hand: HF Flax Conv1D kernels are (out, in).
        c_attn = params["params"]["transformer"]["h"][str(i)]["crossattention"]["c_attn"]
        kv = encoder_out @ np.asarray(c_attn["kernel"]).T + np.asarray(c_attn["bias"])  # [B, S, 2D]
        key, value = (x.reshape(BATCH, ENCODER_LENGTH, heads, d // heads) for x in np.split(kv, 2, axis=-1))
        first = caches[0].layers[i]
        err = max(max_diff(first.cross_key, key), max_diff(first.cross_value, value))
        assert err <= TOL, f"layer {i}: cross keys/values at init_cache: max|diff|={err:.2e}"
        for cache in caches[1:]:
            assert np.array_equal(cache.layers[i].cross_key, first.cross_key)
            assert np.array_equal(cache.layers[i].cross_value, first.cross_value)
        # The reference projects once too: every step hands the same tensors on.
        assert all(c.layers[i].cross_key is torch_caches[0].layers[i].cross_key for c in torch_caches)
        err = max_diff(torch_caches[0].layers[i].cross_key.numpy(), key)
        assert err <= TOL, f"layer {i}: torch cross keys at init_cache: max|diff|={err:.2e}"
    np.testing.assert_array_equal(caches[-1].encoder_mask, encoder_mask.astype(bool))

    # A decode step multiplies nothing into a [.., 2D] keys-and-values projection; init_cache does, once a layer.
    module = flax_gpt2.GPT2LMHeadModule(config)
    kv_width = lambda eqn: eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == 2 * d
    step_jaxpr = jax.make_jaxpr(lambda p, ids, c: module.apply(p, ids, cache_mask(inputs), cache=c))(
        params, inputs["input_ids"][:, :1], caches[0])
    init_jaxpr = jax.make_jaxpr(lambda p, e, m: module.apply(p, BATCH, CACHE_LENGTH, e, m, method="init_cache"))(
        params, encoder_out, encoder_mask)
    assert sum(map(kv_width, jaxpr_equations(step_jaxpr.jaxpr))) == 0
    assert sum(map(kv_width, jaxpr_equations(init_jaxpr.jaxpr))) == config.n_layer


# ----------------------------------------------------------------------------------------------------------
# Key table and loading


@pytest.mark.parametrize("case", ["gpt2_xattn", "gpt2_untied"])
def test_gpt2_keymap_roundtrip_is_bit_exact(fixture_dir, case):
    directory = fixture_dir(case)
    config = read_config(directory)
    model, _ = reference_from_pretrained(directory)
    tied = gpt2_keymap.tied_keys(config)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k not in tied}
    expected = flat_shapes(flax_gpt2.init_shapes(config))

    to_flax = plan_torch_to_flax(gpt2_keymap.KEYMAP, {k: v.shape for k, v in state.items()}, expected)
    assert to_flax.missing == [] and to_flax.dropped == []
    flax = {e.target: e.transform.to_flax(state[e.source]) for e in to_flax.entries}
    assert set(flax) == set(expected)
    to_torch = plan_flax_to_torch(gpt2_keymap.KEYMAP, {k: v.shape for k, v in flax.items()})
    back = {e.target: e.transform.to_torch(flax[e.source]) for e in to_torch.entries}
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

    # Flax -> PyTorch -> Flax as well.
    again = plan_torch_to_flax(gpt2_keymap.KEYMAP, {k: v.shape for k, v in back.items()}, expected)
    for e in again.entries:
        assert np.array_equal(e.transform.to_flax(back[e.source]), flax[e.target]), e.target

    # GPT-2 Conv1D weights are (in, out); the HF Flax kernels (out, in).
    d = config.n_embd
    kernel = flax["transformer/h/0/attn/c_attn/kernel"]
    assert kernel.shape == (3 * d, d)
    assert np.array_equal(kernel, state["transformer.h.0.attn.c_attn.weight"].T)
    if config.add_cross_attention:
        assert flax["transformer/h/0/crossattention/c_attn/kernel"].shape == (2 * d, d)
        assert flax["transformer/h/0/crossattention/q_attn/kernel"].shape == (d, d)
    if config.tie_word_embeddings:
        assert not any(path.startswith("lm_head/") for path in flax)
    else:
        assert flax["lm_head/kernel"].shape == (d, config.vocab_size)


def test_every_gpt2_keymap_row_is_used(fixture_dir):
    used = set()
    for case in ("gpt2_xattn", "gpt2_untied"):
        config = read_config(fixture_dir(case))
        model = torch_gpt2.GPT2LMHeadModel(config)
        for key in model.state_dict():
            used.update(r for r in gpt2_keymap.KEYMAP.rules if r.match_torch(key) is not None)
    unused = [r.torch for r in gpt2_keymap.KEYMAP.rules if r not in used]
    assert not unused, unused


def test_gpt2_model_bin_loads_with_buffers_dropped(fixture_dir):
    """GPT2Model names without `transformer.` plus old mask buffers load to the same weights as gpt2_lm."""
    model, report = reference_from_pretrained(fixture_dir("gpt2_model_bin"))
    reference, reference_report = reference_from_pretrained(fixture_dir("gpt2_lm"))
    config = model.config
    buffers = {f"h.{i}.attn.{b}" for i in range(config.n_layer) for b in ("bias", "masked_bias")}
    assert {key for key, _ in report.dropped} == buffers
    assert all("buffer" in why for _, why in report.dropped)
    assert reference_report.dropped == []
    assert report.tied == [("lm_head.weight", "transformer.wte.weight")]
    assert len(report.loaded) == len(reference_report.loaded)
    state, reference_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    for key, value in reference_state.items():
        assert torch.equal(state[key], value), key

    # The Flax plan names the same targets and accounts for every source key.
    checkpoint = Checkpoint(fixture_dir("gpt2_model_bin"))
    expected = flat_shapes(flax_gpt2.init_shapes(config))
    plan = plan_torch_to_flax(gpt2_keymap.KEYMAP, checkpoint.shapes(), expected, gpt2_keymap.source_rules(config))
    assert plan.missing == [] and {key for key, _ in plan.dropped} == buffers


def test_gpt2_source_rules_canonicalise_names_and_say_why_keys_are_dropped():
    tied = GPT2Config.from_hf_dict({"model_type": "gpt2"})
    keys = ["wte.weight", "h.0.attn.c_attn.bias", "h.0.attn.bias", "transformer.h.1.crossattention.masked_bias",
            "transformer.h.1.crossattention.c_attn.bias", "lm_head.weight"]
    canonical, dropped = gpt2_keymap.source_rules(tied).canonicalize(keys)
    assert canonical == {
        "transformer.wte.weight": "wte.weight",
        "transformer.h.0.attn.c_attn.bias": "h.0.attn.c_attn.bias",
        "transformer.h.1.crossattention.c_attn.bias": "transformer.h.1.crossattention.c_attn.bias",
    }
    buffer = "causal-mask buffer saved by old transformers versions, not a weight"
    assert dict(dropped) == {
        "h.0.attn.bias": buffer,
        "transformer.h.1.crossattention.masked_bias": buffer,
        "lm_head.weight": "tied to transformer.wte.weight",
    }
    untied = tied.replace(tie_word_embeddings=False)
    canonical, dropped = gpt2_keymap.source_rules(untied).canonicalize(["lm_head.weight"])
    assert canonical == {"lm_head.weight": "lm_head.weight"} and dropped == []
    # FlaxGPT2Model msgpack files carry no `transformer/` level either.
    canonical, _ = gpt2_keymap.flax_source_rules(tied).canonicalize(["h/0/ln_1/scale", "transformer/wte/embedding"])
    assert canonical == {"transformer/h/0/ln_1/scale": "h/0/ln_1/scale",
                         "transformer/wte/embedding": "transformer/wte/embedding"}


def test_initializable_covers_exactly_the_missing_cross_attention(fixture_dir):
    directory = fixture_dir("gpt2_lm")
    plain = read_config(directory)
    cross = plain.replace(add_cross_attention=True)
    expected = flat_shapes(flax_gpt2.init_shapes(cross))
    plan = plan_torch_to_flax(gpt2_keymap.KEYMAP, Checkpoint(directory).shapes(), expected,
                              gpt2_keymap.source_rules(cross))
    cross_paths = {p for p in expected if "/crossattention/" in p or "/ln_cross_attn/" in p}
    assert len(cross_paths) == plain.n_layer * 8
    assert set(plan.missing) == cross_paths
    assert set(check_missing(plan, gpt2_keymap.INITIALIZABLE)) == cross_paths
    # Nothing a plain GPT-2 has is initialisable, also one level down as the composer uses the patterns.
    plain_paths = flat_shapes(flax_gpt2.init_shapes(plain))
    for prefix in ("", "decoder/"):
        patterns = [re.compile(prefix + p) for p in gpt2_keymap.INITIALIZABLE]
        assert not [p for p in plain_paths if any(r.match(prefix + p) for r in patterns)]
        assert all(any(r.match(prefix + p) for r in patterns) for p in cross_paths)


def test_init_shapes_follow_hf_flax_layout(fixture_dir):
    config = read_config(fixture_dir("gpt2_xattn"))
    d, v, inner = config.n_embd, config.vocab_size, config.inner_size
    shapes = flat_shapes(flax_gpt2.init_shapes(config))
    assert shapes["transformer/wte/embedding"] == (v, d)
    assert shapes["transformer/wpe/embedding"] == (config.n_positions, d)
    assert shapes["transformer/h/1/ln_1/scale"] == (d,)
    assert shapes["transformer/h/1/mlp/c_fc/kernel"] == (inner, d)
    assert shapes["transformer/h/1/crossattention/c_proj/bias"] == (d,)
    assert shapes["transformer/ln_f/bias"] == (d,)
    assert "lm_head/kernel" not in shapes
    assert len(shapes) == 4 + config.n_layer * (12 + 8)  # 12 leaves a layer, 8 more for cross-attention


def test_encoder_output_without_cross_attention_is_refused(fixture_dir, inputs):
    directory = fixture_dir("gpt2_lm")
    module = flax_gpt2.GPT2LMHeadModule(read_config(directory))
    with pytest.raises(ValueError, match="add_cross_attention"):
        module.apply(load_flax_params(directory), inputs["input_ids"], None, inputs["encoder_hidden_states"])
    model, _ = reference_from_pretrained(directory)
    with pytest.raises(ValueError, match="add_cross_attention"):
        model(torch.from_numpy(inputs["input_ids"]).long(), None,
              torch.from_numpy(inputs["encoder_hidden_states"]))


# ----------------------------------------------------------------------------------------------------------
# Train mode: residual, embedding and attention dropout (GPT-2 has no LayerDrop)

RATES = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


@pytest.mark.parametrize("rate", RATES)
def test_each_dropout_draws_from_the_step_key(fixture_dir, inputs, rate):
    """One rate at a time (the others 0): training outputs are equal for equal keys (seeds), differ for other
    keys and from the deterministic output, in both frameworks; with every rate 0 the reference's training mode
    equals inference."""
    directory = fixture_dir("gpt2_xattn")
    config = read_config(directory).replace(**{**{name: 0.0 for name in RATES}, rate: 0.3})
    params = load_flax_params(directory)
    module = flax_gpt2.GPT2LMHeadModule(config)
    args = (inputs["input_ids"], inputs["attention_mask"], *encoder_inputs(config, inputs))
    train = jax.jit(lambda p, key: module.apply(p, *args, deterministic=False, rngs={"dropout": key})[0])
    deterministic = flax_full_logits(directory, inputs)
    a, b, c = (np.asarray(train(params, jax.random.PRNGKey(k))) for k in (0, 0, 1))
    assert np.array_equal(a, b)
    assert max_diff(a, c) > 1e-3 and max_diff(a, deterministic) > 1e-3, f"{rate} changes nothing"

    model = torch_gpt2.GPT2LMHeadModel(config)
    model.load_state_dict(reference_from_pretrained(directory)[0].state_dict())
    model.train()
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(torch_full_logits(model, inputs))
    assert np.array_equal(outs[0], outs[1])
    assert max_diff(outs[0], outs[2]) > 1e-3 and max_diff(outs[0], deterministic) > 1e-3, f"reference: {rate}"
    if rate == RATES[0]:
        silent = torch_gpt2.GPT2LMHeadModel(config.replace(resid_pdrop=0.0))
        silent.load_state_dict(model.state_dict())
        silent.train()
        err = max_diff(torch_full_logits(silent, inputs), deterministic)
        assert err <= TOL, f"reference, every rate 0, train mode: max|diff|={err:.2e}"
