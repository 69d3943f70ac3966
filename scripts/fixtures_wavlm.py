"""Tiny seeded WavLM checkpoints in Hugging Face format, built from `torch_reference.wavlm`.

Cases cover both layouts (post-norm with a group-norm feature encoder as wavlm-base-plus; stable with a
layer-norm one as wavlm-large), the adapter (with its projection to a wider output), a `WavLMForCTC` checkpoint
in `.bin`, and old weight-norm names. The relative-position buckets are few and short (`num_buckets` 12-16,
`max_bucket_distance` 20-30) so that the fixtures' ~60 frames reach the log-spaced and the clipped buckets.
Every parameter is randomised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert.base.archs.wavlm import WavLMConfig
from scripts.fixtures_wav2vec2 import GROUP, STABLE, WEIGHT_NORM_OLD_NAMES, family_case, task_case
from torch_reference.wavlm import WavLMModel

# The fields HF's WavLMConfig writes into config.json, at HF's defaults (transformers 5.24).
HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.1,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "add_adapter": False,
    "apply_spec_augment": True,
    "architectures": ["WavLMModel"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "classifier_proj_size": 256,
    "codevector_dim": 256,
    "contrastive_logits_temperature": 0.1,
    "conv_bias": False,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": False,
    "diversity_loss_weight": 0.1,
    "do_stable_layer_norm": False,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_norm": "group",
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.1,
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_bucket_distance": 800,
    "model_type": "wavlm",
    "num_adapter_layers": 3,
    "num_attention_heads": 12,
    "num_buckets": 320,
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 320,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_ctc_classes": 80,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 12,
    "num_negatives": 100,
    "output_hidden_size": 768,
    "pad_token_id": 0,
    "proj_codevector_dim": 256,
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "transformers_version": "5.24.0",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
    "xvector_output_dim": 512,
}

TINY_GROUP = {**GROUP, "num_buckets": 16, "max_bucket_distance": 20}
TINY_STABLE = {**STABLE, "num_buckets": 12, "max_bucket_distance": 30}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a WavLM model: HF's defaults with `fields` written over them."""
    return {**HF_DEFAULTS, **fields}


def _case(fields: dict[str, Any], seed: int, **save: Any) -> Callable[[Path], Path]:
    return family_case(WavLMModel, WavLMConfig, HF_DEFAULTS, fields, seed, **save)


CASES: dict[str, Callable[[Path], object]] = {
    "wavlm_group": _case(TINY_GROUP, seed=31),
    "wavlm_stable": _case(TINY_STABLE, seed=32),
    "wavlm_group_adapter": _case({**TINY_GROUP, "add_adapter": True, "output_hidden_size": 48,
                                  "num_adapter_layers": 2}, seed=33),
    "wavlm_ctc_bin": task_case(WavLMModel, WavLMConfig, HF_DEFAULTS,
                               {**TINY_GROUP, "architectures": ["WavLMForCTC"]}, seed=34, prefix="wavlm", heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)},
                               fmt="bin"),
    "wavlm_old_weightnorm": _case(TINY_STABLE, seed=35, rename=WEIGHT_NORM_OLD_NAMES),
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("wavlm_group", "wavlm_group_adapter")
