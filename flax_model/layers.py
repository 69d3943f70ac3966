"""Small pieces shared by the Flax architectures: activations, layer norm, linear layers, grouped convolutions over
time, frame masks, LayerDrop, and the layer stack (per-layer modules or one scanned layer) every architecture runs
its identical layers through."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_model.fft_conv import grouped_conv_by_fft
from flax_model.recompute import computed_beside, layer_recomputed, recomputed_with


def _derivative_kept(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Elementwise `fn` whose forward pass also computes its derivative (a forward-mode product with ones, in the
    same fused loop) and keeps it alone for the backward pass, which multiplies it in. JAX's linearisation keeps
    the intermediate terms instead: three arrays of the input's size for the exact GELU (x / 2, erfc, exp), two
    for the tanh forms and SiLU, where a wav2vec2-base layer's 3072-wide activation is its largest array.
    (Recomputing the activation from its input in the backward pass would keep one array too, but its
    transcendental functions, compiled into other loops, round differently from the forward's.) The value is read
    beside the derivative (`computed_beside`): otherwise XLA computes the derivative inside the backward pass's
    loop and keeps the terms and the input instead, four arrays in place of one for the exact GELU."""

    @jax.custom_vjp
    def activation(x: jax.Array) -> jax.Array:
        return fn(x)

    def forward(x):
        value, derivative = jax.jvp(fn, (x,), (jnp.ones_like(x),))
        return computed_beside(value, derivative), derivative

    def backward(derivative, grad):
        return (grad * derivative,)

    activation.defvjp(forward, backward)
    return activation


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _derivative_kept(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_new": _derivative_kept(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_pytorch_tanh": _derivative_kept(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_fast": _derivative_kept(lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))),
    "quick_gelu": _derivative_kept(lambda x: x * jax.nn.sigmoid(1.702 * x)),
    "relu": jax.nn.relu,
    "silu": _derivative_kept(jax.nn.silu),
    "swish": _derivative_kept(jax.nn.silu),
    "tanh": jnp.tanh,
}


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last axis with the two-pass variance (`use_fast_variance=False`, as torch computes
    it), the same params and numbers, whose backward pass keeps only its input and recomputes the statistics
    (torch keeps the input, mean and 1/std; JAX's linearisation of Flax's computation keeps three arrays of the
    input's size in float32)."""

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None or self.use_fast_variance or self.axis_name is not None or self.reduction_axes != -1 \
                or self.feature_axes != -1 or not self.force_float32_reductions:
            raise NotImplementedError("LayerNorm: only the last axis, two-pass variance, no mask or axis name")
        width = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, width, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, width, self.param_dtype) if self.use_bias else None
        dtype = self.dtype or jnp.result_type(x, *(p for p in (scale, bias) if p is not None))
        return _recomputed_normalise(self.epsilon, jnp.dtype(dtype))(x, scale, bias)


def normalise(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, epsilon: float, dtype: Any,
              axis: int = -1) -> jax.Array:
    """Flax's LayerNorm arithmetic over `axis`, op for op: statistics in at least float32, (x - mean) *
    (rsqrt(var + eps) * scale) + bias, cast to `dtype`."""
    h = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = h.mean(axis, keepdims=True)
    var = jax.lax.square(h - mean).mean(axis, keepdims=True)
    mul = jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = (x - mean) * mul
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def _recomputed_normalise(epsilon: float, dtype: Any) -> Callable[..., jax.Array]:
    return recomputed_with(normalise, epsilon=epsilon, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Products of bfloat16 operands

NATIVE = "native"
UPCAST = "upcast"
_bfloat16_products = NATIVE


def bfloat16_products() -> str:
    """How this process computes the products of bfloat16 operands (`set_bfloat16_products`)."""
    return _bfloat16_products


def set_bfloat16_products(form: str) -> str:
    """Sets how the products of bfloat16 operands are computed, for every program traced afterwards (a jitted
    function already traced keeps its form); returns the previous form.

    `NATIVE` (the default): the operands stay bfloat16 and the products are summed in float32, the form XLA:CPU
    runs on a CPU's bfloat16 instructions (AMX, AVX512_BF16) and an accelerator on its matrix units. `UPCAST`: the
    operands are cast to float32 and multiplied as float32 arrays, for a CPU without bfloat16 arithmetic, where
    XLA:CPU emulates the bfloat16 form at ~60% of its float32 products' rate (AVX2: a [1996, 768] x [768, 3072]
    product 97 against 155 GFLOP/s upcast). The numbers are the same up to the order of the sums (the product of
    two bfloat16 values is exact in float32), rounded once as in the native form. The caller decides:
    `convert.finetune` by the host CPU's flags (`convert.host_cpu`)."""
    global _bfloat16_products
    if form not in (NATIVE, UPCAST):
        raise ValueError(f"bfloat16 products: {form!r} is neither {NATIVE!r} nor {UPCAST!r}")
    previous, _bfloat16_products = _bfloat16_products, form
    return previous


@contextlib.contextmanager
def bfloat16_products_as(form: str) -> Iterator[None]:
    """`set_bfloat16_products(form)` while the block runs (the programs it traces), the previous form after it."""
    previous = set_bfloat16_products(form)
    try:
        yield
    finally:
        set_bfloat16_products(previous)


def _operands(lhs: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A product's operands in this process's form of bfloat16 products: as they are, or cast to float32."""
    if _bfloat16_products == UPCAST:
        return lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    return lhs, rhs


def float32_sums(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> jax.Array:
    """`jax.lax.dot_general` of bfloat16 (or float32) operands summed in float32, in this process's form of
    bfloat16 products (`set_bfloat16_products`)."""
    return jax.lax.dot_general(*_operands(lhs, rhs), dimension_numbers, preferred_element_type=jnp.float32)


def float32_einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, lhs, rhs)` summed in float32, in this process's form of bfloat16 products."""
    return jnp.einsum(spec, *_operands(lhs, rhs), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Linear layers over tokens


def token_matmul(x: jax.Array, kernel: jax.Array, kernel_in_axis: int = 0, precision: Any = None,
                 preferred_element_type: Any = None) -> jax.Array:
    """x [..., I] times a 2-D kernel ([I, O], or [O, I] with `kernel_in_axis=1`) -> [..., O], the leading axes of x
    merged into one for the matmul (a reshape, no copy).

    The product is the same; what changes is the backward pass: the kernel's gradient contracts the tokens, and
    over the [B, T] axes of x XLA:CPU first transposes the output gradient or the input into a copy (the tokens
    minor), at every linear layer of the step; over one merged axis the matmul reads both as they are.
    """
    dtype = jnp.result_type(x, kernel)  # as jnp.einsum promotes
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    if dtype == jnp.bfloat16 and precision is None and preferred_element_type is None:
        out = _bfloat16_matmul(flat, kernel.astype(dtype), kernel_in_axis)
    else:
        out = jax.lax.dot_general(flat, kernel.astype(dtype), (((1,), (kernel_in_axis,)), ((), ())),
                                  precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _float32_sum(lhs: jax.Array, rhs: jax.Array, lhs_axis: int, rhs_axis: int, dtype: Any) -> jax.Array:
    """lhs x rhs contracting one axis of each, summed in float32, rounded to `dtype`."""
    return float32_sums(lhs, rhs, (((lhs_axis,), (rhs_axis,)), ((), ()))).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bfloat16_matmul(flat: jax.Array, kernel: jax.Array, kernel_in_axis: int) -> jax.Array:
    """[N, I] x kernel -> [N, O] in bfloat16, its products summed in float32, and so are its two gradients'.

    A bfloat16 product that XLA:CPU is asked to return in bfloat16 runs without the CPU's bfloat16 matrix units
    (AMX on an Intel Xeon: a [1996, 768] x [768, 3072] product at ~250 GFLOP/s); asked for float32 sums, at
    ~1000-1450 GFLOP/s. The rounding is a bfloat16 matmul's with float32 accumulation (PyTorch's autocast), once
    per product: the forward pass, the input gradient and the kernel gradient."""
    return _float32_sum(flat, kernel, 1, kernel_in_axis, flat.dtype)


def _bfloat16_matmul_forward(flat, kernel, kernel_in_axis):
    return _bfloat16_matmul(flat, kernel, kernel_in_axis), (flat, kernel)


def _bfloat16_matmul_backward(kernel_in_axis, saved, grad):
    flat, kernel = saved
    grad_flat = _float32_sum(grad, kernel, 1, 1 - kernel_in_axis, flat.dtype)  # [N, O] x [I, O]^T or x [O, I]
    # The kernel gradient contracts the tokens, the rows of both operands: XLA:CPU runs that form off the matrix
    # units. With the left operand's tokens made its columns it is the forward pass's form.
    left, right = (flat, grad) if kernel_in_axis == 0 else (grad, flat)  # -> [I, O] or [O, I]
    rows_last = _tokens_last(left)
    if rows_last is None:
        return grad_flat, _float32_sum(left, right, 0, 0, kernel.dtype)
    return grad_flat, _float32_sum(rows_last, right, 1, 0, kernel.dtype)


def _tokens_last(a: jax.Array) -> jax.Array | None:
    """a [N, W] (bfloat16) -> a^T [W, N], the same numbers, as products with an identity matrix, one per block of
    up to 768 columns (None where W has no divisor from 128 to 768, or there are fewer than 128 tokens).

    XLA:CPU folds a transposed copy of an operand back into the product that reads it (a transpose, or one hidden
    behind a reshape, an `optimization_barrier` or an added zero), which then contracts the rows of both operands
    again; the product with an identity is a product of its own. Each output is one input times 1.0 summed with
    zeros in float32: exact (an infinite input gives NaN beside it). [1996, 768] -> [768, 1996]: ~3 ms on AMX;
    the kernel gradient [1996, 768]^T x [1996, 3072] then runs in ~25 ms instead of ~86 (one measurement, busy
    machine). None too in the upcast form of bfloat16 products, where the float32 product contracting the rows of
    both operands runs at its full rate."""
    n, w = a.shape
    if _bfloat16_products == UPCAST:
        return None
    block = next((b for b in range(min(w, 768), 127, -1) if w % b == 0), None)
    if block is None or n < 128:
        return None
    eye = jnp.eye(block, dtype=a.dtype)
    return jnp.concatenate([_float32_sum(eye, a[:, i:i + block], 1, 1, a.dtype) for i in range(0, w, block)])


_bfloat16_matmul.defvjp(_bfloat16_matmul_forward, _bfloat16_matmul_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bfloat16_matmul_sums(flat: jax.Array, kernel: jax.Array, kernel_in_axis: int) -> jax.Array:
    """`_bfloat16_matmul` returning its float32 sums unrounded (for a caller that adds products before rounding);
    the gradient is `_bfloat16_matmul`'s of the output gradient rounded to bfloat16."""
    return float32_sums(flat, kernel, (((1,), (kernel_in_axis,)), ((), ())))


def _bfloat16_matmul_sums_forward(flat, kernel, kernel_in_axis):
    return _bfloat16_matmul_sums(flat, kernel, kernel_in_axis), (flat, kernel)


def _bfloat16_matmul_sums_backward(kernel_in_axis, saved, grad):
    return _bfloat16_matmul_backward(kernel_in_axis, saved, grad.astype(saved[0].dtype))


_bfloat16_matmul_sums.defvjp(_bfloat16_matmul_sums_forward, _bfloat16_matmul_sums_backward)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y [..., O] plus a bias [O] cast to y's dtype. Where y is of lower precision than the bias (bfloat16
    compute over float32 params), the bias's gradient is the output gradient summed over the tokens in float32
    and returned in the bias's dtype. JAX's own transpose of the cast-and-add sums in bfloat16, which XLA:CPU
    runs as a window tree rounding every partial sum to bfloat16 (~8 ms per [4, 499, 768] sum, 85 of them in a
    wav2vec2-base step, beside ~0.2 ms for the float32 sum)."""
    if jnp.issubdtype(y.dtype, jnp.floating) and jnp.finfo(y.dtype).bits < jnp.finfo(bias.dtype).bits:
        return _low_precision_bias_add(y, bias)
    return y + bias.astype(y.dtype)


@jax.custom_vjp
def _low_precision_bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias.astype(y.dtype)


def _low_precision_bias_add_forward(y, bias):
    return _low_precision_bias_add(y, bias), bias  # kept for its dtype (an input: no copy)


def _low_precision_bias_add_backward(bias, grad):
    grad_bias = jnp.sum(grad.reshape(-1, grad.shape[-1]), axis=0, dtype=jnp.float32)
    return grad, grad_bias.astype(bias.dtype)


_low_precision_bias_add.defvjp(_low_precision_bias_add_forward, _low_precision_bias_add_backward)


class Dense(nn.Dense):
    """`nn.Dense` (the same fields, params, initialisers and product) whose kernel gradient needs no transposed
    copy (`token_matmul`) and whose bias gradient is summed in float32 under a bfloat16 `dtype` (`add_bias`)."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, _ = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = token_matmul(inputs, kernel, 0, self.precision)
        return y if bias is None else add_bias(y, bias)


# ----------------------------------------------------------------------------------------------------------
# Convolutions over time


_TIME_NUMBERS = ("NWC", "WIO", "NWC")  # [B, N, C_in] inputs, [K, C_in / G, C_out] kernel, [B, T, C_out] outputs


def _over_time(lhs: jax.Array, rhs: jax.Array, lhs_dilation: Any, rhs_dilation: Any, dimension_numbers: Any,
               preferred_element_type: Any) -> bool:
    """Whether a `conv_general_dilated` call is a 1-D conv over time in the `_TIME_NUMBERS` layout, undilated, in
    its operands' dtype: the form the fast paths below take."""
    numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (lhs.ndim == 3 and all(d in (None, (1,), [1]) for d in (lhs_dilation, rhs_dilation))
            and numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _TIME_NUMBERS)
            and preferred_element_type is None)


def strided_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                 lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                 dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                 preferred_element_type: Any = None) -> jax.Array:
    """`jax.lax.conv_general_dilated` (the signature `nn.Conv(conv_general_dilated=...)` takes), computed under
    bfloat16 as one matrix product where the convolution is 1-D over time, ungrouped, undilated, inputs
    [B, N, C_in] and kernel [K, C_in, C_out], unpadded, with at least 128 inputs per stride (the feature encoders'
    strided convs, the conformers' pointwise convs); every other case is `jax.lax.conv_general_dilated`.

    XLA:CPU computes a bfloat16 convolution as a float32 one, off the CPU's bfloat16 matrix units (AMX on an
    Intel Xeon): wav2vec2-base's second feature conv at 4 x 10 s ([4, 31999, 512] -> [4, 15999, 512], 3 taps,
    stride 2) took 284 ms, as one product 127 ms. The frames are grouped by the stride (a reshape: [B, G, S *
    C_in]) and multiplied by the kernel's taps laid out per group shift ([S * C_in, M * C_out], M = ceil(K / S),
    zeros for taps past K), summed in float32; each output frame adds its M shifted slices and is rounded once.
    The product does M * S / K times the convolution's multiply-adds (4/3 for 3 taps at stride 2). Its gradients
    are `token_matmul`'s under bfloat16 (on the matrix units); where the last output frame reads past the last
    whole group (3 taps at stride 2 over an odd number of frames) it is a float32 conv of its own frames, and the
    frames and kernel it shares with the product add two gradients each rounded once.
    """
    plain = (lhs.dtype != jnp.bfloat16 or feature_group_count != 1 or precision is not None
             or not _over_time(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, preferred_element_type))
    if not plain:
        (stride,), (taps, width, _) = window_strides, rhs.shape
        plain = (not _unpadded(padding, lhs.shape[1], taps, stride) or stride * width < 128 or -(-taps // stride) > 4
                 or _bfloat16_products == UPCAST)
    if plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    return _conv_as_product(lhs, rhs.astype(lhs.dtype), stride)


def _unpadded(padding: Any, length: int, taps: int, stride: int) -> bool:
    """Whether a 1-D conv's `padding` ("VALID", "SAME" as `nn.Conv`'s default, or (before, after) pairs) adds no
    frames ("SAME" adds none for a pointwise conv)."""
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((length,), (taps,), (stride,), padding)
    return all(tuple(p) == (0, 0) for p in padding)


def _conv_as_product(hidden: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """hidden [B, N, C] conv kernel [K, C, O] at `stride`, no padding -> [B, T, O], as `strided_conv` says."""
    b, n, c = hidden.shape
    taps, _, o = kernel.shape
    t = (n - taps) // stride + 1  # output frames
    shifts = -(-taps // stride)  # M: output frame t reads groups t .. t + M - 1
    # The frames cut to whole groups, never padded: a pad beside the reshape made XLA's loop that computes the
    # frames (the previous layer's norm and activation, fused with both) 4-8x slower. An output frame that would
    # read past the last whole group (the last one where N - K is odd at stride 2) is computed apart.
    groups = min(n // stride, t + shifts - 1)
    whole = min(t, groups - shifts + 1)  # output frames computed from whole groups
    grouped = hidden[:, :stride * groups].reshape(b * groups, stride * c)  # [B * G, S * C]
    per_shift = jnp.pad(kernel, ((0, shifts * stride - taps), (0, 0), (0, 0))).reshape(shifts, stride * c, o)
    weights = per_shift.transpose(1, 0, 2).reshape(stride * c, shifts * o)  # [S * C, M * O]
    if shifts == 1 and whole == t:  # each output frame is one group's product
        return _bfloat16_matmul(grouped, weights, 0).reshape(b, t, o)
    out = _bfloat16_matmul_sums(grouped, weights, 0).reshape(b, groups, shifts, o)
    summed = out[:, :whole, 0]
    for shift in range(1, shifts):
        summed = summed + out[:, shift:shift + whole, shift]
    if whole < t:  # products of bfloat16 values are exact in float32, so this sums as the product does
        rest = jax.lax.conv_general_dilated(hidden[:, stride * whole:].astype(jnp.float32),
                                            kernel.astype(jnp.float32), (stride,), "VALID",
                                            dimension_numbers=_TIME_NUMBERS)  # [B, T - whole, O]
        summed = jnp.concatenate([summed, rest], axis=1)
    return summed.astype(hidden.dtype)  # [B, T, O]


def grouped_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                 lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                 dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                 preferred_element_type: Any = None) -> jax.Array:
    """`jax.lax.conv_general_dilated` (the signature `nn.Conv(conv_general_dilated=...)` takes), with a fast kernel
    gradient for the case the speech encoders' positional and depthwise convs are: 1-D over time, stride 1, no
    dilation, grouped (`feature_group_count` > 1), inputs [B, N, C_in] and kernel [K, C_in / G, C_out].

    XLA:CPU lowers the kernel gradient of a grouped convolution to a dilated convolution that computes every group
    against every other (wav2vec2-base's positional conv, 16 groups: 80 times the time of the forward conv, half of
    the whole training step); here it is a few batched matmuls (`grouped_conv_kernel_grad`). The conv and its
    input gradient are XLA's, or in bfloat16 over wide groups products too (`_conv_by_tap_chunks`). A long kernel
    over wide groups (wav2vec2's positional conv) goes through the FFT instead, the conv and both gradients
    (`_by_fft`), except where bfloat16 products run natively. Every other case is `jax.lax.conv_general_dilated`.
    """
    plain = (feature_group_count == 1 or tuple(window_strides) != (1,) or isinstance(padding, str)
             or not _over_time(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, preferred_element_type)
             or min(min(side) for side in padding) < 0)  # a negative padding crops
    if plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    padding = tuple(tuple(p) for p in padding)[0]
    if _by_fft(lhs, rhs, feature_group_count, precision):
        return grouped_conv_by_fft(lhs, rhs, padding, feature_group_count)
    return _grouped_conv_1d(lhs, rhs, padding, feature_group_count, precision)


def _xla_grouped_conv_1d(hidden: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int,
                         precision: Any) -> jax.Array:
    return jax.lax.conv_general_dilated(hidden, kernel, (1,), [padding], dimension_numbers=_TIME_NUMBERS,
                                        feature_group_count=groups, precision=precision)


def _per_group(x: jax.Array, groups: int) -> jax.Array:
    """[B, N, G * W] -> [G, B, N, W]: each group's channels, the groups leading (the batched products' batch)."""
    b, n, channels = x.shape
    return x.reshape(b, n, groups, channels // groups).transpose(2, 0, 1, 3)


def _as_products(hidden: jax.Array, kernel: jax.Array, groups: int, precision: Any) -> bool:
    """Whether the conv and its input gradient run as products over chunks of taps (`_conv_by_tap_chunks`):
    bfloat16 operands multiplied natively (upcast, XLA's convolution is the faster, as in float32), groups at least
    `_TAP_PRODUCT_MIN_WIDTH` channels wide in and out."""
    return (hidden.dtype == kernel.dtype == jnp.bfloat16 and precision is None and _bfloat16_products == NATIVE
            and _wide_groups(hidden, kernel.shape[2], groups))


def _wide_groups(hidden: jax.Array, out_channels: int, groups: int) -> bool:
    return min(hidden.shape[2], out_channels) // groups >= _TAP_PRODUCT_MIN_WIDTH


_FFT_MIN_TAPS = 64  # taps from which a grouped conv over wide groups goes through the FFT (`_by_fft`)


def _by_fft(hidden: jax.Array, kernel: jax.Array, groups: int, precision: Any) -> bool:
    """Whether the conv and both its gradients go through the FFT (`flax_model.fft_conv`): a kernel of at least
    `_FFT_MIN_TAPS` taps over groups at least `_TAP_PRODUCT_MIN_WIDTH` wide, wherever it would otherwise be XLA's
    convolution (float32, or bfloat16 upcast; native bfloat16 products run on the matrix units as chunks of taps).
    wav2vec2-base's positional conv at 4 x 10 s, output and both gradients: ~0.19 s against ~0.54 s (AVX2)."""
    return (kernel.shape[0] >= _FFT_MIN_TAPS and _wide_groups(hidden, kernel.shape[2], groups)
            and not _as_products(hidden, kernel, groups, precision))


def _grouped_conv_forward(hidden: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int,
                          precision: Any) -> jax.Array:
    if _as_products(hidden, kernel, groups, precision):
        return _conv_by_tap_chunks(hidden, kernel, padding, groups)
    return _xla_grouped_conv_1d(hidden, kernel, padding, groups, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv_1d(hidden: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int,
                     precision: Any) -> jax.Array:
    return _grouped_conv_forward(hidden, kernel, padding, groups, precision)


def _grouped_conv_1d_forward(hidden, kernel, padding, groups, precision):
    return _grouped_conv_forward(hidden, kernel, padding, groups, precision), (hidden, kernel)


def _grouped_conv_1d_backward(padding, groups, precision, saved, grad_out):
    hidden, kernel = saved
    taps = kernel.shape[0]
    if _as_products(hidden, kernel, groups, precision) and max(padding) < taps:
        # The input gradient is the conv of the output gradient with the kernel turned round: taps reversed, in
        # and out swapped ([K, O, G * I]), each side's padding K - 1 - p.
        per_group_in, per_group_out = kernel.shape[1], kernel.shape[2] // groups
        turned = kernel[::-1].reshape(taps, per_group_in, groups, per_group_out).transpose(0, 3, 2, 1)
        grad_hidden = _conv_by_tap_chunks(grad_out, turned.reshape(taps, per_group_out, groups * per_group_in),
                                          (taps - 1 - padding[0], taps - 1 - padding[1]), groups)
    else:
        _, input_vjp = jax.vjp(lambda h: _xla_grouped_conv_1d(h, kernel, padding, groups, precision), hidden)
        (grad_hidden,) = input_vjp(grad_out)
    kernel_grad = grouped_conv_kernel_grad(hidden, grad_out, taps, padding, groups)
    return grad_hidden, kernel_grad.astype(kernel.dtype)


_grouped_conv_1d.defvjp(_grouped_conv_1d_forward, _grouped_conv_1d_backward)


def grouped_conv_kernel_grad(hidden: jax.Array, grad_out: jax.Array, taps: int, padding: tuple[int, int],
                             groups: int) -> jax.Array:
    """The kernel gradient of a grouped, stride-1 conv over time.

    Where each group is at least `_TAP_PRODUCT_MIN_WIDTH` channels wide in and out (wav2vec2's positional conv:
    48), a few taps at a time as one batched product per chunk (`_kernel_grad_by_tap_chunks`); narrower groups
    (the depthwise convs: 1) one batched product per tap, contracting the tokens of both operands.

    Args:
        hidden: the conv's input [B, N, G * I].
        grad_out: the gradient of its output [B, T, G * O].
        taps: K, the kernel's width.
        padding: (before, after) frames of zero padding.
        groups: G.

    Returns:
        [K, I, G * O] float32.
    """
    b, t, out_channels = grad_out.shape
    per_group_in, per_group_out = hidden.shape[2] // groups, out_channels // groups
    if _wide_groups(hidden, out_channels, groups):
        return _kernel_grad_by_tap_chunks(hidden, grad_out, taps, padding, groups)
    padded = _per_group(jnp.pad(hidden, ((0, 0), padding, (0, 0))), groups)  # [G, B, N + pad, I]
    grads = _per_group(grad_out, groups).reshape(groups, b * t, per_group_out)

    def tap(k: jax.Array) -> jax.Array:
        window = jax.lax.dynamic_slice_in_dim(padded, k, t, axis=2).reshape(groups, b * t, per_group_in)
        return float32_einsum("GRI,GRO->GIO", window, grads)  # [G, I, O]

    kernel_grad = jax.lax.map(tap, jnp.arange(taps))  # [K, G, I, O]
    return kernel_grad.transpose(0, 2, 1, 3).reshape(taps, per_group_in, out_channels)


_TAP_PRODUCT_MIN_WIDTH = 16  # channels per group, in and out, from which the taps are chunked into products
_TAP_PRODUCT_ROWS = 384  # taps x input channels per group in one chunk's product


def _tap_chunks(taps: int, per_group_in: int) -> tuple[int, int]:
    """(C, the taps per chunk; the number of chunks): C x I ~ `_TAP_PRODUCT_ROWS`, the last chunk possibly running
    past the K-th tap."""
    chunk = max(1, min(taps, _TAP_PRODUCT_ROWS // per_group_in))
    return chunk, -(-taps // chunk)


def _tap_windows(frames: jax.Array, first: jax.Array, chunk: int, length: int, axis: int, stack_axis: int
                 ) -> jax.Array:
    """The `length` frames (along `axis`) that each of the taps first, ..., first + chunk - 1 reads, stacked at
    `stack_axis`. Bfloat16 frames are sliced as their bits (uint16): XLA:CPU slices a bfloat16 array at a traced
    offset through a float32 copy of it (wav2vec2-base's positional conv at 4 x 10 s, its three passes: 122-126
    -> 100-102 ms)."""
    bits = frames.dtype == jnp.bfloat16
    source = jax.lax.bitcast_convert_type(frames, jnp.uint16) if bits else frames
    windows = jnp.stack([jax.lax.dynamic_slice_in_dim(source, first + j, length, axis=axis) for j in range(chunk)],
                        axis=stack_axis)
    return jax.lax.bitcast_convert_type(windows, jnp.bfloat16) if bits else windows


def _kernel_grad_by_tap_chunks(hidden: jax.Array, grad_out: jax.Array, taps: int, padding: tuple[int, int],
                               groups: int) -> jax.Array:
    """`grouped_conv_kernel_grad` as one batched product per chunk of C taps, C x I ~ `_TAP_PRODUCT_ROWS`:
    [G, C * I, R] windows (the input laid out tokens last, shifted by each tap of the chunk) times the output
    gradient [G, R, O], the R = B * T tokens contracted as the left operand's last axis and the right one's rows.

    That is the form XLA:CPU runs on the matrix units for bfloat16 operands with float32 sums (a product that
    contracts the rows of both operands, as one tap's [G, R, I]^T x [G, R, O] does, is upcast to float32 and runs
    at ~60-100 GFLOP/s), and in float32 too the wider products are faster than one per tap. The chunks run in a
    loop (`jax.lax.map`), so one chunk's windows (C * I * R entries per group) are alive at a time, whatever
    order XLA gives the program; the input's tokens-last copy is made once, before the loop."""
    b, t, out_channels = grad_out.shape
    per_group_in, per_group_out = hidden.shape[2] // groups, out_channels // groups
    chunk, chunks = _tap_chunks(taps, per_group_in)  # the last chunk's taps past K read clamped windows, cut below
    padded = jnp.pad(hidden, ((0, 0), padding, (0, 0)))
    tokens_last = padded.reshape(b, -1, groups, per_group_in).transpose(2, 3, 0, 1)  # [G, I, B, N + pad]
    grads = _per_group(grad_out, groups).reshape(groups, b * t, per_group_out)

    def taps_from(first: jax.Array) -> jax.Array:
        windows = _tap_windows(tokens_last, first, chunk, t, 3, 1).reshape(groups, chunk * per_group_in, b * t)
        return float32_einsum("GMR,GRO->GMO", windows, grads)  # [G, C * I, O]

    kernel_grad = jax.lax.map(taps_from, jnp.arange(0, chunks * chunk, chunk))  # [chunks, G, C * I, O]
    kernel_grad = kernel_grad.reshape(chunks, groups, chunk, per_group_in, per_group_out)
    kernel_grad = kernel_grad.transpose(0, 2, 3, 1, 4).reshape(chunks * chunk, per_group_in, out_channels)
    return kernel_grad[:taps]


def _conv_by_tap_chunks(hidden: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int) -> jax.Array:
    """The grouped, stride-1 conv over time (hidden [B, N, G * I], kernel [K, I, G * O] -> [B, T, G * O]) as one
    batched product per chunk of C taps, C x I ~ `_TAP_PRODUCT_ROWS`: [G, R, C * I] windows (the R = B * T output
    frames' inputs at the chunk's taps) times the chunk's kernel rows [G, C * I, O], summed over the chunks in
    float32 and rounded once to the inputs' dtype.

    For bfloat16 operands: XLA:CPU computes a bfloat16 convolution as a float32 one, off the matrix units
    (wav2vec2-base's positional conv at 4 x 10 s: ~100 ms; as products: ~60 ms). In float32 its convolution is
    the faster. One chunk's windows are alive at a time (a loop, as for the kernel gradient)."""
    b, n, _ = hidden.shape
    taps, per_group_in, out_channels = kernel.shape
    per_group_out = out_channels // groups
    t = n + padding[0] + padding[1] - taps + 1
    chunk, chunks = _tap_chunks(taps, per_group_in)
    extra = chunks * chunk - taps  # the last chunk's taps past K: zero kernel rows over zero frames
    padded = _per_group(jnp.pad(hidden, ((0, 0), (padding[0], padding[1] + extra), (0, 0))), groups)  # [G, B, N', I]
    rows = jnp.pad(kernel, ((0, extra), (0, 0), (0, 0))).reshape(chunks, chunk, per_group_in, groups, per_group_out)
    rows = rows.transpose(0, 3, 1, 2, 4).reshape(chunks, groups, chunk * per_group_in, per_group_out)

    def add_chunk(sums: jax.Array, chunk_rows: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        first, kernel_rows = chunk_rows
        windows = _tap_windows(padded, first, chunk, t, 2, 3).reshape(groups, b * t, chunk * per_group_in)
        return sums + float32_einsum("GRM,GMO->GRO", windows, kernel_rows), None

    sums = jnp.zeros((groups, b * t, per_group_out), jnp.float32)
    sums, _ = jax.lax.scan(add_chunk, sums, (jnp.arange(0, chunks * chunk, chunk), rows))
    out = sums.astype(hidden.dtype).reshape(groups, b, t, per_group_out)
    return out.transpose(1, 2, 0, 3).reshape(b, t, out_channels)


def frame_mask(encoder_config: Any, attention_mask: jax.Array, num_frames: int,
               add_adapter: bool | None = None) -> jax.Array:
    """Which of an encoder's output frames hold real audio, from the sample-level mask.

    Args:
        encoder_config: an `EncoderConfig` (its `output_lengths` counts frames, adapter included by default).
        attention_mask: [B, N], 1 for real samples (right padding).
        num_frames: S, the number of frames of the padded batch.
        add_adapter: passed to `output_lengths` (False: the frames before an adapter).

    Returns:
        [B, S] bool, True for the first `output_lengths(sum(attention_mask))` frames of each row.
    """
    lengths = encoder_config.output_lengths(attention_mask.sum(-1).astype(jnp.int32), add_adapter)  # [B]
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def layer_drop(module: Any, rate: float, deterministic: bool) -> jax.Array | bool:
    """LayerDrop: whether `module`'s layer is skipped in this call (training only).

    One uniform draw per layer per call from the module's "dropout" PRNG stream, so that a compiled training
    step draws anew at every step (Python's `random` would be frozen into the trace). `run_unless_dropped` runs
    the layer or not.
    """
    if deterministic or rate <= 0.0:
        return False
    return jax.random.uniform(module.make_rng("dropout"), ()) < rate


def run_unless_dropped(drop: jax.Array | bool, layer: nn.Module, run: Callable[..., Any], carry: Any,
                       *args: Any) -> Any:
    """`run(layer, carry, *args)`, or `carry` passed through where LayerDrop dropped the layer (`drop`, from
    `layer_drop`); `run` returns what `carry` holds (the hidden states, or those and a cache).

    In training (`drop` a traced bool) the layer runs under `nn.cond`: a dropped layer costs no computation,
    forward or backward, as transformers skips it (computing it and selecting the input would spend the whole
    layer's work on each dropped one: ~10% of wav2vec2-base's encoder at LayerDrop 0.1). While the params are
    being created both branches must see the layer, so `init` computes it and selects.
    """
    if drop is False:
        return run(layer, carry, *args)
    if layer.is_initializing():
        return computed_and_selected(drop, layer, run, carry, *args)
    return nn.cond(drop, lambda _, passed, *__: passed, run, layer, carry, *args)


def computed_and_selected(drop: jax.Array | bool, layer: nn.Module, run: Callable[..., Any], carry: Any,
                          *args: Any) -> Any:
    """`run(layer, carry, *args)` computed whatever `drop` is, `carry` selected where it is True (LayerDrop
    without a conditional: a dropped layer costs its whole work)."""
    return jax.tree.map(functools.partial(jnp.where, drop), carry, run(layer, carry, *args))


# ----------------------------------------------------------------------------------------------------------
# Layer stacks: unrolled or scanned


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """How the layer stacks built in the current context run.

    Attributes:
        scan: one `nn.scan` over a single layer module with stacked params (a leading layer axis) instead of
            one module per layer (`name=str(i)`, HF's layout).
        remat: rematerialise each scanned layer (`nn.remat` inside the scan). Unrolled layers are
            rematerialised by `flax_model.layer_calls.pure_layers` instead.
        residual_bits: keep a scanned layer's bfloat16 residuals (a rematerialised one's: its inputs) as their
            bits (`bfloat16_residual_bits`); set by the training loss under bfloat16 compute.
    """

    scan: bool = False
    remat: bool = False
    residual_bits: bool = False


UNROLLED = ScanSettings()
_SCAN: contextvars.ContextVar[ScanSettings | None] = contextvars.ContextVar("layer_scan", default=None)


def scan_settings() -> ScanSettings:
    """The settings of the current context (`layer_scan`); unrolled outside any."""
    return _SCAN.get() or UNROLLED


@contextlib.contextmanager
def layer_scan(scan: bool = True, remat: bool | None = None, residual_bits: bool | None = None) -> Iterator[None]:
    """Within this context, the layer stacks that modules build (`make_stack`) are scanned (or not: `scan=False`).

    The choice changes the param tree, so a model must be initialised and applied under the same setting: the
    composed model (`SpeechEncoderDecoderModule.scan_layers`) enters this context in each of its methods.

    Args:
        scan: scan the stacks.
        remat: rematerialise each scanned layer; None keeps the enclosing context's choice.
        residual_bits: `ScanSettings.residual_bits`; None keeps the enclosing context's choice.
    """
    outer = scan_settings()
    token = _SCAN.set(ScanSettings(scan, outer.remat if remat is None else remat,
                                   outer.residual_bits if residual_bits is None else residual_bits))
    try:
        yield
    finally:
        _SCAN.reset(token)


Stack = Sequence[nn.Module] | nn.Module  # per-layer modules, or the one module a scan runs over


def make_stack(parent: nn.Module, make_layer: Callable[[int, str], nn.Module], num_layers: int) -> Stack:
    """The layers of a stack, built inside `parent`'s `setup` or compact method.

    Unrolled: `[make_layer(i, str(i)) for i]`, layer i's params at `<parent>/<i>/...` (HF's Flax layout).
    Scanned (inside `layer_scan`): one `make_layer(0, "layer")` whose scope is `parent`'s own, so that its
    stacked params sit at `<parent>/...` with a leading layer axis (`convert.base.stacking` converts between the two).

    Args:
        parent: the module the stack's params live under.
        make_layer: (layer index, name) -> an unbound layer module. A scanned layer is built with index 0 and
            gets its traced index from `run_stack` (a layer whose computation depends on its index must take it
            from there).
        num_layers: how many layers.
    """
    if not scan_settings().scan:
        return [make_layer(i, str(i)) for i in range(num_layers)]
    layer = make_layer(0, "layer")
    nn.share_scope(parent, layer)
    return layer


def is_scanned(layers: Stack) -> bool:
    return isinstance(layers, nn.Module)


Step = Callable[..., tuple[Any, Any]]  # (layer, index, carry, x, *shared) -> (carry, out)


def run_stack(layers: Stack, num_layers: int, step: Step, carry: Any, per_layer: Any = None,
              shared: tuple[Any, ...] = ()) -> tuple[Any, Any]:
    """Runs `step` through the layers in order: `carry, out = step(layer, index, carry, x, *shared)`.

    Unrolled, `index` is the Python int i and `x` is `per_layer[i]`; the outputs come back as a tuple. Scanned,
    `index` is a traced int32 scalar, `x` the i-th slice of the stacked `per_layer` pytree (leading layer axis),
    and the outputs come back stacked. Scanned layers draw their "dropout" keys from a key split per layer
    (`split_rngs`), so their random draws differ from the unrolled layers' for the same key.

    Args:
        layers: from `make_stack`.
        num_layers: how many layers (the scan's length).
        step: one layer's work; what it reads besides its arguments is closed over (static, or arrays that are
            not differentiated).
        carry: what flows from layer to layer (e.g. the hidden states [B, T, D]).
        per_layer: each layer's own input (e.g. its `LayerCache`), or None.
        shared: what every layer reads as it is (the attention bias, the encoder's hidden states for
            cross-attention, ...), passed to `step` after `x`. A scanned stack broadcasts them to each step as
            arguments: an array that is differentiated must come this way, not closed over by `step` (the custom
            gradient of `bfloat16_residual_bits` can only differentiate its arguments).
    """
    if not is_scanned(layers):
        outs = []
        for i, layer in enumerate(layers):
            carry, out = step(layer, i, carry, None if per_layer is None else per_layer[i], *shared)
            outs.append(out)
        return carry, tuple(outs)

    remat = scan_settings().remat

    def body(layer: nn.Module, carry: Any, xs: tuple[jax.Array, Any], shared: tuple[Any, ...]) -> tuple[Any, Any]:
        index, x = xs
        with layer_recomputed(remat):
            return step(layer, index, carry, x, *shared)

    if remat:
        # Inside a scan, common-subexpression elimination cannot merge the recomputation with the forward pass.
        body = nn.remat(body, prevent_cse=False)
    if scan_settings().residual_bits:
        body = bfloat16_residual_bits(body)
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=num_layers)
    return scanned(layers, carry, (jnp.arange(num_layers, dtype=jnp.int32), per_layer), shared)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["leaves"], meta_fields=["tree", "bfloat16"])
@dataclasses.dataclass(frozen=True)
class _Residuals:
    leaves: list[jax.Array]  # the residuals, bfloat16 ones as their 16 bits (uint16)
    tree: Any  # the structure of the linearised layer's backward function (its residuals the leaves)
    bfloat16: tuple[bool, ...]  # which leaves were bfloat16


def _residuals_as_bits(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a pure function of pytrees of arrays) whose gradient keeps the bfloat16 residuals of its linearisation
    as their bits (uint16) between the forward and the backward pass; the same gradient."""

    def forward(*args: Any) -> tuple[Any, _Residuals]:
        out, backward_fn = jax.vjp(fn, *args)
        leaves, tree = jax.tree.flatten(backward_fn)
        bfloat16 = tuple(leaf.dtype == jnp.bfloat16 for leaf in leaves)
        bits = [jax.lax.bitcast_convert_type(leaf, jnp.uint16) if b else leaf for leaf, b in zip(leaves, bfloat16)]
        return out, _Residuals(bits, tree, bfloat16)

    def backward(residuals: _Residuals, grad: Any) -> Any:
        leaves = [jax.lax.bitcast_convert_type(leaf, jnp.bfloat16) if b else leaf
                  for leaf, b in zip(residuals.leaves, residuals.bfloat16)]
        return jax.tree.unflatten(residuals.tree, leaves)(grad)

    call = jax.custom_vjp(fn)
    call.defvjp(forward, backward)
    return call


def bfloat16_residual_bits(body: Callable[..., Any]) -> Callable[..., Any]:
    """`body` (a scanned layer step: module, then arrays) with its bfloat16 residuals kept as their bits (uint16).

    A scan keeps each layer's residuals for the backward pass by writing them into arrays stacked over the layers.
    XLA's CPU backend has no bfloat16 dynamic-update-slice: it converts the whole stacked array to float32, writes
    the layer's slice and converts it back, at every layer (for wav2vec2-base at 4 x 10 s, twelve layers' attention
    probabilities, 1.7 GB, read and written per layer). Integers are written in place. The gradient is the same:
    the bits are the residuals (`jax.lax.bitcast_convert_type` both ways).

    The layer runs as a pure function of its variables, its "dropout" key and the arrays (a custom gradient may
    not close over values traced inside the scan), so its random draws come from that key as an `apply` has them.
    """

    def run(layer: nn.Module, *args: Any) -> Any:
        module, variables = layer.unbind()
        rng = layer.make_rng("dropout") if layer.has_rng("dropout") else None

        def pure(variables: Any, rng: jax.Array | None, *args: Any) -> Any:
            return module.apply(variables, *args, rngs=None if rng is None else {"dropout": rng}, method=body)

        return _residuals_as_bits(pure)(variables, rng, *args)

    return run


def map_stack(layers: Stack, num_layers: int, fn: Callable[[nn.Module], Any]) -> Any:
    """`fn(layer)` for every layer: a tuple (unrolled) or one stacked pytree (scanned)."""
    return run_stack(layers, num_layers, lambda layer, index, carry, x: (carry, fn(layer)), None)[1]
