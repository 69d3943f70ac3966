"""Writes a random decoder checkpoint with the shapes of a real 1-2 B LLM, in Hugging Face format.

    python scripts/make_random_llm.py OUT [--shape qwen2.5-1.5b|llama-3.2-1b] [--dtype bfloat16|float32]
        [--max-shard-size 2GB] [--small]

The config is the real model's (`config.json` as its Hub repository has it, transformers 5 reading it the same way);
the weights are random (nothing is downloaded): a seeded noise buffer at the initialiser's scale, tiled from a
name-dependent offset (drawing 1.5 billion normal values one by one would take minutes), RMSNorm scales around 1.
Tensors are named as transformers' `...ForCausalLM` names them (`scripts.fixtures_llama.tensor_shapes`) and stream
to `model-0000k-of-0000n.safetensors` shards one at a time, so memory stays at one tensor whatever the size.
`--small` keeps the architecture and shrinks every dimension, to check the script (and what reads its output) in
seconds. A tied head (both shapes tie) is left out of the file, as transformers saves it.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from convert.base.archs.llama import LlamaConfig  # noqa: E402
from convert.base.archs.qwen2 import Qwen2Config  # noqa: E402
from convert.base.writing import ShardedWriter, TensorSpec, parse_size  # noqa: E402
from scripts.fixtures_llama import LLAMA_NORMS, tensor_shapes  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-1.5B's config.json.
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 21,
        "bos_token_id": 151643, "eos_token_id": 151643, "initializer_range": 0.02, "attention_dropout": 0.0,
        "use_cache": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    },
    # meta-llama/Llama-3.2-1B's config.json.
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "initializer_range": 0.02, "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    },
}
# --small: the same architecture at toy sizes (vocabulary and ids kept small together).
SMALL = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_NOISE_LEN = 1 << 22


def config_for(shape: str, small: bool = False) -> dict[str, Any]:
    config = dict(SHAPES[shape])
    if small:
        config.update(SMALL)
        if "head_dim" in config:
            config["head_dim"] = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    return config


def write_random_llm(out: Path, shape: str, dtype: str = "bfloat16", max_shard_size: str | None = "2GB",
                     small: bool = False, seed: int = 0) -> Path:
    """Writes `out/config.json` and the safetensors shards; returns `out`."""
    config = config_for(shape, small)
    config["torch_dtype"] = dtype
    typed = CONFIGS[config["model_type"]].from_hf_dict(config)
    np_dtype = DTYPES[dtype]
    noise = (np.random.default_rng(seed).standard_normal(_NOISE_LEN, dtype=np.float32) * typed.init_scale)
    shapes = list(tensor_shapes(typed, LLAMA_NORMS))
    specs = [TensorSpec(name, np_dtype, shape) for name, shape in shapes]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, "safetensors", specs, parse_size(max_shard_size), metadata={"format": "pt"})
    for name, shape in shapes:
        size = int(np.prod(shape))
        start = zlib.crc32(name.encode()) % _NOISE_LEN
        reps = -(-(start + size) // _NOISE_LEN)
        flat = np.tile(noise, reps)[start:start + size] if reps > 1 else noise[start:start + size]
        if name.endswith("norm.weight"):
            flat = flat + np.float32(1.0)
        writer.write(name, flat.astype(np_dtype).reshape(shape))
        del flat
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--small", action="store_true", help="the same architecture at toy sizes")
    args = parser.parse_args(argv)
    out = write_random_llm(args.out, args.shape, args.dtype, args.max_shard_size, args.small)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
