"""The bfloat16 strided convolution over time as one matrix product (`flax_model.layers.strided_conv`, the feature
encoders' convs): its output and both gradients against the convolution computed in float64 from the same
bfloat16 values, the product it runs, and the cases it leaves to XLA's convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flax_model.layers import strided_conv
from parity_tests.jaxprs import equations
from parity_tests.test_bfloat16_matmul import _check

BF16 = ml_dtypes.bfloat16
NUMBERS = ("NWC", "WIO", "NWC")


def _tap(a: np.ndarray, j: int, stride: int, frames_out: int) -> np.ndarray:
    """The frames of `a` [B, N, C] that tap `j` reads for each of `frames_out` output frames: a[:, stride * t + j]."""
    return a[:, j:j + stride * (frames_out - 1) + 1:stride]


def _conv64(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """x [B, N, C] conv kernel [K, C, O], no padding, in float64: out[b, t] = sum_j x[b, stride * t + j] @ kernel[j]."""
    taps = kernel.shape[0]
    frames = (x.shape[1] - taps) // stride + 1
    return sum(np.einsum("btc,co->bto", _tap(x, j, stride, frames), kernel[j]) for j in range(taps))


# (frames, channels in, channels out, taps, stride): wav2vec2's 3-tap stride-2 convs over an odd and an even number
# of frames (odd: the last output frame reads past the last whole pair), its 2-tap stride-2 convs, a pointwise conv,
# and a 10-tap stride-5 conv over 64 channels (two group shifts, the second half zeros past the tenth tap).
CASES = [(101, 128, 24, 3, 2), (100, 128, 24, 3, 2), (40, 256, 16, 2, 2), (37, 128, 16, 1, 1), (53, 64, 16, 10, 5)]


@pytest.mark.parametrize(("frames", "width", "out_width", "taps", "stride"), CASES)
def test_a_bfloat16_strided_conv_and_its_gradients_are_float32_sums_rounded_once(frames, width, out_width, taps,
                                                                                 stride, bfloat16_form):
    """Either form of bfloat16 products: the product (native), XLA's convolution (upcast: `test_upcast_...`)."""
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((2, frames, width)).astype(BF16)
    kernel = (rng.standard_normal((taps, width, out_width)) / np.sqrt(taps * width)).astype(BF16)
    conv = lambda a, k: strided_conv(a, k, (stride,), "VALID", dimension_numbers=NUMBERS)  # noqa: E731
    out, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(kernel))
    grad = rng.standard_normal(out.shape).astype(BF16)
    grad_x, grad_kernel = vjp(jnp.asarray(grad))
    assert out.dtype == grad_x.dtype == grad_kernel.dtype == jnp.bfloat16
    x64, k64, g64 = (a.astype(np.float64) for a in (x, kernel, grad))
    frames_out = out.shape[1]
    _check("output", out, _conv64(x64, k64, stride))

    def frames_gradient(g: np.ndarray, k: np.ndarray) -> np.ndarray:  # each tap's part added into its frames
        per_tap = np.einsum("bto,jco->btjc", g, k)
        summed = np.zeros(x.shape)
        for j in range(taps):
            _tap(summed, j, stride, frames_out)[...] += per_tap[:, :, j]
        return summed

    def kernel_gradient(a: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.stack([np.einsum("btc,bto->co", _tap(a, j, stride, frames_out), g) for j in range(taps)])

    exact_x, exact_kernel = frames_gradient(g64, k64), kernel_gradient(x64, g64)
    if (frames - taps) % stride == 0 and taps > stride:
        # The last output frame reads past the last whole group of frames and is computed apart: the frames it
        # shares with the product and the kernel add two gradients, each rounded once, so each is within two
        # roundings of the sum of its terms' magnitudes.
        for name, got, exact, bound in (
                ("input gradient", grad_x, exact_x, frames_gradient(np.abs(g64), np.abs(k64))),
                ("kernel gradient", grad_kernel, exact_kernel, kernel_gradient(np.abs(x64), np.abs(g64)))):
            err = np.abs(np.asarray(got, np.float64) - exact) / bound
            assert float(err.max()) <= 2.0 ** -7, f"{name}: worst error {err.max():.2e} of its terms' magnitudes"
    else:
        _check("input gradient", grad_x, exact_x)
        _check("kernel gradient", grad_kernel, exact_kernel)


def test_the_bfloat16_conv_runs_as_one_product_with_float32_sums():
    """wav2vec2-base's second feature conv (3 taps, stride 2, 512 channels) over an odd number of frames: one
    bfloat16 product summed in float32 for every output frame but the last, which reads past the last whole pair
    of frames and is a float32 convolution of its three frames."""
    x = jnp.zeros((1, 301, 512), jnp.bfloat16)
    kernel = jnp.zeros((3, 512, 512), jnp.bfloat16)
    program = jax.make_jaxpr(lambda a, k: strided_conv(a, k, (2,), "VALID", dimension_numbers=NUMBERS))(x, kernel)
    found = list(equations(program))
    dots = [e for e in found if e.primitive.name == "dot_general"]
    convs = [e for e in found if e.primitive.name == "conv_general_dilated"]
    assert len(dots) == 1, f"{len(dots)} products"
    assert [v.aval.shape for v in dots[0].invars] == [(150, 1024), (1024, 1024)], dots[0]
    assert [v.aval.dtype for v in dots[0].invars] == [jnp.bfloat16] * 2
    assert dots[0].params["preferred_element_type"] == jnp.float32
    assert len(convs) == 1 and convs[0].invars[0].aval.shape == (1, 3, 512), convs
    assert convs[0].invars[0].aval.dtype == jnp.float32


@pytest.mark.parametrize(("dtype", "padding", "width"), [
    (jnp.float32, "VALID", 128), (jnp.bfloat16, [(1, 1)], 128), (jnp.bfloat16, "VALID", 32)])
def test_a_float32_padded_or_narrow_conv_is_xlas_convolution(dtype, padding, width):
    """Float32 (XLA's convolution runs as fast as a float32 product), padded (the pad would sit beside the
    grouping reshape) and narrow (under 128 inputs per stride: the matrix units gain nothing) convs are left to
    XLA: the same program and the same numbers as `jax.lax.conv_general_dilated`."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 41, width)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, width, 8)), dtype)
    ours = strided_conv(x, kernel, (2,), padding, dimension_numbers=NUMBERS)
    xla = jax.lax.conv_general_dilated(x, kernel, (2,), padding, dimension_numbers=NUMBERS)
    assert np.array_equal(np.asarray(ours, np.float32), np.asarray(xla, np.float32))
    program = jax.make_jaxpr(lambda a, k: strided_conv(a, k, (2,), padding, dimension_numbers=NUMBERS))(x, kernel)
    assert [e.primitive.name for e in equations(program)] == ["conv_general_dilated"]


def test_upcast_a_bfloat16_conv_is_xlas_convolution():
    """In the upcast form (a CPU without bfloat16 arithmetic) the grouping product gains nothing: XLA:CPU computes a
    bfloat16 convolution in float32 faster than the product of 4/3 its multiply-adds (wav2vec2-base's second
    feature conv at 4 x 10 s on an AVX2 host: 836 against 1670 ms). The program is XLA's convolution."""
    from flax_model.layers import UPCAST, bfloat16_products_as

    x = jnp.zeros((1, 301, 512), jnp.bfloat16)
    kernel = jnp.zeros((3, 512, 512), jnp.bfloat16)
    with bfloat16_products_as(UPCAST):
        program = jax.make_jaxpr(lambda a, k: strided_conv(a, k, (2,), "VALID", dimension_numbers=NUMBERS))(x, kernel)
    assert [e.primitive.name for e in equations(program)] == ["conv_general_dilated"]


def test_a_pointwise_conv_at_nn_convs_default_padding_runs_as_the_product():
    """The conformers' pointwise convs (`nn.Conv(kernel_size=(1,))`, whose default padding "SAME" adds no frames):
    the product, and its output the float64 sum rounded once."""
    import flax.linen as nn

    rng = np.random.default_rng(5)
    layer = nn.Conv(48, kernel_size=(1,), use_bias=False, conv_general_dilated=strided_conv, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 19, 128)).astype(BF16))
    params = layer.init(jax.random.key(0), x)
    names = [e.primitive.name for e in equations(jax.make_jaxpr(lambda p, a: layer.apply(p, a))(params, x))]
    assert "dot_general" in names and "conv_general_dilated" not in names, names
    kernel = np.asarray(params["params"]["kernel"]).astype(BF16).astype(np.float64)  # [1, 128, 48]
    _check("output", layer.apply(params, x), np.asarray(x, np.float64) @ kernel[0])
