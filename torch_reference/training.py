"""The training loss of the reference, written as transformers computes it, and the helpers that compare its
gradients with the Flax model's.

`label_loss` is `SpeechEncoderDecoderModel.forward(labels=...)`'s `CrossEntropyLoss()` without smoothing and
`transformers.trainer_pt_utils.LabelSmoother` with it, in plain PyTorch; it shares no code with the Flax loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convert.base.composed import composed_keymap, composed_tied_keys

IGNORE_INDEX = -100
# HF's name of the conv feature encoder in every speech encoder of the wav2vec2 family (`freeze_feature_encoder`).
FEATURE_ENCODER = "feature_extractor"


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """transformers' `shift_tokens_right`: start token, then labels[:, :-1], -100 replaced by the pad id."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def label_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not -100; `LabelSmoother`'s formula when smoothing."""
    if label_smoothing == 0.0:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    neg_log_probs = -F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    labels = labels[..., None]
    padding = labels.eq(IGNORE_INDEX)
    nll = neg_log_probs.gather(dim=-1, index=labels.clamp(min=0)).masked_fill(padding, 0.0)
    smoothed = neg_log_probs.sum(dim=-1, keepdim=True).masked_fill(padding, 0.0)
    active = padding.numel() - padding.long().sum()
    return ((1 - label_smoothing) * nll.sum() / active
            + label_smoothing * smoothed.sum() / (active * neg_log_probs.shape[-1]))


def freeze_feature_encoder(model: torch.nn.Module) -> list[str]:
    """As transformers' `freeze_feature_encoder()`: the conv feature encoder's parameters stop requiring
    gradients (so an optimiser built afterwards never updates them). Returns the frozen keys."""
    frozen = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "encoder" and FEATURE_ENCODER in parts:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def gradients_in_flax_layout(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter's `.grad` (zeros where none was computed), as `/`-joined Flax paths and layouts.

    Tied parameters appear once, under the key the files keep.
    """
    config = model.config
    keymap = composed_keymap(config)
    tied = composed_tied_keys(config)
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        path, transform = keymap.to_flax(name)
        out[path] = transform.to_flax(grad.detach().numpy())
    return out


def state_with(model: torch.nn.Module, params: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The model's state dict with `params` (key -> tensor or array) written over it; tied keys left out."""
    tied = set(composed_tied_keys(model.config))
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in tied}
    for key, value in (params or {}).items():
        if key in tied:
            continue
        if key not in state:
            raise KeyError(key)
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: shape {list(tensor.shape)}, expected {list(state[key].shape)}")
        state[key] = tensor
    return state
