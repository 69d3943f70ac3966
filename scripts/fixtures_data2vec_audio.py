"""Tiny seeded data2vec-audio checkpoints in Hugging Face format, built from `torch_reference.data2vec_audio`.

Cases cover the positional conv stack with an even and an odd kernel, the adapter (with its projection to a
wider output) and a `Data2VecAudioForCTC` checkpoint in `.bin`. Every parameter is randomised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert.base.archs.data2vec_audio import Data2VecAudioConfig
from scripts.fixtures_wav2vec2 import GROUP, family_case, task_case
from torch_reference.data2vec_audio import Data2VecAudioModel

# The fields HF's Data2VecAudioConfig writes into config.json, at HF's defaults (transformers 5.24).
HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.1,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "add_adapter": False,
    "architectures": ["Data2VecAudioModel"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "classifier_proj_size": 256,
    "conv_bias": False,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_pos_kernel_size": 19,
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
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
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "model_type": "data2vec-audio",
    "num_adapter_layers": 3,
    "num_attention_heads": 12,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 5,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 12,
    "output_hidden_size": 768,
    "pad_token_id": 0,
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "transformers_version": "5.24.0",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
    "xvector_output_dim": 512,
}

# wav2vec2's tiny model without the layout fields data2vec-audio does not have; two positional convs.
TINY = {**{k: v for k, v in GROUP.items() if k not in ("feat_extract_norm", "do_stable_layer_norm")},
         "num_conv_pos_embeddings": 2, "conv_pos_kernel_size": 6, "conv_bias": True, "layer_norm_eps": 1e-4}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a data2vec-audio model: HF's defaults with `fields` written over them."""
    return {**HF_DEFAULTS, **fields}


def _case(fields: dict[str, Any], seed: int, **save: Any) -> Callable[[Path], Path]:
    return family_case(Data2VecAudioModel, Data2VecAudioConfig, HF_DEFAULTS, fields, seed, **save)


CASES: dict[str, Callable[[Path], object]] = {
    "d2v_audio": _case(TINY, seed=41),
    "d2v_audio_odd_kernel": _case({**TINY, "num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 5,
                                   "mask_time_prob": 0.0, "hidden_act": "gelu_new"}, seed=42),
    "d2v_audio_adapter": _case({**TINY, "add_adapter": True, "output_hidden_size": 48, "num_adapter_layers": 2},
                               seed=43),
    "d2v_audio_ctc_bin": task_case(Data2VecAudioModel, Data2VecAudioConfig, HF_DEFAULTS,
                                   {**TINY, "architectures": ["Data2VecAudioForCTC"]}, seed=44,
                                   prefix="data2vec_audio",
                                   heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)}, fmt="bin"),
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("d2v_audio", "d2v_audio_adapter")
