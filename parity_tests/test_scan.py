"""Scanned layers (`scan_layers=True`: one `nn.scan` per layer stack, params stacked with a leading layer axis)
against the unrolled per-layer model: outputs, gradients, the layout conversion, files, caches and generation.

Every registered architecture takes part: each encoder's first pair case is composed with a decoder, the
decoders taken in turn (derived from the registry), plus mBART (pre-norm BART). The forward of every pair and
the gradient of the first pair are compared after jit, in float64 (`parity_tests/float64.py`): the scanned and
unrolled programs then agree to ~1e-15 whatever XLA's code generation, where in float32 they differ by a few ulps
with the CPU, the emitters and the optimisation level (README "Scanned layers").
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from convert.base import stacking
from convert.base.archs.bart import BartConfig
from convert.base.archs.wav2vec2 import Wav2Vec2Config
from convert.base.checkpoint import Checkpoint
from convert.base.composed import SpeechEncoderDecoderConfig
from convert.base.errors import UnsupportedConfig
from convert.base.registry import specs
from convert.verify import seeded_inputs
from flax_model.cache import reorder_cache
from flax_model.layers import layer_scan
from flax_model.sharding import param_shardings, partition_rules, partition_spec
from flax_model.speech_encoder_decoder import (
    FlaxSpeechEncoderDecoderModel,
    SpeechEncoderDecoderModule,
    param_shapes,
    stack_params,
    stacked_param_shapes,
    unstack_params,
)
from flax_model.training import compiled_grad, step_key
from parity_tests.float64 import float64
from parity_tests.jaxprs import equations

TOLERANCE = 1e-6


def first_pair_case(spec) -> str:
    fixtures = importlib.import_module(spec.fixtures)
    return getattr(fixtures, "PAIR_CASES", tuple(fixtures.CASES))[0]


def scanned(spec) -> bool:
    """Whether an architecture is scanned here: all, but a decoder family whose fixture module says `SCANNED =
    False` (one scanned family stands for others that run the same decoder-core code)."""
    return getattr(importlib.import_module(spec.fixtures), "SCANNED", True)


def scan_pairs() -> list[tuple[str, str]]:
    """Every encoder with a decoder, the decoders (and mBART, pre-norm BART) taken in turn until every one has
    been used."""
    encoders = [first_pair_case(s) for s in specs("encoder")]
    decoders = [first_pair_case(s) for s in specs("decoder") if scanned(s)] + ["mbart"]
    count = max(len(encoders), len(decoders))
    return list(zip(itertools.islice(itertools.cycle(encoders), count),
                    itertools.islice(itertools.cycle(decoders), count)))


PAIRS = scan_pairs()
MAIN = PAIRS[0]


def flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def load(directory, **kwargs) -> FlaxSpeechEncoderDecoderModel:
    return FlaxSpeechEncoderDecoderModel.from_pretrained(directory, **kwargs)


def exercised_config(config):
    """GPT-2's scores scaled by the inverse layer index: the scanned block gets its index traced."""
    if hasattr(config.decoder, "scale_attn_by_inverse_layer_idx"):
        return dataclasses.replace(config, decoder=config.decoder.replace(scale_attn_by_inverse_layer_idx=True))
    return config


def logits_and_gradient(module: SpeechEncoderDecoderModule, params, batch, remat: bool = False,
                        gradient: bool = True, residual_bits: bool = False):
    """(logits [B, T, V], gradient of the summed log-likelihood of the next tokens or None), one compilation.
    `remat`: scanned layers rematerialised (`nn.remat` inside the scan); `residual_bits`: each scanned layer under
    the custom gradient that keeps bfloat16 residuals as bits (`flax_model.layers.bfloat16_residual_bits`)."""

    def objective(params):
        with layer_scan(module.scan_layers, remat=remat, residual_bits=residual_bits):
            logits = module.apply({"params": params}, batch["inputs"], batch["attention_mask"],
                                  batch["decoder_input_ids"])
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, batch["decoder_input_ids"][:, 1:, None], axis=-1)
        return jnp.sum(picked), logits

    if not gradient:
        return np.asarray(jax.jit(objective)(params)[1]), None
    (_, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return np.asarray(logits), {k: np.asarray(v) for k, v in flat(grads).items()}


def test_every_registered_architecture_is_scanned():
    used = {c for pair in PAIRS for c in pair}
    assert {first_pair_case(s) for s in specs() if scanned(s)} <= used


@pytest.mark.parametrize(("encoder", "decoder"), PAIRS, ids=[f"{e}+{d}" for e, d in PAIRS])
def test_scanned_layers_equal_unrolled_outputs_and_gradients(encoder, decoder, composed_dir):
    """Computed in float64 (the modules' `dtype`, params and inputs; attention scores and rotary tables stay float32
    by design): the scan then computes the unrolled layers' numbers to ~1e-15 whatever XLA's code generation, where
    in float32 the two programs agree to the bit only as XLA compiles them by default at level 0."""
    model = load(composed_dir(encoder, decoder))
    config = exercised_config(model.config)
    with jax.enable_x64(True):
        batch = float64({k: jnp.asarray(v) for k, v in seeded_inputs(config, seed=1, seconds=0.1).items()})
        per_layer = float64(model.params)
        stacked = stack_params(config, per_layer)

        # The scanned module's own param tree is the stacked layout `convert.base.stacking` converts to.
        scanned = SpeechEncoderDecoderModule(config, scan_layers=True, dtype=jnp.float64)
        traced = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), batch["inputs"], None,
                                                     batch["decoder_input_ids"][:, :1]))["params"]
        assert {k: tuple(v.shape) for k, v in flat(traced).items()} == stacked_param_shapes(config)

        # The gradient for the main pair only: a forward that is equal layer by layer reads every layer's own slice
        # of the stacked params, and the gradient of the scan is JAX's transpose of it (two compilations of about
        # 5 s per pair saved; the train step's scanned gradient is also checked in test_finetune).
        gradient = (encoder, decoder) == MAIN
        logits, grads = logits_and_gradient(SpeechEncoderDecoderModule(config, dtype=jnp.float64), per_layer, batch,
                                            gradient=gradient)
        scan_logits, scan_grads = logits_and_gradient(scanned, stacked, batch, gradient=gradient)
        assert logits.dtype == np.float64
        err = float(np.max(np.abs(scan_logits - logits)))
        assert err <= TOLERANCE, f"{encoder}+{decoder}: logits max|diff|={err:.2e}"
        if not gradient:
            # Each layer under the residual-bits gradient differentiates only its arguments: what a layer reads
            # from outside (the encoder's states, WavLM's position bias) must reach it as one; traced, not run.
            def loss(params):
                with layer_scan(True, residual_bits=True):
                    return jnp.sum(scanned.apply({"params": params}, batch["inputs"], batch["attention_mask"],
                                                 batch["decoder_input_ids"]))

            traced_grads = jax.eval_shape(jax.grad(loss), stacked)
            assert {k: v.shape for k, v in flat(traced_grads).items()} == stacked_param_shapes(config)
            return

        scan_grads = flat(unstack_params(config, traverse_util.unflatten_dict(scan_grads, sep="/")))
        assert scan_grads.keys() == grads.keys()
        rel, where = gradient_difference(grads, scan_grads)
        assert rel <= TOLERANCE, f"{encoder}+{decoder}: gradient max|diff| / max|gradient| = {rel:.2e} (at {where})"

        # Rematerialised scanned layers (`nn.remat` inside the scan, as `remat=True` training runs them): the same
        # gradient.
        _, remat_grads = logits_and_gradient(scanned, stacked, batch, remat=True)
        remat_grads = flat(unstack_params(config, traverse_util.unflatten_dict(remat_grads, sep="/")))
        rel, where = gradient_difference(grads, remat_grads)
        assert rel <= TOLERANCE, f"remat: gradient max|diff| / max|gradient| = {rel:.2e} (at {where})"

        # Each layer under the custom gradient of `bfloat16_residual_bits` (as the bfloat16 training loss runs
        # them; in float64 nothing is packed, so the layers' own linearisation is checked): the same gradient.
        _, bits_grads = logits_and_gradient(scanned, stacked, batch, residual_bits=True)
        bits_grads = flat(unstack_params(config, traverse_util.unflatten_dict(bits_grads, sep="/")))
        rel, where = gradient_difference(grads, bits_grads)
        assert rel <= TOLERANCE, f"residual bits: gradient max|diff| / max|gradient| = {rel:.2e} (at {where})"


def gradient_difference(expected: dict, got: dict) -> tuple[float, str]:
    """max |got - expected| over every leaf, relative to the largest gradient of the model; and where.

    Relative to the model's largest gradient rather than each leaf's own: some leaves' exact gradient is 0
    (attention key biases cancel in the softmax), and their computed values are rounding noise in any order."""
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    assert scale > 0.0
    diffs = {k: float(np.max(np.abs(np.asarray(got[k]) - np.asarray(g)))) for k, g in expected.items()}
    where = max(diffs, key=diffs.get)
    return diffs[where] / scale, where


def test_stacked_and_per_layer_layouts_convert_bit_exactly(composed_dir):
    directory = composed_dir(*MAIN)
    model = load(directory)
    stacks = stacking.layer_stacks(model.config)
    per_layer = {k: np.asarray(v) for k, v in flat(model.params).items()}
    stacked = stacking.stack_params(per_layer, stacks)
    assert stacking.is_stacked(stacked, stacks) and not stacking.is_stacked(per_layer, stacks)
    assert {k: v.shape for k, v in stacked.items()} == stacked_param_shapes(model.config)
    # Layer i of a stacked leaf is the file's tensor of layer i.
    stored = Checkpoint(directory, prefer=("flax_model.msgpack",))
    for prefix, count in stacks.items():
        some = next(k for k in stacked if k.startswith(prefix))
        for i in range(count):
            expected = stored.get(f"{prefix}{i}/{some[len(prefix):]}")
            assert stacked[some][i].tobytes() == expected.tobytes(), f"{some} layer {i}"
    back = stacking.unstack_params(stacked, stacks)
    assert back.keys() == per_layer.keys()
    assert all(back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes() for k, v in per_layer.items())
    again = stacking.stack_params(back, stacks)
    assert all(again[k].tobytes() == v.tobytes() for k, v in stacked.items())


def test_a_train_state_converts_between_layouts_as_the_optimiser_would_have_kept_it(composed_dir):
    """`relayout_state`: AdamW's state after a step on per-layer params, converted to the stacked layout, is the
    state the same optimiser keeps when it steps on the stacked params (optax run on each layout on its own), bit
    for bit; and back. The optimiser has what `convert.finetune` builds: a lower encoder rate (a masked scale),
    decay masked off biases, clipping, frozen leaves (no state)."""
    from flax_model.training import (
        OptimizerSettings,
        frozen_predicate,
        init_state,
        leaf_labels,
        make_optimizer,
        relayout_state,
        split_trainable,
    )

    model = load(composed_dir(*MAIN))
    stacks = stacking.layer_stacks(model.config)
    per_layer = flat(model.params)
    settings = OptimizerSettings(learning_rate=1e-3, total_steps=10, weight_decay=0.01, max_grad_norm=1e9,
                                 encoder_learning_rate=1e-4)
    frozen = frozen_predicate(True)  # the conv feature encoder: outside the stacks
    layouts = {}
    for name, tree, predicate in (("per_layer", per_layer, frozen),
                                  ("stacked", stacking.stack_params(per_layer, stacks, stack=jnp.stack),
                                   stacking.stacked_predicate(frozen, stacks))):
        params = traverse_util.unflatten_dict(tree, sep="/")
        optimizer = make_optimizer(settings, leaf_labels(split_trainable(params, predicate)[0], lambda path: False))
        state = init_state(params, optimizer, predicate)
        # The same gradient in either layout: a pure function of the per-layer path (a layer's rows of a stacked
        # leaf from its own path).
        grads = {k: jnp.sin(jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape) + len(k))
                 for k, v in per_layer.items() if not frozen(k)}
        if name == "stacked":
            grads = stacking.stack_params(grads, stacks, stack=jnp.stack)
        trainable = split_trainable(params, predicate)[0]
        updates, opt_state = optimizer.update(traverse_util.unflatten_dict(grads, sep="/"), state.opt_state, trainable)
        layouts[name] = dataclasses.replace(state, opt_state=opt_state)
    per_layer_state, stacked_state = layouts["per_layer"], layouts["stacked"]
    assert len(jax.tree.leaves(stacked_state)) < len(jax.tree.leaves(per_layer_state))
    for source, target in ((per_layer_state, stacked_state), (stacked_state, per_layer_state)):
        converted = relayout_state(source, jax.eval_shape(lambda: target), stacks)
        assert jax.tree.structure(converted) == jax.tree.structure(target)
        got, want = jax.tree.leaves_with_path(converted), jax.tree.leaves_with_path(target)
        differ = [jax.tree_util.keystr(path) for (path, a), (_, b) in zip(got, want)
                  if a.dtype != b.dtype or np.asarray(a).tobytes() != np.asarray(b).tobytes()]
        assert not differ, f"{len(differ)} leaves differ, e.g. {differ[:3]}"


def test_stacking_refuses_a_stack_with_a_missing_layer(composed_dir):
    model = load(composed_dir(*MAIN))
    stacks = stacking.layer_stacks(model.config)
    per_layer = {k: np.asarray(v) for k, v in flat(model.params).items()}
    prefix = next(iter(stacks))
    missing = next(k for k in per_layer if k.startswith(prefix + "1/"))
    del per_layer[missing]
    with pytest.raises(UnsupportedConfig, match="is held by layers"):
        stacking.stack_params(per_layer, stacks)


def test_save_and_load_round_trip_in_both_layouts_is_bit_exact(composed_dir, tmp_path):
    directory = composed_dir(*MAIN)
    unrolled = load(directory)
    model = load(directory, scan_layers=True)
    model.save_pretrained(tmp_path / "per_layer")
    model.save_pretrained(tmp_path / "stacked", stacked=True)
    stacks = stacking.layer_stacks(model.config)

    per_layer_file = Checkpoint(tmp_path / "per_layer", prefer=("flax_model.msgpack",))
    stacked_file = Checkpoint(tmp_path / "stacked", prefer=("flax_model.msgpack",))
    assert set(per_layer_file.keys()) == set(param_shapes(model.config))
    assert set(stacked_file.keys()) == set(stacked_param_shapes(model.config))
    assert stacking.is_stacked(stacked_file.keys(), stacks)
    # safetensors is per layer with transformers' names whichever layout the msgpack has.
    a, b = (tmp_path / d / "model.safetensors" for d in ("per_layer", "stacked"))
    assert a.read_bytes() == b.read_bytes()

    def same(x, y) -> bool:
        fx, fy = flat(x), flat(y)
        return fx.keys() == fy.keys() and all(
            np.asarray(fx[k]).dtype == np.asarray(fy[k]).dtype and np.asarray(fx[k]).tobytes() == np.asarray(
                fy[k]).tobytes() for k in fx)

    for source in ("per_layer", "stacked"):
        assert same(load(tmp_path / source, scan_layers=True).params, model.params), source
        assert same(load(tmp_path / source).params, unrolled.params), source
    assert same(unstack_params(model.config, model.params), unrolled.params)


def test_cached_decoding_and_generation_equal_unrolled(composed_dir):
    """In float64, as the test above (the scanned programs equal the unrolled ones whatever XLA's code
    generation); the tokens of greedy and beam search too."""
    with jax.enable_x64(True):
        directory = composed_dir(*MAIN)
        unrolled, scanned = load(directory, dtype=jnp.float64), load(directory, scan_layers=True, dtype=jnp.float64)
        batch = seeded_inputs(unrolled.config, seed=2, seconds=0.1)
        layers = unrolled.config.decoder.num_layers

        # The cache: one stacked LayerCache, each array the per-layer caches stacked.
        encoded = unrolled.encode(batch["inputs"], batch["attention_mask"])
        cache = unrolled.init_cache(2, 6, encoded)
        stacked = scanned.init_cache(2, 6, scanned.encode(batch["inputs"], batch["attention_mask"]))
        assert stacked.stacked and not cache.stacked and stacked.max_length == cache.max_length == 6
        for name in ("self_keys", "cross_keys", "cross_values"):
            expected = np.stack([np.asarray(getattr(c, name)) for c in cache.layers])
            got = np.asarray(getattr(stacked.layers, name))
            assert got.shape[0] == layers
            err = float(np.max(np.abs(got - expected)))
            assert err <= TOLERANCE, f"{name}: max|diff|={err:.2e}"

        # Beam search's reorder gathers along the batch axis (the second of a stacked array).
        rows = jnp.asarray([1, 0, 1])
        moved, moved_stacked = reorder_cache(cache, rows), reorder_cache(stacked, rows)
        for i, layer in enumerate(cache.layers):
            assert np.array_equal(np.asarray(moved.layers[i].cross_keys),
                                  np.asarray(layer.cross_keys)[np.asarray(rows)])
            assert np.array_equal(np.asarray(moved_stacked.layers.cross_keys[i]),
                                  np.asarray(stacked.layers.cross_keys[i])[np.asarray(rows)])
        kept = reorder_cache(stacked, jnp.asarray([1, 0]), cross=False)
        assert kept.layers.cross_keys is stacked.layers.cross_keys

        # Cached decoding, token by token.
        ids = batch["decoder_input_ids"][:, :4]
        for step in range(ids.shape[1]):
            logits, cache = unrolled.decode(ids[:, step:step + 1], None, cache=cache)
            scan_logits, stacked = scanned.decode(ids[:, step:step + 1], None, cache=stacked)
            err = float(np.max(np.abs(np.asarray(scan_logits) - np.asarray(logits))))
            assert err <= TOLERANCE, f"step {step}: max|diff|={err:.2e}"
        assert int(stacked.index) == ids.shape[1]

        for settings in ({"num_beams": 1}, {"num_beams": 3}):
            expected = unrolled.generate(batch["inputs"], batch["attention_mask"], max_new_tokens=6, **settings)
            got = scanned.generate(batch["inputs"], batch["attention_mask"], max_new_tokens=6, **settings)
            assert got.sequences.tolist() == expected.sequences.tolist(), settings
            err = float(np.max(np.abs(got.sequences_scores - expected.sequences_scores)))
            assert err <= TOLERANCE, f"{settings}: sequence scores max|diff|={err:.2e}"


def test_train_mode_follows_its_key_and_layer_drop_matches_unrolled(composed_dir):
    """Scanned layers draw their dropout and LayerDrop keys from a key split per layer (`nn.scan`'s
    `split_rngs`); unrolled layers fold their module path into the key. The draws cannot coincide, so the
    scanned path is checked to follow its key, and to equal the unrolled one where the draws do not matter."""
    directory = composed_dir(*MAIN)
    unrolled, scanned = load(directory), load(directory, scan_layers=True)
    batch = seeded_inputs(unrolled.config, seed=3, seconds=0.1)
    labels = batch["decoder_input_ids"][:, 1:]
    args = (batch["inputs"], batch["attention_mask"], labels)
    key, other = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    first, again, changed = (float(scanned.loss(*args, dropout_rng=k)) for k in (key, key, other))
    deterministic = float(scanned.loss(*args))
    assert first == again, f"same key: {first} vs {again}"
    assert first != changed and first != deterministic, f"{first}, {changed}, {deterministic}"

    # LayerDrop 1.0 and no dropout: every encoder and decoder layer is skipped, whatever the draws.
    config = unrolled.config
    quiet = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0}
    encoder = config.encoder.replace(layerdrop=1.0, **{k: v for k, v in quiet.items() if hasattr(config.encoder, k)})
    decoder = config.decoder.replace(decoder_layerdrop=1.0, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0)
    dropping = dataclasses.replace(config, encoder=encoder, decoder=decoder)
    losses = [float(FlaxSpeechEncoderDecoderModel(dropping, m.params, scan_layers=m.scan_layers).loss(
        *args, dropout_rng=key)) for m in (unrolled, scanned)]
    assert losses[0] == losses[1], f"unrolled {losses[0]} vs scanned {losses[1]}"
    assert losses[0] != float(unrolled.loss(*args)), "LayerDrop 1.0 changed nothing"


def test_training_loss_rematerialises_each_scanned_layer(composed_dir):
    """`remat=True` with scanned layers puts `nn.remat` inside each scan (its gradient is compared in
    `test_scanned_layers_equal_unrolled_outputs_and_gradients`)."""
    model = load(composed_dir(*MAIN), scan_layers=True)
    batch = seeded_inputs(model.config, seed=4, seconds=0.1)
    labels = jnp.asarray(batch["decoder_input_ids"][:, 1:])

    def scans_with_remat(remat: bool) -> list[bool]:
        module = SpeechEncoderDecoderModule(model.config, remat=remat, scan_layers=True)
        loss = lambda params: module.apply({"params": params}, batch["inputs"], batch["attention_mask"], labels,
                                           method=SpeechEncoderDecoderModule.loss_sums).nll
        jaxpr = jax.make_jaxpr(loss)(model.params)
        return [any(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqn.params["jaxpr"].jaxpr.eqns)
                for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]

    with_remat, without = scans_with_remat(True), scans_with_remat(False)
    assert len(with_remat) >= 2 and all(with_remat), with_remat
    assert not any(without), without


def test_stacked_leaves_are_partitioned_like_their_layers(composed_dir):
    model = load(composed_dir(*MAIN))
    config = model.config
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    stacks = stacking.layer_stacks(config)
    shardings = param_shardings(config, stacked_param_shapes(config), mesh)
    rules, sizes = partition_rules(config), dict(mesh.shape)
    per_layer = param_shapes(config)
    split = 0
    for path, sharding in shardings.items():
        first = stacking.layer_path(path, stacks)
        if first is None:
            continue
        expected = partition_spec(first, per_layer[first], rules, sizes)
        assert tuple(sharding.spec) == (None, *expected), path
        split += any(axis is not None for axis in expected)
    assert split > 0, "no stacked leaf is split over fsdp"


def test_scanned_model_loads_onto_a_mesh_with_stacked_leaves_placed_by_the_rules(composed_dir, tmp_path):
    directory = composed_dir(*MAIN)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    expected = flat(load(directory, scan_layers=True).params)
    load(directory, scan_layers=True).save_pretrained(tmp_path / "stacked", stacked=True)
    for source in (directory, tmp_path / "stacked"):  # per-layer files (stacked on the mesh), stacked files
        sharded = load(source, mesh=mesh, scan_layers=True)
        placed = flat(sharded.params)
        shardings = param_shardings(sharded.config, {k: v.shape for k, v in placed.items()}, mesh)
        assert placed.keys() == expected.keys()
        for path, value in placed.items():
            assert np.asarray(value).tobytes() == np.asarray(expected[path]).tobytes(), path
            assert value.sharding.is_equivalent_to(shardings[path], value.ndim), path
        assert any(len(placed[k].sharding.spec) > 1 and placed[k].sharding.spec[1] == "fsdp" for k in placed
                   if stacking.layer_path(k, stacking.layer_stacks(sharded.config))), "no stacked leaf split"


def small_bfloat16_pair():
    """A scanned bfloat16 wav2vec2 + BART module 64 wide, 3 layers per stack, HF's default dropout and LayerDrop, with its
    params (float32) and a batch of two 0.1 s utterances."""
    encoder = Wav2Vec2Config(num_hidden_layers=3, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                             conv_dim=(32, 32), conv_kernel=(10, 2), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                             num_conv_pos_embedding_groups=4)
    decoder = BartConfig(d_model=64, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=256, vocab_size=96,
                         max_position_embeddings=64, is_decoder=True, add_cross_attention=True)
    config = SpeechEncoderDecoderConfig(raw={}, encoder=encoder, decoder=decoder, decoder_start_token_id=2,
                                        pad_token_id=1, eos_token_id=2)
    module = SpeechEncoderDecoderModule(config, dtype=jnp.bfloat16, scan_layers=True)
    rng = np.random.default_rng(5)
    batch = {"inputs": jnp.asarray(rng.standard_normal((2, 1600)), jnp.float32),
             "attention_mask": jnp.ones((2, 1600), jnp.int32), "labels": jnp.asarray(rng.integers(3, 96, (2, 4)))}
    params = jax.jit(lambda key: module.init(key, batch["inputs"], batch["attention_mask"], batch["labels"]))(
        jax.random.PRNGKey(0))["params"]
    return module, params, batch


def whole_stack_upcasts(compiled) -> int:
    """Instructions that convert a whole stack ([3, ...], every layer) to float32."""
    return len(re.findall(r"= f32\[3,[\d,]+\]\{[\d,]*\} convert\(", compiled.as_text()))


def test_scanned_bfloat16_gradient_writes_each_layers_residuals_in_place(monkeypatch):
    """XLA's CPU backend has no bfloat16 dynamic-update-slice: a scan that stacks a layer's bfloat16 residuals
    converted the whole stack to float32 and back at every layer. The bfloat16 training loss runs each scanned
    layer under a custom gradient that keeps them as their bits (`flax_model.layers.bfloat16_residual_bits`): no
    stack is converted, the loss is the same to the bit and the gradient as accurate (against float32's)."""
    module, params, batch = small_bfloat16_pair()
    example = (params, batch, step_key(0, 1), np.float32(0.0))
    package = compiled_grad(module, deterministic=True).lower(*example).compile()
    with monkeypatch.context() as patch:
        patch.setattr("flax_model.layers.bfloat16_residual_bits", lambda body: body)
        plain = compiled_grad(module, deterministic=True).lower(*example).compile()
    assert whole_stack_upcasts(plain) > 10, "XLA writes bfloat16 stacks in place now: residual_bits may go"
    assert whole_stack_upcasts(package) == 0, whole_stack_upcasts(package)

    reference_module = SpeechEncoderDecoderModule(module.config, scan_layers=True)
    _, reference = compiled_grad(reference_module, deterministic=True).lower(*example).compile()(*example)
    (sums, grads), (plain_sums, plain_grads) = package(*example), plain(*example)
    assert float(sums.nll) == float(plain_sums.nll), f"nll {sums.nll} vs {plain_sums.nll}"

    def error(tree) -> float:  # the whole gradient's relative distance from float32's
        got, want = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (tree, reference))
        return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))

    # measured: 0.0084543 both (bfloat16 rounding); a wrong bit pattern would be O(1)
    assert error(grads) <= 1.02 * error(plain_grads), f"{error(grads):.3g} vs {error(plain_grads):.3g}"

    # Rematerialised, a scanned layer keeps only its (bfloat16) inputs: kept as bits too, the same gradient.
    remat = dataclasses.replace(module, remat=True)
    remat_package = compiled_grad(remat, deterministic=True).lower(*example).compile()
    with monkeypatch.context() as patch:
        patch.setattr("flax_model.layers.bfloat16_residual_bits", lambda body: body)
        remat_plain = compiled_grad(remat, deterministic=True).lower(*example).compile()
    assert whole_stack_upcasts(remat_plain) > 0 and whole_stack_upcasts(remat_package) == 0
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(remat_package(*example)),
                                                                jax.tree.leaves(remat_plain(*example))))
    assert worst == 0.0, f"remat: max|diff| {worst}"

    # In train mode the layers draw from the key they are given (each layer's "dropout" key).
    train = compiled_grad(module, deterministic=False).lower(*example).compile()
    first, again, other = (float(train(params, batch, key, np.float32(0.0))[0].nll)
                           for key in (step_key(0, 1), step_key(0, 1), step_key(0, 2)))
    assert first == again and len({first, other, float(sums.nll)}) == 3, (first, again, other, float(sums.nll))
