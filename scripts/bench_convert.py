"""Benchmark of `python -m convert.compose` at real model sizes, against the I/O floor of the same run.

    python scripts/bench_convert.py --cache-dir DIR [--work-dir DIR] [--quick] [--pairs ...] [--dtypes ...]

Builds random Hugging Face-format checkpoints with the shapes of wav2vec2-base, wav2vec2-large-lv60,
BART-base, BART-large and GPT-2 (124M) from `torch_reference`, and of Qwen2.5-1.5B in bfloat16
(`scripts/make_random_llm.py`) (cached in `--cache-dir`, reused when present),
then, for every pair and output dtype, runs in a fresh process each:

* `compose --no-verify` (the figures the targets are about),
* the I/O floor: read every source tensor the composed model uses (`safetensors.safe_open(...).get_tensor`)
  and write those bytes with `safetensors.torch.save_file`, once ("floor_1x") and as many times as compose
  writes them ("floor", two weight files: msgpack and safetensors),
* `compose` with the verification on (labelled `"verify": true`; it loads both models, so its memory is not
  the streaming figure), as many times, each right after a `--no-verify` run so that both see the same load
  on the machine: its line gives the ratio of the medians, verified ÷ unverified (target: at most 2).

One JSON line per run on stdout: wall time (process start to exit), peak RSS (the child's `ru_maxrss`),
bytes read and written (the child's `/proc/self/io` rchar/wchar), the model's size in its saved dtype and the
ratios to the floor and to the size. A child that only imports what compose imports gives the fixed memory
overhead. The page cache is dropped before every run when this process may (root); otherwise the lines say
`"cold_cache": false`. A markdown table of the results goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------------------------
# Source checkpoints: real shapes, random values

WAV2VEC2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      output_hidden_size=1024, feat_extract_norm="layer", do_stable_layer_norm=True,
                      conv_bias=True, mask_time_prob=0.075, architectures=["Wav2Vec2Model"])
BART_BASE = dict(vocab_size=50265, max_position_embeddings=1024, d_model=768, encoder_layers=6, decoder_layers=6,
                 encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                 decoder_ffn_dim=3072, num_hidden_layers=6)
BART_LARGE = dict(BART_BASE, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, num_hidden_layers=12)
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=768, n_layer=12, n_head=12,
                  bos_token_id=50256, eos_token_id=50256)
# --quick: the same architectures, small enough to build and compose in seconds.
WAV2VEC2_SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                      output_hidden_size=128, conv_dim=[64] * 7, num_conv_pos_embedding_groups=4,
                      num_conv_pos_embeddings=32)
BART_SMALL = dict(BART_BASE, vocab_size=2000, max_position_embeddings=128, d_model=128, encoder_layers=1,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                  decoder_ffn_dim=256, num_hidden_layers=1)
GPT2_TINY = dict(GPT2_SMALL, vocab_size=2000, n_positions=128, n_ctx=128, n_embd=128, n_layer=2, n_head=4,
                 bos_token_id=1999, eos_token_id=1999)

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "wav2vec2-base": ("wav2vec2", {}),
    "wav2vec2-large-lv60": ("wav2vec2", WAV2VEC2_LARGE),
    "bart-base": ("bart", BART_BASE),
    "bart-large": ("bart", BART_LARGE),
    "gpt2": ("gpt2", GPT2_SMALL),
    "wav2vec2-small": ("wav2vec2", WAV2VEC2_SMALL),
    "bart-small": ("bart", BART_SMALL),
    "gpt2-small": ("gpt2", GPT2_TINY),
    # A 1.5 B decoder, bfloat16 as published (`scripts/make_random_llm.py`), and its toy twin for --quick.
    "qwen2.5-1.5b": ("llm", {"shape": "qwen2.5-1.5b"}),
    "qwen2.5-small": ("llm", {"shape": "qwen2.5-1.5b", "small": True}),
}
PAIRS = [("wav2vec2-base", "bart-base"), ("wav2vec2-large-lv60", "bart-large"), ("wav2vec2-base", "gpt2"),
         ("wav2vec2-large-lv60", "qwen2.5-1.5b")]
QUICK_PAIRS = [("wav2vec2-small", "bart-small"), ("wav2vec2-small", "gpt2-small"), ("wav2vec2-small", "qwen2.5-small")]

_NOISE_STD = 0.02  # HF's initializer_range: keeps the random models numerically tame for the verification
_NOISE_LEN = 1 << 22


def build_source(name: str, cache_dir: Path) -> Path:
    """Writes checkpoint `name` under `cache_dir` in HF's layout (once: an existing one is reused)."""
    directory = cache_dir / name
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    from safetensors.torch import save_file

    arch, fields = MODELS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        if arch == "llm":  # streamed to one file, tensor by tensor: a 3 GB state is never held
            from scripts.make_random_llm import write_random_llm

            write_random_llm(tmp, fields["shape"], "bfloat16", None, small=fields.get("small", False))
        else:
            config, state = {"wav2vec2": _wav2vec2, "bart": _bart, "gpt2": _gpt2}[arch](fields)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _random_state(module_factory, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The module's state dict with random values, built on the meta device (no slow init, no 2nd copy)."""
    import torch
    from torch import nn

    with torch.device("meta"):
        module = module_factory()
    norms = {f"{prefix}.{p}" if prefix else p for prefix, m in module.named_modules()
             if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for p in ("weight",)}
    noise = torch.randn(_NOISE_LEN, generator=torch.Generator().manual_seed(0)) * _NOISE_STD
    state = {}
    for key, meta in module.state_dict().items():
        if key in skip:
            continue
        state[key] = _fill(key, tuple(meta.shape), noise, shift=1.0 if key in norms or "original0" in key else 0.0)
    return state


def _fill(key: str, shape: tuple[int, ...], noise: Any, shift: float) -> Any:
    """Tiles the noise buffer from a key-dependent offset (fast: no random draw per tensor)."""
    import torch

    n = math.prod(shape)
    start = zlib.crc32(key.encode()) % _NOISE_LEN
    rolled = torch.cat([noise[start:], noise[:start]])
    flat = rolled.repeat(-(-n // _NOISE_LEN))[:n] if n > _NOISE_LEN else rolled[:n].clone()
    if shift:
        flat = flat.abs_() if "original0" in key else flat.add_(shift)
    return flat.reshape(shape).contiguous()


def _wav2vec2(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from convert.base.archs.wav2vec2 import Wav2Vec2Config
    from scripts.fixtures_wav2vec2 import hf_config
    from torch_reference.wav2vec2 import Wav2Vec2Model

    config = hf_config(**fields)
    return config, _random_state(lambda: Wav2Vec2Model(Wav2Vec2Config.from_hf_dict(config)))


def _bart(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """BartForConditionalGeneration as transformers' safetensors store it: the text encoder (which compose
    drops) included, the tied copies of `model.shared.weight` left out."""
    import torch

    from convert.base.archs.bart import BartConfig
    from scripts.fixtures_bart import hf_config
    from torch_reference.bart import BartForCausalLM

    config = hf_config(architecture="BartForConditionalGeneration", **fields)
    causal = hf_config(**fields)
    decoder = _random_state(lambda: BartForCausalLM(BartConfig.from_hf_dict(causal)), skip=("lm_head.weight",))
    noise = torch.randn(_NOISE_LEN, generator=torch.Generator().manual_seed(1)) * _NOISE_STD
    encoder = {k: _fill(k, tuple(v), noise, 1.0 if k.endswith("norm.weight") or "layernorm" in k and
                        k.endswith("weight") else 0.0) for k, v in _bart_text_encoder_shapes(config).items()}
    shared = decoder.pop("model.decoder.embed_tokens.weight")
    state = {"final_logits_bias": torch.zeros(1, config["vocab_size"]), "model.shared.weight": shared,
             **encoder, **decoder}
    return config, state


def _bart_text_encoder_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, ffn = config["d_model"], config["encoder_ffn_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.encoder.embed_positions.weight":
                                          (config["max_position_embeddings"] + 2, d)}
    for i in range(config["encoder_layers"]):
        layer = f"model.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{proj}.weight": (d, d), f"{layer}self_attn.{proj}.bias": (d,)})
        shapes.update({
            f"{layer}self_attn_layer_norm.weight": (d,), f"{layer}self_attn_layer_norm.bias": (d,),
            f"{layer}fc1.weight": (ffn, d), f"{layer}fc1.bias": (ffn,),
            f"{layer}fc2.weight": (d, ffn), f"{layer}fc2.bias": (d,),
            f"{layer}final_layer_norm.weight": (d,), f"{layer}final_layer_norm.bias": (d,),
        })
    shapes.update({"model.encoder.layernorm_embedding.weight": (d,), "model.encoder.layernorm_embedding.bias": (d,)})
    return shapes


def _gpt2(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from convert.base.archs.gpt2 import GPT2Config
    from scripts.fixtures_gpt2 import hf_config
    from torch_reference.gpt2 import GPT2LMHeadModel

    config = hf_config(**fields)
    return config, _random_state(lambda: GPT2LMHeadModel(GPT2Config.from_hf_dict(config)), skip=("lm_head.weight",))


# --------------------------------------------------------------------------------------------------------
# Children: each measured run is a fresh process started with `--child KIND`


def _child_main(argv: list[str]) -> int:
    kind, out, rest = argv[0], Path(argv[1]), argv[2:]
    extra: dict[str, Any] = {}
    if kind == "compose":
        from convert.compose import main

        rc = main(rest)
    elif kind in ("imports", "imports+torch"):
        import flax.linen  # noqa: F401
        import jax.numpy  # noqa: F401
        import numpy  # noqa: F401

        import convert.compose
        import convert.base.params  # noqa: F401

        if kind == "imports+torch":
            import torch  # noqa: F401
        rc = 0
    elif kind == "build":
        build_source(rest[0], Path(rest[1]))
        rc = 0
    elif kind == "floor":
        extra = _floor(Path(rest[0]), rest[1], Path(rest[2]), int(rest[3]))
        rc = 0
    else:
        raise SystemExit(f"unknown child kind {kind}")
    out.write_text(json.dumps({"io": _proc_io(), "vm_hwm": _vm_hwm(), **extra}))
    return rc


def _vm_hwm() -> int | None:
    """This process's own peak RSS (VmHWM belongs to the address space exec made, nothing inherited)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _proc_io() -> dict[str, int]:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def _floor(report_path: Path, dtype: str, scratch: Path, copies: int) -> dict[str, Any]:
    """Reads every source tensor compose loaded and writes those bytes with safetensors: the I/O floor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    report = json.loads(report_path.read_text())
    started = time.perf_counter()
    tensors = {}
    for role in ("encoder", "decoder"):
        source = Path(report[role]["source"])
        with safe_open(str(source / "model.safetensors"), framework="pt") as f:
            for key, _ in report[role]["loaded"]:
                tensors[f"{role}.{key}"] = f.get_tensor(key)
    read_s = time.perf_counter() - started
    if dtype != "float32":  # the cast is compute, not I/O: outside the timed parts
        target = getattr(torch, dtype)
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    write_s = []
    for copy in range(copies):
        t = time.perf_counter()
        save_file(tensors, str(scratch / f"floor-{copy}.safetensors"), metadata={"format": "pt"})
        write_s.append(time.perf_counter() - t)
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    return {"read_s": read_s, "write_s": write_s, "tensor_bytes": nbytes}


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(kind: str, args: list[str], drop_caches: bool) -> dict[str, Any]:
    """Runs one measured child: its wall time, peak RSS (wait4 on its pid), I/O counters and own report."""
    cold = _drop_caches() if drop_caches else False
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    report = Path(name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(report), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        pid = os.posix_spawn(cmd[0], cmd, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        out.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{kind} child failed:\n{err.read().decode()[-4000:]}")
        stdout = out.read().decode()
    child = json.loads(report.read_text()) if report.stat().st_size else {}
    report.unlink()
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "cold_cache": cold, "stdout": stdout, **child}


# --------------------------------------------------------------------------------------------------------
# The benchmark

GB = 1e9
# The targets: peak RSS <= 1.5 x the model's size + a fixed overhead under 1 GB; wall time <= 2 x the I/O floor.
RSS_FACTOR, FIXED_LIMIT, TIME_FACTOR = 1.5, 1 * GB, 2.0
# And a verified compose: wall time <= 2 x the unverified one (issue 13).
VERIFY_FACTOR = 2.0


def bench_pair(encoder: Path, decoder: Path, dtype: str, work: Path, drop: bool, repeat: int, verify: bool,
               fixed: dict[str, int]) -> list[dict[str, Any]]:
    """compose --no-verify, the I/O floor and (with `verify`) a verified compose, `repeat` times each, in turn."""
    out, scratch = work / "composed", work / "floor"
    base = ["--encoder", str(encoder), "--decoder", str(decoder), "--output", str(out), "--dtype", dtype,
            "--no-progress", "--overwrite"]
    composes, floors, checked = [], [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        composes.append(run_child("compose", [*base, "--no-verify"], drop))
        model_bytes = sum(_tensor_bytes(p) for p in out.glob("model*.safetensors"))
        written = sum(p.stat().st_size for p in out.iterdir())
        (work / "report.json").write_bytes((out / "compose_report.json").read_bytes())
        shutil.rmtree(out)
        if verify:
            checked.append(run_child("compose", base, drop))
            shutil.rmtree(out, ignore_errors=True)
        scratch.mkdir(exist_ok=True)
        floors.append(run_child("floor", [str(work / "report.json"), dtype, str(scratch), "2"], drop))
        shutil.rmtree(scratch)
    wall = statistics.median(c["wall_s"] for c in composes)
    floor_2x = statistics.median(f["read_s"] + sum(f["write_s"]) for f in floors)
    floor_1x = statistics.median(f["read_s"] + f["write_s"][0] for f in floors)
    peak = max(c["peak_rss"] for c in composes)
    common = {"pair": f"{encoder.name}+{decoder.name}", "dtype": dtype, "model_bytes": model_bytes}
    line = {
        **common, "run": "compose --no-verify", "verify": False, "repeat": repeat,
        "wall_s": round(wall, 2), "wall_s_all": [round(c["wall_s"], 2) for c in composes],
        "peak_rss": peak, "bytes_read": composes[-1]["io"].get("rchar"),
        "bytes_written": composes[-1]["io"].get("wchar"), "output_bytes": written,
        "floor_s": round(floor_2x, 2), "floor_1x_s": round(floor_1x, 2),
        "floor_s_all": [round(f["read_s"] + sum(f["write_s"]), 2) for f in floors],
        "floor_read_s": round(statistics.median(f["read_s"] for f in floors), 2),
        "floor_peak_rss": max(f["peak_rss"] for f in floors),
        "time_ratio": round(wall / floor_2x, 2), "time_ratio_1x": round(wall / floor_1x, 2),
        "rss_ratio": round((peak - fixed["compose"]) / model_bytes, 2),
        "time_target_met": wall <= TIME_FACTOR * floor_2x,
        "rss_target_met": peak <= RSS_FACTOR * model_bytes + FIXED_LIMIT,
        "cold_cache": all(c["cold_cache"] for c in composes + floors), "loadavg": os.getloadavg()[0],
    }
    lines = [line]
    if verify:
        verified = statistics.median(c["wall_s"] for c in checked)
        lines.append({
            **common, "run": "compose (verification on)", "verify": True, "repeat": repeat,
            "wall_s": round(verified, 2), "wall_s_all": [round(c["wall_s"], 2) for c in checked],
            "verify_ratio": round(verified / wall, 2), "verify_target_met": verified <= VERIFY_FACTOR * wall,
            "peak_rss": max(c["peak_rss"] for c in checked),
            "bytes_read": checked[-1]["io"].get("rchar"), "bytes_written": checked[-1]["io"].get("wchar"),
            "rss_ratio": round((max(c["peak_rss"] for c in checked) - fixed["verify"]) / model_bytes, 2),
            "cold_cache": all(c["cold_cache"] for c in checked), "loadavg": os.getloadavg()[0],
        })
    return lines


def _tensor_bytes(path: Path) -> int:
    """The tensor data of a safetensors file: its size less the header."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def markdown(lines: list[dict[str, Any]], imports: dict[str, dict[str, Any]]) -> str:
    """The results as the README's performance table."""
    def gb(n: float) -> str:
        return f"{n / GB:.2f} GB"

    header = ("| pair | dtype | run | model size | wall | I/O floor: 2 files (1 file) "
              "| wall ÷ floor: 2 files (1 file) | verified ÷ unverified | peak RSS | (RSS − fixed) ÷ size |")
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in lines:
        floor = f"{r['floor_s']:.1f} s ({r['floor_1x_s']:.1f} s)" if "floor_s" in r else "—"
        ratio = f"{r['time_ratio']:.2f} ({r['time_ratio_1x']:.2f})" if "floor_s" in r else "—"
        verified = f"{r['verify_ratio']:.2f}" if "verify_ratio" in r else "—"
        rows.append(f"| {r['pair']} | {r['dtype']} | {r['run']} | {gb(r['model_bytes'])} | {r['wall_s']:.1f} s "
                    f"| {floor} | {ratio} | {verified} | {gb(r['peak_rss'])} | {r['rss_ratio']:.2f} |")
    compose, verify = imports["compose"], imports["verify"]
    rows += ["", (f"Fixed overhead (a child that only imports): numpy, jax, flax and `convert` (what compose "
                  f"imports) {gb(compose['peak_rss'])} peak RSS, {compose['wall_s']:.1f} s; with torch too (what "
                  f"the verification imports) {gb(verify['peak_rss'])}, {verify['wall_s']:.1f} s.")]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True, help="where the source checkpoints are kept")
    parser.add_argument("--work-dir", type=Path, help="where outputs are written (default: a temporary directory "
                        "in --cache-dir)")
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run of a few seconds")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", nargs="+", metavar="ENC+DEC", help="e.g. wav2vec2-base+bart-base")
    parser.add_argument("--repeat", type=int, default=3, help="runs of compose (unverified and verified) and of "
                        "the floor per case; the medians are reported (default 3)")
    parser.add_argument("--no-verify-runs", dest="verify", action="store_false",
                        help="skip the runs with the verification on")
    parser.add_argument("--warm-cache", action="store_true", help="do not drop the page cache before each run")
    parser.add_argument("--build-only", action="store_true", help="build the source checkpoints and stop")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split("+")) for p in args.pairs] if args.pairs else QUICK_PAIRS if args.quick else PAIRS
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name in dict.fromkeys(n for pair in pairs for n in pair):
        # Built in a child: torch stays out of this process, whose RSS every measured child would inherit
        # (exec records the parent's high-water mark in the child's ru_maxrss).
        t = time.perf_counter()
        if not (args.cache_dir / name / "model.safetensors").is_file():
            run_child("build", [name, str(args.cache_dir)], drop_caches=False)
        sources[name] = args.cache_dir / name
        print(f"source {name}: {sources[name]} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    if args.build_only:
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.work_dir or args.cache_dir))
    drop = not args.warm_cache
    try:
        imports = {"compose": run_child("imports", [], drop), "verify": run_child("imports+torch", [], drop)}
        for what, r in imports.items():
            print(json.dumps({"run": f"imports only ({what})", "wall_s": round(r["wall_s"], 2),
                              "peak_rss": r["peak_rss"], "cold_cache": r["cold_cache"]}), flush=True)
        fixed = {k: v["peak_rss"] for k, v in imports.items()}
        lines = []
        for enc, dec in pairs:
            for dtype in args.dtypes:
                for line in bench_pair(sources[enc], sources[dec], dtype, work, drop, args.repeat, args.verify, fixed):
                    print(json.dumps(line), flush=True)
                    lines.append(line)
        print("\n" + markdown(lines, imports), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
