"""The grouped conv over time through the FFT (`flax_model.fft_conv`, wav2vec2's positional conv): its output and
both gradients against float64 sums of the same values, in float32 and in bfloat16 with upcast products, and which
convs take that path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flax_model import layers
from flax_model.fft_conv import fast_fft_size, grouped_conv_by_fft
from flax_model.layers import grouped_conv
from parity_tests.jaxprs import equations
from parity_tests.test_grouped_conv import _check_rounded_once, _float64_conv, _float64_kernel_grad

_NUMBERS = ("NWC", "WIO", "NWC")


def test_the_fft_size_is_the_next_product_of_2_3_and_5():
    assert [fast_fft_size(n) for n in (1, 7, 11, 31, 97, 627, 1025)] == [1, 8, 12, 32, 100, 640, 1080]


def _float64_references(hidden, kernel, grad, padding, groups):
    """Output, input gradient and kernel gradient of the conv, in float64, tap by tap (the input gradient: each
    output frame's gradient times each tap's kernel, added at the input frame that tap read)."""
    taps, width, channels = kernel.shape
    b, frames, _ = hidden.shape
    per_group = kernel.reshape(taps, width, groups, channels // groups)
    grads = grad.reshape(b, grad.shape[1], groups, channels // groups)
    grad_hidden = np.zeros((b, frames, groups, width))
    for k in range(taps):
        read = np.arange(grad.shape[1]) + k - padding[0]  # the input frame each output frame reads at tap k
        inside = (read >= 0) & (read < frames)
        grad_hidden[:, read[inside]] += np.einsum("btgo,igo->btgi", grads[:, inside], per_group[k])
    return (_float64_conv(hidden, kernel, padding, groups), grad_hidden.reshape(hidden.shape),
            _float64_kernel_grad(hidden, grad, taps, padding, groups))


def _conv_and_grads(conv, hidden, kernel, grad):
    out, vjp = jax.vjp(conv, jnp.asarray(hidden), jnp.asarray(kernel))
    return (out, *vjp(jnp.asarray(grad)))


# (frames, taps, padding, groups, channels per group): wav2vec2-base's positional conv over fewer frames (128 taps,
# K / 2 both sides: one frame too many, as PyTorch's; one block), an odd kernel (two blocks), no padding, more
# padding than taps, and five blocks of 128 frames.
@pytest.mark.parametrize(("frames", "taps", "padding", "groups", "width"),
                         [(90, 128, (64, 64), 4, 48), (75, 65, (32, 32), 2, 32), (120, 64, (0, 0), 3, 16),
                          (40, 64, (70, 3), 2, 16), (300, 64, (32, 31), 2, 16)])
def test_the_fft_conv_and_its_gradients_are_within_float32_rounding_of_float64_sums(frames, taps, padding, groups,
                                                                                    width):
    """Each of the three within 2e-6 of the float64 result's largest magnitude (float32 has 6e-8 per rounding; the
    direct sums of XLA's float32 convolution are printed beside it on failure)."""
    rng = np.random.default_rng(frames)
    hidden = rng.standard_normal((2, frames, groups * width)).astype(np.float32)
    kernel = (rng.standard_normal((taps, width, groups * width)) / np.sqrt(taps * width)).astype(np.float32)
    t = frames + padding[0] + padding[1] - taps + 1
    grad = rng.standard_normal((2, t, groups * width)).astype(np.float32)
    fft = _conv_and_grads(lambda h, k: grouped_conv_by_fft(h, k, padding, groups), hidden, kernel, grad)
    direct = _conv_and_grads(lambda h, k: jax.lax.conv_general_dilated(
        h, k, (1,), [padding], dimension_numbers=_NUMBERS, feature_group_count=groups), hidden, kernel, grad)
    exact = _float64_references(*(a.astype(np.float64) for a in (hidden, kernel, grad)), padding, groups)
    for name, got, xla, expected in zip(("output", "input gradient", "kernel gradient"), fft, direct, exact):
        assert got.dtype == jnp.float32 and got.shape == expected.shape, (name, got.dtype, got.shape)
        scale = float(np.abs(expected).max())
        err = float(np.abs(np.asarray(got, np.float64) - expected).max()) / scale
        xla_err = float(np.abs(np.asarray(xla, np.float64) - expected).max()) / scale
        assert err <= 2e-6, f"{name}: error {err:.2e} of the largest magnitude (XLA's direct sums: {xla_err:.2e})"


def test_a_bfloat16_fft_conv_and_its_gradients_are_rounded_once(bfloat16_form):
    """Upcast (no bfloat16 arithmetic): the FFT in float32, each result within one bfloat16 rounding of the float64
    conv of the same bfloat16 values. Native: the chunks of taps (the matrix units), the same bound."""
    rng = np.random.default_rng(5)
    taps, padding, groups, width = 64, (32, 32), 2, 32
    hidden = rng.standard_normal((2, 70, groups * width)).astype(ml_dtypes.bfloat16)
    kernel = (rng.standard_normal((taps, width, groups * width)) / np.sqrt(taps * width)).astype(ml_dtypes.bfloat16)
    grad = rng.standard_normal((2, 71, groups * width)).astype(ml_dtypes.bfloat16)
    conv = lambda h, k: grouped_conv(h, k, (1,), [padding], dimension_numbers=_NUMBERS,  # noqa: E731
                                     feature_group_count=groups)
    got = _conv_and_grads(conv, hidden, kernel, grad)
    assert all(a.dtype == jnp.bfloat16 for a in got), [a.dtype for a in got]
    h64, k64, g64 = (a.astype(np.float64) for a in (hidden, kernel, grad))
    exact = _float64_references(h64, k64, g64, padding, groups)
    magnitudes = _float64_references(abs(h64), abs(k64), abs(g64), padding, groups)
    for name, result, expected, sizes in zip(("output", "input gradient", "kernel gradient"), got, exact, magnitudes):
        _check_rounded_once(name, result, expected, sizes)


def _positional_conv_primitives(dtype):
    """The primitives of wav2vec2-base's positional conv and its two gradients, traced."""
    hidden = jnp.zeros((2, 30, 768), dtype)
    kernel = jnp.zeros((128, 48, 768), dtype)
    conv = lambda h, k: grouped_conv(h, k, (1,), [(64, 64)], dimension_numbers=_NUMBERS,  # noqa: E731
                                     feature_group_count=16)
    jaxpr = jax.make_jaxpr(lambda h, k: jax.vjp(conv, h, k)[1](jnp.ones((2, 31, 768), dtype)))(hidden, kernel)
    return [eqn.primitive.name for eqn in equations(jaxpr)]


@pytest.mark.parametrize(("dtype", "form"), [(jnp.float32, layers.NATIVE), (jnp.bfloat16, layers.UPCAST)])
def test_the_positional_conv_goes_through_the_fft_where_it_would_be_xlas_convolution(dtype, form):
    """float32, and bfloat16 upcast: FFTs (two forward transforms and one inverse for the output, as many again for
    each gradient), no convolution, no loop of chunks."""
    with layers.bfloat16_products_as(form):
        primitives = _positional_conv_primitives(dtype)
    assert "conv_general_dilated" not in primitives and "scan" not in primitives, primitives
    assert primitives.count("fft") >= 6, primitives.count("fft")


def test_native_bfloat16_and_short_kernels_keep_their_paths(monkeypatch):
    """Native bfloat16 products keep the chunks of taps (on the matrix units); under `_FFT_MIN_TAPS` taps (a
    depthwise or a short positional conv) the conv stays XLA's."""
    with layers.bfloat16_products_as(layers.NATIVE):
        assert "fft" not in _positional_conv_primitives(jnp.bfloat16)
    monkeypatch.setattr(layers, "_FFT_MIN_TAPS", 129)
    primitives = _positional_conv_primitives(jnp.float32)
    assert "fft" not in primitives and "conv_general_dilated" in primitives, primitives


def test_a_wav2vec2_encoder_with_its_positional_conv_through_the_fft_matches_the_torch_reference(fixture_dir,
                                                                                             monkeypatch):
    """The tiny wav2vec2's positional conv (16 taps, 2 groups of 16) sent through the FFT: the encoder's output
    within the parity tolerance of the PyTorch reference's, padded batch included."""
    from flax_model.wav2vec2 import Wav2Vec2Module
    from parity_tests.test_wav2vec2 import TOLERANCE, _batch, _flax_params, _reference_output

    monkeypatch.setattr(layers, "_FFT_MIN_TAPS", 1)
    directory = fixture_dir("w2v_group")
    values, mask = _batch()
    config, params = _flax_params(directory)
    encode = Wav2Vec2Module(config).apply
    assert "fft" in {eqn.primitive.name for eqn in equations(jax.make_jaxpr(encode)({"params": params}, values,
                                                                                       mask))}
    got = np.asarray(jax.jit(encode)({"params": params}, values, mask))
    expected = _reference_output(directory, values, mask)
    err = float(np.max(np.abs(got - expected)))
    assert err <= TOLERANCE, f"max|diff|={err:.2e}"
