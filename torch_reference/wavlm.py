"""Plain-PyTorch WavLM encoder whose `state_dict` keys equal Hugging Face's `WavLMModel`.

wav2vec2's modules (`torch_reference.wav2vec2`) with WavLM's attention: layer 0 holds the bucketed relative
position embedding (`rel_attn_embed`) and computes the bias, which it hands to every later layer; each layer
scales it per head and query frame by a gate of its own input. LayerDrop never drops layer 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convert.base.archs.wavlm import WavLMConfig
from torch_reference.layers import layer_drop
from torch_reference.wav2vec2 import Attention, Encoder, EncoderLayer, Wav2Vec2Model


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """WavLM's bucket of each relative position (key - query), an integer tensor of any shape, as transformers
    computes it: exact below `num_buckets // 4`, log-spaced up to `max_distance`, half the buckets per sign."""
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half
    distance = relative.abs()
    max_exact = half // 2
    large = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    large = torch.clamp_max((max_exact + large).to(torch.long), half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class WavLMAttention(Attention):
    """wav2vec2's attention plus the gated relative position bias (and, in layer 0, its embedding)."""

    def __init__(self, config: WavLMConfig, has_relative_position_bias: bool):
        super().__init__(config)
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_bucket_distance
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))
        self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
        if has_relative_position_bias:
            self.rel_attn_embed = nn.Embedding(self.num_buckets, self.num_heads)

    def compute_bias(self, length: int) -> torch.Tensor:
        """The ungated bias [N, T, S] of a sequence of `length` frames."""
        positions = torch.arange(length, device=self.rel_attn_embed.weight.device)
        relative = positions[None, :] - positions[:, None]  # [T, S]: key - query
        buckets = relative_position_buckets(relative, self.num_buckets, self.max_distance)
        return self.rel_attn_embed(buckets).permute(2, 0, 1)  # [N, T, S]

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] padding bias or None; `position_bias` [N, T, S] from layer 0
        (None in layer 0, which computes it). Returns (output [B, T, D], the ungated position bias)."""
        b, t, _ = hidden.shape
        if position_bias is None:
            position_bias = self.compute_bias(t)
        per_head = hidden.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, T, H]
        gate = self.gru_rel_pos_linear(per_head).view(b, self.num_heads, t, 2, 4).sum(-1)  # [B, N, T, 2]
        gate_a, gate_b = torch.sigmoid(gate).chunk(2, dim=-1)  # [B, N, T, 1] each
        gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
        gated = gate * position_bias[None]  # [B, N, T, S]
        if bias is not None:
            gated = gated + bias
        return super().forward(hidden, gated), position_bias


class WavLMEncoderLayer(EncoderLayer):
    """wav2vec2's layer (either layout) with WavLM's attention; passes the position bias on."""

    def __init__(self, config: WavLMConfig, layer_id: int = 0):
        super().__init__(config, layer_id)
        self.attention = WavLMAttention(config, has_relative_position_bias=layer_id == 0)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre_norm:
            attended, position_bias = self.attention(self.layer_norm(hidden), bias, position_bias)
            hidden = hidden + self.dropout(attended)
            return hidden + self.feed_forward(self.final_layer_norm(hidden)), position_bias
        attended, position_bias = self.attention(hidden, bias, position_bias)
        hidden = self.layer_norm(hidden + self.dropout(attended))
        return self.final_layer_norm(hidden + self.feed_forward(hidden)), position_bias


class WavLMEncoder(Encoder):
    LAYER = WavLMEncoderLayer

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        hidden, bias = self.prepare(hidden, frame_mask)
        position_bias = None
        for i, layer in enumerate(self.layers):
            if i == 0 or not layer_drop(self.training, self.layerdrop):
                hidden, position_bias = layer(hidden, bias, position_bias)
        return self.layer_norm(hidden) if self.stable else hidden


class WavLMModel(Wav2Vec2Model):
    """HF's `WavLMModel` (same parameter names), returning the last hidden state (see `Wav2Vec2Model`)."""

    ENCODER = WavLMEncoder
