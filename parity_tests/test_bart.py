"""BART / mBART decoder: Flax vs the PyTorch reference, cached decoding, and the key table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.archs import bart as bart_keymap
from convert.base.archs.bart import BartConfig
from convert.base.checkpoint import Checkpoint, numpy_to_torch
from convert.base.errors import CheckpointError, KeyMapError, UnsupportedConfig
from convert.base.keymap import Plan, check_missing, plan_flax_to_torch, plan_torch_to_flax
from flax_model.bart import BartForCausalLMModule, init_shapes
from scripts.fixture_io import save_hf_checkpoint
from scripts.fixtures_bart import hf_config
from torch_reference import bart as torch_bart
from torch_reference.registry import from_pretrained as reference_from_pretrained

CASES = ("bart_causal", "bart_cg", "bart_cg_tf5", "bart_bias", "bart_untied", "mbart")
TOL = 1e-5
BATCH, LENGTH, ENCODER_LENGTH = 2, 7, 5


@dataclasses.dataclass
class Loaded:
    """One fixture loaded both ways."""

    config: BartConfig
    plan: Plan
    params: dict  # Flax params, nested
    torch_model: torch_bart.BartForCausalLM
    report: object


def load_flax_params(directory: Path) -> tuple[BartConfig, Plan, dict]:
    """Reads a checkpoint into a Flax tree through the key table, every target checked for shape."""
    checkpoint = Checkpoint(directory)
    config = bart_keymap.adapt_config(BartConfig.from_hf_dict(checkpoint.config), checkpoint)
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config), sep="/").items()}
    plan = plan_torch_to_flax(bart_keymap.KEYMAP, checkpoint.shapes(), expected, bart_keymap.source_rules(config),
                              where=str(directory))
    check_missing(plan, bart_keymap.SPEC.initializable, where=str(directory))
    flat = {e.target: e.transform.to_flax(checkpoint.get(e.source)) for e in plan.entries}
    return config, plan, traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def loaded(fixture_dir: Callable[[str], Path]) -> Callable[[str], Loaded]:
    cache: dict[str, Loaded] = {}

    def load(name: str) -> Loaded:
        if name not in cache:
            config, plan, params = load_flax_params(fixture_dir(name))
            model, report = reference_from_pretrained(fixture_dir(name))
            cache[name] = Loaded(config, plan, params, model, report)
        return cache[name]

    return load


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """A padded decoder batch (row 1 ends in padding) and a padded encoder output (row 0 ends in padding)."""
    rng = np.random.RandomState(0)
    attention_mask = np.ones((BATCH, LENGTH), np.int32)
    attention_mask[1, 5:] = 0
    encoder_mask = np.ones((BATCH, ENCODER_LENGTH), np.int32)
    encoder_mask[0, 3:] = 0
    return dict(
        input_ids=rng.randint(0, 96, (BATCH, LENGTH)).astype(np.int32),
        attention_mask=attention_mask,
        encoder_hidden_states=rng.randn(BATCH, ENCODER_LENGTH, 32).astype(np.float32),
        encoder_attention_mask=encoder_mask,
    )


def flax_logits(m: Loaded, inputs: dict[str, np.ndarray]) -> np.ndarray:
    logits, cache = BartForCausalLMModule(m.config).apply({"params": m.params}, **inputs)
    assert cache is None
    return np.asarray(logits)


@torch.no_grad()
def torch_logits(m: Loaded, inputs: dict[str, np.ndarray]) -> np.ndarray:
    logits, _ = m.torch_model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return logits.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("case", CASES)
def test_fixture_logits_vary_along_the_sequence(loaded, inputs, case):
    # Greedy and beam search tests need logits whose argmax is not the same token everywhere.
    argmax = torch_logits(loaded(case), inputs).argmax(-1)
    assert all(len(set(row)) > 2 for row in argmax.tolist()), argmax


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_equals_full_forward(loaded, inputs, case):
    m = loaded(case)
    module = BartForCausalLMModule(m.config)
    variables = {"params": m.params}
    full = flax_logits(m, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # A 3-token prefill, then single steps and a 2-token chunk; the mask covers every cache slot.
    chunks = [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]

    cache = module.apply(variables, BATCH, LENGTH, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"],
                         method="init_cache")
    steps = []
    for a, b in chunks:
        logits, cache = module.apply(variables, ids[:, a:b], mask, cache=cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == LENGTH
    err = max_diff(np.concatenate(steps, axis=1), full)
    assert err <= TOL, f"{case} flax: max|diff|={err:.2e}"

    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        cache = m.torch_model.init_cache(BATCH, LENGTH, t["encoder_hidden_states"], t["encoder_attention_mask"])
        steps = []
        for a, b in chunks:
            logits, cache = m.torch_model(t["input_ids"][:, a:b], t["attention_mask"], cache=cache)
            steps.append(logits.numpy())
    assert cache.index == LENGTH
    err = max_diff(np.concatenate(steps, axis=1), torch_logits(m, inputs))
    assert err <= TOL, f"{case} torch: max|diff|={err:.2e}"


def test_jitted_decode_step_equals_eager(loaded, inputs):
    m = loaded("mbart")
    module = BartForCausalLMModule(m.config)
    variables = {"params": m.params}
    step = jax.jit(lambda params, ids, cache: module.apply(params, ids, cache=cache))
    cache = module.apply(variables, BATCH, LENGTH, inputs["encoder_hidden_states"], inputs["encoder_attention_mask"],
                         method="init_cache")
    ids = inputs["input_ids"]
    steps = []
    for t in range(LENGTH):
        logits, cache = step(variables, ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    unpadded = {**inputs, "attention_mask": np.ones_like(inputs["attention_mask"])}
    err = max_diff(np.concatenate(steps, axis=1), flax_logits(m, unpadded))
    assert err <= TOL, f"max|diff|={err:.2e}"


def test_cross_attention_kv_projected_once_at_init_cache(loaded, inputs):
    m = loaded("bart_causal")
    module = BartForCausalLMModule(m.config)
    variables = {"params": m.params}
    encoder_out = inputs["encoder_hidden_states"]
    heads = m.config.decoder_attention_heads
    cache = module.apply(variables, BATCH, LENGTH, encoder_out, inputs["encoder_attention_mask"], method="init_cache")
    initial = jax.tree.map(np.asarray, cache)
    for i, layer in enumerate(initial.layers):
        proj = m.params["model"]["decoder"]["layers"][str(i)]["encoder_attn"]["k_proj"]
        expected = (encoder_out @ proj["kernel"] + proj["bias"]).reshape(BATCH, ENCODER_LENGTH, heads, -1)
        err = max_diff(layer.cross_key, expected)
        assert err <= TOL, f"layer {i}: cross_key is not the k_proj of the encoder output, max|diff|={err:.2e}"
    # Steps get no encoder output at all: cross-attention can only read the cached keys/values.
    for t in range(3):
        _, cache = module.apply(variables, inputs["input_ids"][:, t:t + 1], cache=cache)
    for before, after in zip(initial.layers, cache.layers):
        assert np.array_equal(before.cross_key, after.cross_key)
        assert np.array_equal(before.cross_value, after.cross_value)
        assert not np.array_equal(before.key, after.key)  # the self-attention cache did advance

    with torch.no_grad():
        t_cache = m.torch_model.init_cache(BATCH, LENGTH, torch.from_numpy(encoder_out),
                                           torch.from_numpy(inputs["encoder_attention_mask"]))
        stepped = t_cache
        for t in range(3):
            _, stepped = m.torch_model(torch.from_numpy(inputs["input_ids"][:, t:t + 1]), cache=stepped)
    for flax_layer, before, after in zip(initial.layers, t_cache.layers, stepped.layers):
        assert after.cross_key is before.cross_key and after.cross_value is before.cross_value
        err = max_diff(before.cross_key.numpy(), flax_layer.cross_key)
        assert err <= TOL, f"torch vs flax cross_key: max|diff|={err:.2e}"


# ----------------------------------------------------------------------------------------------------------
# Key table and source checkpoints


@pytest.mark.parametrize("case", ["bart_causal", "bart_bias", "bart_untied", "mbart"])
def test_bart_keymap_roundtrip_is_bit_exact(loaded, case):
    m = loaded(case)
    state = {k: v.numpy() for k, v in m.torch_model.state_dict().items()}
    config = m.config
    tied = bart_keymap.tied_keys(config)
    expected_flax = {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config), sep="/").items()}
    to_flax = plan_torch_to_flax(bart_keymap.KEYMAP, {k: v.shape for k, v in state.items()}, expected_flax,
                                 bart_keymap.source_rules(config))
    assert to_flax.missing == []
    flax_flat = {e.target: e.transform.to_flax(state[e.source]) for e in to_flax.entries}
    # The Flax tree read from the file is the same tree, bit for bit.
    from_file = traverse_util.flatten_dict(m.params, sep="/")
    assert flax_flat.keys() == from_file.keys()
    assert all(np.array_equal(flax_flat[k], from_file[k]) for k in flax_flat)

    expected_torch = {k: v.shape for k, v in state.items() if k not in tied}
    to_torch = plan_flax_to_torch(bart_keymap.KEYMAP, {k: v.shape for k, v in flax_flat.items()}, expected_torch)
    assert to_torch.missing == []
    back = {e.target: e.transform.to_torch(flax_flat[e.source]) for e in to_torch.entries}
    back.update({key: back[source] for key, source in tied.items()})
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), f"{key} changed in the round trip"


def test_source_variants_yield_the_causal_lm_decoder_weights(loaded, fixture_dir, tmp_path):
    reference = traverse_util.flatten_dict(loaded("bart_causal").params, sep="/")
    ref_state = loaded("bart_causal").torch_model.state_dict()

    # BartModel layout: no `model.` prefix, no LM head, no final_logits_bias.
    bart_cg = Checkpoint(fixture_dir("bart_cg"))
    bare = {k.removeprefix("model."): numpy_to_torch(bart_cg.get(k)) for k in bart_cg.keys() if k.startswith("model.")}
    save_hf_checkpoint(tmp_path / "bart_model", bare, hf_config(architecture="BartModel"))

    for directory in (fixture_dir("bart_cg"), fixture_dir("bart_cg_tf5"), tmp_path / "bart_model"):
        config, plan, params = load_flax_params(directory)
        assert plan.missing == [], f"{directory.name}: missing {plan.missing}"
        flat = traverse_util.flatten_dict(params, sep="/")
        assert flat.keys() == reference.keys(), directory.name
        for path, value in reference.items():
            assert np.array_equal(flat[path], value), f"{directory.name}: {path} differs"
        reasons = dict(plan.dropped)
        encoder = [k for k in reasons if ".encoder." in f".{k}"]
        assert encoder and all("text encoder" in reasons[k] for k in encoder), directory.name
        model, _ = reference_from_pretrained(directory)
        for key, value in ref_state.items():
            assert torch.equal(model.state_dict()[key], value), f"{directory.name}: torch {key} differs"

    cg = dict(loaded("bart_cg").plan.dropped)
    assert cg["model.shared.weight"] == "duplicate of model.decoder.embed_tokens.weight"
    assert cg["lm_head.weight"] == "tied to model.decoder.embed_tokens.weight"
    assert "all zeros" in cg["final_logits_bias"]
    tf5 = loaded("bart_cg_tf5").plan
    assert tf5.by_target()["model/decoder/embed_tokens/embedding"].source == "model.shared.weight"


def test_nonzero_final_logits_bias_is_kept_as_lm_head_bias(loaded, fixture_dir, inputs):
    m = loaded("bart_bias")
    assert m.config.lm_head_bias
    stored = Checkpoint(fixture_dir("bart_bias")).get("final_logits_bias")
    assert stored.shape == (1, 96) and np.any(stored)
    assert np.array_equal(m.params["lm_head"]["bias"], stored[0])
    assert np.array_equal(m.torch_model.final_logits_bias.numpy(), stored)

    # Without the bias, both frameworks' logits move by exactly the stored row.
    unbiased_config = m.config.replace(lm_head_bias=False)
    unbiased_params = {**m.params}
    del unbiased_params["lm_head"]
    flax_plain, _ = BartForCausalLMModule(unbiased_config).apply({"params": unbiased_params}, **inputs)
    torch_plain = torch_bart.BartForCausalLM(unbiased_config).eval()
    torch_plain.load_state_dict({k: v for k, v in m.torch_model.state_dict().items() if k != "final_logits_bias"})
    with torch.no_grad():
        torch_plain_logits, _ = torch_plain(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for name, biased, plain in (("flax", flax_logits(m, inputs), flax_plain),
                                ("torch", torch_logits(m, inputs), torch_plain_logits.numpy())):
        err = max_diff(np.asarray(biased) - np.asarray(plain), np.broadcast_to(stored, biased.shape))
        assert err <= TOL, f"{name}: bias effect max|diff|={err:.2e}"


def test_tie_word_embeddings_shares_the_embedding(loaded):
    tied, untied = loaded("bart_causal"), loaded("bart_untied")
    assert "lm_head" not in tied.params
    assert set(untied.params["lm_head"]) == {"kernel"}
    assert bart_keymap.tied_keys(tied.config) == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    assert bart_keymap.tied_keys(untied.config) == {}
    model = tied.torch_model
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    embed, head = untied.torch_model.model.decoder.embed_tokens.weight, untied.torch_model.lm_head.weight
    assert head is not embed and not torch.equal(head, embed)


def test_init_shapes_follow_hf_flax_layout():
    config = BartConfig.from_hf_dict(hf_config(model_type="mbart", tie_word_embeddings=False))
    config = config.replace(lm_head_bias=True)
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(init_shapes(config), sep="/").items()}
    assert shapes["model/decoder/embed_positions/embedding"] == (64 + 2, 32)
    assert shapes["model/decoder/layers/1/encoder_attn/k_proj/kernel"] == (32, 32)
    assert shapes["model/decoder/layers/0/fc1/kernel"] == (32, 64)
    assert shapes["model/decoder/layer_norm/scale"] == (32,)
    assert shapes["lm_head/kernel"] == (32, 96) and shapes["lm_head/bias"] == (96,)
    assert {k.split("/")[0] for k in shapes} == {"model", "lm_head"}
    assert all(bart_keymap.KEYMAP.to_torch(path) for path in shapes)


def test_missing_decoder_tensor_is_reported(fixture_dir, tmp_path):
    source = Checkpoint(fixture_dir("bart_causal"))
    state = {k: numpy_to_torch(source.get(k)) for k in source.keys()
             if k != "model.decoder.layers.1.encoder_attn.v_proj.weight"}
    save_hf_checkpoint(tmp_path, state, source.config)
    with pytest.raises(KeyMapError, match=r"model/decoder/layers/1/encoder_attn/v_proj/kernel"):
        load_flax_params(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing model\.decoder\.layers\.1\.encoder_attn\.v_proj\.weight"):
        reference_from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["add_final_layer_norm", "normalize_before"])
def test_unsupported_bart_config_is_refused(field):
    with pytest.raises(UnsupportedConfig, match=rf"{field}=True"):
        BartConfig.from_hf_dict(hf_config(**{field: True}), where="decoder/config.json")
    # mBART configs set both: for mBART they describe what the code does.
    assert BartConfig.from_hf_dict(hf_config(model_type="mbart", **{field: True})).is_mbart


def test_cross_attention_width_other_than_d_model_is_refused():
    with pytest.raises(UnsupportedConfig, match=r"cross_attention_hidden_size=48"):
        BartConfig.from_hf_dict(hf_config(cross_attention_hidden_size=48))
    assert BartConfig.from_hf_dict(hf_config(cross_attention_hidden_size=32)).cross_attention_hidden_size == 32


# ----------------------------------------------------------------------------------------------------------
# Train mode: dropout, attention dropout, activation dropout, LayerDrop

RATES = ("dropout", "attention_dropout", "activation_dropout", "decoder_layerdrop")


def with_rates(config: BartConfig, **rates: float) -> BartConfig:
    """`config` with every dropout rate and LayerDrop zero except those given."""
    return config.replace(**{**{name: 0.0 for name in RATES}, **rates})


def flax_train_logits(config: BartConfig, params: dict, inputs: dict[str, np.ndarray], keys: list[int]) -> list:
    """Training-mode logits (one jit per config), one output per PRNG key."""
    module = BartForCausalLMModule(config)
    fn = jax.jit(lambda p, key: module.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": key})[0])
    return [np.asarray(fn(params, jax.random.PRNGKey(k))) for k in keys]


def torch_train_logits(config: BartConfig, state: dict, inputs: dict[str, np.ndarray], seeds: list[int]) -> list:
    """Training-mode logits of the reference with `config`, one output per `torch.manual_seed`."""
    model = torch_bart.BartForCausalLM(config)
    model.load_state_dict(state)
    model.train()
    outs = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy())
    return outs


# One kind at a time (mBART's pre-norm layers apply the same dropouts at the same places).
DROPOUT_CASES = [("bart_causal", (rate,)) for rate in RATES[:3]]


@pytest.mark.parametrize(("case", "rates"), DROPOUT_CASES, ids=[f"{c}-{'+'.join(r)}" for c, r in DROPOUT_CASES])
def test_each_dropout_draws_from_the_step_key(loaded, inputs, case, rates):
    """Training outputs are equal for equal keys (seeds), differ for other keys and from the deterministic output,
    in both frameworks."""
    m = loaded(case)
    config = with_rates(m.config, **{rate: 0.3 for rate in rates})
    deterministic = torch_logits(m, inputs)
    a, b, c = flax_train_logits(config, m.params, inputs, [0, 0, 1])
    assert np.array_equal(a, b)
    assert max_diff(a, c) > 1e-3 and max_diff(a, deterministic) > 1e-3, f"{rates} change nothing"
    ta, tb, tc = torch_train_logits(config, m.torch_model.state_dict(), inputs, [0, 0, 1])
    assert np.array_equal(ta, tb)
    assert max_diff(ta, tc) > 1e-3 and max_diff(ta, deterministic) > 1e-3, f"reference: {rates} change nothing"


def kept_layers(m: Loaded, keep: tuple[int, ...]) -> tuple[BartConfig, dict, dict]:
    """The same weights in a config holding only the layers `keep` (renumbered from 0): what LayerDrop computes
    when it skips the others, built without LayerDrop."""
    config = with_rates(m.config).replace(decoder_layers=len(keep))
    decoder = dict(m.params["model"]["decoder"], layers={str(j): m.params["model"]["decoder"]["layers"][str(i)]
                                                         for j, i in enumerate(keep)})
    params = dict(m.params, model={"decoder": decoder})
    prefix = "model.decoder.layers."
    state = {}
    for key, value in m.torch_model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in keep:
            state[f"{prefix}{keep.index(int(index))}.{rest}"] = value
    return config, params, state


@pytest.fixture(scope="module")
def skip_patterns(loaded, inputs) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
    """{kept layers: (Flax logits, reference logits)} for every subset of bart_causal's two layers, each from a
    config holding only those layers, run deterministically."""
    m = loaded("bart_causal")
    out = {}
    for keep in ((), (0,), (1,), (0, 1)):
        config, params, state = kept_layers(m, keep)
        flax_out, _ = BartForCausalLMModule(config).apply({"params": params}, **inputs)
        model = torch_bart.BartForCausalLM(config).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            torch_out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()
        out[keep] = (np.asarray(flax_out), torch_out)
    return out


def test_layerdrop_one_skips_every_layer(loaded, inputs, skip_patterns):
    m = loaded("bart_causal")
    config = with_rates(m.config, decoder_layerdrop=1.0)
    no_layers, torch_no_layers = skip_patterns[()]
    assert max_diff(no_layers, torch_logits(m, inputs)) > 1e-2  # the layers matter
    (got,) = flax_train_logits(config, m.params, inputs, [3])
    err = max_diff(got, no_layers)
    assert err <= TOL, f"flax: max|diff|={err:.2e} from the same weights with 0 layers"
    (got,) = torch_train_logits(config, m.torch_model.state_dict(), inputs, [3])
    err = max_diff(got, torch_no_layers)
    assert err <= TOL, f"reference: max|diff|={err:.2e} from the same weights with 0 layers"


def test_layerdrop_draws_differ_per_key(loaded, inputs, skip_patterns):
    """decoder_layerdrop=0.5: each key's output is one of the four skip patterns (computed without LayerDrop), the
    same key gives the same pattern, and 16 keys (seeds) draw at least three patterns, in both frameworks."""
    m = loaded("bart_causal")
    config = with_rates(m.config, decoder_layerdrop=0.5)
    for side, outputs in (("flax", flax_train_logits(config, m.params, inputs, [*range(16), 0])),
                          ("reference", torch_train_logits(config, m.torch_model.state_dict(), inputs,
                                                           [*range(16), 0]))):
        index = 0 if side == "flax" else 1
        drawn = []
        for out in outputs:
            matches = [keep for keep, patterns in skip_patterns.items() if max_diff(out, patterns[index]) <= TOL]
            assert len(matches) == 1, f"{side}: output matches {matches} of the skip patterns"
            drawn.append(matches[0])
        assert drawn[0] == drawn[-1], f"{side}: the same key drew {drawn[0]} and {drawn[-1]}"
        assert len(set(drawn)) >= 3, f"{side}: 16 draws gave only {set(drawn)}"


def test_gradients_match_the_reference_pad_rows_included(loaded, inputs):
    """d(sum(logits * w))/d(params), pad tokens inside the rows: Flax equals the reference's autograd tensor by
    tensor, and the untied embedding's pad row gets no gradient from the lookups (torch's padding_idx)."""
    m = loaded("bart_untied")
    pad = m.config.pad_token_id
    batch = dict(inputs, input_ids=inputs["input_ids"].copy())
    batch["input_ids"][:, 2] = pad
    weights = np.random.default_rng(1).standard_normal((BATCH, LENGTH, m.config.vocab_size)).astype(np.float32)
    module = BartForCausalLMModule(m.config)
    grad = jax.jit(jax.grad(lambda p: (module.apply({"params": p}, **batch)[0] * weights).sum()))(m.params)
    grads = traverse_util.flatten_dict(grad, sep="/")
    model = torch_bart.BartForCausalLM(m.config).eval()
    model.load_state_dict(m.torch_model.state_dict())
    (model(**{k: torch.from_numpy(v) for k, v in batch.items()})[0] * torch.from_numpy(weights)).sum().backward()
    expected = {k: p.grad.numpy() for k, p in model.named_parameters()}
    # Gradients zero up to rounding (a k_proj bias shifts a row's scores alike) are held to the bound of a
    # tensor a thousandth of the overall gradient's norm.
    floor = 1e-3 * float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in expected.values())))
    errors = {}
    for key, want in expected.items():
        path, transform = bart_keymap.KEYMAP.to_flax(key)
        got = transform.to_torch(np.asarray(grads[path]))
        errors[key] = float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), floor)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: relative |diff| {errors[worst]:.2e}"
    embedding = np.asarray(grads["model/decoder/embed_tokens/embedding"])
    assert not np.any(embedding[pad]) and not np.any(expected["model.decoder.embed_tokens.weight"][pad])
    assert np.any(embedding[batch["input_ids"][0, 0]])
