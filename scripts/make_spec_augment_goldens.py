"""SpecAugment masks drawn by transformers itself, for `parity_tests/test_spec_augment.py`.

`convert.base.spec_augment` re-implements transformers' `_compute_mask_indices` and the order in which its encoders
draw the time and channel masks. These goldens are what transformers computes from the same seeds:

* `compute` cases call `transformers.models.wav2vec2.modeling_wav2vec2._compute_mask_indices` directly after
  `np.random.seed(seed)` (shapes, probabilities, span lengths, minimum counts, padded rows);
* `model` cases run a tiny randomly initialised transformers encoder (wav2vec2, HuBERT, WavLM, data2vec-audio)
  forward in training mode on a padded batch after `np.random.seed(seed)`, with `masked_spec_embed` set to a
  sentinel, and read both masks off the hidden states the encoder's transformer receives: a masked frame holds
  the sentinel, a masked channel is 0 in every frame. That covers what each model passes to SpecAugment
  (HuBERT passes no padding mask; w2v-BERT masks its feature frames, whose attention mask is the frame mask) and
  the order of the draws.

Run it where transformers is installed (never a dependency of the package or its tests), e.g. the environment
of `scripts/make_goldens.py`:

    python scripts/make_spec_augment_goldens.py [--out parity_tests/goldens/spec_augment.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "parity_tests" / "goldens" / "spec_augment.json"
SENTINEL = 12345.0

# (seed, shape, mask_prob, mask_length, min_masks, per-row lengths or None)
COMPUTE_CASES = (
    (0, (2, 59), 0.05, 10, 2, None),
    (1, (3, 100), 0.3, 5, 0, [100, 61, 20]),
    (2, (4, 32), 0.5, 4, 1, None),
    (3, (2, 50), 0.65, 10, 2, [50, 12]),  # the short row fits fewer spans than the long one
    (4, (3, 40), 0.2, 8, 0, [40, 30, 5]),  # a row too short for any span
    (5, (2, 20), 0.0, 4, 0, None),  # no span at all: only epsilon is drawn
    (6, (5, 256), 0.05, 10, 2, [256, 200, 150, 100, 50]),
)

_TINY = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
    "conv_dim": [32, 32, 32], "conv_kernel": [10, 3, 3], "conv_stride": [5, 2, 2], "conv_bias": True,
    "num_conv_pos_embedding_groups": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "feat_proj_dropout": 0.0, "layerdrop": 0.0,
}
_SPEC = {"mask_time_prob": 0.2, "mask_time_length": 3, "mask_time_min_masks": 2, "mask_feature_prob": 0.3,
         "mask_feature_length": 4, "mask_feature_min_masks": 1}

# (name, model_type, fields, seed, sample lengths of the batch)
MODEL_CASES = (
    ("wav2vec2_time_and_feature", "wav2vec2",
     {**_TINY, **_SPEC, "num_conv_pos_embeddings": 16, "feat_extract_norm": "layer"}, 7, [2000, 1400, 700]),
    ("wav2vec2_time_only", "wav2vec2",
     {**_TINY, "mask_time_prob": 0.5, "mask_time_length": 5, "mask_time_min_masks": 1, "mask_feature_prob": 0.0,
      "num_conv_pos_embeddings": 16}, 8, [1600, 900]),
    ("wav2vec2_no_spec_augment", "wav2vec2",
     {**_TINY, **_SPEC, "apply_spec_augment": False, "num_conv_pos_embeddings": 16}, 9, [1200, 800]),
    ("hubert_ignores_padding", "hubert", {**_TINY, **_SPEC, "num_conv_pos_embeddings": 16}, 10, [2000, 900]),
    # WavLMConfig has no mask_feature_min_masks (transformers fails without it when mask_feature_prob > 0).
    ("wavlm", "wavlm", {**_TINY, **_SPEC, "num_conv_pos_embeddings": 16, "num_buckets": 16,
                        "max_bucket_distance": 20}, 11, [1800, 1000]),
    ("data2vec_audio", "data2vec-audio",
     {**_TINY, **_SPEC, "num_conv_pos_embeddings": 2, "conv_pos_kernel_size": 5}, 12, [1500, 1500, 600]),
    # Feature frames (lengths in frames, 160 values each): SpecAugment masks the frames themselves.
    ("wav2vec2_bert_frames", "wav2vec2-bert",
     {**{k: v for k, v in _TINY.items() if not k.startswith("conv_") and "conv_pos" not in k}, **_SPEC,
      "conv_depthwise_kernel_size": 3, "left_max_position_embeddings": 4, "right_max_position_embeddings": 2},
     13, [61, 40, 23]),
)


def _compute_case(seed, shape, mask_prob, mask_length, min_masks, lengths) -> dict[str, Any]:
    import torch
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    attention_mask = None
    if lengths is not None:
        attention_mask = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    np.random.seed(seed)
    mask = _compute_mask_indices(shape, mask_prob, mask_length, attention_mask=attention_mask, min_masks=min_masks)
    return {"seed": seed, "shape": list(shape), "mask_prob": mask_prob, "mask_length": mask_length,
            "min_masks": min_masks, "lengths": lengths, "mask": _rows(mask)}


def _model_case(name: str, model_type: str, fields: dict[str, Any], seed: int, lengths: list[int]) -> dict[str, Any]:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModel.from_config(config).train()
    with torch.no_grad():
        if hasattr(model, "masked_spec_embed"):
            model.masked_spec_embed.fill_(SENTINEL)
    seen = {}

    def capture(module: Any, args: tuple) -> None:  # returns None: a returned value would replace the input
        seen.setdefault("hidden", args[0].detach().clone())

    model.encoder.register_forward_pre_hook(capture)
    # Samples [B, N], or feature frames [B, S, F] for an encoder that reads features.
    frame = (config.feature_projection_input_dim,) if hasattr(config, "feature_projection_input_dim") else ()
    values = torch.from_numpy(np.random.default_rng(seed).standard_normal((len(lengths), max(lengths), *frame),
                                                                            dtype=np.float32))
    attention_mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    values = values * attention_mask.reshape(*attention_mask.shape, *(1,) * len(frame))
    np.random.seed(seed)
    torch.manual_seed(seed)
    model(values, attention_mask=attention_mask)
    hidden = seen["hidden"].numpy()  # [B, S, D]
    feature = np.all(hidden == 0.0, axis=1)  # [B, D]
    time = np.all((hidden == SENTINEL) | feature[:, None, :], axis=2)  # [B, S]
    return {"name": name, "model_type": model_type, "fields": fields, "seed": seed, "sample_lengths": lengths,
            "num_frames": int(hidden.shape[1]),
            "mask_time_indices": _rows(time), "mask_feature_indices": _rows(feature)}


def _rows(mask: np.ndarray) -> list[str]:
    """A bool mask as one string of 0/1 per row (compact and readable in a diff)."""
    return ["".join("1" if v else "0" for v in row) for row in np.asarray(mask, bool)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    import torch
    import transformers

    goldens = {
        "transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "compute": [_compute_case(*case) for case in COMPUTE_CASES],
        "model": [_model_case(*case) for case in MODEL_CASES],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
