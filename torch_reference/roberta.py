"""RoBERTa: the decoder core (`torch_reference.decoder`) with RoBERTa's layout and what is its own: positions
counted from the token ids (`roberta_position_ids`). `state_dict()` keys are transformers 5's `RobertaForCausalLM`.
"""

from __future__ import annotations

import torch

from torch_reference.decoder import CausalLM


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """transformers' `create_position_ids_from_input_ids`: input_ids [B, T] -> position ids [B, T].

    A pad token sits at `padding_idx`; any other at `padding_idx` + its count among this call's non-pad tokens
    + `past_length` (every cached position, pads included).
    """
    real = input_ids.ne(padding_idx).long()
    return (torch.cumsum(real, dim=1) + past_length) * real + padding_idx


class RobertaForCausalLM(CausalLM):
    """RoBERTa with an LM head and optional cross-attention, HF `RobertaForCausalLM` state_dict keys. Pad tokens
    (`pad_token_id`) take the padding position, as in transformers."""

    def position_ids(self, input_ids: torch.Tensor | None, length: int, start: int) -> torch.Tensor:
        pad = self.config.pad_token_id
        if input_ids is None:  # transformers' `create_position_ids_from_inputs_embeds`: every token is real
            return torch.arange(pad + 1 + start, pad + 1 + start + length)[None]
        return roberta_position_ids(input_ids, pad, start)
