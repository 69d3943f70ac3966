"""The decoder core in flax.linen: one causal LM for every decoder family (`convert.base.decoder_core`).

`model` (the causal LM: embeddings, the stack, the head, the cache), `layer` (a layer's blocks and the stack),
`attention` (heads, rotary positions, scores), `masks`, `tree` (parameters at a family layout's names), `modules`
(RMSNorm, GPT-2's transposed linear layer).
"""

from flax_model.decoder.model import CausalLM, init_shapes

__all__ = ["CausalLM", "init_shapes"]
