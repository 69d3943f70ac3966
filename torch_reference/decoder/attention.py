"""The decoder core's attention arithmetic in the reference (mirroring `flax_model/decoder/attention.py`).

Shapes: B batch, T query positions, S key positions, N query heads, K key/value heads (N = K * G), H head dim.
Queries, keys and values are kept in the projections' layout ([B, T|S, N|K, H]), the layout of the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convert.base.decoder_core import DecoderCore


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * H] -> [B, T, heads, H]."""
    return x.view(*x.shape[:2], heads, -1)


def rotary_angles(core: DecoderCore, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B|1, T, H] at `positions` [B|1, T], from the base layer's inverse frequencies (the numbers
    Flax uses)."""
    inv_freq, factor = core.rope_frequencies()
    inv_freq = torch.tensor(inv_freq)  # [H / 2] float32
    freqs = positions.float()[..., None] * inv_freq  # [B|1, T, H / 2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [B|1, T, H]
    return angles.cos() * factor, angles.sin() * factor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, N, H] rotated by angles cos/sin [B|1, T, H] (transformers' `rotate_half` convention)."""
    cos, sin = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping), or x."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(core: DecoderCore, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           training: bool, layer_index: int) -> torch.Tensor:
    """Scaled dot-product attention over key/value heads shared by groups of query heads.

    Args:
        query: [B, T, N, H]; key, value: [B, S, K, H].
        mask: [B, 1, T|1, S] bool, True where a query may attend.
        training: apply attention dropout.
        layer_index: the layer's index, for `scale_by_inverse_layer`.

    Returns:
        [B, T, N * H], the heads side by side.
    """
    batch, length, heads, _ = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    if core.upcast_attention:
        query, key = query.float(), key.float()
    if groups == 1:
        scores = torch.einsum("btnh,bsnh->bnts", query, key)
    else:  # query head n reads key/value head n // groups (transformers' repeat_kv), without repeating them
        grouped = query.reshape(batch, length, kv_heads, groups, -1)
        scores = torch.einsum("btkgh,bskh->bkgts", grouped, key).reshape(batch, heads, length, -1)
    if core.score_scale is not None:
        scores = scores * core.score_scale
    if core.score_divisor is not None:
        scores = scores / core.score_divisor
    if core.scale_by_inverse_layer:
        scores = scores / float(layer_index + 1)
    scores = softcap(scores, core.attn_logit_softcap)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1).to(value.dtype), p=core.attention_dropout, training=training)
    if groups == 1:
        out = torch.einsum("bnts,bsnh->btnh", probs, value)
    else:
        out = torch.einsum("bkgts,bskh->btkgh", probs.reshape(batch, kv_heads, groups, length, -1), value)
    return out.reshape(batch, length, -1)
