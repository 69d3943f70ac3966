"""GPT-2: the decoder core (`flax_model.decoder`) with GPT-2's layout; the names HF's Flax port used."""

from flax_model.decoder import CausalLM, init_shapes

GPT2LMHeadModule = CausalLM

__all__ = ["GPT2LMHeadModule", "init_shapes"]
