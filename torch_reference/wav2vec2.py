"""Plain-PyTorch wav2vec2 encoder whose `state_dict` keys equal Hugging Face's `Wav2Vec2Model`.

Both encoder layouts: `do_stable_layer_norm=False` (post-norm layers, the encoder's layer norm before them,
as in wav2vec2-base-960h) and `True` (pre-norm layers, the layer norm after them, as in large-lv60 and
XLS-R). The conv feature encoder's norm (`group` on the first layer or `layer` on every layer) is chosen
independently.

The modules here are the wav2vec2 family's shared pieces: HuBERT, WavLM and data2vec-audio subclass them and
swap a part through a class attribute (`Encoder.POSITIONAL`, `Encoder.LAYER`, `Wav2Vec2Model.ENCODER`,
`Wav2Vec2Model.FEATURE_ENCODER`), as transformers' files say "Copied from wav2vec2" with changes.

`.train()` turns on dropout, attention and activation dropout and LayerDrop (`torch.rand` per layer, as
transformers); SpecAugment is applied from explicit masks; `freeze_feature_encoder()` stops training the conv
feature encoder. transformers also drops adapter layers at random in training, which changes the output length;
the Flax model cannot (static shapes), so neither does this reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from convert.base.archs.wav2vec2 import Wav2Vec2FamilyConfig
from convert.base.errors import UnsupportedConfig
from torch_reference.layers import ACTIVATIONS, frame_mask, layer_drop

# HF's defaults: nn.GroupNorm / nn.LayerNorm in the conv feature encoder and the adapter do not take
# config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5
_ADAPTER_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------------------------------------
# Lengths and masks


def feature_vector_mask(config: Wav2Vec2FamilyConfig, attention_mask: torch.Tensor, num_frames: int,
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


def spec_augment(config: Wav2Vec2FamilyConfig, hidden: torch.Tensor, masked_spec_embed: torch.Tensor | None,
                 mask_time_indices: torch.Tensor | None, mask_feature_indices: torch.Tensor | None) -> torch.Tensor:
    """SpecAugment after the feature projection: masked frames [B, S] become `masked_spec_embed` [D], masked
    channels [B, D] become 0; nothing when `config.apply_spec_augment` is False."""
    if not config.apply_spec_augment:
        return hidden
    if mask_time_indices is not None:
        if masked_spec_embed is None:
            raise UnsupportedConfig("mask_time_indices: this config has no masked_spec_embed (mask_time_prob=0 and "
                                    "mask_feature_prob=0), so frames cannot be masked")
        hidden = torch.where(mask_time_indices.bool()[:, :, None], masked_spec_embed.to(hidden.dtype), hidden)
    if mask_feature_indices is not None:
        hidden = hidden.masked_fill(mask_feature_indices.bool()[:, None, :], 0.0)
    return hidden


# ----------------------------------------------------------------------------------------------------------
# Feature encoder


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm (if any) and activation."""

    def __init__(self, config: Wav2Vec2FamilyConfig, layer_id: int):
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
    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        self.conv_layers = nn.ModuleList(ConvLayer(config, i) for i in range(len(config.conv_dim)))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden = input_values[:, None, :]  # [B, 1, N]
        for layer in self.conv_layers:
            hidden = layer(hidden)
        return hidden  # [B, C, S]


class FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        self.layer_norm = (nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
                           if config.has_projection_layer_norm else None)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            features = self.layer_norm(features)
        return self.dropout(self.projection(features))  # [B, S, D]


# ----------------------------------------------------------------------------------------------------------
# Transformer encoder


def same_pad_trim(kernel_size: int) -> int:
    """Frames to drop after a same-padded conv: symmetric padding of an even kernel yields one too many."""
    return 1 if kernel_size % 2 == 0 else 0


class PositionalConvEmbedding(nn.Module):
    """A grouped, weight-normalised conv over time whose output is added to the frames."""

    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        kernel = config.num_conv_pos_embeddings
        conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=kernel, padding=kernel // 2,
                         groups=config.num_conv_pos_embedding_groups)
        # dim=2: one magnitude per kernel tap, g of shape [1, 1, K] (HF's and fairseq's choice).
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.num_pad_remove = same_pad_trim(kernel)
        self.activation = ACTIVATIONS[config.feat_extract_activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.conv(hidden.transpose(1, 2))  # [B, D, S + num_pad_remove]
        if self.num_pad_remove:
            out = out[:, :, :-self.num_pad_remove]
        return self.activation(out).transpose(1, 2)  # [B, S, D]


class Attention(nn.Module):
    def __init__(self, config: Wav2Vec2FamilyConfig):
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
        """`hidden` [B, T, D]; `bias` additive, broadcastable to [B, N, T, S] (0 or the dtype's min), or None."""
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
    """Dense, activation, dense, each followed by dropout; `activation` and `width` default to the config's
    `hidden_act` and `hidden_size` (w2v-BERT's adapter and intermediate feed-forwards set their own)."""

    def __init__(self, config: Wav2Vec2FamilyConfig, activation: str | None = None, width: int | None = None):
        super().__init__()
        width = width or config.hidden_size
        self.intermediate_dense = nn.Linear(width, config.intermediate_size)
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = nn.Linear(config.intermediate_size, width)
        self.output_dropout = nn.Dropout(config.hidden_dropout)
        self.activation = ACTIVATIONS[activation or config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.intermediate_dropout(self.activation(self.intermediate_dense(hidden)))  # [B, T, F]
        return self.output_dropout(self.output_dense(hidden))


class EncoderLayer(nn.Module):
    """A transformer layer: post-norm, or pre-norm when `config.do_stable_layer_norm`."""

    def __init__(self, config: Wav2Vec2FamilyConfig, layer_id: int = 0):
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
    """Positional embedding, the layer stack (LayerDrop in training) and the encoder's layer norm (before the
    layers in the post-norm layout, after them in the stable one)."""

    POSITIONAL: type[nn.Module] = PositionalConvEmbedding
    LAYER: type[nn.Module] = EncoderLayer

    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        self.stable = config.do_stable_layer_norm
        self.layerdrop = config.layerdrop
        self.pos_conv_embed = self.POSITIONAL(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(self.LAYER(config, i) for i in range(config.num_hidden_layers))

    def prepare(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zeroes padded frames, adds the positional embedding, applies the post-norm layout's layer norm and
        dropout; returns (hidden [B, S, D], the attention bias [B, 1, 1, S] or None)."""
        bias = None
        if frame_mask is not None:
            # Padded frames are zeroed so that the positional conv does not carry them into real ones.
            hidden = hidden.masked_fill(~frame_mask[:, :, None], 0.0)
            bias = (~frame_mask).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min  # [B, 1, 1, S]
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.stable:
            hidden = self.layer_norm(hidden)
        return self.dropout(hidden), bias

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` [B, S, D]; `frame_mask` [B, S] bool (True for real frames) or None."""
        hidden, bias = self.prepare(hidden, frame_mask)
        for layer in self.layers:
            if not layer_drop(self.training, self.layerdrop):
                hidden = layer(hidden, bias)
        return self.layer_norm(hidden) if self.stable else hidden


# ----------------------------------------------------------------------------------------------------------
# Adapter


class AdapterLayer(nn.Module):
    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        width = config.encoder_output_size
        self.conv = nn.Conv1d(width, 2 * width, config.adapter_kernel_size, stride=config.adapter_stride, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.glu(self.conv(hidden), dim=1)  # [B, D_out, S']


class Adapter(nn.Module):
    """Strided conv + GLU layers that shorten the encoder output (after a projection when widths differ)."""

    def __init__(self, config: Wav2Vec2FamilyConfig):
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

    FEATURE_ENCODER: type[nn.Module] = FeatureEncoder
    ENCODER: type[nn.Module] = Encoder

    def __init__(self, config: Wav2Vec2FamilyConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = self.FEATURE_ENCODER(config)
        self.feature_projection = FeatureProjection(config)
        if config.has_masked_spec_embed:
            # SpecAugment's mask vector: a parameter of HF checkpoints, used only in training.
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = self.ENCODER(config)
        self.adapter = Adapter(config) if config.add_adapter else None

    def freeze_feature_encoder(self) -> None:
        """Stops training the conv feature encoder (its parameters get no gradient), as HF's method does."""
        for param in self.feature_extractor.parameters():
            param.requires_grad = False

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mask_time_indices: torch.Tensor | None = None,
                mask_feature_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes raw audio.

        Args:
            input_values: [B, N] float samples.
            attention_mask: [B, N], 1 for real samples, 0 for right padding; None if nothing is padded.
            mask_time_indices: [B, S] bool, SpecAugment's masked frames (S: frames of the conv feature
                encoder), or None. Applied whenever given, as transformers does.
            mask_feature_indices: [B, C] bool, SpecAugment's masked channels (C: `hidden_size`), or None.

        Returns:
            last_hidden_state: [B, S, D], or [B, S', output_hidden_size] with the adapter.
        """
        features = self.feature_extractor(input_values).transpose(1, 2)  # [B, S, C]
        frame_mask = None
        if attention_mask is not None:
            # The encoder's frames come before the adapter: it shortens them afterwards.
            frame_mask = feature_vector_mask(self.config, attention_mask, features.shape[1], add_adapter=False)
        hidden = self.feature_projection(features)  # [B, S, D]
        hidden = spec_augment(self.config, hidden, getattr(self, "masked_spec_embed", None), mask_time_indices,
                              mask_feature_indices)
        hidden = self.encoder(hidden, frame_mask)
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        return hidden
