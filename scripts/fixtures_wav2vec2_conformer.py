"""Tiny seeded wav2vec2-conformer checkpoints in Hugging Face format, built from `torch_reference.wav2vec2_conformer`.

Cases cover the three position embeddings: relative (with a layer-norm feature encoder and conv biases, as
wav2vec2-conformer-rel-pos-large), rotary (group norm, other activations and a `layer_norm_eps` that differs from
the blocks' fixed 1e-5, as wav2vec2-conformer-rope-large), none (in a `Wav2Vec2ConformerForCTC` checkpoint in
`.bin`), and the adapter with its projection to a wider output. Every checkpoint holds the BatchNorm step counters
HF's files hold. Every parameter and buffer is randomised (BatchNorm running variances positive; the rotary
`inv_freq` too, so that a model that recomputes it instead of reading it shows).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.wav2vec2_conformer import Wav2Vec2ConformerConfig
from scripts.fixture_io import save_hf_checkpoint
from scripts.fixtures_wav2vec2 import build_family_model
from torch_reference.wav2vec2_conformer import Wav2Vec2ConformerModel

# The fields HF's Wav2Vec2ConformerConfig writes into config.json, at HF's defaults (transformers 5.24).
HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.1,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "add_adapter": False,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2ConformerModel"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "classifier_proj_size": 256,
    "codevector_dim": 256,
    "conformer_conv_dropout": 0.1,
    "contrastive_logits_temperature": 0.1,
    "conv_bias": False,
    "conv_depthwise_kernel_size": 31,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "diversity_loss_weight": 0.1,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_norm": "group",
    "feat_proj_dropout": 0.0,
    "feat_quantizer_dropout": 0.0,
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
    "max_source_positions": 5000,
    "model_type": "wav2vec2-conformer",
    "num_adapter_layers": 3,
    "num_attention_heads": 12,
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 320,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 12,
    "num_negatives": 100,
    "output_hidden_size": 768,
    "pad_token_id": 0,
    "position_embeddings_type": "relative",
    "proj_codevector_dim": 256,
    "rotary_embedding_base": 10000,
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "transformers_version": "5.24.0",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
    "xvector_output_dim": 512,
}

# Two blocks of width 32 (4 heads of 8), a depthwise kernel of 5 and 3 feature convs (kernel 10 / stride 5 first).
_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_dim": [32, 32, 32],
    "conv_kernel": [10, 3, 3],
    "conv_stride": [5, 2, 2],
    "num_feat_extract_layers": 3,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "conv_depthwise_kernel_size": 5,
    "output_hidden_size": 32,
}
RELATIVE = {**_TINY, "position_embeddings_type": "relative", "feat_extract_norm": "layer", "conv_bias": True,
            "mask_feature_prob": 0.1}
ROTARY = {**_TINY, "position_embeddings_type": "rotary", "feat_extract_norm": "group", "mask_time_prob": 0.0,
          "hidden_act": "gelu_new", "feat_extract_activation": "gelu_pytorch_tanh", "layer_norm_eps": 1e-4,
          "rotary_embedding_base": 500}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a wav2vec2-conformer model: HF's defaults with `fields` written over them."""
    return {**HF_DEFAULTS, **fields}


def _with_counters(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict plus BatchNorm1d's `num_batches_tracked` of every block, as HF's checkpoints hold it."""
    counters = {f"{prefix}{k.removesuffix('running_mean')}num_batches_tracked": torch.tensor(1000 + i)
                for i, k in enumerate(sorted(state)) if k.endswith("batch_norm.running_mean")}
    return {**{f"{prefix}{k}": v for k, v in state.items()}, **counters}


def _case(fields: dict[str, Any], seed: int, prefix: str = "", heads: dict[str, tuple[int, ...]] | None = None,
          **save: Any) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        config = hf_config(**fields)
        _, state = build_family_model(Wav2Vec2ConformerModel, Wav2Vec2ConformerConfig, config, seed)
        state = _with_counters(state, prefix)
        generator = torch.Generator().manual_seed(seed * 10)
        state.update({k: torch.randn(shape, generator=generator) for k, shape in (heads or {}).items()})
        return save_hf_checkpoint(directory, state, config, **save)
    return build


CASES: dict[str, Callable[[Path], object]] = {
    "conformer_rel": _case(RELATIVE, seed=41),
    "conformer_rotary": _case(ROTARY, seed=42),
    "conformer_rel_adapter": _case({**RELATIVE, "add_adapter": True, "output_hidden_size": 48,
                                    "num_adapter_layers": 2}, seed=43),
    # No position embedding, in a CTC checkpoint: the encoder under `wav2vec2_conformer.`, the head dropped.
    "conformer_ctc_bin": _case({**ROTARY, "position_embeddings_type": None,
                                "architectures": ["Wav2Vec2ConformerForCTC"]}, seed=44,
                               prefix="wav2vec2_conformer.", heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)},
                               fmt="bin"),
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("conformer_rel", "conformer_rel_adapter")
