"""The grouped conv over time through the FFT: wav2vec2's positional conv (128 taps, 16 groups of 48 channels).

Computed directly, that conv costs 2 x B x T x D x (D / G) x K multiply-adds: 19 GFLOP at 4 x 10 s for its output
alone, which XLA:CPU's grouped convolution runs at ~75-90 GFLOP/s, and as much again for each of its two
gradients. Through the FFT the taps become a product per frequency: every group's frames and its I x O kernels
are transformed once (a real FFT of N >= the padded length), each frequency mixes the group's channels (a complex
[B, I] x [I, O] product), and one inverse FFT gives the output, ~30x fewer operations. Its gradients are those of
the same FFTs and products (JAX's), so the backward pass is FFTs too. In float32 its rounding error is no larger
than the direct sums' (`test_fft_conv.py` measures both against float64).
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

    Cross-correlating the padded frames (length L) with the K taps is a circular convolution of size N >= L with
    the taps turned round: its entries K - 1, ..., L - 1 wrap round nothing, and they are the T outputs.
    """
    b, frames, _ = hidden.shape
    taps, per_group_in, out_channels = kernel.shape
    per_group_out = out_channels // groups
    compute = jnp.promote_types(hidden.dtype, jnp.float32)
    length = frames + padding[0] + padding[1]
    t = length - taps + 1
    size = fast_fft_size(length)
    padded = jnp.pad(hidden.astype(compute), ((0, 0), padding, (0, 0)))
    signal = padded.reshape(b, length, groups, per_group_in).transpose(2, 0, 3, 1)  # [G, B, I, L]
    turned = kernel.astype(compute)[::-1].reshape(taps, per_group_in, groups, per_group_out)
    turned = turned.transpose(2, 1, 3, 0)  # [G, I, O, K]
    spectrum = jnp.einsum("gbif,giof->gbof", jnp.fft.rfft(signal, size), jnp.fft.rfft(turned, size))
    out = jnp.fft.irfft(spectrum, size)[..., taps - 1:taps - 1 + t]  # [G, B, O, T]
    return out.transpose(1, 3, 0, 2).reshape(b, t, out_channels).astype(hidden.dtype)
