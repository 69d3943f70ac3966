"""Benchmark of sharded loading: peak host memory of each process against the model's size ÷ the process count.

    python scripts/bench_sharding.py --cache-dir DIR [--quick] [--format msgpack|safetensors] [--port 12400]

Composes a random wav2vec2-base + BART-base checkpoint (float32, 0.76 GB; `--quick`: a few MB) from
`scripts/bench_convert.py`'s sources, cached in `--cache-dir`, then loads it in fresh processes:

* `plain`: `FlaxSpeechEncoderDecoderModel.from_pretrained(dir)`, one process, one device;
* `sharded PxD`: P processes (`jax.distributed.initialize`, a localhost coordinator, gloo collectives) with D
  simulated CPU devices each (`XLA_FLAGS=--xla_force_host_platform_device_count=D`), every leaf split over an
  `fsdp` axis of all P*D devices (`flax_model.sharding.load_sharded`);
* `baseline PxD`: the same processes, imports, runtime and mesh, loading nothing: the fixed overhead.

On CPU the devices' buffers live in host memory, so a process's peak RSS counts the shards it holds (about the
model ÷ P, plus the leaves too small to split, once per local device) as well as any host copy. One JSON line per
run (each process's peak RSS from /proc/self/status VmHWM, its bytes read, the bytes its devices hold, wall time),
then a markdown table on stderr with (peak RSS - baseline) ÷ (model ÷ P): at most 1 plus a small fixed
overhead means no process made a full host copy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1e6
RUNS = ((1, 8), (2, 4), (4, 2))  # (processes, devices per process)


def build_model(cache_dir: Path, quick: bool) -> Path:
    """The composed checkpoint (once; reused when present)."""
    from scripts.bench_convert import build_source

    encoder, decoder = ("wav2vec2-small", "bart-small") if quick else ("wav2vec2-base", "bart-base")
    out = cache_dir / f"composed-{encoder}+{decoder}"
    if not (out / "config.json").is_file():
        from convert.compose import compose

        compose(str(build_source(encoder, cache_dir)), str(build_source(decoder, cache_dir)), out, verify=False,
                progress=False, log=io.StringIO())
    return out


# --------------------------------------------------------------------------------------------------------
# One measured process


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, model: Path, process_id: int, processes: int, port: int, prefer: str) -> dict[str, Any]:
    import jax
    import numpy as np

    if processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process_id)
    from flax import traverse_util
    from jax.sharding import Mesh

    from convert.base.checkpoint import FLAX_FIRST, SAFETENSORS
    from flax_model.sharding import load_sharded
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes

    order = FLAX_FIRST if prefer == "msgpack" else (SAFETENSORS,)
    started = time.perf_counter()
    result: dict[str, Any] = {"process": process_id, "devices": len(jax.local_devices())}
    if kind == "plain":
        loaded = FlaxSpeechEncoderDecoderModel.from_pretrained(model)
        leaves = traverse_util.flatten_dict(loaded.params, sep="/").values()
    else:
        mesh = Mesh(np.array(jax.devices()), ("fsdp",))
        if kind == "baseline":
            leaves = []
        else:
            sharded = load_sharded(model, mesh, param_shapes, prefer=order)
            leaves = traverse_util.flatten_dict(sharded.params, sep="/").values()
            result["bytes_read"] = sharded.bytes_read
    leaves = list(leaves)
    for leaf in leaves:
        leaf.block_until_ready()
    result["held_bytes"] = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
    result["load_s"] = time.perf_counter() - started
    result["peak_rss"] = _vm_hwm()
    return result


# --------------------------------------------------------------------------------------------------------
# The benchmark


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(kind: str, model: Path, processes: int, devices: int, prefer: str) -> list[dict[str, Any]]:
    """Starts the processes of one run and returns their reports."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", str(model),
                               "--process-id", str(i), "--processes", str(processes), "--port", str(port),
                               "--format", prefer],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"{kind} {processes}x{devices} failed:\n{err[-4000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="where the checkpoints are built (required)")
    parser.add_argument("--quick", action="store_true", help="a model of a few MB (checks the script runs)")
    parser.add_argument("--format", choices=("msgpack", "safetensors"), default="msgpack")
    parser.add_argument("--child", choices=("plain", "sharded", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.process_id, args.processes, args.port, args.format)))
        return 0

    if args.cache_dir is None:
        parser.error("--cache-dir is required")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache_dir, args.quick)
    from convert.base.checkpoint import Checkpoint

    size = Checkpoint(model).total_bytes
    rows = []
    plain = run("plain", model, 1, 1, args.format)[0]
    line = {"run": "plain 1x1", "model_bytes": size, **plain}
    print(json.dumps(line), flush=True)
    rows.append(line)
    for processes, devices in RUNS:
        base = max(r["peak_rss"] for r in run("baseline", model, processes, devices, args.format))
        for report in run("sharded", model, processes, devices, args.format):
            line = {"run": f"sharded {processes}x{devices}", "format": args.format, "model_bytes": size,
                    "processes": processes, "baseline_rss": base, **report,
                    "above_baseline_per_share": (report["peak_rss"] - base) / (size / processes)}
            print(json.dumps(line), flush=True)
            rows.append(line)
    print(markdown(rows), file=sys.stderr)
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    def mb(n: float) -> str:
        return f"{n / MB:.0f} MB"

    out = [("| run | process | model | model ÷ P | bytes read | held by its devices | peak RSS | baseline RSS | "
            "(peak − baseline) ÷ (model ÷ P) | load |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        share = r["model_bytes"] / r.get("processes", 1)
        baseline = mb(r["baseline_rss"]) if "baseline_rss" in r else "—"
        ratio = f"{r['above_baseline_per_share']:.2f}" if "above_baseline_per_share" in r else "—"
        out.append(f"| {r['run']} | {r['process']} | {mb(r['model_bytes'])} | {mb(share)} | "
                   f"{mb(r.get('bytes_read', r['model_bytes']))} | {mb(r['held_bytes'])} | {mb(r['peak_rss'])} | "
                   f"{baseline} | {ratio} | {r['load_s']:.1f} s |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
