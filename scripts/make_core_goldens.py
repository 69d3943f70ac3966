"""Records what every decoder computes, so that a rewrite of the decoders can be held to the same numbers.

    PYTHONPATH=$PWD python scripts/make_core_goldens.py [--output parity_tests/goldens/decoder_core.npz]

For every decoder fixture case (every case of every registered decoder spec): the sha256 of the fixture's files
(the fixture scripts draw their weights in the reference module's parameter order, so a change of that order
shows here), and, once per distinct model (a case that loads to the config and params of an earlier case, e.g.
the same decoder stored as `BartForConditionalGeneration`, only names that case), the logits of the Flax model and
of the PyTorch reference on one padded batch, teacher-forced and, for causal decoders, decoded through the cache (a
prefill of 6 tokens, then one token at a time). For a few composed pairs (whose decoders hold the cross-attention
the composer created): the label loss of the decoder on the same batch and every decoder parameter's gradient, in
both frameworks. Flax runs eagerly, as the test that reads this file does (`parity_tests/test_decoder_core_goldens.py`).

Everything is computed in float64 (the Flax modules' `dtype` under `jax.enable_x64`, the reference `.double()`,
params and inputs cast; the softmax of attention scores stays float32 by design): float32 results move with the
CPU and XLA's code generation by a few 1e-6, float64 ones by ~1e-15, so the file holds on any machine. Each logits
array and gradient is stored as `projections` (its norm and 8 dot products with seeded random directions, float64):
any change of the array moves them, and they take 72 bytes.

The file was written with the decoders as they were before the decoder core (issue 19), this script run in a
checkout of the commit before it:

    git worktree add /tmp/pre-core bb46fd9 && cp scripts/make_core_goldens.py /tmp/pre-core/scripts/
    (cd /tmp/pre-core && PYTHONPATH=$PWD python scripts/make_core_goldens.py --output $OLDPWD/parity_tests/goldens/decoder_core.npz)

and the test proves that the code of today reproduces it. Rerun it only when a decoder's numbers are meant to change.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# XLA's CPU backend at the tests' optimisation level (parity_tests/conftest.py), before JAX starts: another level
# rounds some sums otherwise, and the test compares to the bit where it can.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import traverse_util  # noqa: E402

from convert.base.params import load_params  # noqa: E402
from convert.base.registry import specs  # noqa: E402
from flax_model.registry import module_for  # noqa: E402
from flax_model.speech_encoder_decoder import param_shapes  # noqa: E402
from scripts import make_fixtures  # noqa: E402
from torch_reference.registry import from_pretrained as reference_from_pretrained  # noqa: E402

OUTPUT = Path(__file__).resolve().parent.parent / "parity_tests" / "goldens" / "decoder_core.npz"
INPUTS = OUTPUT.parent / "inputs_text_pad_ids.npz"
BATCH, LENGTH = 2, 8
PREFILL = 6  # tokens fed at once into the empty cache; the rest one at a time
# (encoder case, decoder case): composed pairs whose decoders hold cross-attention that the composer created, and
# whose loss gradients are recorded.
PAIRS = (("w2v_group", "gpt2_lm"), ("w2v_group", "bert_lm"))


def decoder_cases() -> list[str]:
    return [case for spec in specs("decoder") for case in make_fixtures.cases_by_arch()[spec.name]]


def text_inputs() -> dict[str, np.ndarray]:
    """The decoder batch of the transformers goldens (`inputs_text_pad_ids.npz`: ids with pad ids inside both rows,
    row 1 right-padded, encoder states with row 0 right-padded): the shapes the other decoder tests run, so that
    the operations they compiled serve this one too."""
    with np.load(INPUTS) as batch:
        return {k: batch[k] for k in batch.files}


def fixture_digest(directory: Path) -> str:
    """One sha256 over every file of a fixture directory (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def params_digest(params) -> str:
    """One sha256 over a Flax param tree's paths, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        leaf = np.asarray(leaf)
        digest.update(f"{path}|{leaf.dtype.str}|{leaf.shape}|".encode() + np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def case_inputs(config, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ["input_ids", "attention_mask"]
    if config.has_cross_attention:
        keys += ["encoder_hidden_states", "encoder_attention_mask"]
    return {k: inputs[k] for k in keys}


def is_causal(config) -> bool:
    """BERT and RoBERTa without `is_decoder` attend both ways (and have no cache); the other decoders are causal."""
    return config.is_decoder or config.to_hf_dict()["model_type"] not in ("bert", "roberta")


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch on one thread (as this script runs): its sums then add in one order, and repeat to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cache_chunks() -> list[tuple[int, int]]:
    """The (start, stop) token ranges fed through the cache: a prefill, then one token at a time."""
    return [(0, PREFILL), *((t, t + 1) for t in range(PREFILL, LENGTH))]


def float64(tree):
    """Every floating leaf of a tree of arrays as float64 (numpy; JAX keeps it under `jax.enable_x64`)."""
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else np.asarray(x), tree)


def flax_logits(config, params, batch) -> tuple[np.ndarray, np.ndarray | None]:
    """(teacher-forced logits, cached logits or None) of the Flax model in float64, run eagerly (not jitted as a
    whole)."""
    import jax.numpy as jnp

    with jax.enable_x64(True):
        module = module_for(config, dtype=jnp.float64)
        variables = {"params": float64(params)}
        batch = float64(batch)
        full, _ = module.apply(variables, **batch)
        if not is_causal(config):
            return np.asarray(full), None
        cache = module.apply(variables, BATCH, LENGTH, batch.get("encoder_hidden_states"),
                             batch.get("encoder_attention_mask"), method="init_cache")
        steps = []
        for start, stop in cache_chunks():
            logits, cache = module.apply(variables, batch["input_ids"][:, start:stop], batch["attention_mask"],
                                         cache=cache)
            steps.append(np.asarray(logits))
        return np.asarray(full), np.concatenate(steps, axis=1)


def torch_logits(model, config, batch) -> tuple[np.ndarray, np.ndarray | None]:
    """(teacher-forced logits, cached logits or None) of the reference in float64 (`model` is made double)."""
    model.double()
    t = {k: torch.from_numpy(v) for k, v in float64(batch).items()}
    with torch.no_grad(), one_torch_thread():
        full, _ = model(**t)
        if not is_causal(config):
            return full.numpy(), None
        cache = model.init_cache(BATCH, LENGTH, t.get("encoder_hidden_states"), t.get("encoder_attention_mask"))
        steps = []
        for start, stop in cache_chunks():
            logits, cache = model(t["input_ids"][:, start:stop].long(), t["attention_mask"], cache=cache)
            steps.append(logits.numpy())
    return full.numpy(), np.concatenate(steps, axis=1)


def logits_projections(case: str, config, params, model, batch) -> dict[str, np.ndarray]:
    """{"<case>/<flax|torch>/<logits|cached_logits>": projections} of both frameworks' float64 logits."""
    out = {}
    for who, (full, cached) in (("flax", flax_logits(config, params, batch)),
                                ("torch", torch_logits(model, config, batch))):
        for name, logits in (("logits", full), ("cached_logits", cached)):
            if logits is not None:
                key = f"{case}/{who}/{name}"
                out[key] = projections(key, logits)
    return out


def label_loss_flax(logits, ids, mask):
    """Mean next-token cross-entropy over the real target tokens, in the logits' dtype: logits [B, T, V], ids/mask
    [B, T]."""
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, 1:].astype(logits.dtype)
    return -jnp.sum(picked * weight) / jnp.sum(weight)


def label_loss_torch(logits, ids, mask):
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(logp, -1, ids[:, 1:, None].long())[..., 0]
    weight = mask[:, 1:].to(logits.dtype)
    return -torch.sum(picked * weight) / torch.sum(weight)


def projections(path: str, array: np.ndarray) -> np.ndarray:
    """[norm, 8 projections] of an array: its float64 norm and its dot products with 8 N(0, 1) directions drawn
    from the path's CRC32, which stand for the whole array (any change of it moves them) in 9 numbers."""
    import zlib

    flat = np.asarray(array, np.float64).ravel()
    directions = np.random.default_rng(zlib.crc32(path.encode())).standard_normal((flat.size, 8))
    return np.concatenate([[np.linalg.norm(flat)], flat @ directions])


def pair_gradients(directory: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The label loss of a composed model's decoder on the text batch (its cross-attention over the batch's
    encoder states), and every decoder parameter's gradient as `projections`, in both frameworks."""
    from convert.base.registry import spec_for
    from torch_reference.speech_encoder_decoder import from_pretrained as composed_from_pretrained

    import jax.numpy as jnp

    loaded = load_params(directory, param_shapes)
    config = loaded.config.decoder
    inputs = float64(inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: inputs[k] for k in ("encoder_hidden_states", "encoder_attention_mask")}
    with jax.enable_x64(True):
        module = module_for(config, dtype=jnp.float64)

        def loss(params):
            logits, _ = module.apply({"params": params}, ids, mask, **extra)
            return label_loss_flax(logits, ids, mask)

        value, grads = jax.value_and_grad(loss)(float64(loaded.params["decoder"]))
        out = {"flax/loss": np.asarray(value)}
        out.update({f"flax/{k}": projections(k, v) for k, v in traverse_util.flatten_dict(grads, sep="/").items()})

    model, _ = composed_from_pretrained(directory)
    decoder = model.decoder.double()
    decoder.zero_grad()
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with one_torch_thread():
        logits, _ = decoder(t["input_ids"].long(), t["attention_mask"], t["encoder_hidden_states"],
                            t["encoder_attention_mask"])
        ref = label_loss_torch(logits, t["input_ids"], t["attention_mask"])
        ref.backward()
    out["torch/loss"] = ref.detach().numpy()
    spec = spec_for(config)
    tied = spec.tied_keys(config)
    for name, param in decoder.named_parameters():
        if name not in tied:
            path, transform = spec.keymap.to_flax(name)
            out[f"torch/{path}"] = projections(path, transform.to_flax(param.grad.numpy()))
    return out


def int32_slice_starts() -> None:
    """Makes `jax.lax.dynamic_update_slice` take its start indices as int32 for this run. The pre-core decoders wrote
    their cache at (0, 0, index, 0) with an int32 index beside Python ints, which JAX refuses under `enable_x64`
    (int64 and int32 mixed; today's code passes int32 throughout): indices only, no number changes."""
    import jax.numpy as jnp

    update = jax.lax.dynamic_update_slice
    if getattr(update, "int32_starts", False):
        return

    def int32_starts(operand, value, start_indices):
        return update(operand, value, [jnp.asarray(i, jnp.int32) for i in start_indices])

    int32_starts.int32_starts = True
    jax.lax.dynamic_update_slice = int32_starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    int32_slice_starts()
    from convert.compose import compose

    inputs = text_inputs()
    arrays: dict[str, np.ndarray] = {f"inputs/{k}": v for k, v in inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seen: dict[tuple, str] = {}  # (config, params digest) -> the first case that loads to them
        for case in decoder_cases():
            directory = make_fixtures.build(case, root)
            arrays[f"{case}/fixture_sha256"] = np.asarray(fixture_digest(directory))
            loaded = load_params(directory, param_shapes)
            same = seen.setdefault((loaded.config, params_digest(loaded.params)), case)
            if same != case:
                # Another source layout of the same decoder (e.g. BartForConditionalGeneration): the same model.
                arrays[f"{case}/same_as"] = np.asarray(same)
                continue
            model, _ = reference_from_pretrained(directory)
            batch = case_inputs(loaded.config, inputs)
            arrays.update(logits_projections(case, loaded.config, loaded.params, model, batch))
            print(case, "done", flush=True)
        for encoder, decoder in PAIRS:
            out = root / "composed" / f"{encoder}+{decoder}"
            compose(str(make_fixtures.build(encoder, root)), str(make_fixtures.build(decoder, root)), out, seed=0,
                    verify=False, progress=False, log=io.StringIO())
            arrays.update({f"{encoder}+{decoder}/{k}": v for k, v in pair_gradients(out, inputs).items()})
            print(encoder, decoder, "done", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    print(f"{args.output}: {len(arrays)} arrays, {args.output.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
