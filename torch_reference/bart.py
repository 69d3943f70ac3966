"""BART / mBART: the decoder core (`torch_reference.decoder`) with BART's layout; transformers' class name."""

from torch_reference.decoder import CausalLM

BartForCausalLM = CausalLM

__all__ = ["BartForCausalLM"]
