"""CPU benchmark of one training step: the Flax step (jit) against the eager PyTorch reference's, in one run.

    python scripts/bench_train.py [--quick] [--runs N] [--batch N] [--audio-seconds S] [--threads N]

Model: wav2vec2-base with a BART-base decoder, random, built as `scripts/bench.py` builds it (same weights in both
frameworks). A step is what `convert.finetune` does: train mode (dropout, LayerDrop), the loss on labels shifted
into the decoder, the backward pass, global-norm clipping and an AdamW update, the conv feature encoder frozen
(`--no-freeze` trains it too). PyTorch: `model.train()`, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`.

Figures, one JSON line each (`load`: the 1-minute load average when taken; above the core count, disturbed):
    step      median seconds per step, Flax and PyTorch alternating; audio-seconds per second for each; ratio
              (torch_s / flax_s, > 1: Flax is faster); Flax's compile time (first call minus a compiled one).
    memory    for Flax with and without per-layer rematerialisation (and bfloat16 compute): XLA's own account
              of the compiled step (`temp_bytes`: activations and scratch; `argument_bytes`: params, optimiser
              state, batch), the step time, and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule
from flax_model.training import (
    OptimizerSettings,
    buffer_paths,
    apply_function,
    frozen_predicate,
    init_state,
    leaf_labels,
    loss_grad_function,
    make_optimizer,
    step_key,
)
from scripts.bench import bart_base, batch_inputs, build_models, composed_config, emit


def load() -> float:
    return os.getloadavg()[0]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def labels_for(config, batch: int, length: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    labels = rng.integers(4, config.decoder.vocab_size, (batch, length))
    labels[-1, int(0.75 * length):] = -100  # a padded row, as in a real batch
    return labels


def flax_step(model, batch: dict, freeze: bool, remat: bool, dtype) -> tuple:
    """(compiled grad function, compiled apply, state): the step `convert.finetune` runs."""
    settings = OptimizerSettings(learning_rate=1e-4, total_steps=1000, warmup_steps=10, weight_decay=0.01)
    optimizer = make_optimizer(settings, leaf_labels(model.params, frozen_predicate(
        freeze, buffer_paths(model.config, model.params))))
    module = SpeechEncoderDecoderModule(model.config, dtype=dtype, remat=remat)
    grad_fn = jax.jit(loss_grad_function(module, deterministic=False, freeze_feature_encoder=freeze))
    apply = jax.jit(apply_function(optimizer), donate_argnums=(0,))
    state = init_state(jax.tree.map(jnp.array, model.params), optimizer)
    return grad_fn, apply, state


def memory_of(grad_fn, state, batch) -> dict:
    compiled = grad_fn.lower(state.params, batch, step_key(0, 0), jnp.float32(0.0)).compile()
    stats = compiled.memory_analysis()
    return {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers per stack (a smoke test)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--label-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-freeze", dest="freeze", action="store_false")
    parser.add_argument("--memory-only", action="store_true",
                        help="only XLA's memory account of the compiled step, with and without remat (no timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    emit({"threads": args.threads, "devices": str(jax.devices())})

    config = composed_config(bart_base(args.quick), args.quick)
    flax_model, reference = build_models(config)
    audio, mask = batch_inputs(args.batch, args.audio_seconds)
    labels = labels_for(config, args.batch, args.label_tokens)
    batch = {"inputs": jnp.asarray(audio), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels, jnp.int32)}
    audio_s = float(mask.sum()) / 16000

    if args.memory_only:
        for remat, dtype in ((False, jnp.float32), (True, jnp.float32), (False, jnp.bfloat16), (True, jnp.bfloat16)):
            grad_fn, _, state = flax_step(flax_model, batch, args.freeze, remat=remat, dtype=dtype)
            emit({"bench": "memory", "remat": remat, "dtype": jnp.dtype(dtype).name, "batch": args.batch,
                  "audio_s": audio_s, **memory_of(grad_fn, state, batch), "load": load()})
        return 0
    grad_fn, apply, state = flax_step(flax_model, batch, args.freeze, remat=False, dtype=jnp.float32)
    counter = {"step": 0}

    def run_flax():
        nonlocal state
        sums, grads = grad_fn(state.params, batch, step_key(0, counter["step"]), jnp.float32(0.0))
        state = apply(state, grads, sums.tokens)
        counter["step"] += 1
        jax.block_until_ready(state.params)

    reference.train()
    if args.freeze:
        reference.freeze_feature_encoder()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.01)
    t_audio, t_mask, t_labels = (torch.from_numpy(audio), torch.from_numpy(mask), torch.from_numpy(labels))

    def run_torch():
        loss = reference.loss(t_audio, t_mask, t_labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    run_flax()
    first = time.perf_counter() - start
    run_torch()
    flax_times, torch_times = [], []
    for _ in range(args.runs):
        for fn, times in ((run_flax, flax_times), (run_torch, torch_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    flax_s, torch_s = statistics.median(flax_times), statistics.median(torch_times)
    emit({"bench": "step", "model": "wav2vec2-base+bart-base", "batch": args.batch, "audio_s": audio_s,
          "flax_s": flax_s, "torch_s": torch_s, "ratio": torch_s / flax_s,
          "flax_audio_s_per_s": audio_s / flax_s, "torch_audio_s_per_s": audio_s / torch_s,
          "compile_s": first - flax_s, "freeze_feature_encoder": args.freeze, "load": load()})
    optimizer.state.clear()  # the reference's Adam moments: not needed for the Flax memory figures
    reference.zero_grad(set_to_none=True)
    del state

    for remat, dtype in ((False, jnp.float32), (True, jnp.float32), (False, jnp.bfloat16), (True, jnp.bfloat16)):
        grad_fn, apply, state = flax_step(flax_model, batch, args.freeze, remat=remat, dtype=dtype)
        memory = memory_of(grad_fn, state, batch)
        times = []
        for i in range(max(2, args.runs)):
            start = time.perf_counter()
            sums, grads = grad_fn(state.params, batch, step_key(0, i), jnp.float32(0.0))
            state = apply(state, grads, sums.tokens)
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - start)
        emit({"bench": "memory", "remat": remat, "dtype": jnp.dtype(dtype).name, **memory,
              "step_s": statistics.median(times[1:]), "peak_rss_gb": peak_rss_gb(), "load": load()})
        del state, grads
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
