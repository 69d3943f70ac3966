"""The grouped conv over time (`flax_model.layers.grouped_conv`: wav2vec2's positional conv, the conformers'
depthwise convs): its custom kernel gradient against XLA's and against float64 sums, and the products it runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flax_model import layers
from flax_model.layers import grouped_conv, grouped_conv_kernel_grad
from parity_tests.jaxprs import equations

_NUMBERS = ("NWC", "WIO", "NWC")


def _conv_grads(conv, hidden, kernel, padding, groups):
    def loss(h, k):
        out = conv(h, k, (1,), [padding], dimension_numbers=_NUMBERS, feature_group_count=groups)
        return jnp.sum(jnp.sin(out))
    return jax.grad(loss, argnums=(0, 1))(hidden, kernel)


# gi = channels / groups: 12 and 1 take one product per tap; 32 takes chunks of 12 taps (the second chunk reads
# five taps past the kernel, cut), 48 chunks of 8 (wav2vec2-base's positional conv: 128 taps, 16 groups of 48).
@pytest.mark.parametrize(("taps", "channels", "groups"), [(16, 48, 4), (7, 12, 12), (19, 64, 2), (16, 96, 2)],
                         ids=["per-tap", "depthwise", "chunks-with-tail", "chunks"])
def test_grouped_conv_kernel_gradient_equals_xlas(taps, channels, groups):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 40, channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((taps, channels // groups, channels)), jnp.float32)
    padding = (taps // 2, (taps - 1) // 2)
    ours = _conv_grads(grouped_conv, hidden, kernel, padding, groups)
    xla = _conv_grads(jax.lax.conv_general_dilated, hidden, kernel, padding, groups)
    for name, got, expected in zip(("input", "kernel"), ours, xla):
        err = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
        assert err <= 1e-5, f"{name} gradient: max relative difference {err:.2e}"


def _float64_kernel_grad(hidden, grad_out, taps, padding, groups):
    """[K, I, G * O] from float64 sums over the batch and time, tap by tap."""
    b, t, channels = grad_out.shape
    padded = np.pad(np.asarray(hidden, np.float64), ((0, 0), padding, (0, 0))).reshape(b, -1, groups,
                                                                                        hidden.shape[2] // groups)
    grads = np.asarray(grad_out, np.float64).reshape(b, t, groups, channels // groups)
    return np.stack([np.einsum("btgi,btgo->igo", padded[:, k:k + t], grads).reshape(padded.shape[3], channels)
                     for k in range(taps)])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("taps", "padding", "groups", "width"), [(20, (10, 9), 2, 48), (3, (0, 0), 3, 16)])
def test_the_chunked_kernel_gradient_is_float32_sums_of_its_operands(dtype, taps, padding, groups, width,
                                                                    bfloat16_form):
    """Against float64 sums of the same (bfloat16 or float32) values: one float32 accumulation's error, relative to
    the sums of magnitudes, at most 1e-6 (the tokens summed: 2 x 60)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 60 - padding[0] - padding[1] + taps - 1, groups * width)), dtype)
    grad_out = jnp.asarray(rng.standard_normal((2, 60, groups * width)), dtype)
    # a function of its own per test: jax.jit keys its cache on the function, not on the form of products
    got = np.asarray(jax.jit(lambda h, g: grouped_conv_kernel_grad(h, g, taps, padding, groups))(hidden, grad_out))
    assert got.dtype == np.float32 and got.shape == (taps, width, groups * width)
    expected = _float64_kernel_grad(hidden, grad_out, taps, padding, groups)
    magnitudes = _float64_kernel_grad(jnp.abs(hidden.astype(jnp.float32)), jnp.abs(grad_out.astype(jnp.float32)),
                                      taps, padding, groups)
    err = float(np.max(np.abs(got - expected) / magnitudes))
    assert err <= 1e-6, f"max error relative to the sum of magnitudes: {err:.2e}"


def _float64_conv(hidden, kernel, padding, groups):
    """hidden [B, N, G * I] conv kernel [K, I, G * O], stride 1, in float64."""
    taps, width, out_channels = kernel.shape
    padded = np.pad(hidden, ((0, 0), padding, (0, 0))).reshape(hidden.shape[0], -1, groups, width)
    t = padded.shape[1] - taps + 1
    per_group = kernel.reshape(taps, width, groups, out_channels // groups)
    return sum(np.einsum("btgi,igo->btgo", padded[:, k:k + t], per_group[k]) for k in range(taps)).reshape(
        hidden.shape[0], t, out_channels)


# (frames, taps, padding, groups, channels per group): 20 taps over two groups of 48 (chunks of 8 taps, the last
# one half past the kernel), wav2vec2's positional conv's padding (K / 2 both sides), and 3 taps over 3 groups of 16
# without padding.
@pytest.mark.parametrize(("frames", "taps", "padding", "groups", "width"),
                         [(50, 20, (10, 9), 2, 48), (40, 16, (8, 8), 2, 32), (30, 3, (0, 0), 3, 16)])
def test_a_bfloat16_grouped_conv_and_its_gradients_are_float32_sums_rounded_once(frames, taps, padding, groups,
                                                                                  width, bfloat16_form):
    """Output and input gradient as products over chunks of taps (native) or XLA's convolution (upcast), the kernel
    gradient as `grouped_conv_kernel_grad`, each within one bfloat16 rounding of the float64 conv of the same
    bfloat16 values."""
    rng = np.random.default_rng(frames)
    hidden = rng.standard_normal((2, frames, groups * width)).astype(ml_dtypes.bfloat16)
    kernel = (rng.standard_normal((taps, width, groups * width)) / np.sqrt(taps * width)).astype(ml_dtypes.bfloat16)
    conv = lambda h, k: grouped_conv(h, k, (1,), [padding], dimension_numbers=_NUMBERS,  # noqa: E731
                                     feature_group_count=groups)
    out, vjp = jax.vjp(conv, jnp.asarray(hidden), jnp.asarray(kernel))
    grad = rng.standard_normal(out.shape).astype(ml_dtypes.bfloat16)
    grad_hidden, grad_kernel = vjp(jnp.asarray(grad))
    assert out.dtype == grad_hidden.dtype == grad_kernel.dtype == jnp.bfloat16
    h64, k64, g64 = (a.astype(np.float64) for a in (hidden, kernel, grad))
    turned = k64[::-1].reshape(taps, width, groups, width).transpose(0, 3, 2, 1).reshape(taps, width, groups * width)
    turned_padding = (taps - 1 - padding[0], taps - 1 - padding[1])
    for name, got, exact, magnitudes in (
            ("output", out, _float64_conv(h64, k64, padding, groups), _float64_conv(abs(h64), abs(k64), padding,
                                                                                    groups)),
            ("input gradient", grad_hidden, _float64_conv(g64, turned, turned_padding, groups),
             _float64_conv(abs(g64), abs(turned), turned_padding, groups)),
            ("kernel gradient", grad_kernel, _float64_kernel_grad(h64, g64, taps, padding, groups),
             _float64_kernel_grad(abs(h64), abs(g64), taps, padding, groups))):
        _check_rounded_once(name, got, exact, magnitudes)
    # the products' operands: bfloat16, or float32 in the upcast form
    program = jax.make_jaxpr(lambda h, k, g: jax.vjp(conv, h, k)[1](g))(jnp.asarray(hidden), jnp.asarray(kernel),
                                                                         jnp.asarray(grad))
    operands = {v.aval.dtype for e in equations(program) if e.primitive.name == "dot_general" for v in e.invars}
    assert operands == {jnp.dtype(jnp.bfloat16 if bfloat16_form == "native" else jnp.float32)}, operands


def _check_rounded_once(name, got, exact, magnitudes):
    """Within one bfloat16 rounding (2^-8 relative) of the float64 sum, plus a float32 sum's error (2^-20 of the
    sum of its terms' magnitudes: what cancelling terms leave of it)."""
    got = np.asarray(got).astype(np.float64)
    assert got.shape == exact.shape, f"{name}: shape {got.shape} vs {exact.shape}"
    err = np.abs(got - exact) / (2.0 ** -8 * np.abs(exact) + 2.0 ** -20 * magnitudes)
    assert float(err.max()) <= 1.0, f"{name}: worst error {err.max():.2f} of the bound"


def test_the_bfloat16_positional_conv_runs_as_chunked_products():
    """wav2vec2-base's positional conv under bfloat16: the output, the input gradient and the kernel gradient each
    a loop of 16 products of bfloat16 operands with float32 sums, the left operand contracting its last axis, no
    XLA convolution."""
    hidden = jnp.zeros((2, 30, 768), jnp.bfloat16)
    kernel = jnp.zeros((128, 48, 768), jnp.bfloat16)
    conv = lambda h, k: grouped_conv(h, k, (1,), [(64, 64)], dimension_numbers=_NUMBERS,  # noqa: E731
                                     feature_group_count=16)
    jaxpr = jax.make_jaxpr(lambda h, k: jax.vjp(conv, h, k)[1](jnp.ones((2, 31, 768), jnp.bfloat16)))(hidden,
                                                                                                       kernel)
    assert not [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "conv_general_dilated"]
    # the windows are sliced as the frames' bits (XLA:CPU slices bfloat16 through a float32 copy)
    sliced = {str(eqn.invars[0].aval.dtype) for eqn in equations(jaxpr) if eqn.primitive.name == "dynamic_slice"}
    assert sliced == {"uint16"}, sliced
    loops = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]
    assert sorted(loop.params["length"] for loop in loops) == [16, 16, 16]  # output, input gradient, kernel gradient
    shapes = sorted((str(eqn.invars[0].aval), str(eqn.invars[1].aval), eqn.params["dimension_numbers"][0])
                    for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"
                    and eqn.params["preferred_element_type"] == jnp.float32)
    assert shapes == [("bfloat16[16,384,62]", "bfloat16[16,62,48]", ((2,), (1,))),  # kernel gradient
                      ("bfloat16[16,60,384]", "bfloat16[16,384,48]", ((2,), (1,))),  # input gradient: 30 frames
                      ("bfloat16[16,62,384]", "bfloat16[16,384,48]", ((2,), (1,)))], shapes  # output: 31 frames


def test_a_float32_or_depthwise_grouped_conv_is_xlas_convolution():
    """A short kernel (under `_FFT_MIN_TAPS` taps) in float32 is XLA's convolution, the faster there; a depthwise
    conv's groups are one channel wide."""
    for dtype, channels, groups in ((jnp.float32, 96, 2), (jnp.bfloat16, 12, 12)):
        hidden, kernel = jnp.zeros((2, 30, channels), dtype), jnp.zeros((5, channels // groups, channels), dtype)
        jaxpr = jax.make_jaxpr(lambda h, k: grouped_conv(h, k, (1,), [(2, 2)], dimension_numbers=_NUMBERS,
                                                         feature_group_count=groups))(hidden, kernel)
        assert [eqn.primitive.name for eqn in equations(jaxpr)].count("conv_general_dilated") == 1, (dtype, groups)


def test_narrow_groups_keep_one_product_per_tap(monkeypatch):
    """Below `_TAP_PRODUCT_MIN_WIDTH` channels per group the chunks are not used (a depthwise conv's would be
    products one column wide); with the threshold above the groups' width, a 48-wide group takes that path too
    and gives the same gradient."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((2, 40, 96)), jnp.float32)
    grad_out = jnp.asarray(rng.standard_normal((2, 40, 96)), jnp.float32)
    chunked = grouped_conv_kernel_grad(hidden, grad_out, 9, (4, 4), 2)
    monkeypatch.setattr(layers, "_TAP_PRODUCT_MIN_WIDTH", 49)
    jaxpr = jax.make_jaxpr(lambda h, g: grouped_conv_kernel_grad(h, g, 9, (4, 4), 2))(hidden, grad_out)
    assert [eqn.params["length"] for eqn in equations(jaxpr) if eqn.primitive.name == "scan"] == [9]
    per_tap = grouped_conv_kernel_grad(hidden, grad_out, 9, (4, 4), 2)
    err = float(jnp.max(jnp.abs(chunked - per_tap)) / jnp.max(jnp.abs(per_tap)))
    assert err <= 1e-6, f"chunked vs per-tap kernel gradient: max relative difference {err:.2e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_negative_padding_crops_as_xlas_conv_does(dtype):
    """An explicit negative padding (frames cropped) is XLA's convolution and its gradients, in either dtype."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((2, 20, 64)), dtype)
    kernel = jnp.asarray(rng.standard_normal((5, 32, 64)), dtype)
    ours = _conv_grads(grouped_conv, hidden, kernel, (-1, 2), 2)
    xla = _conv_grads(jax.lax.conv_general_dilated, hidden, kernel, (-1, 2), 2)
    for name, got, expected in zip(("input", "kernel"), ours, xla):
        assert got.shape == expected.shape and bool(jnp.all(got == expected)), f"{name} gradient differs from XLA's"
