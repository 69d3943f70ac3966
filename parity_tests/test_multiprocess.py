"""Two processes under JAX's multi-controller runtime (`jax.distributed.initialize`, a localhost coordinator,
gloo collectives on CPU), 4 simulated CPU devices each: each process reads only the boxes its devices hold,
together they generate the tokens of the single-process run and take one sharded training step with its loss; the
sharded train state goes through an orbax checkpoint (each process writing its own shards) and the trained model
is saved (every process contributing its shards, process 0 writing).

The test starts this file twice as a script (`python parity_tests/test_multiprocess.py --process-id I ...`);
each run writes what it measured to a JSON file that the test then checks against the single-process model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, DEVICES_PER_PROCESS = 2, 4
# The "gpt2_xattn" case of test_generation.py: the encoder output steers the tokens (the rows differ within 12
# tokens). Every step of a search runs collectives between the processes (over TCP on CPU): few steps.
PAIR, EOS, MAX_NEW_TOKENS = ("w2v_stable_wide", "gpt2_xattn_untied"), 33, 12


def labels() -> np.ndarray:
    """Labels for `batch()` (4 rows: the mesh's data axis is 2), padded with -100."""
    ids = np.random.default_rng(1).integers(3, 40, (4, 6)).astype(np.int32)
    ids[1, 4:] = -100
    return ids


def train_batch() -> dict[str, np.ndarray]:
    inputs, mask = batch()
    return {"inputs": np.concatenate([inputs, inputs[:1]]), "attention_mask": np.concatenate([mask, mask[:1]]),
            "labels": labels()}


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Three seeded utterances of different lengths (the data axis has 2 devices: one padding row)."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((3, 4000)).astype(np.float32)
    mask = np.ones(inputs.shape, np.int32)
    for row, n in ((1, 2600), (2, 3300)):
        inputs[row, n:], mask[row, n:] = 0.0, 0
    return inputs, mask


# ----------------------------------------------------------------------------------------------------------
# The worker (one per process)


def worker(process_id: int, port: int, model_dir: Path, out: Path, saved: Path) -> None:
    import jax
    from flax import traverse_util
    from jax.sharding import Mesh

    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES, process_id=process_id)
    import time

    seconds, started = {}, time.perf_counter()  # per phase, reported when the test fails
    from convert.base.params import load_params
    from flax_model.sharding import load_sharded
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes

    # jax.devices() lists process 0's devices first. Mesh [data 2, fsdp 4]: fsdp spans both processes (each holds
    # half of every split leaf), data runs within each process.
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2).T, ("data", "fsdp"))
    loaded = load_sharded(model_dir, mesh, param_shapes)
    params = traverse_util.flatten_dict(loaded.params, sep="/")
    share = replicated = total = 0
    for leaf in params.values():
        boxes = {tuple(s.indices(n)[:2] for s, n in zip(index, leaf.shape))
                 for index in leaf.sharding.addressable_devices_indices_map(leaf.shape).values()}
        share += sum(int(np.prod([b - a for a, b in box])) for box in boxes) * leaf.dtype.itemsize
        total += leaf.size * leaf.dtype.itemsize
        replicated += leaf.size * leaf.dtype.itemsize if leaf.sharding.is_fully_replicated else 0
    bytes_read = loaded.bytes_read
    # Only now the whole model, to compare this process's shards with.
    reference = traverse_util.flatten_dict(load_params(model_dir, param_shapes).params, sep="/")
    wrong = [path for path, leaf in params.items() for shard in leaf.addressable_shards
             if not np.array_equal(np.asarray(shard.data), reference[path][shard.index])]
    del loaded, params, reference

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(model_dir, mesh=mesh)
    inputs, mask = batch()
    result = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": len(jax.local_devices()), "devices": len(jax.devices()),
        "bytes_read": bytes_read, "share": share, "total": total, "replicated": replicated, "wrong_shards": wrong,
    }
    # Greedy search only: beam search on the same mesh is checked in one process (test_mesh.py); what this test
    # adds is the runtime between processes, and every compiled search costs ~10 s here.
    seconds["load"], started = time.perf_counter() - started, time.perf_counter()
    generated = model.generate(inputs, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS)
    seconds["generate"], started = time.perf_counter() - started, time.perf_counter()
    result["sequences"] = generated.sequences.tolist()
    result["sequences_scores"] = np.asarray(generated.sequences_scores).tolist()

    # One sharded optimiser step (deterministic; params and Adam's moments split, the batch over data), then a
    # save: each leaf gathered across the processes, process 0 writing; every process then checks the shards
    # its devices hold against the written file.
    from convert.base.checkpoint import FLAX_FIRST, Checkpoint
    from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule
    from flax_model.training import (
        OptimizerSettings,
        init_state,
        leaf_labels,
        make_optimizer,
        state_shardings,
        step_functions,
        train_step,
    )

    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-3, total_steps=2),
                               leaf_labels(model.params, lambda _: False))
    fns = step_functions(SpeechEncoderDecoderModule(model.config), optimizer, deterministic=True,
                         shardings=state_shardings(model.params, optimizer))
    state, objective, tokens = train_step(fns, init_state(model.params, optimizer), [(train_batch(), None)])
    result["train_loss"], result["train_tokens"] = objective / tokens, tokens
    seconds["train_step"], started = time.perf_counter() - started, time.perf_counter()

    # The sharded state through an orbax checkpoint (`convert.finetune`'s functions): every process writes its
    # devices' shards and reads them back.
    from convert.train_checkpoints import checkpoint_manager, restore_checkpoint, save_checkpoint

    checkpoints = saved.with_name("checkpoints")
    save_checkpoint(checkpoint_manager(checkpoints), state, {"loss": result["train_loss"]})
    restored, meta = restore_checkpoint(checkpoint_manager(checkpoints), state, checkpoints)
    result["checkpoint_meta"] = meta
    result["checkpoint_differs"] = [
        jax.tree_util.keystr(path) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored),
                                                           jax.tree.leaves(state))
        if a.sharding != b.sharding or any(not np.array_equal(np.asarray(x.data), np.asarray(y.data))
                                           for x, y in zip(a.addressable_shards, b.addressable_shards))]
    result["checkpoint_files"] = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*")
                                        if "process" in p.name)
    seconds["checkpoint"], started = time.perf_counter() - started, time.perf_counter()
    files = FlaxSpeechEncoderDecoderModel(model.config, state.params).save_pretrained(saved)
    seconds["save"] = time.perf_counter() - started
    result["files"] = sorted(f.name for f in files)
    written = Checkpoint(saved, prefer=FLAX_FIRST)
    trained = traverse_util.flatten_dict(state.params, sep="/")
    result["wrong_saved_shards"] = [path for path, leaf in trained.items() for shard in leaf.addressable_shards
                                    if not np.array_equal(np.asarray(shard.data),
                                                          written.get_slice(path, shard.index))]
    result["saved_leaves"] = len(trained)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# The test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_read_their_shards_generate_train_and_save_like_one(composed_dir, tmp_path):
    import jax

    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    directory = composed_dir(*PAIR)
    port = _free_port()
    # The tiny model compiles far longer than it runs: XLA's CPU backend optimisations off and its legacy emitters,
    # as conftest.py compiles the single-process programs compared with here.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
                                      "--xla_backend_optimization_level=0 "
                                      + " ".join(f for f in os.environ["XLA_FLAGS"].split()
                                                 if f.startswith("--xla_cpu_use_fusion_emitters")),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"process{i}.json" for i in range(PROCESSES)]
    saved = tmp_path / "trained"
    procs = [subprocess.Popen([sys.executable, __file__, "--process-id", str(i), "--port", str(port),
                               "--model", str(directory), "--out", str(outs[i]), "--saved", str(saved)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(PROCESSES)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{logs[i][-3000:]}"
    results = [json.loads(out.read_text()) for out in outs]

    single = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    inputs, mask = batch()
    want = single.generate(inputs, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS)
    train = train_batch()
    want_loss = float(single.loss(train["inputs"], train["attention_mask"], train["labels"]))
    assert len({tuple(r) for r in want.sequences.tolist()}) == 3, f"rows alike: a weak check\n{want.sequences}"

    for i, r in enumerate(results):
        print(f"process {i}: seconds per phase {r['seconds']}")
        assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (i, 2, 4, 8), r
        assert not r["wrong_shards"], f"process {i}: shards differ from the single-process load: {r['wrong_shards']}"
        # Exactly the boxes its devices hold (each once), and no more than half of the model plus what every
        # process must hold whole (the replicated leaves: biases, norms, small kernels).
        figures = (f"process {i}: read {r['bytes_read']} bytes; its devices hold {r['share']}; model {r['total']}, "
                   f"of which replicated {r['replicated']}")
        assert r["bytes_read"] == r["share"], figures
        assert r["bytes_read"] <= (r["total"] - r["replicated"]) / PROCESSES + r["replicated"], figures
        assert r["bytes_read"] < 0.75 * r["total"], figures
        got = np.asarray(r["sequences"])
        assert np.array_equal(got, want.sequences), f"process {i}:\n{got}\n!=\n{want.sequences}"
        err = float(np.abs(np.asarray(r["sequences_scores"]) - want.sequences_scores).max())
        assert err <= 1e-5, f"process {i}: sequence scores max|diff|={err:.2e}"
        # The sharded step's loss is the single-process model's (float32 sums in another order: relative 1e-6).
        rel = abs(r["train_loss"] - want_loss) / want_loss
        assert rel <= 1e-6, f"process {i}: train loss {r['train_loss']:.7f} vs {want_loss:.7f}: relative {rel:.2e}"
        assert not r["wrong_saved_shards"], f"process {i}: saved values differ: {r['wrong_saved_shards'][:5]}"
        assert r["checkpoint_meta"] == {"loss": r["train_loss"]}, r["checkpoint_meta"]
        assert not r["checkpoint_differs"], f"process {i}: restored leaves differ: {r['checkpoint_differs'][:5]}"
        # orbax's OCDBT store: one per process, each writing the shards its devices hold.
        stores = {Path(f).name for f in r["checkpoint_files"] if "ocdbt" in f}
        assert stores == {f"ocdbt.process_{p}" for p in range(PROCESSES)}, r["checkpoint_files"]
        assert r["saved_leaves"] > 10, r["saved_leaves"]
    # Process 0 wrote (and names) the files; the other contributed its shards.
    assert {"flax_model.msgpack", "model.safetensors", "config.json"} <= set(results[0]["files"]), results[0]
    assert results[1]["files"] == [], results[1]["files"]
    trained = FlaxSpeechEncoderDecoderModel.from_pretrained(saved)
    moved = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                zip(jax.tree.leaves(trained.params), jax.tree.leaves(single.params)))
    assert moved > len(jax.tree.leaves(single.params)) // 2, f"only {moved} leaves moved in the saved model"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one process of the two-process test")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--saved", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    worker(args.process_id, args.port, args.model, args.out, args.saved)
