"""The two module kinds of the decoder core that torch.nn lacks: RMSNorm and GPT-2's transposed linear layer."""

from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """GPT-2's linear layer: `x @ weight + bias` with the weight stored (in, out), transposed from nn.Linear."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).normal_(std=std))  # [in, out]
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) times (offset + weight), computed in float32 as transformers does.

    `offset` 0 is Llama's RMSNorm (the normalised input cast back to the dtype, then scaled); 1 is Gemma's, whose
    stored weights are centred on 0 (scaled in float32, then cast).
    """

    def __init__(self, width: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width) if offset else torch.ones(width))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 in a float64 run
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.to(h.dtype))).type_as(x)
        return self.weight * h.to(x.dtype)
