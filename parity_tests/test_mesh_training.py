"""Training on a device mesh: the sharded step equals the single-device one, sharded checkpoints resume exactly,
`save_pretrained` from sharded params writes the single-device files, and the commands' `--mesh` is checked.

Runs on the 8 simulated CPU devices that `conftest.py` asks XLA for, on a mesh of data 2 x fsdp 4 (the rows
of each batch split over all 8, every large leaf in four). The single-device figures come from the same functions
without a mesh.

What "equal" means here. A sharded gradient sums its terms in another order than a single device does, so
float32 results differ by rounding; the bounds are relative to the values' size: the loss within 1e-6 of its
value, each gradient tensor within 1e-6 of its norm computed with the model in float64 (in float32, within 1e-6 of
the whole gradient's norm; tensors whose gradient is zero analytically, the attention key biases, hold rounding
noise in both runs: both stay below 1e-6 of the whole gradient's norm). AdamW divides
each entry's update by that entry's own gradient size, so an entry whose gradient is rounding noise moves by up
to the learning rate in a random direction in either run: the updated parameters are therefore checked by giving
the sharded and the single-device optimiser update the same state and gradients (within 1e-6 of each leaf's
largest value), and the whole step end to end by the losses of the following steps.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convert import cli, finetune, generate, train_checkpoints
from convert.base.errors import UsageError
from flax_model.sharding import gathered_in_training, mesh_from_flag, parse_mesh
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from flax_model.training import (
    OptimizerSettings,
    buffer_paths,
    frozen_predicate,
    init_state,
    leaf_labels,
    make_optimizer,
    place_batch,
    state_shardings,
    step_functions,
    step_key,
    train_step,
)
from parity_tests.float64 import float64

# wav2vec2 (group norm: a weight-norm positional conv, whose split kernel the step gathers) + BART.
PAIR = ("w2v_group", "bart_causal")
MESH_SHAPE, MESH_AXES = (2, 4), ("data", "fsdp")
STEPS, MICRO_BATCHES, ROWS = 3, 2, 8  # rows: a multiple of data x fsdp (no padding rows)
RELATIVE = 1e-6
# Below this fraction of the whole gradient's norm a tensor's gradient is zero analytically (softmax ignores a
# shift shared by every key: the key biases), as parity_tests/test_training.py.
ZERO_GRADIENT = 1e-6
# Each gradient tensor is compared within RELATIVE64 of its norm in the float64 runs (`_float64_gradient`; their
# attention softmax stays float32, as transformers', which leaves rounding of ~1e-7: measured 4.8e-7 at worst). In
# float32 the mesh's other summation order moved single tensors by up to 1.1e-6 of themselves on an Intel Xeon with
# AMX (a cross-attention query bias, a decoder key kernel; under 1e-6 on an AMD EPYC); the float32 gradients, which
# the runs train with, are each held within RELATIVE32 of the whole gradient's norm.
RELATIVE64 = 1e-6
RELATIVE32 = 1e-6


def _mesh() -> Mesh:
    assert len(jax.devices()) >= math.prod(MESH_SHAPE), f"{len(jax.devices())} devices: conftest.py sets XLA_FLAGS"
    return jax.make_mesh(MESH_SHAPE, MESH_AXES)


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def _micro_batch(config, step: int, micro: int) -> dict[str, np.ndarray]:
    """ROWS utterances of different lengths, labels padded with -100, a SpecAugment time mask."""
    rng = np.random.default_rng([step, micro])
    inputs = rng.standard_normal((ROWS, 1600)).astype(np.float32)
    mask = np.ones(inputs.shape, np.int32)
    for row, n in ((1, 1000), (3, 1300)):
        inputs[row, n:], mask[row, n:] = 0.0, 0
    labels = rng.integers(0, config.decoder.vocab_size, (ROWS, 7)).astype(np.int32)
    labels[1, 4:] = labels[3, 5:] = -100
    frames = int(config.encoder.output_lengths(inputs.shape[1], add_adapter=False))
    time_mask = np.zeros((ROWS, frames), bool)
    time_mask[:, 2 + micro:5 + micro] = True
    return {"inputs": inputs, "attention_mask": mask, "labels": labels, "mask_time_indices": time_mask}


def _micro_batches(config, step: int):
    return [(_micro_batch(config, step, micro), step_key(0, step, micro)) for micro in range(MICRO_BATCHES)]


class _Run:
    """One training setup (dropout and LayerDrop on, a frozen feature encoder, weight decay, clipping) on one
    device or on the mesh."""

    def __init__(self, directory, mesh: Mesh | None):
        self.model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory, mesh=mesh)
        config = self.model.config
        self.config = config
        frozen = frozen_predicate(True, buffer_paths(config, self.model.params))
        settings = OptimizerSettings(learning_rate=3e-3, total_steps=STEPS, warmup_steps=1, weight_decay=0.1,
                                     max_grad_norm=1.0)
        self.optimizer = make_optimizer(settings, leaf_labels(self.model.params, frozen))
        self.shardings = state_shardings(self.model.params, self.optimizer)
        self.fns = step_functions(SpeechEncoderDecoderModule(config), self.optimizer, deterministic=False,
                                  freeze_feature_encoder=True, shardings=self.shardings)

    def initial_state(self):
        return init_state(self.model.params, self.optimizer)


@pytest.mark.default_emitters  # sharded and one-device gradients within 1e-6
def test_sharded_training_equals_one_device_and_resumes_from_its_checkpoint(runs, composed_dir, tmp_path):
    """One test over one pair of runs: the runs' compilations are most of this module's time, and a module
    fixture used by several tests is built again by every pytest-xdist worker that runs one of them."""
    _check_loss_and_gradients(runs)
    _check_the_positional_conv_is_gathered(runs)
    _check_step_losses(runs)
    _check_update(runs)
    _check_checkpoint_resumes_exactly(runs, tmp_path / "checkpoint")
    _check_save_pretrained(composed_dir, runs, tmp_path / "saved")


@pytest.fixture(scope="module")
def runs(composed_dir):
    """Both setups, the first micro-batch's gradients of each, and STEPS steps of each (losses, states)."""
    directory = composed_dir(*PAIR)
    out = {}
    for name, mesh in (("single", None), ("sharded", _mesh())):
        run = _Run(directory, mesh)
        batch, key = _micro_batches(run.config, 0)[0]
        if mesh is None:
            sums, grads = run.fns.grad(run.model.params, batch, key, np.float32(0.0))
        else:
            sums, grads = run.fns.grad(run.model.params, place_batch(run.fns.mesh, batch),
                                       jax.device_put(key, NamedSharding(run.fns.mesh, PartitionSpec())),
                                       np.float32(0.0))
        exact = _float64_gradient(run, mesh)  # before the steps, which donate the params' buffers
        state, losses, states = run.initial_state(), [], []
        for step in range(STEPS):
            state, objective, tokens = train_step(run.fns, state, _micro_batches(run.config, step))
            losses.append(objective / tokens)
            states.append(jax.tree.map(np.array, state))
        out[name] = {"run": run, "objective": float(sums.objective(0.0)), "grads": _flat(grads),
                     "grad_shardings": {k: v.sharding for k, v in traverse_util.flatten_dict(grads, sep="/").items()},
                     "losses": losses, "states": states, "state": state, **exact}
    return out


def _float64_gradient(run: _Run, mesh: Mesh | None) -> dict:
    """The first micro-batch's loss and gradient with the model and its inputs in float64 (the same train-mode
    draws), on one device or on the mesh: where the two should differ by float64 rounding only."""
    batch, key = _micro_batches(run.config, 0)[0]
    with jax.enable_x64(True):
        fns = step_functions(SpeechEncoderDecoderModule(run.config, dtype=jnp.float64), run.optimizer,
                             deterministic=False, freeze_feature_encoder=True, shardings=run.shardings)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), run.model.params)  # keeps each leaf's sharding
        batch = float64(batch)
        if mesh is not None:
            batch = place_batch(fns.mesh, batch)
            key = jax.device_put(key, NamedSharding(fns.mesh, PartitionSpec()))
        sums, grads = fns.grad(params, batch, key, np.float64(0.0))
        return {"objective64": float(sums.objective(0.0)), "grads64": _flat(grads)}


def _check_loss_and_gradients(runs) -> None:
    single, sharded = runs["single"], runs["sharded"]
    rel = abs(sharded["objective"] - single["objective"]) / abs(single["objective"])
    assert rel <= RELATIVE, f"summed loss {sharded['objective']:.7f} vs {single['objective']:.7f}: relative {rel:.2e}"
    rel = abs(sharded["objective64"] - single["objective64"]) / abs(single["objective64"])
    assert rel <= RELATIVE64, f"float64 summed loss: relative {rel:.2e}"
    want, got = single["grads64"], sharded["grads64"]
    assert want.keys() == got.keys()
    total = math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in want.values()))
    worst, worst_key, zeros = 0.0, None, 0
    for key, g in want.items():
        norm = float(np.linalg.norm(g))
        if "feature_extractor" in key.split("/"):  # frozen: the gradient stops at its output
            assert not got[key].any() and not g.any(), f"{key}: a frozen leaf has a gradient"
            continue
        if norm < ZERO_GRADIENT * total:
            zeros += 1
            assert float(np.linalg.norm(got[key])) < ZERO_GRADIENT * total, f"{key}: {np.linalg.norm(got[key]):.1e}"
            continue
        diff = float(np.linalg.norm(got[key] - g)) / norm
        if diff > worst:
            worst, worst_key = diff, key
    assert worst <= RELATIVE64, (f"{worst_key}: |Δgrad| / |grad| = {worst:.2e} in float64 (its gradient: "
                               f"{np.linalg.norm(want[worst_key]) / total:.1e} of the whole)")
    assert zeros < len(want) // 4, f"{zeros} of {len(want)} gradients are zero"
    # The gradients come out split like their parameters (split leaves are many).
    params = traverse_util.flatten_dict(sharded["run"].shardings.params, sep="/")
    split = [k for k, s in sharded["grad_shardings"].items() if not s.is_fully_replicated]
    assert len(split) > len(params) // 3, f"only {len(split)} of {len(params)} gradients are split"
    for key, g in single["grads"].items():  # float32: the gradients the runs below train with
        assert float(np.linalg.norm(sharded["grads"][key] - g)) <= RELATIVE32 * total, f"{key} (float32)"
    for key, sharding in sharded["grad_shardings"].items():
        assert sharding.is_equivalent_to(params[key], want[key].ndim), f"{key}: {sharding.spec} != {params[key].spec}"


def test_a_batch_is_padded_to_the_batch_axes_with_rows_that_count_for_nothing():
    from flax_model.training import IGNORE_INDEX, pad_batch

    batch = _micro_batch(_Config(), 0, 0)
    batch = {k: v[:3] for k, v in batch.items()}
    padded = pad_batch(batch, 2)
    assert {k: v.shape[0] for k, v in padded.items()} == dict.fromkeys(batch, 4)
    for name, value in batch.items():
        assert np.array_equal(padded[name][:3], value), name
    assert (padded["labels"][3] == IGNORE_INDEX).all() and not padded["mask_time_indices"][3].any()
    assert np.array_equal(padded["inputs"][3], batch["inputs"][2])
    assert np.array_equal(padded["attention_mask"][3], batch["attention_mask"][2])
    assert pad_batch(padded, 2).keys() == padded.keys() and pad_batch(padded, 4)["labels"].shape[0] == 4


class _Config:
    """What `_micro_batch` reads of a config, for tests that compile nothing."""

    class encoder:
        @staticmethod
        def output_lengths(n, add_adapter=False):
            return n // 320

    class decoder:
        vocab_size = 50


def _check_the_positional_conv_is_gathered(runs) -> None:
    run = runs["sharded"]["run"]
    params = traverse_util.flatten_dict(run.shardings.params, sep="/")
    gathered = gathered_in_training(run.config, params)
    assert gathered and all("pos_conv_embed" in p for p in gathered), sorted(gathered)
    assert all(not params[p].is_fully_replicated for p in gathered), "gathered leaves should be stored split"


def _check_step_losses(runs) -> None:
    """Gradient accumulation over 2 micro-batches, dropout and LayerDrop keys per micro-batch: the losses of the
    3 steps (each after the previous steps' updates) agree."""
    want, got = runs["single"]["losses"], runs["sharded"]["losses"]
    assert len(set(want)) == STEPS, f"losses {want}: a weak check"
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= RELATIVE, f"losses {got} vs {want}: relative {worst:.2e}"


def _check_update(runs) -> None:
    """The optimiser update (clipping's global norm, AdamW, weight decay, frozen leaves) sharded and on one
    device, from the same state and gradients: every updated parameter within 1e-6 of its leaf's largest value,
    and the optimiser state placed like its parameters."""
    single, sharded = runs["single"]["run"], runs["sharded"]["run"]
    state = runs["single"]["states"][0]
    grads = traverse_util.unflatten_dict(runs["single"]["grads"], sep="/")
    tokens = np.int32(9)
    want = single.fns.apply(jax.tree.map(np.array, state), grads, tokens)
    placed = jax.device_put(state, sharded.shardings)
    got = sharded.fns.apply(placed, jax.device_put(grads, sharded.shardings.params), tokens)
    assert int(got.step) == int(want.step) == 2
    want_params, got_params = _flat(want.params), _flat(got.params)
    before = _flat(state.params)
    worst, worst_key = 0.0, None
    for key, w in want_params.items():
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(got_params[key] - w).max()) / scale
        if err > worst:
            worst, worst_key = err, key
    assert worst <= RELATIVE, f"{worst_key}: max|Δparam| / max|param| = {worst:.2e}"
    moved = sum(not np.array_equal(want_params[k], before[k]) for k in before)
    assert moved > len(before) // 2, f"only {moved} of {len(before)} leaves moved"
    for key in (k for k in before if "feature_extractor" in k):
        assert np.array_equal(got_params[key], before[key]), f"{key}: a frozen leaf moved"
    # Adam's moments follow their parameters' shardings; the counts are replicated.
    params = traverse_util.flatten_dict(sharded.shardings.params, sep="/")
    followed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(got.opt_state):
        param_path = "/".join(str(k.key) for k in _trailing_dict_keys(path))
        if param_path in params:
            assert leaf.sharding.is_equivalent_to(params[param_path], leaf.ndim), param_path
            followed += 1
        else:
            assert leaf.sharding.is_fully_replicated, f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec}"
    assert followed >= len(params), f"only {followed} optimiser-state leaves follow a parameter"


def _trailing_dict_keys(path) -> list:
    keys = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(key)
    return keys[::-1]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and saving


def _check_checkpoint_resumes_exactly(runs, tmp_path) -> None:
    """orbax saves the sharded state as it lies (`convert.train_checkpoints.save_checkpoint`); restored into a template
    on the mesh it comes back with the same shardings and bits, and one more step from it gives exactly the
    uninterrupted run's parameters and optimiser state."""
    run, states = runs["sharded"]["run"], runs["sharded"]["states"]
    after_one = jax.device_put(states[0], run.shardings)
    manager = train_checkpoints.checkpoint_manager(tmp_path / "checkpoints")
    train_checkpoints.save_checkpoint(manager, after_one, {"loss": [[1, runs["sharded"]["losses"][0]]]})
    template = jax.device_put(jax.tree.map(np.zeros_like, states[0]), run.shardings)
    restored, meta = train_checkpoints.restore_checkpoint(train_checkpoints.checkpoint_manager(tmp_path / "checkpoints"), template,
                                                 tmp_path / "checkpoints")
    assert meta == {"loss": [[1, runs["sharded"]["losses"][0]]]}, meta
    for (path, got), want, sharding in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(states[0]),
                                           jax.tree.leaves(run.shardings)):
        assert got.sharding.is_equivalent_to(sharding, got.ndim), f"{jax.tree_util.keystr(path)}: {got.sharding}"
        assert np.array_equal(np.asarray(got), want), jax.tree_util.keystr(path)
    resumed, _, _ = train_step(run.fns, restored, _micro_batches(run.config, 1))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(resumed), jax.tree.leaves(states[1])):
        assert np.array_equal(np.asarray(got), want), f"{jax.tree_util.keystr(path)} differs from the uninterrupted run"


def _file_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _check_save_pretrained(composed_dir, runs, tmp_path) -> None:
    """Loaded on the mesh and saved: the files of the single-device save, byte for byte (both weight formats); and
    so for the trained sharded params against their host copy."""
    directory = composed_dir(*PAIR)
    single = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    sharded = FlaxSpeechEncoderDecoderModel.from_pretrained(directory, mesh=_mesh())
    trained = runs["sharded"]["state"].params
    host = jax.tree.map(np.array, trained)
    for name, want, got in (("loaded", single.save_pretrained(tmp_path / "single"),
                             sharded.save_pretrained(tmp_path / "sharded")),
                            ("trained", single.save_pretrained(tmp_path / "trained_host", params=host),
                             sharded.save_pretrained(tmp_path / "trained_sharded", params=trained))):
        assert [p.name for p in got] == [p.name for p in want], (got, want)
        assert {"flax_model.msgpack", "model.safetensors"} <= {p.name for p in got}
        a, b = _file_bytes(want[0].parent), _file_bytes(got[0].parent)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), (
            f"{name}: files differ: {[k for k in a if a.get(k) != b.get(k)]}")
    assert _file_bytes(tmp_path / "trained_sharded") != _file_bytes(tmp_path / "sharded"), "training changed nothing"


# ----------------------------------------------------------------------------------------------------------
# --mesh


@pytest.mark.parametrize("text, message", [
    ("data2", "'data2' is not AXIS=SIZE"),
    ("data=2,,fsdp=4", "'' is not AXIS=SIZE"),
    ("dta=2,fsdp=4", "axis 'dta' is not one of data, fsdp, model"),
    ("data=2,data=4", "axis 'data' is given twice"),
    ("data=0,fsdp=8", "the size of 'data' must be a positive integer, not '0'"),
    ("data=two", "the size of 'data' must be a positive integer, not 'two'"),
])
def test_a_malformed_mesh_is_refused_in_one_line(text, message):
    with pytest.raises(UsageError) as info:
        parse_mesh(text)
    got = str(info.value)
    assert got == f"mesh={text}: {message}" or got.startswith(f"mesh={text}: {message}"), got
    assert info.value.param == "mesh" and "\n" not in got


def test_a_mesh_is_built_over_every_device_and_its_product_must_match():
    mesh = mesh_from_flag("data=2,fsdp=4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and mesh.devices.size == len(jax.devices()) == 8
    with pytest.raises(UsageError, match=r"^mesh=data=3,fsdp=2: the axis sizes multiply to 6, but there are 8 "
                                         r"devices"):
        mesh_from_flag("data=3,fsdp=2")


def test_generate_loads_the_model_sharded_on_the_mesh_it_is_given(composed_dir):
    """`convert.generate --mesh` loads through `convert.transcribe.load_model(..., mesh=...)`: params split by
    the partition rules over the mesh, batches then split over `data` by `generate` (test_mesh.py)."""
    from convert.transcribe import load_model

    model, _ = load_model(composed_dir(*PAIR), "flax", mesh="data=2,fsdp=4")
    assert model.mesh is not None and dict(model.mesh.shape) == {"data": 2, "fsdp": 4}
    leaves = jax.tree.leaves(model.params)
    split = sum(not leaf.sharding.is_fully_replicated for leaf in leaves)
    assert split > len(leaves) // 3, f"only {split} of {len(leaves)} leaves are split"
    with pytest.raises(UsageError, match=r"^mesh=data=2,fsdp=4: needs framework=flax"):
        load_model(composed_dir(*PAIR), "torch", mesh="data=2,fsdp=4")


@pytest.mark.parametrize("command", ["generate", "finetune"])
def test_the_commands_refuse_a_bad_mesh_with_a_usage_error(command, composed_dir, tmp_path, capsys):
    directory = str(composed_dir(*PAIR))
    if command == "generate":
        code = generate.main(["--model", directory, "--audio", str(tmp_path), "--mesh", "data=3"])
    else:
        code = finetune.main(["--model", directory, "--train", "t.jsonl", "--eval", "e.jsonl", "--output",
                              str(tmp_path / "out"), "--mesh", "data=3"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE, (code, err)
    assert err.startswith("error: --mesh data=3: the axis sizes multiply to 3, but there are 8 devices"), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# convert.finetune --mesh


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory) -> dict:
    """The built-in wav2vec2 + BART composed (it has a tokenizer.json) and four training / two held-out tones."""
    import io

    import soundfile

    from convert.compose import compose

    root = tmp_path_factory.mktemp("finetune_mesh")
    compose("wav2vec2", "bart", root / "base", verify=False, progress=False, log=io.StringIO())
    rng = np.random.default_rng(0)
    (root / "wav").mkdir()
    for name, texts in (("train", ("one two", "three", "four five", "six")), ("eval", ("seven", "eight nine"))):
        with (root / f"{name}.jsonl").open("w") as f:
            for i, text in enumerate(texts):
                t = np.arange(int(16000 * (0.3 + 0.05 * len(text.split())))) / 16000
                wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.01 * rng.standard_normal(t.shape)
                soundfile.write(root / "wav" / f"{name}{i}.wav", wave.astype(np.float32), 16000)
                f.write(json.dumps({"audio": f"wav/{name}{i}.wav", "text": text}) + "\n")
    return {"root": root, "model": root / "base", "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def test_finetune_on_a_mesh_exports_the_state_of_its_sharded_checkpoint(finetune_data, capsys):
    """`python -m convert.finetune --mesh data=2,fsdp=4`: the run loads, trains and checkpoints sharded, and
    exports what the last checkpoint holds (its params restored whole, bit for bit)."""
    import orbax.checkpoint as ocp

    out = finetune_data["root"] / "sharded"
    argv = ["--model", str(finetune_data["model"]), "--train", str(finetune_data["train"]), "--eval",
            str(finetune_data["eval"]), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
            "--num-buckets", "1", "--eval-batch-size", "2", "--max-new-tokens", "4", "--learning-rate", "1e-3",
            "--mesh", "data=2,fsdp=4", "--no-verify", "--no-progress"]
    assert finetune.main(argv) == cli.EXIT_OK, capsys.readouterr().err
    report = json.loads((out / "training_report.json").read_text())
    assert report["mesh"] == {"data": 2, "fsdp": 4} and report["steps"] == 2, report.get("mesh")
    assert all(math.isfinite(e["wer"]) for e in report["eval"]) and math.isfinite(report["final_loss"]), report
    manager = train_checkpoints.checkpoint_manager(out.with_name("sharded.checkpoints"))
    assert manager.latest_step() == 2
    restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    saved = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(restored.state["params"], sep="/").items()}
    exported = _flat(FlaxSpeechEncoderDecoderModel.from_pretrained(out).params)
    base = _flat(FlaxSpeechEncoderDecoderModel.from_pretrained(finetune_data["model"]).params)
    assert saved.keys() == exported.keys()
    differ = [k for k in saved if not np.array_equal(saved[k], exported[k])]
    assert not differ, f"{len(differ)} exported tensors differ from the checkpoint, e.g. {differ[:3]}"
    moved = sum(not np.array_equal(exported[k], base[k]) for k in base)
    assert moved > len(base) // 2, f"only {moved} of {len(base)} tensors changed"
