"""The decoder core in plain PyTorch: one causal LM for every decoder family (`convert.base.decoder_core`).

`model` (the causal LM), `layer` (a layer's blocks), `attention`, `masks`, `tree` (parameters at a family layout's
keys), `modules` (RMSNorm, GPT-2's transposed linear layer).
"""

from torch_reference.decoder.model import CausalLM

__all__ = ["CausalLM"]
