"""Tiny seeded HuBERT checkpoints in Hugging Face format, built from `torch_reference.hubert`.

Cases cover both layouts (post-norm with a group-norm feature encoder as hubert-base; stable with a layer-norm
one as hubert-large), a feature projection without its layer norm, the BatchNorm positional conv
(`conv_pos_batch_norm`), a `HubertForCTC` checkpoint in `.bin`, and old weight-norm names. Every parameter and
buffer is randomised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.hubert import HubertConfig
from scripts.fixture_io import save_hf_checkpoint
from scripts.fixtures_wav2vec2 import (
    GROUP,
    STABLE,
    WEIGHT_NORM_OLD_NAMES,
    build_family_model,
    family_case,
    task_case,
)
from torch_reference.hubert import HubertModel

# The fields HF's HubertConfig writes into config.json, at HF's defaults (transformers 5.24).
HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.1,
    "apply_spec_augment": True,
    "architectures": ["HubertModel"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "classifier_proj_size": 256,
    "conv_bias": False,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_pos_batch_norm": False,
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "do_stable_layer_norm": False,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_norm": "group",
    "feat_proj_dropout": 0.0,
    "feat_proj_layer_norm": True,
    "final_dropout": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.1,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "model_type": "hubert",
    "num_attention_heads": 12,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "transformers_version": "5.24.0",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
}

_WAV2VEC2_ONLY = ("output_hidden_size",)
TINY_GROUP = {k: v for k, v in GROUP.items() if k not in _WAV2VEC2_ONLY}
TINY_STABLE = {k: v for k, v in STABLE.items() if k not in _WAV2VEC2_ONLY}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a HuBERT model: HF's defaults with `fields` written over them."""
    return {**HF_DEFAULTS, **fields}


def _case(fields: dict[str, Any], seed: int, **save: Any) -> Callable[[Path], Path]:
    return family_case(HubertModel, HubertConfig, HF_DEFAULTS, fields, seed, **save)


def _batch_norm(directory: Path) -> Path:
    """The BatchNorm positional conv, with the `num_batches_tracked` counter HF's checkpoints hold."""
    config = hf_config(**{**TINY_GROUP, "conv_pos_batch_norm": True, "mask_feature_prob": 0.1})
    _, state = build_family_model(HubertModel, HubertConfig, config, seed=23)
    state = {**state, "encoder.pos_conv_embed.batch_norm.num_batches_tracked": torch.tensor(7)}
    return save_hf_checkpoint(directory, state, config)


CASES: dict[str, Callable[[Path], object]] = {
    "hubert_group": _case(TINY_GROUP, seed=21),
    # hubert-large's layout, without the projection's layer norm; an odd positional kernel.
    "hubert_stable": _case({**TINY_STABLE, "feat_proj_layer_norm": False, "num_conv_pos_embeddings": 15},
                           seed=22),
    "hubert_batch_norm": _batch_norm,
    "hubert_ctc_bin": task_case(HubertModel, HubertConfig, HF_DEFAULTS,
                                {**TINY_GROUP, "architectures": ["HubertForCTC"]}, seed=24, prefix="hubert",
                                heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)}, fmt="bin"),
    # hubert_stable's config, so that the two share their compilations in the tests.
    "hubert_old_weightnorm": _case({**TINY_STABLE, "feat_proj_layer_norm": False, "num_conv_pos_embeddings": 15},
                                   seed=25, rename=WEIGHT_NORM_OLD_NAMES),
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("hubert_group",)
