"""Plain-PyTorch RoBERTa as a causal LM with optional cross-attention (HF `RobertaForCausalLM` keys).

`state_dict()` keys equal transformers 5's `RobertaForCausalLM` (`roberta.*` as BERT's `bert.*`, and
`lm_head.{dense, layer_norm, decoder, bias}`). The modules are `torch_reference.bert`'s; RoBERTa differs in its
positions (`roberta_position_ids`, from the token ids) and its head's fixed exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.roberta import RobertaConfig
from torch_reference.bert import BertModel, VocabularyProjection
from torch_reference.layers import DecoderCache


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """transformers' `create_position_ids_from_input_ids`: input_ids [B, T] -> position ids [B, T].

    A pad token sits at `padding_idx`; any other at `padding_idx` + its count among this call's non-pad tokens
    + `past_length` (every cached position, pads included).
    """
    real = input_ids.ne(padding_idx).long()
    return (torch.cumsum(real, dim=1) + past_length) * real + padding_idx


class RobertaLMHead(VocabularyProjection):
    """`dense`, exact GELU, `layer_norm`, then `decoder` onto the vocabulary (see `VocabularyProjection`)."""

    def __init__(self, config: RobertaConfig, word_embeddings: nn.Embedding):
        super().__init__(config, word_embeddings)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))))


class RobertaForCausalLM(nn.Module):
    """RoBERTa with an LM head and optional cross-attention, HF `RobertaForCausalLM` state_dict keys."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = BertModel(config, position_padding_idx=config.pad_token_id)
        self.lm_head = RobertaLMHead(config, self.roberta.embeddings.word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:
        """Next-token logits; see `torch_reference.bert.BertLMHeadModel.forward`. Pad tokens (`pad_token_id`)
        take the padding position, as in transformers."""
        positions = roberta_position_ids(input_ids, self.config.pad_token_id, cache.index if cache is not None else 0)
        hidden, cache = self.roberta(input_ids, positions, attention_mask, encoder_hidden_states,
                                     encoder_attention_mask, cache)
        return self.lm_head(hidden), cache

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: torch.Tensor | None = None,
                   encoder_attention_mask: torch.Tensor | None = None) -> DecoderCache:
        """An empty self-attention cache of `max_length` slots, with the cross-attention keys/values projected."""
        return self.roberta.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)
