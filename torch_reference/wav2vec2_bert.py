"""Plain-PyTorch w2v-BERT 2.0 encoder whose `state_dict` keys equal Hugging Face's `Wav2Vec2BertModel`.

Input: `SeamlessM4TFeatureExtractor`'s stacked log-mel frames [B, S, F] and their mask [B, S] (see
`convert.base.archs.wav2vec2_bert` for the architecture). The self-attention (with Shaw's relative keys) and the
relative table are wav2vec2-conformer's (`torch_reference.wav2vec2_conformer`: transformers copies them from there),
the feed-forward the family's (`torch_reference.wav2vec2.FeedForward`).

`.train()` turns on dropout (hidden, attention, activation, feature projection, `conformer_conv_dropout`) and
LayerDrop of the conformer blocks (`torch.rand` per block). transformers also drops adapter layers at random in
training, which changes the output length; the Flax model cannot (static shapes), so neither does this reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convert.base.archs.wav2vec2_bert import Wav2Vec2BertConfig
from convert.base.errors import UnsupportedConfig
from torch_reference.layers import ACTIVATIONS, layer_drop
from torch_reference.wav2vec2 import FeedForward, spec_augment
from torch_reference.wav2vec2_conformer import SelfAttention, relative_position_table


def rotary_frequencies(config: Wav2Vec2BertConfig) -> torch.Tensor:
    """transformers' `inv_freq` [H/2] (a non-persistent buffer there: computed from the config, never stored)."""
    h = config.head_size
    return 1.0 / (config.rotary_embedding_base ** (torch.arange(0, h, 2, dtype=torch.int64).float() / h))


def padding_bias(frame_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] bool (True for real frames) -> the attention's additive bias [B, 1, 1, S] (0 or the dtype's min)."""
    return (~frame_mask).to(dtype)[:, None, None, :] * torch.finfo(dtype).min


class ConvolutionModule(nn.Module):
    """Layer norm, padded frames zeroed, pointwise conv + GLU, causal depthwise conv, layer norm, activation,
    pointwise conv, dropout."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.kernel = config.conv_depthwise_kernel_size
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, kernel_size=1, bias=False)
        self.depthwise_conv = nn.Conv1d(dim, dim, self.kernel, groups=dim, bias=False)
        self.depthwise_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.pointwise_conv2 = nn.Conv1d(dim, dim, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(config.conformer_conv_dropout)

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.layer_norm(hidden)
        if frame_mask is not None:  # padded frames must not leak into real ones through the conv
            hidden = hidden.masked_fill(~frame_mask[:, :, None], 0.0)
        hidden = F.glu(self.pointwise_conv1(hidden.transpose(1, 2)), dim=1)  # [B, D, T]
        hidden = self.depthwise_conv(F.pad(hidden, (self.kernel - 1, 0)))  # causal: every pad on the left
        hidden = self.activation(self.depthwise_layer_norm(hidden.transpose(1, 2)))  # [B, T, D]
        return self.dropout(self.pointwise_conv2(hidden.transpose(1, 2))).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Half-step feed-forward, self-attention, convolution module, half-step feed-forward, layer norm."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.ffn1_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn1 = FeedForward(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn_dropout = nn.Dropout(config.attention_dropout)
        self.self_attn = SelfAttention(config)
        self.conv_module = ConvolutionModule(config)
        self.ffn2_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn2 = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None,
                frame_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + 0.5 * self.ffn1(self.ffn1_layer_norm(hidden))
        attended = self.self_attn(self.self_attn_layer_norm(hidden), bias, positions)
        hidden = hidden + self.self_attn_dropout(attended)
        hidden = hidden + self.conv_module(hidden, frame_mask)
        hidden = hidden + 0.5 * self.ffn2(self.ffn2_layer_norm(hidden))
        return self.final_layer_norm(hidden)


class ConformerEncoder(nn.Module):
    """Padded frames zeroed, dropout, the conformer blocks (LayerDrop in training); no layer norm after them."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        c = self.config
        bias = None
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask[:, :, None], 0.0)
            bias = padding_bias(frame_mask, hidden.dtype)
        hidden = self.dropout(hidden)
        positions = None
        if c.position_embeddings_type == "rotary":
            positions = rotary_frequencies(c)
        elif c.position_embeddings_type == "relative":
            positions = relative_position_table(hidden.shape[1], c.hidden_size).to(hidden.dtype)
        for layer in self.layers:
            if not layer_drop(self.training, c.layerdrop):
                hidden = layer(hidden, bias, positions, frame_mask)
        return hidden


def _subsample(conv: nn.Conv1d, norm: nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    """Layer norm, then a strided conv + GLU over time: [B, S, D] -> [B, S', D]."""
    return F.glu(conv(norm(hidden).transpose(1, 2)), dim=1).transpose(1, 2)


class AdapterLayer(nn.Module):
    """Subsamples the residual and the attention's input by strided convs + GLU, attends over the subsampled
    frames with their own padding mask, then a feed-forward."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        width, eps = config.encoder_output_size, config.layer_norm_eps
        kernel, stride = config.adapter_kernel_size, config.adapter_stride
        self.residual_layer_norm = nn.LayerNorm(width, eps=eps)
        self.residual_conv = nn.Conv1d(width, 2 * width, kernel, stride=stride, padding=stride // 2)
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.self_attn_conv = nn.Conv1d(width, 2 * width, kernel, stride=stride, padding=stride // 2)
        self.self_attn = SelfAttention(config, width, None)
        self.self_attn_dropout = nn.Dropout(config.conformer_conv_dropout)
        self.ffn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = FeedForward(config, config.adapter_act, width)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `lengths` [B]: each row's real frames after this layer's subsampling, or None."""
        residual = _subsample(self.residual_conv, self.residual_layer_norm, hidden)  # [B, S', D]
        hidden = _subsample(self.self_attn_conv, self.self_attn_layer_norm, hidden)  # [B, S', D]
        bias = None
        if lengths is not None:
            bias = padding_bias(torch.arange(hidden.shape[1])[None, :] < lengths[:, None], hidden.dtype)
        hidden = self.self_attn_dropout(self.self_attn(hidden, bias)) + residual
        return self.ffn(self.ffn_layer_norm(hidden)) + hidden


class Adapter(nn.Module):
    """A projection when the widths differ, then the subsampling layers (each recomputing the padding mask)."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        self.config = config
        self.proj = self.proj_layer_norm = None
        if config.encoder_output_size != config.hidden_size:
            self.proj = nn.Linear(config.hidden_size, config.encoder_output_size)
            self.proj_layer_norm = nn.LayerNorm(config.encoder_output_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(AdapterLayer(config) for _ in range(config.num_adapter_layers))

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        if self.proj is not None:
            hidden = self.proj_layer_norm(self.proj(hidden))  # [B, S, D_out]
        lengths = None if frame_mask is None else frame_mask.sum(-1)
        for layer in self.layers:
            lengths = None if lengths is None else self.config.subsampled_lengths(lengths)
            hidden = layer(hidden, lengths)
        return hidden


class FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.input_feature_size, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.input_feature_size, config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projection(self.layer_norm(features)))  # [B, S, D]


class Wav2Vec2BertModel(nn.Module):
    """HF's `Wav2Vec2BertModel` (same parameter names), returning the last hidden state."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        self.config = config
        self.feature_projection = FeatureProjection(config)
        if config.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = ConformerEncoder(config)
        if config.use_intermediate_ffn_before_adapter:
            self.intermediate_ffn = FeedForward(config, "relu")
        self.adapter = Adapter(config) if config.add_adapter else None

    def freeze_feature_encoder(self) -> None:
        raise UnsupportedConfig("freeze_feature_encoder: wav2vec2-bert has no conv feature encoder (it reads log-mel "
                                "features), so there is nothing to freeze")

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mask_time_indices: torch.Tensor | None = None,
                mask_feature_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes feature frames.

        Args:
            input_features: [B, S, F] stacked log-mel frames (`SeamlessM4TFeatureExtractor`).
            attention_mask: [B, S], 1 for real frames, 0 for right padding; None if nothing is padded.
            mask_time_indices: [B, S] bool, SpecAugment's masked frames, or None (applied whenever given).
            mask_feature_indices: [B, D] bool, SpecAugment's masked channels (D: `hidden_size`), or None.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        frame_mask = None if attention_mask is None else attention_mask.bool()
        hidden = self.feature_projection(input_features)  # [B, S, D]
        hidden = spec_augment(self.config, hidden, getattr(self, "masked_spec_embed", None), mask_time_indices,
                              mask_feature_indices)
        hidden = self.encoder(hidden, frame_mask)
        if self.config.use_intermediate_ffn_before_adapter:
            hidden = hidden + 0.5 * self.intermediate_ffn(hidden)
        if self.adapter is not None:
            hidden = self.adapter(hidden, frame_mask)
        return hidden
