"""GPT-2: the decoder core (`torch_reference.decoder`) with GPT-2's layout; transformers' names."""

from torch_reference.decoder import CausalLM
from torch_reference.decoder.modules import Conv1D

GPT2LMHeadModel = CausalLM

__all__ = ["Conv1D", "GPT2LMHeadModel"]
