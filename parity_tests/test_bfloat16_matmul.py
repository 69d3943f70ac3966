"""The linear layers' bfloat16 product (`flax_model.layers.token_matmul` under `dtype=jnp.bfloat16`): the forward
pass, the input gradient and the kernel gradient each sum their products in float32 and round once to bfloat16,
checked against the same sums computed in float32 from the same bfloat16 values with numpy, in both forms of
bfloat16 products (`bfloat16_form`: bfloat16 operands, or operands upcast to float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flax_model.layers import Dense, token_matmul
from parity_tests.jaxprs import equations

BF16 = ml_dtypes.bfloat16


def _rounded(x: np.ndarray) -> np.ndarray:
    return x.astype(BF16).astype(np.float64)


def _check(name: str, got: jax.Array, exact: np.ndarray) -> None:
    """Within one bfloat16 rounding (2^-8 relative) of the float64 sum: the float32 sum's own error is far below."""
    got = np.asarray(got).astype(np.float64)
    assert got.shape == exact.shape, f"{name}: shape {got.shape} vs {exact.shape}"
    err = np.abs(got - exact) / np.maximum(np.abs(exact), 1e-30)
    assert float(err.max()) <= 2.0 ** -8, f"{name}: worst relative error {err.max():.2e} (one rounding is 3.9e-3)"
    rounded = np.mean(got == _rounded(exact))
    assert rounded >= 0.99, f"{name}: only {rounded:.1%} of the entries are the float64 sum rounded to bfloat16"


@pytest.mark.parametrize("kernel_in_axis", [0, 1])
def test_bfloat16_products_and_gradients_are_float32_sums_rounded_once(kernel_in_axis, bfloat16_form):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 37, 48)).astype(BF16)
    kernel = rng.standard_normal((48, 24) if kernel_in_axis == 0 else (24, 48)).astype(BF16)
    grad = rng.standard_normal((2, 37, 24)).astype(BF16)
    out, vjp = jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), jnp.asarray(x), jnp.asarray(kernel))
    grad_x, grad_kernel = vjp(jnp.asarray(grad))
    assert out.dtype == grad_x.dtype == grad_kernel.dtype == jnp.bfloat16
    x64, g64 = x.astype(np.float64).reshape(-1, 48), grad.astype(np.float64).reshape(-1, 24)
    k64 = kernel.astype(np.float64) if kernel_in_axis == 0 else kernel.astype(np.float64).T  # [I, O]
    _check("output", out.reshape(-1, 24), x64 @ k64)
    _check("input gradient", grad_x.reshape(-1, 48), g64 @ k64.T)
    _check("kernel gradient", grad_kernel, x64.T @ g64 if kernel_in_axis == 0 else g64.T @ x64)
    # Each product asks XLA for float32 sums of bfloat16 operands (returning bfloat16 is what runs without the
    # CPU's bfloat16 matrix units), or of float32 operands in the upcast form.
    program = jax.make_jaxpr(lambda a, k, g: jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), a, k)[1](g))(
        jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad))
    dots = [e for e in equations(program) if e.primitive.name == "dot_general"]
    assert len(dots) == 3, f"{len(dots)} products in the forward and backward pass"
    for eqn in dots:
        operands = jnp.bfloat16 if bfloat16_form == "native" else jnp.float32
        assert [v.aval.dtype for v in eqn.invars] == [operands] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_a_bfloat16_dense_layer_trains_float32_params_through_the_float32_sums():
    """`Dense(dtype=bfloat16)` over float32 params: the float32 kernel's gradient is the bfloat16 kernel gradient
    (the cast's transpose), its bias gradient the tokens' sum of the output gradient."""
    rng = np.random.default_rng(1)
    layer = Dense(16, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 11, 32)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].dtype == jnp.float32
    out, vjp = jax.vjp(lambda p: layer.apply({"params": p}, x), params)
    assert out.dtype == jnp.bfloat16
    grad = rng.standard_normal(out.shape).astype(BF16)
    (grads,) = vjp(jnp.asarray(grad))
    assert grads["kernel"].dtype == jnp.float32
    x64, g64 = _rounded(np.asarray(x)).reshape(-1, 32), grad.astype(np.float64).reshape(-1, 16)
    _check("kernel gradient", grads["kernel"], x64.T @ g64)
    exact_out = x64 @ _rounded(np.asarray(params["kernel"])) + _rounded(np.asarray(params["bias"]))
    err = np.abs(np.asarray(out, np.float64).reshape(-1, 16) - exact_out).max() / np.abs(exact_out).max()
    assert err <= 2.0 ** -7, f"output with its bias: worst error {err:.2e} of the largest entry"


@pytest.mark.parametrize(("x_shape", "kernel_shape", "kernel_in_axis"), [
    ((1, 1, 8), (8, 4), 0), ((3, 5, 4), (4, 768), 0), ((2, 7, 768), (768, 4), 0), ((2, 3, 16), (50, 16), 1),
    ((1, 1, 3), (1, 3), 1)])
def test_bfloat16_products_run_at_any_size(x_shape, kernel_shape, kernel_in_axis, bfloat16_form):
    """XLA:CPU refuses some bfloat16 x bfloat16 -> float32 products at run time (UNIMPLEMENTED, where its matrix
    library does not take them, e.g. batched attention products): the linear layers' three, at the sizes of a
    LoRA rank, a single token and a vocabulary projection, forward and backward."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.bfloat16)
    out, vjp = jax.jit(lambda a, k: jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), a, k))(x, kernel)
    grads = vjp(jnp.ones_like(out))
    exact = np.asarray(x, np.float64).reshape(-1, x_shape[-1]) @ (
        np.asarray(kernel, np.float64) if kernel_in_axis == 0 else np.asarray(kernel, np.float64).T)
    _check("output", out.reshape(exact.shape), exact)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("layer", ["dense", "conv1d"])
def test_a_bfloat16_layers_bias_gradient_is_summed_in_float32(layer):
    """A bias added to bfloat16 outputs (`add_bias`: `Dense`, GPT-2's `Conv1D`, the positional convolution, the
    logits bias): its float32 gradient is the output gradient's float32 sum over the tokens, not a bfloat16 sum
    (JAX's transpose of the cast-and-add, which XLA:CPU rounds to bfloat16 at every partial sum)."""
    from flax_model.decoder.modules import Conv1D

    rng = np.random.default_rng(2)
    module = Dense(8, dtype=jnp.bfloat16) if layer == "dense" else Conv1D(8, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 499, 16)), jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    out, vjp = jax.jit(lambda p: jax.vjp(lambda q: module.apply({"params": q}, x), p))(params)
    assert out.dtype == jnp.bfloat16
    grad = (1.0 + rng.random(out.shape)).astype(BF16)  # positive: a bfloat16 running sum loses its low bits
    (grads,) = vjp(jnp.asarray(grad))
    assert grads["bias"].dtype == jnp.float32
    exact = grad.astype(np.float64).reshape(-1, 8).sum(axis=0)
    err = float(np.max(np.abs(np.asarray(grads["bias"], np.float64) - exact) / exact))
    assert err <= 1e-6, f"bias gradient: worst relative error {err:.2e} against the float64 sum (float32: ~1e-7)"
    program = jax.make_jaxpr(lambda p, g: jax.vjp(lambda q: module.apply({"params": q}, x), p)[1](g))(
        params, jnp.asarray(grad))
    sums = [e for e in equations(program) if e.primitive.name == "reduce_sum"]
    assert sums and all(e.outvars[0].aval.dtype == jnp.float32 for e in sums), [str(e) for e in sums]


@pytest.mark.parametrize("kernel_in_axis", [0, 1])
def test_the_bfloat16_kernel_gradient_reads_its_tokens_as_columns(kernel_in_axis):
    """At 128 tokens or more, the kernel gradient's left operand is first laid out with its tokens as columns (an
    identity product per block of columns, `_tokens_last`): the same float32 sums rounded once, and the product
    that contracts the tokens takes the left operand's last axis, the form XLA:CPU runs on the matrix units."""
    rng = np.random.default_rng(6)
    # 300 tokens; widths 256 and 1536 (two 768 blocks); positive values: sums without cancellation, whose
    # relative error is one rounding's
    x = (0.5 + rng.random((3, 100, 256))).astype(BF16)
    kernel = rng.standard_normal((256, 1536) if kernel_in_axis == 0 else (1536, 256)).astype(BF16)
    grad = (0.5 + rng.random((3, 100, 1536))).astype(BF16)
    grads = jax.jit(lambda a, k, g: jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), a, k)[1](g))(
        jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad))
    x64, g64 = x.astype(np.float64).reshape(-1, 256), grad.astype(np.float64).reshape(-1, 1536)
    _check("kernel gradient", grads[1], x64.T @ g64 if kernel_in_axis == 0 else g64.T @ x64)
    program = jax.make_jaxpr(lambda a, k, g: jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), a, k)[1](g))(
        jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad))
    kernel_products = [e for e in equations(program) if e.primitive.name == "dot_general"
                       and e.outvars[0].aval.shape == kernel.shape]
    assert len(kernel_products) == 1, kernel_products
    contracting, _ = kernel_products[0].params["dimension_numbers"]
    assert contracting == ((1,), (0,)), f"the kernel gradient contracts {contracting}"
    # the left operand's transposed layout: one identity product per block of at most 768 columns
    width = 256 if kernel_in_axis == 0 else 1536
    blocks = [e for e in equations(program) if e.primitive.name == "dot_general"
              and e.outvars[0].aval.shape in ((256, 300), (768, 300))]
    assert len(blocks) == (1 if width == 256 else 2), [e.outvars[0].aval.shape for e in blocks]


@pytest.mark.parametrize("kernel_in_axis", [0, 1])
def test_upcast_the_kernel_gradient_contracts_the_tokens_of_float32_operands(kernel_in_axis):
    """In the upcast form (a CPU without bfloat16 arithmetic, where float32 products contract the rows of both
    operands at their full rate) the kernel gradient has no identity products: one float32 product contracting
    the tokens, the same sums rounded once."""
    from flax_model.layers import UPCAST, bfloat16_products_as

    rng = np.random.default_rng(8)
    x = (0.5 + rng.random((3, 100, 256))).astype(BF16)
    kernel = rng.standard_normal((256, 768) if kernel_in_axis == 0 else (768, 256)).astype(BF16)
    grad = (0.5 + rng.random((3, 100, 768))).astype(BF16)
    backward = lambda a, k, g: jax.vjp(lambda a, k: token_matmul(a, k, kernel_in_axis), a, k)[1](g)  # noqa: E731
    args = (jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad))
    with bfloat16_products_as(UPCAST):
        grads = jax.jit(backward)(*args)
        program = jax.make_jaxpr(backward)(*args)
    x64, g64 = x.astype(np.float64).reshape(-1, 256), grad.astype(np.float64).reshape(-1, 768)
    _check("kernel gradient", grads[1], x64.T @ g64 if kernel_in_axis == 0 else g64.T @ x64)
    dots = [e for e in equations(program) if e.primitive.name == "dot_general"]
    assert len(dots) == 3, [e.outvars[0].aval.shape for e in dots]  # forward, input and kernel gradient
    (kernel_product,) = [e for e in dots if e.outvars[0].aval.shape == kernel.shape]
    assert kernel_product.params["dimension_numbers"][0] == ((0,), (0,)), kernel_product
    assert all(v.aval.dtype == jnp.float32 for e in dots for v in e.invars), dots


def test_tokens_last_is_the_transpose_exactly():
    from flax_model.layers import _tokens_last

    rng = np.random.default_rng(7)
    a = jnp.asarray(rng.standard_normal((300, 1536)) * 1e3, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(jax.jit(_tokens_last)(a), np.float32), np.asarray(a, np.float32).T)
    assert _tokens_last(a[:100]) is None and _tokens_last(jnp.zeros((300, 127), jnp.bfloat16)) is None
