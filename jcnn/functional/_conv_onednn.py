"""Convolution through oneDNN on CPU (the optional native backend of :mod:`jcnn.native`).

``conv_general`` has the contract of :func:`jcnn.functional._conv_cpu.conv_general`: channels-last
input ``(N, *spatial, C)``, kernel ``(*window, C // groups, C_out)``, explicit non-negative padding,
1-, 2- or 3-D, float32 or bfloat16 (oneDNN accumulates bfloat16 in float32 and rounds once). On
CPU its three products (forward, input gradient, weight gradient) are XLA FFI calls into oneDNN;
on other platforms it is ``lax.conv_general_dilated``. With a single input channel
(``C_in == 1``: LeNet-5's first layer, grayscale images, single-channel volumes) the input
gradient keeps jcnn's XLA formulation (a GEMM and col2im; oneDNN's took 0.9-2.7x its time, run AE),
and so does the forward product where oneDNN's kernel for a 2-D or 3-D window is its GEMM
fallback (:func:`_single_channel_forward_on_xla`). Depthwise convolutions
(``groups == C_in > 1``) run their forward and input gradient on oneDNN, whose depthwise kernels
(``brdgmm_dw``/``jit_dw``) take channels-last directly: forward + both gradients measured 1.2-5x
PyTorch CPU and 1-5x jcnn's XLA shifted multiply-adds on MobileNetV2/ConvNeXt shapes, on
AVX-512 and with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``); see
``experiments/benchmarks/README.md``. Their float32 weight gradient with one output channel per
group is ``jcnn/native/depthwise_weight_grad.cc`` (oneDNN's ran at 7-13 GFLOP/s on 7x7 windows,
this one at 68-84 on an AVX-512 EPYC, run X). With a channel multiplier above 1 it
stays on oneDNN, or runs as the XLA path's per-offset sums where those measured faster: a window
spanning twice the output map, or a oneDNN GEMM fallback (:func:`jcnn.native.implementation`
names the kernel oneDNN chose on this CPU). A 3-D weight gradient with a depth stride runs as
2-D weight gradients on oneDNN, one per depth tap, where oneDNN's 3-D kernel for it is a GEMM
(AVX2). A dense weight gradient over outputs at most 2 pixels wide, with 256 channels or more in
and out, runs as XLA's convolution unless it is per example (:func:`_dense_weight_grad_on_xla`).

``conv_transpose`` runs ``F.conv_transpose`` as the input gradient of the convolution it
transposes, so a stride-``s`` transposed convolution no longer convolves an ``s^rank`` times larger
zero-interleaved input.

The three products are primitives of :mod:`jcnn.functional._conv_products` (each one's
transpose is another), so derivatives of any order, forward or reverse, stay on oneDNN. The FFI
calls batch with ``vmap_method="expand_dims"``: the native side folds a vmapped
input into the batch axis when the kernel is shared, and loops otherwise (per-example weight
gradients: with at least twice as many problems as threads, one problem per thread).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcnn import native
from jcnn.functional._conv_cpu import (
    _check,
    _Config,
    _depthwise,
    _output_sizes,
    _per_tap_sum_weight_grad,
    _shift_input_grad,
    native_conv,
)
from jcnn.functional._conv_products import conv_products, problems

__all__ = ["config", "conv_general", "conv_transpose", "transposed_problem", "unsupported_reason"]

_PRODUCTS = {0: "forward", 1: "input gradient", 2: "weight gradient"}
_MAX_ELEMENTS = 2**31


def config(x, w, stride, padding, dilation, groups) -> _Config:
    """Check the operands and options as ``_conv_cpu.conv_general`` does; the static config."""
    return _check(x, w, stride, padding, dilation, groups, None)


def unsupported_reason(x, w, stride, padding, dilation, groups) -> str | None:
    """Why oneDNN cannot run this convolution on this CPU (a dtype other than float32 and
    bfloat16, a tensor of ``2**31`` elements or more, or one of its three products has no
    implementation for the dtype and shape, e.g. bfloat16 without AVX-512), or ``None``.

    Asked at trace time with the traced shapes; the batch size is irrelevant to oneDNN's choice
    (a ``vmap`` folds into it), so one answer covers the derivatives too.
    """
    static = config(x, w, stride, padding, dilation, groups)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return f"jcnn's oneDNN convolutions take float32 or bfloat16, not {x.dtype}"
    if not all(isinstance(size, int) for size in x.shape):
        return "oneDNN's primitives take concrete sizes, not jax.export's symbolic ones"
    dims = _problem(x.shape, w.shape, static)
    spatial = len(x.shape) - 2
    out_shape = (x.shape[0], *dims[4 + spatial : 4 + 2 * spatial], w.shape[-1])
    if max(np.prod(s, dtype=object) for s in (x.shape, w.shape, out_shape)) >= _MAX_ELEMENTS:
        # oneDNN's primitive creation divided by zero (SIGFPE, the process killed) on some such
        # problems, e.g. a (1, 2**32, 1, 1) input with a 1x1 kernel
        return f"jcnn keeps tensors of {_MAX_ELEMENTS} elements or more off oneDNN"
    bfloat16 = x.dtype == jnp.bfloat16
    for op, product in _PRODUCTS.items():
        if op == 1 and _single_input_channel(w, static):
            continue  # kept on XLA (see the module docstring)
        reason = native.unsupported_reason(op, bfloat16, dims, w.ndim - 2)
        if reason is not None:
            return f"oneDNN has no {x.dtype} {product} for this convolution on this CPU ({reason})"
    return None


def _problem(x_shape, w_shape, config) -> tuple[int, ...]:
    """A convolution as :mod:`jcnn.native` describes it to oneDNN (see ``onednn_conv.cc``)."""
    out_sizes = _output_sizes(
        x_shape[1:-1], w_shape[:-2], config.stride, config.padding, config.dilation
    )
    dims = (
        max(x_shape[0], 1),
        x_shape[-1],
        w_shape[-1],
        config.groups,
        *x_shape[1:-1],
        *out_sizes,
        *w_shape[:-2],
        *config.stride,
        *config.dilation,
        *(lo for lo, _ in config.padding),
        *(hi for _, hi in config.padding),
    )
    return tuple(int(d) for d in dims)


def conv_general(x, w, stride, padding, dilation, groups):
    """Cross-correlation equal to ``lax.conv_general_dilated``, through oneDNN on CPU.

    Needs the native library (:func:`jcnn.native.available`); a ``RuntimeError`` says why when it
    is missing, a ``ValueError`` when oneDNN has no implementation of the problem on this CPU
    (:func:`unsupported_reason`).

    >>> from jcnn import native
    >>> if native.available():
    ...     y = conv_general(jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), (1, 1),
    ...                      ((1, 1), (1, 1)), (1, 1), 1)
    ...     print(y.shape, float(y[0, 2, 2, 0]))
    ... else:
    ...     print((2, 6, 6, 4), 27.0)
    (2, 6, 6, 4) 27.0
    """
    static = config(x, w, stride, padding, dilation, groups)
    reason = unsupported_reason(x, w, stride, padding, dilation, groups)
    if reason is not None:
        raise ValueError(f"{reason}; jcnn.functional.conv routes such convolutions to XLA")
    out_sizes = _output_sizes(
        x.shape[1:-1], w.shape[:-2], static.stride, static.padding, static.dilation
    )
    y_shape = (x.shape[0], *out_sizes, w.shape[-1])
    return lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: _ONEDNN.forward(x, w, static, y_shape),
        default=partial(native_conv, config=static),
    )


def transposed_problem(x, w, stride, padding, dilation, groups, out_sizes):
    """The convolution whose input gradient is ``F.conv_transpose(x, w, ...)``: its input shape
    (``x``'s batch, ``out_sizes``, ``C_out``) and kernel ``(*window, C_out // groups, C_in)``
    (``w``'s per-group blocks transposed), or ``None`` when an ``output_padding`` reaching the
    stride (allowed below the dilation) makes that convolution's output longer than ``x``, or
    when ``x`` is empty along a spatial dim (that convolution's output would be, which oneDNN's
    primitives refuse; the XLA path gives the bias, as nothing is scattered)."""
    if 0 in x.shape[1:-1]:
        return None
    reach = zip(out_sizes, x.shape[1:-1], w.shape[:-2], stride, padding, dilation, strict=True)
    if any((o + lo + hi - d * (k - 1) - 1) // s + 1 != n for o, n, k, s, (lo, hi), d in reach):
        return None
    window, in_channels, out_per_group = w.shape[:-2], w.shape[-2], w.shape[-1]
    blocks = w.reshape(*window, groups, in_channels // groups, out_per_group)
    forward_w = jnp.moveaxis(blocks, -1, -3).reshape(*window, out_per_group, in_channels)
    x_shape = (x.shape[0], *out_sizes, out_per_group * groups)
    return jax.ShapeDtypeStruct(x_shape, x.dtype), forward_w


def conv_transpose(x, w, stride, padding, dilation, groups, out_sizes):
    """``F.conv_transpose`` (kernel ``(*window, C_in, C_out // groups)``, output spatial sizes
    ``out_sizes``) as oneDNN's input gradient of the convolution it transposes: no
    zero-interleaved input, so a stride-2 transposed convolution costs what the stride-2
    convolution does instead of 2^rank times more. Derivatives of any order stay on oneDNN.

    >>> from jcnn import native
    >>> if native.available():
    ...     y = conv_transpose(jnp.ones((1, 3, 3, 2)), jnp.ones((2, 2, 2, 5)), (2, 2),
    ...                        ((0, 0), (0, 0)), (1, 1), 1, (6, 6))
    ...     print(y.shape, float(y[0, 0, 0, 0]))
    ... else:
    ...     print((1, 6, 6, 5), 2.0)
    (1, 6, 6, 5) 2.0
    """
    problem = transposed_problem(x, w, stride, padding, dilation, groups, out_sizes)
    if problem is None:
        raise ValueError(
            f"out_sizes: {out_sizes} is not the input size of a convolution with output "
            f"{tuple(x.shape[1:-1])} (stride {stride}); jcnn.functional.conv_transpose routes "
            f"such output paddings to XLA"
        )
    forward_x, forward_w = problem
    static = config(forward_x, forward_w, stride, padding, dilation, groups)
    reason = unsupported_reason(forward_x, forward_w, stride, padding, dilation, groups)
    if reason is not None:
        raise ValueError(f"{reason}; jcnn.functional.conv_transpose routes such problems to XLA")
    return lax.platform_dependent(
        x,
        forward_w,
        cpu=lambda x, w: _ONEDNN.input_grad(x, w, static, forward_x.shape),
        default=partial(_native_input_grad, config=static, x_shape=forward_x.shape),
    )


def _native_input_grad(dy, w, config, x_shape):
    zeros = jnp.zeros(x_shape, dy.dtype)
    return jax.vjp(lambda x: native_conv(x, w, config), zeros)[1](dy)[0]


def _native_weight_grad(x, dy, config, w_shape):
    zeros = jnp.zeros(w_shape, x.dtype)
    return jax.vjp(lambda w: native_conv(x, w, config), zeros)[1](dy)[0]


def _call(target, out_shape, first, second, config):
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, first.dtype), vmap_method="expand_dims"
    )(
        first,
        second,
        stride=np.asarray(config.stride, np.int64),
        pad_lo=np.asarray([lo for lo, _ in config.padding], np.int64),
        pad_hi=np.asarray([hi for _, hi in config.padding], np.int64),
        dilation=np.asarray(config.dilation, np.int64),
        groups=np.int64(config.groups),
    )


def _single_input_channel(w, config):
    return w.shape[-2] == 1 and config.groups == 1


def _single_channel_forward_on_xla(x, w, config) -> bool:
    """Whether the forward product of a convolution with one input channel runs faster as XLA's
    own convolution: where oneDNN's kernel for a 2-D or 3-D window is its GEMM fallback (large
    padded windows with AVX2: 1.1-1.6x XLA's time), outside ``vmap``. Its direct kernels took
    0.03-0.84x XLA's time with AVX-512 and with AVX2 (LeNet-5's first layer 0.23x, 3-D windows
    0.03-0.14x), its 1-D GEMM 0.33-0.51x, and per example it was faster throughout (run AE)."""
    if w.ndim == 3 or problems() > 1:
        return False
    dims = _problem(x.shape, w.shape, config)
    kernel = native.implementation(0, x.dtype == jnp.bfloat16, dims, w.ndim - 2)
    return kernel is not None and "gemm" in kernel


def _forward(x, w, config, y_shape):
    if _single_input_channel(w, config) and _single_channel_forward_on_xla(x, w, config):
        return native_conv(x, w, config)
    return _call("jcnn_conv_forward", y_shape, x, w, config)


def _backward_data(dy, w, config, x_shape):
    if _single_input_channel(w, config):
        return _shift_input_grad(dy, w, x_shape, config)
    return _call("jcnn_conv_backward_data", x_shape, dy, w, config)


def _backward_weights(x, dy, config, w_shape):
    if x.dtype == jnp.bfloat16 and (len(w_shape) == 5 or _strided_single_output(dy, config)):
        return _float32_weight_grad(x, dy, config, w_shape)
    if _one_channel_per_group(x, config, w_shape):
        return _call("jcnn_depthwise_weight_grad", w_shape, x, dy, config)
    if _depthwise_weight_grad_on_xla(x, dy, config, w_shape):
        return _per_tap_sum_weight_grad(x, dy, w_shape, config)
    if _weight_grad_over_depth_taps(x, config, w_shape):
        return _depth_tap_weight_grad(x, dy, config, w_shape)
    if _dense_weight_grad_on_xla(x, dy, config, w_shape):
        return _native_weight_grad(x, dy, config, w_shape)
    return _call("jcnn_conv_backward_weights", w_shape, x, dy, config)


def _float32_weight_grad(x, dy, config, w_shape):
    """A bfloat16 3-D weight gradient as the float32 one of the same values, rounded once to
    bfloat16 (what oneDNN's bfloat16 kernels compute). oneDNN 3.2's bfloat16 3-D weight gradient
    (``jit_bf16``, channels-last), run by one thread (per-example gradients, ``OMP_NUM_THREADS=1``),
    returned wrong values, uninitialized memory among them, where the depth padding leaves few
    output depths: e.g. a (1, 2, 2, 2, 16) input under a 3x3x3 window with padding 1 (AVX-512
    EPYC with AVX512-BF16, and capped at ``AVX512_CORE``)."""
    wide = (v.astype(jnp.float32) for v in (x, dy))
    return _backward_weights(*wide, config, w_shape).astype(jnp.bfloat16)


def _strided_single_output(dy, config) -> bool:
    """Whether the output is 1 pixel long along a dimension with a stride above 1. There oneDNN
    3.2's 1-D and 2-D bfloat16 weight gradient (``jit_bf16``, AVX-512 EPYC with AVX512-BF16)
    returned wrong values, uninitialized memory among them (e.g. a (1, 2, 16) input, a window of 3,
    stride 3, padding (1, 0)); with stride 1, or 2 outputs or more, it was right."""
    return any(o == 1 and s > 1 for o, s in zip(dy.shape[1:-1], config.stride, strict=True))


def _dense_weight_grad_on_xla(x, dy, config, w_shape) -> bool:
    """Whether a float32 dense weight gradient runs faster as XLA's own convolution: one problem
    (not per-example), outputs at most 2 pixels along every dimension, a window larger than 1x1
    and at least 256 channels in and out, where most of the window's taps see only padding.
    oneDNN took 1.2-3.0x XLA's time there with AVX-512 and 2.1-8.7x capped at AVX2; with 128
    channels, a 1x1 window or a 3x3 map on AVX-512 it was faster, and per example XLA's batched
    convolution took 2.2-3.3x oneDNN's time (run AD)."""
    return (
        x.dtype == jnp.float32
        and config.groups == 1
        and min(x.shape[-1], w_shape[-1]) >= 256
        and any(k > 1 for k in w_shape[:-2])
        and all(size <= 2 for size in dy.shape[1:-1])
        and problems() == 1
    )


def _one_channel_per_group(x, config, w_shape) -> bool:
    """Whether a float32 weight gradient is depthwise with one output channel per group, which
    ``jcnn/native/depthwise_weight_grad.cc`` computes: 5-11x oneDNN's on the benchmark's 7x7
    layers, 1.2-1.4x on its 3x3 layers but one (an 8x8 map, 0.97x), and 1.5-16x the per-offset
    sums on maps of 1x1 to 4x4 (run X)."""
    return x.dtype == jnp.float32 and config.groups == x.shape[-1] == w_shape[-1] > 1


def _weight_grad_over_depth_taps(x, config, w_shape) -> bool:
    """Whether a float32 3-D weight gradient with a depth stride runs faster as one 2-D weight
    gradient per depth tap: when oneDNN's 3-D kernel for it is a GEMM (AVX2 has no direct one)
    and the 2-D kernel is not. Measured on an AVX2 EPYC, depth stride 2: 1.2-1.9x the GEMM
    (the transposed 3-D case of ``experiments/benchmarks/modern.py``: 2.43 -> 1.40 ms, PyTorch
    2.04); with stride 1 the GEMM was as fast or faster (0.8-1.1x)."""
    if x.dtype != jnp.float32 or len(w_shape) != 5 or config.stride[0] == 1:
        return False
    kernel = native.implementation(2, False, _problem(x.shape, w_shape, config), 3)
    if kernel is None or "gemm" not in kernel:
        return False
    plane = _plane_config(config)
    plane_x = (x.shape[0] * x.shape[1], *x.shape[2:])
    plane_kernel = native.implementation(2, False, _problem(plane_x, w_shape[1:], plane), 2)
    return plane_kernel is not None and "gemm" not in plane_kernel


def _plane_config(config):
    """A 3-D convolution's options without the depth dimension."""
    return config._replace(
        stride=config.stride[1:], padding=config.padding[1:], dilation=config.dilation[1:]
    )


def _depth_tap_weight_grad(x, dy, config, w_shape):
    """The 3-D weight gradient as one 2-D weight gradient per depth tap ``t``: the output depths
    whose input depth ``o * stride + t * dilation - pad`` is inside ``x`` fold into the batch, the
    others see padding and add nothing."""
    (pad, _), stride, dilation = config.padding[0], config.stride[0], config.dilation[0]
    depth, out_depth = x.shape[1], dy.shape[1]
    plane = _plane_config(config)
    taps = []
    for tap in range(w_shape[0]):
        offset = tap * dilation - pad
        first = max(0, -(offset // stride))  # the first output depth reading x
        last = min(out_depth - 1, (depth - 1 - offset) // stride)
        if last < first:
            taps.append(jnp.zeros(w_shape[1:], x.dtype))
            continue
        start = first * stride + offset
        xs = lax.slice_in_dim(x, start, start + (last - first) * stride + 1, stride, axis=1)
        ys = lax.slice_in_dim(dy, first, last + 1, axis=1)
        xs, ys = (v.reshape(-1, *v.shape[2:]) for v in (xs, ys))
        taps.append(_call("jcnn_conv_backward_weights", w_shape[1:], xs, ys, plane))
    return jnp.stack(taps)


def _depthwise_weight_grad_on_xla(x, dy, config, w_shape) -> bool:
    """Whether a float32 depthwise weight gradient (with a channel multiplier above 1, the others
    being :func:`_one_channel_per_group`'s) runs faster as jcnn's per-offset sums (the XLA
    path's ``"per_tap_sum"``) than on oneDNN: when the window spans at least twice the output map
    in every dimension (most of its taps see only padding; a 2x2 map under a 7x7 window, AVX-512:
    0.30 ms against oneDNN's 0.84), or when oneDNN's kernel for it is a GEMM (capped at AVX2, maps
    of 4x4 or less: 1.7-3.6 ms where the sums took 0.05-2.3 ms). Measured in
    ``experiments/benchmarks/README.md`` (run P)."""
    if x.dtype != jnp.float32 or not _depthwise(w_shape, config.groups):
        return False
    if all(2 * o <= k for o, k in zip(dy.shape[1:-1], w_shape[:-2], strict=True)):
        return True
    kernel = native.implementation(2, False, _problem(x.shape, w_shape, config), len(w_shape) - 2)
    return kernel is not None and "gemm" in kernel


_ONEDNN = conv_products(
    "jcnn_onednn_conv", _forward, _backward_data, _backward_weights, platform="cpu"
)
