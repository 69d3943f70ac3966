"""The grouped conv over time (`flax_model.layers.grouped_conv`: wav2vec2's positional conv, the conformers'
depthwise convs): its custom kernel gradient against XLA's and against float64 sums, and the products it runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
def test_the_chunked_kernel_gradient_is_float32_sums_of_its_operands(dtype, taps, padding, groups, width):
    """Against float64 sums of the same (bfloat16 or float32) values: one float32 accumulation's error, relative to
    the sums of magnitudes, at most 1e-6 (the tokens summed: 2 x 60)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 60 - padding[0] - padding[1] + taps - 1, groups * width)), dtype)
    grad_out = jnp.asarray(rng.standard_normal((2, 60, groups * width)), dtype)
    got = np.asarray(jax.jit(grouped_conv_kernel_grad, static_argnums=(2, 3, 4))(hidden, grad_out, taps, padding,
                                                                                   groups))
    assert got.dtype == np.float32 and got.shape == (taps, width, groups * width)
    expected = _float64_kernel_grad(hidden, grad_out, taps, padding, groups)
    magnitudes = _float64_kernel_grad(jnp.abs(hidden.astype(jnp.float32)), jnp.abs(grad_out.astype(jnp.float32)),
                                      taps, padding, groups)
    err = float(np.max(np.abs(got - expected) / magnitudes))
    assert err <= 1e-6, f"max error relative to the sum of magnitudes: {err:.2e}"


def test_positional_conv_kernel_gradient_runs_as_chunked_products_on_the_matrix_units_form():
    """wav2vec2-base's positional conv under bfloat16 (128 taps, 16 groups of 48 channels): 16 products of
    [16, 384, R] x [16, R, 48] bfloat16 operands with float32 sums, the tokens the left operand's last axis and
    the right one's rows (the form XLA:CPU runs on the matrix units), in a loop over the chunks."""
    hidden = jnp.zeros((2, 30, 768), jnp.bfloat16)
    grad_out = jnp.zeros((2, 31, 768), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda h, g: grouped_conv_kernel_grad(h, g, 128, (64, 64), 16))(hidden, grad_out)
    loops = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]
    assert [loop.params["length"] for loop in loops] == [16]
    products = [eqn for eqn in equations(loops[0].params["jaxpr"]) if eqn.primitive.name == "dot_general"]
    assert len(products) == 1
    (contracting, batch), (lhs, rhs) = products[0].params["dimension_numbers"], products[0].invars
    assert [str(lhs.aval), str(rhs.aval)] == ["bfloat16[16,384,62]", "bfloat16[16,62,48]"]
    assert contracting == ((2,), (1,)) and batch == ((0,), (0,))
    assert products[0].params["preferred_element_type"] == jnp.float32


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
