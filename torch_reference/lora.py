"""LoRA in the PyTorch reference: the same low-rank update as `flax_model.lora`, written independently.

`add_lora(model, layers, settings)` puts a forward hook on each adapted module (found by its PyTorch name) that
adds s · B(A(dropout(x))) to the module's output, PEFT's computation for a vanilla LoRA layer. The factors live
in the returned `LoraFactors` modules, outside the model, so that the model's `state_dict()` keeps transformers'
keys. `merge_lora_` folds them into the weights in place and removes the hooks (PEFT's `merge_and_unload`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from convert.base.lora import LoraLayer, LoraSettings


class LoraFactors(nn.Module):
    """A [r, in] and B [out, r] of one adapted layer, and the dropout on its input."""

    def __init__(self, layer: LoraLayer, settings: LoraSettings):
        super().__init__()
        self.layer = layer
        self.scaling = settings.scaling
        self.lora_A = nn.Parameter(torch.zeros(settings.rank, layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, settings.rank))
        self.dropout = nn.Dropout(settings.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def add_lora(model: nn.Module, layers: Iterable[LoraLayer], settings: LoraSettings,
             values: Mapping[str, Any] | None = None) -> nn.ModuleDict:
    """Adapts `model`'s layers; returns the factors (train them, or read their gradients).

    Args:
        model: the reference model whose module names are the layers' `torch_module`s.
        layers: from `convert.base.lora.find_lora_layers`.
        settings: rank, alpha, dropout.
        values: Flax path of a factor (`<module>/lora_A`, `.../lora_B`) -> array (PEFT's layout); zeros otherwise.

    Returns:
        A ModuleDict of `LoraFactors` keyed by the Flax module path with `/` written `__`. `.train()` on it turns
        on the LoRA dropout (the model's own `.train()` does not reach it).
    """
    factors = nn.ModuleDict()
    for layer in layers:
        module = model.get_submodule(layer.torch_module)
        lora = LoraFactors(layer, settings)
        if values is not None:
            with torch.no_grad():
                lora.lora_A.copy_(torch.from_numpy(np.asarray(values[layer.a_path], np.float32)))
                lora.lora_B.copy_(torch.from_numpy(np.asarray(values[layer.b_path], np.float32)))
        lora.hook = module.register_forward_hook(lambda _module, inputs, output, lora=lora: output + lora(inputs[0]))
        factors[layer.module.replace("/", "__")] = lora
    return factors


def lora_gradients(factors: nn.ModuleDict) -> dict[str, np.ndarray]:
    """Each factor's `.grad` (zeros where none was computed) by the factor's Flax path."""
    out = {}
    for lora in factors.values():
        for leaf, path in (("lora_A", lora.layer.a_path), ("lora_B", lora.layer.b_path)):
            param = getattr(lora, leaf)
            out[path] = (param.grad if param.grad is not None else torch.zeros_like(param)).detach().numpy().copy()
    return out


@torch.no_grad()
def merge_lora_(model: nn.Module, factors: nn.ModuleDict) -> None:
    """Adds s · B A to each adapted weight in place (transposed for weights stored (in, out)) and removes the
    hooks: the model is then a plain model."""
    for lora in factors.values():
        lora.hook.remove()
        weight = model.get_submodule(lora.layer.torch_module).weight
        delta = (lora.lora_B @ lora.lora_A) * lora.scaling  # [out, in]
        weight.add_(delta.T if lora.layer.fan_in_fan_out else delta)
