"""Plain-PyTorch HuBERT encoder whose `state_dict` keys equal Hugging Face's `HubertModel`.

wav2vec2's modules (`torch_reference.wav2vec2`) with HuBERT's positional conv: weight-normalised as in
wav2vec2, or with `conv_pos_batch_norm` a BatchNorm1d then a plain grouped conv. No adapter; the feature
projection's layer norm follows `feat_proj_layer_norm`. The BatchNorm has no `num_batches_tracked` counter (the
source rules drop it from checkpoints: it changes no output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.hubert import HubertConfig
from torch_reference.layers import ACTIVATIONS
from torch_reference.wav2vec2 import Encoder, PositionalConvEmbedding, Wav2Vec2Model, same_pad_trim


class BatchNorm(nn.Module):
    """torch's BatchNorm1d as transformers configures it (momentum 0.1, eps 1e-5), without the step counter
    `num_batches_tracked`, which only momentum=None would read (see convert.base.archs.hubert)."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, D, S]: running statistics in eval mode; in `.train()` the batch's, which also move the running
        ones."""
        return F.batch_norm(hidden, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=0.1, eps=1e-5)


class HubertPositionalConvEmbedding(PositionalConvEmbedding):
    """wav2vec2's weight-normalised positional conv, or a BatchNorm then a plain conv (`conv_pos_batch_norm`)."""

    def __init__(self, config: HubertConfig):
        if not config.conv_pos_batch_norm:
            super().__init__(config)
            self.batch_norm = None
            return
        nn.Module.__init__(self)
        kernel = config.num_conv_pos_embeddings
        self.batch_norm = BatchNorm(config.hidden_size)
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
