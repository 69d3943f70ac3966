"""RoBERTa: the decoder core (`flax_model.decoder`) with RoBERTa's layout and what is its own: positions counted
from the token ids (`roberta_position_ids`). HF's Flax param tree `roberta/...` as BERT's `bert/...`, and the head
`lm_head/{dense, layer_norm, bias}` plus, untied only, `lm_head/decoder/{kernel,bias}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_model.decoder import CausalLM, init_shapes


def roberta_position_ids(input_ids: jax.Array, padding_idx: int, past_length: jax.Array | int = 0) -> jax.Array:
    """transformers' `create_position_ids_from_input_ids`: input_ids [B, T] -> position ids [B, T] int32.

    A pad token (`padding_idx`) sits at `padding_idx`; any other token at `padding_idx` + the count of non-pad
    tokens up to and including it in this call + `past_length` (the cached positions, pads among them counted).
    """
    real = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1, dtype=jnp.int32) + past_length) * real + padding_idx


class RobertaForCausalLMModule(CausalLM):
    """RoBERTa with an LM head and optional cross-attention (HF `FlaxRobertaForCausalLMModule` params). Pad tokens
    (`pad_token_id`) take the padding position, as in transformers."""

    def position_ids(self, input_ids: jax.Array | None, length: int, start: jax.Array | int) -> jax.Array:
        pad = self.config.pad_token_id
        if input_ids is None:  # transformers' `create_position_ids_from_inputs_embeds`: every token is real
            return (pad + 1 + start + jnp.arange(length, dtype=jnp.int32))[None]
        return roberta_position_ids(input_ids, pad, start)  # [B, T]


__all__ = ["RobertaForCausalLMModule", "init_shapes", "roberta_position_ids"]
