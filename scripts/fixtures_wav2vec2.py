"""Tiny seeded wav2vec2 checkpoints in Hugging Face format, built from `torch_reference.wav2vec2`.

Each case writes a full HF-style `config.json` and the weights of a randomised tiny model. Norm scales
and biases are randomised too, so that a misplaced norm or a swapped scale/bias shows in the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.wav2vec2 import Wav2Vec2Config
from scripts.fixture_io import save_hf_checkpoint
from torch_reference.wav2vec2 import Wav2Vec2Model

# Every field HF's Wav2Vec2Config writes into config.json, at HF's defaults (save_pretrained output).
_HF_DEFAULTS: dict[str, Any] = {
    "activation_dropout": 0.1,
    "adapter_attn_dim": None,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "add_adapter": False,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2Model"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "classifier_proj_size": 256,
    "codevector_dim": 256,
    "contrastive_logits_temperature": 0.1,
    "conv_bias": False,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "diversity_loss_weight": 0.1,
    "do_stable_layer_norm": False,
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
    "model_type": "wav2vec2",
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
    "proj_codevector_dim": 256,
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "torch_dtype": "float32",
    "transformers_version": "4.46.3",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
    "xvector_output_dim": 512,
}

# The tiny model every case starts from: 3 convs (the first with kernel 10 / stride 5, like the real
# ones), an even positional kernel (exercises the same-pad trim) and 2 groups.
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
    "output_hidden_size": 32,
}

# The two layouts: wav2vec2-base (group norm, post-norm layers) and large-lv60 / XLS-R (layer norm,
# pre-norm layers, conv biases). The stable one has no SpecAugment embedding, other activations and a
# layer_norm_eps that differs from the fixed 1e-5 of the conv and adapter norms, so mixing them up shows.
GROUP = {**_TINY, "feat_extract_norm": "group", "do_stable_layer_norm": False}
STABLE = {**_TINY, "feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True,
          "mask_time_prob": 0.0, "hidden_act": "gelu_new", "feat_extract_activation": "gelu_pytorch_tanh",
          "layer_norm_eps": 1e-4}


def hf_config(**fields: Any) -> dict[str, Any]:
    """A full HF `config.json` dict for a wav2vec2 model: HF's defaults with `fields` written over them."""
    return {**_HF_DEFAULTS, **fields}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every parameter and buffer from a seeded generator (norm scales around 1, weight-norm g and
    BatchNorm running variances positive), so that a misplaced tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            module_name = name.split(".")[-2] if "." in name else ""
            if name.endswith("parametrizations.weight.original0"):
                value = 0.5 + noise.abs()
            elif module_name.endswith("norm") and name.endswith(".weight"):
                value = 1.0 + 0.2 * noise
            elif param.ndim == 1:
                value = 0.2 * noise
            else:
                value = noise / math.sqrt(param[0].numel())
            param.copy_(value)
        for name, buffer in sorted(model.named_buffers()):
            if not buffer.is_floating_point():
                continue
            noise = torch.randn(buffer.shape, generator=generator)
            buffer.copy_(0.5 + noise.abs() if name.endswith("running_var") else 0.2 * noise)
    return model


def build_family_model(model_class: type[torch.nn.Module], config_class: type, config_dict: dict[str, Any],
                       seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The randomised reference model of a wav2vec2-family architecture for a config dict, and its state dict."""
    model = randomize(model_class(config_class.from_hf_dict(config_dict)), seed)
    return model, model.state_dict()


def build_model(config_dict: dict[str, Any], seed: int) -> tuple[Wav2Vec2Model, dict[str, torch.Tensor]]:
    """The randomised reference model for a config dict, and its state dict."""
    return build_family_model(Wav2Vec2Model, Wav2Vec2Config, config_dict, seed)


def family_case(model_class: type[torch.nn.Module], config_class: type, defaults: dict[str, Any],
                fields: dict[str, Any], seed: int, **save: Any) -> Callable[[Path], Path]:
    """A fixture builder: HF `defaults` with `fields` over them, a randomised model, saved as HF saves it."""
    def build(directory: Path) -> Path:
        config = {**defaults, **fields}
        _, state = build_family_model(model_class, config_class, config, seed)
        return save_hf_checkpoint(directory, state, config, **save)
    return build


def task_case(model_class: type[torch.nn.Module], config_class: type, defaults: dict[str, Any],
              fields: dict[str, Any], seed: int, prefix: str, heads: dict[str, tuple[int, ...]],
              **save: Any) -> Callable[[Path], Path]:
    """A task model's checkpoint (e.g. `...ForCTC`): the encoder under `prefix.` plus random `heads` tensors."""
    def build(directory: Path) -> Path:
        config = {**defaults, **fields}
        _, state = build_family_model(model_class, config_class, config, seed)
        generator = torch.Generator().manual_seed(seed * 10)
        state = {f"{prefix}.{k}": v for k, v in state.items()}
        state.update({k: torch.randn(shape, generator=generator) for k, shape in heads.items()})
        return save_hf_checkpoint(directory, state, config, **save)
    return build


def _case(fields: dict[str, Any], seed: int, **save: Any) -> Callable[[Path], Path]:
    return family_case(Wav2Vec2Model, Wav2Vec2Config, _HF_DEFAULTS, fields, seed, **save)


# Wav2Vec2ForCTC layout: the encoder under `wav2vec2.` plus the `lm_head` the encoder drops.
_ctc = task_case(Wav2Vec2Model, Wav2Vec2Config, _HF_DEFAULTS, {**GROUP, "architectures": ["Wav2Vec2ForCTC"]},
                 seed=9, prefix="wav2vec2", heads={"lm_head.weight": (32, 32), "lm_head.bias": (32,)})

WEIGHT_NORM_OLD_NAMES = {
    "encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv_embed.conv.weight_g",
    "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv_embed.conv.weight_v",
}

CASES: dict[str, Callable[[Path], object]] = {
    "w2v_group": _case(GROUP, seed=1),
    "w2v_stable": _case(STABLE, seed=2),
    "w2v_group_adapter": _case({**GROUP, "add_adapter": True, "output_hidden_size": 48, "num_adapter_layers": 2,
                                "layer_norm_eps": 1e-4}, seed=3),
    "w2v_stable_adapter": _case({**STABLE, "add_adapter": True, "num_adapter_layers": 2}, seed=4),
    "w2v_bin": _case(GROUP, seed=5, fmt="bin"),
    "w2v_bin_sharded": _case(GROUP, seed=6, fmt="bin", shards=3),
    "w2v_sharded": _case(GROUP, seed=7, shards=3),
    "w2v_old_weightnorm": _case(GROUP, seed=8, rename=WEIGHT_NORM_OLD_NAMES),
    # Wider than the tiny decoders (48 vs 32), so composing it needs the encoder->decoder projection.
    "w2v_stable_wide": _case({**STABLE, "hidden_size": 48, "intermediate_size": 96, "output_hidden_size": 48,
                              "conv_dim": [48, 48, 48]}, seed=10),
    "w2v_ctc": _ctc,
}

# The cases parity_tests/test_pairs.py composes with every decoder (DESIGN.md, "Adding an architecture").
PAIR_CASES = ("w2v_group", "w2v_group_adapter")
