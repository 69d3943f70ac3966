"""Plain-PyTorch wav2vec2 encoder whose `state_dict` keys equal Hugging Face's `Wav2Vec2Model`.

Both encoder layouts: `do_stable_layer_norm=False` (post-norm layers, the encoder's layer norm before them,
as in wav2vec2-base-960h) and `True` (pre-norm layers, the layer norm after them, as in large-lv60 and
XLS-R). The conv feature encoder's norm (`group` on the first layer or `layer` on every layer) is chosen
independently. Eval-mode inference is what the parity tests check; dropout is applied in training mode,
SpecAugment and LayerDrop are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from convert.archs.wav2vec2 import Wav2Vec2Config
from torch_reference.layers import ACTIVATIONS, frame_mask

# HF's defaults: nn.GroupNorm / nn.LayerNorm in the conv feature encoder and the adapter do not take
# config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5
_ADAPTER_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------------------------------------
# Lengths and masks


def feature_vector_mask(config: Wav2Vec2Config, attention_mask: torch.Tensor, num_frames: int,
                        add_adapter: bool | None = None) -> torch.Tensor:
    """Which frames hold real audio, from the sample-level mask.

    Args:
        config: the encoder config.
        attention_mask: [B, N], 1 for real samples (right padding).
        num_frames: S, the number of frames of the padded batch.
        add_adapter: count the adapter's strided convs too; defaults to `config.add_adapter`.

    Returns:
        [B, S] bool, True for the first `config.output_lengths(sum(attention_mask))` frames of each row.
    """
    return frame_mask(config, attention_mask, num_frames, add_adapter)


# ----------------------------------------------------------------------------------------------------------
# Feature encoder


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm (if any) and activation."""

    def __init__(self, config: Wav2Vec2Config, layer_id: int):
        super().__init__()
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=config.conv_kernel[layer_id],
                              stride=config.conv_stride[layer_id], bias=config.conv_bias)
        if config.feat_extract_norm == "layer":
            self.layer_norm: nn.Module | None = nn.LayerNorm(out_dim, eps=_CONV_NORM_EPS)
        elif layer_id == 0:
            # One group per channel: each channel is normalised over time.
            self.layer_norm = nn.GroupNorm(num_groups=out_dim, num_channels=out_dim, eps=_CONV_NORM_EPS)
        else:
            self.layer_norm = None
        self.activation = ACTIVATIONS[config.feat_extract_activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(hidden)  # [B, C, L]
        if isinstance(self.layer_norm, nn.LayerNorm):
            hidden = self.layer_norm(hidden.transpose(1, 2)).transpose(1, 2)
        elif self.layer_norm is not None:
            hidden = self.layer_norm(hidden)
        return self.activation(hidden)


class FeatureEncoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.ModuleList(ConvLayer(config, i) for i in range(len(config.conv_dim)))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden = input_values[:, None, :]  # [B, 1, N]
        for layer in self.conv_layers:
            hidden = layer(hidden)
        return hidden  # [B, C, S]


class FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = (nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
                           if config.feat_proj_layer_norm else None)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            features = self.layer_norm(features)
        return self.dropout(self.projection(features))  # [B, S, D]


# ----------------------------------------------------------------------------------------------------------
# Transformer encoder


class PositionalConvEmbedding(nn.Module):
    """A grouped, weight-normalised conv over time whose output is added to the frames."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        kernel = config.num_conv_pos_embeddings
        conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=kernel, padding=kernel // 2,
                         groups=config.num_conv_pos_embedding_groups)
        # dim=2: one magnitude per kernel tap, g of shape [1, 1, K] (HF's and fairseq's choice).
        self.conv = weight_norm(conv, name="weight", dim=2)
        # Symmetric padding of an even kernel yields one frame too many; the last one is dropped.
        self.num_pad_remove = 1 if kernel % 2 == 0 else 0
        self.activation = ACTIVATIONS[config.feat_extract_activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.conv(hidden.transpose(1, 2))  # [B, D, S + num_pad_remove]
        if self.num_pad_remove:
            out = out[:, :, :-self.num_pad_remove]
        return self.activation(out).transpose(1, 2)  # [B, S, D]


class Attention(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, T, D]; `bias` [B, 1, 1, S] additive (0 or the dtype's min), or None."""
        b, t, d = hidden.shape
        heads = (b, t, self.num_heads, self.head_dim)
        q = (self.q_proj(hidden) * self.scaling).view(heads)  # [B, T, N, H]
        k = self.k_proj(hidden).view(heads)  # [B, S, N, H]
        v = self.v_proj(hidden).view(heads)  # [B, S, N, H]
        scores = torch.einsum("BTNH,BSNH->BNTS", q, k)
        if bias is not None:
            scores = scores + bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.einsum("BNTS,BSNH->BTNH", probs, v).reshape(b, t, d)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.intermediate_dropout(self.activation(self.intermediate_dense(hidden)))  # [B, T, F]
        return self.output_dropout(self.output_dense(hidden))


class EncoderLayer(nn.Module):
    """A transformer layer: post-norm, or pre-norm when `config.do_stable_layer_norm`."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = config.do_stable_layer_norm
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.dropout(self.attention(self.layer_norm(hidden), bias))
            return hidden + self.feed_forward(self.final_layer_norm(hidden))
        hidden = self.layer_norm(hidden + self.dropout(self.attention(hidden, bias)))
        return self.final_layer_norm(hidden + self.feed_forward(hidden))


class Encoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.stable = config.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        bias = None
        if frame_mask is not None:
            # Padded frames are zeroed so that the positional conv does not carry them into real ones.
            hidden = hidden.masked_fill(~frame_mask[:, :, None], 0.0)
            bias = (~frame_mask).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min  # [B, 1, 1, S]
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.stable:
            hidden = self.layer_norm(hidden)
        hidden = self.dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        if self.stable:
            hidden = self.layer_norm(hidden)
        return hidden


# ----------------------------------------------------------------------------------------------------------
# Adapter


class AdapterLayer(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        width = config.encoder_output_size
        self.conv = nn.Conv1d(width, 2 * width, config.adapter_kernel_size, stride=config.adapter_stride, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.glu(self.conv(hidden), dim=1)  # [B, D_out, S']


class Adapter(nn.Module):
    """Strided conv + GLU layers that shorten the encoder output (after a projection when widths differ)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.proj = self.proj_layer_norm = None
        if config.encoder_output_size != config.hidden_size:
            self.proj = nn.Linear(config.hidden_size, config.encoder_output_size)
            self.proj_layer_norm = nn.LayerNorm(config.encoder_output_size, eps=_ADAPTER_NORM_EPS)
        self.layers = nn.ModuleList(AdapterLayer(config) for _ in range(config.num_adapter_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            hidden = self.proj_layer_norm(self.proj(hidden))  # [B, S, D_out]
        hidden = hidden.transpose(1, 2)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.transpose(1, 2)  # [B, S', D_out]


# ----------------------------------------------------------------------------------------------------------
# Model


class Wav2Vec2Model(nn.Module):
    """HF's `Wav2Vec2Model` (same parameter names), returning the last hidden state."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        if config.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = Encoder(config)
        self.adapter = Adapter(config) if config.add_adapter else None

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes raw audio.

        Args:
            input_values: [B, N] float samples.
            attention_mask: [B, N], 1 for real samples, 0 for right padding; None if nothing is padded.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        features = self.feature_extractor(input_values).transpose(1, 2)  # [B, S, C]
        frame_mask = None
        if attention_mask is not None:
            # The encoder's frames come before the adapter: it shortens them afterwards.
            frame_mask = feature_vector_mask(self.config, attention_mask, features.shape[1], add_adapter=False)
        hidden = self.feature_projection(features)  # [B, S, D]
        hidden = self.encoder(hidden, frame_mask)
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        return hidden
