"""Plain-PyTorch wav2vec2-conformer encoder whose `state_dict` keys equal Hugging Face's `Wav2Vec2ConformerModel`.

wav2vec2's feature encoder, feature projection, SpecAugment and adapter (`torch_reference.wav2vec2`) around a stack
of conformer blocks (see `convert.base.archs.wav2vec2_conformer`). The encoder holds wav2vec2's weight-normalised
positional conv, as transformers' does, and never calls it. The BatchNorm of each block's convolution module is
HuBERT's (`torch_reference.hubert.BatchNorm`: running statistics in eval mode, the batch's in `.train()`, which also
move the running ones; no step counter).

`.train()` turns on dropout (hidden, attention, activation, `conformer_conv_dropout`, and the dropout after
self-attention, which transformers sizes by `attention_dropout`) and LayerDrop (`torch.rand` per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.wav2vec2_conformer import Wav2Vec2ConformerConfig
from torch_reference.hubert import BatchNorm
from torch_reference.layers import ACTIVATIONS, layer_drop
from torch_reference.wav2vec2 import FeedForward, PositionalConvEmbedding, Wav2Vec2Model

# transformers builds the blocks' layer norms with nn.LayerNorm's default eps, not config.layer_norm_eps.
_BLOCK_NORM_EPS = 1e-5


def relative_position_table(length: int, width: int) -> torch.Tensor:
    """Sinusoids of the relative positions length - 1 down to -(length - 1): [2 * length - 1, width].

    Row p describes the distance query - key = length - 1 - p; channels alternate sin, cos (Transformer-XL).
    """
    distance = torch.arange(length - 1, -length, -1, dtype=torch.float32)[:, None]  # [P, 1]
    inverse = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * -(math.log(10000.0) / width))  # [D/2]
    table = torch.zeros(2 * length - 1, width)
    table[:, 0::2] = torch.sin(distance * inverse)
    table[:, 1::2] = torch.cos(distance * inverse)
    return table


def rotate(hidden: torch.Tensor, inv_freq: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotary embedding of [B, T, D] per head: each head's two halves rotated by angle position * inv_freq."""
    b, t, d = hidden.shape
    angles = torch.arange(t, dtype=inv_freq.dtype)[:, None] * inv_freq  # [T, H/2]
    angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # [1, T, 1, H]
    heads = hidden.view(b, t, num_heads, d // num_heads)  # [B, T, N, H]
    first, second = heads.chunk(2, dim=-1)
    turned = torch.cat((-second, first), dim=-1)
    return (heads * angles.cos() + turned * angles.sin()).reshape(b, t, d)


def skew(by_distance: torch.Tensor) -> torch.Tensor:
    """[B, N, T, 2T - 1] scores per row of the relative table -> [B, N, T, T] per key (Transformer-XL's skew:
    left-pad one column and refold, so that row i starts at distance i)."""
    b, n, t, width = by_distance.shape
    skewed = F.pad(by_distance, (1, 0)).view(b, n, width + 1, t)[:, :, 1:].reshape(b, n, t, width)
    return skewed[..., :t]


class RotaryPositions(nn.Module):
    """Holds transformers' `inv_freq` buffer (saved in checkpoints); the angles are computed per call."""

    def __init__(self, config: Wav2Vec2ConformerConfig):
        super().__init__()
        dim = config.head_size
        self.register_buffer("inv_freq", 1.0 / config.rotary_embedding_base ** (
            torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# `SelfAttention`'s default kind: the config's `position_embeddings_type`.
FROM_CONFIG = "from config"


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary, relative (Transformer-XL: pos_bias_u/v, linear_pos) or no positions,
    or (w2v-BERT's, whose attention transformers copies from this one) Shaw's `relative_key` distance embeddings
    clamped to `left_max_position_embeddings` / `right_max_position_embeddings`.

    Args:
        config: the encoder config.
        width: the attention's width (default `hidden_size`; w2v-BERT's adapter attends at its output width).
        kind: the position embedding (default: the config's `position_embeddings_type`).
    """

    def __init__(self, config: Wav2Vec2ConformerConfig, width: int | None = None, kind: str | None = FROM_CONFIG):
        super().__init__()
        dim = width or config.hidden_size
        self.kind = config.position_embeddings_type if kind == FROM_CONFIG else kind
        self.num_heads = config.num_attention_heads
        self.head_size = dim // self.num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_dropout)
        if self.kind == "relative":
            self.linear_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
            self.pos_bias_v = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
        elif self.kind == "relative_key":
            self.left, self.right = config.left_max_position_embeddings, config.right_max_position_embeddings
            self.distance_embedding = nn.Embedding(self.left + self.right + 1, self.head_size)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] or None; `positions`: `inv_freq` (rotary), the relative table
        [2T - 1, D] (relative) or None."""
        b, t, d = hidden.shape
        heads = (b, t, self.num_heads, self.head_size)
        # Rotary: queries and keys are projected from the rotated input, values from the input itself.
        rotated = rotate(hidden, positions, self.num_heads) if self.kind == "rotary" else hidden
        q = self.linear_q(rotated).view(heads).transpose(1, 2)  # [B, N, T, H]
        k = self.linear_k(rotated).view(heads).transpose(1, 2)  # [B, N, S, H]
        v = self.linear_v(hidden).view(heads).transpose(1, 2)  # [B, N, S, H]
        scale = self.head_size ** -0.5
        if self.kind == "relative":
            p = self.linear_pos(positions).view(-1, self.num_heads, self.head_size).permute(1, 2, 0)  # [N, H, P]
            by_distance = torch.matmul(q + self.pos_bias_v[None, :, None, :], p[None])  # [B, N, T, P]
            scores = torch.matmul(q + self.pos_bias_u[None, :, None, :], k.transpose(2, 3)) * scale
            scores = scores + skew(by_distance) * scale
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, N, T, S]
        if self.kind == "relative_key":
            # Key j seen from query i at distance j - i, clamped to [-left, right].
            distance = torch.arange(t)[None, :] - torch.arange(t)[:, None]  # [T, S]
            embedded = self.distance_embedding(distance.clamp(-self.left, self.right) + self.left)  # [T, S, H]
            scores = scores + torch.einsum("bhld,lrd->bhlr", q, embedded.to(q.dtype)) * scale
        if bias is not None:
            scores = scores + bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        return self.linear_out(out)


class ConvolutionModule(nn.Module):
    """Layer norm, pointwise conv + GLU, depthwise conv, BatchNorm, activation, pointwise conv, dropout."""

    def __init__(self, config: Wav2Vec2ConformerConfig):
        super().__init__()
        dim, kernel = config.hidden_size, config.conv_depthwise_kernel_size
        self.layer_norm = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, kernel_size=1, bias=False)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim, bias=False)
        self.batch_norm = BatchNorm(dim)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.pointwise_conv2 = nn.Conv1d(dim, dim, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(config.conformer_conv_dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.layer_norm(hidden).transpose(1, 2)  # [B, D, T]
        hidden = F.glu(self.pointwise_conv1(hidden), dim=1)  # [B, D, T]
        hidden = self.activation(self.batch_norm(self.depthwise_conv(hidden)))
        return self.dropout(self.pointwise_conv2(hidden)).transpose(1, 2)  # [B, T, D]


class ConformerBlock(nn.Module):
    """Half-step feed-forward, self-attention, convolution module, half-step feed-forward, layer norm."""

    def __init__(self, config: Wav2Vec2ConformerConfig):
        super().__init__()
        dim = config.hidden_size
        self.ffn1_layer_norm = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.ffn1 = FeedForward(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.self_attn_dropout = nn.Dropout(config.attention_dropout)
        self.self_attn = SelfAttention(config)
        self.conv_module = ConvolutionModule(config)
        self.ffn2_layer_norm = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.ffn2 = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None,
                positions: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + 0.5 * self.ffn1(self.ffn1_layer_norm(hidden))
        attended = self.self_attn(self.self_attn_layer_norm(hidden), bias, positions)
        hidden = hidden + self.self_attn_dropout(attended)
        hidden = hidden + self.conv_module(hidden)
        hidden = hidden + 0.5 * self.ffn2(self.ffn2_layer_norm(hidden))
        return self.final_layer_norm(hidden)


class ConformerEncoder(nn.Module):
    """Dropout, the conformer blocks (LayerDrop in training) and the encoder's layer norm."""

    def __init__(self, config: Wav2Vec2ConformerConfig):
        super().__init__()
        self.kind = config.position_embeddings_type
        self.layerdrop = config.layerdrop
        if self.kind == "rotary":
            self.embed_positions = RotaryPositions(config)
        # Built as transformers builds it (same keys), never called (as in transformers).
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        bias = None
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask[:, :, None], 0.0)
            bias = (~frame_mask).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min  # [B, 1, 1, S]
        hidden = self.dropout(hidden)
        positions = None
        if self.kind == "rotary":
            positions = self.embed_positions.inv_freq
        elif self.kind == "relative":
            positions = relative_position_table(hidden.shape[1], hidden.shape[2]).to(hidden.dtype)
        for layer in self.layers:
            if not layer_drop(self.training, self.layerdrop):
                hidden = layer(hidden, bias, positions)
        return self.layer_norm(hidden)


class Wav2Vec2ConformerModel(Wav2Vec2Model):
    """HF's `Wav2Vec2ConformerModel` (same parameter names), returning the last hidden state (see `Wav2Vec2Model`)."""

    ENCODER = ConformerEncoder
