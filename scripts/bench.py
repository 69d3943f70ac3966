"""CPU benchmark of the composed model: Flax (jit) against the eager PyTorch reference, in one run.

    python scripts/bench.py [--quick] [--runs N] [--threads N] [--models bart,gpt2] [--batches 1,4]
        [--benches forward,generate,transcribe,encoder,mesh,compile]

Models are base-size and random, built here from configs (nothing is downloaded): wav2vec2-base (12 layers,
768 wide, 7-layer conv feature encoder) with a BART-base decoder (6 layers, d_model 768, vocabulary 50265) and
with GPT-2 124M (12 layers, 768 wide, vocabulary 50257), both decoders with cross-attention. The Flax params
are drawn by `init` and copied into the reference through the key table, so both run the same weights.

Figures, one JSON line each, the median of `--runs` timed runs after a warm-up, Flax and PyTorch runs
alternating (so that other work on the machine weighs on both alike; `load` is the 1-minute load average
when the figure was taken: on a 2-core machine, figures taken above 2 are disturbed):
    forward   the teacher-forced forward pass: 10 s of audio and 32 decoder tokens -> logits.
    generate  greedy generation of 64 new tokens from 10 s of audio, end to end (encoder, cross-attention
              prefill, 64 decoder steps); `min_new_tokens=64` so that every run makes all 64 tokens.
    decode    the 64 decoder steps alone (generate minus the encoder and the prefill, timed apart).
    transcribe  batch transcription (`convert.transcribe.transcribe`) of 100 utterances of 1-15 s with
              wav2vec2-base + BART-base: greedy search, 64 new tokens each (random weights would stop at once),
              batches of 8 in 4 length buckets;
              spoken by espeak-ng when it is installed (random English words at random rates and pitches), else
              noise of the same lengths (`audio` says which). Flax runs twice (`flax_cold_*`: compiling; then
              compiled), the reference once, on the same batches; audio-seconds per second for each, the ratio
              (warm Flax / reference), the compilations, and whether the tokens agree.
    mesh      one device against 8 simulated CPU devices (data 2 x fsdp 4), wav2vec2-base + BART-base: greedy
              generation tokens/s (batch 8) and the sharded train step's audio-seconds/s (`bench_mesh`; not run
              by default). Simulated devices share the same cores: the figures show sharding's overhead.
    encoder   the w2v-BERT 2.0 encoder alone (`facebook/w2v-bert-2.0`'s architecture: 24 conformer blocks, 1024
              wide, relative-key positions; 580 M parameters, random) on the log-mel frames of 10 s of audio
              (500 frames of 160 values), Flax (jit) against the reference, at each batch size; `fbank_s` is
              the numpy feature extraction of one 10 s utterance (`convert.base.fbank`). `--quick`: 2 blocks, 1 s.
              Not run by default (it needs about 6 GB of memory).
    llm       decode tokens/s of a random Qwen2.5-1.5B- (or Llama-3.2-1B-, `--llm`) shaped bf16 decoder composed
              with wav2vec2-large-lv60, with the fraction of the memory-bandwidth roofline reached (bytes a step
              reads / step time / the device's measured read bandwidth); `bench_llm`, not run by default.
    compile   compilation time (tracing, lowering and XLA compilation; nothing runs, params are abstract) of
              the encoder (`encode`, 10 s of audio) and of the decoder (the teacher-forced `decode` of 32 tokens,
              and greedy `generate`'s search: prefill and 64-step loop), unrolled against scanned layers
              (`scan_layers=True`), for wav2vec2-base / wav2vec2-large-lv60 and BART-base / BART-large; the
              median of `--runs` rounds after a warm-up round (`bench_compile`; not run by default).
Fields of forward / generate / decode: bench, model, batch, flax_s, torch_s, ratio (torch_s / flax_s: > 1 means Flax is faster), compile_s
(Flax's first call minus a compiled call: tracing and XLA compilation), tokens_per_s and torch_tokens_per_s
(generate and decode), same_tokens (whether both produced the same greedy tokens).

Threads: XLA's CPU backend runs its intra-op work on one thread per core, so PyTorch gets
`torch.set_num_threads(os.cpu_count())` (or `--threads`) for a like-for-like comparison; the figure is printed
first as a {"threads": ...} line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.base.archs.bart import BartConfig
from convert.base.archs.gpt2 import GPT2Config
from convert.base.archs.wav2vec2 import Wav2Vec2Config
from convert.base.checkpoint import numpy_to_torch
from convert.base.composed import SpeechEncoderDecoderConfig, composed_tied_keys
from convert.base.params import params_to_torch_state
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

SAMPLE_RATE = 16000


def wav2vec2_base(quick: bool) -> Wav2Vec2Config:
    """wav2vec2-base's architecture (HF's defaults are base's); `quick` keeps 2 layers."""
    return Wav2Vec2Config(num_hidden_layers=2 if quick else 12, mask_time_prob=0.05)


def bart_base(quick: bool) -> BartConfig:
    return BartConfig(d_model=768, decoder_layers=2 if quick else 6, decoder_attention_heads=12,
                      decoder_ffn_dim=3072, vocab_size=50265, max_position_embeddings=1024,
                      is_decoder=True, add_cross_attention=True)


def gpt2_124m(quick: bool) -> GPT2Config:
    return GPT2Config(n_layer=2 if quick else 12, is_decoder=True, add_cross_attention=True)


def composed_config(decoder: BartConfig | GPT2Config, quick: bool) -> SpeechEncoderDecoderConfig:
    start = decoder.decoder_start_token_id if decoder.decoder_start_token_id is not None else decoder.bos_token_id
    pad = decoder.pad_token_id if decoder.pad_token_id is not None else decoder.eos_token_id
    return SpeechEncoderDecoderConfig(
        raw={"architectures": ["SpeechEncoderDecoderModel"], "model_type": "speech-encoder-decoder"},
        encoder=wav2vec2_base(quick), decoder=decoder,
        decoder_start_token_id=start, pad_token_id=pad, eos_token_id=decoder.eos_token_id,
    )


def random_params(config: SpeechEncoderDecoderConfig, seed: int = 0) -> dict:
    """The composed model's params drawn by `init` (compiled)."""
    module = SpeechEncoderDecoderModule(config)
    inputs = jnp.zeros((1, 16000), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda key: module.init(key, inputs, None, ids))(jax.random.PRNGKey(seed))["params"]


def reference_model(config: SpeechEncoderDecoderConfig, params: dict) -> SpeechEncoderDecoderModel:
    """The reference model holding `params` (copied through the key table), in eval mode."""
    reference = SpeechEncoderDecoderModel(config).eval()
    state = {k: numpy_to_torch(v) for k, v in params_to_torch_state(config, jax.device_get(params)).items()}
    missing = set(reference.load_state_dict(state, strict=False).missing_keys) - set(composed_tied_keys(config))
    if missing:
        raise RuntimeError(f"the reference lacks weights for {sorted(missing)}")
    return reference


def build_models(config: SpeechEncoderDecoderConfig, seed: int = 0) -> tuple[FlaxSpeechEncoderDecoderModel,
                                                                              SpeechEncoderDecoderModel]:
    """Random Flax params from `init`, and the reference model holding the same weights."""
    params = random_params(config, seed)
    return FlaxSpeechEncoderDecoderModel(config, params), reference_model(config, params)


def paired_seconds(flax_fn: Callable[[], Any], torch_fn: Callable[[], Any], runs: int) -> tuple[float, float, float]:
    """(Flax's first call, Flax's median, PyTorch's median) in seconds, over `runs` calls of each after a warm-up.

    The two alternate, so that whatever else the machine is doing weighs on both alike.
    """
    start = time.perf_counter()
    flax_fn()
    first = time.perf_counter() - start
    torch_fn()
    flax_times, torch_times = [], []
    for _ in range(runs):
        for fn, times in ((flax_fn, flax_times), (torch_fn, torch_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return first, statistics.median(flax_times), statistics.median(torch_times)


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def batch_inputs(batch: int, audio_seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A padded batch: the last utterance 80% as long as the others (all full at batch 1)."""
    rng = np.random.default_rng(seed)
    n = int(audio_seconds * SAMPLE_RATE)
    audio = rng.standard_normal((batch, n)).astype(np.float32)
    mask = np.ones((batch, n), np.int32)
    if batch > 1:
        mask[-1, int(0.8 * n):] = 0
        audio[-1, int(0.8 * n):] = 0.0
    return audio, mask


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()}), flush=True)


def bench_forward(name: str, flax_model, torch_model, batch: int, args) -> None:
    audio, mask = batch_inputs(batch, args.audio_seconds)
    ids = np.random.default_rng(1).integers(0, flax_model.config.decoder.vocab_size, (batch, args.decoder_tokens))
    ids[:, 0] = flax_model.config.decoder_start_token_id
    fa, fm, fi = jnp.asarray(audio), jnp.asarray(mask), jnp.asarray(ids, jnp.int32)
    forward = flax_model._fn("__call__")

    def run_flax():
        return block(forward(flax_model.params, fa, fm, fi))

    ta, tm, ti = torch.from_numpy(audio), torch.from_numpy(mask), torch.from_numpy(ids)

    def run_torch():
        with torch.no_grad():
            return torch_model(ta, tm, ti).logits

    first, flax_s, torch_s = paired_seconds(run_flax, run_torch, args.runs)
    diff = float(np.max(np.abs(np.asarray(run_flax()) - run_torch().numpy())))
    emit({"bench": "forward", "model": name, "batch": batch, "flax_s": flax_s, "torch_s": torch_s,
          "ratio": torch_s / flax_s, "compile_s": first - flax_s, "audio_s": args.audio_seconds,
          "decoder_tokens": args.decoder_tokens, "max_abs_logits_diff": diff, "load": os.getloadavg()[0]})


def bench_generate(name: str, flax_model, torch_model, batch: int, args) -> None:
    audio, mask = batch_inputs(batch, args.audio_seconds)
    new = args.new_tokens
    options = {"max_new_tokens": new, "min_new_tokens": new}
    fa, fm = jnp.asarray(audio), jnp.asarray(mask)
    ta, tm = torch.from_numpy(audio), torch.from_numpy(mask)
    results = {}

    def run_flax():
        results["flax"] = flax_model.generate(fa, fm, **options)

    def run_torch():
        results["torch"] = torch_model.generate(ta, tm, **options)

    # The prefill alone (encoder + cross-attention keys/values), to take out of the generation time.
    flax_prefill = jax.jit(lambda p, a, m: flax_model.module.apply(
        {"params": p}, a, m, method=lambda mod, a, m: mod.init_cache(a.shape[0], new + 1, *mod.encode(a, m))))

    def run_flax_prefill():
        return block(flax_prefill(flax_model.params, fa, fm))

    def run_torch_prefill():
        with torch.no_grad():
            hidden, emask = torch_model.encode(ta, tm)
            return torch_model.init_cache(batch, new + 1, hidden, emask)

    first, flax_s, torch_s = paired_seconds(run_flax, run_torch, args.runs)
    _, flax_prefill_s, torch_prefill_s = paired_seconds(run_flax_prefill, run_torch_prefill, args.runs)
    same = bool(np.array_equal(results["flax"].sequences, results["torch"].sequences.numpy()))
    tokens = batch * new
    emit({"bench": "generate", "model": name, "batch": batch, "flax_s": flax_s, "torch_s": torch_s,
          "ratio": torch_s / flax_s, "compile_s": first - flax_s, "tokens_per_s": tokens / flax_s,
          "torch_tokens_per_s": tokens / torch_s, "new_tokens": new, "audio_s": args.audio_seconds,
          "same_tokens": same, "load": os.getloadavg()[0]})
    flax_decode, torch_decode = flax_s - flax_prefill_s, torch_s - torch_prefill_s
    emit({"bench": "decode", "model": name, "batch": batch, "flax_s": flax_decode, "torch_s": torch_decode,
          "ratio": torch_decode / flax_decode, "tokens_per_s": tokens / flax_decode,
          "torch_tokens_per_s": tokens / torch_decode, "new_tokens": new,
          "flax_prefill_s": flax_prefill_s, "torch_prefill_s": torch_prefill_s, "load": os.getloadavg()[0]})


WORDS = ("the", "a", "model", "speech", "time", "river", "seven", "green", "window", "quickly", "morning", "paper",
         "listen", "number", "station", "under", "bright", "yesterday", "computer", "garden", "answer", "travel",
         "music", "simple", "over", "people", "because", "water", "different", "little", "evening", "remember")


def make_utterances(count: int, low: float, high: float, directory: Path, seed: int = 0
                    ) -> tuple[list[Path], list[float], str]:
    """`count` WAV files of about `low`-`high` seconds: espeak-ng speech when installed, else noise."""
    import shutil
    import tempfile

    import soundfile

    rng = np.random.default_rng(seed)
    targets = rng.uniform(low, high, count)
    paths, seconds = [], []
    if shutil.which("espeak-ng"):
        from scripts.make_spoken_dataset import synthesise

        with tempfile.TemporaryDirectory() as tmp:
            for i, target in enumerate(targets):
                rate = int(rng.integers(150, 200))  # words per minute
                words = max(1, round(target * rate / 60 * 0.85))  # espeak-ng pauses a little between words
                text = " ".join(rng.choice(WORDS, words))
                path = directory / f"{i:03d}.wav"
                seconds.append(synthesise(text, "en-us", rate, int(rng.integers(30, 70)), path, Path(tmp)))
                paths.append(path)
        return paths, seconds, "espeak-ng"
    for i, target in enumerate(targets):
        path = directory / f"{i:03d}.wav"
        soundfile.write(str(path), (0.1 * rng.standard_normal(int(target * SAMPLE_RATE))).astype(np.float32),
                        SAMPLE_RATE)
        paths.append(path)
        seconds.append(float(target))
    return paths, seconds, "noise"


def bench_transcribe(args) -> None:
    import tempfile

    from convert.transcribe import transcribe

    count, low, high, tokens = (10, 1.0, 3.0, 16) if args.quick else (100, 1.0, 15.0, 64)  # 4 tokens a second
    with tempfile.TemporaryDirectory() as tmp:
        paths, seconds, source = make_utterances(count, low, high, Path(tmp))
        flax_model, torch_model = build_models(composed_config(bart_base(args.quick), args.quick))
        # Random weights would end every transcript at once: every utterance generates `tokens` tokens.
        options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "batch_size": 8, "buckets": 4,
                   "progress": False, "tokens_per_second": 4.0}
        cold = transcribe(flax_model, paths, **options)
        warm = transcribe(flax_model, paths, **options)
        reference = transcribe(torch_model, paths, **options)
    same = [r.token_ids for r in warm.results] == [r.token_ids for r in reference.results]
    emit({"bench": "transcribe", "model": "wav2vec2-base+bart-base", "utterances": count, "audio": source,
          "audio_s": sum(seconds), "min_s": min(seconds), "max_s": max(seconds),
          "flax_audio_s_per_s": warm.audio_seconds_per_second,
          "flax_cold_audio_s_per_s": cold.audio_seconds_per_second,
          "torch_audio_s_per_s": reference.audio_seconds_per_second,
          "ratio": warm.audio_seconds_per_second / reference.audio_seconds_per_second,
          "flax_s": warm.wall_seconds, "flax_cold_s": cold.wall_seconds, "torch_s": reference.wall_seconds,
          "compilations": cold.compilations, "warm_compilations": warm.compilations,
          "padded_shapes": [list(s) for s in cold.shapes], "new_tokens": tokens,
          "generated_tokens": sum(len(r.token_ids) - 1 for r in warm.results), "same_tokens": same,
          "load": os.getloadavg()[0]})


# ----------------------------------------------------------------------------------------------------------
# mesh: one device against 8 simulated CPU devices

MESH_DEVICES, MESH_SHAPE, MESH_AXES = 8, (2, 4), ("data", "fsdp")


def bench_mesh(args) -> None:
    """wav2vec2-base + BART-base on one device and on a mesh of 8 simulated CPU devices (data 2 x fsdp 4, params
    placed by the partition rules): greedy generation tokens/s (batch 8, 64 new tokens from 10 s of audio) and
    the sharded fine-tuning step (`flax_model.training.train_step`: batch 8 of 4 s, 32 label tokens, dropout on)
    in audio-seconds per second. Simulated devices share the machine's cores: the figures show the cost of
    sharding (collectives, partitioned programs), not a speed-up.

    XLA reads the device count once, before JAX starts: when this process has fewer devices, the bench runs in
    a child process with `--xla_force_host_platform_device_count=8`.
    """
    import subprocess

    if len(jax.devices()) < MESH_DEVICES:
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={MESH_DEVICES}"
        command = [sys.executable, str(Path(__file__).resolve()), "--benches", "mesh", "--runs", str(args.runs),
                   *(["--quick"] if args.quick else [])]
        subprocess.run(command, env={**os.environ, "XLA_FLAGS": flags.strip()}, check=True)
        return
    from flax import traverse_util

    from flax_model.sharding import on_mesh, param_shardings
    from flax_model.speech_encoder_decoder import param_shapes
    from flax_model.training import (
        OptimizerSettings,
        init_state,
        leaf_labels,
        make_optimizer,
        state_shardings,
        step_functions,
        step_key,
        train_step,
    )

    config = composed_config(bart_base(args.quick), args.quick)
    module = SpeechEncoderDecoderModule(config)
    init_inputs, init_ids = jnp.zeros((1, 16000), jnp.float32), jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda key: module.init(key, init_inputs, None, init_ids))(jax.random.PRNGKey(0))["params"]
    mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES)
    shardings = param_shardings(config, param_shapes(config), mesh)
    flat = traverse_util.flatten_dict(params, sep="/")

    def model_on(devices: int) -> FlaxSpeechEncoderDecoderModel:
        if devices == 1:
            return FlaxSpeechEncoderDecoderModel(config, jax.tree.map(jnp.copy, params))
        placed = {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}
        return on_mesh(FlaxSpeechEncoderDecoderModel(config, traverse_util.unflatten_dict(placed, sep="/")), mesh)

    batch, new_tokens = 8, args.new_tokens
    audio, mask = batch_inputs(batch, args.audio_seconds)
    tokens = {}
    for devices in (1, MESH_DEVICES):
        model = model_on(devices)

        def run(model=model):
            return model.generate(audio, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        start = time.perf_counter()
        tokens[devices] = run().sequences
        first = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        emit({"bench": "mesh_generate", "model": "wav2vec2-base+bart-base", "devices": devices,
              "mesh": "one device" if devices == 1 else dict(mesh.shape), "batch": batch,
              "audio_seconds": args.audio_seconds, "new_tokens": new_tokens, "seconds": round(seconds, 3),
              "tokens_per_s": round(batch * new_tokens / seconds, 1), "compile_s": round(first - seconds, 1),
              "same_tokens": bool(np.array_equal(tokens[devices], tokens[1])), "load": os.getloadavg()[0]})
        del model

    train_seconds = 1.0 if args.quick else 4.0
    label_tokens = 8 if args.quick else 32
    rng = np.random.default_rng(0)
    inputs, input_mask = batch_inputs(batch, train_seconds)
    labels = rng.integers(0, config.decoder.vocab_size, (batch, label_tokens)).astype(np.int32)
    micro = {"inputs": inputs, "attention_mask": input_mask, "labels": labels}
    for devices in (1, MESH_DEVICES):
        model = model_on(devices)
        optimizer = make_optimizer(OptimizerSettings(total_steps=100), leaf_labels(model.params, lambda _: False))
        fns = step_functions(module, optimizer, deterministic=False,
                             shardings=state_shardings(model.params, optimizer))
        state = init_state(model.params, optimizer)
        times, losses = [], []
        for step in range(args.runs + 1):
            start = time.perf_counter()
            state, objective, count = train_step(fns, state, [(micro, step_key(0, step))])
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - start)
            losses.append(objective / count)
        seconds = statistics.median(times[1:])
        emit({"bench": "mesh_train_step", "model": "wav2vec2-base+bart-base", "devices": devices,
              "mesh": "one device" if devices == 1 else dict(mesh.shape), "batch": batch,
              "audio_seconds": train_seconds, "label_tokens": label_tokens, "step_s": round(seconds, 3),
              "audio_seconds_per_s": round(batch * train_seconds / seconds, 2),
              "compile_s": round(times[0] - seconds, 1), "losses": [round(x, 5) for x in losses],
              "load": os.getloadavg()[0]})
        del model, state, fns


def wav2vec2_large_lv60() -> Wav2Vec2Config:
    """wav2vec2-large-lv60's architecture: 24 stable-layer-norm layers, 1024 wide, layer-norm conv encoder."""
    return Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)


def bart_large() -> BartConfig:
    return BartConfig(d_model=1024, decoder_layers=12, decoder_attention_heads=16, decoder_ffn_dim=4096,
                      vocab_size=50265, max_position_embeddings=1024, is_decoder=True, add_cross_attention=True)


def compile_seconds(fn: Callable[..., Any], *args: Any) -> float:
    """Tracing, lowering and XLA compilation of `jax.jit(fn)` for these (abstract) arguments."""
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def w2v_bert_2(quick: bool) -> Any:
    """facebook/w2v-bert-2.0's architecture (transformers' Wav2Vec2BertConfig defaults are its); `quick` keeps 2
    blocks."""
    from convert.base.archs.wav2vec2_bert import Wav2Vec2BertConfig

    return Wav2Vec2BertConfig(num_hidden_layers=2 if quick else 24)


def bench_encoder(args) -> None:
    """The w2v-BERT encoder's forward pass, Flax against the reference on the same random weights."""
    from flax import traverse_util

    from convert.base import fbank
    from convert.base.archs.wav2vec2_bert import SPEC
    from convert.base.keymap import plan_torch_to_flax
    from flax_model import wav2vec2_bert as flax_w2v_bert
    from torch_reference.wav2vec2_bert import Wav2Vec2BertModel

    config = w2v_bert_2(args.quick)
    torch.manual_seed(0)
    reference = Wav2Vec2BertModel(config).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
        flax_w2v_bert.init_shapes(config), sep="/").items()}
    plan = plan_torch_to_flax(SPEC.keymap, {k: v.shape for k, v in state.items()}, expected)
    params = traverse_util.unflatten_dict(
        {e.target: jnp.asarray(e.transform.to_flax(state[e.source])) for e in plan.entries}, sep="/")
    del state
    forward = jax.jit(flax_w2v_bert.Wav2Vec2BertModule(config).apply)
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(args.audio_seconds * SAMPLE_RATE))).astype(np.float32)
    start = time.perf_counter()
    features, _ = fbank.batch_features([wave], 80, 2, 0.0, SAMPLE_RATE)
    fbank_s = time.perf_counter() - start
    frames = features.shape[1]
    for batch in (int(b) for b in args.batches.split(",")):
        x = np.random.default_rng(batch).standard_normal((batch, frames, config.input_feature_size)).astype(np.float32)
        mask = np.ones((batch, frames), np.int32)
        if batch > 1:  # the last utterance 80% as long, as batch_inputs pads
            mask[-1, int(0.8 * frames):] = 0
        fx, fm, tx, tm = jnp.asarray(x), jnp.asarray(mask), torch.from_numpy(x), torch.from_numpy(mask)

        def run_flax():
            return block(forward({"params": params}, fx, fm))

        def run_torch():
            with torch.no_grad():
                return reference(tx, tm)

        first, flax_s, torch_s = paired_seconds(run_flax, run_torch, args.runs)
        diff = float(np.max(np.abs(np.asarray(run_flax()) - run_torch().numpy())))
        emit({"bench": "encoder", "model": "w2v-bert-2.0" + ("-2layers" if args.quick else ""), "batch": batch,
              "flax_s": flax_s, "torch_s": torch_s, "ratio": torch_s / flax_s, "compile_s": first - flax_s,
              "audio_s": args.audio_seconds, "frames": frames, "max_abs_hidden_diff": diff, "fbank_s": fbank_s,
              "load": os.getloadavg()[0]})


def bench_compile(args) -> None:
    """Compile time of the encoder and the decoder, unrolled against scanned layers, at base and large sizes.

    Each figure compiles a fresh function (jax's in-memory cache never serves it); the params are
    `jax.ShapeDtypeStruct`s, so nothing is allocated and large models cost no memory. A first round, not timed,
    warms JAX's tracing caches (the first compilation of a process also pays one-off costs); then `--runs` rounds
    alternate unrolled and scanned, and each figure is the median. `--quick` keeps 2 encoder and 2 decoder
    layers (the figures then show little difference)."""
    from flax import traverse_util

    from convert.base.generation_settings import resolve_settings
    from flax_model.generation import search_function
    from flax_model.speech_encoder_decoder import param_shapes, stacked_param_shapes

    sizes = {"base": (wav2vec2_base(args.quick), bart_base(args.quick))}
    if not args.quick:
        sizes["large"] = (wav2vec2_large_lv60(), bart_large())
    audio = jax.ShapeDtypeStruct((1, int(args.audio_seconds * SAMPLE_RATE)), jnp.float32)
    audio_mask = jax.ShapeDtypeStruct(audio.shape, jnp.int32)
    ids = jax.ShapeDtypeStruct((1, args.decoder_tokens), jnp.int32)
    for size, (encoder, decoder) in sizes.items():
        config = dataclasses.replace(composed_config(decoder, args.quick), encoder=encoder)
        abstract = {scan: traverse_util.unflatten_dict(
            {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes(config).items()}, sep="/")
            for scan, shapes in ((False, param_shapes), (True, stacked_param_shapes))}
        frames = int(encoder.output_lengths(audio.shape[1]))
        hidden = jax.ShapeDtypeStruct((1, frames, decoder.hidden_size), jnp.float32)
        frame_mask = jax.ShapeDtypeStruct((1, frames), jnp.bool_)
        settings = resolve_settings(config, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        traced = {name: jnp.asarray(value, jnp.int32 if name == "min_new_tokens" else jnp.float32)
                  for name, value in settings.traced.items()}
        figures: dict[str, dict[bool, list[float]]] = {}
        for scan in [False, True] * (args.runs + 1):
            module = SpeechEncoderDecoderModule(config, scan_layers=scan)
            params = abstract[scan]

            def encode(params, inputs, mask, module=module):
                return module.apply({"params": params}, inputs, mask, method=SpeechEncoderDecoderModule.encode)

            def decode(params, ids, hidden, mask, module=module):
                return module.apply({"params": params}, ids, hidden, mask, method=SpeechEncoderDecoderModule.decode)

            for part, seconds in (
                    ("encoder", compile_seconds(encode, params, audio, audio_mask)),
                    ("decoder", compile_seconds(decode, params, ids, hidden, frame_mask)),
                    ("generate", compile_seconds(search_function(module, settings), params, hidden, frame_mask,
                                                 traced, jax.random.PRNGKey(0)))):
                figures.setdefault(part, {}).setdefault(scan, []).append(seconds)
        layers = {"encoder": encoder.num_hidden_layers, "decoder": decoder.decoder_layers,
                  "generate": decoder.decoder_layers}
        for part, rounds in figures.items():
            seconds = {scan: statistics.median(times[1:]) for scan, times in rounds.items()}  # round 0: warm-up
            emit({"bench": "compile", "part": part, "size": size,
                  "model": f"wav2vec2-{'base' if size == 'base' else 'large-lv60'}" if part == "encoder"
                  else f"bart-{size}", "layers": layers[part], "unrolled_s": round(seconds[False], 2),
                  "scanned_s": round(seconds[True], 2), "ratio": round(seconds[False] / seconds[True], 2),
                  "runs": args.runs, "load": os.getloadavg()[0]})


def read_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
    """The device's measured read bandwidth, bytes/s: a compiled sum over a float32 array of `nbytes` (every byte
    read once, nothing written but a scalar), the median of `runs` after a warm-up."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    block(total(x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        block(total(x))
        times.append(time.perf_counter() - start)
    del x
    return nbytes / statistics.median(times)


def decode_step_bytes(model: FlaxSpeechEncoderDecoderModel, batch: int, cache_length: int, frames: int) -> dict:
    """What one cached decoder step reads from memory, in bytes: every decoder weight but the cross-attention's
    key/value projections (their output is cached at prefill) and, with an untied head, the embedding table (a
    lookup reads B rows); and the whole cache as compiled: self-attention keys/values of every slot (masked slots
    are read too) and the cross-attention keys/values of every frame."""
    from flax import traverse_util

    tied = model.config.decoder.tie_word_embeddings
    weights = 0
    for path, leaf in traverse_util.flatten_dict(model.params["decoder"], sep="/").items():
        if "cross_attn/k_proj/" in path or "cross_attn/v_proj/" in path:
            continue
        if path.endswith("embed_tokens/embedding") and not tied:
            continue
        weights += leaf.size * leaf.dtype.itemsize
    hidden = jax.ShapeDtypeStruct((batch, frames, model.config.decoder.hidden_size), model.dtype)
    frame_mask = jax.ShapeDtypeStruct((batch, frames), jnp.bool_)
    cache = jax.eval_shape(lambda p, h, m: model.module.apply(
        {"params": p}, batch, cache_length, h, m, method=SpeechEncoderDecoderModule.init_cache), model.params,
        hidden, frame_mask)
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(cache)
                      if leaf.ndim >= 4)
    return {"weights": weights, "cache": cache_bytes, "total": weights + cache_bytes}


LLM_SHAPES = ("qwen2.5-1.5b", "llama-3.2-1b")


def bench_llm(args) -> None:
    """Decoding with a 1-2 B decoder composed with wav2vec2-large-lv60, bf16, against the memory-bandwidth roofline.

    The sources are random, built once into `--cache-dir` (`scripts/make_random_llm.py`; the encoder as
    `scripts/bench_convert.py` builds it) and composed there in bfloat16 (`--no-verify`). The model loads in
    bfloat16 (on a mesh of every device with `--mesh`). Per batch size: greedy generation end to end (`generate`,
    64 new tokens, no early end: encoder, prefill and steps), and the decoder steps alone: one compiled loop of 64
    cached steps from a prefilled cache, each feeding back its argmax. From the latter: decode tokens/s (batch x
    steps / loop time), the step time, the bytes a step reads (`decode_step_bytes`), and the fraction of the
    roofline reached: bytes per step / step time / the measured read bandwidth (`read_bandwidth`). `--quick` runs
    the same on toy shapes (to check the bench, not a figure)."""
    import io

    from convert.compose import compose
    from scripts.bench_convert import build_source
    from scripts.make_random_llm import write_random_llm

    cache_dir = Path(args.cache_dir or "/tmp/benchcache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-small" if args.quick else ""
    encoder = build_source("wav2vec2-small" if args.quick else "wav2vec2-large-lv60", cache_dir)
    decoder = cache_dir / f"{args.llm}{suffix}-bf16"
    if not (decoder / "config.json").is_file():
        write_random_llm(decoder, args.llm, "bfloat16", None, small=args.quick)
    composed = cache_dir / f"{encoder.name}+{decoder.name}"
    if not (composed / "config.json").is_file():
        start = time.perf_counter()
        compose(str(encoder), str(decoder), composed, dtype="bfloat16", verify=False, progress=False,
                log=io.StringIO())
        emit({"bench": "llm_compose", "model": composed.name, "seconds": time.perf_counter() - start})
    mesh = jax.make_mesh((1, jax.device_count()), ("data", "fsdp")) if args.mesh else None
    start = time.perf_counter()
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed, dtype=jnp.bfloat16, mesh=mesh)
    load_s = time.perf_counter() - start
    bandwidth = read_bandwidth(1 << 24 if args.quick else 1 << 30)
    new = args.new_tokens
    module = model.module

    def steps(params, cache, tokens):
        """`new` cached decoder steps from a prefilled cache, each feeding back its argmax (what greedy search's
        loop computes, without the processors)."""
        def body(_, carry):
            cache, tokens = carry
            logits, cache = module.apply({"params": params}, tokens, None, None, cache=cache,
                                         method=SpeechEncoderDecoderModule.decode)
            return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, new, body, (cache, tokens))[1]

    decode_steps = jax.jit(steps)
    prefill = jax.jit(lambda p, a, m: module.apply(
        {"params": p}, a, m, method=lambda mod, a, m: mod.init_cache(a.shape[0], new + 1, *mod.encode(a, m))))

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        """(the first call, the median of `--runs` calls after it), seconds."""
        start = time.perf_counter()
        block(fn())
        first = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            block(fn())
            times.append(time.perf_counter() - start)
        return first, statistics.median(times)

    for batch in (int(b) for b in args.batches.split(",")):
        audio, mask = batch_inputs(batch, args.audio_seconds)
        fa, fm = jnp.asarray(audio), jnp.asarray(mask)
        first, generate_s = timed(lambda: model.generate(fa, fm, max_new_tokens=new, min_new_tokens=new).sequences)
        cache = block(prefill(model.params, fa, fm))
        start_tokens = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
        steps_first, decode_s = timed(lambda: decode_steps(model.params, cache, start_tokens))
        step_s = decode_s / new
        frames = int(cache.encoder_mask.shape[1])
        read = decode_step_bytes(model, batch, new + 1, frames)
        emit({"bench": "llm_decode", "model": composed.name, "devices": jax.device_count(),
              "device": str(jax.devices()[0].device_kind), "batch": batch, "new_tokens": new,
              "audio_s": args.audio_seconds, "decode_tokens_per_s": batch * new / decode_s, "step_ms": 1000 * step_s,
              "generate_tokens_per_s": batch * new / generate_s, "generate_s": generate_s,
              "generate_compile_s": first - generate_s, "steps_compile_s": steps_first - decode_s, "load_s": load_s,
              "bytes_per_step": read["total"], "weight_bytes": read["weights"], "cache_bytes": read["cache"],
              "read_bandwidth_gb_s": bandwidth / 1e9, "achieved_gb_s": read["total"] / step_s / 1e9,
              "roofline_fraction": read["total"] / step_s / bandwidth, "load": os.getloadavg()[0]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2-layer encoder and decoders, 1 s of audio, 8 tokens, 1 timed run")
    parser.add_argument("--runs", type=int, help="timed runs per figure (default 5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--models", default="bart,gpt2", help="comma-separated: bart, gpt2")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--benches", default="forward,generate,transcribe",
                        help="comma-separated: forward, generate, transcribe, mesh (1 vs 8 simulated devices), "
                             "compile (unrolled vs scanned layers), encoder (w2v-BERT 2.0's encoder alone), llm (a 1-2 B "
                             "decoder with wav2vec2-large-lv60)")
    parser.add_argument("--llm", choices=LLM_SHAPES, default=LLM_SHAPES[0], help="the llm bench's decoder shape")
    parser.add_argument("--cache-dir", help="llm bench: where the random sources and the composed model are kept "
                        "(default /tmp/benchcache)")
    parser.add_argument("--mesh", action="store_true", help="llm bench: load over a mesh of every device (fsdp)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 5)
    args.audio_seconds = 1.0 if args.quick else 10.0
    args.decoder_tokens = 8 if args.quick else 32
    args.new_tokens = 8 if args.quick else 64
    torch.set_num_threads(args.threads)
    emit({"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "torch": torch.__version__, "device": str(jax.devices()[0]), "quick": args.quick,
          "load": os.getloadavg()[0]})
    builders = {"bart": ("wav2vec2-base+bart-base", bart_base), "gpt2": ("wav2vec2-base+gpt2", gpt2_124m)}
    if "mesh" in args.benches.split(","):
        bench_mesh(args)
    if "compile" in args.benches.split(","):
        bench_compile(args)
    if "encoder" in args.benches.split(","):
        bench_encoder(args)
    if "llm" in args.benches.split(","):
        bench_llm(args)
    if "transcribe" in args.benches:
        bench_transcribe(args)
    for key in args.models.split(","):
        if not {"forward", "generate"} & set(args.benches.split(",")):
            break
        name, decoder = builders[key]
        flax_model, torch_model = build_models(composed_config(decoder(args.quick), args.quick))
        for batch in (int(b) for b in args.batches.split(",")):
            if "forward" in args.benches:
                bench_forward(name, flax_model, torch_model, batch, args)
            if "generate" in args.benches:
                bench_generate(name, flax_model, torch_model, batch, args)
        del flax_model, torch_model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
