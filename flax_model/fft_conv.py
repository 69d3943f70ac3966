"""The grouped conv over time through the FFT: wav2vec2's positional conv (128 taps, 16 groups of 48 channels).

Computed directly, that conv costs B x T x D x (D / G) x K multiply-adds, 19 GFLOP at 4 x 10 s for its output
alone, which XLA:CPU's grouped convolution runs at ~75-90 GFLOP/s, and as much again for each of its two
gradients. Through the FFT the taps become a product per frequency: every group's frames and its I x O kernels
are transformed (real FFTs of blocks of ~2K frames, overlap-save), each frequency mixes the group's channels (a
complex [B x blocks, I] x [I, O] product), and inverse FFTs give the output, ~20x fewer operations. Its gradients
are those of the same FFTs and products (JAX's), so the backward pass is FFTs too. In float32 its rounding error
is no larger than the direct sums' (`test_fft_conv.py` measures both against float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fast_fft_size(length: int) -> int:
    """The smallest 2^a 3^b 5^c >= `length`: a size whose FFT factors into small radices."""
    size = length
    while True:
        rest = size
        for radix in (2, 3, 5):
            while rest % radix == 0:
                rest //= radix
        if rest == 1:
            return size
        size += 1


def grouped_conv_by_fft(hidden: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int) -> jax.Array:
    """The stride-1 grouped conv over time, hidden [B, N, G * I] with kernel [K, I, G * O] -> [B, T, G * O],
    T = N + before + after - K + 1 (`padding` = (before, after) frames of zeros, none negative), computed in float32
    (float64 for float64 inputs) and returned in the input's dtype.

    Overlap-save: the padded frames are cut into blocks of S = `_block_size` frames, each starting S - K + 1 frames
    after the last. Cross-correlating a block with the K taps is a circular convolution of size S with the taps
    turned round, whose entries K - 1, ..., S - 1 wrap round nothing: the block's S - K + 1 outputs. Blocks of
    about 2K frames keep the kernels' spectra (G x I x O of them, the largest arrays) small: wav2vec2-base's
    positional conv at 4 x 10 s, output and both gradients, 185-199 ms with S = 256 against 294-301 ms in one
    block of 640 (XLA's temporaries 96 against 195 MB) and 529-556 ms as XLA's convolution (AVX2, 2 cores).
    """
    b, frames, _ = hidden.shape
    taps, per_group_in, out_channels = kernel.shape
    per_group_out = out_channels // groups
    compute = jnp.promote_types(hidden.dtype, jnp.float32)
    length = frames + padding[0] + padding[1]
    t = length - taps + 1
    size = _block_size(length, taps)
    step = size - taps + 1  # the outputs of one block
    blocks = -(-t // step)
    total = (blocks - 1) * step + size  # >= length: the last block's frames past it are zeros
    padded = jnp.pad(hidden.astype(compute), ((0, 0), (padding[0], padding[1] + total - length), (0, 0)))
    signal = padded.reshape(b, total, groups, per_group_in).transpose(2, 0, 3, 1)  # [G, B, I, total]
    cut = jnp.stack([signal[..., j * step:j * step + size] for j in range(blocks)], axis=1)  # [G, blocks, B, I, S]
    turned = kernel.astype(compute)[::-1].reshape(taps, per_group_in, groups, per_group_out)
    turned = turned.transpose(2, 1, 3, 0)  # [G, I, O, K]
    spectrum = jnp.einsum("gnbif,giof->gnbof", jnp.fft.rfft(cut, size), jnp.fft.rfft(turned, size))
    out = jnp.fft.irfft(spectrum, size)[..., taps - 1:]  # [G, blocks, B, O, step]
    out = out.transpose(2, 1, 4, 0, 3).reshape(b, blocks * step, out_channels)[:, :t]
    return out.astype(hidden.dtype)


def _block_size(length: int, taps: int) -> int:
    """One block of the whole padded length where that is no longer than about 2K frames, else blocks of about
    2K (a size the FFT factors into small radices)."""
    return min(fast_fft_size(length), fast_fft_size(2 * taps))
