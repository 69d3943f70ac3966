"""Small pieces shared by the reference architectures: activations, frame masks, LayerDrop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def frame_mask(encoder_config: Any, attention_mask: torch.Tensor, num_frames: int,
               add_adapter: bool | None = None) -> torch.Tensor:
    """Which of an encoder's output frames hold real audio, from the sample-level mask: [B, N] -> [B, S] bool,
    True for the first `encoder_config.output_lengths(sum(attention_mask))` frames of each row."""
    lengths = encoder_config.output_lengths(attention_mask.sum(-1).long(), add_adapter)  # [B]
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def layer_drop(training: bool, rate: float) -> bool:
    """LayerDrop as transformers does it: in training, skip the layer when a fresh `torch.rand([])` < rate."""
    return training and rate > 0.0 and bool(torch.rand([]) < rate)
