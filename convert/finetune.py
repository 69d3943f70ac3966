"""Fine-tune a composed speech encoder-decoder in JAX and write it back in the usual composed format.

    python -m convert.finetune --model DIR --train train.jsonl --eval eval.jsonl --output OUT [options]

Manifests hold one `{"audio": PATH, "text": TRANSCRIPT}` per line (`convert.training_data`). The run follows
transformers' `Seq2SeqTrainer` (labels shifted right into the decoder, mean cross-entropy over real tokens,
`LabelSmoother`, AdamW with linear warmup and decay, global-norm clipping, accumulation normalised over all the
step's tokens) with JAX's means: one compiled step per padded shape, bfloat16 compute over float32 master
weights on request, per-layer rematerialisation on request, dropout / LayerDrop keys and SpecAugment masks drawn
per step from the seed (so a resumed run draws what an uninterrupted one would). Evaluation generates with the
toolkit's generation and scores WER / CER with jiwer. Checkpoints (orbax) go to `OUT.checkpoints/` (or
`--checkpoint-dir`); `--resume` continues from the latest. Ctrl-C saves a checkpoint, then exits 130.
`--mesh data=2,fsdp=4` trains sharded over every device (`flax_model.training.train_step` on a mesh).

At the end OUT holds the fine-tuned model: config.json, flax_model.msgpack and model.safetensors, the generation
config, the tokenizer and preprocessor files of DIR, a model card recording the run (README.md),
`training_report.json`, `train_log.jsonl` and `loss_curve.png`.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: guards interrupts from here on (see convert.cli)

import contextlib
import dataclasses
import json
import math
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from convert.base.errors import ConvertError, UsageError, bad_argument
from convert.finetune_output import (REPORT_FILE, export_leaves, peak_rss_bytes, run_report, training_memory,
                                     write_output)
from convert.finetune_run import Run
from convert.finetune_settings import COMPUTE_DTYPES, LORA_EXPORTS, PRODUCT_FORMS, FinetuneResult, FinetuneSettings
from convert.host_cpu import CHOICES as BFLOAT16_PRODUCTS
from convert.train_checkpoints import (check_checkpoint_directory, checkpoint_manager, remove_partial_step,
                                       verify_checkpoint)


def finetune(
    model: str | Path,
    train: str | Path,
    eval: str | Path,
    output: str | Path,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    log: TextIO | None = None,
    command: str | None = None,
    stop: threading.Event | None = None,
    after_step: Callable[[int], None] | None = None,
    mesh: Any = None,
    max_memory: str | int | None = None,
) -> FinetuneResult:
    """Fine-tunes a composed model directory and writes the result to `output`.

    Args:
        model: a composed checkpoint directory (with the decoder's `tokenizer.json`).
        train, eval: JSON-lines manifests, or `convert.datasets_source.DatasetSource`s (🤗 datasets splits).
        output: the directory to write (atomically, at the end).
        settings: the run's knobs.
        checkpoint_dir: where checkpoints go (default: `<output>.checkpoints` beside `output`).
        resume: continue from the latest checkpoint there.
        overwrite: replace an existing `output` written by this toolkit.
        verify: reload the output and compare Flax with the PyTorch reference before publishing it.
        progress: a progress bar on stderr (when it is a terminal); else a log line per eval / 10% of steps.
        log: where log lines go (stdout by default).
        command: the command line, for the model card.
        stop: when set (Ctrl-C), the run saves a checkpoint after the current step and returns `interrupted`.
        after_step: called with the step number after each step (tests).
        mesh: train sharded: a `jax.sharding.Mesh` (axes among data, fsdp, model) or its text, e.g.
            "data=2,fsdp=4" (over every device; the product of the sizes is the device count). Parameters and
            optimiser state are split as the architectures' partition rules say, each micro-batch's rows over
            `data` (`flax_model.training.train_step`); checkpoints hold the sharded state (each process writes
            its shards) and the export gathers it leaf by leaf.
        max_memory: the memory the run may use ("64GB", or bytes) instead of what the machine has: a training step,
            evaluation batch or data set estimated to need more (`flax_model.memory`) is refused before anything is
            compiled.

    Returns:
        The output directory and the run's report; when interrupted, `interrupted=True`, nothing is written to
        `output`, and the report says which step the checkpoint holds.

    Raises:
        ConvertError / UsageError: one line naming the file, field or option that is wrong.
    """
    from convert.base.outputs import check_output_location, claimed, input_sources
    from convert.base.resources import parse_memory
    from convert.training_data import read_examples

    log = log or sys.stdout
    cli.set_interrupt_note("nothing was trained or written")
    settings.check()
    max_memory = parse_memory(max_memory)
    for name, value in (("resume", resume), ("overwrite", overwrite), ("verify", verify)):
        if not isinstance(value, bool):
            raise bad_argument(name, value, "is not True or False")
    if isinstance(mesh, str):
        from flax_model.sharding import mesh_from_flag

        mesh = mesh_from_flag(mesh)
    output = Path(output)
    model_dir = Path(model)
    check_output_location(output, overwrite=overwrite, sources=(("the model", model_dir),), param="output")
    if not (model_dir / "config.json").is_file():
        raise bad_argument("model", model, "not a composed model directory (no config.json)")
    given = checkpoint_dir is not None
    checkpoint_dir = Path(checkpoint_dir) if given else output.with_name(output.name + ".checkpoints")
    # What the run reads is never written, replaced or removed by it: the model, the manifests, their audio.
    from convert.datasets_source import DatasetSource

    data = (read_examples(train), read_examples(eval))  # manifests, or dataset splits (read once)
    manifests = [m for m in (train, eval) if not isinstance(m, DatasetSource)]
    local = [Path(d.name) for d in (train, eval) if isinstance(d, DatasetSource) and Path(d.name).exists()]
    sources = [("the model", model_dir), *input_sources("a manifest being read", manifests),
               *input_sources("a dataset being read", local),
               *input_sources("an audio file being read",
                              sorted({e.audio for e in data[0] + data[1] if isinstance(e.audio, Path)}))]
    check_output_location(output, overwrite=overwrite, param="output",
                          sources=[*sources, ("the checkpoint directory", checkpoint_dir)])
    check_checkpoint_directory(checkpoint_dir, sources=[*sources, ("the output", output)], resume=resume,
                               param="checkpoint_dir" if given else None)
    from flax_model.sharding import is_writer

    with contextlib.ExitStack() as claims:
        if is_writer():  # one run at a time per output and per checkpoint directory (the others fail at once)
            claims.enter_context(claimed(output, "output"))
            claims.enter_context(claimed(checkpoint_dir, "checkpoint_dir" if given else None))
        return _train_and_export(model_dir, train, eval, output, settings, checkpoint_dir, resume=resume,
                                 overwrite=overwrite, verify=verify, progress=progress, log=log, command=command,
                                 stop=stop, after_step=after_step, mesh=mesh, max_memory=max_memory,
                                 sources=sources, data=data)


def _train_and_export(model_dir: Path, train: str | Path, eval: str | Path, output: Path, settings: FinetuneSettings,
                      checkpoint_dir: Path, *, resume: bool, overwrite: bool, verify: bool, progress: bool,
                      log: TextIO, command: str | None, stop: threading.Event | None,
                      after_step: Callable[[int], None] | None, mesh: Any, max_memory: int | None,
                      sources: list, data: tuple[list, list] | None = None) -> FinetuneResult:
    """The run proper, once its inputs and outputs are checked (see `finetune`).

    Interrupts (with `stop`, as the command passes it): before the first step ends, nothing is worth saving and a
    signal ends the run at once; from then on, while training or saving a checkpoint, the first signal sets `stop`
    (the run saves a checkpoint after the current step and returns `interrupted`) and a second ends it at once;
    after the last checkpoint is saved (the final evaluation, the export, the verification), a signal ends the
    run at once, the temporary output removed and the checkpoint kept.
    """
    import jax

    from convert.base.outputs import atomic_directory, register_cleanup
    from flax_model.training import init_state

    started = time.perf_counter()
    saved: list[int] = []  # steps saved by this run (or resumed from)
    existed = checkpoint_dir.exists()

    def kept() -> str:
        return (f"the checkpoint at step {saved[-1]} in {checkpoint_dir} is kept" if saved
                else "no checkpoint was saved")

    def at_once(note: str) -> None:
        """From here a signal ends the run at once, the interrupt line saying `note`."""
        if stop is not None:
            cli.defer_interrupts(None)
        cli.set_interrupt_note(note)

    def deferred() -> None:
        """From here the first signal sets `stop` (the run saves, then stops); a second ends it at once."""
        if stop is not None and not stop.is_set():
            cli.defer_interrupts(stop.set)
        cli.set_interrupt_note(f"stopped without saving (a second interrupt); {kept()}")

    def remove_if_unused() -> None:
        """The checkpoint directory goes when this run made it and saved nothing in it."""
        if not existed and not saved:
            with contextlib.suppress(OSError):
                checkpoint_dir.rmdir()

    try:
        at_once("nothing was trained or written")
        manager = checkpoint_manager(checkpoint_dir)
        if resume and manager.latest_step() is not None:
            verify_checkpoint(checkpoint_dir, manager.latest_step())  # before the model and the data are read
        run = Run(model_dir, train, eval, settings, checkpoint_dir, mesh, max_memory, data)
        if resume and (manager.latest_step() or 0) > run.total_steps:  # it would be exported as this run's steps
            raise UsageError(f"resume=True: the checkpoint in {checkpoint_dir} is at step {manager.latest_step()}, "
                             f"beyond this run's {run.total_steps} step{'s' * (run.total_steps != 1)} (raise "
                             "max_steps or epochs, or start a fresh run in another checkpoint_dir)", param="resume")
        state = init_state(run.model.params, run.optimizer, run.frozen_fn)
        memory = training_memory(state, run.frozen_fn)
        print(f"training {memory['trainable_parameters']:,} of {memory['parameters']:,} parameters "
              f"({memory['optimizer_state_bytes'] / 2**20:.1f} MiB of optimiser state)", file=log, flush=True)
        if run.untrained_projector_frozen():
            print("note: the projector is as composing initialised it and stays frozen in this run (add "
                  "--train-only projector to train it)", file=log, flush=True)
        if run.products is not None:
            print(f"bfloat16 products: {PRODUCT_FORMS[run.products.form]} ({run.products.reason})", file=log,
                  flush=True)
        history: dict[str, Any] = {"loss": [], "eval": [], "audio_seconds": 0.0, "train_seconds": 0.0}
        if resume and manager.latest_step() is not None:
            state, history = run.restore(manager, state)
            saved.append(int(state.step))
            at_once(kept())
            print(f"resumed from {checkpoint_dir} at step {int(state.step)}", file=log, flush=True)
        else:
            if resume:
                print(f"no checkpoint in {checkpoint_dir}: starting from step 0", file=log, flush=True)
            history["eval"].append({"step": 0, **run.evaluate(state.params)})
            print(f"step 0: WER {history['eval'][-1]['wer']:.3f}, CER {history['eval'][-1]['cer']:.3f}", file=log,
                  flush=True)

        def save() -> None:
            step = int(state.step)
            if step in saved or step == 0:
                return
            # Killed by a second interrupt while saving: what the save had started goes with the process.
            unregister = register_cleanup(lambda: (remove_partial_step(checkpoint_dir, step), remove_if_unused()))
            try:
                run.save(manager, state, history)
            finally:
                unregister()
            saved.append(step)

        bar = None
        if cli.show_progress(progress):
            from tqdm import tqdm

            bar = tqdm(total=run.total_steps, initial=int(state.step), desc="fine-tuning", file=sys.stderr,
                       dynamic_ncols=True)
        interrupted = False
        every = max(1, run.total_steps // 10)
        try:
            while int(state.step) < run.total_steps:
                step = int(state.step)
                tick = time.perf_counter()
                state, loss, seconds = run.step(state, step)
                if not math.isfinite(loss):  # what follows would train on, and export, non-finite weights
                    raise ConvertError(f"step {step + 1}: the training loss is {loss} (not finite): the model may "
                                       "hold non-finite weights, or the learning rate "
                                       f"({settings.learning_rate}) is too high; nothing was written to {output}; "
                                       f"{kept()}")
                jax.block_until_ready(state.params)
                deferred()  # a step is done that no checkpoint holds yet
                elapsed = time.perf_counter() - tick
                history["loss"].append([step + 1, loss])
                history["audio_seconds"] += seconds
                history["train_seconds"] += elapsed
                lr = float(run.schedule(step))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{seconds / elapsed:.1f}")
                    bar.update(1)
                elif (step + 1) % every == 0:
                    print(f"step {step + 1}/{run.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                          f"{seconds / elapsed:.1f} audio-s/s", file=log, flush=True)
                if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < run.total_steps:
                    history["eval"].append({"step": step + 1, **run.evaluate(state.params)})
                    print(f"step {step + 1}: WER {history['eval'][-1]['wer']:.3f}, "
                          f"CER {history['eval'][-1]['cer']:.3f}", file=log, flush=True)
                if settings.save_every and (step + 1) % settings.save_every == 0:
                    save()
                if after_step is not None:
                    after_step(step + 1)
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        save()  # the last step (also when interrupted: the first signal is deferred until this is done)
        if interrupted or (stop is not None and stop.is_set()):
            at_once(kept())
            report = {"interrupted_at_step": int(state.step), "checkpoint_dir": str(checkpoint_dir),
                      "checkpoint_step": saved[-1] if saved else None}
            return FinetuneResult(output, report, interrupted=True)
        at_once(f"{kept()} (run again with --resume to evaluate and export it)")
        if not history["eval"] or history["eval"][-1]["step"] != run.total_steps:
            history["eval"].append({"step": run.total_steps, **run.evaluate(state.params)})
        final = history["eval"][-1]
        print(f"step {run.total_steps}: WER {final['wer']:.3f}, CER {final['cer']:.3f}", file=log, flush=True)
        report = run_report(run, history, model_dir, train, eval, command, time.perf_counter() - started)
        report["memory"] = {**memory, "peak_rss_bytes": peak_rss_bytes()}

        from flax_model.sharding import gathered_leaves, is_writer, sync_processes

        leaves, factors = export_leaves(run, state.params)
        if not is_writer():  # a multi-process run: contribute each leaf's shards to process 0's export, then wait
            for tree in (factors, leaves):  # the writer's order
                for _ in gathered_leaves(tree, sorted(tree)):
                    pass
            sync_processes("finetune export")
            return FinetuneResult(output, report)
        with atomic_directory(output, overwrite=overwrite, sources=[*sources, ("the checkpoint directory",
                                                                               checkpoint_dir)], param="output") as tmp:
            write_output(tmp, run, leaves, factors, history, report)
            if verify:
                if run.prefix:
                    from convert.verify_prefix import verify_prefix_directory as verify_directory
                else:
                    from convert.verify import verify_directory

                report["verification"] = verify_directory(tmp, seed=settings.seed)
                (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
                if not report["verification"].get("passed", False):
                    raise ConvertError(f"verification failed: Flax and the PyTorch reference disagree on the "
                                       f"fine-tuned model; nothing was written to {output}; {kept()}")
        cli.set_interrupt_note(f"{output} was written completely")
        sync_processes("finetune export")
        print(f"wrote {output}: WER {history['eval'][0]['wer']:.3f} -> {final['wer']:.3f} on {len(run.eval)} "
              f"held-out utterances, {run.total_steps} step{'s' * (run.total_steps != 1)} in "
              f"{report['wall_seconds']:.0f} s", file=log, flush=True)
        return FinetuneResult(output, report)
    except BaseException:
        remove_if_unused()
        raise
    finally:
        if stop is not None:
            cli.defer_interrupts(None)


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> cli.ArgumentParser:
    d = FinetuneSettings()
    p = cli.ArgumentParser(
        prog="python -m convert.finetune",
        description="Fine-tune a composed speech encoder-decoder in JAX (AdamW, bucketed batches, checkpoints, "
        "WER/CER evaluation) and write it back in the composed format (Flax msgpack + safetensors).",
        epilog="Manifests: one JSON object per line, {\"audio\": PATH, \"text\": TRANSCRIPT} (relative paths are "
        "relative to the manifest). Ctrl-C saves a checkpoint and exits 130; --resume continues from it. "
        "Example: python -m convert.finetune --model asr --train train.jsonl --eval eval.jsonl --output asr-ft "
        "--max-steps 2000 --learning-rate 3e-4 --warmup-steps 200",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="composed model directory (with tokenizer.json)")
    p.add_argument("--train", metavar="JSONL", help="training manifest (or --dataset)")
    p.add_argument("--eval", metavar="JSONL", help="held-out manifest (WER / CER; or --dataset)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write the fine-tuned model to")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training set")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help="utterances per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help="micro-batches accumulated per optimiser step")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, metavar="LR", help="peak learning rate")
    p.add_argument("--encoder-learning-rate", type=float, metavar="LR",
                   help="the speech encoder's peak learning rate (default: --learning-rate)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N", help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="global-norm clipping (0: none)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing factor")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=d.dtype,
                   help="compute dtype; bfloat16 keeps float32 master weights")
    p.add_argument("--bfloat16-products", choices=BFLOAT16_PRODUCTS, default=d.bfloat16_products,
                   help="with --dtype bfloat16: native (bfloat16 operands, float32 sums), upcast (float32 operands: "
                   "for a CPU without bfloat16 arithmetic, where it is faster) or auto (by the device and the CPU's "
                   "flags)")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (less memory, ~30%% more time)")
    p.add_argument("--scan-layers", action="store_true",
                   help="run each layer stack as one scan in the step: one layer compiled per stack (a shorter "
                   "first step; with --remat, the least memory); the output keeps the per-layer layout")
    p.add_argument("--freeze-feature-encoder", action="store_true", help="do not train the conv feature encoder")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="do not train the speech encoder at all (the decoder, cross-attention and projection train)")
    p.add_argument("--no-spec-augment", dest="spec_augment", action="store_false",
                   help="no SpecAugment masks (by default drawn with the encoder config's probabilities)")
    p.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="train deterministically: no dropout, LayerDrop or SpecAugment")
    p.add_argument("--num-buckets", type=int, default=d.num_buckets, metavar="N",
                   help="distinct padded audio lengths (compiled shapes)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="evaluate every N steps (0: before and after training only)")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                   help="checkpoint every N steps (0: at the end and on Ctrl-C only)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, metavar="N",
                   help="utterances per batch in evaluation")
    p.add_argument("--num-beams", type=int, default=d.num_beams, metavar="N", help="beam width for evaluation")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="most tokens generated in evaluation (default: twice the longest training label, rounded up "
                   "to a multiple of 8, within the decoder's positions)")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help="data order, dropout, SpecAugment and LoRA's initialisation (0 to 4294967295)")
    p.add_argument("--allow-unk", action="store_true",
                   help="train on transcripts with words the tokenizer maps to its unknown token (counted in "
                   "training_report.json); by default they are refused, naming the manifest line and the words")
    p.add_argument("--ctc-weight", type=float, default=d.ctc_weight, metavar="X",
                   help="hybrid CTC/attention: loss X CTC + (1 - X) cross-entropy (the model's CTC head; 0: off)")
    p.add_argument("--eval-ctc-weight", type=float, metavar="X",
                   help="evaluate with joint CTC/attention beam search of CTC weight X (default: attention only)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="train sharded over every device, e.g. data=2,fsdp=4 (axes data, fsdp, model; the product "
                   "of the sizes is the device count): params and optimiser state split over fsdp/model, batches "
                   "over data")
    names = lambda text: tuple(n.strip() for n in text.split(",") if n.strip())  # noqa: E731
    p.add_argument("--train-only", type=names, metavar="GROUP[,GROUP]",
                   help="train only these parameter groups (encoder, decoder, projector, cross-attention, ...; "
                   "an unknown name lists the model's groups); the rest is frozen, with no gradient or optimiser "
                   "state. Default: everything (with LoRA: only the LoRA factors)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA on the --lora-targets layers with rank R")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha; the update is scaled by A/R "
                   "(default: R)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", type=names, default=",".join(d.lora_targets), metavar="NAME[,NAME]",
                   help="module names of the linear layers LoRA adapts (the last part of their PyTorch names, e.g. "
                   "q_proj,v_proj or c_attn; an unknown name lists them) (default: %(default)s)")
    p.add_argument("--lora-parts", type=names, default=",".join(d.lora_parts), metavar="PART[,PART]",
                   help="where LoRA applies: decoder, encoder or both (default: %(default)s)")
    p.add_argument("--lora-export", choices=LORA_EXPORTS, default=d.lora_export,
                   help="merged: the LoRA update folded into the weights (a plain model); adapter: the base "
                   "weights plus a PEFT adapter in OUTPUT/adapter")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the run may use, e.g. 64GB (default: what the machine has); a step, evaluation batch "
                   "or data set estimated to need more is refused before any work")
    from convert.datasets_source import add_arguments

    add_arguments(p.add_argument_group("data from 🤗 datasets (instead of --train / --eval)"),
                  (("--train-split", "train", "the training split"),
                   ("--eval-split", "validation", "the held-out split")),
                  "the transcript")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default: OUTPUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if this toolkit wrote it")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the output's Flax and PyTorch logits")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache: a later run with the same model, settings and batch "
                        "shapes reads its compiled step from DIR (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/speech-encdec-flax/xla/<machine>)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile every program afresh")
    return p


def data_sources(args: Any) -> tuple[Any, Any]:
    """The training and held-out data the flags name: two manifests, or two splits of one dataset."""
    from convert.datasets_source import given_without_dataset, source_from_arguments

    stray = given_without_dataset(args)
    if stray is not None:
        value = True if stray == "streaming" else getattr(args, stray)
        raise bad_argument(stray, value, "applies to --dataset (the data here are the --train / --eval manifests)")
    if args.dataset is None:
        for name in ("train", "eval"):
            if getattr(args, name) is None:
                raise UsageError(f"{name}: a manifest is needed (--{name} FILE.jsonl), or --dataset", param=name)
        return args.train, args.eval
    if args.train is not None or args.eval is not None:
        raise bad_argument("dataset", args.dataset, "replaces --train and --eval (pass one or the other)")
    splits = [getattr(args, name) or args.dataset_split_defaults[name] for name in ("train_split", "eval_split")]
    return source_from_arguments(args, splits[0]), source_from_arguments(args, splits[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        from convert.xla_settings import memory_ordered, order_for_memory

        if memory_ordered(args.scan_layers, args.dtype):
            order_for_memory()  # the command's own process, before JAX starts its backend (XLA reads its flags once)
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    settings = FinetuneSettings(**{k: v for k, v in vars(args).items() if k in names})
    command = shlex.join(["python", "-m", "convert.finetune", *(sys.argv[1:] if argv is None else argv)])
    stop = threading.Event()  # set by the first Ctrl-C while a step or a save is under way (see `finetune`)

    def work() -> int:
        from convert.compile_cache import default_directory, persistent_cache, usable_directory

        cli.set_interrupt_note("nothing was trained or written")  # finetune sets it too; the cache comes first
        if args.no_compile_cache and args.compile_cache is not None:
            raise bad_argument("--compile-cache", args.compile_cache, "goes without --no-compile-cache")
        cache = None if args.no_compile_cache else usable_directory(args.compile_cache or default_directory())
        train, eval_data = data_sources(args)
        with persistent_cache(cache):
            result = finetune(args.model, train, eval_data, args.output, settings,
                              checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                              verify=args.verify, progress=args.progress, command=command, stop=stop,
                              mesh=args.mesh, max_memory=args.max_memory)
        if result.interrupted:
            step = result.report["checkpoint_step"]
            sys.stderr.write(f"interrupted: checkpoint saved at step {step} in {result.report['checkpoint_dir']} "
                             "(continue with --resume)\n" if step is not None
                             else "interrupted: nothing was trained or written\n")
            return cli.EXIT_INTERRUPTED
        return cli.EXIT_OK

    try:
        return cli.run_command(work, parser)
    finally:
        cli.defer_interrupts(None)


if __name__ == "__main__":
    from convert.allocator import keep_freed_memory

    keep_freed_memory()  # before JAX starts its backend: each step then reuses its buffers' pages (no faults)
    cli.run(main)
