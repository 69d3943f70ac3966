"""Benchmark of one training step: the Flax step in several settings against the PyTorch reference's, in one run.

    python scripts/bench_train.py [--batch 4] [--audio-seconds 10] [--label-tokens 32] [--runs 3]
        [--settings float32,bfloat16,remat,scan,scan+remat,scan+bfloat16] [--device cpu|gpu] [--threads N]
        [--no-freeze] [--layerdrop R] [--quick] [--memory-only] [--profile DIR] [--largest-batch [--max-batch N]]

Model: wav2vec2-base with a BART-base decoder, random, built as `scripts/bench.py` builds it (the same weights in
both frameworks). A step is what `convert.finetune` runs: train mode (dropout, LayerDrop), the loss on labels
shifted into the decoder, the backward pass, global-norm clipping and an AdamW update, the conv feature encoder
frozen (`--no-freeze` trains it too). LayerDrop skips each encoder layer with probability 0.1 at each step, so a
step's time depends on its draws. Flax's keys are fixed per step (each run draws the same); the PyTorch step skips
the layers the first Flax setting's step skips, step by step (found first by a `layerdrop` line's worker), so
that both do the same work; a setting that draws otherwise (the scanned ones: a key per layer) is marked
`same_layers: false` in its `compare` line. `--layerdrop 0` computes every layer in every step. The Flax step is
`flax_model.training`'s (`step_functions`, `train_step`: the gradient function, then the update with the train
state donated). PyTorch: `model.train()`, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`.

Each framework and each Flax setting runs in a process of its own, one after the other, so that each peak
resident memory is its own. A setting joins words with "+": `scan` (the layer stacks as one `nn.scan` each, the
params stacked), `perlayer` (with `scan`: the state kept in HF's per-layer layout and stacked inside the step, as
`convert.finetune --scan-layers` ran it until the twenty-first session), `remat` (every encoder and decoder layer
recomputed in the backward pass), `bfloat16` (compute in bfloat16 over float32 master weights); `float32` alone is
the plain step. `finetune` runs the step of `python -m convert.finetune` itself with the matching flags
(`finetune+scan+bfloat16`: `--scan-layers --dtype bfloat16`) on the bench's model and batch written to disk
(`finetune_worker`): what a user's run does, from the command's own process set-up to its compiled step; it reports
the step times, the first step (compiled afresh) and the peak resident memory of the steps.

Figures, one JSON line each (`load`: the 1-minute load average when taken; above the core count the machine was
busy and the times are inflated):
    step      per framework / setting: the first step (tracing, compilation and the run: what a user waits for),
              the median compiled step (`step_s`) over `--runs` (each in `steps_s`), audio-seconds per second,
              the peak resident memory of the process while training (`peak_rss_gb`, from the model in memory
              through the steps; the resident memory after the compile, `compiled_rss_gb`, and after each step,
              `steps_rss_gb`) and, on a GPU, the peak device memory; the machine's speed before and after the
              steps (`probe_gflops`, `host_probe`) and what a page of fresh memory costs it (`fault_us`,
              `fault_probe`: the first run's faults, and PyTorch's at every step); Flax adds XLA's own account of
              the compiled gradient function (`temp_bytes`: activations and scratch; `argument_bytes`: params and
              batch; `output_bytes`: the gradients) and its compile time.
    layerdrop per Flax setting: the encoder layers its step skips at each step (`dropped`; the PyTorch step's
              record has the ones it skipped).
    compare   per Flax setting against PyTorch: `speedup` (torch step / Flax step), `rss_ratio` (Flax peak RSS /
              PyTorch's), `first_over_step` (Flax's first step / its compiled step), and whether each target
              holds (speedup >= 1.5, rss_ratio <= 1, first_over_step <= 3); `same_layers`: both skipped the
              same layers at every step, and `layers_skipped` over the timed steps; `probe_ratio`: the machine's
              speed while Flax ran over its speed while PyTorch ran (far from 1: the host moved between them).
    largest   with `--largest-batch` (meant for a GPU): the largest batch of `--audio-seconds` utterances whose
              step runs, per framework / setting (doubling from `--batch`, then bisecting; `--max-batch` caps it).

`--memory-only`: XLA's account of each setting's compiled gradient function, nothing run (little memory: usable
on a busy machine at any batch), and its compile time in parts (`trace_s`: JAX tracing the step, `lower_s`,
`xla_compile_s`). `--profile DIR`: one Flax setting (the first) and PyTorch, each profiled over one
compiled step: the time per model part and operation (jax.profiler trace / torch.profiler), XLA's largest buffers
(its memory-usage report, from an HLO dump in DIR) and the PyTorch operators that allocate the most
(docs/training_performance.md reads them). Each Flax process starts as `convert.finetune` does: glibc keeping freed
memory (`--malloc default`: not) and XLA ordering its programs for memory where the command has it
(`convert.xla_settings.memory_ordered`; `--xla-order memory` or `default`: always or never; the
`xla_memory_order` field says which held). A bfloat16 setting computes its products as `convert.finetune
--bfloat16-products auto` does (natively, or upcast to float32 on a CPU without bfloat16 arithmetic:
`convert.host_cpu`); `--bfloat16-products native` or `upcast` forces a form, and the `bfloat16_products` field
says which ran.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTING_WORDS = ("float32", "bfloat16", "remat", "scan", "perlayer", "finetune")
FLAX_DEFAULTS = "float32,bfloat16,remat,scan,scan+remat,scan+bfloat16"
TARGETS = {"speedup": 1.5, "rss_ratio": 1.0, "first_over_step": 3.0}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A Flax step setting: compute dtype, rematerialisation, scanned layers."""

    name: str
    bfloat16: bool = False
    remat: bool = False
    scan: bool = False
    per_layer: bool = False  # with scan: the state per layer, stacked inside the step
    finetune: bool = False  # the step as `python -m convert.finetune` runs it, from a model directory on disk

    @classmethod
    def parse(cls, text: str) -> Setting:
        words = text.split("+")
        unknown = [w for w in words if w not in SETTING_WORDS]
        if unknown or not words:
            raise SystemExit(f"error: --settings {text}: {', '.join(unknown) or 'empty'} is not one of "
                             f"{', '.join(SETTING_WORDS)} (joined with +)")
        if "perlayer" in words and ("scan" not in words or "finetune" in words):
            raise SystemExit(f"error: --settings {text}: perlayer goes with scan, not with finetune (scan+perlayer)")
        return cls(text, "bfloat16" in words, "remat" in words, "scan" in words, "perlayer" in words,
                   "finetune" in words)

    def memory_ordered(self) -> bool:
        """Whether `convert.finetune` runs this setting's step with XLA's programs ordered for memory."""
        from convert.xla_settings import memory_ordered

        return memory_ordered(self.scan, "bfloat16" if self.bfloat16 else "float32")

    def products(self, choice: str) -> str | None:
        """The form of bfloat16 products for `--bfloat16-products choice` as `convert.finetune` decides it, set for
        the programs this process traces (None in float32)."""
        import jax

        from convert.host_cpu import bfloat16_products
        from flax_model.layers import set_bfloat16_products

        if not self.bfloat16:
            return None
        form = bfloat16_products(choice, platform_name=jax.default_backend()).form  # choice: argparse's CHOICES
        set_bfloat16_products(form)
        return form

    def module(self, config: Any) -> Any:
        """The composed model's module in this setting."""
        import jax.numpy as jnp

        from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule

        return SpeechEncoderDecoderModule(config, dtype=jnp.bfloat16 if self.bfloat16 else jnp.float32,
                                          remat=self.remat, scan_layers=self.scan)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def step_figures(times: list[float], audio_s: float) -> dict[str, Any]:
    """The compiled steps' figures from every step's time (the first, which compiles or warms up, left out)."""
    step_s = statistics.median(times[1:])
    return {"step_s": step_s, "steps_s": [round(t, 3) for t in times[1:]], "audio_s_per_s": audio_s / step_s}


def host_probe() -> float:
    """The machine's speed now: GFLOP/s of a fixed float32 product in NumPy (four 2048 x 2048 products, best of
    5). On a shared host the same code runs at different speeds from one process to the next, which the load
    average does not show; each worker probes before and after its steps."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - started)
    return round(4 * 2 * 2048**3 / best / 1e9, 1)


def fault_probe() -> float:
    """What memory touched for the first time costs the machine now: microseconds of kernel time per page
    faulted in (64 MiB of fresh anonymous memory, each page written once). The first run of a compiled step faults
    in its XLA temporaries and gradients, and PyTorch's steps their activations; on a virtual machine that hands
    freed memory back to its host (free page reporting) each such fault costs the host's work too, from ~1 to
    ~15 us a page from one hour to the next. Each worker probes it beside the host's speed (`fault_us`)."""
    import mmap
    import resource

    import numpy as np

    region = mmap.mmap(-1, 64 << 20)
    view = np.frombuffer(region, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF)
    view[::mmap.PAGESIZE] = 1
    after = resource.getrusage(resource.RUSAGE_SELF)
    del view
    region.close()
    return round((after.ru_stime - before.ru_stime) * 1e6 / max(after.ru_minflt - before.ru_minflt, 1), 2)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()}), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Resident memory of this process


def reset_peak_rss() -> bool:
    """Resets the kernel's record of this process's peak resident memory (Linux: `/proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """The peak resident memory since `reset_peak_rss` (VmHWM), else since the process started."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class StepCounters:
    """The process's kernel CPU seconds and minor page faults over each timed step: what the step pays the kernel
    for memory it maps afresh (every first touch of a page is a fault, and the kernel zeroes the page)."""

    def __init__(self) -> None:
        self.sys_s: list[float] = []
        self.user_s: list[float] = []
        self.faults: list[int] = []

    @contextlib.contextmanager
    def step(self):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF)
        yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.sys_s.append(after.ru_stime - before.ru_stime)
        self.user_s.append(after.ru_utime - before.ru_utime)
        self.faults.append(after.ru_minflt - before.ru_minflt)

    def record(self) -> dict[str, float]:
        """Medians over the steps after the first, and the first's own (its run, after compilation)."""
        return {"step_sys_s": statistics.median(self.sys_s[1:]), "step_page_faults": statistics.median(self.faults[1:]),
                "step_user_s": statistics.median(self.user_s[1:]), "first_run_sys_s": self.sys_s[0],
                "first_run_user_s": self.user_s[0], "first_run_page_faults": self.faults[0]}


def rss_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


# ----------------------------------------------------------------------------------------------------------
# The batch


def bench_batch(config: Any, batch: int, audio_seconds: float, label_tokens: int) -> dict[str, Any]:
    """Numpy inputs: `batch_inputs`' padded audio, labels with a padded last row, and the seconds of real audio."""
    import numpy as np

    from scripts.bench import SAMPLE_RATE, batch_inputs

    audio, mask = batch_inputs(batch, audio_seconds)
    rng = np.random.default_rng(2)
    labels = rng.integers(4, config.decoder.vocab_size, (batch, label_tokens))
    labels[-1, int(0.75 * label_tokens):] = -100  # a padded row, as in a real batch
    return {"inputs": audio, "attention_mask": mask, "labels": labels.astype(np.int32),
            "audio_s": float(mask.sum()) / SAMPLE_RATE}


def model_config(args: argparse.Namespace) -> Any:
    from scripts.bench import bart_base, composed_config

    config = composed_config(bart_base(args.quick), args.quick)
    if args.layerdrop is not None:
        config = dataclasses.replace(config, encoder=config.encoder.replace(layerdrop=args.layerdrop))
    return config


# ----------------------------------------------------------------------------------------------------------
# Workers: one framework / setting per process


def flax_worker(args: argparse.Namespace, setting: Setting) -> dict[str, Any]:
    from convert.allocator import keep_freed_memory

    from convert.xla_settings import order_for_memory

    kept = keep_freed_memory() if args.malloc == "kept" else False  # before JAX starts (as convert.finetune does)
    if args.xla_order == "memory" or (args.xla_order == "finetune" and setting.memory_ordered()):
        order_for_memory()
    if setting.finetune:
        return finetune_worker(args, setting, kept)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_model.speech_encoder_decoder import stack_params
    from flax_model.training import (
        OptimizerSettings,
        buffer_paths,
        collector_paused,
        compile_first_step,
        frozen_predicate,
        init_state,
        leaf_labels,
        make_optimizer,
        step_functions,
        step_key,
        train_step,
    )
    from scripts.bench import random_params

    products = setting.products(args.bfloat16_products)
    config = model_config(args)
    data = bench_batch(config, args.batch, args.audio_seconds, args.label_tokens)
    batch = {k: data[k] for k in ("inputs", "attention_mask", "labels")}
    params = random_params(config)
    if setting.scan and not setting.per_layer:
        params = stack_params(config, params)
    optimizer = make_optimizer(
        OptimizerSettings(learning_rate=1e-4, total_steps=1000, warmup_steps=10, weight_decay=0.01),
        leaf_labels(params, frozen_predicate(args.freeze, buffer_paths(config, params))))
    module = setting.module(config)
    fns = step_functions(module, optimizer, deterministic=False, freeze_feature_encoder=args.freeze)
    record: dict[str, Any] = {"bench": "step", "framework": "flax", "setting": setting.name,
                              "device": str(jax.devices()[0].platform), "batch": args.batch, "malloc_kept": kept,
                              "xla_memory_order": xla_memory_order(), "bfloat16_products": products,
                              "audio_s": data["audio_s"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    example = (params, device_batch, step_key(0, 0), np.float32(0.0))
    if args.memory_only:
        with collector_paused():  # as train_step's first call traces and compiles
            started = time.perf_counter()
            traced = fns.grad.trace(*example)
            traced_at = time.perf_counter()
            lowered = traced.lower()
            lowered_at = time.perf_counter()
            compiled = lowered.compile()
            done = time.perf_counter()
        return {**record, "compile_s": done - started, "trace_s": traced_at - started,
                "lower_s": lowered_at - traced_at, "xla_compile_s": done - lowered_at, **xla_memory(compiled),
                "load": load()}

    state = init_state(params, optimizer)
    del params
    example = (state.params, *example[1:])
    record["setup_rss_gb"] = rss_gb()
    probe, faults = host_probe(), fault_probe()
    reset_peak_rss()
    # Compiled ahead of time as train_step's first call compiles it (compile_first_step: the update lowered, then
    # compiled in a thread while the gradient is traced and compiled), so that XLA's account of it is read.
    started = time.perf_counter()
    grad, _ = compile_first_step(fns, state, *example)
    compile_s = time.perf_counter() - started
    fns = dataclasses.replace(fns, grad=grad)
    del example
    record["compiled_rss_gb"] = rss_gb()
    times, counters, resident = [], StepCounters(), []
    for step in range(1 + max(1, args.runs)):
        if step == 1 and args.profile:
            profile_flax(args.profile, fns, state, batch, grad)
        started = time.perf_counter()
        with counters.step():
            state, objective, tokens = train_step(fns, state, [(batch, step_key(0, step))])
            jax.block_until_ready(state.params)
        times.append(time.perf_counter() - started)
        resident.append(round(rss_gb(), 3))
    record["steps_rss_gb"] = resident
    record.update({"first_step_s": compile_s + times[0], "compile_s": compile_s, "first_run_s": times[0],
                   **step_figures(times, data["audio_s"]), "loss": objective / tokens,
                   "peak_rss_gb": peak_rss_gb(), **counters.record(), **xla_memory(grad)})
    record["probe_gflops"] = [probe, host_probe()]
    record["fault_us"] = [faults, fault_probe()]
    if record["device"] != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        record["peak_device_gb"] = stats.get("peak_bytes_in_use", float("nan")) / 1e9
    return {**record, "load": load()}


def xla_memory_order() -> bool:
    """Whether this process's XLA orders its programs for memory (`convert.xla_settings`)."""
    from convert.xla_settings import FLAG

    return f"{FLAG}=false" in os.environ.get("XLA_FLAGS", "")


def finetune_files(args: argparse.Namespace, directory: Path) -> None:
    """What `finetune_worker` trains on, written into `directory`: the bench's model (`model/`: the random params
    with the built-in BART's tokenizer and the built-in model's preprocessor and generation configs; label ids
    stay within BART-base's vocabulary), the bench batch's utterances as 16 kHz float WAV files (`train.jsonl`,
    transcripts of about `--label-tokens` tokens) and one held-out 1 s utterance (`eval.jsonl`)."""
    import io
    import shutil

    import numpy as np
    import soundfile

    from convert.compose import compose
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
    from scripts.bench import SAMPLE_RATE, batch_inputs, random_params

    config = model_config(args)
    FlaxSpeechEncoderDecoderModel(config, random_params(config)).save_pretrained(directory / "model")
    compose("wav2vec2", "bart", directory / "builtin", verify=False, progress=False, log=io.StringIO())
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        if (directory / "builtin" / name).is_file():
            shutil.copyfile(directory / "builtin" / name, directory / "model" / name)
    audio, mask = batch_inputs(args.batch, args.audio_seconds)
    words = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero")
    rng = np.random.default_rng(2)
    for name, rows in (("train", [a[m.astype(bool)] for a, m in zip(audio, mask)]),
                       ("eval", [audio[0, :SAMPLE_RATE]])):
        with (directory / f"{name}.jsonl").open("w") as f:
            for i, row in enumerate(rows):
                soundfile.write(directory / f"{name}{i}.wav", row, SAMPLE_RATE, subtype="FLOAT")
                text = " ".join(rng.choice(words, max(1, args.label_tokens // 3)))
                f.write(json.dumps({"audio": f"{name}{i}.wav", "text": text}) + "\n")


def finetune_worker(args: argparse.Namespace, setting: Setting, kept: bool) -> dict[str, Any]:
    """The step of `python -m convert.finetune` itself (this process started as the command starts: glibc keeping
    freed memory, XLA's order): `finetune_files`' model and batch, one batch per step (`--batch-size` the bench's
    batch, one length bucket), train mode without SpecAugment (the reference has none), `--runs` + 1 steps, each
    `Run.step` call timed (the first compiles: `--no-compile-cache`, so that it compiles as a first run does). The
    peak resident memory is the steps' (reset before the first, read after the last: loading and the evaluations
    are left out, as the other workers leave out their set-up)."""
    import shutil
    import tempfile

    import jax

    from convert import finetune, finetune_run

    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        shape = ["--batch", str(args.batch), "--audio-seconds", str(args.audio_seconds), "--label-tokens",
                 str(args.label_tokens), *(["--quick"] if args.quick else []),
                 *([] if args.layerdrop is None else ["--layerdrop", str(args.layerdrop)])]
        files = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "finetune-files",
                                "--files", str(work), *shape], capture_output=True, text=True)
        if files.returncode != 0:
            raise RuntimeError(f"finetune-files: {(files.stderr.strip().splitlines() or ['(no message)'])[-1]}")
        times: list[float] = []
        resident: list[float] = []
        peak = 0.0  # the high-water mark since the first step, after the latest
        step = finetune_run.Run.step

        def timed(run: Any, state: Any, number: int) -> Any:
            nonlocal peak
            if number == 0:
                reset_peak_rss()
            started = time.perf_counter()
            out = step(run, state, number)
            jax.block_until_ready(out[0].params)
            times.append(time.perf_counter() - started)
            resident.append(round(rss_gb(), 3))
            peak = peak_rss_gb()
            return out

        finetune_run.Run.step = timed
        probe, faults = host_probe(), fault_probe()
        flags = (["--scan-layers"] if setting.scan else []) + (["--remat"] if setting.remat else []) + (
            ["--dtype", "bfloat16", "--bfloat16-products", args.bfloat16_products] if setting.bfloat16 else []) + (
            ["--freeze-feature-encoder"] if args.freeze else [])
        argv = ["--model", str(work / "model"), "--train", str(work / "train.jsonl"), "--eval", str(work / "eval.jsonl"),
                "--output", str(work / "out"), "--max-steps", str(1 + max(1, args.runs)), "--batch-size", str(args.batch),
                "--num-buckets", "1", "--eval-batch-size", "1", "--max-new-tokens", "1", "--no-spec-augment",
                "--no-verify", "--no-progress", "--no-compile-cache", *flags]
        with contextlib.redirect_stdout(sys.stderr):
            code = finetune.main(argv)
        if code != 0:
            raise RuntimeError(f"convert.finetune exited {code}")
        report = json.loads((work / "out" / finetune.REPORT_FILE).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from scripts.bench import SAMPLE_RATE, batch_inputs

    audio_s = float(batch_inputs(args.batch, args.audio_seconds)[1].sum()) / SAMPLE_RATE  # the training audio
    return {"bench": "step", "framework": "flax", "setting": setting.name, "device": str(jax.devices()[0].platform),
            "batch": args.batch, "malloc_kept": kept, "command": "python -m convert.finetune " + " ".join(flags),
            "xla_memory_order": xla_memory_order(), "bfloat16_products": report["bfloat16_products"], "audio_s": audio_s,
            "first_step_s": times[0], **step_figures(times, audio_s), "loss": report["final_loss"],
            "peak_rss_gb": peak, "steps_rss_gb": resident, "probe_gflops": [probe, host_probe()],
            "fault_us": [faults, fault_probe()], "load": load()}


def xla_memory(compiled: Any) -> dict[str, int]:
    """XLA's account of the compiled gradient function: its buffers, and the floating-point operations of its
    HLO (`xla_gflop`; each conditional's costliest branch, a loop's body once per trip where XLA knows the count)."""
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes), "xla_gflop": float(cost.get("flops", float("nan"))) / 1e9}


def layerdrop_worker(args: argparse.Namespace, settings: list[Setting]) -> list[dict[str, Any]]:
    """Which encoder layers each Flax setting's step skips at each of the bench's steps (LayerDrop, keys
    `step_key(0, step)`): the setting's model forward (`loss_sums`, jitted) on a one-utterance batch with the
    encoder stack's `layer_drop` wrapped to report each draw. A draw depends on the key and the module's path,
    not on the batch (an unrolled stack draws from its own stream, a scanned one from each layer's)."""
    import jax
    import numpy as np

    import flax_model.wav2vec2 as encoder_module
    from flax_model.speech_encoder_decoder import stack_params
    from flax_model.training import step_key
    from scripts.bench import random_params

    config = model_config(args)
    params = random_params(config)
    samples = 4000  # 0.25 s: a few frames
    batch = (np.zeros((1, samples), np.float32), np.ones((1, samples), np.int32), np.full((1, 2), 5, np.int32))
    draws: list[bool] = []
    original = encoder_module.layer_drop

    def reported(module: Any, rate: float, deterministic: bool) -> Any:
        drop = original(module, rate, deterministic)
        if not isinstance(drop, bool):
            jax.debug.callback(lambda value: draws.append(bool(value)), drop, ordered=True)
        return drop

    records = []
    encoder_module.layer_drop = reported
    try:
        for setting in settings:
            module = setting.module(config)
            forward = jax.jit(lambda p, key, m=module: m.apply(
                {"params": p}, *batch, False, args.freeze, method="loss_sums", rngs={"dropout": key}))
            weights = stack_params(config, params) if setting.scan else params
            dropped = []
            for step in range(1 + max(1, args.runs)):
                draws.clear()
                jax.block_until_ready(forward(weights, step_key(0, step)))
                jax.effects_barrier()
                if len(draws) != config.encoder.num_hidden_layers:
                    raise RuntimeError(f"{setting.name}: {len(draws)} LayerDrop draws at step {step}, expected "
                                       f"{config.encoder.num_hidden_layers}")
                dropped.append([i for i, drop in enumerate(draws) if drop])
            records.append({"bench": "layerdrop", "setting": setting.name, "dropped": dropped})
    finally:
        encoder_module.layer_drop = original
    return records


class LayerDropSchedule:
    """The PyTorch reference's LayerDrop made to skip given layers (`dropped[step]`, layer indices) instead of
    drawing, or to draw as transformers does (no schedule); either way it records what each step skipped."""

    def __init__(self, dropped: list[list[int]] | None, layers: int) -> None:
        from torch_reference.layers import layer_drop

        self.given, self.layers, self.draw = dropped, layers, layer_drop
        self.dropped: list[list[int]] = []
        self.calls = 0

    def start_step(self) -> None:
        if self.dropped and self.calls != self.layers:
            raise RuntimeError(f"LayerDrop asked {self.calls} times in a step, expected {self.layers}")
        self.dropped.append([])
        self.calls = 0

    def __call__(self, training: bool, rate: float) -> bool:
        step, layer = len(self.dropped) - 1, self.calls
        self.calls += 1
        if self.given is not None and step < len(self.given):
            drop = training and rate > 0.0 and layer in self.given[step]
        else:
            drop = self.draw(training, rate)
        if drop:
            self.dropped[-1].append(layer)
        return drop


def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    from convert.allocator import keep_freed_memory

    kept = keep_freed_memory() if args.torch_malloc == "kept" else False
    import jax
    import torch

    from scripts.bench import random_params, reference_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same dropout and LayerDrop draws in every run
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    config = model_config(args)
    data = bench_batch(config, args.batch, args.audio_seconds, args.label_tokens)
    params = random_params(config)
    model = reference_model(config, params).to(device).train()
    del params
    jax.clear_caches()
    if args.freeze:
        model.freeze_feature_encoder()
    import torch_reference.wav2vec2

    schedule = LayerDropSchedule(json.loads(args.layerdrop_schedule) if args.layerdrop_schedule else None,
                                 config.encoder.num_hidden_layers)
    torch_reference.wav2vec2.layer_drop = schedule  # the encoder stack's LayerDrop (wav2vec2-base)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.01)
    inputs, mask, labels = (torch.from_numpy(data[k]).to(device) for k in ("inputs", "attention_mask", "labels"))

    def step() -> float:
        schedule.start_step()
        loss = model.loss(inputs, mask, labels.long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    record: dict[str, Any] = {"bench": "step", "framework": "torch", "setting": "reference", "device": args.device,
                              "malloc_kept": kept, "batch": args.batch, "audio_s": data["audio_s"],
                              "setup_rss_gb": rss_gb()}
    probe, faults = host_probe(), fault_probe()
    reset_peak_rss()
    times, counters, resident = [], StepCounters(), []
    for i in range(1 + max(1, args.runs)):
        if i == 1 and args.profile:
            profile_torch(args.profile, step)
        started = time.perf_counter()
        with counters.step():
            loss = step()
        times.append(time.perf_counter() - started)
        resident.append(round(rss_gb(), 3))
    record.update({"first_step_s": times[0], **step_figures(times, data["audio_s"]), "steps_rss_gb": resident,
                   "loss": loss, "peak_rss_gb": peak_rss_gb(), **counters.record(),
                   "layerdrop_given": schedule.given is not None, "dropped": schedule.dropped})
    record["probe_gflops"] = [probe, host_probe()]
    record["fault_us"] = [faults, fault_probe()]
    if device.type == "cuda":
        record["peak_device_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return {**record, "load": load()}


# ----------------------------------------------------------------------------------------------------------
# Profiles


def profile_flax(directory: str, fns: Any, state: Any, batch: dict[str, Any], grad: Any) -> None:
    """One compiled step under jax.profiler: milliseconds per model part and operation (from the HLO's source
    metadata), then XLA's largest buffers of the gradient function (its memory-usage report)."""
    import jax
    from jax.profiler import ProfileData

    from flax_model.training import step_key

    out = Path(directory)
    trace = out / "jax_trace"
    names = hlo_sources(grad.as_text())
    jax.profiler.start_trace(str(trace))
    jax.block_until_ready(grad(state.params, {k: jax.numpy.asarray(v) for k, v in batch.items()}, step_key(0, 99),
                               jax.numpy.float32(0.0)))
    jax.profiler.stop_trace()
    totals: collections.Counter = collections.Counter()
    for path in sorted(trace.rglob("*.xplane.pb"))[-1:]:
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in names:
                        totals[names[event.name]] += event.duration_ns
    overall = sum(totals.values())
    for part, ns in totals.most_common(25):
        emit({"bench": "profile", "framework": "flax", "where": part, "ms": ns / 1e6, "share": ns / max(overall, 1)})
    reports = sorted(out.glob("xla_dump/*jit_run*memory-usage-report.txt"), key=lambda p: p.stat().st_size)
    if reports:
        for size, values in largest_buffers(reports[-1].read_text())[:15]:
            emit({"bench": "buffer", "framework": "flax", "mib": size, "holds": values})


def hlo_sources(hlo: str) -> dict[str, str]:
    """HLO instruction name -> "fwd|bwd <model part>: <op>" from its source metadata, or "no source: <kind>" (the
    name without its number) for an instruction XLA made without metadata (a fusion of its own passes')."""
    found = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", line)
        if match:
            found[match.group(1)] = source_part(match.group(2))
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (?:fusion|copy|custom-call|convert)\(", line)
        if match:
            found[match.group(1)] = "no source: " + re.sub(r"[.]\d+$", "", match.group(1))
    return found


def source_part(op_name: str) -> str:
    kind = "bwd" if "transpose(" in op_name else "fwd"
    op_name = re.sub(r"(jvp|transpose|checkpoint|remat|vmap|jit)\(([^)]*)\)", r"\2", op_name)
    parts = [p for p in op_name.split("/") if p]
    path = [p for p in parts[:-1] if not re.match(r"(while|body|closed_call|cond|run|loss_sums)$", p)
            and not p.startswith("SpeechEncoderDecoderModule")]
    path = [re.sub(r"^\d+$", "*", p) for p in path]
    return f"{kind} {'/'.join(path[:5]) or '-'}: {parts[-1] if parts else '?'}"


def largest_buffers(report: str) -> list[tuple[float, str]]:
    """(MiB, the values that share the allocation) of an XLA memory-usage report's first table."""
    rows = []
    for line in report.split("\n\n")[0].splitlines():
        match = re.match(r"\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.*)", line)
        if match:
            scale = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}.get(match.group(2), 1.0)
            rows.append((float(match.group(1)) * scale, match.group(3)))
    return rows


def profile_torch(directory: str, step: Any) -> None:
    """One step under torch.profiler: the operators that take the most time and that allocate the most."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.key_averages()
    overall = sum(e.self_cpu_time_total for e in events)
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        emit({"bench": "profile", "framework": "torch", "where": event.key, "ms": event.self_cpu_time_total / 1e3,
              "share": event.self_cpu_time_total / max(overall, 1), "calls": event.count})
    for event in sorted(events, key=lambda e: -e.cpu_memory_usage)[:10]:
        emit({"bench": "buffer", "framework": "torch", "op": event.key, "allocated_gb": event.cpu_memory_usage / 1e9})
    Path(directory).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(Path(directory) / "torch_trace.json"))


# ----------------------------------------------------------------------------------------------------------
# The parent: runs the workers, compares


def layerdrop_draws(args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """Setting name -> the encoder layers its step skips at each step (`layerdrop_worker`, in a process of its
    own); empty where LayerDrop is off, or where the worker failed (PyTorch then draws its own)."""
    if args.layerdrop == 0:
        return {}
    records = run_worker(args, "layerdrop") or []
    for record in records:
        emit(record)
    return {r["setting"]: r["dropped"] for r in records if r.get("bench") == "layerdrop"}


def run_worker(args: argparse.Namespace, worker: str, batch: int | None = None,
               extra: list[str] | None = None) -> list[dict[str, Any]] | None:
    """Runs one worker process; its JSON lines, or None when it failed (its last error line is reported)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *args.forward, *(extra or [])]
    if batch is not None:  # the largest-batch search: does one step run
        command += ["--batch", str(batch), "--runs", "1"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    # PyTorch's worker draws the weights with JAX on the CPU.
    env["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" and worker != "torch" else "cpu"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the peak device memory is then what the step uses
    if args.profile and worker != "torch":
        dump = Path(args.profile) / "xla_dump"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*run.*").strip()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    records = []
    for line in done.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    if done.returncode != 0:
        error = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no message)"]
        emit({"bench": "failed", "worker": worker, "batch": batch or args.batch, "exit": done.returncode,
              "error": error[0][:300], "load": load()})
        return None
    return records


def largest_batch(args: argparse.Namespace, worker: str) -> int:
    """The largest batch whose step runs: doubling from --batch, then bisecting (at most --max-batch)."""
    works, fails = 0, None
    size = args.batch
    while size <= args.max_batch:
        if run_worker(args, worker, size) is None:
            fails = size
            break
        works, size = size, size * 2
    if fails is None:
        return works
    while fails - works > 1:
        middle = (works + fails) // 2
        works, fails = (middle, fails) if run_worker(args, worker, middle) is not None else (works, middle)
    return works


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers per stack (a smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="compiled steps timed (the median is reported)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--label-tokens", type=int, default=32)
    parser.add_argument("--settings", default=FLAX_DEFAULTS,
                        help="Flax settings, comma-separated; words float32, bfloat16, remat, scan, perlayer "
                             "joined with +")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's intra-op threads")
    parser.add_argument("--no-freeze", dest="freeze", action="store_false", help="train the conv feature encoder too")
    parser.add_argument("--layerdrop", type=float, default=None,
                        help="the encoder's LayerDrop rate (default: wav2vec2-base's 0.1); 0: every step computes "
                             "every layer in both frameworks")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="Flax only")
    parser.add_argument("--malloc", choices=("kept", "default"), default="kept",
                        help="Flax processes: glibc keeps freed memory (convert.allocator, as convert.finetune runs) "
                             "or its defaults")
    parser.add_argument("--xla-order", choices=("finetune", "memory", "default"), default="finetune",
                        help="Flax processes: XLA orders the programs as convert.finetune has it (for memory when "
                             "scanned or in bfloat16: convert.xla_settings), for memory, or by its default order")
    parser.add_argument("--torch-malloc", choices=("default", "kept"), default="default",
                        help="the PyTorch process: glibc's defaults (as PyTorch runs) or the same settings")
    from convert.host_cpu import CHOICES

    parser.add_argument("--bfloat16-products", choices=CHOICES, default="auto",
                        help="bfloat16 settings: how the products are computed, as convert.finetune's flag (auto: by "
                             "the device and the CPU's flags)")
    parser.add_argument("--memory-only", action="store_true", help="XLA's memory account of each setting only")
    parser.add_argument("--profile", metavar="DIR", help="profile the first setting and PyTorch (traces in DIR)")
    parser.add_argument("--largest-batch", action="store_true", help="search the largest batch that runs")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)  # finetune-files: where to write
    parser.add_argument("--layerdrop-schedule", help=argparse.SUPPRESS)  # PyTorch's: the layers each step skips
    args, _ = parser.parse_known_args(argv)
    settings = [Setting.parse(text) for text in args.settings.split(",") if text]
    for flag, given in (("--memory-only", args.memory_only), ("--profile", args.profile)):
        if given and any(s.finetune for s in settings):
            raise SystemExit(f"error: {flag}: not for the finetune settings (they run the command itself); name the "
                             "setting without finetune (its step is the same)")

    if args.worker == "layerdrop":
        for record in layerdrop_worker(args, settings):
            emit(record)
        return 0
    if args.worker == "finetune-files":
        finetune_files(args, Path(args.files))
        return 0
    if args.worker:
        record = torch_worker(args) if args.worker == "torch" else flax_worker(args, Setting.parse(args.worker))
        emit(record)
        return 0

    given = list(sys.argv[1:] if argv is None else argv)
    args.forward = [a for a in given if not a.startswith("--largest-batch")]
    if args.profile:
        settings = settings[:1]
        args.runs = 1
    emit({"bench": "machine", "device": args.device, "cpus": os.cpu_count(), "threads": args.threads,
          "batch": args.batch, "audio_seconds": args.audio_seconds, "quick": args.quick, "load": load()})
    results: dict[str, dict[str, Any]] = {}
    workers = ([] if args.memory_only or not args.torch else ["torch"]) + [s.name for s in settings]
    dropped = layerdrop_draws(args) if "torch" in workers and not args.profile else {}
    for worker in workers:
        # PyTorch skips the layers the first Flax setting's step skips, step by step: the same work in both.
        given = ["--layerdrop-schedule", json.dumps(dropped[settings[0].name])] if worker == "torch" and dropped else []
        records = run_worker(args, worker, extra=given)
        for record in records or []:
            if record.get("bench") == "step":
                results[worker] = record
            emit(record)
    reference = results.get("torch")
    for setting in settings:
        flax = results.get(setting.name)
        if not reference or not flax or "step_s" not in flax:
            continue
        figures = {"speedup": reference["step_s"] / flax["step_s"],
                   "rss_ratio": flax["peak_rss_gb"] / reference["peak_rss_gb"],
                   "first_over_step": flax["first_step_s"] / flax["step_s"]}
        met = {f"{k}_met": (v >= TARGETS[k] if k == "speedup" else v <= TARGETS[k]) for k, v in figures.items()}
        same = {}
        if setting.name in dropped:  # whether both frameworks computed the same layers at every step
            same = {"same_layers": dropped[setting.name] == reference["dropped"],
                    "layers_skipped": sum(map(len, dropped[setting.name][1:]))}
        # the machine's speed while Flax ran over its speed while PyTorch ran (1: a like-for-like host)
        probe = statistics.mean(flax["probe_gflops"]) / statistics.mean(reference["probe_gflops"])
        emit({"bench": "compare", "setting": setting.name, **figures, **met, **same, "probe_ratio": probe,
              "load": load()})
    if args.largest_batch:
        for worker in workers:
            emit({"bench": "largest", "worker": worker, "audio_seconds": args.audio_seconds,
                  "batch": largest_batch(args, worker), "load": load()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
