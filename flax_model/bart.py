"""BART / mBART: the decoder core (`flax_model.decoder`) with BART's layout; the names HF's Flax port used."""

from flax_model.decoder import CausalLM, init_shapes

BartForCausalLMModule = CausalLM

__all__ = ["BartForCausalLMModule", "init_shapes"]
