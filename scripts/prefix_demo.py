"""The prefix demonstration's comparison (README, "Demonstration: the spoken-digits encoder and a small LM, prefix mode"):
the same prefix-composed pair trained three ways, each run in a process of its own (so that its peak memory is
its own), and one table of what was measured.

    python scripts/prefix_demo.py --model digits-prefix --train spoken/train.jsonl --eval spoken/eval.jsonl \
        --out prefix-runs [--steps 1000] [--batch-size 16] [--runs projector,lora,full]

Runs (`convert.finetune`, the same data order, steps and schedule for all three):

    projector   --train-only projector                                   (SLAM-ASR: encoder and LM frozen)
    lora        --train-only projector --lora-rank 8 --lora-targets ...  (Granite Speech: LoRA on the LM too)
    full        everything (the encoder at a tenth of the rate, as the cross-attention demonstration trained it)

For each: held-out WER and CER before and after, training seconds and wall seconds, trainable and total
parameters, optimiser-state bytes and the process's peak RSS (from `training_report.json`), printed as a
Markdown table and written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "projector": ["--train-only", "projector"],
    "lora": ["--train-only", "projector", "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "{targets}"],
    "full": ["--encoder-learning-rate", "{encoder_lr}"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a prefix-composed directory")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="a directory for the runs' outputs")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--lora-targets", default="c_attn", help="the LM's linear layers LoRA adapts")
    parser.add_argument("--runs", default="projector,lora,full", help="which runs, in order")
    parser.add_argument("--extra", default="", help="more finetune flags for every run (quoted)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.runs.split(","):
        flags = [f.format(targets=args.lora_targets, encoder_lr=args.learning_rate / 10) for f in RUNS[name]]
        output = args.out / name
        command = [sys.executable, "-m", "convert.finetune", "--model", str(args.model), "--train", str(args.train),
                   "--eval", str(args.eval), "--output", str(output), "--max-steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
                   "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.eval_every),
                   "--no-progress", "--overwrite", *flags, *shlex.split(args.extra)]
        print("$ python " + shlex.join(command[1:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        report = json.loads((output / "training_report.json").read_text())
        memory = report["memory"]
        rows.append({
            "run": name, "steps": report["steps"],
            "wer_before": report["eval"][0]["wer"], "wer_after": report["eval"][-1]["wer"],
            "cer_after": report["eval"][-1]["cer"], "train_seconds": report["train_seconds"],
            "process_seconds": round(wall, 1), "trainable_parameters": memory["trainable_parameters"],
            "parameters": memory["parameters"], "optimizer_state_bytes": memory["optimizer_state_bytes"],
            "peak_rss_bytes": memory["peak_rss_bytes"], "command": "python " + shlex.join(command[1:]),
        })
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| run | held-out WER (CER) | training s (process s) | trainable / all parameters | optimiser state | "
          "peak RSS |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['run']} | {100 * r['wer_before']:.1f}% -> {100 * r['wer_after']:.1f}% ({100 * r['cer_after']:.1f}%) "
              f"| {r['train_seconds']:.0f} ({r['process_seconds']:.0f}) | {r['trainable_parameters']:,} / "
              f"{r['parameters']:,} | {r['optimizer_state_bytes'] / 2**20:.2f} MiB | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
