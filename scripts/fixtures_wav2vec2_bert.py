"""Tiny seeded w2v-BERT 2.0 checkpoints in Hugging Face format, built from `torch_reference.wav2vec2_bert`.

Cases cover the four position embeddings: Shaw's relative keys (the default, clamped at 4 left and 2 right so that
short inputs reach the clamp), Transformer-XL relative positions, rotary and none (in a `Wav2Vec2BertForCTC`
checkpoint in `.bin`, its head dropped), and the adapter: two subsampling layers after the intermediate
feed-forward with a `layer_norm_eps` other than 1e-5 (the main case), one behind a projection to a wider output
(with the relative positions). Every parameter is
randomised. The input width is the real one (80 mel bins x 2 stacked frames), so the feature extractor's output
feeds them, and each directory carries the `preprocessor_config.json` of `SeamlessM4TFeatureExtractor` (padding
value 1, as `facebook/w2v-bert-2.0`'s).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.wav2vec2_bert import Wav2Vec2BertConfig
from scripts.fixture_io import save_hf_checkpoint
from scripts.fixtures_wav2vec2 import build_family_model
from torch_reference.wav2vec2_bert import Wav2Vec2BertModel

# The fields HF's Wav2Vec2BertConfig writes into config.json, at HF's defaults (transformers 5.24).
HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.0,
    "adapter_act": "relu",
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "add_adapter": False,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2BertModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "classifier_proj_size": 768,
    "conformer_conv_dropout": 0.1,
    "conv_depthwise_kernel_size": 31,
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "eos_token_id": 2,
    "feat_proj_dropout": 0.0,
    "feature_projection_input_dim": 160,
    "final_dropout": 0.1,
    "hidden_act": "swish",
    "hidden_dropout": 0.0,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.1,
    "left_max_position_embeddings": 64,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_source_positions": 5000,
    "model_type": "wav2vec2-bert",
    "num_adapter_layers": 1,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "output_hidden_size": 1024,
    "pad_token_id": 0,
    "position_embeddings_type": "relative_key",
    "right_max_position_embeddings": 8,
    "rotary_embedding_base": 10000,
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "transformers_version": "5.24.0",
    "use_intermediate_ffn_before_adapter": False,
    "use_weighted_layer_sum": False,
    "vocab_size": None,
    "xvector_output_dim": 512,
}

# What `SeamlessM4TFeatureExtractor.save_pretrained` writes, with facebook/w2v-bert-2.0's padding value.
PREPROCESSOR = {
    "feature_extractor_type": "SeamlessM4TFeatureExtractor",
    "feature_size": 80,
    "num_mel_bins": 80,
    "padding_side": "right",
    "padding_value": 1,
    "processor_class": "Wav2Vec2BertProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
    "stride": 2,
}

# Two blocks of width 32 (4 heads of 8), a depthwise kernel of 5, distances clamped at 4 left and 2 right.
_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "output_hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_depthwise_kernel_size": 5,
    "left_max_position_embeddings": 4,
    "right_max_position_embeddings": 2,
    "mask_time_length": 4,
    "mask_feature_prob": 0.1,
    "mask_feature_length": 4,
}
# Two adapter layers after the intermediate feed-forward, at the decoders' width (32: what transformers'
# SpeechEncoderDecoderModel can load with every decoder fixture; the projection to a wider output is
# w2vbert_rel's).
ADAPTER = {**_TINY, "add_adapter": True, "num_adapter_layers": 2, "use_intermediate_ffn_before_adapter": True,
           "layer_norm_eps": 1e-4, "hidden_act": "gelu"}
ROTARY = {**_TINY, "position_embeddings_type": "rotary", "rotary_embedding_base": 500, "mask_time_prob": 0.0,
          "mask_feature_prob": 0.0, "hidden_act": "gelu_new"}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a w2v-BERT model: HF's defaults with `fields` written over them."""
    return {**HF_DEFAULTS, **fields}


def _case(fields: dict[str, Any], seed: int, prefix: str = "", heads: dict[str, tuple[int, ...]] | None = None,
          **save: Any) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        config = hf_config(**fields)
        _, state = build_family_model(Wav2Vec2BertModel, Wav2Vec2BertConfig, config, seed)
        state = {f"{prefix}{k}": v for k, v in state.items()}
        generator = torch.Generator().manual_seed(seed * 10)
        state.update({k: torch.randn(shape, generator=generator) for k, shape in (heads or {}).items()})
        save_hf_checkpoint(directory, state, config, **save)
        (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
        return directory
    return build


# The adapter case comes first (the main case, DESIGN.md): the adapter is what transformers added to w2v-BERT for
# speech encoder-decoders, and its gradient parity (test_training.py takes each spec's first case) covers the blocks
# and the adapter in one compilation.
CASES: dict[str, Callable[[Path], object]] = {
    "w2vbert_adapter": _case(ADAPTER, seed=52),
    "w2vbert": _case(_TINY, seed=51),
    "w2vbert_rotary": _case(ROTARY, seed=53),
    # Transformer-XL positions and one adapter layer behind a projection from 32 to 48.
    "w2vbert_rel": _case({**_TINY, "position_embeddings_type": "relative", "add_adapter": True,
                          "output_hidden_size": 48}, seed=54),
    # No position embedding, in a CTC checkpoint: the encoder under `wav2vec2_bert.`, the head dropped.
    "w2vbert_ctc_bin": _case({**ROTARY, "position_embeddings_type": None, "vocab_size": 32,
                              "architectures": ["Wav2Vec2BertForCTC"]}, seed=55, prefix="wav2vec2_bert.",
                             heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)}, fmt="bin"),
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("w2vbert", "w2vbert_adapter")
