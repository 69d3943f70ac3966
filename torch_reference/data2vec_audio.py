"""Plain-PyTorch data2vec-audio encoder whose `state_dict` keys equal Hugging Face's `Data2VecAudioModel`.

wav2vec2's modules (`torch_reference.wav2vec2`, layer-norm feature encoder, post-norm layers, adapter) with
data2vec-audio's positional embedding: `num_conv_pos_embeddings` same-padded grouped convs, each followed by a
layer norm without parameters and the activation.
"""

from __future__ import annotations

import torch
from torch import nn

from convert.base.archs.data2vec_audio import Data2VecAudioConfig
from torch_reference.layers import ACTIVATIONS
from torch_reference.wav2vec2 import Encoder, Wav2Vec2Model, same_pad_trim


class PositionalConvLayer(nn.Module):
    def __init__(self, config: Data2VecAudioConfig):
        super().__init__()
        kernel = config.conv_pos_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=kernel, padding=kernel // 2,
                              groups=config.num_conv_pos_embedding_groups)
        self.num_pad_remove = same_pad_trim(kernel)
        self.layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False)
        self.activation = ACTIVATIONS[config.feat_extract_activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.conv(hidden)  # [B, D, S + num_pad_remove]
        if self.num_pad_remove:
            out = out[:, :, :-self.num_pad_remove]
        out = self.layer_norm(out.transpose(1, 2)).transpose(1, 2)
        return self.activation(out)


class Data2VecAudioPositionalConvEmbedding(nn.Module):
    def __init__(self, config: Data2VecAudioConfig):
        super().__init__()
        self.layers = nn.ModuleList(PositionalConvLayer(config) for _ in range(config.num_conv_pos_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.transpose(1, 2)  # [B, D, S]
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.transpose(1, 2)  # [B, S, D]


class Data2VecAudioEncoder(Encoder):
    POSITIONAL = Data2VecAudioPositionalConvEmbedding


class Data2VecAudioModel(Wav2Vec2Model):
    """HF's `Data2VecAudioModel` (same parameter names), returning the last hidden state (see `Wav2Vec2Model`)."""

    ENCODER = Data2VecAudioEncoder
