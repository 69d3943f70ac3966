"""Plain-PyTorch HuBERT encoder whose `state_dict` keys equal Hugging Face's `HubertModel`.

wav2vec2's modules (`torch_reference.wav2vec2`) with HuBERT's positional conv: weight-normalised as in
wav2vec2, or with `conv_pos_batch_norm` a BatchNorm1d then a plain grouped conv. No adapter; the feature
projection's layer norm follows `feat_proj_layer_norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from convert.archs.hubert import HubertConfig
from torch_reference.layers import ACTIVATIONS
from torch_reference.wav2vec2 import Encoder, PositionalConvEmbedding, Wav2Vec2Model, same_pad_trim


class HubertPositionalConvEmbedding(PositionalConvEmbedding):
    """wav2vec2's weight-normalised positional conv, or a BatchNorm then a plain conv (`conv_pos_batch_norm`)."""

    def __init__(self, config: HubertConfig):
        if not config.conv_pos_batch_norm:
            super().__init__(config)
            self.batch_norm = None
            return
        nn.Module.__init__(self)
        kernel = config.num_conv_pos_embeddings
        self.batch_norm = nn.BatchNorm1d(config.hidden_size)
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=kernel, padding=kernel // 2,
                              groups=config.num_conv_pos_embedding_groups)
        self.num_pad_remove = same_pad_trim(kernel)
        self.activation = ACTIVATIONS[config.feat_extract_activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.batch_norm is None:
            return super().forward(hidden)
        out = self.conv(self.batch_norm(hidden.transpose(1, 2)))  # [B, D, S + num_pad_remove]
        if self.num_pad_remove:
            out = out[:, :, :-self.num_pad_remove]
        return self.activation(out).transpose(1, 2)  # [B, S, D]


class HubertEncoder(Encoder):
    POSITIONAL = HubertPositionalConvEmbedding


class HubertModel(Wav2Vec2Model):
    """HF's `HubertModel` (same parameter names), returning the last hidden state (see `Wav2Vec2Model`)."""

    ENCODER = HubertEncoder
